//! The feature service: the catalog of versioned definitions, reads of active values,
//! `defineFeature` with backfill, activation with health checks and automatic rollback.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use opentelemetry::KeyValue;
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::definition::{builtin, FeatureSpec};
use super::{FeatureKey, FeatureState};
use crate::config::FeatureSettings;
use crate::customers::CustomerId;
use crate::error::{Error, Result};
use crate::events::StoredEvent;
use crate::privacy::Profiles;
use crate::storage::{DefinitionKind, EventStream, StorageError, Stores};
use crate::telemetry::Metrics;

/// The consumer name under which the event processor commits its offset.
pub const PROCESSOR: &str = "processor";

/// One feature: every version, and which one is active.
#[derive(Debug, Clone)]
pub struct FeatureEntry {
    pub name: String,
    pub active: u32,
    pub versions: BTreeMap<u32, FeatureSpec>,
    pub created_at: BTreeMap<u32, DateTime<Utc>>,
}

/// An activation or rollback, as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Activation {
    pub from: Option<u32>,
    pub to: u32,
    /// `true` when the engine rolled back on its own after failed health checks.
    pub automatic: bool,
    pub reason: String,
    pub at: DateTime<Utc>,
    #[serde(default)]
    pub health: Option<HealthReport>,
}

/// What an activation's health check measured on a sample of customers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthReport {
    pub sampled: usize,
    pub error_rate: f64,
    /// Kolmogorov–Smirnov distance between the new and the replaced version's values.
    pub distribution_shift: f64,
    pub healthy: bool,
}

/// A snapshot of every definition; replaced whole on change, so readers never lock.
#[derive(Debug, Clone, Default)]
pub struct FeatureCatalog {
    entries: BTreeMap<String, FeatureEntry>,
}

impl FeatureCatalog {
    pub fn get(&self, name: &str) -> Option<&FeatureEntry> {
        self.entries.get(name)
    }

    pub fn entries(&self) -> impl Iterator<Item = &FeatureEntry> {
        self.entries.values()
    }

    /// The definition of one version.
    pub fn spec(&self, key: &FeatureKey) -> Option<&FeatureSpec> {
        self.entries.get(&key.name)?.versions.get(&key.version)
    }

    pub fn active_spec(&self, name: &str) -> Option<(u32, &FeatureSpec)> {
        let e = self.entries.get(name)?;
        e.versions.get(&e.active).map(|s| (e.active, s))
    }

    /// Every stateful version of every feature: all are kept up to date, so any can be
    /// activated (or rolled back to) at once.
    pub fn live_stateful(&self) -> impl Iterator<Item = (FeatureKey, &FeatureSpec)> {
        self.entries.values().flat_map(|e| {
            e.versions
                .iter()
                .filter(|(_, s)| s.is_stateful())
                .map(|(v, s)| (FeatureKey::new(e.name.clone(), *v), s))
        })
    }

    /// The stateful keys needed to evaluate `spec` (itself at `version` when stateful,
    /// plus its inputs at their active versions, transitively).
    fn collect_keys(
        &self,
        name: &str,
        version: u32,
        spec: &FeatureSpec,
        out: &mut Vec<FeatureKey>,
    ) {
        if spec.is_stateful() {
            let key = FeatureKey::new(name, version);
            if !out.contains(&key) {
                out.push(key);
            }
        }
        for input in spec.inputs() {
            if let Some((v, s)) = self.active_spec(input) {
                self.collect_keys(input, v, s, out);
            }
        }
    }

    /// Whether `from` reads `target`, directly or through other features.
    fn reaches(&self, from: &FeatureSpec, target: &str, depth: usize) -> bool {
        if depth > 32 {
            return true;
        }
        from.inputs().into_iter().any(|input| {
            input == target
                || self
                    .active_spec(input)
                    .is_some_and(|(_, s)| self.reaches(s, target, depth + 1))
        })
    }
}

/// Evaluates features against loaded states, memoising derived inputs.
struct Evaluator<'a> {
    catalog: &'a FeatureCatalog,
    states: &'a HashMap<FeatureKey, FeatureState>,
    now: DateTime<Utc>,
    memo: HashMap<String, f64>,
    errors: u64,
    /// Features whose own evaluation failed (not merely an input's).
    failed: Vec<String>,
}

impl<'a> Evaluator<'a> {
    fn new(
        catalog: &'a FeatureCatalog,
        states: &'a HashMap<FeatureKey, FeatureState>,
        now: DateTime<Utc>,
    ) -> Self {
        Evaluator {
            catalog,
            states,
            now,
            memo: HashMap::new(),
            errors: 0,
            failed: Vec::new(),
        }
    }

    fn active(&mut self, name: &str, depth: usize) -> f64 {
        if let Some(v) = self.memo.get(name) {
            return *v;
        }
        let Some((version, spec)) = self.catalog.active_spec(name) else {
            return 0.0;
        };
        let value = self.version(name, version, spec, depth);
        self.memo.insert(name.to_owned(), value);
        value
    }

