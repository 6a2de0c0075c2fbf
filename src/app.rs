//! Builds the engine from settings and serves it: `Engine::open` wires the stores and
//! services, `serve` runs the HTTP server and the background tasks until shutdown.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Settings;
use crate::content::{Catalog, ContentItem};
use crate::customers::{Customer, CustomerId, CustomerLocks, CustomerUpdate};
use crate::decision::pipeline::DecisionEngine;
use crate::error::{Error, Result};
use crate::events::ingest::{Ingestor, LocalApply, Target};
use crate::events::processor::Processor;
use crate::experiments::assignment::Holdout;
use crate::experiments::ExperimentService;
use crate::features::FeatureService;
use crate::model::train::{Progress, TrainParams};
use crate::model::{ModelService, TrainingSource, VersionInfo};
use crate::privacy::{KeyRing, Profiles};
use crate::rules::{Natives, RuleService};
use crate::segments::SegmentService;
use crate::storage::embedded::EmbeddedStore;
use crate::storage::{EventStream, PrivacyChange, PrivacyEntry, StorageError, Stores};
use crate::telemetry::Metrics;

/// Everything the API serves, built once.
pub struct Engine {
    pub settings: Settings,
    pub stores: Stores,
    /// Customer profiles: read and write them here, never through `stores.profiles`
    /// (which holds them sealed).
    pub profiles: Arc<Profiles>,
    /// The content catalog, cached for the decision path; write content through it.
    pub catalog: Arc<Catalog>,
    pub metrics: Arc<Metrics>,
    pub features: Arc<FeatureService>,
    pub segments: Arc<SegmentService>,
    pub processor: Arc<Processor>,
    pub ingestor: Ingestor,
    pub decisions: DecisionEngine,
    pub rules: Arc<RuleService>,
    /// The model registry and the scorer (`src/model`).
    pub models: Arc<ModelService>,
    pub experiments: Arc<ExperimentService>,
    /// API keys: create, list, revoke, verify (`src/auth`).
    pub keys: Arc<crate::auth::KeyService>,
    /// The event stream (`backends.events = "kafka://…"`), if any.
    pub stream: Option<Arc<dyn EventStream>>,
    customer_locks: Arc<CustomerLocks>,
    /// One run of [`Engine::follow_privacy_journal`] at a time.
    journal_follow: tokio::sync::Mutex<()>,
}

/// What [`Engine::erase_customer`] removed.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Erasure {
    pub customer_id: CustomerId,
    /// Whether there was a profile to delete.
    pub profile: bool,
    /// Events deleted from the log.
    pub events: u64,
    /// Segments the customer left.
    pub segments: Vec<String>,
    /// Decisions whose customer id was replaced by `pseudonym`.
    pub decisions: u64,
    pub pseudonym: Option<String>,
    pub erased_at: chrono::DateTime<Utc>,
}

/// What one `tailor serve` process does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    /// Serves the API. With an event stream, ingested events go to the stream and
    /// nothing is applied here; with the embedded event log this is [`Role::All`].
    Api,
    /// Applies events (with an event stream: consumes them in the workers' group) and
    /// keeps segments and features healthy; serves no API.
    Worker,
    /// Both.
    #[default]
    All,
}
/// How long the decision path trusts its in-memory catalog when another process may
/// have changed it.
const CATALOG_TTL: Duration = Duration::from_secs(1);
/// Privacy journal entries read per call.
const JOURNAL_READ: usize = 256;
/// How often bandit statistics written behind are flushed.
const BANDIT_FLUSH: Duration = Duration::from_millis(100);
/// Which stores an erasure reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// Every store this process uses, the shared ones included: the process that took
    /// the request.
    Shared,
    /// Only the stores this process keeps for itself: applying the privacy journal.
    Own,
}

/// How often a process applies the privacy journal.
const JOURNAL_PERIOD: Duration = Duration::from_secs(1);

impl Engine {
    /// Opens the configured backends in `settings.data_dir` and loads the definitions.
    pub async fn open(settings: Settings) -> anyhow::Result<Arc<Engine>> {
        let store = EmbeddedStore::open(&settings.data_dir)?;
        store.set_decision_log(settings.storage.decision_log);
        let mut embedded = store.stores();
        embedded.data_keys = crate::storage::embedded::open_keyring(&settings.data_dir)?;
        let stores = crate::storage::with_backends(
            embedded,
            &settings.backends,
            settings.timeouts.backend(),
            &settings.breaker,
        )
        .await?;
        let stream =
            crate::storage::open_event_stream(&settings.backends, &settings.data_dir).await?;
        Ok(Self::with_parts(settings, stores, stream).await?)
    }

