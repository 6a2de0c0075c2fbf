//! The `personalize` pipeline, one stage per function:
//! load context → candidates → rules → score (the active model) → choose → record.
//! And `record_outcome`, which closes the loop. Experiments' part of it is in
//! [`experiments`].

mod experiments;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use opentelemetry::KeyValue;
use rand::SeedableRng;
use serde_json::{json, Value};
use tokio::sync::broadcast;

use super::{Decision, LoggedArm, ModelScores, Outcome, PropensityKind, ScoredItem};
use crate::bandit::linear::{self, ContextInput, Featurizer, LinearArm, LinearStats};
use crate::bandit::policy::{self, Ranking};
use crate::bandit::ArmStats;
use crate::config::{ConsentSettings, PolicyKind, PolicySettings};
use crate::content::{CandidateFilter, Catalog, ContentItem};
use crate::customers::{Customer, CustomerId, Purposes};
use crate::error::{Error, Result};
use crate::experiments::{ExperimentService, RuleOverride};
use crate::features::{FeatureService, Window};
use crate::model::schema::ScoreContext;
use crate::model::serving::{ScoreRequest, Scores};
use crate::model::ModelService;
use crate::privacy::Profiles;
use crate::rules::host::{count_impressions, map_of, CtxData, CtxView, CustomerData, CustomerView};
use crate::rules::runtime::{Effect, RuleEffects};
use crate::rules::{RuleService, RuleSet};
use crate::storage::{EventStream, Stores};
use crate::telemetry::Metrics;

/// A validated `personalize` request.
#[derive(Debug, Clone)]
pub struct PersonalizeRequest {
    pub customer_id: CustomerId,
    pub placement: Option<String>,
    pub available_items: Option<Vec<String>>,
    pub content_type: Option<String>,
    pub context: Value,
    pub count: usize,
    pub explain: bool,
}

/// Most items one decision may return.
pub const MAX_COUNT: usize = 50;
/// Alternatives kept on a decision.
const MAX_ALTERNATIVES: usize = 10;
/// Capacity of the decision stream; a subscriber that falls further behind skips ahead.
const STREAM_CAPACITY: usize = 4096;
/// Bandit arms of requests without a placement.
const NO_PLACEMENT: &str = "_";
/// How far back rules can count impressions, and how many are loaded at most.
const IMPRESSION_LOOKBACK_DAYS: i64 = 30;
const MAX_IMPRESSIONS: usize = 1_000;
/// What a content item's own `frequencyCap` counts: impressions within a day.
const FREQUENCY_CAP_WINDOW_DAYS: i64 = 1;
/// The name under which an item's own frequency cap filters it.
const FREQUENCY_CAP: &str = "frequency_cap(item)";

/// What the pipeline knows about the customer when it decides.
struct DecisionContext {
    /// Without its PII ([`Profiles::get_without_pii`]).
    profile: Option<Customer>,
    features: BTreeMap<String, f64>,
    segments: Vec<String>,
    /// What the customer's consent (or the configured default) allows.
    purposes: Purposes,
    degraded: bool,
    /// Items shown to the customer recently, newest first (loaded only when a rule or
    /// an item's frequency cap needs them).
    impressions: Vec<crate::decision::Impression>,
}

pub struct DecisionEngine {
    stores: Stores,
    profiles: Arc<Profiles>,
    catalog: Arc<Catalog>,
    features: Arc<FeatureService>,
    rules: Arc<RuleService>,
    models: Arc<ModelService>,
    experiments: Arc<ExperimentService>,
    policy: PolicySettings,
    consent: ConsentSettings,
    max_candidates: usize,
    stream: broadcast::Sender<Arc<Decision>>,
    /// Where decisions and outcomes are published for other systems, if anywhere.
    publisher: Option<Arc<dyn EventStream>>,
    metrics: Arc<Metrics>,
}

