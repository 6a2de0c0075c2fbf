//! Serving: the [`Scorer`] scores every candidate of a request with the active version,
//! in one forward pass on a dedicated thread (never on the async executor), and merges
//! concurrent requests into one pass (a micro-batcher with a bounded wait).
//!
//! - **Micro-batching**: the scorer thread takes the first waiting request, then gathers
//!   more for at most `batch_wait` or until `max_batch` candidates, encodes them all
//!   and runs one forward pass per model.
//! - **Hot swap**: the active and shadow versions sit in `ArcSwapOption`s; a batch holds
//!   the version it started with, so a swap never fails a request.
//! - **Shadow**: a shadow version scores the same batch; its scores are returned beside
//!   the active ones (for logging) and never serve. A failing shadow only loses its scores.
//! - **Automatic rollback**: when the active version fails at inference, the registry
//!   rolls back to its predecessor, which scores the same batch. When its online reward
//!   (mean reward per decision) over at least `min_decisions` falls below the
//!   predecessor's by more than `margin`, the scorer rolls back too. The pipeline reports
//!   decisions and rewards through [`Scorer::record_decision`] and
//!   [`Scorer::record_reward`]; [`ModelService`](super::service::ModelService) adds them
//!   to totals in the bandit store (shared by replicas, kept across restarts) every
//!   second and reads the totals back, so the comparison counts every replica.

