//! The event processor: applies the event log to features and segment membership in
//! sequence order, committing its offset only after both are stored.
//!
//! It is the embedded counterpart of a consumer group: after a crash it resumes from
//! the committed offset, and feature states skip events they already folded, so nothing
//! is counted twice or lost.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use opentelemetry::KeyValue;
use tokio::sync::{watch, Notify};

use crate::config::ConsentSettings;
use crate::customers::{Consent, Customer, CustomerId, CustomerLocks, Pii};
use crate::error::Result;
use crate::events::StoredEvent;
use crate::features::service::PROCESSOR;
use crate::features::FeatureService;
use crate::privacy::Profiles;
use crate::rules::host::{self, event_map, CustomerData, CustomerView};
use crate::rules::{RuleService, RuleSet};
use crate::segments::SegmentService;
use crate::storage::Stores;
use crate::telemetry::Metrics;

const BATCH: usize = 2048;
/// Poll interval when nothing woke the processor (events appended by another process).
const IDLE_POLL: Duration = Duration::from_millis(250);

pub struct Processor {
    stores: Stores,
    profiles: Arc<Profiles>,
    features: Arc<FeatureService>,
    segments: Arc<SegmentService>,
    rules: Arc<RuleService>,
    locks: Arc<CustomerLocks>,
    consent: ConsentSettings,
    metrics: Arc<Metrics>,
    applied: watch::Sender<u64>,
    wake: Notify,
}

