//! GraphQL output and input types: thin views over the domain types.

use async_graphql::connection::{Connection, Edge};
use async_graphql::{ComplexObject, Context, InputObject, Json, Object, SimpleObject, ID};
use chrono::{DateTime, Utc};
use serde_json::Value;

use super::engine;
use super::error::{gql, GqlResult};
use crate::content::ContentItem;
use crate::customers::{Customer, CustomerId};
use crate::decision::{Assignment, Decision, Outcome, ScoredItem};
use crate::events::ingest::{EventError, IngestReport};
use crate::features::service::{Activation, FeatureEntry};
use crate::features::{FeatureService, FeatureValue};
use crate::segments::SegmentDef;
use crate::storage::MembershipChange;

#[derive(Clone)]
pub struct ContentItemObject(pub std::sync::Arc<ContentItem>);

#[Object(name = "ContentItem")]
impl ContentItemObject {
    async fn id(&self) -> ID {
        ID(self.0.id.clone())
    }
    #[graphql(name = "type")]
    async fn content_type(&self) -> &str {
        &self.0.content_type
    }
    async fn title(&self) -> Option<&str> {
        self.0.title.as_deref()
    }
    async fn placements(&self) -> &[String] {
        &self.0.placements
    }
    async fn tags(&self) -> &[String] {
        &self.0.tags
    }
    async fn segments(&self) -> &[String] {
        &self.0.segments
    }
    async fn priority(&self) -> i32 {
        self.0.priority
    }
    async fn attributes(&self) -> Json<Value> {
        Json(Value::Object(self.0.attributes.clone()))
    }
    async fn active_from(&self) -> Option<DateTime<Utc>> {
        self.0.active_from
    }
    async fn active_until(&self) -> Option<DateTime<Utc>> {
        self.0.active_until
    }
    async fn frequency_cap(&self) -> Option<u32> {
        self.0.frequency_cap
    }
}

#[derive(Clone)]
pub struct ScoredItemObject(pub ScoredItem);

#[Object(name = "ScoredItem")]
impl ScoredItemObject {
    async fn item(&self) -> ContentItemObject {
        ContentItemObject(self.0.item.clone())
    }
    async fn score(&self) -> f64 {
        self.0.score
    }
}

#[derive(SimpleObject)]
#[graphql(name = "Assignment")]
pub struct AssignmentObject {
    experiment: String,
    variant: String,
}

impl From<&Assignment> for AssignmentObject {
    fn from(a: &Assignment) -> Self {
        AssignmentObject {
            experiment: a.experiment.clone(),
            variant: a.variant.clone(),
        }
    }
}

#[derive(Clone)]
pub struct DecisionObject(pub std::sync::Arc<Decision>);