impl DecisionEngine {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        stores: Stores,
        profiles: Arc<Profiles>,
        catalog: Arc<Catalog>,
        features: Arc<FeatureService>,
        rules: Arc<RuleService>,
        models: Arc<ModelService>,
        experiments: Arc<ExperimentService>,
        policy: PolicySettings,
        consent: ConsentSettings,
        max_candidates: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        DecisionEngine {
            stores,
            profiles,
            catalog,
            features,
            rules,
            models,
            experiments,
            policy,
            consent,
            max_candidates,
            stream: broadcast::channel(STREAM_CAPACITY).0,
            publisher: None,
            metrics,
        }
    }

    /// Publishes every stored decision and outcome to `publisher` as well.
    pub fn with_publisher(mut self, publisher: Option<Arc<dyn EventStream>>) -> Self {
        self.publisher = publisher;
        self
    }

    /// Every decision as it is made. Sending never waits: a lagging receiver loses the
    /// oldest decisions and is told how many.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Decision>> {
        self.stream.subscribe()
    }

    #[tracing::instrument(skip_all, fields(customer = %req.customer_id, placement = req.placement.as_deref().unwrap_or("")))]
    pub async fn personalize(&self, req: PersonalizeRequest) -> Result<Decision> {
        let started = Instant::now();
        let now = Utc::now();
        if req.count == 0 || req.count > MAX_COUNT {
            return Err(Error::invalid(
                "count",
                format!("must be between 1 and {MAX_COUNT}"),
            ));
        }
        let rules = self.rules.current();
        let mut stages = self.metrics.stages();
        let (candidates, filtered) = self.candidates(&req, now).await?;
        stages.lap("candidates");
        let needs_impressions =
            rules.needs_impressions() || candidates.iter().any(|c| c.frequency_cap.is_some());
        let mut ctx = self
            .load_context(&req.customer_id, needs_impressions, now)
            .await?;
        let (candidates, mut filtered) = self.eligible(&req, &ctx, candidates, filtered)?;
        stages.lap("context");
        let placement = req.placement.as_deref().unwrap_or(NO_PLACEMENT);
        // Variant overrides: rule set and pin here, model version in `score`, policy in
        // `choose`.
        let applied = self.assign_experiments(&req.customer_id, &ctx).await;
        stages.lap("experiments");
        let rules = match &applied.rules {
            Some(RuleOverride::Only(names)) => Arc::new(rules.restricted(names)),
            Some(RuleOverride::None) => Arc::new(rules.restricted(&[])),
            None => rules,
        };
        let mut effects = self.apply_rules(&rules, &req, &ctx, &candidates, placement, now);
        let experiment_pin = experiments::pin(&applied, &candidates, &mut effects);
        stages.lap("rules");
        for failure in &effects.failures {
            tracing::warn!(rule = %failure.rule, error = %failure.error, "Rule skipped for this decision");
            self.metrics.rule_error(&failure.rule);
        }
        for (i, by) in effects.filtered.iter().enumerate() {
            if let Some(rule) = by {
                filtered.push(json!({"id": candidates[i].id, "reason": "rule", "rule": rule}));
            }
        }
        let model = self
            .score(
                &req,
                &ctx,
                &candidates,
                &effects,
                applied.model_version.clone(),
                now,
            )
            .await;
        stages.lap("model");
        let policy_kind = applied
            .policy
            .unwrap_or_else(|| self.policy.kind_for(placement));
        let Choice {
            mut ranking,
            policy: policy_name,
            stats,
            contexts,
            arms,
            degraded: bandit_degraded,
        } = self
            .choose(
                &req,
                placement,
                &candidates,
                &effects,
                &ctx,
                policy_kind,
                model.as_ref(),
                now,
            )
            .await?;
        stages.lap("policy");
        // Statistics that could not be read make the ranking one from priors.
        ctx.degraded |= bandit_degraded;
        if let Some(pinned) = experiment_pin {
            // The experiment's pin goes before the rules' pins.
            if let Some(at) = ranking.order.iter().position(|&(i, _)| i == pinned) {
                let entry = ranking.order.remove(at);
                ranking.order.insert(0, entry);
            }
        }
        if ranking.order.is_empty() {
            return Err(Error::invalid(
                candidates_field(&req),
                format!(
                    "no eligible content for placement '{}': rules filtered all {} candidates",
                    req.placement.as_deref().unwrap_or("(any)"),
                    candidates.len()
                ),
            ));
        }

        let mut ranked = ranking.order.iter().map(|&(i, score)| ScoredItem {
            item: candidates[i].clone(),
            score,
        });
        let items: Vec<ScoredItem> = ranked.by_ref().take(req.count).collect();
        // The linear policies learn from every shown item: its context vector now, its
        // reward when the outcome comes.
        let linear_impressions: Vec<(String, Vec<f64>)> = ranking
            .order
            .iter()
            .take(items.len())
            .filter_map(|(i, _)| Some((candidates[*i].id.clone(), contexts.get(i)?.clone())))
            .collect();
        let alternatives: Vec<ScoredItem> = ranked.take(MAX_ALTERNATIVES).collect();
        let selected = &items[0];
        let selected_index = ranking.order[0].0;
        let reasoning = reasoning(
            &policy_name,
            placement,
            ranking.order.len(),
            selected,
            &ranking,
            &ctx,
            &effects,
            selected_index,
        );
        let explanation = req.explain.then(|| {
            json!({
                "policy": policy_name,
                "candidates": ranking.order.iter().map(|&(i, score)| json!({
                    "id": candidates[i].id,
                    "score": score,
                    "weight": weight_json(effects.weights[i]),
                    "pinned": effects.is_pinned(i),
                    "rules": effects.trace[i],
                    "model_score": model.as_ref().map(|m| m.candidate[i]).filter(|s| !s.is_nan()),
                    "impressions": stats.get(i).map_or(0.0, |s| s.trials),
                    "reward": stats.get(i).map_or(0.0, |s| s.reward),
                })).collect::<Vec<_>>(),
                "filtered": filtered,
                "rules": rules.rules().iter().filter(|r| r.rule.meta.enabled).map(|r| json!({
                    "name": r.rule.meta.name,
                    "version": r.version,
                    "priority": r.rule.meta.priority,
                    "fired": effects.fired.contains(&r.rule.meta.name),
                })).collect::<Vec<_>>(),
                "rule_errors": effects.failures,
                "model": model.as_ref().map(|m| json!({
                    "version": m.scores.version,
                    "shadow": m.scores.shadow.as_ref().map(|s| &s.version),
                    "prior_strength": self.policy.model_prior_strength,
                })),
                "features": ctx.features,
                "personalized": ctx.purposes.personalization,
                "marketing_consent": ctx.purposes.marketing,
            })
        });
        let decision = Decision {
            id: uuid::Uuid::now_v7().to_string(),
            customer_id: req.customer_id.clone(),
            placement: req.placement.clone(),
            confidence_score: selected.score,
            reasoning,
            latency_ms: 0.0,
            policy: policy_name,
            propensity: ranking.propensity,
            propensity_kind: ranking.propensity_kind,
            model_version: model.as_ref().map(|m| m.scores.version.clone()),
            model_scores: model.as_ref().map(|m| m.log(&candidates)),
            experiments: applied.assignments,
            segments: ctx.segments,
            arms,
            rules: effects.fired,
            degraded: ctx.degraded,
            explanation,
            context: req.context,
            features: ctx.features,
            created_at: now,
            items,
            alternatives,
        };
        let recorded = self
            .record(decision, placement, linear_impressions, started)
            .await;
        stages.lap("record");
        recorded
    }

    /// Stage 1: profile, features (with a deadline) and segments, concurrently.
    #[tracing::instrument(skip_all)]
    async fn load_context(
        &self,
        customer: &CustomerId,
        needs_impressions: bool,
        now: DateTime<Utc>,
    ) -> Result<DecisionContext> {
        let impressions = async {
            if !needs_impressions {
                return Ok(Vec::new());
            }
            let since = now - chrono::Duration::days(IMPRESSION_LOOKBACK_DAYS);
            self.stores
                .decisions
                .impressions(customer, since, MAX_IMPRESSIONS)
                .await
        };
        let (profile, features, segments, impressions) = tokio::join!(
            // Decisions read traits and consent, never PII: it stays sealed.
            self.profiles.get_without_pii(customer),
            self.features.read(customer, None, "features", now),
            self.stores.segments.segments_of(customer),
            impressions,
        );
        // A shared catalog served from this process's local copy (its backend is
        // unreachable) may be stale: the decision says so.
        let mut degraded = self
            .stores
            .catalog_copy
            .as_ref()
            .is_some_and(|copy| copy.is_serving());
        let profile = profile.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "Failed to load profile; deciding without it");
            self.metrics.backend_error("profiles");
            degraded = true;
            None
        });
        let features = match features {
            Ok(read) => {
                degraded |= read.degraded;
                read.values.into_iter().map(|v| (v.name, v.value)).collect()
            }
            Err(e) => return Err(e),
        };
        let segments = segments.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "Failed to load segments; deciding without them");
            self.metrics.backend_error("segments");
            degraded = true;
            Vec::new()
        });
        let impressions = impressions.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "Failed to load impressions; frequency caps see none");
            self.metrics.backend_error("decisions");
            degraded = true;
            Vec::new()
        });
        let purposes = self.consent.resolve(profile.as_ref().map(|p| &p.consent));
        // Read beside the profile (one round of waiting, not two) but, without
        // personalization consent, used for nothing: not for segment targeting, rules,
        // the model or the decision log (and so not for training either).
        let (features, segments) = if purposes.personalization {
            (features, segments)
        } else {
            (BTreeMap::new(), Vec::new())
        };
        Ok(DecisionContext {
            profile,
            features,
            segments,
            purposes,
            degraded,
            impressions,
        })
    }

    /// Stage 2a: the request's items, or the catalog filtered by placement, type and
    /// active window (segment eligibility needs the customer: [`Self::eligible`]).
    #[tracing::instrument(skip_all)]
    async fn candidates(
        &self,
        req: &PersonalizeRequest,
        now: DateTime<Utc>,
    ) -> Result<(Vec<Arc<ContentItem>>, Vec<Value>)> {
        let mut filtered = Vec::new();
        let items = match &req.available_items {
            Some(ids) => {
                if ids.is_empty() {
                    return Err(Error::invalid("availableItems", "must not be empty"));
                }
                if ids.len() > self.max_candidates {
                    return Err(Error::invalid(
                        "availableItems",
                        format!("at most {} items", self.max_candidates),
                    ));
                }
                let found = self.stores.content.get_many(ids).await?;
                let mut items = Vec::with_capacity(ids.len());
                for (i, (id, item)) in ids.iter().zip(found).enumerate() {
                    let item = item.ok_or_else(|| {
                        Error::not_found(format!("availableItems[{i}]"), "content item", id)
                    })?;
                    // The caller named these items: only the active window still applies.
                    if item.is_active(now) {
                        items.push(Arc::new(item));
                    } else {
                        filtered
                            .push(json!({"id": item.id, "reason": "outside its active window"}));
                    }
                }
                items
            }
            None => {
                let filter = CandidateFilter {
                    placement: req.placement.as_deref(),
                    content_type: req.content_type.as_deref(),
                    now: Some(now),
                    segments: None,
                };
                self.catalog
                    .items()
                    .await?
                    .iter()
                    .filter(|item| filter.matches(item))
                    .cloned()
                    .collect()
            }
        };
        Ok((items, filtered))
    }

    /// Stage 2b: marketing consent (content of `consent.marketing_content_types` only for
    /// customers with it, named items too: it is the customer's choice, not the
    /// caller's), segment eligibility (catalog candidates only: a caller's named items
    /// are taken as eligible), then priority order (highest first, then id), at most
    /// `max_candidates`.
    fn eligible(
        &self,
        req: &PersonalizeRequest,
        ctx: &DecisionContext,
        mut items: Vec<Arc<ContentItem>>,
        mut filtered: Vec<Value>,
    ) -> Result<(Vec<Arc<ContentItem>>, Vec<Value>)> {
        if !ctx.purposes.marketing {
            let mut without_consent = 0;
            items.retain(|item| {
                let ok = !self.consent.is_marketing(&item.content_type);
                if !ok {
                    without_consent += 1;
                    if req.explain {
                        filtered.push(json!({"id": item.id, "reason": "marketing content: no marketing consent"}));
                    }
                }
                ok
            });
            if without_consent > 0 && items.is_empty() {
                return Err(Error::invalid(
                    candidates_field(req),
                    format!(
                        "no eligible content for placement '{}': all {without_consent} candidates are marketing content and the customer has no marketing consent",
                        req.placement.as_deref().unwrap_or("(any)"),
                    ),
                ));
            }
        }
        if req.available_items.is_none() {
            items.retain(|item| {
                let ok = item.eligible_for(&ctx.segments);
                if !ok && req.explain {
                    filtered.push(json!({"id": item.id, "reason": "not eligible for the customer's segments"}));
                }
                ok
            });
        }
        items.sort_by(|a, b| b.priority.cmp(&a.priority).then_with(|| a.id.cmp(&b.id)));
        // A request naming an item twice gets it once (equal ids sort together).
        items.dedup_by(|a, b| a.id == b.id);
        items.truncate(self.max_candidates);
        if items.is_empty() {
            let field = candidates_field(req);
            return Err(Error::invalid(
                field,
                format!(
                    "no eligible content for placement '{}'{}",
                    req.placement.as_deref().unwrap_or("(any)"),
                    req.content_type
                        .as_deref()
                        .map(|t| format!(" and type '{t}'"))
                        .unwrap_or_default()
                ),
            ));
        }
        Ok((items, filtered))
    }

    /// Stage 3: items' own frequency caps, then the marketers' rules in priority order.
    /// A rule that fails is skipped for this decision and reported in the effects.
    #[tracing::instrument(skip_all)]
    fn apply_rules(
        &self,
        rules: &RuleSet,
        req: &PersonalizeRequest,
        ctx: &DecisionContext,
        candidates: &[Arc<ContentItem>],
        placement: &str,
        now: DateTime<Utc>,
    ) -> RuleEffects {
        let mut effects = RuleEffects::neutral(candidates.len());
        let day = now - Window::days(FREQUENCY_CAP_WINDOW_DAYS).duration();
        for (i, item) in candidates.iter().enumerate() {
            if let Some(cap) = item.frequency_cap {
                if count_impressions(&ctx.impressions, Some(&item.id), day) >= i64::from(cap) {
                    effects.filter(i, FREQUENCY_CAP);
                }
            }
        }
        if !rules.decides() {
            return effects;
        }
        let customer = CustomerData {
            id: req.customer_id.as_str().to_owned(),
            known: ctx.profile.is_some(),
            traits: ctx
                .profile
                .as_ref()
                .filter(|_| ctx.purposes.personalization)
                .map(|p| map_of(&p.traits))
                .unwrap_or_default(),
            features: ctx.features.clone(),
            segments: ctx.segments.clone(),
            personalization: ctx.purposes.personalization,
            marketing: ctx.purposes.marketing,
            analytics: ctx.purposes.analytics,
            impressions: ctx.impressions.clone(),
            now,
        };
        let customer = CustomerView(Arc::new(customer));
        let ctx = CtxView(Arc::new(CtxData {
            placement: req.placement.clone().unwrap_or_default(),
            content_type: req.content_type.clone().unwrap_or_default(),
            count: req.count as i64,
            request: req.context.clone(),
            now,
        }));
        rules.decide(&customer, &ctx, candidates, placement, &mut effects);
        effects
    }

    /// Stage 4: the active model (or the experiment variant's `version`) scores every
    /// candidate still eligible in one batched forward pass, off the executor. `None`
    /// without consent, without a version to score with (cold start), or when scoring
    /// fails (the scorer has then rolled back; this decision goes on without the model
    /// and says so in the log).
    #[tracing::instrument(skip_all)]
    async fn score(
        &self,
        req: &PersonalizeRequest,
        ctx: &DecisionContext,
        candidates: &[Arc<ContentItem>],
        effects: &RuleEffects,
        version: Option<String>,
        now: DateTime<Utc>,
    ) -> Option<ModelView> {
        // Cold start costs nothing: no request is built without a version to score with.
        if !ctx.purposes.personalization
            || (version.is_none() && !self.models.scorer().has_active())
        {
            return None;
        }
        let alive: Vec<usize> = (0..candidates.len())
            .filter(|&i| effects.filtered[i].is_none())
            .collect();
        if alive.is_empty() {
            return None;
        }
        let request = ScoreRequest {
            features: Arc::new(ctx.features.clone()),
            items: alive.iter().map(|&i| candidates[i].clone()).collect(),
            context: ScoreContext::from_request(req.placement.as_deref(), &req.context, now),
            version,
        };
        let scores = match self.models.scorer().score(request).await {
            Ok(Some(scores)) => scores,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(error = %e, "Model scoring failed; deciding without the model");
                self.metrics.backend_error("model");
                return None;
            }
        };
        let mut candidate = vec![f64::NAN; candidates.len()];
        for (k, &i) in alive.iter().enumerate() {
            candidate[i] = scores.scores.get(k).map_or(f64::NAN, |&s| f64::from(s));
        }
        let mut shadow = vec![f64::NAN; candidates.len()];
        if let Some(s) = &scores.shadow {
            for (k, &i) in alive.iter().enumerate() {
                shadow[i] = s.scores.get(k).map_or(f64::NAN, |&s| f64::from(s));
            }
        }
        Some(ModelView {
            scores,
            candidate,
            shadow,
        })
    }

    /// Stage 5: pinned items first (in priority order), then the policy ranks the
    /// eligible items by score × rule weight, then items a rule weighted to 0. Without
    /// personalization consent, priority order decides instead of the policy. The
    /// model's scores, when there are any, are the bandit's prior (Thompson sampling,
    /// epsilon-greedy), the ranking itself (model-greedy, softmax) or one more feature
    /// of the linear policies' context vector (LinUCB, linear Thompson sampling).
    #[tracing::instrument(skip_all)]
    #[allow(clippy::too_many_arguments)]
    async fn choose(
        &self,
        req: &PersonalizeRequest,
        placement: &str,
        candidates: &[Arc<ContentItem>],
        effects: &RuleEffects,
        ctx: &DecisionContext,
        policy_kind: PolicyKind,
        model: Option<&ModelView>,
        now: DateTime<Utc>,
    ) -> Result<Choice> {
        let eligible: Vec<usize> = (0..candidates.len())
            .filter(|&i| effects.filtered[i].is_none())
            .collect();
        let pinned: Vec<usize> = eligible
            .iter()
            .copied()
            .filter(|&i| effects.is_pinned(i))
            .collect();
        if !ctx.purposes.personalization {
            let mut order = pinned.clone();
            order.extend(eligible.iter().filter(|i| !pinned.contains(i)));
            return Ok(Choice {
                ranking: Ranking {
                    order: order.into_iter().map(|i| (i, 0.0)).collect(),
                    propensity: 1.0,
                    propensity_kind: PropensityKind::Exact,
                },
                policy: "default".into(),
                stats: Vec::new(),
                contexts: BTreeMap::new(),
                arms: Vec::new(),
                degraded: false,
            });
        }
        let arms: Vec<String> = candidates.iter().map(|c| c.id.clone()).collect();
        let (stats, mut degraded) = match self.stores.bandit.get(placement, &arms).await {
            Ok(stats) => (stats, false),
            Err(e) => {
                tracing::warn!(error = %e, "Failed to read bandit state; exploring from priors");
                self.metrics.backend_error("bandit");
                (vec![ArmStats::default(); arms.len()], true)
            }
        };
        let free: Vec<usize> = eligible
            .iter()
            .copied()
            .filter(|&i| !effects.is_pinned(i) && effects.weights[i] > 0.0)
            .collect();
        let zero: Vec<usize> = eligible
            .iter()
            .copied()
            .filter(|&i| effects.weights[i] == 0.0)
            .collect();
        let model_score = |i: usize| model.map(|m| m.candidate[i]).filter(|s| !s.is_nan());
        let prior = |i: usize| match model_score(i) {
            Some(p) => stats[i].with_prior(p, self.policy.model_prior_strength),
            None => stats[i],
        };
        let free_stats: Vec<ArmStats> = free.iter().map(|&i| prior(i)).collect();
        let free_weights: Vec<f64> = free.iter().map(|&i| effects.weights[i]).collect();
        let free_scores = || -> Vec<f64> {
            free.iter()
                .map(|&i| model_score(i).unwrap_or(0.0))
                .collect()
        };
        // The linear policies' context vector of every eligible item (the shown ones
        // are learned from, whoever put them first).
        let contexts: BTreeMap<usize, Vec<f64>> = if policy_kind.is_linear() {
            let featurizer = Featurizer {
                dims: self.policy.linear_dims,
            };
            let input = ContextInput {
                features: &ctx.features,
                segments: &ctx.segments,
                context: &req.context,
                at: now,
            };
            eligible
                .iter()
                .map(|&i| (i, featurizer.encode(&input, model_score(i))))
                .collect()
        } else {
            BTreeMap::new()
        };
        // The RNG is per decision and seeded from the OS: no shared lock on the hot path.
        let mut rng = rand::rngs::SmallRng::from_os_rng();
        let (ranked, name) = if free.is_empty() {
            (policy::by_priority(0), policy_name(policy_kind))
        } else {
            match policy_kind {
                PolicyKind::ModelGreedy if model.is_some() => (
                    policy::greedy(&free_scores(), &free_weights),
                    "model_greedy",
                ),
                PolicyKind::Softmax if model.is_some() => (
                    policy::softmax(
                        &free_scores(),
                        &free_weights,
                        self.policy.softmax_temperature,
                        &mut rng,
                    ),
                    "softmax",
                ),
                PolicyKind::Thompson | PolicyKind::ModelGreedy | PolicyKind::Softmax => (
                    policy::thompson(
                        &free_stats,
                        &free_weights,
                        self.policy.propensity_samples,
                        &mut rng,
                    ),
                    "thompson_sampling",
                ),
                PolicyKind::EpsilonGreedy => (
                    policy::epsilon_greedy(
                        &free_stats,
                        &free_weights,
                        self.policy.epsilon,
                        &mut rng,
                    ),
                    "epsilon_greedy",
                ),
                PolicyKind::LinUcb | PolicyKind::LinearThompson => {
                    let (linear, linear_degraded) =
                        self.linear_arms(placement, &arms, &free, &contexts).await;
                    degraded |= linear_degraded;
                    if policy_kind == PolicyKind::LinUcb {
                        (
                            linear::lin_ucb(&linear, &free_weights, self.policy.alpha),
                            "lin_ucb",
                        )
                    } else {
                        (
                            linear::linear_thompson(
                                &linear,
                                &free_weights,
                                self.policy.linear_noise,
                                &mut rng,
                            ),
                            "linear_thompson",
                        )
                    }
                }
            }
        };
        let mut order: Vec<(usize, f64)> = pinned.iter().map(|&i| (i, stats[i].mean())).collect();
        order.extend(ranked.order.iter().map(|&(k, score)| (free[k], score)));
        order.extend(zero.iter().map(|&i| (i, 0.0)));
        // A pin, or a single item the rules left, is chosen with certainty.
        let (propensity, propensity_kind) = if pinned.is_empty() && !free.is_empty() {
            (ranked.propensity, ranked.propensity_kind)
        } else {
            (1.0, PropensityKind::Exact)
        };
        Ok(Choice {
            ranking: Ranking {
                order,
                propensity,
                propensity_kind,
            },
            policy: name.into(),
            stats,
            contexts,
            degraded,
            arms: if pinned.is_empty() && free.len() > 1 {
                free.iter()
                    .map(|&i| LoggedArm {
                        id: candidates[i].id.clone(),
                        weight: effects.weights[i],
                    })
                    .collect()
            } else {
                Vec::new()
            },
        })
    }

    /// The linear policies' estimate and variance for each `free` candidate, from its
    /// (placement, item) regression, and whether the read failed (then every arm
    /// explores from the prior).
    async fn linear_arms(
        &self,
        placement: &str,
        arms: &[String],
        free: &[usize],
        contexts: &BTreeMap<usize, Vec<f64>>,
    ) -> (Vec<LinearArm>, bool) {
        let dims = self.policy.linear_dims;
        let ids: Vec<String> = free.iter().map(|&i| arms[i].clone()).collect();
        let (stats, degraded) = match self.stores.bandit.get_linear(placement, &ids, dims).await {
            Ok(stats) => (stats, false),
            Err(e) => {
                tracing::warn!(error = %e, "Failed to read linear bandit state; exploring from priors");
                self.metrics.backend_error("bandit");
                (vec![LinearStats::zero(dims); ids.len()], true)
            }
        };
        let arms = free
            .iter()
            .zip(&stats)
            .map(|(i, s)| LinearArm::estimate(s, &contexts[i], self.policy.ridge))
            .collect();
        (arms, degraded)
    }

    /// Stage 6: store the decision, count an impression per shown item, publish.
    #[tracing::instrument(skip_all)]
    async fn record(
        &self,
        mut decision: Decision,
        placement: &str,
        linear_impressions: Vec<(String, Vec<f64>)>,
        started: Instant,
    ) -> Result<Decision> {
        decision.latency_ms = started.elapsed().as_secs_f64() * 1e3;
        let impressions = async {
            if decision.policy == "default" {
                return Ok(());
            }
            for shown in &decision.items {
                self.stores
                    .bandit
                    .add(placement, &shown.item.id, ArmStats::trial())
                    .await?;
            }
            for (item, x) in &linear_impressions {
                self.stores
                    .bandit
                    .add_linear(placement, item, &LinearStats::impression(x))
                    .await?;
            }
            Ok::<_, crate::storage::StorageError>(())
        };
        let (stored, counted, exposed) = tokio::join!(
            self.stores.decisions.put(&decision),
            impressions,
            self.experiments.record_exposures(&decision.experiments),
        );
        stored.inspect_err(|_| self.metrics.backend_error("decisions"))?;
        if let Some(version) = &decision.model_version {
            self.models.scorer().record_decision(version);
        }
        if let Err(e) = counted {
            tracing::warn!(error = %e, "Failed to count impressions");
            self.metrics.backend_error("bandit");
        }
        if let Err(e) = exposed {
            tracing::warn!(error = %e, "Failed to count experiment exposures");
            self.metrics.backend_error("experiments");
        }
        let attrs = [
            KeyValue::new("placement", placement.to_owned()),
            KeyValue::new("policy", decision.policy.clone()),
        ];
        self.metrics.decisions.add(1, &attrs);
        self.metrics
            .decision_latency_ms
            .record(started.elapsed().as_secs_f64() * 1e3, &attrs);
        if decision.degraded {
            self.metrics.degraded_decisions.add(1, &[]);
        }
        if let Some(publisher) = &self.publisher {
            // A durable local write; the decision itself is already stored.
            if let Err(e) = publisher.publish_decision(&decision).await {
                tracing::warn!(error = %e, decision = %decision.id, "Failed to publish a decision");
                self.metrics.backend_error("events");
            }
        }
        let decision = Arc::new(decision);
        // Never waits: with no subscriber this is a no-op.
        let _ = self.stream.send(decision.clone());
        Ok(Arc::unwrap_or_clone(decision))
    }

    /// Records reward feedback. The first outcome of a decision updates the policy's
    /// statistics for the selected item; every outcome counts in the conversion metrics.
    pub async fn record_outcome(
        &self,
        decision_id: &str,
        reward: f64,
        conversion_type: Option<String>,
        value: Option<f64>,
    ) -> Result<Outcome> {
        if !reward.is_finite() || !(0.0..=1.0).contains(&reward) {
            return Err(Error::invalid("reward", "must be between 0 and 1"));
        }
        if value.is_some_and(|v| !v.is_finite()) {
            return Err(Error::invalid("value", "must be a finite number"));
        }
        let conversion_type = conversion_type.unwrap_or_else(|| "conversion".into());
        if conversion_type.is_empty() || conversion_type.len() > 64 {
            return Err(Error::invalid("conversionType", "must be 1–64 characters"));
        }
        let decision = self
            .stores
            .decisions
            .get(decision_id)
            .await?
            .ok_or_else(|| Error::not_found("decisionId", "decision", decision_id))?;
        let outcome = Outcome {
            decision_id: decision.id.clone(),
            customer_id: decision.customer_id.clone(),
            item_id: decision.selected().item.id.clone(),
            reward,
            conversion_type,
            value,
            created_at: Utc::now(),
        };
        let earlier = self
            .stores
            .decisions
            .put_outcome(&outcome)
            .await?
            .ok_or_else(|| Error::not_found("decisionId", "decision", decision_id))?;
        if let Some(publisher) = &self.publisher {
            if let Err(e) = publisher.publish_outcome(&outcome).await {
                tracing::warn!(error = %e, decision = %outcome.decision_id, "Failed to publish an outcome");
                self.metrics.backend_error("events");
            }
        }
        if earlier == 0 {
            if let Some(version) = &decision.model_version {
                // The online reward the scorer compares versions by (automatic rollback).
                self.models.scorer().record_reward(version, reward);
            }
        }
        // The outcome is stored: it is acknowledged whatever the bandit's backend says. A
        // retry would not teach the bandit either (the stored outcome now comes first).
        if let Err(e) = self.teach_bandit(&decision, &outcome, earlier).await {
            tracing::warn!(error = %e, decision = %outcome.decision_id, "Failed to teach the bandit an outcome");
            self.metrics.backend_error("bandit");
        }
        if reward > 0.0 && !decision.experiments.is_empty() {
            self.count_conversion(&decision, earlier, value).await?;
        }
        if reward > 0.0 {
            let attrs = [
                KeyValue::new("conversion_type", outcome.conversion_type.clone()),
                KeyValue::new("placement", decision.placement.clone().unwrap_or_default()),
            ];
            self.metrics.conversions.add(1, &attrs);
            if let Some(v) = value {
                self.metrics.conversion_value.record(v, &attrs);
            }
        }
        Ok(outcome)
    }
}

