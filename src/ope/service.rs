//! `evaluatePolicy` and `tailor ope`: the decision log (or imported JSONL) through the
//! replay and the estimators.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::Serialize;

use super::replay::{self, Round, Skipped, Target};
use super::{evaluate, Evaluation, LoggedRound, Options};
use crate::config::PolicySettings;
use crate::content::ContentItem;
use crate::error::{Error, Result};
use crate::model::serving::LoadedModel;
use crate::model::ModelService;
use crate::storage::DecisionStore;

/// Most rounds one evaluation reads (the newest ones).
pub const MAX_ROUNDS: usize = 200_000;
/// Rounds read when the caller does not say.
pub const DEFAULT_ROUNDS: usize = 10_000;
/// Decisions read from the log per page.
const PAGE: usize = 1_000;

/// What to evaluate, and on which part of the log.
#[derive(Debug, Clone, PartialEq)]
pub struct EvaluateRequest {
    /// `uniform` or a policy name (`thompson_sampling`, `lin_ucb`, `model_greedy`, …).
    pub policy: String,
    /// The model version the policy uses and the doubly robust estimator's regressor;
    /// `None`: the active version, if any.
    pub model_version: Option<String>,
    /// Only decisions of this placement.
    pub placement: Option<String>,
    /// The newest `rounds` decisions that can be evaluated, at most [`MAX_ROUNDS`].
    pub rounds: usize,
    /// Importance weights above this are cut to it (less variance, some bias).
    pub clip: Option<f64>,
    /// Seed of the Monte Carlo draws of Thompson sampling's distribution.
    pub seed: u64,
}

impl EvaluateRequest {
    pub fn new(policy: impl Into<String>) -> Self {
        EvaluateRequest {
            policy: policy.into(),
            model_version: None,
            placement: None,
            rounds: DEFAULT_ROUNDS,
            clip: None,
            seed: 1,
        }
    }

    fn target(&self) -> Result<Target> {
        Target::parse(&self.policy).ok_or_else(|| {
            Error::invalid(
                "policy",
                format!(
                    "unknown policy '{}' (expected uniform, {})",
                    self.policy,
                    crate::config::PolicyKind::names()
                ),
            )
        })
    }

    fn check(&self) -> Result<()> {
        if self.rounds == 0 || self.rounds > MAX_ROUNDS {
            return Err(Error::invalid(
                "rounds",
                format!("must be between 1 and {MAX_ROUNDS}"),
            ));
        }
        if self.clip.is_some_and(|c| !(c.is_finite() && c >= 1.0)) {
            return Err(Error::invalid("clip", "must be a number ≥ 1"));
        }
        Ok(())
    }
}

/// An evaluation with what it evaluated and what it left out.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicyEvaluation {
    pub policy: String,
    /// The model version the policy and the regressor used, if any.
    pub model_version: Option<String>,
    /// What the direct method and doubly robust estimators' reward estimates came from.
    pub regressor: String,
    /// Decisions of the log that could not be evaluated, by reason.
    pub skipped: Skipped,
    /// Rounds whose arms the model could not score (estimates from arm means instead).
    pub unscored: usize,
    #[serde(flatten)]
    pub evaluation: Evaluation,
}

