//! Off-policy evaluation: what a target policy would have earned, estimated from a log
//! of rounds that another (the logging) policy decided.
//!
//! - [`logged`]: [`LoggedRound`], one logged bandit round, its checks, and the JSONL
//!   format logs are imported from and exported to ([`read_jsonl`], [`write_jsonl`]);
//! - [`estimators`]: [`evaluate`] — inverse propensity scoring, its self-normalised form,
//!   the direct method and the doubly robust estimator, each with a 95% interval, plus
//!   the weight diagnostics (effective sample size, largest weight, clipped rounds);
//! - [`replay`]: the engine's own policies and model versions as target policies: rounds
//!   rebuilt from the decision log (or imported), the target replayed over them in time
//!   order;
//! - [`service`]: `evaluatePolicy` / `tailor ope` — the log, the replay and the
//!   estimators together.
//!
//! `logged` and `estimators` are pure logic: no storage, no clock, no randomness. The caller supplies, per round, the
//! target policy's probability for each of the round's actions and, for the direct method
//! and doubly robust, a reward model's estimate for each action; how those are computed
//! (a rule set, a model version, a bandit's posterior) is not this module's business.
//!
//! ## Assumptions
//!
//! Every estimate here is unbiased (IPS, DR) or consistent (SNIPS) only when:
//! - **propensities were logged at decision time**: `propensity` is the probability with
//!   which the logging policy chose the logged action, given what it knew then — not a
//!   value reconstructed later from a policy that has since learned;
//! - **common support**: every action the target policy may choose in a context had a
//!   positive probability under the logging policy in that context. An action the
//!   logging policy never takes is invisible to the log; no estimator can recover its
//!   value, and the estimates silently leave it out;
//! - rounds are independent draws of (context, action, reward), and the reward of a round
//!   depends only on its context and action.
//!
//! The module can check none of these from the log alone; the weight diagnostics (a
//! small effective sample size, a huge largest weight) are the symptoms to look for.

pub mod estimators;
pub mod logged;
pub mod replay;
pub mod service;

pub use estimators::{evaluate, Estimate, Estimator, Evaluation, Options, LEVEL};
pub use logged::{read_jsonl, write_jsonl, LoggedRound};

use crate::error::Error;

#[derive(Debug, thiserror::Error)]
pub enum OpeError {
    /// Bad input from a caller or an imported file; `field` names it (`rounds[3].propensity`,
    /// `line 4.action`).
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// The target policy puts no probability on any logged action: every importance weight
    /// is 0, so the log says nothing about it.
    #[error("target: gives probability 0 to every logged action; the log cannot evaluate it")]
    NoOverlap,
    /// Reading or writing a log failed for a reason other than its content.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl OpeError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        OpeError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

pub type OpeResult<T> = std::result::Result<T, OpeError>;

impl From<OpeError> for Error {
    fn from(e: OpeError) -> Self {
        match e {
            OpeError::Invalid { field, message } => Error::Invalid { field, message },
            e @ OpeError::NoOverlap => {
                let text = e.to_string();
                let message = text.strip_prefix("target: ").unwrap_or(&text);
                Error::invalid("target", message)
            }
            OpeError::Io(e) => Error::Internal(anyhow::Error::new(e).context("OPE log i/o")),
        }
    }
}