    pub async fn with_stores(settings: Settings, stores: Stores) -> Result<Arc<Engine>> {
        Self::with_parts(settings, stores, None).await
    }

    /// The engine on `stores`, sending events, decisions and outcomes to `stream` when
    /// there is one.
    pub async fn with_parts(
        settings: Settings,
        stores: Stores,
        stream: Option<Arc<dyn EventStream>>,
    ) -> Result<Arc<Engine>> {
        let metrics = Arc::new(Metrics::new()?);
        metrics.observe_backends(&stores.health);
        if stores.shared.profiles && crate::privacy::keys::uses_generated_key(&settings.encryption)
        {
            return Err(Error::invalid(
                "encryption.key_env",
                "backends.profiles is shared by every process of the deployment, so they \
                 must all use one master key: set the variable encryption.key_env names, \
                 or encryption.key_file (a generated key is this data directory's own)",
            ));
        }
        let ring = KeyRing::load(&settings.encryption, &settings.data_dir)?;
        let profiles =
            Arc::new(Profiles::open(&stores, ring, &settings.encryption.sensitive_traits).await?);
        // The events topic is sealed where every process reads the same data keys; with
        // each process's keys its own, another process could not open its records.
        if let (Some(stream), true) = (&stream, stores.shared.profiles) {
            stream.seal_with(profiles.stream_seal());
        }
        let features = FeatureService::start(
            stores.clone(),
            profiles.clone(),
            settings.features.clone(),
            Duration::from_millis(settings.timeouts.feature_read_ms),
            metrics.clone(),
            stream.clone(),
        )
        .await?;
        let segments = SegmentService::start(
            stores.clone(),
            profiles.clone(),
            features.clone(),
            metrics.clone(),
        )
        .await?;
        let rules = RuleService::open(
            stores.definitions.clone(),
            settings.rules.settings(),
            Natives::builtin(),
            metrics.clone(),
        )
        .await?;
        let customer_locks = Arc::new(CustomerLocks::new());
        let processor = Processor::new(
            stores.clone(),
            profiles.clone(),
            features.clone(),
            segments.clone(),
            rules.clone(),
            customer_locks.clone(),
            settings.consent.clone(),
            metrics.clone(),
            stream.clone(),
        )
        .await?;
        let target = match &stream {
            Some(stream) => Target::Stream(stream.clone()),
            None => Target::Local {
                processor: processor.clone(),
                apply_wait: Duration::from_millis(settings.timeouts.ingest_apply_ms),
            },
        };
        let ingestor = Ingestor::new(
            stores.clone(),
            profiles.clone(),
            target,
            settings.consent.clone(),
            metrics.clone(),
            settings.limits.max_events_per_request,
        );
        let catalog = Arc::new(Catalog::new(stores.content.clone(), CATALOG_TTL));
        let models = ModelService::open(&settings.data_dir, &settings.model)?;
        if let Err(e) = models.load_online_rewards(stores.bandit.as_ref()).await {
            tracing::warn!(error = %e, "Cannot read the models' online rewards; counting from zero");
        }
        let experiments = Arc::new(ExperimentService::new(
            stores.definitions.clone(),
            stores.experiments.clone(),
            stores.content.clone(),
            Holdout {
                percent: settings.experiments.holdout_percent,
                salt: settings.experiments.holdout_salt.clone(),
            },
            CATALOG_TTL,
        ));
        let decisions = DecisionEngine::new(
            stores.clone(),
            profiles.clone(),
            catalog.clone(),
            features.clone(),
            rules.clone(),
            models.clone(),
            experiments.clone(),
            settings.policy.clone(),
            settings.consent.clone(),
            settings.limits.max_candidates,
            metrics.clone(),
        )
        .with_publisher(stream.clone());
        let jwt = crate::auth::jwt::JwtVerifier::load(&settings.auth.jwt)?;
        let keys = Arc::new(crate::auth::KeyService::new(stores.keys.clone()).with_jwt(jwt));
        let engine = Arc::new(Engine {
            settings,
            stores,
            profiles,
            catalog,
            metrics,
            features,
            segments,
            processor,
            ingestor,
            decisions,
            rules,
            models,
            experiments,
            keys,
            stream,
            customer_locks,
            journal_follow: tokio::sync::Mutex::new(()),
        });
        // Whom the deployment erased, before this process accepts anything (a process
        // that cannot read the journal now catches up from its background task).
        if let Err(e) = engine.follow_privacy_journal().await {
            tracing::warn!(error = %e, "Cannot read the privacy journal yet; retrying every second");
        }
        // What opening read from a shared catalog, kept for a start during an outage.
        if engine.stores.catalog_copy.is_some() {
            let _ = engine.catalog.items().await;
            let _ = engine.experiments.running().await;
            engine.save_catalog_copy().await;
        }
        Ok(engine)
    }

