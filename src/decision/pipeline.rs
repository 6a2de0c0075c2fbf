//! The `personalize` pipeline, one stage per function:
//! load context → candidates → (rules, model: later stages) → choose → record.
//! And `record_outcome`, which closes the loop.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use opentelemetry::KeyValue;
use rand::SeedableRng;
use serde_json::{json, Value};
use tokio::sync::broadcast;

use super::{Decision, Outcome, PropensityKind, ScoredItem};
use crate::bandit::policy::{self, Ranking};
use crate::bandit::ArmStats;
use crate::config::{PolicyKind, PolicySettings};
use crate::content::{CandidateFilter, Catalog, ContentItem};
use crate::customers::{Customer, CustomerId};
use crate::error::{Error, Result};
use crate::features::FeatureService;
use crate::storage::Stores;
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

/// What the pipeline knows about the customer when it decides.
struct DecisionContext {
    profile: Option<Customer>,
    features: BTreeMap<String, f64>,
    segments: Vec<String>,
    personalized: bool,
    degraded: bool,
}

pub struct DecisionEngine {
    stores: Stores,
    catalog: Arc<Catalog>,
    features: Arc<FeatureService>,
    policy: PolicySettings,
    default_consent: bool,
    max_candidates: usize,
    stream: broadcast::Sender<Arc<Decision>>,
    metrics: Arc<Metrics>,
}

