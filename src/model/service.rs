//! [`ModelService`]: the registry and the scorer of one engine, and the operations the
//! API, the CLI and the demo call (train, list, activate, shadow, rollback).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;
use chrono::Utc;

use super::dataset::Dataset;
use super::registry::{Manifest, Registry};
use super::serving::{Scorer, ScorerSettings};
use super::train::{self, Progress, TrainParams};
use super::{ModelError, ModelResult};
use crate::bandit::ArmStats;
use crate::config::{ModelConfig, ModelDevice};
use crate::content::ContentItem;
use crate::storage::{BanditStore, DecisionStore};

/// The bandit-store placement under which online rewards are totalled, one arm per model
/// version (`trials` = decisions). A placement name no catalog uses: it holds a colon and
/// spaces are not what placements are named with, and the bandit never reads it.
pub const ONLINE_REWARD_PLACEMENT: &str = "model versions: online reward";

/// Where training examples come from.
#[derive(Debug, Clone, PartialEq)]
pub enum TrainingSource {
    /// Tailor's own decision log.
    DecisionLog,
    /// Logged decisions from another system (the JSONL format of [`super::dataset`]).
    Jsonl(PathBuf),
}

/// One version as listed.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionInfo {
    pub manifest: Manifest,
    pub active: bool,
    pub shadow: bool,
}

pub struct ModelService {
    registry: Arc<Registry>,
    scorer: Scorer,
    attribution_window: chrono::Duration,
    device: Device,
    /// One training at a time; a tokio mutex because it is held across the training await.
    training: tokio::sync::Mutex<()>,
}

pub fn device_of(device: ModelDevice) -> ModelResult<Device> {
    match device {
        ModelDevice::Cpu => Ok(Device::Cpu),
        ModelDevice::Cuda => Device::new_cuda(0).map_err(|e| {
            ModelError::invalid(
                "model.device",
                format!("\"cuda\" is not available ({e}); build with `--features cuda` on a machine with an NVIDIA GPU, or use \"cpu\""),
            )
        }),
    }
}

impl ModelService {
    /// The registry of `data_dir` and a scorer serving its active (and shadow) version.
    /// A version that cannot be loaded is logged and left out (the policy runs alone).
    pub fn open(data_dir: &Path, config: &ModelConfig) -> ModelResult<Arc<ModelService>> {
        let device = device_of(config.device)?;
        let registry = Arc::new(Registry::new(data_dir));
        let scorer = Scorer::start(
            ScorerSettings {
                batch_wait: Duration::from_micros(config.batch_wait_us),
                max_batch: config.max_batch.max(1),
                min_decisions: config.min_decisions,
                margin: config.margin,
            },
            Some(registry.clone()),
            device.clone(),
        )?;
        let service = ModelService {
            registry,
            scorer,
            attribution_window: chrono::Duration::seconds(
                i64::try_from(config.attribution_window_secs).unwrap_or(i64::MAX / 1_000),
            ),
            device,
            training: tokio::sync::Mutex::new(()),
        };
        service.load_pointers();
        Ok(Arc::new(service))
    }