use std::collections::{BTreeMap, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use candle_core::Device;
use serde::Serialize;
use tokio::sync::oneshot;

use super::net::Net;
use super::registry::{Manifest, Registry};
use super::schema::{EncodedBatch, ScoreContext};
use super::{ModelError, ModelResult};
use crate::content::ContentItem;

/// One version's weights and manifest, ready to score.
pub struct LoadedModel {
    manifest: Arc<Manifest>,
    net: Net,
}

/// What one request asks to score.
#[derive(Debug, Clone)]
pub struct ScoreRequest {
    /// The customer's feature values (as the decision will store them).
    pub features: Arc<BTreeMap<String, f64>>,
    pub items: Vec<Arc<ContentItem>>,
    pub context: ScoreContext,
    /// Score with this saved version instead of the active one (an experiment variant's
    /// model). When it cannot be loaded or fails, the active version scores instead;
    /// [`Scores::version`] says which one did.
    pub version: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShadowScores {
    pub version: String,
    pub scores: Vec<f32>,
}

/// Probabilities of a positive outcome, one per candidate in request order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scores {
    pub version: String,
    pub scores: Vec<f32>,
    pub shadow: Option<ShadowScores>,
}

impl LoadedModel {
    pub fn new(manifest: Manifest, net: Net) -> Self {
        LoadedModel {
            manifest: Arc::new(manifest),
            net,
        }
    }

    pub fn version(&self) -> &str {
        &self.manifest.version
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn net(&self) -> &Net {
        &self.net
    }

    /// Scores one request in one forward pass, on the calling thread.
    pub fn score(&self, request: &ScoreRequest) -> ModelResult<Vec<f32>> {
        Ok(self.score_batch(&[request])?.pop().unwrap_or_default())
    }

    /// Scores several requests in one forward pass; one score list per request.
    pub fn score_batch(&self, requests: &[&ScoreRequest]) -> ModelResult<Vec<Vec<f32>>> {
        let schema = &self.manifest.schema;
        let total: usize = requests.iter().map(|r| r.items.len()).sum();
        let mut batch = EncodedBatch {
            rows: Vec::with_capacity(total * schema.width()),
            items: Vec::with_capacity(total),
        };
        for r in requests {
            schema.encode_request(&r.features, &r.items, &r.context, &mut batch);
        }
        let scores = self.net.score(&batch)?;
        let mut out = Vec::with_capacity(requests.len());
        let mut at = 0;
        for r in requests {
            out.push(scores[at..at + r.items.len()].to_vec());
            at += r.items.len();
        }
        Ok(out)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ScorerSettings {
    /// Longest a request waits for others to join its batch (0: only those already queued).
    pub batch_wait: Duration,
    /// Most candidates in one forward pass (a single larger request still runs alone).
    pub max_batch: usize,
    /// Decisions each of the active version and its predecessor needs before their
    /// online rewards are compared.
    pub min_decisions: u64,
    /// Roll back when the active version's mean reward is below its predecessor's by more
    /// than this.
    pub margin: f64,
}

impl Default for ScorerSettings {
    fn default() -> Self {
        ScorerSettings {
            batch_wait: Duration::from_micros(200),
            max_batch: 2_048,
            min_decisions: 1_000,
            margin: 0.02,
        }
    }
}

/// Decisions made with one version and the rewards they earned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct OnlineReward {
    pub decisions: u64,
    pub reward: f64,
}

impl OnlineReward {
    pub fn mean(&self) -> f64 {
        if self.decisions == 0 {
            0.0
        } else {
            self.reward / self.decisions as f64
        }
    }
}

impl std::ops::Add for OnlineReward {
    type Output = OnlineReward;

    fn add(self, other: OnlineReward) -> OnlineReward {
        OnlineReward {
            decisions: self.decisions + other.decisions,
            reward: self.reward + other.reward,
        }
    }
}

impl std::ops::Sub for OnlineReward {
    type Output = OnlineReward;

    fn sub(self, other: OnlineReward) -> OnlineReward {
        OnlineReward {
            decisions: self.decisions.saturating_sub(other.decisions),
            reward: self.reward - other.reward,
        }
    }
}

/// Online rewards per version: the totals last read from the shared store (every
/// replica's, across restarts), what this process added to the store since that read,
/// and what it counted and has not added yet. Counts move from `pending` to `added` in
/// one step, and leave `added` only when totals read after the addition replace
/// `stored`, so a flush never hides what it is storing.
#[derive(Debug, Default)]
struct RewardBook {
    stored: HashMap<String, OnlineReward>,
    added: HashMap<String, OnlineReward>,
    pending: HashMap<String, OnlineReward>,
}

impl RewardBook {
    fn get(&self, version: &str) -> OnlineReward {
        let of =
            |book: &HashMap<String, OnlineReward>| book.get(version).copied().unwrap_or_default();
        of(&self.stored) + of(&self.added) + of(&self.pending)
    }
}

/// Counters of the batcher.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ScorerStats {
    pub requests: u64,
    pub batches: u64,
    pub failures: u64,
    pub rollbacks: u64,
}

enum Job {
    Score {
        request: ScoreRequest,
        reply: oneshot::Sender<ModelResult<Option<Scores>>>,
    },
    Rollback {
        reason: String,
    },
    /// Answered once every job sent before it is done.
    Barrier(oneshot::Sender<()>),
}

struct Shared {
    active: ArcSwapOption<LoadedModel>,
    shadow: ArcSwapOption<LoadedModel>,
    /// The version the active one replaced (what reward comparisons and rollback use).
    predecessor: ArcSwapOption<String>,
    registry: Option<Arc<Registry>>,
    /// Versions experiment variants asked for, loaded on first use (a saved version never
    /// changes). Only the scorer thread touches it.
    variants: parking_lot::Mutex<HashMap<String, Arc<LoadedModel>>>,
    device: Device,
    settings: ScorerSettings,
    /// A std mutex: held for a counter update, never across an await.
    rewards: parking_lot::Mutex<RewardBook>,
    rollback_pending: AtomicBool,
    requests: AtomicU64,
    batches: AtomicU64,
    failures: AtomicU64,
    rollbacks: AtomicU64,
}

pub struct Scorer {
    shared: Arc<Shared>,
    jobs: mpsc::Sender<Job>,
}

impl Scorer {
    /// Starts the scorer thread. `registry` is what automatic rollback goes through
    /// (`None`: no automatic rollback).
    pub fn start(
        settings: ScorerSettings,
        registry: Option<Arc<Registry>>,
        device: Device,
    ) -> ModelResult<Scorer> {
        let shared = Arc::new(Shared {
            active: ArcSwapOption::empty(),
            shadow: ArcSwapOption::empty(),
            predecessor: ArcSwapOption::empty(),
            registry,
            variants: parking_lot::Mutex::new(HashMap::new()),
            device,
            settings,
            rewards: parking_lot::Mutex::new(RewardBook::default()),
            rollback_pending: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            rollbacks: AtomicU64::new(0),
        });
        let (jobs, rx) = mpsc::channel();
        let worker = shared.clone();
        std::thread::Builder::new()
            .name("tailor-scorer".into())
            .spawn(move || worker.run(rx))
            .map_err(|e| ModelError::Compute(format!("cannot start the scorer thread: {e}")))?;
        Ok(Scorer { shared, jobs })
    }

    /// Replaces the active version (`None`: cold start) and says which version it replaced.
    /// Requests in flight finish with the version they started with.
    pub fn set_active(&self, model: Option<LoadedModel>, predecessor: Option<String>) {
        self.shared.active.store(model.map(Arc::new));
        self.shared.predecessor.store(predecessor.map(Arc::new));
        self.shared.rollback_pending.store(false, Ordering::SeqCst);
    }

    pub fn set_shadow(&self, model: Option<LoadedModel>) {
        self.shared.shadow.store(model.map(Arc::new));
    }

    /// Whether a version is active (cheaper than [`Self::active_version`]).
    pub fn has_active(&self) -> bool {
        self.shared.active.load().is_some()
    }

    pub fn active_version(&self) -> Option<String> {
        self.shared
            .active
            .load()
            .as_ref()
            .map(|m| m.version().to_owned())
    }

    pub fn shadow_version(&self) -> Option<String> {
        self.shared
            .shadow
            .load()
            .as_ref()
            .map(|m| m.version().to_owned())
    }

    pub fn device(&self) -> &Device {
        &self.shared.device
    }

    /// Scores every candidate of the request with the active version (and the shadow);
    /// `Ok(None)` when no version is active. Never blocks the executor.
    pub async fn score(&self, request: ScoreRequest) -> ModelResult<Option<Scores>> {
        if !self.has_active() && request.version.is_none() {
            return Ok(None);
        }
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job::Score { request, reply })
            .map_err(|_| ModelError::Stopped)?;
        answer.await.map_err(|_| ModelError::Stopped)?
    }

    /// Waits until every request and rollback sent before this call is done.
    pub async fn flush(&self) -> ModelResult<()> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Job::Barrier(tx))
            .map_err(|_| ModelError::Stopped)?;
        rx.await.map_err(|_| ModelError::Stopped)
    }

    /// A decision was made with `version`'s scores.
    pub fn record_decision(&self, version: &str) {
        self.shared
            .rewards
            .lock()
            .pending
            .entry(version.to_owned())
            .or_default()
            .decisions += 1;
        self.check_reward();
    }

    /// A decision made with `version` earned `reward`.
    pub fn record_reward(&self, version: &str, reward: f64) {
        if reward.is_finite() {
            self.shared
                .rewards
                .lock()
                .pending
                .entry(version.to_owned())
                .or_default()
                .reward += reward;
            self.check_reward();
        }
    }

    /// `version`'s decisions and rewards: the stored totals and this process's since.
    pub fn online_reward(&self, version: &str) -> OnlineReward {
        self.shared.rewards.lock().get(version)
    }

    /// What this process counted and has not added to the shared totals yet, per
    /// version. Counted until [`Self::mark_added`] says it was added.
    pub fn pending_rewards(&self) -> HashMap<String, OnlineReward> {
        self.shared.rewards.lock().pending.clone()
    }

    /// `reward`, taken from [`Self::pending_rewards`], was added to `version`'s shared
    /// total: it is counted as added until totals read since replace the stored ones.
    pub fn mark_added(&self, version: &str, reward: OnlineReward) {
        let mut book = self.shared.rewards.lock();
        if let Some(pending) = book.pending.get_mut(version) {
            *pending = *pending - reward;
            if pending.decisions == 0 && pending.reward.abs() < 1e-9 {
                book.pending.remove(version);
            }
        }
        *book.added.entry(version.to_owned()).or_default() =
            book.added.get(version).copied().unwrap_or_default() + reward;
    }

    /// Replaces the stored totals of the versions given, read from the shared store
    /// after every addition [`Self::mark_added`] was told of: they hold those.
    pub fn set_stored(&self, totals: impl IntoIterator<Item = (String, OnlineReward)>) {
        let mut book = self.shared.rewards.lock();
        for (version, reward) in totals {
            book.added.remove(&version);
            book.stored.insert(version, reward);
        }
        drop(book);
        self.check_reward();
    }

    /// The active version and the one it replaced (whose rewards are compared).
    pub fn compared_versions(&self) -> Vec<String> {
        let s = &self.shared;
        let mut versions = Vec::new();
        if let Some(active) = s.active.load().as_ref() {
            versions.push(active.version().to_owned());
        }
        if let Some(previous) = s.predecessor.load().as_ref() {
            versions.push(previous.as_str().to_owned());
        }
        versions
    }

    pub fn stats(&self) -> ScorerStats {
        let s = &self.shared;
        ScorerStats {
            requests: s.requests.load(Ordering::Relaxed),
            batches: s.batches.load(Ordering::Relaxed),
            failures: s.failures.load(Ordering::Relaxed),
            rollbacks: s.rollbacks.load(Ordering::Relaxed),
        }
    }

    /// Asks the scorer thread to roll back when the active version's reward has fallen
    /// below its predecessor's by more than the margin.
    fn check_reward(&self) {
        let s = &self.shared;
        let (Some(active), Some(previous)) = (s.active.load_full(), s.predecessor.load_full())
        else {
            return;
        };
        let (now, before) = {
            let rewards = s.rewards.lock();
            (
                rewards.get(active.version()),
                rewards.get(previous.as_str()),
            )
        };
        let enough = now.decisions >= s.settings.min_decisions
            && before.decisions >= s.settings.min_decisions;
        if enough
            && now.mean() < before.mean() - s.settings.margin
            && !s.rollback_pending.swap(true, Ordering::SeqCst)
        {
            let reason = format!(
                "online reward {:.4} over {} decisions is below {previous}'s {:.4} over {} by more than {}",
                now.mean(),
                now.decisions,
                before.mean(),
                before.decisions,
                s.settings.margin
            );
            let _ = self.jobs.send(Job::Rollback { reason });
        }
    }
}