    /// Starts every background task of [`Role::All`]; they stop with `shutdown`.
    pub fn spawn_background(
        self: &Arc<Self>,
        shutdown: watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        self.spawn_role(Role::All, shutdown)
    }

    /// Starts the background tasks of `role`; they stop with `shutdown`:
    /// - everywhere: the rule reloader, the flush of the models' online rewards, the
    ///   forwarders of the event stream's outboxes (so nothing an earlier run
    ///   acknowledged stays behind), and with a shared catalog its reload every second,
    ///   which also saves the local copy of it;
    /// - where events are applied (not [`Role::Api`] with an event stream): the event
    ///   processor, the stream's consumer, the segment refresher and the feature health
    ///   check.
    pub fn spawn_role(
        self: &Arc<Self>,
        role: Role,
        shutdown: watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = Vec::new();
        if let Some(stream) = &self.stream {
            tasks.extend(
                stream
                    .clone()
                    .spawn_forwarders(self.metrics.clone(), shutdown.clone()),
            );
        }
        let rules = self.rules.clone();
        tasks.push(every(
            Duration::from_secs(self.settings.rules.reload_interval_secs.max(1)),
            shutdown.clone(),
            move || {
                let rules = rules.clone();
                async move {
                    if let Err(e) = rules.reload().await {
                        tracing::warn!(error = %e, "Failed to reload rules");
                    }
                }
            },
        ));
        // Definitions shared with other replicas: what they define reaches this one's
        // feature and segment catalogs within a second (rules follow through their own
        // reload above; content and experiments through their caches' lifetime, read
        // here too so that the local copy of the catalog holds them). Each tick also
        // defines the built-in features a start during an outage could not, and saves
        // the local copy of the catalog when it changed (once more at shutdown).
        if self.settings.backends.definitions != "embedded" {
            tasks.push(shared_catalog(
                self.clone(),
                role != Role::Worker,
                shutdown.clone(),
            ));
        }
        // Erasures made by other processes of the deployment reach this one's stores,
        // then events that batches skipped as erased are deleted.
        let engine = self.clone();
        // Warnings say when following starts and stops failing, not every second.
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        tasks.push(every(JOURNAL_PERIOD, shutdown.clone(), move || {
            let (engine, failing) = (engine.clone(), failing.clone());
            async move {
                let followed = engine.follow_privacy_journal().await;
                let was_failing =
                    failing.swap(followed.is_err(), std::sync::atomic::Ordering::Relaxed);
                if let Err(e) = followed {
                    if !was_failing {
                        tracing::warn!(error = %e, "Cannot apply the privacy journal; retrying every second");
                    }
                    return;
                }
                if was_failing {
                    tracing::info!("The privacy journal is applied again");
                }
                match engine.purge_skipped_erased().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(events = n, "Deleted erased customers' late events"),
                    Err(e) => {
                        tracing::warn!(error = %e, "Failed to delete erased customers' late events")
                    }
                }
            }
        }));
        // Bandit statistics written behind (Redis): what was added reaches the store
        // within [`BANDIT_FLUSH`], and what an outage held back once it answers.
        let engine = self.clone();
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        tasks.push(every(BANDIT_FLUSH, shutdown.clone(), move || {
            let (engine, failing) = (engine.clone(), failing.clone());
            async move {
                let result = engine.stores.bandit.flush().await;
                let failed = result.is_err();
                if let Err(e) = result {
                    if !failing.load(std::sync::atomic::Ordering::Relaxed) {
                        tracing::warn!(error = %e, "Cannot write bandit statistics; holding them and retrying");
                    }
                } else if failing.load(std::sync::atomic::Ordering::Relaxed) {
                    tracing::info!("Bandit statistics held back are written");
                }
                failing.store(failed, std::sync::atomic::Ordering::Relaxed);
            }
        }));
        // Decisions are made (and models' rewards counted) in every role that serves.
        tasks.push(online_rewards(self.clone(), shutdown.clone()));
        if role == Role::Api && self.stream.is_some() {
            return tasks;
        }
        tasks.push(tokio::spawn(self.processor.clone().run(shutdown.clone())));
        if let Some(stream) = &self.stream {
            let sink = Arc::new(LocalApply::new(
                self.stores.clone(),
                self.processor.clone(),
                stream.dedup_window(),
                self.metrics.clone(),
            ));
            tasks.push(
                stream
                    .clone()
                    .spawn_consumer(sink, self.metrics.clone(), shutdown.clone()),
            );
        }
        // With an event stream, new feature versions are backfilled from its topic, in
        // each partition before anything is folded into them there: by the batches of
        // that partition, and each second here for the partitions this worker holds that
        // have no new events.
        if self.stream.is_some() {
            let processor = self.processor.clone();
            tasks.push(every(Duration::from_secs(1), shutdown.clone(), move || {
                let processor = processor.clone();
                async move {
                    if let Err(e) = processor.backfill_assigned().await {
                        tracing::warn!(error = %e, "Failed to backfill new feature versions from the events topic");
                    }
                }
            }));
        } else if self.settings.backends.definitions != "embedded" {
            // With shared definitions, feature versions defined elsewhere (another
            // process of the deployment) or while this one was stopped are backfilled
            // from this process's event log: at start, then each second. (With its own
            // definitions, a process backfills each version as it defines it.)
            let features = self.features.clone();
            let backfill = move || {
                let features = features.clone();
                async move {
                    if let Err(e) = features.backfill_new_versions().await {
                        tracing::warn!(error = %e, "Failed to backfill new feature versions");
                    }
                }
            };
            tasks.push(tokio::spawn(backfill()));
            tasks.push(every(Duration::from_secs(1), shutdown.clone(), backfill));
        }
        let segments = self.segments.clone();
        tasks.push(every(
            Duration::from_secs(self.settings.segments.refresh_interval_secs.max(1)),
            shutdown.clone(),
            move || {
                let segments = segments.clone();
                async move {
                    if let Err(e) = segments.refresh_time_dependent().await {
                        tracing::warn!(error = %e, "Failed to refresh time-dependent segments");
                    }
                }
            },
        ));
        let features = self.features.clone();
        tasks.push(every(
            Duration::from_secs(self.settings.features.health_check_interval_secs.max(1)),
            shutdown.clone(),
            move || {
                let features = features.clone();
                async move {
                    if let Err(e) = features.check_runtime_health().await {
                        tracing::warn!(error = %e, "Failed to check feature health");
                    }
                }
            },
        ));
        tasks
    }

    /// Saves the local copy of a shared catalog if it changed (a failure is logged: the
    /// next save tries again).
    pub async fn save_catalog_copy(&self) {
        if let Some(copy) = &self.stores.catalog_copy {
            if let Err(e) = copy.save().await {
                tracing::warn!(error = %e, "Failed to save the local copy of the shared catalog");
            }
        }
    }

    /// Applies a partial profile update and re-evaluates the customer's segments.
    ///
    /// A customer who was erased is refused (`input.id`), unless the update grants
    /// consent for some purpose again: that re-consent lifts the suppression.
    pub async fn upsert_customer(&self, update: CustomerUpdate) -> Result<Customer> {
        let id = update.id.clone();
        let customer = {
            // Consent granted with other processes in the deployment: first apply what
            // it erased meanwhile, so that this process knows whether the grant renews
            // consent after an erasure (to be announced) and no earlier erasure can
            // reach it afterwards.
            if self.stores.journal.is_some() && update.consent.grants_any() {
                if let Err(e) = self.follow_privacy_journal().await {
                    if self.profiles.erased_at(&id).await?.is_some() {
                        return Err(e);
                    }
                    tracing::warn!(error = %e, "Granting consent without the latest privacy journal");
                }
            }
            let _guard = self.customer_locks.lock(&id).await;
            if self.profiles.erased_at(&id).await?.is_some() {
                if !update.consent.grants_any() {
                    self.metrics
                        .erased_writes_suppressed
                        .add(1, &[opentelemetry::KeyValue::new("kind", "profile")]);
                    return Err(Error::invalid(
                        "input.id",
                        format!(
                            "customer '{id}' was erased; an update must grant consent \
                             (input.consent) to store them again"
                        ),
                    ));
                }
                if let Some(journal) = &self.stores.journal {
                    let entry = PrivacyEntry {
                        customer: id.clone(),
                        at: Utc::now(),
                        change: PrivacyChange::Consented,
                    };
                    journal.append(&entry).await?;
                }
                self.profiles.clear_erased(&id).await?;
            }
            let existing = self.profiles.get(&id).await?;
            let customer = update.apply(existing, Utc::now());
            self.profiles.put(&customer).await?;
            customer
        };
        // Under the processor's lock, so an evaluation from an older view of the
        // customer can never be applied after this one.
        let _applying = self.features.apply_lock().lock().await;
        self.segments.evaluate_customer(&customer).await?;
        Ok(customer)
    }

    /// Names of the features whose active definition exists: what a model may read.
    pub fn live_features(&self) -> BTreeSet<String> {
        self.features
            .catalog()
            .entries()
            .filter(|e| e.versions.contains_key(&e.active))
            .map(|e| e.name.clone())
            .collect()
    }

    /// Trains a new model version from `source` (not activated); training runs off the
    /// async executor.
    pub async fn train_model(
        &self,
        source: &TrainingSource,
        params: TrainParams,
        progress: impl FnMut(Progress) + Send + 'static,
    ) -> Result<crate::model::registry::Manifest> {
        let catalog = self.catalog.items().await?;
        let data = self
            .models
            .dataset(source, self.stores.decisions.as_ref(), &catalog)
            .await?;
        Ok(self.models.train(data, params, progress).await?)
    }

    /// Publishes the experiment totals counted in this process's store to the shared
    /// catalog (none without one); returns how many (experiment, variant) totals changed.
    pub async fn publish_experiment_totals(&self) -> Result<usize> {
        let Some(counted) = &self.stores.counted_here else {
            return Ok(0);
        };
        let experiments: Vec<String> = self
            .stores
            .definitions
            .list(crate::storage::DefinitionKind::Experiment)
            .await?
            .into_iter()
            .map(|d| d.name)
            .collect();
        Ok(counted.publish(&experiments).await?)
    }

    /// Estimates a policy's value from the decision log (off-policy evaluation).
    pub async fn evaluate_policy(
        &self,
        req: &crate::ope::service::EvaluateRequest,
    ) -> Result<crate::ope::service::PolicyEvaluation> {
        let catalog = self.catalog.items().await?;
        crate::ope::service::evaluate_log(
            self.stores.decisions.as_ref(),
            &self.models,
            &catalog,
            &self.settings.policy,
            req,
        )
        .await
    }

    /// Activates a model version (or runs it in shadow) after checking its schema against
    /// the live feature definitions.
    pub async fn activate_model(&self, version: &str, shadow: bool) -> Result<VersionInfo> {
        Ok(self
            .models
            .activate(version, shadow, self.live_features())
            .await?)
    }

    pub async fn customer(&self, id: &CustomerId) -> Result<Option<Customer>> {
        Ok(self.profiles.get(id).await?)
    }

    /// Right to be forgotten: marks the customer erased (so their events and profile
    /// updates are refused until they consent again), deletes the profile, destroys the
    /// data key (so sealed copies anywhere, backups included, are unreadable), deletes
    /// their events, feature states and segment memberships (announcing the leaves),
    /// and replaces their id on decisions and outcomes with a pseudonym (aggregate
    /// history stays; what they were shown goes). With other processes in the
    /// deployment (a shared catalog), the erasure then goes into the privacy journal,
    /// from which every process, this one included, applies it to its own stores within
    /// about a second ([`Engine::follow_privacy_journal`]). Repeatable: a second call
    /// finishes what a failed one left.
    pub async fn erase_customer(&self, id: &CustomerId) -> Result<Erasure> {
        let at = Utc::now();
        let pseudonym = format!("erased-{}", uuid::Uuid::now_v7());
        let erasure = self.erase_here(id, at, &pseudonym, Reach::Shared).await?;
        if let Some(journal) = &self.stores.journal {
            let entry = PrivacyEntry {
                customer: id.clone(),
                at,
                change: PrivacyChange::Erased { pseudonym },
            };
            journal.append(&entry).await.map_err(|e| {
                tracing::warn!(error = %e, "An erasure done here could not be announced");
                StorageError::Unavailable(format!(
                    "the customer is erased on this process, but the other processes of \
                     the deployment could not be told ({e}); call eraseCustomer again"
                ))
            })?;
        }
        Ok(erasure)
    }

    /// Erasure on this process's own stores, and with [`Reach::Shared`] on the stores
    /// every process shares too, as of `at`; decisions are pseudonymised as `pseudonym`.
    async fn erase_here(
        &self,
        id: &CustomerId,
        at: chrono::DateTime<Utc>,
        pseudonym: &str,
        reach: Reach,
    ) -> Result<Erasure> {
        let _guard = self.customer_locks.lock(id).await;
        // Under the processor's lock: no batch applies this customer's events meanwhile,
        // so nothing is re-created behind the erasure.
        let _applying = self.features.apply_lock().lock().await;
        let shared = self.stores.shared;
        // A shared store was erased by the process that took the request: erasing it
        // again from the journal could delete what the customer gave after consenting
        // again (a profile, new features), when this process catches up late.
        let everywhere = reach == Reach::Shared;
        let profile = if everywhere || !shared.profiles {
            self.profiles.forget(id, at).await?
        } else {
            false
        };
        let events = self.stores.events.delete_customer(id).await?;
        if everywhere || !shared.features {
            self.stores.features.delete_customer(id).await?;
        }
        let left = if everywhere || !shared.segments {
            self.stores.segments.remove_customer(id).await?
        } else {
            Vec::new()
        };
        self.segments.announce(&left);
        let decisions = self.stores.decisions.pseudonymise(id, pseudonym).await?;
        Ok(Erasure {
            customer_id: id.clone(),
            profile,
            events,
            segments: left.iter().map(|c| c.segment.clone()).collect(),
            decisions,
            pseudonym: (decisions > 0).then(|| pseudonym.to_owned()),
            erased_at: at,
        })
    }

    /// Applies to this process's stores the privacy journal's entries it has not applied
    /// yet, in order, recording its position after each; returns how many it applied.
    /// Every process of a deployment with a shared catalog runs it each second, so an
    /// erasure made anywhere reaches its profiles, data keys, event log and decision
    /// log, and a process started later still learns whom to refuse. Runs one at a time.
    pub async fn follow_privacy_journal(&self) -> Result<usize> {
        let Some(journal) = &self.stores.journal else {
            return Ok(0);
        };
        let _following = self.journal_follow.lock().await;
        let mut applied = 0;
        loop {
            let position = self.stores.data_keys.journal_position().await?;
            let entries = journal
                .read_after(position.as_deref(), JOURNAL_READ)
                .await?;
            if entries.is_empty() {
                return Ok(applied);
            }
            for (position, entry) in entries {
                self.apply_privacy_entry(&entry).await?;
                self.stores
                    .data_keys
                    .set_journal_position(&position)
                    .await?;
                let change = match entry.change {
                    PrivacyChange::Erased { .. } => "erased",
                    PrivacyChange::Consented => "consented",
                };
                self.metrics
                    .privacy_journal_applied
                    .add(1, &[opentelemetry::KeyValue::new("change", change)]);
                applied += 1;
            }
        }
    }

    /// Deletes the events that batches skipped because their customer was erased, for
    /// the customers still erased now: run after [`Engine::follow_privacy_journal`], so
    /// that the events of a customer who consented again meanwhile stay. Returns how many
    /// it deleted.
    pub async fn purge_skipped_erased(&self) -> Result<u64> {
        let mut ids = self.processor.take_skipped_erased().into_iter();
        let mut purged = 0;
        while let Some(id) = ids.next() {
            let deleted = async {
                let _guard = self.customer_locks.lock(&id).await;
                let _applying = self.features.apply_lock().lock().await;
                if self.profiles.erased_at(&id).await?.is_none() {
                    return Ok(0);
                }
                self.stores.events.delete_customer(&id).await
            }
            .await;
            match deleted {
                Ok(n) => purged += n,
                Err(e) => {
                    self.processor
                        .keep_skipped_erased(std::iter::once(id).chain(ids));
                    return Err(e.into());
                }
            }
        }
        Ok(purged)
    }

    async fn apply_privacy_entry(&self, entry: &PrivacyEntry) -> Result<()> {
        let id = &entry.customer;
        match &entry.change {
            PrivacyChange::Erased { pseudonym } => {
                let erasure = self.erase_here(id, entry.at, pseudonym, Reach::Own).await?;
                if erasure.profile || erasure.events > 0 || erasure.decisions > 0 {
                    tracing::info!(
                        events = erasure.events,
                        decisions = erasure.decisions,
                        "Applied an erasure from the privacy journal"
                    );
                }
            }
            // The process that took the consent cleared the shared marker itself.
            PrivacyChange::Consented if self.stores.shared.profiles => {}
            PrivacyChange::Consented => {
                let _guard = self.customer_locks.lock(id).await;
                // A later erasure made here (and not yet in the journal) stays.
                if self
                    .profiles
                    .erased_at(id)
                    .await?
                    .is_some_and(|erased| erased <= entry.at)
                {
                    self.profiles.clear_erased(id).await?;
                }
            }
        }
        Ok(())
    }

    /// Right of access: everything held about the customer, PII decrypted — profile,
    /// traits, consent, events, feature values, segments, decisions with their
    /// outcomes — as one JSON document. Fails rather than answer with a part missing
    /// (a feature backend that cannot be read is an error, not defaults).
    pub async fn export_customer(&self, id: &CustomerId) -> Result<serde_json::Value> {
        let profile = self.profiles.get(id).await?;
        let events = self
            .stores
            .events
            .customer_events(id, chrono::DateTime::<Utc>::MIN_UTC)
            .await?;
        let features = self.features.read(id, None, "names", Utc::now()).await?;
        if features.degraded {
            return Err(Error::Internal(anyhow::anyhow!(
                "the feature backend did not answer in time; export not complete"
            )));
        }
        let segments = self.stores.segments.segments_of(id).await?;
        let decisions = self.stores.decisions.customer_decisions(id).await?;
        let erased_at = self.profiles.erased_at(id).await?;
        Ok(serde_json::json!({
            "customerId": id,
            "exportedAt": Utc::now(),
            "erasedAt": erased_at,
            "profile": profile.map(|c| serde_json::json!({
                "id": c.id,
                "email": c.pii.email,
                "phone": c.pii.phone,
                "name": c.pii.name,
                "traits": c.traits,
                "consent": c.consent,
                "createdAt": c.created_at,
                "updatedAt": c.updated_at,
            })),
            "events": events.into_iter().map(|e| e.event).collect::<Vec<_>>(),
            "features": features.values,
            "segments": segments,
            "decisions": decisions
                .into_iter()
                .map(|(decision, outcomes)| serde_json::json!({
                    "decision": decision,
                    "outcomes": outcomes,
                }))
                .collect::<Vec<_>>(),
        }))
    }

    pub async fn upsert_content(&self, item: ContentItem) -> Result<ContentItem> {
        item.validate("input")?;
        self.catalog.upsert(&item).await?;
        Ok(item)
    }

    pub async fn delete_content(&self, id: &str) -> Result<bool> {
        Ok(self.catalog.delete(id).await?)
    }

    /// Catalog items for a segment (items targeting it or everyone) and type, best
    /// priority first.
    pub async fn content(
        &self,
        segment: Option<&str>,
        content_type: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ContentItem>> {
        let now = Utc::now();
        let mut items: Vec<ContentItem> = self
            .catalog
            .items()
            .await?
            .iter()
            .filter(|i| i.is_active(now))
            .filter(|i| segment.is_none_or(|s| i.targets_segment(s)))
            .filter(|i| content_type.is_none_or(|t| i.content_type == t))
            .map(|i| ContentItem::clone(i))
            .collect();
        items.sort_by(|a, b| b.priority.cmp(&a.priority).then_with(|| a.id.cmp(&b.id)));
        items.truncate(limit);
        Ok(items)
    }
}