    fn load_pointers(&self) {
        let state = match self.registry.state() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "Cannot read the model registry; no model serves");
                return;
            }
        };
        if let Some(v) = &state.active {
            match self.registry.load(v, &self.device) {
                Ok(m) => self
                    .scorer
                    .set_active(Some(m), state.predecessor().map(str::to_owned)),
                Err(e) => tracing::error!(version = v, error = %e, "Cannot load the active model"),
            }
        }
        if let Some(v) = &state.shadow {
            match self.registry.load(v, &self.device) {
                Ok(m) => self.scorer.set_shadow(Some(m)),
                Err(e) => tracing::error!(version = v, error = %e, "Cannot load the shadow model"),
            }
        }
    }

    /// Adds what the scorer counted since the last flush to the totals in `store` (one
    /// atomic add per version, so replicas' counts merge), then reads back the totals of
    /// the versions compared for automatic rollback. What cannot be stored stays pending
    /// for the next flush (a failed add that did reach the store counts twice: the
    /// rollback comparison tolerates that, no decision depends on it).
    pub async fn flush_online_rewards(
        &self,
        store: &dyn BanditStore,
    ) -> crate::storage::StorageResult<()> {
        let pending = self.scorer.pending_rewards();
        for (version, reward) in pending {
            let delta = ArmStats {
                trials: reward.decisions as f64,
                reward: reward.reward,
            };
            store.add(ONLINE_REWARD_PLACEMENT, &version, delta).await?;
            self.scorer.mark_added(&version, reward);
        }
        self.load_online_rewards(store).await
    }

    /// Reads the stored totals of the versions compared for automatic rollback.
    pub async fn load_online_rewards(
        &self,
        store: &dyn BanditStore,
    ) -> crate::storage::StorageResult<()> {
        let versions = self.scorer.compared_versions();
        if versions.is_empty() {
            return Ok(());
        }
        let totals = store.get(ONLINE_REWARD_PLACEMENT, &versions).await?;
        self.scorer
            .set_stored(versions.into_iter().zip(totals).map(|(v, t)| {
                (
                    v,
                    super::serving::OnlineReward {
                        decisions: t.trials.max(0.0) as u64,
                        reward: t.reward,
                    },
                )
            }));
        Ok(())
    }

    pub fn scorer(&self) -> &Scorer {
        &self.scorer
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn attribution_window(&self) -> chrono::Duration {
        self.attribution_window
    }

    /// Labelled examples from `source`; JSONL items given by id are looked up in `catalog`.
    pub async fn dataset(
        &self,
        source: &TrainingSource,
        decisions: &dyn DecisionStore,
        catalog: &[Arc<ContentItem>],
    ) -> ModelResult<Dataset> {
        let now = Utc::now();
        match source {
            TrainingSource::DecisionLog => {
                Dataset::from_store(decisions, self.attribution_window, now).await
            }
            TrainingSource::Jsonl(path) => {
                let path = path.clone();
                let by_id: HashMap<String, Arc<ContentItem>> =
                    catalog.iter().map(|i| (i.id.clone(), i.clone())).collect();
                let window = self.attribution_window;
                tokio::task::spawn_blocking(move || {
                    let file = std::fs::File::open(&path).map_err(|e| {
                        ModelError::invalid("fromJsonl", format!("{}: {e}", path.display()))
                    })?;
                    Dataset::from_jsonl(std::io::BufReader::new(file), &by_id, window, now)
                })
                .await
                .map_err(|e| ModelError::Compute(format!("the import task failed: {e}")))?
            }
        }
    }

    /// Trains a new version on `data` off the async executor and stores it (not
    /// activated). `progress` is called from the training thread.
    pub async fn train(
        &self,
        data: Dataset,
        params: TrainParams,
        mut progress: impl FnMut(Progress) + Send + 'static,
    ) -> ModelResult<Manifest> {
        params.validate()?;
        let _one_at_a_time = self.training.lock().await;
        let registry = self.registry.clone();
        let device = self.device.clone();
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let trained = train::train(&data, &params, &device, &mut progress)?;
            let seconds = started.elapsed().as_secs_f64();
            let manifest = registry.save(&trained, &params, Utc::now(), seconds)?;
            tracing::info!(
                version = manifest.version,
                auc = manifest.report.metrics.auc,
                log_loss = manifest.report.metrics.log_loss,
                examples = manifest.report.data.examples,
                seconds,
                "Trained a model"
            );
            Ok(manifest)
        })
        .await
        .map_err(|e| ModelError::Compute(format!("the training task failed: {e}")))?
    }

    /// Every version, oldest first, with its pointers.
    pub fn versions(&self) -> ModelResult<Vec<VersionInfo>> {
        let state = self.registry.state()?;
        Ok(self
            .registry
            .manifests()?
            .into_iter()
            .map(|m| VersionInfo {
                active: state.active.as_deref() == Some(m.version.as_str()),
                shadow: state.shadow.as_deref() == Some(m.version.as_str()),
                manifest: m,
            })
            .collect())
    }

    fn info(&self, version: &str) -> ModelResult<VersionInfo> {
        self.versions()?
            .into_iter()
            .find(|v| v.manifest.version == version)
            .ok_or_else(|| ModelError::UnknownVersion(version.to_owned()))
    }

    /// Activates `version` (or runs it in shadow) once its schema reads only `live`
    /// features; the scorer swaps it in without failing a request.
    pub async fn activate(
        &self,
        version: &str,
        shadow: bool,
        live: BTreeSet<String>,
    ) -> ModelResult<VersionInfo> {
        let version = version.to_owned();
        let registry = self.registry.clone();
        let device = self.device.clone();
        let (model, state) = tokio::task::spawn_blocking(move || {
            let model = registry.load(&version, &device)?;
            let live = |n: &str| live.contains(n);
            let state = if shadow {
                registry.set_shadow(Some(&version), &live, "requested")?
            } else {
                registry.activate(&version, &live, "requested")?
            };
            Ok::<_, ModelError>((model, state))
        })
        .await
        .map_err(|e| ModelError::Compute(format!("the activation task failed: {e}")))??;
        let version = model.version().to_owned();
        if shadow {
            self.scorer.set_shadow(Some(model));
        } else {
            if self.scorer.active_version().as_deref() != Some(version.as_str()) {
                self.scorer
                    .set_active(Some(model), state.predecessor().map(str::to_owned));
            }
            if state.shadow.is_none() {
                self.scorer.set_shadow(None);
            }
        }
        self.info(&version)
    }

    /// Returns to the version the active one replaced.
    pub async fn rollback(&self, reason: &str) -> ModelResult<VersionInfo> {
        let registry = self.registry.clone();
        let device = self.device.clone();
        let reason = reason.to_owned();
        let (model, state) = tokio::task::spawn_blocking(move || {
            let state = registry.rollback(&reason)?;
            let version = state.active.clone().ok_or(ModelError::NothingToRollBack)?;
            Ok::<_, ModelError>((registry.load(&version, &device)?, state))
        })
        .await
        .map_err(|e| ModelError::Compute(format!("the rollback task failed: {e}")))??;
        let version = model.version().to_owned();
        self.scorer
            .set_active(Some(model), state.predecessor().map(str::to_owned));
        if state.shadow.is_none() {
            self.scorer.set_shadow(None);
        }
        self.info(&version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::registry::tests::registry_with;
    use crate::model::serving::OnlineReward;
    use crate::storage::embedded::EmbeddedStore;

    fn live(_: &str) -> bool {
        true
    }

    /// Two replicas over one bandit store: each counted too few decisions to judge the
    /// new version alone, together they did, and the one that reads the merged totals
    /// rolls back; a restarted replica starts from the stored totals, not from zero.
    #[tokio::test]
    async fn online_rewards_are_shared_by_replicas_and_kept_across_restarts() {
        let (dir, registry) = registry_with(2);
        registry.activate("v1", &live, "first").unwrap();
        registry.activate("v2", &live, "second").unwrap();
        drop(registry);
        let store_dir = tempfile::tempdir().unwrap();
        let stores = EmbeddedStore::open(store_dir.path()).unwrap().stores();
        let bandit = stores.bandit.as_ref();
        // v1 earned 0.30 per decision over 100 decisions while it served.
        bandit
            .add(
                ONLINE_REWARD_PLACEMENT,
                "v1",
                ArmStats {
                    trials: 100.0,
                    reward: 30.0,
                },
            )
            .await
            .unwrap();
        let config = ModelConfig {
            min_decisions: 50,
            margin: 0.05,
            ..ModelConfig::default()
        };
        let a = ModelService::open(dir.path(), &config).unwrap();
        let b = ModelService::open(dir.path(), &config).unwrap();
        for service in [&a, &b] {
            service.load_online_rewards(bandit).await.unwrap();
            assert_eq!(service.scorer().online_reward("v1").decisions, 100);
            // 30 decisions each with v2, none rewarded: below min_decisions alone.
            for _ in 0..30 {
                service.scorer().record_decision("v2");
            }
        }
        a.flush_online_rewards(bandit).await.unwrap();
        a.scorer().flush().await.unwrap();
        assert_eq!(a.scorer().active_version().as_deref(), Some("v2"));
        assert_eq!(a.scorer().online_reward("v2").decisions, 30);
        // b adds its 30 and reads 60: enough, and 0.0 < 0.30 − 0.05.
        b.flush_online_rewards(bandit).await.unwrap();
        b.scorer().flush().await.unwrap();
        assert_eq!(b.scorer().active_version().as_deref(), Some("v1"));
        let totals = bandit
            .get(ONLINE_REWARD_PLACEMENT, &["v1".into(), "v2".into()])
            .await
            .unwrap();
        assert_eq!(totals[0].trials, 100.0);
        assert_eq!(totals[1].trials, 60.0);
        // Flushing twice adds nothing twice.
        a.flush_online_rewards(bandit).await.unwrap();
        let again = bandit
            .get(ONLINE_REWARD_PLACEMENT, &["v2".into()])
            .await
            .unwrap();
        assert_eq!(again[0].trials, 60.0);
    }

    /// Reads `service`'s online reward of `v1` whenever the flush adds to the store.
    struct Watching {
        inner: Arc<dyn BanditStore>,
        service: Arc<ModelService>,
        seen: std::sync::Mutex<Vec<OnlineReward>>,
    }

    #[async_trait::async_trait]
    impl BanditStore for Watching {
        async fn add(
            &self,
            placement: &str,
            arm: &str,
            delta: ArmStats,
        ) -> crate::storage::StorageResult<()> {
            self.seen
                .lock()
                .unwrap()
                .push(self.service.scorer().online_reward("v1"));
            self.inner.add(placement, arm, delta).await?;
            self.seen
                .lock()
                .unwrap()
                .push(self.service.scorer().online_reward("v1"));
            Ok(())
        }
        async fn get(
            &self,
            placement: &str,
            arms: &[String],
        ) -> crate::storage::StorageResult<Vec<ArmStats>> {
            self.inner.get(placement, arms).await
        }
        async fn add_linear(
            &self,
            placement: &str,
            arm: &str,
            delta: &crate::bandit::linear::LinearStats,
        ) -> crate::storage::StorageResult<()> {
            self.inner.add_linear(placement, arm, delta).await
        }
        async fn get_linear(
            &self,
            placement: &str,
            arms: &[String],
            dims: usize,
        ) -> crate::storage::StorageResult<Vec<crate::bandit::linear::LinearStats>> {
            self.inner.get_linear(placement, arms, dims).await
        }
    }

    /// A flush never hides what it is storing: the online reward a reader sees while
    /// the addition is under way, and after it, is the whole count.
    #[tokio::test]
    async fn online_rewards_stay_whole_while_they_are_flushed() {
        let (dir, registry) = registry_with(1);
        registry.activate("v1", &live, "first").unwrap();
        drop(registry);
        let store_dir = tempfile::tempdir().unwrap();
        let stores = EmbeddedStore::open(store_dir.path()).unwrap().stores();
        let service = ModelService::open(dir.path(), &ModelConfig::default()).unwrap();
        let watching = Watching {
            inner: stores.bandit.clone(),
            service: service.clone(),
            seen: Default::default(),
        };
        service.scorer().record_decision("v1");
        service.scorer().record_reward("v1", 1.0);
        let whole = OnlineReward {
            decisions: 1,
            reward: 1.0,
        };
        service.flush_online_rewards(&watching).await.unwrap();
        assert_eq!(*watching.seen.lock().unwrap(), vec![whole, whole]);
        assert_eq!(service.scorer().online_reward("v1"), whole);
        // Counted while the earlier count was added: both, once each, after the next.
        service.scorer().record_decision("v1");
        service.flush_online_rewards(&watching).await.unwrap();
        let both = OnlineReward {
            decisions: 2,
            reward: 1.0,
        };
        assert_eq!(service.scorer().online_reward("v1"), both);
        let stored = stores
            .bandit
            .get(ONLINE_REWARD_PLACEMENT, &["v1".into()])
            .await
            .unwrap();
        assert_eq!((stored[0].trials, stored[0].reward), (2.0, 1.0));
    }
}
