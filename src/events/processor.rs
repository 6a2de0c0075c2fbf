//! The event processor: applies the event log to features and segment membership in
//! sequence order, committing its offset only after both are stored.
//!
//! It is the embedded counterpart of a consumer group: after a crash it resumes from
//! the committed offset, and feature states skip events they already folded, so nothing
//! is counted twice or lost.

use std::collections::{BTreeSet, HashMap};
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
use crate::features::service::{FeatureCatalog, HistoryStates};
use crate::features::{FeatureKey, FeatureService, FeatureSpec};
use crate::privacy::Profiles;
use crate::rules::host::{self, event_map, CustomerData, CustomerView};
use crate::rules::{RuleService, RuleSet};
use crate::segments::SegmentService;
use crate::storage::{EventStream, Stores};
use crate::telemetry::Metrics;

const BATCH: usize = 2048;
/// Poll interval when nothing woke the processor (events appended by another process).
const IDLE_POLL: Duration = Duration::from_millis(250);

/// The customers of a batch whose events are not applied, and those without a profile.
#[derive(Default)]
struct Admission {
    erased: BTreeSet<CustomerId>,
    unconsented: BTreeSet<CustomerId>,
    missing: Vec<CustomerId>,
}

pub struct Processor {
    stores: Stores,
    profiles: Arc<Profiles>,
    features: Arc<FeatureService>,
    segments: Arc<SegmentService>,
    rules: Arc<RuleService>,
    locks: Arc<CustomerLocks>,
    consent: ConsentSettings,
    metrics: Arc<Metrics>,
    /// The event stream the local log is consumed from, if any: new feature versions
    /// are backfilled from its topic, partition by partition.
    stream: Option<Arc<dyn EventStream>>,
    applied: watch::Sender<u64>,
    wake: Notify,
    /// Customers whose events a batch skipped because they were erased: events from a
    /// stream that another process accepted before it learned of the erasure. Their
    /// events are deleted by [`Engine::purge_skipped_erased`](crate::app::Engine), once
    /// the privacy journal was followed (a consent renewed meanwhile keeps them).
    skipped_erased: std::sync::Mutex<BTreeSet<CustomerId>>,
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
        stream: Option<Arc<dyn EventStream>>,
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
            stream,
            applied: watch::channel(committed).0,
            skipped_erased: std::sync::Mutex::default(),
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
        let (batch, missing) = self.admitted(batch).await?;
        // One catalog for the batch: every version folded below was checked backfilled
        // in the batch's partitions (a version defined meanwhile waits for the next).
        let catalog = self.features.catalog();
        let partitions: BTreeSet<i32> = batch
            .iter()
            .filter_map(|e| e.event.position.map(|p| p.partition))
            .collect();
        self.backfill_partitions(&catalog, &partitions).await?;
        let types: BTreeSet<&str> = batch.iter().map(|e| e.event.event_type.as_str()).collect();
        // Segment evaluation below reads these features: read with the folded states.
        let then_read = self.segments.features_read_for(&types);
        // New customers' profiles are stored while the batch's states are read and folded
        // (neither reads what the other writes); the hooks below read the profiles.
        let ((), (states, updates)) = tokio::try_join!(
            self.create_profiles(missing, now),
            self.features
                .fold(&catalog, &batch, now, then_read.as_deref()),
        )?;
        // The folded states are stored while the hooks and segment conditions run: those
        // read the batch's states from `states`, never from the store. The offset is
        // committed only once both writes are.
        let evaluated = async {
            let rules = self.rules.current();
            let (read, changed) = if rules.handles_events() {
                self.run_event_rules(&rules, &batch).await?
            } else {
                Default::default()
            };
            let customers: Vec<CustomerId> = batch
                .iter()
                .map(|e| &e.event.customer_id)
                .collect::<BTreeSet<_>>()
                .into_iter()
                .cloned()
                .collect();
            self.segments
                .evaluate_batch(&customers, &types, &changed, &read, &states)
                .await
        };
        tokio::try_join!(self.features.write(updates), evaluated)?;
        self.stores.events.commit_offset(PROCESSOR, last).await?;
        tracing::debug!(events = batch.len(), elapsed = ?started.elapsed(), "Applied events");
        self.applied.send_replace(last);
        Ok(batch.len())
    }

    /// With an event stream: backfills, from its topic, each partition this process's
    /// consumer holds whose history a live stateful version does not hold yet (a
    /// version defined elsewhere, or while this process was stopped, in a partition
    /// that has no new events). Batches backfill their own partitions as they come
    /// ([`Processor::step`]); this covers the quiet ones. Returns how many partitions it
    /// backfilled.
    pub async fn backfill_assigned(&self) -> Result<usize> {
        let Some(stream) = &self.stream else {
            return Ok(0);
        };
        let partitions = stream.assigned_partitions();
        if partitions.is_empty()
            || self
                .features
                .unfilled(&self.features.catalog(), &partitions)
                .await?
                .is_empty()
        {
            return Ok(0);
        }
        let _guard = self.features.apply_lock().lock().await;
        let catalog = self.features.catalog();
        self.backfill_partitions(&catalog, &partitions).await
    }

    /// Backfills each of `partitions` into the live stateful versions of `catalog` whose
    /// states do not hold its history yet, reading the partition from the stream's
    /// topic; called under the apply lock. A version's state for a customer then holds
    /// every event of theirs up to its position, which is what makes it exact whichever
    /// worker folds next: the live fold skips what the history already counted, and a
    /// concurrent backfill or a late write of a worker that lost the partition keeps
    /// whichever state is later (both hold every event up to their position). Nothing
    /// is folded into a version in a partition before that partition's backfill, so no
    /// state starts without the history before it. Returns how many partitions it read.
    async fn backfill_partitions(
        &self,
        catalog: &FeatureCatalog,
        partitions: &BTreeSet<i32>,
    ) -> Result<usize> {
        let Some(stream) = &self.stream else {
            return Ok(0);
        };
        if partitions.is_empty() {
            return Ok(0);
        }
        let pending = self.features.unfilled(catalog, partitions).await?;
        for (&partition, keys) in &pending {
            let started = std::time::Instant::now();
            let now = Utc::now();
            let mut replay = stream.replay(partition).await?;
            let mut states = HistoryStates::new();
            let (mut read, mut folded) = (0usize, 0usize);
            let mut oldest: Option<chrono::DateTime<Utc>> = None;
            while let Some(page) = replay.pages.recv().await {
                let page: Vec<StoredEvent> = page?
                    .into_iter()
                    .map(|event| StoredEvent { seq: 0, event })
                    .collect();
                read += page.len();
                oldest = page.iter().map(|e| e.event.timestamp).chain(oldest).min();
                // The live stream leaves out erased and unconsented customers' events.
                let Admission {
                    erased,
                    unconsented,
                    ..
                } = self.admission(&page).await?;
                let page: Vec<StoredEvent> = page
                    .into_iter()
                    .filter(|e| {
                        !erased.contains(&e.event.customer_id)
                            && !unconsented.contains(&e.event.customer_id)
                    })
                    .collect();
                folded += page.len();
                self.features
                    .fold_history(catalog, keys, &page, &mut states, now);
            }
            if replay.first > 0 {
                warn_partial_history(catalog, keys, partition, replay.first, oldest, now);
            }
            let customers = states.len();
            self.features.store_history(partition, keys, states).await?;
            tracing::info!(
                partition,
                versions = %keys.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
                from = replay.first,
                until = replay.end,
                read,
                folded,
                states = customers,
                elapsed = ?started.elapsed(),
                "Backfilled feature versions from the events topic"
            );
        }
        Ok(pending.len())
    }

    /// Takes the customers whose events batches skipped as erased since the last call.
    pub fn take_skipped_erased(&self) -> BTreeSet<CustomerId> {
        std::mem::take(
            &mut *self
                .skipped_erased
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Puts back customers [`Processor::take_skipped_erased`] took whose events could not
    /// be deleted yet.
    pub fn keep_skipped_erased(&self, ids: impl IntoIterator<Item = CustomerId>) {
        self.skipped_erased
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(ids);
    }

    /// The batch without the events of erased customers (an event that passed
    /// ingestion's check just before its customer's erasure completed, or arrived from a
    /// stream, cannot bring the customer back) and without those of customers who have no
    /// analytics consent now (ingestion drops them, but consent may have been withdrawn
    /// since, or the event came from a stream); and the admitted customers who have no
    /// profile yet. One look-up of each per customer in the batch.
    async fn admitted(
        &self,
        batch: Vec<StoredEvent>,
    ) -> Result<(Vec<StoredEvent>, Vec<CustomerId>)> {
        let Admission {
            erased,
            unconsented,
            missing,
        } = self.admission(&batch).await?;
        if erased.is_empty() && unconsented.is_empty() {
            return Ok((batch, missing));
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
            self.skipped_erased
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend(erased);
            self.metrics
                .erased_writes_suppressed
                .add(without_erasure, &[KeyValue::new("kind", "event")]);
        }
        if without_consent > 0 {
            self.metrics
                .events_without_consent
                .add(without_consent, &[KeyValue::new("stage", "apply")]);
        }
        Ok((kept, missing))
    }

    /// Whom of the batch's customers [`Processor::admitted`] leaves out, and who has no
    /// profile yet.
    async fn admission(&self, batch: &[StoredEvent]) -> Result<Admission> {
        let customers: BTreeSet<&CustomerId> = batch.iter().map(|e| &e.event.customer_id).collect();
        let ids: Vec<CustomerId> = customers.into_iter().cloned().collect();
        let mut out = Admission::default();
        let admission = self.profiles.admission(&ids).await?;
        for (id, (was_erased, consent)) in ids.into_iter().zip(admission) {
            if was_erased {
                out.erased.insert(id);
            } else if !self.consent.resolve(consent.as_ref()).analytics {
                out.unconsented.insert(id);
            } else if consent.is_none() {
                out.missing.push(id);
            }
        }
        Ok(out)
    }

    /// Events for a customer never seen before create an empty profile, so every
    /// customer with events is listed and can be segmented.
    async fn create_profiles(
        &self,
        missing: Vec<CustomerId>,
        now: chrono::DateTime<Utc>,
    ) -> Result<()> {
        let missing: Vec<Customer> = missing
            .into_iter()
            .map(|id| Customer {
                id,
                traits: Default::default(),
                pii: Pii::default(),
                consent: Consent::default(),
                created_at: now,
                updated_at: now,
            })
            .collect();
        // Concurrent puts share the store's group commits.
        futures::future::try_join_all(missing.iter().map(|c| self.profiles.put(c))).await?;
        Ok(())
    }

    /// Runs the rules' `on_event` hooks over the batch, customer by customer in sequence
    /// order, and stores the trait changes they return. Runs again for events replayed
    /// after a crash, before the offset was committed: hooks are written to be idempotent.
    /// Returns the profiles it read (without PII, as stored once the hooks ran: segment
    /// evaluation reads them rather than the store) and the customers whose traits changed.
    ///
    /// The batch's profiles and segment lists are read together, without the customers'
    /// locks: hooks rarely change traits. A customer whose traits a hook changed is read
    /// again under their lock; if an update changed the profile since the batch read it,
    /// the hooks run again on the profile as stored now, so no update is overwritten.
    async fn run_event_rules(
        &self,
        rules: &RuleSet,
        batch: &[StoredEvent],
    ) -> Result<(HashMap<CustomerId, Customer>, BTreeSet<CustomerId>)> {
        let mut by_customer: HashMap<&CustomerId, Vec<&StoredEvent>> = HashMap::new();
        for event in batch {
            by_customer
                .entry(&event.event.customer_id)
                .or_default()
                .push(event);
        }
        let ids: Vec<CustomerId> = by_customer.keys().map(|&id| id.clone()).collect();
        let profiles = self.profiles.get_many_without_pii(&ids).await?;
        let segments = self.stores.segments.segments_of_many(&ids).await?;
        let mut read = HashMap::with_capacity(ids.len());
        let mut changed_customers = BTreeSet::new();
        for ((id, profile), segments) in ids.into_iter().zip(profiles).zip(segments) {
            // Hooks see traits, never PII: the PII stays sealed unless traits change.
            let Some(mut profile) = profile else {
                continue;
            };
            let events = &by_customer[&id];
            if let Some(before) = self.run_hooks(rules, &mut profile, &segments, events) {
                let _guard = self.locks.lock(&id).await;
                let Some(mut now) = self.profiles.get_without_pii(&id).await? else {
                    continue;
                };
                let changed = if now.traits == before && now.consent == profile.consent {
                    now.traits = std::mem::take(&mut profile.traits);
                    true
                } else {
                    self.run_hooks(rules, &mut now, &segments, events).is_some()
                };
                profile = now;
                if changed {
                    // The whole profile, PII too, read again under the same lock.
                    if let Some(mut full) = self.profiles.get(&id).await? {
                        full.traits = profile.traits.clone();
                        full.updated_at = Utc::now();
                        profile.updated_at = full.updated_at;
                        self.profiles.put(&full).await?;
                        changed_customers.insert(id.clone());
                    }
                }
            }
            read.insert(id, profile);
        }
        Ok((read, changed_customers))
    }

    /// Runs the `on_event` hooks over one customer's events in order, applying the trait
    /// changes they return to `profile`; returns the traits as they were before the first
    /// change, `None` when nothing changed.
    fn run_hooks(
        &self,
        rules: &RuleSet,
        profile: &mut Customer,
        segments: &[String],
        events: &[&StoredEvent],
    ) -> Option<serde_json::Map<String, serde_json::Value>> {
        let purposes = self.consent.resolve(Some(&profile.consent));
        let mut before = None;
        // Rebuilt only when a hook changed the traits it shows.
        let mut customer: Option<CustomerView> = None;
        for stored in events {
            let event = &stored.event;
            let customer = customer.get_or_insert_with(|| {
                CustomerView(Arc::new(CustomerData {
                    id: profile.id.as_str().to_owned(),
                    known: true,
                    traits: host::map_of(&profile.traits),
                    segments: segments.to_vec(),
                    personalization: purposes.personalization,
                    marketing: purposes.marketing,
                    analytics: purposes.analytics,
                    now: event.timestamp,
                    ..Default::default()
                }))
            });
            if customer.0.now != event.timestamp {
                Arc::make_mut(&mut customer.0).now = event.timestamp;
            }
            let view = event_map(
                &event.event_id,
                &event.event_type,
                event.timestamp,
                &serde_json::Value::Object(event.properties.clone()),
            );
            let (changes, failures) = rules.on_event(customer, &view);
            for failure in failures {
                tracing::warn!(rule = %failure.rule, error = %failure.error, event = %event.event_id, "on_event skipped");
                self.metrics.rule_error(&failure.rule);
            }
            let mut shown_changed = false;
            for (key, value) in changes {
                if profile.traits.get(&key) == Some(&value) {
                    continue;
                }
                if before.is_none() {
                    before = Some(profile.traits.clone());
                }
                shown_changed = true;
                if value.is_null() {
                    profile.traits.remove(&key);
                } else {
                    profile.traits.insert(key, value);
                }
            }
            if shown_changed {
                Arc::make_mut(&mut customer.0).traits = host::map_of(&profile.traits);
            }
        }
        before
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

/// Warns, per version whose window reaches back before the oldest event partition
/// `partition` still holds, that its history there is partial: the topic's retention
/// dropped the records before offset `first`.
fn warn_partial_history(
    catalog: &FeatureCatalog,
    keys: &[FeatureKey],
    partition: i32,
    first: i64,
    oldest: Option<chrono::DateTime<Utc>>,
    now: chrono::DateTime<Utc>,
) {
    for key in keys {
        let partial = match (catalog.spec(key).map(FeatureSpec::reach), oldest) {
            (Some(Some(window)), Some(oldest)) => now - window < oldest,
            (Some(_), _) => true,
            (None, _) => false,
        };
        if partial {
            tracing::warn!(
                feature = %key,
                partition,
                first_retained_offset = first,
                oldest_retained_event = ?oldest,
                "The events topic no longer holds this version's whole window (its retention dropped older records): the version counts only what it holds until the window has passed"
            );
        }
    }
}
