//! Off-policy evaluation of Tailor's own policies and model versions: rebuild each
//! logged round from the decision log (or from imported JSONL), replay the target policy
//! over the rounds in time order, and hand its per-round distributions to the
//! estimators.
//!
//! **Replay.** A learning policy's choice depends on its state, which the log does not
//! hold. The target starts from empty statistics and learns from every logged round
//! after it was evaluated on it (the logged action and its reward, as the engine would
//! have learned them), so its distribution at round `t` uses only rounds before `t`. This
//! estimates the value of the policy trained on the same history, not of a policy with
//! today's state.
//!
//! **Support.** The action set of a round is the decision's `arms` (what the logging
//! policy chose among, with their rule weights); a pinned or single-candidate decision
//! has one action, chosen with certainty by any policy. Rounds without a positive
//! logged propensity, or whose chosen item is not among its arms, are skipped and
//! counted.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;
use serde_json::Value;

use super::LoggedRound;
use crate::bandit::linear::{self, ContextInput, Featurizer, LinearArm, LinearStats};
use crate::bandit::{policy, ArmStats};
use crate::config::{PolicyKind, PolicySettings};
use crate::content::ContentItem;
use crate::decision::{Decision, Outcome};
use crate::model::schema::ScoreContext;
use crate::model::serving::{LoadedModel, ScoreRequest};

/// One logged round, with everything a target policy needs to recompute its choice.
#[derive(Debug, Clone)]
pub struct Round {
    pub placement: String,
    pub arms: Vec<String>,
    pub weights: Vec<f64>,
    /// The arms as content, for the model (`None`: not known any more).
    pub items: Vec<Option<Arc<ContentItem>>>,
    pub chosen: usize,
    pub propensity: f64,
    pub reward: f64,
    pub features: BTreeMap<String, f64>,
    pub segments: Vec<String>,
    pub context: Value,
    pub at: DateTime<Utc>,
}

impl Round {
    /// The round as the estimators see it.
    pub fn logged(&self) -> LoggedRound {
        LoggedRound {
            actions: self.arms.clone(),
            chosen: self.chosen,
            propensity: self.propensity,
            reward: self.reward,
            context: self.features.clone(),
        }
    }
}

/// Decisions of the log that could not be evaluated, by reason.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Skipped {
    /// Made without a policy (no consent): nothing to compare.
    pub unpersonalized: usize,
    /// The attribution window is still open: the reward is not final.
    pub open_window: usize,
    /// Another placement than the one asked for.
    pub other_placement: usize,
    /// No usable propensity, or the chosen item is not among the arms.
    pub inconsistent: usize,
}

/// The rounds of a decision log (decisions with their outcomes, any order). The reward
/// of a round follows the placement's reward definition: the first outcome that counts
/// within `policy.attribution_window_secs`, else 0. Decisions younger than the window
/// are left out, their reward not being final. `item` finds the content of an arm the
/// decision did not keep.
pub fn rounds_from_log(
    log: Vec<(Decision, Vec<Outcome>)>,
    policy: &PolicySettings,
    placement: Option<&str>,
    now: DateTime<Utc>,
    item: &dyn Fn(&str) -> Option<Arc<ContentItem>>,
) -> (Vec<Round>, Skipped) {
    let window = chrono::Duration::seconds(
        i64::try_from(policy.attribution_window_secs).unwrap_or(i64::MAX / 1000),
    );
    let mut skipped = Skipped::default();
    let mut rounds = Vec::new();
    for (decision, outcomes) in log {
        let at_placement = decision.placement.as_deref().unwrap_or("_");
        if placement.is_some_and(|p| p != at_placement) {
            skipped.other_placement += 1;
            continue;
        }
        if decision.policy == "default" {
            skipped.unpersonalized += 1;
            continue;
        }
        if decision.created_at + window > now {
            skipped.open_window += 1;
            continue;
        }
        let selected = decision.selected().item.id.clone();
        let (arms, weights): (Vec<String>, Vec<f64>) = if decision.arms.is_empty() {
            (vec![selected.clone()], vec![1.0])
        } else {
            decision
                .arms
                .iter()
                .map(|a| (a.id.clone(), a.weight))
                .unzip()
        };
        let Some(chosen) = arms.iter().position(|a| *a == selected) else {
            skipped.inconsistent += 1;
            continue;
        };
        let propensity = if decision.arms.is_empty() {
            1.0
        } else {
            decision.propensity
        };
        if !(propensity.is_finite() && propensity > 0.0 && propensity <= 1.0) {
            skipped.inconsistent += 1;
            continue;
        }
        let reward = outcomes
            .iter()
            .filter(|o| o.created_at - decision.created_at <= window)
            .find_map(|o| policy.reward_of(at_placement, o.reward, &o.conversion_type, o.value))
            .unwrap_or(0.0);
        let kept: HashMap<&str, &Arc<ContentItem>> = decision
            .items
            .iter()
            .chain(&decision.alternatives)
            .map(|s| (s.item.id.as_str(), &s.item))
            .collect();
        let items = arms
            .iter()
            .map(|a| {
                kept.get(a.as_str())
                    .map(|i| Arc::clone(i))
                    .or_else(|| item(a))
            })
            .collect();
        rounds.push(Round {
            placement: at_placement.to_owned(),
            arms,
            weights,
            items,
            chosen,
            propensity,
            reward,
            features: decision.features,
            segments: decision.segments,
            context: decision.context,
            at: decision.created_at,
        });
    }
    rounds.sort_by_key(|r| r.at);
    (rounds, skipped)
}

