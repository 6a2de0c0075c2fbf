//! Ingestion: validate each event, append the valid ones to the event log in one
//! durable, idempotent write (the acknowledgement point), then wait — boundedly — for the
//! processor so that the caller's next read sees the new features and segments.
//!
//! With an event stream (Kafka) the write goes to the stream's local outbox instead and
//! nothing more is awaited; a worker's consumer hands the events to [`LocalApply`], which
//! appends them to its own log and waits for its processor.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use opentelemetry::KeyValue;
use serde::Serialize;
use serde_json::Value;

use super::processor::Processor;
use super::EventInput;
use crate::config::ConsentSettings;
use crate::customers::CustomerId;
use crate::error::{Error, Result};
use crate::privacy::Profiles;
use crate::storage::{AppendOutcome, EventSink, EventStream, Stores};
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
    /// Valid events of customers without analytics consent: acknowledged, not stored.
    pub without_consent: usize,
    pub rejected: Vec<EventError>,
}

pub struct Ingestor {
    stores: Stores,
    profiles: Arc<Profiles>,
    target: Target,
    consent: ConsentSettings,
    metrics: Arc<Metrics>,
    max_events: usize,
}

/// Where accepted events go, and what the caller waits for.
pub enum Target {
    /// The local event log; the caller then waits — at most the given time — for the
    /// processor to apply them, so that its next read sees them.
    Local {
        processor: Arc<Processor>,
        apply_wait: Duration,
    },
    /// The outbox of an event stream (Kafka); the caller waits for nothing more: workers
    /// apply the events elsewhere, later.
    Stream(Arc<dyn EventStream>),
}

impl Ingestor {
    pub fn new(
        stores: Stores,
        profiles: Arc<Profiles>,
        target: Target,
        consent: ConsentSettings,
        metrics: Arc<Metrics>,
        max_events: usize,
    ) -> Self {
        Ingestor {
            stores,
            profiles,
            target,
            consent,
            metrics,
            max_events,
        }
    }

