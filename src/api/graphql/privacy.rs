//! Privacy fields: `eraseCustomer` (right to be forgotten), `exportCustomer` (right of
//! access), `customerIdsByEmail` (the blind-index look-up) and `rotateMasterKey`.
//!
//! All four are admin only: erasure cannot be undone, and export and look-up by email
//! answer with PII, which no other role reads (marketers see traits, never PII).

use async_graphql::{Context, Json, Object, SimpleObject, ID};
use chrono::{DateTime, Utc};
use serde_json::Value;

use super::auth::Allow;
use super::engine;
use super::error::{gql, GqlResult};
use crate::customers::CustomerId;

/// What an erasure removed.
#[derive(SimpleObject)]
#[graphql(name = "Erasure")]
pub struct ErasureObject {
    pub customer_id: ID,
    /// Whether there was a profile to delete.
    pub profile: bool,
    /// Events deleted.
    pub events: u64,
    /// Segments the customer left.
    pub segments: Vec<String>,
    /// Decisions (and their outcomes) now under `pseudonym` instead of the customer id.
    pub decisions: u64,
    pub pseudonym: Option<String>,
    pub erased_at: DateTime<Utc>,
}

/// What a master-key rotation did.
#[derive(SimpleObject)]
#[graphql(name = "KeyRotation")]
pub struct KeyRotationObject {
    /// The current master key, which now wraps every data key.
    pub master_key_id: String,
    /// Data keys re-wrapped under it.
    pub rewrapped: u64,
    /// Data keys that already were.
    pub already_current: u64,
}

#[derive(Default)]
pub struct PrivacyQuery;

#[Object]
impl PrivacyQuery {
    /// Right of access: everything held about the customer as one JSON document —
    /// `profile` (PII decrypted, traits, consent, timestamps; null when there is none),
    /// `events`, `features` (active values), `segments`, `decisions` (each with its
    /// `outcomes`) and `erasedAt`. Admin only.
    #[graphql(guard = "Allow::ADMIN")]
    async fn export_customer(&self, ctx: &Context<'_>, id: ID) -> GqlResult<Json<Value>> {
        let id = CustomerId::parse("id", &id).map_err(gql)?;
        let export = engine(ctx).export_customer(&id).await.map_err(gql)?;
        Ok(Json(export))
    }

    /// Ids of the customers with this email (case ignored), found through its keyed hash
    /// (blind index): emails are never stored or compared in the clear. Admin only.
    #[graphql(guard = "Allow::ADMIN")]
    async fn customer_ids_by_email(&self, ctx: &Context<'_>, email: String) -> GqlResult<Vec<ID>> {
        if email.trim().is_empty() {
            return Err(gql(crate::error::Error::invalid(
                "email",
                "must not be empty",
            )));
        }
        let ids = engine(ctx)
            .profiles
            .find_by_email(&email)
            .await
            .map_err(|e| gql(e.into()))?;
        Ok(ids
            .into_iter()
            .map(|id| ID(id.as_str().to_owned()))
            .collect())
    }
}

#[derive(Default)]
pub struct PrivacyMutation;

#[Object]
impl PrivacyMutation {
    /// Right to be forgotten, across every store: deletes the profile, events, feature
    /// values and segment memberships, pseudonymises decisions and outcomes, and destroys
    /// the customer's data key so sealed copies (backups) are unreadable. Later events
    /// and profile updates for the id are refused until an `upsertCustomer` grants
    /// consent again. Repeatable. Admin only.
    #[graphql(guard = "Allow::ADMIN")]
    async fn erase_customer(&self, ctx: &Context<'_>, id: ID) -> GqlResult<ErasureObject> {
        let id = CustomerId::parse("id", &id).map_err(gql)?;
        let e = engine(ctx).erase_customer(&id).await.map_err(gql)?;
        Ok(ErasureObject {
            customer_id: ID(e.customer_id.as_str().to_owned()),
            profile: e.profile,
            events: e.events,
            segments: e.segments,
            decisions: e.decisions,
            pseudonym: e.pseudonym,
            erased_at: e.erased_at,
        })
    }

    /// Re-wraps every data key under the current master key (`encryption.key_id`), the
    /// one this server started with; keys under older master keys (still configured in
    /// `encryption.previous_keys`) stay readable until then. Data is not re-encrypted.
    /// Same as `tailor keys rotate-master`. Admin only.
    #[graphql(guard = "Allow::ADMIN")]
    async fn rotate_master_key(&self, ctx: &Context<'_>) -> GqlResult<KeyRotationObject> {
        let profiles = &engine(ctx).profiles;
        let report = profiles.rewrap_all().await.map_err(|e| gql(e.into()))?;
        Ok(KeyRotationObject {
            master_key_id: profiles.ring().current().id().to_owned(),
            rewrapped: report.rewrapped,
            already_current: report.current,
        })
    }
}