/// Rounds of bandit data logged by another system: its numeric context becomes the
/// customer features, every action has weight 1, and rounds keep the file's order.
pub fn rounds_from_imported(logged: Vec<LoggedRound>) -> Vec<Round> {
    logged
        .into_iter()
        .map(|r| Round {
            placement: "_".into(),
            weights: vec![1.0; r.actions.len()],
            items: vec![None; r.actions.len()],
            arms: r.actions,
            chosen: r.chosen,
            propensity: r.propensity,
            reward: r.reward,
            features: r.context,
            segments: Vec::new(),
            context: Value::Null,
            at: DateTime::<Utc>::UNIX_EPOCH,
        })
        .collect()
}

/// The policy being evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Every arm with the same probability.
    Uniform,
    /// One of the engine's policies, replayed over the log (module docs).
    Policy(PolicyKind),
}

impl Target {
    /// `uniform` or a policy name.
    pub fn parse(raw: &str) -> Option<Target> {
        if raw == "uniform" {
            return Some(Target::Uniform);
        }
        PolicyKind::parse(raw).map(Target::Policy)
    }

    pub fn name(self) -> &'static str {
        match self {
            Target::Uniform => "uniform",
            Target::Policy(kind) => kind.name(),
        }
    }
}

/// The target's distribution over each round's arms, and the direct-method estimate of
/// every arm's reward.
pub struct Replayed {
    pub distributions: Vec<Vec<f64>>,
    pub estimates: Vec<Vec<f64>>,
    /// What produced `estimates`: `model <version>`, or `arm_mean` (each arm's mean
    /// logged reward in its placement, under a Beta(1, 1) prior).
    pub regressor: String,
    /// Rounds the model could not score (an arm no longer in the catalog): their
    /// estimates come from the arm means.
    pub unscored: usize,
}

