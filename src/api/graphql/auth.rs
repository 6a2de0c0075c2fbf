//! Roles over GraphQL: the [`Allow`] guard that every Query, Mutation and Subscription
//! field carries, and key management (`apiKeys`, `createApiKey`, `revokeApiKey`; admin
//! only).
//!
//! The HTTP layer attaches the request's [`Caller`] to the GraphQL request (from the
//! `Authorization` header, or a WebSocket's `connection_init` payload); a request
//! without one is unauthenticated.

use async_graphql::{Context, Enum, Guard, Object, SimpleObject, ID};
use chrono::{DateTime, Utc};

use super::engine;
use super::error::{denied, gql, GqlResult};
use crate::auth::{Caller, KeyRecord, Role, MISSING_KEY};

/// The roles a field is open to, besides admin, which may use every field.
pub struct Allow(pub &'static [Role]);

impl Allow {
    pub const ADMIN: Allow = Allow(&[]);
    pub const FRONTEND: Allow = Allow(&[Role::Frontend]);
    pub const MARKETER: Allow = Allow(&[Role::Marketer]);
    pub const INTERNAL: Allow = Allow(&[Role::Internal]);
    pub const FRONTEND_MARKETER: Allow = Allow(&[Role::Frontend, Role::Marketer]);
    pub const FRONTEND_INTERNAL: Allow = Allow(&[Role::Frontend, Role::Internal]);
}

const ANONYMOUS: Caller = Caller::Unauthenticated(MISSING_KEY);

impl Guard for Allow {
    async fn check(&self, ctx: &Context<'_>) -> async_graphql::Result<()> {
        let enabled = engine(ctx).settings.auth.enabled;
        let caller = ctx.data_opt::<Caller>().unwrap_or(&ANONYMOUS);
        caller.check(enabled, self.0).map_err(denied)
    }
}

#[derive(Enum, Clone, Copy, PartialEq, Eq)]
#[graphql(name = "Role")]
pub enum RoleGql {
    /// personalize, trackEvents, recordOutcome, content reads.
    Frontend,
    /// Segments, experiments, rules, content, customer and feature reads.
    Marketer,
    /// Everything, including keys, models, feature definitions and profiles.
    Admin,
    /// Subscriptions and the decision log (decision, outcomes, recordOutcome).
    Internal,
}

impl From<RoleGql> for Role {
    fn from(r: RoleGql) -> Self {
        match r {
            RoleGql::Frontend => Role::Frontend,
            RoleGql::Marketer => Role::Marketer,
            RoleGql::Admin => Role::Admin,
            RoleGql::Internal => Role::Internal,
        }
    }
}

impl From<Role> for RoleGql {
    fn from(r: Role) -> Self {
        match r {
            Role::Frontend => RoleGql::Frontend,
            Role::Marketer => RoleGql::Marketer,
            Role::Admin => RoleGql::Admin,
            Role::Internal => RoleGql::Internal,
        }
    }
}

/// A stored API key: never its secret or hash.
#[derive(SimpleObject)]
#[graphql(name = "ApiKey")]
pub struct ApiKeyObject {
    pub id: ID,
    pub name: Option<String>,
    pub role: RoleGql,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl From<KeyRecord> for ApiKeyObject {
    fn from(k: KeyRecord) -> Self {
        ApiKeyObject {
            id: ID(k.id),
            name: k.name,
            role: k.role.into(),
            created_at: k.created_at,
            revoked_at: k.revoked_at,
        }
    }
}

/// A key just created. `key` is shown this once: only its hash is stored.
#[derive(SimpleObject)]
#[graphql(name = "CreatedApiKey")]
pub struct CreatedApiKeyObject {
    /// Send as `Authorization: Bearer KEY`.
    pub key: String,
    pub api_key: ApiKeyObject,
}

#[derive(Default)]
pub struct KeyQuery;

#[Object]
impl KeyQuery {
    /// Every API key, revoked ones included, oldest first.
    #[graphql(guard = "Allow::ADMIN")]
    async fn api_keys(&self, ctx: &Context<'_>) -> GqlResult<Vec<ApiKeyObject>> {
        let keys = engine(ctx).keys.list().await.map_err(gql)?;
        Ok(keys.into_iter().map(Into::into).collect())
    }
}

#[derive(Default)]
pub struct KeyMutation;

#[Object]
impl KeyMutation {
    /// Creates an API key for `role`; the answer holds the key, shown only this once.
    #[graphql(guard = "Allow::ADMIN")]
    async fn create_api_key(
        &self,
        ctx: &Context<'_>,
        role: RoleGql,
        name: Option<String>,
    ) -> GqlResult<CreatedApiKeyObject> {
        let issued = engine(ctx)
            .keys
            .create(role.into(), name, "name")
            .await
            .map_err(gql)?;
        Ok(CreatedApiKeyObject {
            key: issued.key.expose().to_owned(),
            api_key: issued.record.into(),
        })
    }

    /// Revokes a key by id; it stops working on this server at once.
    #[graphql(guard = "Allow::ADMIN")]
    async fn revoke_api_key(&self, ctx: &Context<'_>, id: ID) -> GqlResult<ApiKeyObject> {
        let record = engine(ctx).keys.revoke("id", &id).await.map_err(gql)?;
        Ok(record.into())
    }
}