    /// Ingests a batch. Invalid events are reported by index and field and do not stop
    /// the valid ones, and so are events of erased customers (`events[i].customerId`;
    /// counted in `tailor_erased_writes_suppressed_total`) until the customer consents
    /// again. Valid events of customers without analytics consent (their own, or the
    /// configured default when they never said or have no profile) are acknowledged but
    /// not stored (`without_consent`). Returns once the accepted events are durable.
    pub async fn ingest(&self, raw: Vec<Value>) -> Result<IngestReport> {
        if raw.len() > self.max_events {
            return Err(Error::invalid(
                "events",
                format!("at most {} events per request", self.max_events),
            ));
        }
        let now = Utc::now();
        let mut report = IngestReport::default();
        let parsed: Vec<Result<crate::events::Event>> = raw
            .into_iter()
            .enumerate()
            .map(|(index, value)| {
                let field = format!("events[{index}]");
                if value.is_object() {
                    serde_json::from_value::<EventInput>(value)
                        .map_err(|e| Error::invalid(&field, e.to_string()))
                        .and_then(|input| input.validate(&field, now))
                } else {
                    Err(Error::invalid(&field, "must be a JSON object"))
                }
            })
            .collect();
        let admission = self.admission(&parsed).await?;
        let mut events = Vec::with_capacity(parsed.len());
        for (index, parsed) in parsed.into_iter().enumerate() {
            let parsed = parsed.and_then(|event| {
                let verdict = admission
                    .get(&event.customer_id)
                    .copied()
                    .unwrap_or(Admission::Store);
                self.admit(verdict, index, event)
            });
            match parsed {
                Ok(Some(event)) => events.push(event),
                Ok(None) => report.without_consent += 1,
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
            let log = match &self.target {
                Target::Local { .. } => self.stores.events.clone(),
                Target::Stream(stream) => stream.outbox(),
            };
            log.append(&events).await.inspect_err(|_| {
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
            ("without_consent", report.without_consent),
            ("rejected", report.rejected.len()),
        ] {
            if n > 0 {
                self.metrics
                    .events_ingested
                    .add(n as u64, &[KeyValue::new("result", result)]);
            }
        }
        if report.without_consent > 0 {
            self.metrics.events_without_consent.add(
                report.without_consent as u64,
                &[KeyValue::new("stage", "ingest")],
            );
        }
        if last > 0 {
            match &self.target {
                Target::Local {
                    processor,
                    apply_wait,
                } => {
                    processor.wake();
                    if !apply_wait.is_zero() && !processor.wait_applied(last, *apply_wait).await {
                        tracing::warn!(
                            seq = last,
                            "Events are durable but not yet applied to features"
                        );
                    }
                }
                Target::Stream(stream) => stream.forward(),
            }
        }
        Ok(report)
    }

    /// What to do with the events of each customer of the valid events.
    async fn admission(
        &self,
        parsed: &[Result<crate::events::Event>],
    ) -> Result<HashMap<CustomerId, Admission>> {
        let customers: Vec<CustomerId> = parsed
            .iter()
            .filter_map(|p| p.as_ref().ok().map(|e| &e.customer_id))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .cloned()
            .collect();
        let facts = self.profiles.admission(&customers).await?;
        let mut admission = HashMap::with_capacity(customers.len());
        for (id, (erased, consent)) in customers.into_iter().zip(facts) {
            let verdict = if erased {
                Admission::Erased
            } else if self.consent.resolve(consent.as_ref()).analytics {
                Admission::Store
            } else {
                Admission::WithoutConsent
            };
            admission.insert(id, verdict);
        }
        Ok(admission)
    }

    /// The event when it may be stored; `None` when its customer has no analytics
    /// consent; an error naming its `customerId` when that customer was erased.
    fn admit(
        &self,
        verdict: Admission,
        index: usize,
        event: crate::events::Event,
    ) -> Result<Option<crate::events::Event>> {
        match verdict {
            Admission::Store => Ok(Some(event)),
            Admission::WithoutConsent => Ok(None),
            Admission::Erased => {
                self.metrics
                    .erased_writes_suppressed
                    .add(1, &[KeyValue::new("kind", "event")]);
                Err(Error::invalid(
                    format!("events[{index}].customerId"),
                    format!(
                        "customer '{}' was erased; their events are refused until they \
                         consent again (upsertCustomer with consent)",
                        event.customer_id
                    ),
                ))
            }
        }
    }
}

/// What ingestion does with a customer's events.
#[derive(Debug, Clone, Copy)]
enum Admission {
    Store,
    /// No analytics consent: acknowledged, not stored.
    WithoutConsent,
    /// Refused until the customer consents again.
    Erased,
}

/// The [`EventSink`] of a worker: drops the copies of events other workers read first
/// (when the deployment shares [`crate::storage::EventClaims`]), appends the rest to the
/// local event log (a redelivered event is recognised by id and not stored again) and
/// returns once the processor has applied everything appended so far.
pub struct LocalApply {
    stores: Stores,
    processor: Arc<Processor>,
    dedup_window: Duration,
    metrics: Arc<Metrics>,
}

/// How often a worker waiting for its processor says so.
const APPLY_REPORT: Duration = Duration::from_secs(10);

impl LocalApply {
    /// `dedup_window`: how long workers remember event ids for one another (zero: not).
    pub fn new(
        stores: Stores,
        processor: Arc<Processor>,
        dedup_window: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        LocalApply {
            stores,
            processor,
            dedup_window,
            metrics,
        }
    }

    /// The events that are not copies of events first read at another position.
    async fn originals<'a>(
        &self,
        events: &'a [crate::events::Event],
    ) -> Result<std::borrow::Cow<'a, [crate::events::Event]>> {
        let Some(claims) = self
            .stores
            .claims
            .as_ref()
            .filter(|_| !self.dedup_window.is_zero())
        else {
            return Ok(events.into());
        };
        let copies = claims.copies(events, self.dedup_window).await?;
        let dropped = copies.iter().filter(|c| **c).count();
        if dropped == 0 {
            return Ok(events.into());
        }
        self.metrics.stream_copies_dropped.add(dropped as u64, &[]);
        tracing::debug!(
            dropped,
            "Dropped copies of events another worker read first"
        );
        Ok(events
            .iter()
            .zip(copies)
            .filter(|(_, copy)| !copy)
            .map(|(e, _)| e.clone())
            .collect::<Vec<_>>()
            .into())
    }
}

#[async_trait::async_trait]
impl EventSink for LocalApply {
    async fn apply(&self, events: &[crate::events::Event]) -> Result<()> {
        let originals = self.originals(events).await?;
        self.stores.events.append(&originals).await?;
        // Duplicates were appended by an earlier delivery and may not be applied yet:
        // wait for the whole log, not only for this batch's new events.
        let last = self.stores.events.last_seq().await?;
        self.processor.wake();
        while !self.processor.wait_applied(last, APPLY_REPORT).await {
            tracing::warn!(
                seq = last,
                applied = self.processor.applied(),
                "Still waiting for the processor to apply consumed events"
            );
        }
        Ok(())
    }
}
