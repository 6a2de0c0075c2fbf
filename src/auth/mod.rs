//! Authentication and roles: who is calling and what that role may use.
//!
//! Map:
//! - [`Role`] (this file): the four roles of SPEC §7; `admin` may use everything;
//! - [`Caller`] and [`Denied`] (this file): what the API layer found out about a request's
//!   key, and why it is turned away. The API layer attaches a `Caller` to every request
//!   and checks it per GraphQL field and per REST route against that field's roles;
//! - [`keys`]: API keys: their format, the [`keys::KeyService`] that creates, lists,
//!   revokes and verifies them (stored as SHA-256 hashes, compared in constant time);
//! - [`jwt`]: bearer JWTs from an SSO (`[auth.jwt]`), verified with one fixed algorithm,
//!   issuer and audience; their role comes from a claim.
//!
//! Pure logic over the [`crate::storage::KeyStore`] trait; knows no wire format.

pub mod jwt;
pub mod keys;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub use keys::{ApiKeySecret, IssuedKey, KeyRecord, KeyService};

/// What a key may do. Each API field and route names the roles it is open to; `Admin`
/// may use everything, including keys and models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Websites and apps: personalize, trackEvents, recordOutcome, content reads.
    Frontend,
    /// Marketing: segments, experiments, rules, content, customer reads.
    Marketer,
    /// Everything: keys, models, features, customers.
    Admin,
    /// Internal services: subscriptions and the decision log.
    Internal,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Frontend, Role::Marketer, Role::Admin, Role::Internal];

    pub fn name(self) -> &'static str {
        match self {
            Role::Frontend => "frontend",
            Role::Marketer => "marketer",
            Role::Admin => "admin",
            Role::Internal => "internal",
        }
    }

    /// Reads a role name; the error names `field` and lists the roles.
    pub fn parse(field: &str, raw: &str) -> Result<Role> {
        Role::ALL
            .into_iter()
            .find(|r| r.name() == raw)
            .ok_or_else(|| {
                let names: Vec<&str> = Role::ALL.iter().map(|r| r.name()).collect();
                Error::invalid(
                    field,
                    format!("unknown role '{raw}'; one of {}", names.join(", ")),
                )
            })
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A verified key: its public id and role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub key_id: String,
    pub role: Role,
}

/// Who is calling, as found from the request's key. Attached by the API layer to every
/// request; a request without one is treated as [`Caller::Unauthenticated`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Key(Principal),
    /// No key, or one that does not verify; the text says which (never the key).
    Unauthenticated(&'static str),
    /// The key could not be checked because its store failed; the failure is logged
    /// under this id.
    Unverified(uuid::Uuid),
    /// The key could not be checked because its store cannot be reached now (a shared
    /// key store during an outage); the failure is logged under this id.
    KeyStoreUnavailable(uuid::Uuid),
}

/// Why a caller is turned away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// `UNAUTHENTICATED`, HTTP 401.
    Unauthenticated(&'static str),
    /// `FORBIDDEN`, HTTP 403: the key's role is not among `allowed` (nor admin).
    Forbidden {
        role: Role,
        allowed: &'static [Role],
    },
    /// `INTERNAL`, HTTP 500: the key store failed (logged under the id).
    Unverified(uuid::Uuid),
    /// `UNAVAILABLE`, HTTP 503: the key store cannot be reached now; worth retrying.
    Unavailable(uuid::Uuid),
}

impl Denied {
    pub fn message(&self) -> String {
        match self {
            Denied::Unauthenticated(why) => format!("authorization: {why}"),
            Denied::Forbidden { role, allowed } => {
                let mut names: Vec<&str> = allowed.iter().map(|r| r.name()).collect();
                if !allowed.contains(&Role::Admin) {
                    names.push(Role::Admin.name());
                }
                format!(
                    "forbidden: the '{role}' role may not use this (open to {})",
                    names.join(", ")
                )
            }
            Denied::Unverified(id) => format!("internal error (id {id})"),
            Denied::Unavailable(id) => {
                format!("the key store cannot be reached now; retry shortly (id {id})")
            }
        }
    }
}

pub const MISSING_KEY: &str = "missing API key (send the header `Authorization: Bearer KEY`)";

impl Caller {
    /// Whether this caller may use something open to `allowed` (admin may use
    /// everything). With authentication switched off (`enabled == false`) everyone
    /// acts as admin.
    pub fn check(
        &self,
        enabled: bool,
        allowed: &'static [Role],
    ) -> std::result::Result<(), Denied> {
        if !enabled {
            return Ok(());
        }
        match self {
            Caller::Key(p) if p.role == Role::Admin || allowed.contains(&p.role) => Ok(()),
            Caller::Key(p) => Err(Denied::Forbidden {
                role: p.role,
                allowed,
            }),
            Caller::Unauthenticated(why) => Err(Denied::Unauthenticated(why)),
            Caller::Unverified(id) => Err(Denied::Unverified(*id)),
            Caller::KeyStoreUnavailable(id) => Err(Denied::Unavailable(*id)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(role: Role) -> Caller {
        Caller::Key(Principal {
            key_id: "k".into(),
            role,
        })
    }

    #[test]
    fn admin_may_use_everything_and_others_only_what_names_them() {
        static ROLES: [Role; 4] = Role::ALL;
        for role in &ROLES {
            assert!(key(*role).check(true, &[]).is_ok() == (*role == Role::Admin));
            assert!(key(*role).check(true, std::slice::from_ref(role)).is_ok());
        }
        let denied = key(Role::Frontend)
            .check(true, &[Role::Marketer])
            .unwrap_err();
        assert_eq!(
            denied.message(),
            "forbidden: the 'frontend' role may not use this (open to marketer, admin)"
        );
        assert_eq!(
            Caller::Unauthenticated(MISSING_KEY).check(true, &[Role::Frontend]),
            Err(Denied::Unauthenticated(MISSING_KEY))
        );
    }

    #[test]
    fn switched_off_everyone_may_use_everything() {
        assert!(Caller::Unauthenticated(MISSING_KEY)
            .check(false, &[])
            .is_ok());
    }

    #[test]
    fn role_names_parse_and_unknown_ones_name_the_field() {
        for role in Role::ALL {
            assert_eq!(Role::parse("role", role.name()).unwrap(), role);
        }
        let e = Role::parse("--role", "root").unwrap_err();
        assert_eq!(
            e.to_string(),
            "--role: unknown role 'root'; one of frontend, marketer, admin, internal"
        );
    }
}
