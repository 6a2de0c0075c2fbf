//! Customers: the profile model, its id type, PII kept apart from traits, and consent.
//!
//! PII (`email`, `phone`, `name`) lives in [`Pii`], never in `traits`; `privacy::Profiles`
//! encrypts it field by field at rest (with any trait named in
//! `encryption.sensitive_traits`). Here it is always in the clear.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Longest id accepted for customers, events and content items.
pub const MAX_ID_LEN: usize = 256;

/// A validated customer id: non-empty, at most [`MAX_ID_LEN`] bytes, no control characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CustomerId(String);

impl CustomerId {
    pub fn parse(field: &str, raw: &str) -> Result<Self> {
        validate_id(field, raw)?;
        Ok(CustomerId(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for CustomerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Shared id rule for customers, events and content items.
pub fn validate_id(field: &str, raw: &str) -> Result<()> {
    if raw.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if raw.len() > MAX_ID_LEN {
        return Err(Error::invalid(
            field,
            format!("longer than {MAX_ID_LEN} bytes"),
        ));
    }
    if raw.chars().any(char::is_control) {
        return Err(Error::invalid(field, "contains control characters"));
    }
    Ok(())
}

/// Personally identifying fields, stored apart from traits.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Pii {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Consent per purpose. `None` means the customer never said; the configured defaults
/// (`consent.default_<purpose>`) decide what that means.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Consent {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub personalization: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub marketing: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analytics: Option<bool>,
}

impl Consent {
    /// Whether this grants any purpose (what lifts an erasure's suppression).
    pub fn grants_any(&self) -> bool {
        [self.personalization, self.marketing, self.analytics]
            .into_iter()
            .any(|g| g == Some(true))
    }

    fn merge(&mut self, update: Consent) {
        self.personalization = update.personalization.or(self.personalization);
        self.marketing = update.marketing.or(self.marketing);
        self.analytics = update.analytics.or(self.analytics);
    }

    /// Parses `{"personalization": true, ...}`; unknown purposes are rejected by name.
    pub fn from_json(field: &str, value: &Value) -> Result<Self> {
        let map = value
            .as_object()
            .ok_or_else(|| Error::invalid(field, "must be an object of purpose → boolean"))?;
        let mut consent = Consent::default();
        for (purpose, v) in map {
            let granted = match v {
                Value::Bool(b) => Some(*b),
                Value::Null => None,
                _ => {
                    return Err(Error::invalid(
                        format!("{field}.{purpose}"),
                        "must be a boolean",
                    ))
                }
            };
            match purpose.as_str() {
                "personalization" => consent.personalization = granted,
                "marketing" => consent.marketing = granted,
                "analytics" => consent.analytics = granted,
                other => {
                    return Err(Error::invalid(
                        format!("{field}.{other}"),
                        "unknown purpose (expected personalization, marketing or analytics)",
                    ))
                }
            }
        }
        Ok(consent)
    }
}

/// What a customer's consent allows once the configured defaults
/// ([`crate::config::ConsentSettings::resolve`]) fill in the purposes they never set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Purposes {
    pub personalization: bool,
    pub marketing: bool,
    pub analytics: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Customer {
    pub id: CustomerId,
    /// Free-form attributes (country, plan, ...): always a JSON object.
    pub traits: Map<String, Value>,
    #[serde(default)]
    pub pii: Pii,
    #[serde(default)]
    pub consent: Consent,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A validated partial update: traits are merged key by key (a `null` removes the key),
/// PII fields and consent replace what they name.
#[derive(Debug, Clone)]
pub struct CustomerUpdate {
    pub id: CustomerId,
    pub traits: Map<String, Value>,
    pub pii: Pii,
    pub consent: Consent,
}

impl CustomerUpdate {
    pub fn apply(self, existing: Option<Customer>, now: DateTime<Utc>) -> Customer {
        let mut customer = existing.unwrap_or_else(|| Customer {
            id: self.id.clone(),
            traits: Map::new(),
            pii: Pii::default(),
            consent: Consent::default(),
            created_at: now,
            updated_at: now,
        });
        for (k, v) in self.traits {
            if v.is_null() {
                customer.traits.remove(&k);
            } else {
                customer.traits.insert(k, v);
            }
        }
        if self.pii.email.is_some() {
            customer.pii.email = self.pii.email;
        }
        if self.pii.phone.is_some() {
            customer.pii.phone = self.pii.phone;
        }
        if self.pii.name.is_some() {
            customer.pii.name = self.pii.name;
        }
        customer.consent.merge(self.consent);
        customer.updated_at = now;
        customer
    }
}

/// Traits must be a JSON object (or absent).
pub fn parse_traits(field: &str, value: Option<Value>) -> Result<Map<String, Value>> {
    match value {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(map)) => Ok(map),
        Some(_) => Err(Error::invalid(field, "must be a JSON object")),
    }
}

/// Striped locks serialising read-modify-write of one customer's profile (API updates
/// and rules' `on_event` changes). Tokio mutexes: held across the store's awaits.
pub struct CustomerLocks {
    stripes: Vec<tokio::sync::Mutex<()>>,
}

impl CustomerLocks {
    const STRIPES: usize = 64;

    pub fn new() -> Self {
        CustomerLocks {
            stripes: (0..Self::STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        }
    }

    pub async fn lock(&self, id: &CustomerId) -> tokio::sync::MutexGuard<'_, ()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        id.hash(&mut h);
        self.stripes[(h.finish() as usize) % Self::STRIPES]
            .lock()
            .await
    }
}

impl Default for CustomerLocks {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ids_are_validated_with_the_field_name() {
        assert!(CustomerId::parse("customerId", "c-1").is_ok());
        let err = CustomerId::parse("customerId", "").unwrap_err();
        assert_eq!(err.to_string(), "customerId: must not be empty");
        let err = CustomerId::parse("events[2].customerId", &"x".repeat(300)).unwrap_err();
        assert!(err.to_string().starts_with("events[2].customerId:"));
    }

    #[test]
    fn update_merges_traits_and_keeps_pii_apart() {
        let now = Utc::now();
        let id = CustomerId::parse("id", "c1").unwrap();
        let first = CustomerUpdate {
            id: id.clone(),
            traits: parse_traits("traits", Some(json!({"plan": "pro", "country": "FR"}))).unwrap(),
            pii: Pii {
                email: Some("a@example.com".into()),
                ..Pii::default()
            },
            consent: Consent::default(),
        }
        .apply(None, now);
        let second = CustomerUpdate {
            id,
            traits: parse_traits("traits", Some(json!({"plan": null, "age": 31}))).unwrap(),
            pii: Pii::default(),
            consent: Consent::from_json("consent", &json!({"personalization": true})).unwrap(),
        }
        .apply(Some(first), now);
        assert_eq!(
            Value::Object(second.traits.clone()),
            json!({"country": "FR", "age": 31})
        );
        assert_eq!(second.pii.email.as_deref(), Some("a@example.com"));
        assert!(!second.traits.contains_key("email"));
        assert_eq!(second.consent.personalization, Some(true));
    }

    #[test]
    fn consent_rejects_unknown_purposes_by_name() {
        let err = Consent::from_json("consent", &json!({"telepathy": true})).unwrap_err();
        assert!(err.to_string().starts_with("consent.telepathy:"));
    }
}