/// Evaluates `req` on the newest rounds of the decision log.
pub async fn evaluate_log(
    decisions: &dyn DecisionStore,
    models: &Arc<ModelService>,
    catalog: &[Arc<ContentItem>],
    policy: &PolicySettings,
    req: &EvaluateRequest,
) -> Result<PolicyEvaluation> {
    req.check()?;
    let target = req.target()?;
    let model = load_model(models, req.model_version.as_deref()).await?;
    let now = chrono::Utc::now();
    let by_id: std::collections::HashMap<&str, &Arc<ContentItem>> =
        catalog.iter().map(|c| (c.id.as_str(), c)).collect();
    let find = |id: &str| by_id.get(id).map(|c| Arc::clone(c));
    let mut rounds: VecDeque<Round> = VecDeque::new();
    let mut skipped = Skipped::default();
    let mut after: Option<String> = None;
    loop {
        let page = decisions.scan(after.as_deref(), PAGE).await?;
        let Some((last, _)) = page.last() else {
            break;
        };
        after = Some(last.id.clone());
        let full = page.len() == PAGE;
        let (more, s) = replay::rounds_from_log(page, policy, req.placement.as_deref(), now, &find);
        skipped.unpersonalized += s.unpersonalized;
        skipped.open_window += s.open_window;
        skipped.other_placement += s.other_placement;
        skipped.inconsistent += s.inconsistent;
        rounds.extend(more);
        while rounds.len() > req.rounds {
            rounds.pop_front();
        }
        if !full {
            break;
        }
    }
    let mut rounds: Vec<Round> = rounds.into();
    rounds.sort_by_key(|r| r.at);
    if rounds.is_empty() {
        return Err(Error::invalid(
            "policy",
            "no decision of the log can be evaluated yet (none made by a policy, or their attribution window is still open)",
        ));
    }
    let settings = policy.clone();
    let seed = req.seed;
    let clip = req.clip;
    let name = target.name().to_owned();
    tokio::task::spawn_blocking(move || {
        run(
            &rounds,
            target,
            &settings,
            model.as_ref(),
            seed,
            clip,
            name,
            skipped,
        )
    })
    .await
    .map_err(|e| Error::Internal(anyhow::anyhow!("policy evaluation failed: {e}")))?
}

/// Evaluates `policy` on bandit data logged by another system (no model: its actions
/// are not Tailor content).
pub fn evaluate_imported(
    logged: Vec<LoggedRound>,
    policy: &PolicySettings,
    req: &EvaluateRequest,
) -> Result<PolicyEvaluation> {
    req.check()?;
    let target = req.target()?;
    if req.model_version.is_some() {
        return Err(Error::invalid(
            "modelVersion",
            "imported logs cannot be scored by a model (their actions are not Tailor content)",
        ));
    }
    let mut rounds = replay::rounds_from_imported(logged);
    if rounds.len() > req.rounds {
        rounds.drain(..rounds.len() - req.rounds);
    }
    run(
        &rounds,
        target,
        policy,
        None,
        req.seed,
        req.clip,
        target.name().to_owned(),
        Skipped::default(),
    )
}

#[allow(clippy::too_many_arguments)]
fn run(
    rounds: &[Round],
    target: Target,
    policy: &PolicySettings,
    model: Option<&LoadedModel>,
    seed: u64,
    clip: Option<f64>,
    name: String,
    skipped: Skipped,
) -> Result<PolicyEvaluation> {
    let replayed = replay::replay(rounds, target, policy, model, seed);
    let logged: Vec<LoggedRound> = rounds.iter().map(Round::logged).collect();
    let evaluation = evaluate(
        &logged,
        &replayed.distributions,
        Some(&replayed.estimates),
        Options { clip },
    )?;
    Ok(PolicyEvaluation {
        policy: name,
        model_version: model.map(|m| m.version().to_owned()),
        regressor: replayed.regressor,
        skipped,
        unscored: replayed.unscored,
        evaluation,
    })
}

/// The version asked for, else the active one, else none.
async fn load_model(
    models: &Arc<ModelService>,
    version: Option<&str>,
) -> Result<Option<LoadedModel>> {
    let version = match version {
        Some(v) => v.to_owned(),
        None => match models.scorer().active_version() {
            Some(v) => v,
            None => return Ok(None),
        },
    };
    if !models
        .versions()?
        .iter()
        .any(|v| v.manifest.version == version)
    {
        return Err(Error::not_found("modelVersion", "model version", &version));
    }
    let models = Arc::clone(models);
    let loaded = tokio::task::spawn_blocking(move || {
        models.registry().load(&version, models.scorer().device())
    })
    .await
    .map_err(|e| Error::Internal(anyhow::anyhow!("loading the model failed: {e}")))??;
    Ok(Some(loaded))
}