/// Replays `target` over `rounds` (in the order given). `model` scores the arms where
/// the policy uses the model (model-greedy, softmax, the bandits' prior, the linear
/// policies' model-score feature) and is the direct-method regressor; without it, the
/// model's policies fall back to Thompson sampling, as in the engine. `samples` draws
/// estimate a Thompson sampling distribution; `seed` makes it repeatable.
pub fn replay(
    rounds: &[Round],
    target: Target,
    settings: &PolicySettings,
    model: Option<&LoadedModel>,
    seed: u64,
) -> Replayed {
    let mut rng = StdRng::seed_from_u64(seed);
    let arm_means = arm_means(rounds);
    let featurizer = Featurizer {
        dims: settings.linear_dims,
    };
    let mut arms: HashMap<(String, String), ArmStats> = HashMap::new();
    let mut linear: HashMap<(String, String), LinearStats> = HashMap::new();
    let mut out = Replayed {
        distributions: Vec::with_capacity(rounds.len()),
        estimates: Vec::with_capacity(rounds.len()),
        regressor: model.map_or_else(
            || "arm_mean".to_owned(),
            |m| format!("model {}", m.version()),
        ),
        unscored: 0,
    };
    for round in rounds {
        let k = round.arms.len();
        let key = |a: &str| (round.placement.clone(), a.to_owned());
        let scores = model.and_then(|m| score(m, round));
        if model.is_some() && scores.is_none() {
            out.unscored += 1;
        }
        let mean_of = |i: usize| arm_means.get(&key(&round.arms[i])).copied().unwrap_or(0.5);
        out.estimates.push(match &scores {
            Some(s) => s.clone(),
            None => (0..k).map(mean_of).collect(),
        });
        let stats: Vec<ArmStats> = (0..k)
            .map(|i| {
                let s = arms.get(&key(&round.arms[i])).copied().unwrap_or_default();
                match &scores {
                    Some(p) => s.with_prior(p[i], settings.model_prior_strength),
                    None => s,
                }
            })
            .collect();
        let input = ContextInput {
            features: &round.features,
            segments: &round.segments,
            context: &round.context,
            at: round.at,
        };
        let contexts: Vec<Vec<f64>> = if matches!(target, Target::Policy(kind) if kind.is_linear())
        {
            (0..k)
                .map(|i| featurizer.encode(&input, scores.as_ref().map(|s| s[i])))
                .collect()
        } else {
            Vec::new()
        };
        let w = &round.weights;
        let thompson = |rng: &mut StdRng| {
            policy::thompson_distribution(&stats, w, settings.propensity_samples, rng)
        };
        let distribution = match target {
            _ if k == 1 => vec![1.0],
            Target::Uniform => vec![1.0 / k as f64; k],
            Target::Policy(kind) => match (kind, &scores) {
                (PolicyKind::ModelGreedy, Some(s)) => policy::greedy_distribution(s, w),
                (PolicyKind::Softmax, Some(s)) => {
                    policy::softmax_distribution(s, w, settings.softmax_temperature)
                }
                (PolicyKind::Thompson | PolicyKind::ModelGreedy | PolicyKind::Softmax, _) => {
                    thompson(&mut rng)
                }
                (PolicyKind::EpsilonGreedy, _) => {
                    policy::epsilon_greedy_distribution(&stats, w, settings.epsilon)
                }
                (PolicyKind::LinUcb | PolicyKind::LinearThompson, _) => {
                    let estimates: Vec<LinearArm> = (0..k)
                        .map(|i| {
                            let s = linear
                                .get(&key(&round.arms[i]))
                                .cloned()
                                .unwrap_or_else(|| LinearStats::zero(featurizer.dims));
                            LinearArm::estimate(&s, &contexts[i], settings.ridge)
                        })
                        .collect();
                    if kind == PolicyKind::LinUcb {
                        let first = linear::lin_ucb(&estimates, w, settings.alpha).order[0].0;
                        (0..k).map(|i| f64::from(u8::from(i == first))).collect()
                    } else {
                        linear::linear_thompson_distribution(&estimates, w, settings.linear_noise)
                    }
                }
            },
        };
        out.distributions.push(distribution);
        // Learn from the logged round, as the engine would have.
        let chosen = key(&round.arms[round.chosen]);
        let arm = arms.entry(chosen.clone()).or_default();
        arm.merge(ArmStats::trial());
        arm.merge(ArmStats::reward(round.reward));
        if !contexts.is_empty() {
            let x = &contexts[round.chosen];
            let s = linear
                .entry(chosen)
                .or_insert_with(|| LinearStats::zero(featurizer.dims));
            s.merge(&LinearStats::impression(x));
            s.merge(&LinearStats::reward(x, round.reward));
        }
    }
    out
}

/// The model's probabilities for a round's arms; `None` when an arm is unknown or the
/// model fails.
fn score(model: &LoadedModel, round: &Round) -> Option<Vec<f64>> {
    let items: Option<Vec<Arc<ContentItem>>> = round.items.iter().cloned().collect();
    let request = ScoreRequest {
        features: Arc::new(round.features.clone()),
        items: items?,
        context: ScoreContext::from_request(Some(&round.placement), &round.context, round.at),
        version: None,
    };
    let scores = model.score(&request).ok()?;
    Some(scores.into_iter().map(f64::from).collect())
}

