//! API keys: `tk_<id>_<secret>`, where `id` (16 hex digits) is public and looks the key
//! up, and `secret` (64 hex digits, 32 bytes from a CSPRNG) is shown once at creation and
//! stored only as its SHA-256 hash.
//!
//! A plain, unsalted SHA-256 is enough here: the secret is 256 random bits, so there is
//! nothing to guess from the hash and no dictionary to precompute; a slow password hash
//! would only slow every request down. Hashes are compared in constant time.
//!
//! Verified keys are cached for [`CACHE_TTL`] so a request does not read the store;
//! [`KeyService::revoke`] drops the key from this server's cache at once. While the key
//! store cannot be reached (a shared one during an outage), a key this process verified
//! before keeps verifying from its cached record, and every other key fails closed: a
//! process started during an outage accepts no API key until the store answers (JWTs,
//! verified locally, still work).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Caller, Principal, Role, MISSING_KEY};
use crate::error::{Error, Result};
use crate::storage::{KeyStore, StorageError};

/// How long a verified key is trusted without reading the store again. Revocations on
/// this server take effect at once; the time to live bounds how long a key revoked
/// elsewhere (another process on the same store) keeps working here.
pub const CACHE_TTL: Duration = Duration::from_secs(5);

const PREFIX: &str = "tk_";
const ID_BYTES: usize = 8;
const SECRET_BYTES: usize = 32;
/// Longest key name.
pub const MAX_NAME_CHARS: usize = 64;

/// One stored key: everything but the secret, which is kept only as its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// Public id (16 lowercase hex digits), the middle part of the key.
    pub id: String,
    pub name: Option<String>,
    pub role: Role,
    /// SHA-256 of the secret part, lowercase hex.
    pub secret_sha256: String,
    pub created_at: DateTime<Utc>,
    /// Set once; a revoked key never verifies again.
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A key's full text. Does not print (`Debug` shows only the id); read it with
/// [`ApiKeySecret::expose`] to show it to its owner, once.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKeySecret(String);

impl ApiKeySecret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ApiKeySecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match parse(&self.0) {
            Some((id, _)) => write!(f, "ApiKeySecret(tk_{id}_…)"),
            None => f.write_str("ApiKeySecret(…)"),
        }
    }
}

/// A key just created: its record and its text, which exists nowhere else.
#[derive(Debug, Clone)]
pub struct IssuedKey {
    pub record: KeyRecord,
    pub key: ApiKeySecret,
}

/// Splits `tk_<id>_<secret>` into id and secret, checking their lengths and digits.
fn parse(raw: &str) -> Option<(&str, &str)> {
    let (id, secret) = raw.strip_prefix(PREFIX)?.split_once('_')?;
    let hex = |s: &str, bytes: usize| {
        s.len() == bytes * 2 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    (hex(id, ID_BYTES) && hex(secret, SECRET_BYTES)).then_some((id, secret))
}

fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    // `rand::rng()` is a CSPRNG (ChaCha12) seeded and periodically reseeded from the
    // operating system.
    rand::rng().fill_bytes(&mut buf);
    to_hex(&buf)
}

fn secret_hash(secret: &str) -> String {
    to_hex(&Sha256::digest(secret.as_bytes()))
}