impl DecisionEngine {
    /// The bandit learns from an outcome when it is the decision's first outcome that
    /// counts under the placement's reward definition, within the attribution window:
    /// its reward goes to the selected item's statistics (and, for a linear policy, to
    /// its regression, with the context vector recomputed from what the decision
    /// recorded).
    async fn teach_bandit(
        &self,
        decision: &Decision,
        outcome: &Outcome,
        earlier: u64,
    ) -> Result<()> {
        if decision.policy == "default" {
            return Ok(());
        }
        let placement = decision.placement.as_deref().unwrap_or(NO_PLACEMENT);
        let window = chrono::Duration::seconds(
            i64::try_from(self.policy.attribution_window_secs).unwrap_or(i64::MAX),
        );
        if outcome.created_at - decision.created_at > window {
            return Ok(());
        }
        let counts = |o: &Outcome| {
            self.policy
                .reward_of(placement, o.reward, &o.conversion_type, o.value)
        };
        let Some(reward) = counts(outcome) else {
            return Ok(());
        };
        if earlier > 0 {
            // Outcomes are kept in the order they were stored: the first `earlier` came
            // before this one.
            let outcomes = self.stores.decisions.outcomes(&decision.id).await?;
            let before = usize::try_from(earlier).unwrap_or(usize::MAX);
            if outcomes.iter().take(before).any(|o| counts(o).is_some()) {
                return Ok(());
            }
        }
        if reward <= 0.0 {
            return Ok(());
        }
        self.stores
            .bandit
            .add(placement, &outcome.item_id, ArmStats::reward(reward))
            .await?;
        if PolicyKind::parse(&decision.policy).is_some_and(PolicyKind::is_linear) {
            let x = linear_context(decision, self.policy.linear_dims);
            self.stores
                .bandit
                .add_linear(
                    placement,
                    &outcome.item_id,
                    &LinearStats::reward(&x, reward),
                )
                .await?;
        }
        Ok(())
    }
}