impl Shared {
    fn run(&self, rx: mpsc::Receiver<Job>) {
        while let Ok(first) = rx.recv() {
            let mut jobs = vec![first];
            let mut candidates = candidates_of(&jobs[0]);
            let deadline = Instant::now() + self.settings.batch_wait;
            while candidates < self.settings.max_batch {
                let next = match deadline.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => rx.recv_timeout(left).ok(),
                    _ => rx.try_recv().ok(),
                };
                let Some(job) = next else { break };
                candidates += candidates_of(&job);
                jobs.push(job);
            }
            self.process(jobs);
        }
    }

    fn process(&self, jobs: Vec<Job>) {
        let mut requests = Vec::new();
        let mut replies = Vec::new();
        let mut after = Vec::new();
        for job in jobs {
            match job {
                Job::Score { request, reply } => {
                    requests.push(request);
                    replies.push(reply);
                }
                other => after.push(other),
            }
        }
        if !requests.is_empty() {
            self.batches.fetch_add(1, Ordering::Relaxed);
            self.requests
                .fetch_add(requests.len() as u64, Ordering::Relaxed);
            for (reply, answer) in replies.into_iter().zip(self.score_all(&requests)) {
                let _ = reply.send(answer.map_err(ModelError::Compute));
            }
        }
        for job in after {
            match job {
                Job::Rollback { reason } => {
                    if let Err(e) = self.roll_back(&reason) {
                        tracing::error!(error = %e, reason, "Automatic model rollback failed");
                    }
                }
                Job::Barrier(done) => {
                    let _ = done.send(());
                }
                Job::Score { .. } => {}
            }
        }
    }

    /// One pass per variant version requests asked for, then one for the active version
    /// (rolling back once if it fails) and one for the shadow over every other request.
    fn score_all(&self, requests: &[ScoreRequest]) -> Vec<Result<Option<Scores>, String>> {
        let active = self.active.load().as_ref().map(|m| m.version().to_owned());
        let mut answers: Vec<Result<Option<Scores>, String>> = vec![Ok(None); requests.len()];
        let mut by_active = Vec::new();
        let mut by_variant: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, r) in requests.iter().enumerate() {
            match r.version.as_deref() {
                Some(v) if Some(v) != active.as_deref() => by_variant.entry(v).or_default().push(i),
                _ => by_active.push(i),
            }
        }
        for (version, indices) in by_variant {
            let refs: Vec<&ScoreRequest> = indices.iter().map(|&i| &requests[i]).collect();
            match self
                .variant(version)
                .and_then(|model| Ok((guarded(&model, &refs)?, model)))
            {
                Ok((lists, model)) => {
                    for (&i, scores) in indices.iter().zip(lists) {
                        answers[i] = Ok(Some(Scores {
                            version: model.version().to_owned(),
                            scores,
                            shadow: None,
                        }));
                    }
                }
                Err(e) => {
                    tracing::warn!(version, error = %e, "A variant's model version cannot score; the active version scores instead");
                    by_active.extend(indices);
                }
            }
        }
        if !by_active.is_empty() {
            let refs: Vec<&ScoreRequest> = by_active.iter().map(|&i| &requests[i]).collect();
            match self.score_active(&refs) {
                Ok(lists) => {
                    for (&i, scores) in by_active.iter().zip(lists) {
                        answers[i] = Ok(scores);
                    }
                }
                Err(e) => {
                    for &i in &by_active {
                        answers[i] = Err(e.clone());
                    }
                }
            }
        }
        answers
    }

    /// A saved version an experiment variant scores with, loaded once.
    fn variant(&self, version: &str) -> ModelResult<Arc<LoadedModel>> {
        /// Versions kept loaded at once; experiments rarely compare more.
        const MAX_VARIANTS: usize = 8;
        if let Some(model) = self.variants.lock().get(version) {
            return Ok(model.clone());
        }
        let registry = self
            .registry
            .as_ref()
            .ok_or_else(|| ModelError::invalid("version", "no registry to load it from"))?;
        let model = Arc::new(registry.load(version, &self.device)?);
        let mut variants = self.variants.lock();
        if variants.len() >= MAX_VARIANTS {
            variants.clear();
        }
        variants.insert(version.to_owned(), model.clone());
        Ok(model)
    }

    /// The active version's pass (rolling back once if it fails) and the shadow's.
    fn score_active(&self, refs: &[&ScoreRequest]) -> Result<Vec<Option<Scores>>, String> {
        let mut active = self.active.load_full();
        let mut scored = None;
        for attempt in 0..2 {
            let Some(model) = active.clone() else {
                return Ok(vec![None; refs.len()]);
            };
            match guarded(&model, refs) {
                Ok(s) => {
                    scored = Some((model, s));
                    break;
                }
                Err(e) => {
                    self.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(version = model.version(), error = %e, "Model inference failed");
                    if attempt == 1 {
                        return Err(e.to_string());
                    }
                    let reason = format!("inference failed: {e}");
                    match self.roll_back(&reason) {
                        Ok(()) => active = self.active.load_full(),
                        Err(r) => {
                            tracing::error!(error = %r, "Automatic model rollback failed");
                            return Err(e.to_string());
                        }
                    }
                }
            }
        }
        let Some((model, lists)) = scored else {
            return Err("no model could score".into());
        };
        let shadow = self.shadow.load_full().and_then(|sh| match guarded(&sh, refs) {
            Ok(s) => Some((sh.version().to_owned(), s)),
            Err(e) => {
                tracing::warn!(version = sh.version(), error = %e, "Shadow model inference failed");
                None
            }
        });
        let mut shadow_lists = shadow.map(|(v, lists)| (v, lists.into_iter()));
        Ok(lists
            .into_iter()
            .map(|scores| {
                Some(Scores {
                    version: model.version().to_owned(),
                    scores,
                    shadow: shadow_lists.as_mut().and_then(|(v, it)| {
                        it.next().map(|scores| ShadowScores {
                            version: v.clone(),
                            scores,
                        })
                    }),
                })
            })
            .collect())
    }

    /// Rolls the registry back and swaps its new active version in.
    fn roll_back(&self, reason: &str) -> ModelResult<()> {
        let registry = self
            .registry
            .as_ref()
            .ok_or(ModelError::NothingToRollBack)?;
        let state = registry.rollback(reason)?;
        let version = state.active.clone().ok_or(ModelError::NothingToRollBack)?;
        let model = registry.load(&version, &self.device)?;
        self.active.store(Some(Arc::new(model)));
        self.predecessor
            .store(state.predecessor().map(|p| Arc::new(p.to_owned())));
        if state.shadow.is_none() {
            self.shadow.store(None);
        }
        self.rollbacks.fetch_add(1, Ordering::Relaxed);
        self.rollback_pending.store(false, Ordering::SeqCst);
        tracing::warn!(version, reason, "Rolled the model back");
        Ok(())
    }
}

