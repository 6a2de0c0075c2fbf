//! Events: validation of what clients send, durable idempotent ingestion, and the
//! processor that applies the event log to features and segment membership in order.
//!
//! - [`Event`] / [`EventInput`]: the wire-independent shape and its validation;
//! - [`ingest`]: append to the event log (the acknowledgement point) and wait for the processor;
//! - [`processor`]: consumes the log by sequence number, like a consumer group, and commits
//!   its offset only after features and segments are stored.

pub mod ingest;
pub mod processor;

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::customers::{validate_id, CustomerId};
use crate::error::{Error, Result};

/// Longest event type name accepted.
const MAX_TYPE_LEN: usize = 64;

/// Tolerated clock skew for client timestamps in the future.
const MAX_FUTURE_SKEW: Duration = Duration::minutes(5);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub event_id: String,
    pub customer_id: CustomerId,
    #[serde(rename = "type")]
    pub event_type: String,
    pub timestamp: DateTime<Utc>,
    #[serde(default)]
    pub properties: Map<String, Value>,
    /// Where the event was read from the events stream, set by the worker that consumed
    /// it; `None` for an event that never went through a stream (a single process) or
    /// that was ingested and not yet consumed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<StreamPosition>,
}

/// A message's place in the events topic. Messages are keyed by customer id, so all of
/// a customer's events are in one partition, where offsets order them the same way for
/// every worker of the group: what lets a customer's feature states, shared on Redis,
/// tell an event folded by another worker (before a rebalance moved the partition, or
/// before that worker died with the batch uncommitted) from a new one, whatever each
/// worker's own log numbered it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamPosition {
    pub partition: i32,
    pub offset: i64,
}

/// An event as it sits in the log: `seq` is its position, assigned at append, strictly
/// increasing in append order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent {
    pub seq: u64,
    pub event: Event,
}

/// An event as a client sends it, before validation. Every field is optional here so
/// that a missing one is reported by name instead of as a parse error.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventInput {
    #[serde(alias = "event_id")]
    pub event_id: Option<Value>,
    #[serde(alias = "customer_id")]
    pub customer_id: Option<Value>,
    #[serde(rename = "type")]
    pub event_type: Option<Value>,
    pub timestamp: Option<Value>,
    pub properties: Option<Value>,
}

fn string_field(field: &str, value: Option<Value>) -> Result<Option<String>> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(_) => Err(Error::invalid(field, "must be a string")),
    }
}

impl EventInput {
    /// Validates one event; `field` is its path (`events[3]`), used in every error.
    pub fn validate(self, field: &str, now: DateTime<Utc>) -> Result<Event> {
        let customer = string_field(&format!("{field}.customerId"), self.customer_id)?
            .ok_or_else(|| Error::invalid(format!("{field}.customerId"), "is required"))?;
        let customer_id = CustomerId::parse(&format!("{field}.customerId"), &customer)?;

        let event_type = string_field(&format!("{field}.type"), self.event_type)?
            .ok_or_else(|| Error::invalid(format!("{field}.type"), "is required"))?;
        validate_type(&format!("{field}.type"), &event_type)?;

        let event_id = match string_field(&format!("{field}.eventId"), self.event_id)? {
            Some(id) => {
                validate_id(&format!("{field}.eventId"), &id)?;
                id
            }
            None => uuid::Uuid::now_v7().to_string(),
        };

        let timestamp = match self.timestamp {
            None | Some(Value::Null) => now,
            Some(Value::String(s)) => DateTime::parse_from_rfc3339(&s)
                .map_err(|e| {
                    Error::invalid(
                        format!("{field}.timestamp"),
                        format!("not an RFC 3339 date-time: {e}"),
                    )
                })?
                .with_timezone(&Utc),
            Some(Value::Number(n)) => n
                .as_i64()
                .and_then(DateTime::from_timestamp_millis)
                .ok_or_else(|| {
                    Error::invalid(
                        format!("{field}.timestamp"),
                        "a number must be milliseconds since the Unix epoch",
                    )
                })?,
            Some(_) => {
                return Err(Error::invalid(
                    format!("{field}.timestamp"),
                    "must be an RFC 3339 string or epoch milliseconds",
                ))
            }
        };
        if timestamp > now + MAX_FUTURE_SKEW {
            return Err(Error::invalid(
                format!("{field}.timestamp"),
                "is more than 5 minutes in the future",
            ));
        }

        let properties = match self.properties {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(map)) => map,
            Some(_) => {
                return Err(Error::invalid(
                    format!("{field}.properties"),
                    "must be a JSON object",
                ))
            }
        };