    fn version(&mut self, name: &str, version: u32, spec: &FeatureSpec, depth: usize) -> f64 {
        if depth > 32 {
            self.errors += 1;
            self.failed.push(name.to_owned());
            return spec.default;
        }
        let states = self.states;
        let state = states.get(&FeatureKey::new(name, version));
        let result = spec.evaluate(state, self.now, &mut |input| self.active(input, depth + 1));
        result.unwrap_or_else(|default| {
            self.errors += 1;
            self.failed.push(name.to_owned());
            default
        })
    }
}

/// The active versions of `names` (every feature when `None`); an unknown name is an
/// error naming `field[i]`.
fn wanted<'c>(
    catalog: &'c FeatureCatalog,
    names: Option<&[String]>,
    field: &str,
) -> Result<Vec<(String, u32, &'c FeatureSpec)>> {
    match names {
        Some(names) => names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                catalog
                    .active_spec(n)
                    .map(|(v, s)| (n.clone(), v, s))
                    .ok_or_else(|| Error::not_found(format!("{field}[{i}]"), "feature", n))
            })
            .collect(),
        None => Ok(catalog
            .entries()
            .filter_map(|e| {
                e.versions
                    .get(&e.active)
                    .map(|s| (e.name.clone(), e.active, s))
            })
            .collect()),
    }
}

/// The stateful keys that evaluating `wanted` reads.
fn keys_of(catalog: &FeatureCatalog, wanted: &[(String, u32, &FeatureSpec)]) -> Vec<FeatureKey> {
    let mut keys = Vec::new();
    for (name, version, spec) in wanted {
        catalog.collect_keys(name, *version, spec, &mut keys);
    }
    keys
}

/// The states that were found, by key.
fn present(
    keys: Vec<FeatureKey>,
    states: Vec<Option<FeatureState>>,
) -> HashMap<FeatureKey, FeatureState> {
    keys.into_iter()
        .zip(states)
        .filter_map(|(k, s)| s.map(|s| (k, s)))
        .collect()
}

/// The feature states of a batch's customers after [`FeatureService::fold`]: the states
/// it folded and those it was asked to read beside them, so that segment evaluation
/// after the batch reads each customer's states once with the fold
/// ([`FeatureService::read_after_batch`]), and does not depend on the folded states
/// being stored yet. Empty by default (everything is read).
#[derive(Default)]
pub struct BatchStates {
    customers: HashMap<CustomerId, LoadedStates>,
}

/// The states a fold changed, to be stored by [`FeatureService::write`].
pub struct StateUpdates(Vec<(CustomerId, FeatureKey, FeatureState)>);

/// One customer's loaded keys, and the states of those that have one.
struct LoadedStates {
    keys: Vec<FeatureKey>,
    states: HashMap<FeatureKey, FeatureState>,
}

/// A feature value as read.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FeatureValue {
    pub name: String,
    pub value: f64,
    pub version: u32,
}

/// The result of reading one customer's features.
#[derive(Debug, Clone, Default)]
pub struct FeatureRead {
    pub values: Vec<FeatureValue>,
    /// The backend failed or missed its deadline: values are the defaults.
    pub degraded: bool,
}

pub struct FeatureService {
    stores: Stores,
    profiles: Arc<Profiles>,
    catalog: RwLock<Arc<FeatureCatalog>>,
    settings: FeatureSettings,
    read_deadline: Duration,
    metrics: Arc<Metrics>,
    /// Held by the event processor while it applies a batch and by backfills, so that a
    /// new version sees every event exactly once: history up to the committed offset by
    /// backfill, everything after it live. A tokio mutex: held across awaits.
    apply_lock: tokio::sync::Mutex<()>,
    /// Reads and compute errors per feature version since the last runtime health check.
    /// A std lock: held for a few map updates, never across an await.
    served: parking_lot::Mutex<HashMap<FeatureKey, (u64, u64)>>,
    /// How many of the built-ins, in their order, are defined (or found defined); the
    /// rest were not because the definition store was unreachable at start, and
    /// [`FeatureService::refresh`] defines them once it answers.
    builtins_defined: std::sync::atomic::AtomicUsize,
    /// The partitioned stream events come from (Kafka), if any: a new version is
    /// backfilled partition by partition from its topic by the workers
    /// ([`FeatureService::unfilled`]), not from this process's log when it is defined,
    /// and is activated only once every partition is.
    stream: Option<Arc<dyn EventStream>>,
    /// (version, partition) pairs known to be backfilled: by this process, or found
    /// marked in the feature store. A std lock: never held across an await.
    filled: parking_lot::Mutex<HashSet<(FeatureKey, i32)>>,
}

/// A partition's history folded into fresh states, by customer and version
/// ([`FeatureService::fold_history`]).
pub type HistoryStates = HashMap<(CustomerId, FeatureKey), FeatureState>;

/// Reads a version must have served before its runtime error rate is judged.
const MIN_READS_FOR_HEALTH: u64 = 100;