/// The linear policies' context vector of a decision's selected item, rebuilt from what
/// the decision recorded (the same inputs `choose` encoded).
fn linear_context(decision: &Decision, dims: usize) -> Vec<f64> {
    let item = &decision.selected().item.id;
    let model_score = decision
        .model_scores
        .as_ref()
        .and_then(|m| m.scores.get(item).copied());
    Featurizer { dims }.encode(
        &ContextInput {
            features: &decision.features,
            segments: &decision.segments,
            context: &decision.context,
            at: decision.created_at,
        },
        model_score,
    )
}

/// What `choose` decided: the ranking, the policy that made it, the candidates' bandit
/// statistics, and the linear policies' context vector per eligible candidate index.
struct Choice {
    ranking: Ranking,
    policy: String,
    stats: Vec<ArmStats>,
    contexts: BTreeMap<usize, Vec<f64>>,
    /// What the decision logs as its `arms`.
    arms: Vec<LoggedArm>,
    /// The bandit statistics could not be read: the policy ranked from priors.
    degraded: bool,
}

/// The model's answer for one decision, indexed like its candidates (NaN: not scored).
struct ModelView {
    scores: Scores,
    candidate: Vec<f64>,
    shadow: Vec<f64>,
}

impl ModelView {
    /// What the decision keeps of it: both versions' scores by item id.
    fn log(&self, candidates: &[Arc<ContentItem>]) -> ModelScores {
        let by_id = |scores: &[f64]| {
            candidates
                .iter()
                .zip(scores)
                .filter(|(_, s)| !s.is_nan())
                .map(|(c, &s)| (c.id.clone(), s))
                .collect()
        };
        ModelScores {
            version: self.scores.version.clone(),
            scores: by_id(&self.candidate),
            shadow_version: self.scores.shadow.as_ref().map(|s| s.version.clone()),
            shadow_scores: by_id(&self.shadow),
        }
    }
}