/// Adds the models' online rewards to the shared totals, and publishes this process's
/// experiment totals to a shared catalog, every second and once more at shutdown (then
/// also flushing the bandit statistics), so that no counted decision is lost to a stop.
fn online_rewards(
    engine: Arc<Engine>,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        loop {
            let stopping = tokio::select! {
                _ = tick.tick() => false,
                _ = shutdown.changed() => true,
            };
            if let Err(e) = engine
                .models
                .flush_online_rewards(engine.stores.bandit.as_ref())
                .await
            {
                tracing::warn!(error = %e, "Cannot store the models' online rewards; retrying");
            }
            if let Err(e) = engine.publish_experiment_totals().await {
                tracing::warn!(error = %e, "Cannot publish the experiment totals counted here; retrying");
            }
            if stopping {
                if let Err(e) = engine.stores.bandit.flush().await {
                    tracing::warn!(error = %e, "Bandit statistics not written before the stop are lost");
                }
                return;
            }
        }
    })
}

/// Keeps this process current with a shared catalog every [`CATALOG_TTL`] until
/// `shutdown`, then saves the local copy once more. Content and experiments, which only
/// decisions read, are read when the process `decides`.
fn shared_catalog(
    engine: Arc<Engine>,
    decides: bool,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CATALOG_TTL);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => {
                    engine.save_catalog_copy().await;
                    return;
                }
            }
            if let Err(e) = engine.features.refresh().await {
                tracing::warn!(error = %e, "Failed to reload feature definitions");
            }
            if let Err(e) = engine.segments.reload().await {
                tracing::warn!(error = %e, "Failed to reload segment definitions");
            }
            if decides {
                // Their failures show where they are read (a decision's candidates, its
                // experiments); here they only keep the copy of the catalog current.
                let _ = engine.catalog.items().await;
                let _ = engine.experiments.running().await;
            }
            engine.save_catalog_copy().await;
        }
    })
}

