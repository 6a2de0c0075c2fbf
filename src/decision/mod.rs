//! Decisions: what `personalize` returned and why, their outcomes, and the pipeline
//! that makes them ([`pipeline`]), one stage per function.

pub mod pipeline;

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::content::ContentItem;
use crate::customers::CustomerId;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoredItem {
    /// Shared with the catalog cache the decision was made from: not copied per decision.
    pub item: Arc<ContentItem>,
    pub score: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub experiment: String,
    pub variant: String,
}

/// How a propensity was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PropensityKind {
    /// Computed from the policy: in closed form (epsilon-greedy, softmax, deterministic
    /// defaults) or by deterministic quadrature (Thompson sampling, linear or Beta).
    Exact,
    /// Estimated by Monte Carlo over the policy's randomness (Beta Thompson sampling when
    /// an arm has no proper posterior; decisions stored before the quadrature).
    Estimated,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// UUIDv7: time-ordered.
    pub id: String,
    pub customer_id: CustomerId,
    pub placement: Option<String>,
    /// The chosen items, best first (`count` of them, fewer if there were fewer candidates).
    pub items: Vec<ScoredItem>,
    /// Candidates that were not chosen, best first.
    pub alternatives: Vec<ScoredItem>,
    pub confidence_score: f64,
    pub reasoning: String,
    pub latency_ms: f64,
    pub policy: String,
    /// Probability that the policy would pick the first item, given the same state.
    pub propensity: f64,
    pub propensity_kind: PropensityKind,
    pub model_version: Option<String>,
    pub experiments: Vec<Assignment>,
    pub segments: Vec<String>,
    /// The candidates the policy chose among (neither pinned nor weighted to 0), in
    /// candidate order, with their rule weights: what off-policy evaluation replays.
    /// Empty when no policy chose (no consent, a pin, a single candidate left).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub arms: Vec<LoggedArm>,
    /// Rules that filtered, re-weighted or pinned a candidate.
    #[serde(default)]
    pub rules: Vec<String>,
    pub degraded: bool,
    pub explanation: Option<Value>,
    /// The request context, as sent.
    pub context: Value,
    /// Feature values the decision was made with (point-in-time training data).
    pub features: BTreeMap<String, f64>,
    /// What the model said about the candidates, when a version was active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_scores: Option<ModelScores>,
    pub created_at: DateTime<Utc>,
}

impl Decision {
    pub fn selected(&self) -> &ScoredItem {
        // A decision is only ever built with at least one item.
        &self.items[0]
    }
}

/// A candidate a policy chose among, with the rule weight it was chosen with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoggedArm {
    pub id: String,
    pub weight: f64,
}

/// The active model's scores for a decision's candidates, and the shadow version's
/// beside them (logged so the two can be compared; only the active one serves).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelScores {
    pub version: String,
    /// Probability of a positive outcome, by item id.
    pub scores: BTreeMap<String, f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow_version: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub shadow_scores: BTreeMap<String, f64>,
}

/// One item shown to a customer by a decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Impression {
    pub item_id: String,
    /// When the decision was made, to the millisecond.
    pub at: DateTime<Utc>,
}

/// Reward feedback on a decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub decision_id: String,
    pub customer_id: CustomerId,
    pub item_id: String,
    /// In [0, 1]: 1 for a click or conversion.
    pub reward: f64,
    pub conversion_type: String,
    pub value: Option<f64>,
    pub created_at: DateTime<Utc>,
}