const NAME_RULE: &str = "must be 1–64 characters of [a-z0-9_], starting with a letter";

fn validate_name(field: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(field, NAME_RULE))
    }
}

impl FeatureService {
    /// Loads the catalog, installing the built-in definitions on first start. A
    /// definition store that cannot be reached (a shared one during an outage) leaves
    /// the built-ins it could not define to [`FeatureService::refresh`].
    pub async fn start(
        stores: Stores,
        profiles: Arc<Profiles>,
        settings: FeatureSettings,
        read_deadline: Duration,
        metrics: Arc<Metrics>,
        stream: Option<Arc<dyn EventStream>>,
    ) -> Result<Arc<Self>> {
        let service = Arc::new(FeatureService {
            stores,
            profiles,
            catalog: RwLock::new(Arc::new(FeatureCatalog::default())),
            settings,
            read_deadline,
            metrics,
            apply_lock: tokio::sync::Mutex::new(()),
            served: parking_lot::Mutex::new(HashMap::new()),
            builtins_defined: std::sync::atomic::AtomicUsize::new(0),
            stream,
            filled: parking_lot::Mutex::default(),
        });
        service.define_pending_builtins(true).await?;
        service.reload().await?;
        Ok(service)
    }

    /// Defines the built-ins still pending, then reloads the catalog: what a process
    /// sharing its definition store runs every second.
    pub async fn refresh(&self) -> Result<()> {
        self.define_pending_builtins(false).await?;
        self.reload().await
    }

