//! Off-policy evaluation over GraphQL: `evaluatePolicy`.

use async_graphql::{Context, InputObject, Object, SimpleObject};

use super::auth::Allow;
use super::engine;
use super::error::{gql, GqlResult};
use crate::error::Error;
use crate::ope::service::{EvaluateRequest, PolicyEvaluation, DEFAULT_ROUNDS};

/// Which policy to evaluate on the decision log, and on which part of it.
#[derive(InputObject)]
pub struct EvaluatePolicyInput {
    /// `uniform` or a policy: thompson_sampling, epsilon_greedy, model_greedy, softmax,
    /// lin_ucb, linear_thompson (with this engine's policy settings).
    pub policy: String,
    /// The model version the policy uses and the doubly robust regressor (default: the
    /// active version, if any).
    pub model_version: Option<String>,
    /// Only decisions of this placement.
    pub placement: Option<String>,
    /// The newest decisions to evaluate on (default 10,000, at most 200,000).
    pub rounds: Option<i32>,
    /// Cut importance weights above this (≥ 1).
    pub clip: Option<f64>,
    /// Seed of the Monte Carlo draws of a Thompson sampling distribution.
    pub seed: Option<i64>,
}

/// One estimator's estimate of the policy's mean reward, with its 95% interval.
#[derive(SimpleObject)]
#[graphql(name = "PolicyEstimate")]
pub struct EstimateObject {
    /// `ips`, `snips`, `direct_method` or `doubly_robust`.
    pub estimator: String,
    pub value: f64,
    pub ci_low: f64,
    pub ci_high: f64,
    pub std_error: f64,
}

/// Decisions of the log left out, by reason.
#[derive(SimpleObject)]
#[graphql(name = "EvaluationSkipped")]
pub struct SkippedObject {
    /// Made without a policy (no personalization consent).
    pub unpersonalized: u64,
    /// Attribution window still open.
    pub open_window: u64,
    pub other_placement: u64,
    /// No usable propensity, or the chosen item is not among the logged arms.
    pub inconsistent: u64,
}

/// The estimated value (mean reward per decision) of a policy, from the decision log.
#[derive(SimpleObject)]
#[graphql(name = "PolicyEvaluation")]
pub struct PolicyEvaluationObject {
    pub policy: String,
    pub model_version: Option<String>,
    /// What the direct method and doubly robust estimates came from.
    pub regressor: String,
    pub rounds: u64,
    /// The mean reward the logging policies actually earned on these rounds.
    pub logged_value: f64,
    /// (Σw)² / Σw²: how many rounds the estimate is worth.
    pub effective_sample_size: f64,
    pub max_weight: f64,
    pub clip: Option<f64>,
    pub clipped_rounds: u64,
    pub estimates: Vec<EstimateObject>,
    pub skipped: SkippedObject,
    /// Rounds the model could not score (their estimates use arm means).
    pub unscored: u64,
}

impl From<PolicyEvaluation> for PolicyEvaluationObject {
    fn from(p: PolicyEvaluation) -> Self {
        let e = p.evaluation;
        PolicyEvaluationObject {
            policy: p.policy,
            model_version: p.model_version,
            regressor: p.regressor,
            rounds: e.rounds as u64,
            logged_value: e.logged_value,
            effective_sample_size: e.effective_sample_size,
            max_weight: e.max_weight,
            clip: e.clip,
            clipped_rounds: e.clipped_rounds as u64,
            estimates: e
                .estimates
                .into_iter()
                .map(|x| EstimateObject {
                    estimator: x.estimator.to_string(),
                    value: x.value,
                    ci_low: x.ci_low,
                    ci_high: x.ci_high,
                    std_error: x.std_error,
                })
                .collect(),
            skipped: SkippedObject {
                unpersonalized: p.skipped.unpersonalized as u64,
                open_window: p.skipped.open_window as u64,
                other_placement: p.skipped.other_placement as u64,
                inconsistent: p.skipped.inconsistent as u64,
            },
            unscored: p.unscored as u64,
        }
    }
}

#[derive(Default)]
pub struct OpeQuery;

#[Object]
impl OpeQuery {
    /// Estimates what `policy` would have earned on the decision log (IPS, self-normalised
    /// IPS, direct method and doubly robust, with 95% intervals and the effective sample
    /// size). Learning policies are replayed over the log in time order.
    #[graphql(guard = "Allow::ADMIN")]
    async fn evaluate_policy(
        &self,
        ctx: &Context<'_>,
        input: EvaluatePolicyInput,
    ) -> GqlResult<PolicyEvaluationObject> {
        let rounds = match input.rounds {
            None => DEFAULT_ROUNDS,
            Some(n) => usize::try_from(n)
                .map_err(|_| gql(Error::invalid("rounds", "must be a positive number")))?,
        };
        let seed = match input.seed {
            None => 1,
            Some(s) => {
                u64::try_from(s).map_err(|_| gql(Error::invalid("seed", "must not be negative")))?
            }
        };
        let req = EvaluateRequest {
            policy: input.policy,
            model_version: input.model_version,
            placement: input.placement,
            rounds,
            clip: input.clip,
            seed,
        };
        let evaluation = engine(ctx).evaluate_policy(&req).await.map_err(gql)?;
        Ok(evaluation.into())
    }
}
