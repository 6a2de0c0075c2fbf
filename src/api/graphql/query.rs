//! Query fields, one object per domain, merged into `Query`.

use async_graphql::connection::Connection;
use async_graphql::{Context, MergedObject, Object, ID};
use chrono::Utc;

use super::auth::Allow;
use super::engine;
use super::error::{gql, GqlResult};
use super::types::*;
use crate::customers::CustomerId;
use crate::decision::pipeline::PersonalizeRequest;
use crate::error::Error;

#[derive(Default)]
pub struct DecisionQuery;

/// Validates the GraphQL input into the pipeline's request.
pub fn personalize_request(input: PersonalizeInput) -> crate::error::Result<PersonalizeRequest> {
    let count = usize::try_from(input.count)
        .map_err(|_| Error::invalid("input.count", "must be positive"))?;
    Ok(PersonalizeRequest {
        customer_id: CustomerId::parse("input.customerId", &input.customer_id)?,
        placement: input.placement,
        available_items: input
            .available_items
            .map(|ids| ids.into_iter().map(|id| id.0).collect()),
        content_type: input.content_type,
        context: input.context.map(|j| j.0).unwrap_or_default(),
        count,
        explain: input.explain,
    })
}

#[Object]
impl DecisionQuery {
    /// Decides which content this customer sees at this placement, and records why.
    #[graphql(guard = "Allow::FRONTEND")]
    async fn personalize(
        &self,
        ctx: &Context<'_>,
        input: PersonalizeInput,
    ) -> GqlResult<DecisionObject> {
        let req = personalize_request(input).map_err(gql)?;
        let decision = engine(ctx).decisions.personalize(req).await.map_err(gql)?;
        Ok(DecisionObject(decision.into()))
    }

    /// A decision made earlier, by id.
    #[graphql(guard = "Allow::INTERNAL")]
    async fn decision(&self, ctx: &Context<'_>, id: ID) -> GqlResult<Option<DecisionObject>> {
        let d = engine(ctx)
            .stores
            .decisions
            .get(&id)
            .await
            .map_err(|e| gql(e.into()))?;
        Ok(d.map(|d| DecisionObject(d.into())))
    }

    /// Outcomes recorded for a decision, oldest first.
    #[graphql(guard = "Allow::INTERNAL")]
    async fn outcomes(&self, ctx: &Context<'_>, decision_id: ID) -> GqlResult<Vec<OutcomeObject>> {
        let list = engine(ctx)
            .stores
            .decisions
            .outcomes(&decision_id)
            .await
            .map_err(|e| gql(e.into()))?;
        Ok(list.into_iter().map(Into::into).collect())
    }
}

#[derive(Default)]
pub struct CustomerQuery;

#[Object]
impl CustomerQuery {
    #[graphql(guard = "Allow::MARKETER")]
    async fn customer(&self, ctx: &Context<'_>, id: ID) -> GqlResult<Option<CustomerObject>> {
        let id = CustomerId::parse("id", &id).map_err(gql)?;
        Ok(engine(ctx)
            .customer(&id)
            .await
            .map_err(gql)?
            .map(CustomerObject))
    }

    /// Customers by id (all, or the members of `segment`), as a Relay connection.
    #[graphql(guard = "Allow::MARKETER")]
    async fn customers(
        &self,
        ctx: &Context<'_>,
        segment: Option<String>,
        first: Option<i32>,
        after: Option<String>,
    ) -> GqlResult<Connection<String, CustomerObject>> {
        customer_page(ctx, segment.as_deref(), first, after).await
    }

    /// Active feature values of a customer (all features when `names` is omitted).
    #[graphql(guard = "Allow::MARKETER")]
    async fn features(
        &self,
        ctx: &Context<'_>,
        customer_id: ID,
        names: Option<Vec<String>>,
    ) -> GqlResult<Vec<FeatureValueObject>> {
        let id = CustomerId::parse("customerId", &customer_id).map_err(gql)?;
        let read = engine(ctx)
            .features
            .read(&id, names.as_deref(), "names", Utc::now())
            .await
            .map_err(gql)?;
        Ok(read.values.into_iter().map(Into::into).collect())
    }

    /// Every feature with all its versions and activation history.
    #[graphql(guard = "Allow::MARKETER")]
    async fn feature_definitions(&self, ctx: &Context<'_>) -> Vec<FeatureDefinitionObject> {
        engine(ctx)
            .features
            .catalog()
            .entries()
            .map(Into::into)
            .collect()
    }
}

#[derive(Default)]
pub struct SegmentQuery;

#[Object]
impl SegmentQuery {
    #[graphql(guard = "Allow::MARKETER")]
    async fn segment(&self, ctx: &Context<'_>, name: String) -> Option<SegmentObject> {
        engine(ctx).segments.get(&name).map(SegmentObject)
    }

    #[graphql(guard = "Allow::MARKETER")]
    async fn segments(&self, ctx: &Context<'_>) -> Vec<SegmentObject> {
        engine(ctx)
            .segments
            .list()
            .iter()
            .cloned()
            .map(SegmentObject)
            .collect()
    }
}

#[derive(Default)]
pub struct ContentQuery;

#[Object]
impl ContentQuery {
    /// Active catalog items for a segment (targeting it or everyone) and type, highest
    /// priority first.
    #[graphql(guard = "Allow::FRONTEND_MARKETER")]
    async fn content(
        &self,
        ctx: &Context<'_>,
        segment: Option<String>,
        #[graphql(name = "type")] content_type: Option<String>,
        #[graphql(default = 20)] limit: i32,
    ) -> GqlResult<Vec<ContentItemObject>> {
        if !(1..=1000).contains(&limit) {
            return Err(gql(Error::invalid("limit", "must be between 1 and 1000")));
        }
        let items = engine(ctx)
            .content(segment.as_deref(), content_type.as_deref(), limit as usize)
            .await
            .map_err(gql)?;
        Ok(items
            .into_iter()
            .map(|i| ContentItemObject(std::sync::Arc::new(i)))
            .collect())
    }

    #[graphql(guard = "Allow::FRONTEND_MARKETER")]
    async fn content_item(
        &self,
        ctx: &Context<'_>,
        id: ID,
    ) -> GqlResult<Option<ContentItemObject>> {
        let item = engine(ctx)
            .stores
            .content
            .get(&id)
            .await
            .map_err(|e| gql(e.into()))?;
        Ok(item.map(|i| ContentItemObject(std::sync::Arc::new(i))))
    }
}

#[derive(MergedObject, Default)]
pub struct Query(
    DecisionQuery,
    super::experiments::ExperimentQuery,
    CustomerQuery,
    SegmentQuery,
    ContentQuery,
    super::rules::RuleQuery,
    super::models::ModelQuery,
    super::ope::OpeQuery,
    super::auth::KeyQuery,
    super::privacy::PrivacyQuery,
);