        Ok(Event {
            event_id,
            customer_id,
            event_type,
            timestamp,
            properties,
            position: None,
        })
    }
}

fn validate_type(field: &str, event_type: &str) -> Result<()> {
    if event_type.is_empty()
        || event_type.len() > MAX_TYPE_LEN
        || !event_type
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'))
    {
        return Err(Error::invalid(
            field,
            format!("must be 1–{MAX_TYPE_LEN} characters of [A-Za-z0-9_.:-]"),
        ));
    }
    Ok(())
}

impl Event {
    /// Decodes an event as stored (its serde JSON, the payload of the event stream) and
    /// checks what ingestion checked: ids and type. The clock-skew check is not repeated:
    /// a stored event may be read long after it was accepted.
    pub fn from_stored_json(bytes: &[u8]) -> Result<Event> {
        let event: Event = serde_json::from_slice(bytes)
            .map_err(|e| Error::invalid("event", format!("not a stored event: {e}")))?;
        CustomerId::parse("event.customer_id", event.customer_id.as_str())?;
        validate_id("event.event_id", &event.event_id)?;
        validate_type("event.type", &event.event_type)?;
        Ok(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn input(v: Value) -> EventInput {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn validation_reports_the_field() {
        let now = Utc::now();
        let cases = [
            (
                json!({"type": "page_view"}),
                "events[0].customerId: is required",
            ),
            (json!({"customerId": "c1"}), "events[0].type: is required"),
            (
                json!({"customerId": "c1", "type": "page view"}),
                "events[0].type: must be 1–64 characters of [A-Za-z0-9_.:-]",
            ),
            (
                json!({"customerId": "c1", "type": "x", "timestamp": true}),
                "events[0].timestamp: must be an RFC 3339 string or epoch milliseconds",
            ),
            (
                json!({"customerId": "c1", "type": "x", "properties": [1]}),
                "events[0].properties: must be a JSON object",
            ),
            (
                json!({"customerId": ["c1"], "type": "x"}),
                "events[0].customerId: must be a string",
            ),
        ];
        for (body, expected) in cases {
            let err = input(body).validate("events[0]", now).unwrap_err();
            assert_eq!(err.to_string(), expected);
        }
    }

    #[test]
    fn stored_json_round_trips_and_is_checked() {
        let event = input(
            json!({"customerId": "c1", "type": "x", "eventId": "e1", "properties": {"a": 1}}),
        )
        .validate("events[0]", Utc::now())
        .unwrap();
        let bytes = serde_json::to_vec(&event).unwrap();
        assert_eq!(Event::from_stored_json(&bytes).unwrap(), event);
        let cases = [
            (json!([1]), "event: not a stored event: invalid type: integer `1`, expected a string at line 1 column 2"),
            (
                json!({"event_id": "e", "customer_id": "", "type": "x", "timestamp": "2026-01-01T00:00:00Z"}),
                "event.customer_id: must not be empty",
            ),
            (
                json!({"event_id": "e", "customer_id": "c", "type": "a b", "timestamp": "2026-01-01T00:00:00Z"}),
                "event.type: must be 1–64 characters of [A-Za-z0-9_.:-]",
            ),
        ];
        for (value, expected) in cases {
            let bytes = serde_json::to_vec(&value).unwrap();
            assert_eq!(
                Event::from_stored_json(&bytes).unwrap_err().to_string(),
                expected
            );
        }
    }

    #[test]
    fn missing_event_id_and_timestamp_are_filled() {
        let now = Utc::now();
        let ev = input(json!({"customerId": "c1", "type": "page_view"}))
            .validate("events[0]", now)
            .unwrap();
        assert_eq!(ev.timestamp, now);
        assert!(uuid::Uuid::parse_str(&ev.event_id).is_ok());
        let ev = input(json!({"customer_id": "c1", "type": "x", "timestamp": "2026-01-02T03:04:05Z", "event_id": "e1"}))
            .validate("events[0]", now)
            .unwrap();
        assert_eq!(ev.event_id, "e1");
        assert_eq!(ev.timestamp.to_rfc3339(), "2026-01-02T03:04:05+00:00");
    }
}