/// Checks a key name: 1–64 characters, no control characters.
fn check_name(field: &str, name: Option<String>) -> Result<Option<String>> {
    let Some(name) = name else { return Ok(None) };
    let chars = name.chars().count();
    if chars == 0 || chars > MAX_NAME_CHARS {
        return Err(Error::invalid(
            field,
            format!("must be 1 to {MAX_NAME_CHARS} characters"),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(Error::invalid(field, "must not contain control characters"));
    }
    Ok(Some(name))
}

struct Cached {
    record: KeyRecord,
    fetched: Instant,
}

/// Creates, lists, revokes and verifies API keys.
pub struct KeyService {
    store: Arc<dyn KeyStore>,
    /// Verified keys by id. A std mutex: held for one map operation, never across an
    /// await.
    cache: parking_lot::Mutex<HashMap<String, Cached>>,
    /// Bearer JWTs accepted besides keys (`[auth.jwt]`); `None` while switched off.
    jwt: Option<super::jwt::JwtVerifier>,
}

impl KeyService {
    pub fn new(store: Arc<dyn KeyStore>) -> Self {
        KeyService {
            store,
            cache: Default::default(),
            jwt: None,
        }
    }

    /// Also accepts bearer JWTs that `verifier` verifies.
    pub fn with_jwt(mut self, verifier: Option<super::jwt::JwtVerifier>) -> Self {
        self.jwt = verifier;
        self
    }

    /// Creates a key for `role`, named `name` (checked as field `name_field`). The
    /// returned text is the only copy of the key.
    pub async fn create(
        &self,
        role: Role,
        name: Option<String>,
        name_field: &str,
    ) -> Result<IssuedKey> {
        let name = check_name(name_field, name)?;
        // An id collision (2^-64 per pair) is retried with a fresh id.
        for _ in 0..3 {
            let id = random_hex(ID_BYTES);
            let secret = random_hex(SECRET_BYTES);
            let record = KeyRecord {
                id: id.clone(),
                name: name.clone(),
                role,
                secret_sha256: secret_hash(&secret),
                created_at: Utc::now(),
                revoked_at: None,
            };
            if self.store.insert(&record).await? {
                return Ok(IssuedKey {
                    record,
                    key: ApiKeySecret(format!("{PREFIX}{id}_{secret}")),
                });
            }
        }
        Err(Error::Internal(anyhow::anyhow!(
            "could not find a free API key id"
        )))
    }

    /// Every key, revoked ones included, oldest first.
    pub async fn list(&self) -> Result<Vec<KeyRecord>> {
        let mut keys = self.store.list().await?;
        keys.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(keys)
    }

    /// Revokes key `id` (named as field `field` in errors); it stops verifying on this
    /// server at once. Revoking a revoked key keeps its first revocation time.
    pub async fn revoke(&self, field: &str, id: &str) -> Result<KeyRecord> {
        let record = self.store.revoke(id, Utc::now()).await?;
        self.cache.lock().remove(id);
        record.ok_or_else(|| Error::not_found(field, "API key", id))
    }

    /// Verifies a key's text: `Ok(Ok(principal))` for a known, unrevoked key whose secret
    /// matches; `Ok(Err(reason))` otherwise (malformed, invalid or revoked, the reason
    /// fit to send); `Err` when the store fails, unless it is unreachable and this
    /// process verified the key before (then its last verified record decides).
    pub async fn verify(&self, raw: &str) -> Result<std::result::Result<Principal, &'static str>> {
        let Some((id, secret)) = parse(raw) else {
            return Ok(Err("malformed API key (expected tk_<id>_<secret>)"));
        };
        let cached = {
            let cache = self.cache.lock();
            cache
                .get(id)
                .map(|c| (c.record.clone(), c.fetched.elapsed() < CACHE_TTL))
        };
        let record = match cached {
            Some((record, true)) => record,
            stale => match self.store.get(id).await {
                Ok(Some(record)) => {
                    self.cache.lock().insert(
                        id.to_owned(),
                        Cached {
                            record: record.clone(),
                            fetched: Instant::now(),
                        },
                    );
                    record
                }
                Ok(None) => return Ok(Err("invalid API key")),
                // The store cannot be reached: a key this process verified keeps its last
                // verified record until the store answers (its revocation on another
                // replica is seen only then); any other key fails closed.
                Err(StorageError::Unavailable(e)) => match stale {
                    Some((record, _)) => {
                        tracing::debug!(error = %e, "Key store unreachable; using this key's last verification");
                        record
                    }
                    None => return Err(StorageError::Unavailable(e).into()),
                },
                Err(e) => return Err(e.into()),
            },
        };
        let hash = secret_hash(secret);
        if !constant_time_eq::constant_time_eq(hash.as_bytes(), record.secret_sha256.as_bytes()) {
            return Ok(Err("invalid API key"));
        }
        if record.revoked_at.is_some() {
            return Ok(Err("revoked API key"));
        }
        Ok(Ok(Principal {
            key_id: record.id,
            role: record.role,
        }))
    }

    /// The caller of a request with this `Authorization` header value (`Bearer KEY`).
    /// A store failure is logged and gives [`Caller::Unverified`], or
    /// [`Caller::KeyStoreUnavailable`] when the store cannot be reached.
    pub async fn caller(&self, authorization: Option<&str>) -> Caller {
        let Some(value) = authorization.map(str::trim).filter(|v| !v.is_empty()) else {
            return Caller::Unauthenticated(MISSING_KEY);
        };
        let key = match value.split_once(' ') {
            Some((scheme, key)) if scheme.eq_ignore_ascii_case("bearer") => key.trim(),
            _ => return Caller::Unauthenticated("expected `Authorization: Bearer KEY`"),
        };
        if !key.starts_with(PREFIX) && super::jwt::looks_like_jwt(key) {
            return match &self.jwt {
                Some(verifier) => match verifier.verify(key) {
                    Ok(principal) => Caller::Key(principal),
                    Err(why) => Caller::Unauthenticated(why),
                },
                None => Caller::Unauthenticated("JWTs are not accepted here (auth.jwt)"),
            };
        }
        match self.verify(key).await {
            Ok(Ok(principal)) => Caller::Key(principal),
            Ok(Err(why)) => Caller::Unauthenticated(why),
            Err(Error::Storage(StorageError::Unavailable(e))) => {
                let id = uuid::Uuid::now_v7();
                tracing::warn!(error_id = %id, error = %e, "Cannot verify an API key: its store is unreachable");
                Caller::KeyStoreUnavailable(id)
            }
            Err(e) => {
                let id = uuid::Uuid::now_v7();
                tracing::error!(error_id = %id, error = %e, "Cannot verify an API key");
                Caller::Unverified(id)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_text_parses_only_in_its_exact_shape() {
        let id = "0123456789abcdef";
        let secret = "ab".repeat(32);
        assert_eq!(
            parse(&format!("tk_{id}_{secret}")),
            Some((id, secret.as_str()))
        );
        for bad in [
            String::new(),
            format!("tk_{id}{secret}"),
            format!("tx_{id}_{secret}"),
            format!("tk_{id}_{}", &secret[1..]),
            format!("tk_{}_{secret}", id.to_uppercase()),
            format!("tk_{id}_{secret}_"),
        ] {
            assert_eq!(parse(&bad), None, "{bad}");
        }
    }

    #[test]
    fn secrets_do_not_print() {
        let key = ApiKeySecret(format!("tk_0123456789abcdef_{}", "ab".repeat(32)));
        assert_eq!(format!("{key:?}"), "ApiKeySecret(tk_0123456789abcdef_…)");
    }

    #[test]
    fn names_are_checked_by_field() {
        assert_eq!(check_name("name", None).unwrap(), None);
        assert!(check_name("--name", Some("x".repeat(65)))
            .unwrap_err()
            .to_string()
            .starts_with("--name: must be 1 to 64"));
        assert!(check_name("name", Some("a\nb".into())).is_err());
    }
}
