//! Mutation fields, one object per domain, merged into `Mutation`.

use async_graphql::{Context, Json, MergedObject, Object, ID};
use serde_json::{json, Value};

use super::auth::Allow;
use super::engine;
use super::error::{gql, GqlResult};
use super::types::*;
use crate::content::ContentItem;
use crate::customers::{parse_traits, Consent, CustomerId, CustomerUpdate, Pii};
use crate::error::Error;

#[derive(Default)]
pub struct IngestMutation;

#[Object]
impl IngestMutation {
    /// Ingests events idempotently on `eventId`; invalid events are reported by index
    /// and field and do not stop the others. Returns once accepted events are durable.
    #[graphql(guard = "Allow::FRONTEND")]
    async fn track_events(
        &self,
        ctx: &Context<'_>,
        events: Vec<EventInput>,
    ) -> GqlResult<TrackResultObject> {
        let raw: Vec<Value> = events
            .into_iter()
            .map(|e| {
                json!({
                    "eventId": e.event_id.map(|id| id.0),
                    "customerId": e.customer_id.0,
                    "type": e.event_type,
                    "timestamp": e.timestamp.map(|t| t.to_rfc3339()),
                    "properties": e.properties.map(|p| p.0),
                })
            })
            .collect();
        let report = engine(ctx).ingestor.ingest(raw).await.map_err(gql)?;
        Ok(report.into())
    }

    /// Creates or updates a customer: traits merge key by key (`null` removes a key).
    #[graphql(guard = "Allow::ADMIN")]
    async fn upsert_customer(
        &self,
        ctx: &Context<'_>,
        input: CustomerInput,
    ) -> GqlResult<CustomerObject> {
        let update = CustomerUpdate {
            id: CustomerId::parse("input.id", &input.id).map_err(gql)?,
            traits: parse_traits("input.traits", input.traits.map(|j| j.0)).map_err(gql)?,
            pii: Pii {
                email: input.email,
                phone: input.phone,
                name: input.name,
            },
            consent: match input.consent {
                Some(Json(v)) => Consent::from_json("input.consent", &v).map_err(gql)?,
                None => Consent::default(),
            },
        };
        let customer = engine(ctx).upsert_customer(update).await.map_err(gql)?;
        Ok(CustomerObject(customer))
    }

    /// Reward feedback on a decision: updates the policy and the conversion metrics.
    #[graphql(guard = "Allow::FRONTEND_INTERNAL")]
    async fn record_outcome(
        &self,
        ctx: &Context<'_>,
        decision_id: ID,
        #[graphql(default = 1.0)] reward: f64,
        conversion_type: Option<String>,
        value: Option<f64>,
    ) -> GqlResult<OutcomeObject> {
        let outcome = engine(ctx)
            .decisions
            .record_outcome(&decision_id, reward, conversion_type, value)
            .await
            .map_err(gql)?;
        Ok(outcome.into())
    }
}

#[derive(Default)]
pub struct DefinitionMutation;

#[Object]
impl DefinitionMutation {
    /// Validates the condition tree, stores a new version and rebuilds membership.
    ///
    /// `condition` is one JSON node: `{"all": [C, ...]}`, `{"any": [C, ...]}`,
    /// `{"not": C}`, `{"trait": "plan", "op": "eq", "value": "pro"}`,
    /// `{"feature": "engagement_score", "op": "gte", "value": 0.5}`,
    /// `{"event": "purchase", "atLeast": 2, "within": "30d"}`, or
    /// `{"rhai": "PREDICATE"}`: a boolean Rhai expression over a read-only `customer` with
    /// `customer.traits` (a map; a missing trait is `()`), `customer.feature("name")` (a
    /// float) and `customer.event_count("page_view", "7d")` (an integer). A predicate must
    /// compile (errors give line and column) and the features it names must exist; one
    /// that fails for a customer at run time keeps that customer out.
    #[graphql(guard = "Allow::MARKETER")]
    async fn define_segment(
        &self,
        ctx: &Context<'_>,
        name: String,
        condition: Json<Value>,
        description: Option<String>,
    ) -> GqlResult<DefineSegmentResult> {
        let (def, joined, left) = engine(ctx)
            .segments
            .define(&name, &condition.0, description)
            .await
            .map_err(gql)?;
        Ok(DefineSegmentResult {
            segment: SegmentObject(def),
            joined: joined as i64,
            left: left as i64,
        })
    }

