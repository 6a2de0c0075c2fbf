//! Ingestion: validate each event, append the valid ones to the event log in one
//! durable, idempotent write (the acknowledgement point), then wait — boundedly — for the
//! processor so that the caller's next read sees the new features and segments.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use opentelemetry::KeyValue;
use serde::Serialize;
use serde_json::Value;

use super::processor::Processor;
use super::EventInput;
use crate::error::{Error, Result};
use crate::storage::{AppendOutcome, Stores};
use crate::telemetry::Metrics;

/// One rejected event: its index in the request, the field at fault and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventError {
    pub index: usize,
    pub field: String,
    pub message: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct IngestReport {
    pub accepted: usize,
    pub duplicates: usize,
    pub rejected: Vec<EventError>,
}

pub struct Ingestor {
    stores: Stores,
    processor: Arc<Processor>,
    metrics: Arc<Metrics>,
    apply_wait: Duration,
    max_events: usize,
}

impl Ingestor {
    pub fn new(
        stores: Stores,
        processor: Arc<Processor>,
        metrics: Arc<Metrics>,
        apply_wait: Duration,
        max_events: usize,
    ) -> Self {
        Ingestor {
            stores,
            processor,
            metrics,
            apply_wait,
            max_events,
        }
    }

    /// Ingests a batch. Invalid events are reported by index and field and do not stop
    /// the valid ones. Returns once the accepted events are durable.
    pub async fn ingest(&self, raw: Vec<Value>) -> Result<IngestReport> {
        if raw.len() > self.max_events {
            return Err(Error::invalid(
                "events",
                format!("at most {} events per request", self.max_events),
            ));
        }
        let now = Utc::now();
        let mut report = IngestReport::default();
        let mut events = Vec::with_capacity(raw.len());
        for (index, value) in raw.into_iter().enumerate() {
            let field = format!("events[{index}]");
            let parsed = if value.is_object() {
                serde_json::from_value::<EventInput>(value)
                    .map_err(|e| Error::invalid(&field, e.to_string()))
                    .and_then(|input| input.validate(&field, now))
            } else {
                Err(Error::invalid(&field, "must be a JSON object"))
            };
            match parsed {
                Ok(event) => events.push(event),
                Err(Error::Invalid { field, message }) => report.rejected.push(EventError {
                    index,
                    field,
                    message,
                }),
                Err(other) => return Err(other),
            }
        }
        let outcomes = if events.is_empty() {
            Vec::new()
        } else {
            self.stores.events.append(&events).await.inspect_err(|_| {
                self.metrics.backend_error("events");
            })?
        };
        let mut last = 0;
        for outcome in outcomes {
            match outcome {
                AppendOutcome::Appended(seq) => {
                    report.accepted += 1;
                    last = last.max(seq);
                }
                AppendOutcome::Duplicate => report.duplicates += 1,
            }
        }
        for (result, n) in [
            ("accepted", report.accepted),
            ("duplicate", report.duplicates),
            ("rejected", report.rejected.len()),
        ] {
            if n > 0 {
                self.metrics
                    .events_ingested
                    .add(n as u64, &[KeyValue::new("result", result)]);
            }
        }
        if last > 0 {
            self.processor.wake();
            if !self.apply_wait.is_zero()
                && !self.processor.wait_applied(last, self.apply_wait).await
            {
                tracing::warn!(
                    seq = last,
                    "Events are durable but not yet applied to features"
                );
            }
        }
        Ok(report)
    }
}