    /// Defines each pending built-in the store never had (a deleted one stays deleted),
    /// once across processes that share the store, in order (later ones may read
    /// earlier ones). When the store cannot be reached, that one and the rest stay
    /// pending (said in a warning when `warn`); any other failure is an error.
    async fn define_pending_builtins(&self, warn: bool) -> Result<()> {
        use std::sync::atomic::Ordering;
        let builtins = builtin();
        let defined = self.builtins_defined.load(Ordering::Acquire);
        if defined == builtins.len() {
            return Ok(());
        }
        for (i, (name, body)) in builtins.into_iter().enumerate().skip(defined) {
            match self.define_builtin(name, body).await {
                Ok(()) => self.builtins_defined.store(i + 1, Ordering::Release),
                Err(Error::Storage(StorageError::Unavailable(e))) => {
                    if warn {
                        tracing::warn!(error = %e, "Cannot define the built-in features now (the definition store is unreachable); retrying every second");
                    }
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        if !warn {
            tracing::info!("Built-in features defined now that the definition store answers");
        }
        Ok(())
    }

    pub fn catalog(&self) -> Arc<FeatureCatalog> {
        self.catalog.read().clone()
    }

    pub fn apply_lock(&self) -> &tokio::sync::Mutex<()> {
        &self.apply_lock
    }

    /// Rebuilds the catalog from the definition store (also how a replica picks up what
    /// another one defined there).
    pub async fn reload(&self) -> Result<()> {
        let defs = &self.stores.definitions;
        let mut entries = BTreeMap::new();
        for latest in defs.list(DefinitionKind::Feature).await? {
            let mut versions = BTreeMap::new();
            let mut created_at = BTreeMap::new();
            for d in defs.versions(DefinitionKind::Feature, &latest.name).await? {
                let spec = FeatureSpec::parse(&latest.name, &d.body, &|_| true)?;
                versions.insert(d.version, spec);
                created_at.insert(d.version, d.created_at);
            }
            let active = defs
                .active(DefinitionKind::Feature, &latest.name)
                .await?
                .unwrap_or(latest.version);
            entries.insert(
                latest.name.clone(),
                FeatureEntry {
                    name: latest.name,
                    active,
                    versions,
                    created_at,
                },
            );
        }
        *self.catalog.write() = Arc::new(FeatureCatalog { entries });
        Ok(())
    }

    /// Reads the active value of `names` (every feature when `None`) for one customer.
    /// Unknown names are an error naming `field[i]`. Past the read deadline, or when the
    /// backend fails, every value is its default and the read is marked degraded.
    pub async fn read(
        &self,
        customer: &CustomerId,
        names: Option<&[String]>,
        field: &str,
        now: DateTime<Utc>,
    ) -> Result<FeatureRead> {
        let started = Instant::now();
        let catalog = self.catalog();
        let wanted = wanted(&catalog, names, field)?;
        let keys = keys_of(&catalog, &wanted);
        let (states, degraded) = self.read_states(customer, &keys).await;
        let values = self.evaluate(&catalog, &wanted, &present(keys, states), now);
        self.metrics
            .feature_read_latency_ms
            .record(started.elapsed().as_secs_f64() * 1e3, &[]);
        Ok(FeatureRead { values, degraded })
    }

    /// The stored states of `keys`, within the read deadline; past it, or when the
    /// backend fails, none (`true`: degraded).
    async fn read_states(
        &self,
        customer: &CustomerId,
        keys: &[FeatureKey],
    ) -> (Vec<Option<FeatureState>>, bool) {
        match tokio::time::timeout(
            self.read_deadline,
            self.stores.features.read(customer, keys),
        )
        .await
        {
            Ok(Ok(states)) => (states, false),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "Failed to read features; using defaults");
                self.metrics.backend_error("features");
                (vec![None; keys.len()], true)
            }
            Err(_) => {
                tracing::warn!("Feature read missed its deadline; using defaults");
                self.metrics.backend_error("features");
                (vec![None; keys.len()], true)
            }
        }
    }

    /// As [`FeatureService::read`] for each of `customers`, in order, with the states
    /// that [`FeatureService::fold`] loaded for `batch` taking the place of the store's:
    /// they are as new as the store's or newer (their write may still be in flight). Keys
    /// the fold did not load (customers outside the batch, a catalog changed since) are
    /// read from the store, for every customer in one read. Unlike `read`, never falls
    /// back to defaults: past the read deadline, or when the backend fails, this is an
    /// [`StorageError::Unavailable`] error (segment membership must not be decided on
    /// default values; the caller tries again).
    pub async fn read_after_batch(
        &self,
        batch: &BatchStates,
        customers: &[&CustomerId],
        names: Option<&[String]>,
        field: &str,
        now: DateTime<Utc>,
    ) -> Result<Vec<Vec<FeatureValue>>> {
        let catalog = self.catalog();
        let wanted = wanted(&catalog, names, field)?;
        let keys = keys_of(&catalog, &wanted);
        let started = Instant::now();
        // Per customer: what the batch loaded, and the keys to read from the store.
        let plans: Vec<(Option<&LoadedStates>, Vec<FeatureKey>)> = customers
            .iter()
            .map(|c| {
                let loaded = batch.customers.get(*c);
                let unloaded = keys
                    .iter()
                    .filter(|k| loaded.is_none_or(|l| !l.keys.contains(k)))
                    .cloned()
                    .collect();
                (loaded, unloaded)
            })
            .collect();
        let requests: Vec<(CustomerId, Vec<FeatureKey>)> = customers
            .iter()
            .zip(&plans)
            .filter(|(_, (_, unloaded))| !unloaded.is_empty())
            .map(|(c, (_, unloaded))| ((*c).clone(), unloaded.clone()))
            .collect();
        let stored = if requests.is_empty() {
            Vec::new()
        } else {
            let read = self.read_states_many(&requests).await?;
            self.metrics
                .feature_read_latency_ms
                .record(started.elapsed().as_secs_f64() * 1e3, &[]);
            read
        };
        let mut stored = stored.into_iter();
        let mut out = Vec::with_capacity(customers.len());
        for (loaded, unloaded) in plans {
            let mut states = if unloaded.is_empty() {
                HashMap::new()
            } else {
                present(unloaded, stored.next().unwrap_or_default())
            };
            if let Some(loaded) = loaded {
                for key in keys.iter().filter(|k| loaded.keys.contains(k)) {
                    if let Some(state) = loaded.states.get(key) {
                        states.insert(key.clone(), state.clone());
                    }
                }
            }
            out.push(self.evaluate(&catalog, &wanted, &states, now));
        }
        Ok(out)
    }

    /// The stored states of many customers' keys in one store read, within the read
    /// deadline; past it, or when the backend fails, an `Unavailable` error.
    async fn read_states_many(
        &self,
        requests: &[(CustomerId, Vec<FeatureKey>)],
    ) -> Result<Vec<Vec<Option<FeatureState>>>> {
        let read =
            tokio::time::timeout(self.read_deadline, self.stores.features.read_many(requests));
        let failure = match read.await {
            Ok(Ok(states)) => return Ok(states),
            Ok(Err(e)) => format!("the feature backend failed: {e}"),
            Err(_) => "the feature backend missed its read deadline".to_owned(),
        };
        self.metrics.backend_error("features");
        Err(StorageError::Unavailable(failure).into())
    }

    /// The values of `wanted` from `states`; counts the reads and compute errors.
    fn evaluate(
        &self,
        catalog: &FeatureCatalog,
        wanted: &[(String, u32, &FeatureSpec)],
        states: &HashMap<FeatureKey, FeatureState>,
        now: DateTime<Utc>,
    ) -> Vec<FeatureValue> {
        let mut eval = Evaluator::new(catalog, states, now);
        let values = wanted
            .iter()
            .map(|(name, version, _)| FeatureValue {
                name: name.clone(),
                value: eval.active(name, 0),
                version: *version,
            })
            .collect();
        if eval.errors > 0 {
            self.metrics.feature_compute_errors.add(eval.errors, &[]);
        }
        self.count_reads(wanted, &eval.failed);
        values
    }

    /// Stores `body` as the next version of `name`. The first version is active at once;
    /// later versions are computed beside the active one (backfilled from the event
    /// history, then kept up to date) until `activate` switches to them.
    pub async fn define(&self, name: &str, body: Value) -> Result<FeatureEntry> {
        validate_name("name", name)?;
        let catalog = self.catalog();
        let spec = FeatureSpec::parse("definition", &body, &|n| catalog.get(n).is_some())?;
        if spec.inputs().contains(name) || catalog.reaches(&spec, name, 0) {
            return Err(Error::invalid(
                "definition",
                format!("'{name}' would depend on itself"),
            ));
        }
        let stored = serde_json::to_value(&spec).map_err(anyhow::Error::from)?;
        // Hold the apply lock from before the version exists until it is in the catalog:
        // the processor then sees the new version either in the backfill or live.
        let _guard = self.apply_lock.lock().await;
        let version = self
            .stores
            .definitions
            .put(DefinitionKind::Feature, name, stored)
            .await?;
        if spec.is_stateful() && self.stream.is_none() {
            self.backfill(&FeatureKey::new(name, version), &spec)
                .await?;
        }
        if catalog.get(name).is_none() {
            self.stores
                .definitions
                .set_active(DefinitionKind::Feature, name, version)
                .await?;
            self.record_activation(name, None, version, false, "first version", None)
                .await?;
        }
        self.reload().await?;
        self.catalog()
            .get(name)
            .cloned()
            .ok_or_else(|| Error::Internal(anyhow::anyhow!("feature {name} vanished after define")))
    }

    /// Defines a built-in feature as version 1, active, unless the store ever had the
    /// name: of processes starting together on an empty shared store, exactly one
    /// defines each (the others find it), so no two versions of one built-in exist.
    async fn define_builtin(&self, name: &str, body: Value) -> Result<()> {
        let catalog = self.catalog();
        let spec = FeatureSpec::parse("definition", &body, &|n| catalog.get(n).is_some())?;
        let stored = serde_json::to_value(&spec).map_err(anyhow::Error::from)?;
        let _guard = self.apply_lock.lock().await;
        let created = self
            .stores
            .definitions
            .put_first(DefinitionKind::Feature, name, stored)
            .await?;
        if created {
            if spec.is_stateful() && self.stream.is_none() {
                self.backfill(&FeatureKey::new(name, 1), &spec).await?;
            }
            self.stores
                .definitions
                .set_active(DefinitionKind::Feature, name, 1)
                .await?;
            self.record_activation(name, None, 1, false, "first version", None)
                .await?;
        }
        self.reload().await
    }

    /// Backfills from this process's event log every stateful version it has not
    /// backfilled yet (a version defined by another process of the deployment, or while
    /// this one was stopped), under the apply lock: what a process that applies events
    /// with shared definitions runs at start and every second. Returns how many versions it backfilled. On a
    /// process that never backfilled before (an older data directory) this recomputes
    /// every stateful version once.
    pub async fn backfill_new_versions(&self) -> Result<usize> {
        let _guard = self.apply_lock.lock().await;
        let catalog = self.catalog();
        let mut done = 0;
        for (key, spec) in catalog.live_stateful() {
            if self
                .stores
                .events
                .committed_offset(&backfill_mark(&key))
                .await?
                == 0
            {
                self.backfill(&key, spec).await?;
                done += 1;
            }
        }
        Ok(done)
    }

    /// Folds every event already applied live into the new version's state, and records
    /// in the event log that this version was backfilled from it.
    async fn backfill(&self, key: &FeatureKey, spec: &FeatureSpec) -> Result<()> {
        let events = &self.stores.events;
        let until = events.committed_offset(PROCESSOR).await?;
        let now = Utc::now();
        let mut states: HashMap<CustomerId, FeatureState> = HashMap::new();
        let mut after = 0;
        while after < until {
            let page = events.scan(after, 4096).await?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            for stored in page.iter().filter(|e| e.seq <= until) {
                if spec.matches(&stored.event.event_type) {
                    let state = states.entry(stored.event.customer_id.clone()).or_default();
                    spec.fold(state, stored, now);
                }
            }
        }
        let mut updates: Vec<_> = states
            .into_iter()
            .map(|(c, s)| (c, key.clone(), s))
            .collect();
        while !updates.is_empty() {
            let rest = updates.split_off(updates.len().saturating_sub(2048));
            self.stores.features.write(rest).await?;
        }
        events.commit_offset(&backfill_mark(key), until + 1).await?;
        tracing::info!(feature = %key, until, "Backfilled feature version");
        Ok(())
    }

    /// With events from a stream: of `catalog`'s live stateful versions, those whose
    /// states do not hold the history of each of `partitions` yet, by partition (a
    /// partition and its versions are left out when every one is known backfilled).
    /// Marks this process has not seen are read from the feature store, once per version
    /// until every partition asked about is backfilled.
    pub async fn unfilled(
        &self,
        catalog: &FeatureCatalog,
        partitions: &BTreeSet<i32>,
    ) -> Result<BTreeMap<i32, Vec<FeatureKey>>> {
        let mut out: BTreeMap<i32, Vec<FeatureKey>> = BTreeMap::new();
        for (key, _) in catalog.live_stateful() {
            let missing = |filled: &HashSet<(FeatureKey, i32)>| -> Vec<i32> {
                partitions
                    .iter()
                    .filter(|p| !filled.contains(&(key.clone(), **p)))
                    .copied()
                    .collect()
            };
            if missing(&self.filled.lock()).is_empty() {
                continue;
            }
            let marked = self.stores.features.backfilled_partitions(&key).await?;
            let mut filled = self.filled.lock();
            filled.extend(marked.into_iter().map(|p| (key.clone(), p)));
            for partition in missing(&filled) {
                out.entry(partition).or_default().push(key.clone());
            }
        }
        Ok(out)
    }

    /// Folds a page of a partition's history (in offset order) into fresh states of
    /// `keys`, which must be `catalog`'s.
    pub fn fold_history(
        &self,
        catalog: &FeatureCatalog,
        keys: &[FeatureKey],
        page: &[StoredEvent],
        states: &mut HistoryStates,
        now: DateTime<Utc>,
    ) {
        let specs: Vec<(&FeatureKey, &FeatureSpec)> = keys
            .iter()
            .filter_map(|key| Some((key, catalog.spec(key)?)))
            .collect();
        for stored in page {
            for (key, spec) in &specs {
                if spec.matches(&stored.event.event_type) {
                    let state = states
                        .entry((stored.event.customer_id.clone(), (*key).clone()))
                        .or_default();
                    spec.fold(state, stored, now);
                }
            }
        }
    }

    /// Stores the states [`Self::fold_history`] built from `partition`'s history, then
    /// marks each of `keys` backfilled from it. A stored state that is later in the
    /// partition (folded live meanwhile, after its own backfill) is kept: both hold
    /// every event up to their position.
    pub async fn store_history(
        &self,
        partition: i32,
        keys: &[FeatureKey],
        states: HistoryStates,
    ) -> Result<()> {
        // A state none of the customer's events counted in (their properties did not
        // pass the version's `where`) is not written.
        let mut updates: Vec<_> = states
            .into_iter()
            .filter(|(_, s)| s.applied_position.is_some())
            .map(|((c, k), s)| (c, k, s))
            .collect();
        while !updates.is_empty() {
            let rest = updates.split_off(updates.len().saturating_sub(2048));
            self.stores.features.write(rest).await?;
        }
        for key in keys {
            self.stores.features.mark_backfilled(key, partition).await?;
            self.filled.lock().insert((key.clone(), partition));
        }
        Ok(())
    }

    /// Folds a batch of events (ascending by seq) into every live stateful version of
    /// `catalog` (taken once per batch: with events from a stream, the versions whose
    /// partitions were checked backfilled); the
    /// changed states are stored by [`Self::write`]. Called by the event processor while
    /// it holds [`Self::apply_lock`], which it keeps until the write is done. `then_read`
    /// names the features that will be read for the batch's customers next (every
    /// feature when `None`; unknown names are left to that read to report): their states
    /// are read with the folded ones, in one read per customer, and returned with them.
    pub async fn fold(
        &self,
        catalog: &FeatureCatalog,
        batch: &[StoredEvent],
        now: DateTime<Utc>,
        then_read: Option<&[String]>,
    ) -> Result<(BatchStates, StateUpdates)> {
        let live: Vec<(FeatureKey, &FeatureSpec)> = catalog.live_stateful().collect();
        let then_keys = {
            let known: Option<Vec<String>> = then_read.map(|names| {
                names
                    .iter()
                    .filter(|n| catalog.get(n).is_some())
                    .cloned()
                    .collect()
            });
            // Every name is known now, so this cannot fail.
            let wanted = wanted(catalog, known.as_deref(), "features").unwrap_or_default();
            keys_of(catalog, &wanted)
        };
        let mut by_customer: BTreeMap<&CustomerId, Vec<&StoredEvent>> = BTreeMap::new();
        for e in batch {
            by_customer.entry(&e.event.customer_id).or_default().push(e);
        }
        // Which states each customer's events touch, and what is read with them.
        let mut requests = Vec::with_capacity(by_customer.len());
        let mut folds = Vec::with_capacity(by_customer.len());
        for (customer, events) in by_customer {
            let touched: Vec<&(FeatureKey, &FeatureSpec)> = live
                .iter()
                .filter(|(_, s)| events.iter().any(|e| s.matches(&e.event.event_type)))
                .collect();
            let mut keys: Vec<FeatureKey> = touched.iter().map(|(k, _)| k.clone()).collect();
            for key in &then_keys {
                if !keys.contains(key) {
                    keys.push(key.clone());
                }
            }
            if keys.is_empty() {
                continue;
            }
            requests.push((customer.clone(), keys));
            folds.push((events, touched));
        }
        let read = self.stores.features.read_many(&requests).await?;
        let mut updates = Vec::new();
        let mut customers = HashMap::with_capacity(requests.len());
        for (((customer, keys), states), (events, touched)) in
            requests.into_iter().zip(read).zip(folds)
        {
            let mut states = present(keys.clone(), states);
            for (key, spec) in touched {
                // A state none of the events folded into (their properties did not pass
                // its `where`, or a replay already counted them) is unchanged: not
                // written again.
                let existed = states.contains_key(key);
                let state = states.entry(key.clone()).or_default();
                let mut folded = false;
                for e in &events {
                    folded |= spec.fold(state, e, now);
                }
                if !folded {
                    if !existed {
                        states.remove(key);
                    }
                    continue;
                }
                updates.push((customer.clone(), key.clone(), state.clone()));
            }
            customers.insert(customer, LoadedStates { keys, states });
        }
        Ok((BatchStates { customers }, StateUpdates(updates)))
    }

    /// Stores the states a [`Self::fold`] changed.
    pub async fn write(&self, updates: StateUpdates) -> Result<()> {
        if !updates.0.is_empty() {
            self.stores.features.write(updates.0).await?;
        }
        Ok(())
    }

    /// Switches `name` to `version`, then checks the new version's health against the
    /// one it replaced on a sample of customers; a failed check rolls back at once.
    pub async fn activate(
        &self,
        name: &str,
        version: u32,
    ) -> Result<(FeatureEntry, Option<HealthReport>)> {
        let catalog = self.catalog();
        let entry = catalog
            .get(name)
            .ok_or_else(|| Error::not_found("name", "feature", name))?;
        let spec = entry
            .versions
            .get(&version)
            .ok_or_else(|| {
                Error::not_found("version", "feature version", format!("{name}@v{version}"))
            })?
            .clone();
        let previous = entry.active;
        if previous == version {
            return Ok((entry.clone(), None));
        }
        if let Some(stream) = self.stream.as_ref().filter(|_| spec.is_stateful()) {
            // Its values would be partial until then, and the health check would roll
            // the version back for it.
            let key = FeatureKey::new(name, version);
            let partitions = stream.partitions().await?;
            let done = self.stores.features.backfilled_partitions(&key).await?;
            let left = (0..partitions).filter(|p| !done.contains(p)).count();
            if left > 0 {
                return Err(Error::invalid(
                    "version",
                    format!(
                        "{key} is still being backfilled from the events topic ({left} of \
                         {partitions} partitions to go): activate it once the workers have \
                         replayed them"
                    ),
                ));
            }
        }
        let old_spec = entry.versions.get(&previous).cloned();
        self.stores
            .definitions
            .set_active(DefinitionKind::Feature, name, version)
            .await?;
        self.record_activation(name, Some(previous), version, false, "activated", None)
            .await?;
        self.reload().await?;

        let report = match old_spec {
            Some(old) => Some(self.health(name, previous, &old, version, &spec).await?),
            None => None,
        };
        if let Some(r) = report.as_ref().filter(|r| !r.healthy) {
            let reason = format!(
                "health check failed: error rate {:.3} (max {}), distribution shift {:.3} (max {})",
                r.error_rate,
                self.settings.max_error_rate,
                r.distribution_shift,
                self.settings.max_distribution_shift
            );
            tracing::warn!(feature = name, version, %reason, "Rolling back feature version");
            self.stores
                .definitions
                .set_active(DefinitionKind::Feature, name, previous)
                .await?;
            self.record_activation(
                name,
                Some(version),
                previous,
                true,
                &reason,
                Some(r.clone()),
            )
            .await?;
            self.metrics
                .feature_rollbacks
                .add(1, &[KeyValue::new("feature", name.to_owned())]);
            self.reload().await?;
        }
        let entry = self
            .catalog()
            .get(name)
            .cloned()
            .ok_or_else(|| Error::Internal(anyhow::anyhow!("feature {name} vanished")))?;
        Ok((entry, report))
    }

    fn count_reads(&self, read: &[(String, u32, &FeatureSpec)], failed: &[String]) {
        let mut served = self.served.lock();
        for (name, version, _) in read {
            let entry = served
                .entry(FeatureKey::new(name.clone(), *version))
                .or_default();
            entry.0 += 1;
            if failed.iter().any(|f| f == name) {
                entry.1 += 1;
            }
        }
    }

    /// Rolls back every active version whose values failed to compute on more than
    /// `max_error_rate` of the reads it served since the last check (at least
    /// [`MIN_READS_FOR_HEALTH`] reads), to the version it replaced. Returns the features
    /// rolled back.
    pub async fn check_runtime_health(&self) -> Result<Vec<String>> {
        let served = std::mem::take(&mut *self.served.lock());
        let catalog = self.catalog();
        let mut rolled_back = Vec::new();
        for (key, (reads, errors)) in served {
            let rate = errors as f64 / reads.max(1) as f64;
            let active = catalog.get(&key.name).map(|e| e.active);
            if reads < MIN_READS_FOR_HEALTH
                || rate <= self.settings.max_error_rate
                || active != Some(key.version)
            {
                continue;
            }
            let previous = self
                .activations(&key.name)
                .await?
                .into_iter()
                .rev()
                .find(|a| a.to == key.version)
                .and_then(|a| a.from);
            let Some(previous) = previous else { continue };
            let reason = format!(
                "runtime health check failed: {errors} of {reads} reads did not compute (max rate {})",
                self.settings.max_error_rate
            );
            tracing::warn!(feature = %key, %reason, "Rolling back feature version");
            self.stores
                .definitions
                .set_active(DefinitionKind::Feature, &key.name, previous)
                .await?;
            self.record_activation(&key.name, Some(key.version), previous, true, &reason, None)
                .await?;
            self.metrics
                .feature_rollbacks
                .add(1, &[KeyValue::new("feature", key.name.clone())]);
            rolled_back.push(key.name);
        }
        if !rolled_back.is_empty() {
            self.reload().await?;
        }
        Ok(rolled_back)
    }

    async fn health(
        &self,
        name: &str,
        old_version: u32,
        old: &FeatureSpec,
        new_version: u32,
        new: &FeatureSpec,
    ) -> Result<HealthReport> {
        let customers = self
            .profiles
            .list(None, self.settings.health_sample)
            .await?;
        let catalog = self.catalog();
        let now = Utc::now();
        let mut old_values = Vec::with_capacity(customers.len());
        let mut new_values = Vec::with_capacity(customers.len());
        let mut errors = 0u64;
        for c in &customers {
            let mut keys = Vec::new();
            catalog.collect_keys(name, old_version, old, &mut keys);
            catalog.collect_keys(name, new_version, new, &mut keys);
            let states = self.stores.features.read(&c.id, &keys).await?;
            let states = present(keys, states);
            let mut eval = Evaluator::new(&catalog, &states, now);
            old_values.push(eval.version(name, old_version, old, 0));
            let before = eval.errors;
            new_values.push(eval.version(name, new_version, new, 0));
            errors += eval.errors - before;
        }
        let sampled = customers.len();
        let error_rate = if sampled == 0 {
            0.0
        } else {
            errors as f64 / sampled as f64
        };
        let distribution_shift = ks_distance(&mut old_values, &mut new_values);
        Ok(HealthReport {
            sampled,
            error_rate,
            distribution_shift,
            healthy: error_rate <= self.settings.max_error_rate
                && distribution_shift <= self.settings.max_distribution_shift,
        })
    }

    async fn record_activation(
        &self,
        name: &str,
        from: Option<u32>,
        to: u32,
        automatic: bool,
        reason: &str,
        health: Option<HealthReport>,
    ) -> Result<()> {
        let record = Activation {
            from,
            to,
            automatic,
            reason: reason.to_owned(),
            at: Utc::now(),
            health,
        };
        self.stores
            .definitions
            .put(
                DefinitionKind::FeatureActivation,
                name,
                serde_json::to_value(record).map_err(anyhow::Error::from)?,
            )
            .await?;
        Ok(())
    }

    /// Every activation and rollback of `name`, oldest first.
    pub async fn activations(&self, name: &str) -> Result<Vec<Activation>> {
        self.stores
            .definitions
            .versions(DefinitionKind::FeatureActivation, name)
            .await?
            .into_iter()
            .map(|d| {
                serde_json::from_value(d.body)
                    .map_err(|e| Error::Internal(anyhow::anyhow!("corrupt activation record: {e}")))
            })
            .collect()
    }

    /// The definition body as users see it.
    pub fn describe(spec: &FeatureSpec) -> Value {
        serde_json::to_value(spec).unwrap_or_else(|_| json!({}))
    }
}

/// Two-sample Kolmogorov–Smirnov distance (0 = same distribution, 1 = disjoint).
fn ks_distance(a: &mut [f64], b: &mut [f64]) -> f64 {
    if a.is_empty() || b.is_empty() {
        return 0.0;
    }
    a.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    let (mut i, mut j, mut d) = (0usize, 0usize, 0.0f64);
    while i < a.len() && j < b.len() {
        let x = if a[i] <= b[j] { a[i] } else { b[j] };
        while i < a.len() && a[i] <= x {
            i += 1;
        }
        while j < b.len() && b[j] <= x {
            j += 1;
        }
        d = d.max((i as f64 / a.len() as f64 - j as f64 / b.len() as f64).abs());
    }
    d
}

/// The consumer name under which an event log records that `key` was backfilled from
/// it (the offset: the last sequence number folded, plus one, so never 0).
fn backfill_mark(key: &FeatureKey) -> String {
    format!("backfill:{key}")
}

#[cfg(test)]
mod tests {
    use super::ks_distance;

    #[test]
    fn ks_distance_measures_shift() {
        let same = ks_distance(&mut [1.0, 2.0, 3.0], &mut [3.0, 2.0, 1.0]);
        assert_eq!(same, 0.0);
        let disjoint = ks_distance(&mut [1.0, 2.0], &mut [10.0, 20.0]);
        assert_eq!(disjoint, 1.0);
        let half = ks_distance(&mut [1.0, 2.0, 3.0, 4.0], &mut [3.0, 4.0, 5.0, 6.0]);
        assert_eq!(half, 0.5);
    }
}