/// Runs `task` every `period` (first after one period) until `shutdown`.
fn every<F, Fut>(
    period: Duration,
    mut shutdown: watch::Receiver<bool>,
    task: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => task().await,
                _ = shutdown.changed() => return,
            }
        }
    })
}

/// How long a stopping engine waits for its producer to deliver what it holds.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// The running background tasks of one role.
pub struct Background {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    stream: Option<Arc<dyn EventStream>>,
}

impl Background {
    /// Every task, as [`Role::All`].
    pub fn start(engine: &Arc<Engine>) -> Self {
        Self::start_role(engine, Role::All)
    }

    pub fn start_role(engine: &Arc<Engine>, role: Role) -> Self {
        let (stop, rx) = watch::channel(false);
        Background {
            tasks: engine.spawn_role(role, rx),
            stop,
            stream: engine.stream.clone(),
        }
    }

    /// Signals every task, waits for it to finish its current step, then flushes the
    /// event stream's producer (what it cannot deliver stays in the outboxes).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        if let Some(stream) = self.stream {
            stream.flush(FLUSH_TIMEOUT).await;
        }
    }
}

fn warn_if_auth_off(engine: &Engine) {
    if !engine.settings.auth.enabled {
        tracing::warn!(
            "Authentication is switched off (auth.enabled = false): every request acts as admin"
        );
    }
}

/// Serves the API on `listener` until `shutdown` resolves. The background tasks must
/// be running (see [`Background`]).
pub async fn serve_http(
    engine: Arc<Engine>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    warn_if_auth_off(&engine);
    let router = crate::api::router(engine);
    tracing::info!(addr = %listener.local_addr()?, "Tailor is listening");
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

/// Serves what `role` answers on `listener` until `shutdown` resolves: the whole API, or
/// for a worker only `/metrics`, `/healthz` and `/readyz`. The background tasks must be
/// running (see [`Background::start_role`]).
pub async fn serve_role(
    engine: Arc<Engine>,
    role: Role,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let router = match role {
        Role::Worker => crate::api::ops_router(engine),
        Role::Api | Role::All => {
            warn_if_auth_off(&engine);
            crate::api::router(engine)
        }
    };
    tracing::info!(addr = %listener.local_addr()?, ?role, "Tailor is listening");
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

/// Starts the background tasks, serves until `shutdown`, then stops them.
pub async fn serve(
    engine: Arc<Engine>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let background = Background::start(&engine);
    let served = serve_http(engine, listener, shutdown).await;
    background.stop().await;
    served
}