/// Mean logged reward of every (placement, arm), under a Beta(1, 1) prior.
fn arm_means(rounds: &[Round]) -> HashMap<(String, String), f64> {
    let mut totals: HashMap<(String, String), ArmStats> = HashMap::new();
    for r in rounds {
        let s = totals
            .entry((r.placement.clone(), r.arms[r.chosen].clone()))
            .or_default();
        s.merge(ArmStats::trial());
        s.merge(ArmStats::reward(r.reward.clamp(0.0, 1.0)));
    }
    totals.into_iter().map(|(k, s)| (k, s.mean())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ope::{evaluate, Estimator, Options};
    use rand::Rng;

    /// A uniform log over two arms: "web" pays for web visitors, "app" for the others.
    fn contextual_log(n: usize) -> Vec<Round> {
        let mut rng = StdRng::seed_from_u64(2);
        (0..n)
            .map(|i| {
                let web = rng.random_bool(0.5);
                let chosen = rng.random_range(0..2);
                let pays = (chosen == 0) == web;
                Round {
                    placement: "hero".into(),
                    arms: vec!["web".into(), "app".into()],
                    weights: vec![1.0, 1.0],
                    items: vec![None, None],
                    chosen,
                    propensity: 0.5,
                    reward: f64::from(u8::from(pays)),
                    features: BTreeMap::new(),
                    segments: Vec::new(),
                    context: serde_json::json!({"device": if web { "web" } else { "mobile" }}),
                    at: DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::seconds(i as i64),
                }
            })
            .collect()
    }

    fn value(rounds: &[Round], target: Target) -> f64 {
        let replayed = replay(rounds, target, &PolicySettings::default(), None, 1);
        for d in &replayed.distributions {
            assert!((d.iter().sum::<f64>() - 1.0).abs() < 1e-6, "{d:?}");
        }
        let logged: Vec<LoggedRound> = rounds.iter().map(Round::logged).collect();
        let e = evaluate(
            &logged,
            &replayed.distributions,
            Some(&replayed.estimates),
            Options::default(),
        )
        .expect("evaluates");
        e.estimate(Estimator::Snips).expect("snips").value
    }

    #[test]
    fn contextual_policies_replay_to_a_higher_value_than_context_free_ones() {
        let rounds = contextual_log(2000);
        let uniform = value(&rounds, Target::Uniform);
        assert!((uniform - 0.5).abs() < 0.05, "{uniform}");
        let thompson = value(&rounds, Target::Policy(PolicyKind::Thompson));
        assert!(
            (thompson - 0.5).abs() < 0.08,
            "no context, no gain: {thompson}"
        );
        for kind in [PolicyKind::LinUcb, PolicyKind::LinearThompson] {
            let v = value(&rounds, Target::Policy(kind));
            assert!(v > 0.85, "{kind:?} learns the context: {v}");
        }
    }

    #[test]
    fn the_log_keeps_only_rounds_that_can_be_evaluated() {
        use crate::decision::{LoggedArm, PropensityKind, ScoredItem};
        let item = |id: &str| ContentItem {
            id: id.into(),
            ..crate::demo::catalog()[0].clone()
        };
        let at = Utc::now() - chrono::Duration::days(3);
        let decision = |id: &str, policy: &str, arms: &[&str], selected: &str| Decision {
            id: id.into(),
            customer_id: crate::customers::CustomerId::parse("c", "c1").expect("id"),
            placement: Some("hero".into()),
            items: vec![ScoredItem {
                item: Arc::new(item(selected)),
                score: 0.0,
            }],
            alternatives: Vec::new(),
            confidence_score: 0.0,
            reasoning: String::new(),
            latency_ms: 0.0,
            policy: policy.into(),
            propensity: 0.5,
            propensity_kind: PropensityKind::Exact,
            model_version: None,
            experiments: Vec::new(),
            segments: Vec::new(),
            arms: arms
                .iter()
                .map(|a| LoggedArm {
                    id: (*a).into(),
                    weight: 1.0,
                })
                .collect(),
            rules: Vec::new(),
            degraded: false,
            explanation: None,
            context: Value::Null,
            features: BTreeMap::new(),
            model_scores: None,
            created_at: at,
        };
        let outcome = |d: &str, ty: &str| Outcome {
            decision_id: d.into(),
            customer_id: crate::customers::CustomerId::parse("c", "c1").expect("id"),
            item_id: "a".into(),
            reward: 1.0,
            conversion_type: ty.into(),
            value: None,
            created_at: at + chrono::Duration::minutes(1),
        };
        let mut policy = PolicySettings::default();
        policy.placements.insert(
            "hero".into(),
            crate::config::PlacementPolicy {
                reward: crate::config::RewardKind::Conversion(vec!["purchase".into()]),
                ..Default::default()
            },
        );
        let log = vec![
            (
                decision("1", "epsilon_greedy", &["a", "b"], "a"),
                vec![outcome("1", "click")],
            ),
            (
                decision("2", "epsilon_greedy", &["a", "b"], "a"),
                vec![outcome("2", "purchase")],
            ),
            (decision("3", "default", &[], "a"), vec![]),
            (decision("4", "epsilon_greedy", &["b"], "a"), vec![]),
            (decision("5", "thompson_sampling", &[], "a"), vec![]),
        ];
        let catalog = |id: &str| (id == "b").then(|| Arc::new(item("b")));
        let (rounds, skipped) = rounds_from_log(log, &policy, None, Utc::now(), &catalog);
        assert_eq!(skipped.unpersonalized, 1);
        assert_eq!(
            skipped.inconsistent, 1,
            "the chosen item is not among the arms"
        );
        assert_eq!(rounds.len(), 3);
        assert_eq!(
            rounds[0].reward, 0.0,
            "a click is not this placement's reward"
        );
        assert_eq!(rounds[1].reward, 1.0);
        assert!(rounds[0].items.iter().all(Option::is_some), "arms found");
        assert_eq!(
            (rounds[2].arms.len(), rounds[2].propensity),
            (1, 1.0),
            "a pinned decision is one certain action"
        );
        let (_, skipped) = rounds_from_log(
            vec![(decision("6", "lin_ucb", &["a", "b"], "a"), vec![])],
            &policy,
            None,
            at,
            &catalog,
        );
        assert_eq!(skipped.open_window, 1);
    }
}