impl DecisionEngine {
    pub fn new(
        stores: Stores,
        catalog: Arc<Catalog>,
        features: Arc<FeatureService>,
        policy: PolicySettings,
        default_consent: bool,
        max_candidates: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        DecisionEngine {
            stores,
            catalog,
            features,
            policy,
            default_consent,
            max_candidates,
            stream: broadcast::channel(STREAM_CAPACITY).0,
            metrics,
        }
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
        let ctx = self.load_context(&req.customer_id, now).await?;
        let (candidates, filtered) = self.candidates(&req, &ctx, now).await?;
        let placement = req.placement.as_deref().unwrap_or(NO_PLACEMENT);
        let (ranking, policy_name, stats) = self.choose(placement, &candidates, &ctx).await?;

        let mut ranked = ranking.order.iter().map(|&(i, score)| ScoredItem {
            item: candidates[i].clone(),
            score,
        });
        let items: Vec<ScoredItem> = ranked.by_ref().take(req.count).collect();
        let alternatives: Vec<ScoredItem> = ranked.take(MAX_ALTERNATIVES).collect();
        let selected = &items[0];
        let reasoning = reasoning(
            &policy_name,
            placement,
            candidates.len(),
            selected,
            &ranking,
            &ctx,
        );
        let explanation = req.explain.then(|| {
            json!({
                "policy": policy_name,
                "candidates": ranking.order.iter().map(|&(i, score)| json!({
                    "id": candidates[i].id,
                    "score": score,
                    "impressions": stats.get(i).map_or(0.0, |s| s.trials),
                    "reward": stats.get(i).map_or(0.0, |s| s.reward),
                })).collect::<Vec<_>>(),
                "filtered": filtered,
                "rules": [],
                "features": ctx.features,
                "personalized": ctx.personalized,
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
            model_version: None,
            experiments: Vec::new(),
            segments: ctx.segments,
            degraded: ctx.degraded,
            explanation,
            context: req.context,
            features: ctx.features,
            created_at: now,
            items,
            alternatives,
        };
        self.record(decision, placement, started).await
    }

    /// Stage 1: profile, features (with a deadline) and segments, concurrently.
    #[tracing::instrument(skip_all)]
    async fn load_context(
        &self,
        customer: &CustomerId,
        now: DateTime<Utc>,
    ) -> Result<DecisionContext> {
        let (profile, features, segments) = tokio::join!(
            self.stores.profiles.get(customer),
            self.features.read(customer, None, "features", now),
            self.stores.segments.segments_of(customer),
        );
        let mut degraded = false;
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
        let personalized = profile
            .as_ref()
            .and_then(|p| p.consent.personalization)
            .unwrap_or(self.default_consent);
        Ok(DecisionContext {
            profile,
            features,
            segments,
            personalized,
            degraded,
        })
    }

    /// Stage 2: the request's items, or the catalog filtered by placement, type, active
    /// window and segment eligibility; sorted by priority (highest first), then id.
    #[tracing::instrument(skip_all)]
    async fn candidates(
        &self,
        req: &PersonalizeRequest,
        ctx: &DecisionContext,
        now: DateTime<Utc>,
    ) -> Result<(Vec<ContentItem>, Vec<Value>)> {
        let segments = &ctx.segments;
        let mut filtered = Vec::new();
        let mut items = match &req.available_items {
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
                        items.push(item);
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
                    segments: Some(segments),
                };
                let mut items = Vec::new();
                for item in self.catalog.items().await?.iter() {
                    if filter.matches(item) {
                        items.push(item.clone());
                    } else if req.explain
                        && (CandidateFilter {
                            segments: None,
                            ..filter.clone()
                        })
                        .matches(item)
                    {
                        filtered.push(json!({"id": item.id, "reason": "not eligible for the customer's segments"}));
                    }
                }
                items
            }
        };
        items.sort_by(|a, b| b.priority.cmp(&a.priority).then_with(|| a.id.cmp(&b.id)));
        // A request naming an item twice gets it once (equal ids sort together).
        items.dedup_by(|a, b| a.id == b.id);
        items.truncate(self.max_candidates);
        if items.is_empty() {
            let field = if req.available_items.is_some() {
                "availableItems"
            } else {
                "placement"
            };
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

    /// Stage 5: the policy ranks the candidates; without personalization consent the
    /// highest-priority item wins.
    #[tracing::instrument(skip_all)]
    async fn choose(
        &self,
        placement: &str,
        candidates: &[ContentItem],
        ctx: &DecisionContext,
    ) -> Result<(Ranking, String, Vec<ArmStats>)> {
        if !ctx.personalized {
            return Ok((
                policy::by_priority(candidates.len()),
                "default".into(),
                Vec::new(),
            ));
        }
        let arms: Vec<String> = candidates.iter().map(|c| c.id.clone()).collect();
        let stats = match self.stores.bandit.get(placement, &arms).await {
            Ok(stats) => stats,
            Err(e) => {
                tracing::warn!(error = %e, "Failed to read bandit state; exploring from priors");
                self.metrics.backend_error("bandit");
                vec![ArmStats::default(); arms.len()]
            }
        };
        // The RNG is per decision and seeded from the OS: no shared lock on the hot path.
        let mut rng = rand::rngs::SmallRng::from_os_rng();
        let (ranking, name) = match self.policy.default {
            PolicyKind::Thompson => (
                policy::thompson(&stats, self.policy.propensity_samples, &mut rng),
                "thompson_sampling",
            ),
            PolicyKind::EpsilonGreedy => (
                policy::epsilon_greedy(&stats, self.policy.epsilon, &mut rng),
                "epsilon_greedy",
            ),
        };
        Ok((ranking, name.into(), stats))
    }

    /// Stage 6: store the decision, count an impression per shown item, publish.
    #[tracing::instrument(skip_all)]
    async fn record(
        &self,
        mut decision: Decision,
        placement: &str,
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
            Ok::<_, crate::storage::StorageError>(())
        };
        let (stored, counted) = tokio::join!(self.stores.decisions.put(&decision), impressions);
        stored.inspect_err(|_| self.metrics.backend_error("decisions"))?;
        if let Err(e) = counted {
            tracing::warn!(error = %e, "Failed to count impressions");
            self.metrics.backend_error("bandit");
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
        if earlier == 0 && decision.policy != "default" && reward > 0.0 {
            let placement = decision.placement.as_deref().unwrap_or(NO_PLACEMENT);
            self.stores
                .bandit
                .add(placement, &outcome.item_id, ArmStats::reward(reward))
                .await?;
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

fn reasoning(
    policy: &str,
    placement: &str,
    candidates: usize,
    selected: &ScoredItem,
    ranking: &Ranking,
    ctx: &DecisionContext,
) -> String {
    if !ctx.personalized {
        return format!(
            "No personalization consent: highest-priority eligible item '{}' of {candidates} for {placement}",
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
        "{policy} chose '{}' from {candidates} candidates for {placement}{known}: expected reward {:.3}, {estimated}propensity {:.3}{}",
        selected.item.id,
        selected.score,
        ranking.propensity,
        if ctx.degraded { "; degraded: features defaulted" } else { "" }
    )
}