/// The name a decision gives its policy when no model-based pick happened (the
/// model's policies fall back to Thompson sampling).
fn policy_name(kind: PolicyKind) -> &'static str {
    match kind {
        PolicyKind::ModelGreedy | PolicyKind::Softmax => PolicyKind::Thompson.name(),
        other => other.name(),
    }
}

/// A rule weight as JSON: a pin is the string `"pin"` (JSON has no infinity).
fn weight_json(weight: f64) -> Value {
    if weight == f64::INFINITY {
        json!("pin")
    } else {
        json!(weight)
    }
}

#[allow(clippy::too_many_arguments)]
fn reasoning(
    policy: &str,
    placement: &str,
    candidates: usize,
    selected: &ScoredItem,
    ranking: &Ranking,
    ctx: &DecisionContext,
    effects: &RuleEffects,
    selected_index: usize,
) -> String {
    let mut notes = String::new();
    if !effects.fired.is_empty() {
        notes.push_str(&format!("; rules applied: {}", effects.fired.join(", ")));
    }
    for failure in &effects.failures {
        notes.push_str(&format!(
            "; rule '{}' skipped: {}",
            failure.rule, failure.error
        ));
    }
    if ctx.degraded {
        notes.push_str(
            "; degraded: a backend was slow or down, defaults (or the local copy of the catalog) used",
        );
    }
    if let Some(Effect::Pinned { rule }) = effects.trace[selected_index]
        .iter()
        .rev()
        .find(|e| matches!(e, Effect::Pinned { .. }))
    {
        return format!(
            "'{}' pinned by rule '{rule}' for {placement} ({candidates} eligible){notes}",
            selected.item.id
        );
    }
    if !ctx.purposes.personalization {
        return format!(
            "No personalization consent: highest-priority eligible item '{}' of {candidates} for {placement}{notes}",
            selected.item.id
        );
    }
    let estimated = match ranking.propensity_kind {
        PropensityKind::Estimated => "estimated ",
        PropensityKind::Exact => "",
    };
    let known = if ctx.profile.is_some() {
        ""
    } else {
        " (unknown customer)"
    };
    format!(
        "{policy} chose '{}' from {candidates} candidates for {placement}{known}: expected reward {:.3}, {estimated}propensity {:.3}{notes}",
        selected.item.id,
        selected.score,
        ranking.propensity,
    )
}

/// The request field an empty candidate set is blamed on: the caller's named items, or
/// the placement whose catalog had nothing left.
fn candidates_field(req: &PersonalizeRequest) -> &'static str {
    if req.available_items.is_some() {
        "availableItems"
    } else {
        "placement"
    }
}
