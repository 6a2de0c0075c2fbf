//! Experiments in the pipeline: assignment after the customer's segments are loaded,
//! the variant's pinned item, and counting a decision's conversion once.
//!
//! Exposures are counted in `record` (one per decision and experiment). The variant's
//! policy, rule set and model version are applied by `personalize` itself.

use std::sync::Arc;

use super::{DecisionContext, DecisionEngine};
use crate::content::ContentItem;
use crate::customers::CustomerId;
use crate::decision::Decision;
use crate::error::Result;
use crate::experiments::Applied;
use crate::rules::runtime::{Effect, RuleEffects};

impl DecisionEngine {
    /// The customer's experiments, after segments are known. Customers without
    /// personalization consent are in none (they get the non-personalized default).
    /// Experiments that cannot be read are skipped for this decision (logged and
    /// counted), never fail it.
    pub(super) async fn assign_experiments(
        &self,
        customer: &CustomerId,
        ctx: &DecisionContext,
    ) -> Applied {
        if !ctx.purposes.personalization {
            return Applied::default();
        }
        self.experiments
            .assign(customer, &ctx.segments)
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "Failed to read experiments; deciding without them");
                self.metrics.backend_error("experiments");
                Applied::default()
            })
    }

    /// Counts the decision's conversion in its experiments, once per decision: only
    /// when the outcome just stored (the `earlier`-th) is the decision's first with a
    /// positive reward.
    pub(super) async fn count_conversion(
        &self,
        decision: &Decision,
        earlier: u64,
        value: Option<f64>,
    ) -> Result<()> {
        let outcomes = self.stores.decisions.outcomes(&decision.id).await?;
        let first_positive = outcomes.iter().position(|o| o.reward > 0.0);
        if first_positive.is_some_and(|i| i as u64 == earlier) {
            self.experiments
                .record_conversion(&decision.experiments, value.unwrap_or(0.0))
                .await?;
        }
        Ok(())
    }
}

/// Marks the experiment's pinned item as pinned (weight ∞) when it is a candidate no
/// rule or frequency cap removed, and returns its index.
pub(super) fn pin(
    applied: &Applied,
    candidates: &[Arc<ContentItem>],
    effects: &mut RuleEffects,
) -> Option<usize> {
    let (item, experiment) = applied.pin.as_ref()?;
    let i = candidates.iter().position(|c| &c.id == item)?;
    if effects.filtered[i].is_some() {
        return None;
    }
    effects.weights[i] = f64::INFINITY;
    effects.trace[i].push(Effect::Pinned {
        rule: format!("experiment:{experiment}"),
    });
    Some(i)
}