#[Object(name = "Decision")]
impl DecisionObject {
    async fn id(&self) -> ID {
        ID(self.0.id.clone())
    }
    async fn customer_id(&self) -> ID {
        ID(self.0.customer_id.to_string())
    }
    async fn placement(&self) -> Option<&str> {
        self.0.placement.as_deref()
    }
    async fn selected_item(&self) -> ContentItemObject {
        ContentItemObject(self.0.selected().item.clone())
    }
    async fn items(&self) -> Vec<ScoredItemObject> {
        self.0.items.iter().cloned().map(ScoredItemObject).collect()
    }
    async fn confidence_score(&self) -> f64 {
        self.0.confidence_score
    }
    async fn alternatives(&self) -> Vec<ScoredItemObject> {
        self.0
            .alternatives
            .iter()
            .cloned()
            .map(ScoredItemObject)
            .collect()
    }
    async fn reasoning(&self) -> &str {
        &self.0.reasoning
    }
    async fn latency_ms(&self) -> f64 {
        self.0.latency_ms
    }
    async fn policy(&self) -> &str {
        &self.0.policy
    }
    async fn propensity(&self) -> f64 {
        self.0.propensity
    }
    /// `exact` or `estimated`.
    async fn propensity_kind(&self) -> String {
        serde_json::to_value(self.0.propensity_kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }
    async fn model_version(&self) -> Option<&str> {
        self.0.model_version.as_deref()
    }
    async fn experiments(&self) -> Vec<AssignmentObject> {
        self.0.experiments.iter().map(Into::into).collect()
    }
    async fn segments(&self) -> &[String] {
        &self.0.segments
    }
    /// Rules that filtered, re-weighted or pinned a candidate of this decision.
    async fn rules(&self) -> &[String] {
        &self.0.rules
    }
    async fn degraded(&self) -> bool {
        self.0.degraded
    }
    async fn explanation(&self) -> Option<Json<Value>> {
        self.0.explanation.clone().map(Json)
    }
    async fn context(&self) -> Json<Value> {
        Json(self.0.context.clone())
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
}

#[derive(SimpleObject)]
#[graphql(name = "Outcome")]
pub struct OutcomeObject {
    decision_id: ID,
    customer_id: ID,
    item_id: ID,
    reward: f64,
    conversion_type: String,
    value: Option<f64>,
    created_at: DateTime<Utc>,
}

impl From<Outcome> for OutcomeObject {
    fn from(o: Outcome) -> Self {
        OutcomeObject {
            decision_id: ID(o.decision_id),
            customer_id: ID(o.customer_id.to_string()),
            item_id: ID(o.item_id),
            reward: o.reward,
            conversion_type: o.conversion_type,
            value: o.value,
            created_at: o.created_at,
        }
    }
}

#[derive(SimpleObject)]
#[graphql(name = "FeatureValue")]
pub struct FeatureValueObject {
    name: String,
    value: f64,
    version: i32,
}

impl From<FeatureValue> for FeatureValueObject {
    fn from(v: FeatureValue) -> Self {
        FeatureValueObject {
            name: v.name,
            value: v.value,
            version: v.version as i32,
        }
    }
}

#[derive(Clone)]
pub struct CustomerObject(pub Customer);

#[Object(name = "Customer")]
impl CustomerObject {
    async fn id(&self) -> ID {
        ID(self.0.id.to_string())
    }
    async fn traits(&self) -> Json<Value> {
        Json(Value::Object(self.0.traits.clone()))
    }
    async fn consent(&self) -> Json<Value> {
        Json(serde_json::to_value(&self.0.consent).unwrap_or(Value::Null))
    }
    async fn segments(&self, ctx: &Context<'_>) -> GqlResult<Vec<String>> {
        Ok(engine(ctx)
            .stores
            .segments
            .segments_of(&self.0.id)
            .await
            .map_err(|e| gql(e.into()))?)
    }
    /// Active values of the named features (all when omitted).
    async fn features(
        &self,
        ctx: &Context<'_>,
        names: Option<Vec<String>>,
    ) -> GqlResult<Vec<FeatureValueObject>> {
        let read = engine(ctx)
            .features
            .read(&self.0.id, names.as_deref(), "names", Utc::now())
            .await
            .map_err(gql)?;
        Ok(read.values.into_iter().map(Into::into).collect())
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
    async fn updated_at(&self) -> DateTime<Utc> {
        self.0.updated_at
    }
}

/// Customers by id, `first` at a time after the cursor `after` (a customer id).
pub async fn customer_page(
    ctx: &Context<'_>,
    segment: Option<&str>,
    first: Option<i32>,
    after: Option<String>,
) -> GqlResult<Connection<String, CustomerObject>> {
    let engine = engine(ctx);
    let first = first.unwrap_or(50);
    if !(0..=1000).contains(&first) {
        return Err(gql(crate::error::Error::invalid(
            "first",
            "must be between 0 and 1000",
        )));
    }
    let first = first as usize;
    let after = after
        .map(|a| CustomerId::parse("after", &a))
        .transpose()
        .map_err(gql)?;
    let customers: Vec<Customer> = match segment {
        None => engine
            .profiles
            .list(after.as_ref(), first + 1)
            .await
            .map_err(|e| gql(e.into()))?,
        Some(segment) => {
            let ids = engine
                .stores
                .segments
                .members(segment, after.as_ref(), first + 1)
                .await
                .map_err(|e| gql(e.into()))?;
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                let profile = engine.profiles.get(&id).await.map_err(|e| gql(e.into()))?;
                out.push(profile.unwrap_or_else(|| Customer {
                    id,
                    traits: Default::default(),
                    pii: Default::default(),
                    consent: Default::default(),
                    created_at: Utc::now(),
                    updated_at: Utc::now(),
                }));
            }
            out
        }
    };
    let has_next = customers.len() > first;
    let mut connection = Connection::new(after.is_some(), has_next);
    connection.edges.extend(
        customers
            .into_iter()
            .take(first)
            .map(|c| Edge::new(c.id.to_string(), CustomerObject(c))),
    );
    Ok(connection)
}

#[derive(Clone)]
pub struct SegmentObject(pub std::sync::Arc<SegmentDef>);

#[Object(name = "Segment")]
impl SegmentObject {
    async fn name(&self) -> &str {
        &self.0.name
    }
    /// The condition tree, with description and version.
    async fn definition(&self) -> Json<Value> {
        Json(self.0.to_json())
    }
    async fn description(&self) -> Option<&str> {
        self.0.description.as_deref()
    }
    async fn version(&self) -> i32 {
        self.0.version as i32
    }
    async fn size(&self, ctx: &Context<'_>) -> GqlResult<i64> {
        let n = engine(ctx)
            .stores
            .segments
            .size(&self.0.name)
            .await
            .map_err(|e| gql(e.into()))?;
        Ok(n as i64)
    }
    async fn contains(&self, ctx: &Context<'_>, customer_id: ID) -> GqlResult<bool> {
        let id = CustomerId::parse("customerId", &customer_id).map_err(gql)?;
        Ok(engine(ctx)
            .stores
            .segments
            .contains(&self.0.name, &id)
            .await
            .map_err(|e| gql(e.into()))?)
    }
    async fn members(
        &self,
        ctx: &Context<'_>,
        first: Option<i32>,
        after: Option<String>,
    ) -> GqlResult<Connection<String, CustomerObject>> {
        customer_page(ctx, Some(&self.0.name), first, after).await
    }
}

#[derive(SimpleObject)]
#[graphql(name = "FeatureVersion")]
pub struct FeatureVersionObject {
    version: i32,
    active: bool,
    definition: Json<Value>,
    created_at: Option<DateTime<Utc>>,
}

#[derive(SimpleObject)]
#[graphql(name = "FeatureActivation")]
pub struct ActivationObject {
    from_version: Option<i32>,
    to_version: i32,
    /// `true` when the engine rolled back on its own after failed health checks.
    automatic: bool,
    reason: String,
    at: DateTime<Utc>,
    health: Option<Json<Value>>,
}

impl From<Activation> for ActivationObject {
    fn from(a: Activation) -> Self {
        ActivationObject {
            from_version: a.from.map(|v| v as i32),
            to_version: a.to as i32,
            automatic: a.automatic,
            reason: a.reason,
            at: a.at,
            health: a
                .health
                .and_then(|h| serde_json::to_value(h).ok())
                .map(Json),
        }
    }
}

#[derive(SimpleObject)]
#[graphql(name = "FeatureDefinition", complex)]
pub struct FeatureDefinitionObject {
    name: String,
    active_version: i32,
    versions: Vec<FeatureVersionObject>,
}

#[ComplexObject]
impl FeatureDefinitionObject {
    /// Every activation and rollback, oldest first; automatic rollbacks say why.
    async fn activations(&self, ctx: &Context<'_>) -> GqlResult<Vec<ActivationObject>> {
        let list = engine(ctx)
            .features
            .activations(&self.name)
            .await
            .map_err(gql)?;
        Ok(list.into_iter().map(Into::into).collect())
    }
}

impl From<&FeatureEntry> for FeatureDefinitionObject {
    fn from(e: &FeatureEntry) -> Self {
        FeatureDefinitionObject {
            name: e.name.clone(),
            active_version: e.active as i32,
            versions: e
                .versions
                .iter()
                .map(|(v, spec)| FeatureVersionObject {
                    version: *v as i32,
                    active: *v == e.active,
                    definition: Json(FeatureService::describe(spec)),
                    created_at: e.created_at.get(v).copied(),
                })
                .collect(),
        }
    }
}

#[derive(SimpleObject)]
#[graphql(name = "EventError")]
pub struct EventErrorObject {
    index: i32,
    field: String,
    message: String,
}

#[derive(SimpleObject)]
#[graphql(name = "TrackResult")]
pub struct TrackResultObject {
    accepted: i32,
    duplicates: i32,
    /// Valid events of customers without analytics consent (their own, or the
    /// configured default): acknowledged, not stored, used for nothing.
    without_consent: i32,
    rejected: Vec<EventErrorObject>,
}

impl From<IngestReport> for TrackResultObject {
    fn from(r: IngestReport) -> Self {
        TrackResultObject {
            accepted: r.accepted as i32,
            duplicates: r.duplicates as i32,
            without_consent: r.without_consent as i32,
            rejected: r
                .rejected
                .into_iter()
                .map(
                    |EventError {
                         index,
                         field,
                         message,
                     }| EventErrorObject {
                        index: index as i32,
                        field,
                        message,
                    },
                )
                .collect(),
        }
    }
}

#[derive(SimpleObject)]
#[graphql(name = "SegmentChange")]
pub struct SegmentChangeObject {
    segment: String,
    customer_id: ID,
    /// `true` for a join, `false` for a leave.
    joined: bool,
}

impl From<MembershipChange> for SegmentChangeObject {
    fn from(c: MembershipChange) -> Self {
        SegmentChangeObject {
            segment: c.segment,
            customer_id: ID(c.customer.to_string()),
            joined: c.joined,
        }
    }
}

#[derive(SimpleObject)]
#[graphql(name = "DefineSegmentResult")]
pub struct DefineSegmentResult {
    pub segment: SegmentObject,
    pub joined: i64,
    pub left: i64,
}

#[derive(SimpleObject)]
#[graphql(name = "ActivateFeatureResult")]
pub struct ActivateFeatureResult {
    pub feature: FeatureDefinitionObject,
    /// `false` when the health check failed and the previous version is active again.
    pub activated: bool,
    pub health: Option<Json<Value>>,
}

#[derive(InputObject)]
pub struct PersonalizeInput {
    pub customer_id: ID,
    pub placement: Option<String>,
    pub available_items: Option<Vec<ID>>,
    pub content_type: Option<String>,
    pub context: Option<Json<Value>>,
    #[graphql(default = 1)]
    pub count: i32,
    #[graphql(default = false)]
    pub explain: bool,
}

#[derive(InputObject)]
pub struct EventInput {
    pub event_id: Option<ID>,
    pub customer_id: ID,
    #[graphql(name = "type")]
    pub event_type: String,
    pub timestamp: Option<DateTime<Utc>>,
    pub properties: Option<Json<Value>>,
}

#[derive(InputObject)]
pub struct CustomerInput {
    pub id: ID,
    pub traits: Option<Json<Value>>,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub name: Option<String>,
    pub consent: Option<Json<Value>>,
}

#[derive(InputObject)]
pub struct ContentItemInput {
    pub id: ID,
    #[graphql(name = "type")]
    pub content_type: String,
    pub title: Option<String>,
    #[graphql(default)]
    pub placements: Vec<String>,
    #[graphql(default)]
    pub tags: Vec<String>,
    #[graphql(default)]
    pub segments: Vec<String>,
    #[graphql(default)]
    pub priority: i32,
    pub attributes: Option<Json<Value>>,
    pub active_from: Option<DateTime<Utc>>,
    pub active_until: Option<DateTime<Utc>>,
    pub frequency_cap: Option<u32>,
}