impl Processor {
    #[allow(clippy::too_many_arguments)]
    pub async fn new(
        stores: Stores,
        profiles: Arc<Profiles>,
        features: Arc<FeatureService>,
        segments: Arc<SegmentService>,
        rules: Arc<RuleService>,
        locks: Arc<CustomerLocks>,
        consent: ConsentSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>> {
        let committed = stores.events.committed_offset(PROCESSOR).await?;
        Ok(Arc::new(Processor {
            stores,
            profiles,
            features,
            segments,
            rules,
            locks,
            consent,
            metrics,
            applied: watch::channel(committed).0,
            wake: Notify::new(),
        }))
    }

    /// Runs until `shutdown` resolves, applying batches as they arrive.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            match self.step().await {
                Ok(0) => {
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep(IDLE_POLL) => {}
                        _ = shutdown.changed() => return,
                    }
                }
                Ok(_) => {
                    if *shutdown.borrow() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "Failed to apply events; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = shutdown.changed() => return,
                    }
                }
            }
        }
    }

    /// Applies the next batch after the committed offset; returns how many events.
    pub async fn step(&self) -> Result<usize> {
        let _guard = self.features.apply_lock().lock().await;
        let from = self.stores.events.committed_offset(PROCESSOR).await?;
        let batch = self.stores.events.scan(from, BATCH).await?;
        let Some(last) = batch.last().map(|e| e.seq) else {
            return Ok(0);
        };
        let now = Utc::now();
        let started = std::time::Instant::now();
        let batch = self.admitted(batch).await?;
        let customers: BTreeSet<&CustomerId> = batch.iter().map(|e| &e.event.customer_id).collect();
        self.ensure_profiles(&customers, now).await?;
        self.features.apply(&batch, now).await?;
        let rules = self.rules.current();
        let changed = if rules.handles_events() {
            self.run_event_rules(&rules, &batch).await?
        } else {
            Vec::new()
        };
        let types: BTreeSet<&str> = batch.iter().map(|e| e.event.event_type.as_str()).collect();
        let customers: Vec<CustomerId> = customers.into_iter().cloned().collect();
        self.segments
            .evaluate_customers(&customers, Some(&types))
            .await?;
        if !changed.is_empty() {
            // Their traits changed: every trait condition may have a new answer.
            self.segments.evaluate_customers(&changed, None).await?;
        }
        self.stores.events.commit_offset(PROCESSOR, last).await?;
        tracing::debug!(events = batch.len(), elapsed = ?started.elapsed(), "Applied events");
        self.applied.send_replace(last);
        Ok(batch.len())
    }

    /// The batch without the events of erased customers (an event that passed
    /// ingestion's check just before its customer's erasure completed, or arrived from a
    /// stream, cannot bring the customer back) and without those of customers who have no
    /// analytics consent now (ingestion drops them, but consent may have been withdrawn
    /// since, or the event came from a stream). One look-up of each per customer in the
    /// batch.
    async fn admitted(&self, batch: Vec<StoredEvent>) -> Result<Vec<StoredEvent>> {
        let customers: BTreeSet<&CustomerId> = batch.iter().map(|e| &e.event.customer_id).collect();
        let mut erased = BTreeSet::new();
        let mut unconsented = BTreeSet::new();
        for id in customers {
            if self.profiles.erased_at(id).await?.is_some() {
                erased.insert(id.clone());
            } else if !self
                .consent
                .resolve(self.profiles.consent(id).await?.as_ref())
                .analytics
            {
                unconsented.insert(id.clone());
            }
        }
        if erased.is_empty() && unconsented.is_empty() {
            return Ok(batch);
        }
        let (mut without_erasure, mut without_consent) = (0, 0);
        let kept: Vec<StoredEvent> = batch
            .into_iter()
            .filter(|e| {
                let id = &e.event.customer_id;
                if erased.contains(id) {
                    without_erasure += 1;
                    false
                } else if unconsented.contains(id) {
                    without_consent += 1;
                    false
                } else {
                    true
                }
            })
            .collect();
        if without_erasure > 0 {
            self.metrics
                .erased_writes_suppressed
                .add(without_erasure, &[KeyValue::new("kind", "event")]);
        }
        if without_consent > 0 {
            self.metrics
                .events_without_consent
                .add(without_consent, &[KeyValue::new("stage", "apply")]);
        }
        Ok(kept)
    }

    /// Events for a customer never seen before create an empty profile, so every
    /// customer with events is listed and can be segmented.
    async fn ensure_profiles(
        &self,
        customers: &BTreeSet<&CustomerId>,
        now: chrono::DateTime<Utc>,
    ) -> Result<()> {
        let mut missing = Vec::new();
        for id in customers {
            if !self.profiles.exists(id).await? {
                missing.push(Customer {
                    id: (*id).clone(),
                    traits: Default::default(),
                    pii: Pii::default(),
                    consent: Consent::default(),
                    created_at: now,
                    updated_at: now,
                });
            }
        }
        // Concurrent puts share the store's group commits.
        futures::future::try_join_all(missing.iter().map(|c| self.profiles.put(c))).await?;
        Ok(())
    }

    /// Runs the rules' `on_event` hooks over the batch, customer by customer in sequence
    /// order, and stores the trait changes they return. Runs again for events replayed
    /// after a crash, before the offset was committed: hooks are written to be idempotent.
    /// Returns the customers whose traits changed.
    async fn run_event_rules(
        &self,
        rules: &RuleSet,
        batch: &[StoredEvent],
    ) -> Result<Vec<CustomerId>> {
        let mut changed_customers = Vec::new();
        let mut by_customer: Vec<(&CustomerId, Vec<&StoredEvent>)> = Vec::new();
        for event in batch {
            let id = &event.event.customer_id;
            match by_customer.iter_mut().find(|(c, _)| *c == id) {
                Some((_, events)) => events.push(event),
                None => by_customer.push((id, vec![event])),
            }
        }
        for (id, events) in by_customer {
            let _guard = self.locks.lock(id).await;
            let Some(mut profile) = self.profiles.get(id).await? else {
                continue;
            };
            let segments = self.stores.segments.segments_of(id).await?;
            let purposes = self.consent.resolve(Some(&profile.consent));
            let mut changed = false;
            for stored in events {
                let event = &stored.event;
                let customer = CustomerView(Arc::new(CustomerData {
                    id: id.as_str().to_owned(),
                    known: true,
                    traits: profile
                        .traits
                        .iter()
                        .map(|(k, v)| (k.as_str().into(), host::to_dynamic(v)))
                        .collect(),
                    segments: segments.clone(),
                    personalization: purposes.personalization,
                    marketing: purposes.marketing,
                    analytics: purposes.analytics,
                    now: event.timestamp,
                    ..Default::default()
                }));
                let view = event_map(
                    &event.event_id,
                    &event.event_type,
                    event.timestamp,
                    &serde_json::Value::Object(event.properties.clone()),
                );
                let (changes, failures) = rules.on_event(&customer, &view);
                for failure in failures {
                    tracing::warn!(rule = %failure.rule, error = %failure.error, event = %event.event_id, "on_event skipped");
                    self.metrics.rule_error(&failure.rule);
                }
                for (key, value) in changes {
                    if profile.traits.get(&key) == Some(&value) {
                        continue;
                    }
                    changed = true;
                    if value.is_null() {
                        profile.traits.remove(&key);
                    } else {
                        profile.traits.insert(key, value);
                    }
                }
            }
            if changed {
                profile.updated_at = Utc::now();
                self.profiles.put(&profile).await?;
                changed_customers.push(id.clone());
            }
        }
        Ok(changed_customers)
    }

    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Waits until everything up to `seq` is applied, at most `timeout`. `false` on timeout.
    pub async fn wait_applied(&self, seq: u64, timeout: Duration) -> bool {
        let mut rx = self.applied.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|applied| *applied >= seq))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    pub fn applied(&self) -> u64 {
        *self.applied.borrow()
    }
}