fn candidates_of(job: &Job) -> usize {
    match job {
        Job::Score { request, .. } => request.items.len().max(1),
        _ => 0,
    }
}

/// Scores, turning a panic inside the model into an error so the thread lives on.
fn guarded(model: &LoadedModel, requests: &[&ScoreRequest]) -> ModelResult<Vec<Vec<f32>>> {
    std::panic::catch_unwind(AssertUnwindSafe(|| model.score_batch(requests)))
        .unwrap_or_else(|_| Err(ModelError::Compute("the model panicked".into())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::registry::tests::registry_with;
    use crate::model::schema::tests::item;
    use crate::model::schema::NumericInput;
    use serde_json::json;

    fn live(_: &str) -> bool {
        true
    }

    fn request(n: usize, affinity: f64) -> ScoreRequest {
        ScoreRequest {
            features: Arc::new(
                [
                    ("affinity_travel".to_string(), affinity),
                    ("affinity_books".to_string(), 1.0),
                ]
                .into(),
            ),
            items: (0..n)
                .map(|i| {
                    Arc::new(item(
                        &format!("i{}", i % 9),
                        "banner",
                        &[["travel", "books", "home"][i % 3]],
                        json!({}),
                    ))
                })
                .collect(),
            context: ScoreContext::default(),
            version: None,
        }
    }

    fn settings(wait_ms: u64) -> ScorerSettings {
        ScorerSettings {
            batch_wait: Duration::from_millis(wait_ms),
            max_batch: 10_000,
            min_decisions: 50,
            margin: 0.05,
        }
    }

    #[tokio::test]
    async fn concurrent_requests_share_a_forward_pass_and_get_their_own_scores() {
        let (_dir, registry) = registry_with(1);
        let model = registry.load("v1", &Device::Cpu).unwrap();
        let requests: Vec<ScoreRequest> = (0..12).map(|i| request(3 + i, i as f64)).collect();
        let alone: Vec<Vec<f32>> = requests.iter().map(|r| model.score(r).unwrap()).collect();
        let scorer = Scorer::start(settings(200), None, Device::Cpu).unwrap();
        assert_eq!(
            scorer.score(request(3, 1.0)).await.unwrap(),
            None,
            "cold start"
        );
        scorer.set_active(Some(model), None);
        let answers =
            futures::future::join_all(requests.iter().cloned().map(|r| scorer.score(r))).await;
        for (answer, expected) in answers.into_iter().zip(&alone) {
            let s = answer.unwrap().unwrap();
            assert_eq!(s.version, "v1");
            assert_eq!(s.shadow, None);
            assert_eq!(s.scores.len(), expected.len());
            for (a, b) in s.scores.iter().zip(expected) {
                assert!((a - b).abs() < 1e-6, "{a} vs {b}");
            }
        }
        let stats = scorer.stats();
        assert_eq!(stats.requests, 12);
        assert!(stats.batches < 12, "requests were merged: {stats:?}");
    }

    #[tokio::test]
    async fn experiment_variants_score_with_their_own_version_in_the_same_batch() {
        let (_dir, registry) = registry_with(2);
        let v2 = registry.load("v2", &Device::Cpu).unwrap();
        let registry = Arc::new(registry);
        let scorer = Scorer::start(settings(200), Some(registry.clone()), Device::Cpu).unwrap();
        let asking = |version: Option<&str>| ScoreRequest {
            version: version.map(str::to_owned),
            ..request(5, 1.0)
        };
        // No active version: only a request naming one is scored.
        assert_eq!(scorer.score(asking(None)).await.unwrap(), None);
        let alone = scorer.score(asking(Some("v2"))).await.unwrap().unwrap();
        assert_eq!(alone.version, "v2");
        assert_eq!(alone.scores, v2.score(&asking(None)).unwrap());

        scorer.set_active(Some(registry.load("v1", &Device::Cpu).unwrap()), None);
        let asked = [None, Some("v2"), Some("v9"), Some("v1"), Some("../v1")];
        let answers =
            futures::future::join_all(asked.iter().map(|&v| scorer.score(asking(v)))).await;
        let versions: Vec<String> = answers
            .into_iter()
            .map(|a| a.unwrap().expect("scored").version)
            .collect();
        assert_eq!(
            versions,
            ["v1", "v2", "v1", "v1", "v1"],
            "a version that cannot be loaded falls back to the active one"
        );
        assert!(scorer.stats().batches < 5, "{:?}", scorer.stats());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hot_swaps_fail_no_request_and_shadows_score_beside() {
        let (_dir, registry) = registry_with(2);
        let scorer = Arc::new(Scorer::start(settings(0), None, Device::Cpu).unwrap());
        scorer.set_active(Some(registry.load("v1", &Device::Cpu).unwrap()), None);
        scorer.set_shadow(Some(registry.load("v2", &Device::Cpu).unwrap()));
        let s = scorer.score(request(4, 2.0)).await.unwrap().unwrap();
        assert_eq!(
            s.shadow
                .as_ref()
                .map(|s| (s.version.as_str(), s.scores.len())),
            Some(("v2", 4))
        );
        assert_ne!(s.scores, s.shadow.unwrap().scores);
        scorer.set_shadow(None);

        let swapper = {
            let scorer = scorer.clone();
            let dir = registry.dir().to_path_buf();
            tokio::task::spawn_blocking(move || {
                let registry = Registry::new(dir.parent().unwrap());
                for i in 0..40 {
                    let v = if i % 2 == 0 { "v2" } else { "v1" };
                    scorer.set_active(Some(registry.load(v, &Device::Cpu).unwrap()), None);
                }
            })
        };
        let requests = (0..300).map(|i| {
            let scorer = scorer.clone();
            tokio::spawn(async move { scorer.score(request(20, i as f64 / 30.0)).await })
        });
        let answers = futures::future::join_all(requests).await;
        swapper.await.unwrap();
        for a in answers {
            let s = a.unwrap().unwrap().expect("a model is always active");
            assert!(s.version == "v1" || s.version == "v2");
            assert_eq!(s.scores.len(), 20);
        }
        assert_eq!(scorer.stats().failures, 0);
    }

    /// `version` as loaded but no longer matching its weights: every forward pass fails.
    fn broken_copy(registry: &Registry, version: &str) -> LoadedModel {
        let good = registry.load(version, &Device::Cpu).unwrap();
        let mut manifest = good.manifest().clone();
        manifest.schema.customer_features.push(NumericInput {
            name: "extra".into(),
            mean: 0.0,
            std: 1.0,
        });
        LoadedModel::new(manifest, good.net.clone())
    }

    #[tokio::test]
    async fn a_failing_version_rolls_back_and_the_request_still_succeeds() {
        let (dir, registry) = registry_with(2);
        registry.activate("v1", &live, "first").unwrap();
        registry.activate("v2", &live, "second").unwrap();
        let broken = broken_copy(&registry, "v2");
        assert!(broken.score(&request(2, 1.0)).is_err());

        let registry = Arc::new(registry);
        let scorer = Scorer::start(settings(0), Some(registry.clone()), Device::Cpu).unwrap();
        scorer.set_active(Some(broken), Some("v1".into()));
        let s = scorer.score(request(5, 1.0)).await.unwrap().unwrap();
        assert_eq!((s.version.as_str(), s.scores.len()), ("v1", 5));
        assert_eq!(registry.state().unwrap().active.as_deref(), Some("v1"));
        let reason = registry
            .state()
            .unwrap()
            .events
            .last()
            .unwrap()
            .reason
            .clone();
        assert!(reason.starts_with("from v2: inference failed:"), "{reason}");
        let stats = scorer.stats();
        assert_eq!((stats.failures, stats.rollbacks), (1, 1));
        // With nothing left to roll back to, a failure is an error, not a panic.
        let registry2 = Arc::new(Registry::new(dir.path()));
        let alone = Scorer::start(settings(0), Some(registry2), Device::Cpu).unwrap();
        alone.set_active(Some(broken_copy(&registry, "v2")), None);
        let err = alone.score(request(1, 1.0)).await.unwrap_err().to_string();
        assert!(err.starts_with("model computation:"), "{err}");
    }

    #[tokio::test]
    async fn a_version_earning_less_than_its_predecessor_rolls_back() {
        let (_dir, registry) = registry_with(2);
        registry.activate("v1", &live, "first").unwrap();
        registry.activate("v2", &live, "second").unwrap();
        let registry = Arc::new(registry);
        let scorer = Scorer::start(settings(0), Some(registry.clone()), Device::Cpu).unwrap();
        // v1 earned 0.30 per decision while it served.
        for i in 0..100 {
            scorer.record_decision("v1");
            if i % 10 < 3 {
                scorer.record_reward("v1", 1.0);
            }
        }
        scorer.set_active(
            Some(registry.load("v2", &Device::Cpu).unwrap()),
            Some("v1".into()),
        );
        // Within the margin (0.28 ≥ 0.30 − 0.05): no rollback.
        for i in 0..50 {
            scorer.record_decision("v2");
            if i % 25 < 7 {
                scorer.record_reward("v2", 1.0);
            }
        }
        scorer.flush().await.unwrap();
        assert_eq!(scorer.active_version().as_deref(), Some("v2"));
        // Then it earns nothing for 50 more decisions: 0.14 < 0.25.
        for _ in 0..50 {
            scorer.record_decision("v2");
        }
        scorer.flush().await.unwrap();
        assert_eq!(scorer.active_version().as_deref(), Some("v1"));
        assert_eq!(registry.state().unwrap().active.as_deref(), Some("v1"));
        assert_eq!(scorer.stats().rollbacks, 1);
        assert_eq!(scorer.online_reward("v2").decisions, 100);
    }
}