    #[graphql(guard = "Allow::MARKETER")]
    async fn delete_segment(&self, ctx: &Context<'_>, name: String) -> GqlResult<bool> {
        engine(ctx).segments.delete(&name).await.map_err(gql)
    }

    /// Stores the next version of a feature, backfilled from the event history. The
    /// first version is active at once; later ones wait for `activateFeatureVersion`.
    ///
    /// `definition` is one JSON object: `kind` with its fields, and optional `default`
    /// (0.0) and `description`. Kinds: `count` (`event_type`, `window`), `sum`
    /// (`event_type`, `property`, `window`), `days_since` (optional `event_type`), `ratio`
    /// (`numerator`, `denominator`), `weighted_sum` (`terms`: `[{feature, weight, scale}]`,
    /// optional `cap`) and `expression` (`expression`): a Rhai expression over other
    /// features, each a variable named after the feature, e.g.
    /// `min(1.0, email_opens_30d / 5.0)`. An expression must compile (errors give line and
    /// column) and read only existing features; a result that is not a finite number
    /// reads as the default and counts as an error in the version's health.
    #[graphql(guard = "Allow::ADMIN")]
    async fn define_feature(
        &self,
        ctx: &Context<'_>,
        name: String,
        definition: Json<Value>,
    ) -> GqlResult<FeatureDefinitionObject> {
        let entry = engine(ctx)
            .features
            .define(&name, definition.0)
            .await
            .map_err(gql)?;
        Ok((&entry).into())
    }

    /// Switches a feature to a version (also how a rollback is done). A version whose
    /// health check fails is rolled back at once, and the rollback is recorded.
    #[graphql(guard = "Allow::ADMIN")]
    async fn activate_feature_version(
        &self,
        ctx: &Context<'_>,
        name: String,
        version: i32,
    ) -> GqlResult<ActivateFeatureResult> {
        let version = u32::try_from(version)
            .map_err(|_| gql(Error::invalid("version", "must be positive")))?;
        let (entry, health) = engine(ctx)
            .features
            .activate(&name, version)
            .await
            .map_err(gql)?;
        Ok(ActivateFeatureResult {
            activated: entry.active == version,
            health: health.and_then(|h| serde_json::to_value(h).ok()).map(Json),
            feature: (&entry).into(),
        })
    }

    #[graphql(guard = "Allow::MARKETER")]
    async fn upsert_content(
        &self,
        ctx: &Context<'_>,
        input: ContentItemInput,
    ) -> GqlResult<ContentItemObject> {
        let attributes = match input.attributes.map(|j| j.0) {
            None | Some(Value::Null) => Default::default(),
            Some(Value::Object(map)) => map,
            Some(_) => {
                return Err(gql(Error::invalid(
                    "input.attributes",
                    "must be a JSON object",
                )))
            }
        };
        let item = ContentItem {
            id: input.id.0,
            content_type: input.content_type,
            title: input.title,
            placements: input.placements,
            tags: input.tags,
            segments: input.segments,
            priority: input.priority,
            attributes,
            active_from: input.active_from,
            active_until: input.active_until,
            frequency_cap: input.frequency_cap,
        };
        let item = engine(ctx).upsert_content(item).await.map_err(gql)?;
        Ok(ContentItemObject(std::sync::Arc::new(item)))
    }

    #[graphql(guard = "Allow::MARKETER")]
    async fn delete_content(&self, ctx: &Context<'_>, id: ID) -> GqlResult<bool> {
        engine(ctx)
            .stores
            .content
            .delete(&id)
            .await
            .map_err(|e| gql(e.into()))
    }
}

#[derive(MergedObject, Default)]
pub struct Mutation(
    IngestMutation,
    super::experiments::ExperimentMutation,
    DefinitionMutation,
    super::rules::RuleMutation,
    super::models::ModelMutation,
    super::auth::KeyMutation,
    super::privacy::PrivacyMutation,
);
