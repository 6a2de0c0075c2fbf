//! Request bodies under arbitrary input: any bytes are taken as event JSON (one event or
//! an array, as `POST /api/v1/events` takes them) through ingestion's validation, as a
//! GraphQL POST body through the body reader with its batch cap, and as a query text;
//! each GraphQL request is parsed and validated by the schema with every limit (depth,
//! complexity, directives, recursion, aliases) and never executed. Nothing may panic;
//! errors are fine.
//!
//! `cargo fuzz run requests` (see fuzz/README.md for seeds and long runs).
#![no_main]

use std::sync::OnceLock;

use chrono::Utc;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

use tailor::api::graphql::{validator, TailorSchema};
use tailor::api::limits::parse_batch;
use tailor::config::Settings;
use tailor::events::EventInput;

fn schema() -> &'static (Settings, TailorSchema) {
    static SCHEMA: OnceLock<(Settings, TailorSchema)> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let settings = Settings::default();
        let schema = validator(&settings);
        (settings, schema)
    })
}

/// Runs one request through parsing and validation; it must come back with errors
/// only (a valid one with the single `VALIDATED` marker).
fn check(schema: &TailorSchema, request: async_graphql::Request) {
    let response = futures::executor::block_on(schema.execute(request));
    assert!(
        !response.errors.is_empty(),
        "the validator never executes, so every answer is an error"
    );
}

fuzz_target!(|data: &[u8]| {
    if let Ok(value) = serde_json::from_slice::<Value>(data) {
        let events = match value {
            Value::Array(events) => events,
            one => vec![one],
        };
        let now = Utc::now();
        for (i, event) in events.into_iter().enumerate() {
            if let Ok(input) = serde_json::from_value::<EventInput>(event) {
                let _ = input.validate(&format!("events[{i}]"), now);
            }
        }
    }
    let (settings, schema) = schema();
    if let Ok(batch) = parse_batch(data, &settings.limits) {
        let requests = match batch {
            async_graphql::BatchRequest::Single(one) => vec![one],
            async_graphql::BatchRequest::Batch(many) => many,
        };
        for request in requests {
            check(schema, request);
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        check(schema, async_graphql::Request::new(text));
    }
});
