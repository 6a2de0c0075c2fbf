//! `ExperimentService`: experiments' life cycle (create, status), assignment on the
//! decision path, exposure and conversion counting, and results.
//!
//! Storage: each experiment is a `DefinitionKind::Experiment` definition named by its
//! key; every change (creation, each status change) stores a new version of the whole
//! definition, so the version history says when it started and stopped. Counters are
//! additive [`VariantTotals`] in the [`ExperimentStore`].
//!
//! Creation and status changes are serialized within this process (a layer's free
//! range is computed and claimed under one lock). Two replicas creating experiments in
//! the same layer at the same moment could claim overlapping ranges: create layered
//! experiments through one replica at a time.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde::Serialize;

use super::assignment::{self, Holdout, BUCKETS};
use super::definition::{traffic_buckets, LayerRange, LayerSlot, RuleOverride};
use super::stats::{self, Comparison, Srm, VariantSummary};
use super::{Experiment, ExperimentInput, Status, VariantTotals};
use crate::config::PolicyKind;
use crate::customers::CustomerId;
use crate::decision::Assignment;
use crate::error::{Error, Result};
use crate::snapshot::Snapshot;
use crate::storage::{
    ContentStore, DefinitionKind, DefinitionStore, ExperimentStore, StorageError, StorageResult,
};

/// What a decision does because of the customer's experiments. When two experiments set
/// the same override, the one with the smaller key wins (experiments that must not
/// interfere belong in one layer).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Applied {
    /// One per experiment the customer is in, by experiment key.
    pub assignments: Vec<Assignment>,
    pub policy: Option<PolicyKind>,
    /// The model version the customer's variant asks for: the pipeline's model stage
    /// scores with it instead of the active version.
    pub model_version: Option<String>,
    pub rules: Option<RuleOverride>,
    /// (item id, experiment key): the item to show first when it is an eligible candidate.
    pub pin: Option<(String, String)>,
}

/// One variant's results.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VariantResult {
    pub key: String,
    pub weight: f64,
    pub summary: VariantSummary,
    /// Against the control; `None` for the control itself.
    pub vs_control: Option<Comparison>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExperimentResults {
    pub key: String,
    pub status: Status,
    pub control: String,
    /// In the experiment's variant order.
    pub variants: Vec<VariantResult>,
    /// Exposures against the configured weights; `None` before any exposure.
    pub srm: Option<Srm>,
}

pub struct ExperimentService {
    definitions: Arc<dyn DefinitionStore>,
    totals: Arc<dyn ExperimentStore>,
    content: Arc<dyn ContentStore>,
    holdout: Holdout,
    /// The running experiments, as the decision path reads them.
    running: Snapshot<Vec<Experiment>>,
    /// Serializes creation and status changes (tokio: held across storage calls).
    changes: tokio::sync::Mutex<()>,
}

impl ExperimentService {
    /// `ttl`: how long the decision path trusts its copy of the running experiments when
    /// another replica may have changed them (this process's changes show at once).
    pub fn new(
        definitions: Arc<dyn DefinitionStore>,
        totals: Arc<dyn ExperimentStore>,
        content: Arc<dyn ContentStore>,
        holdout: Holdout,
        ttl: Duration,
    ) -> Self {
        ExperimentService {
            definitions,
            totals,
            content,
            holdout,
            running: Snapshot::new(ttl),
            changes: tokio::sync::Mutex::new(()),
        }
    }

    pub fn holdout(&self) -> &Holdout {
        &self.holdout
    }

    /// Validates and stores a new experiment as a draft. Lookups: the targeting segment
    /// must be defined, pins must be content items, rule names must satisfy
    /// `rule_exists`; a layered experiment gets the first free range of its layer.
    pub async fn create(
        &self,
        input: ExperimentInput,
        rule_exists: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<Experiment> {
        let (mut experiment, layer) = input.validate(Utc::now())?;
        for (i, v) in experiment.variants.iter().enumerate() {
            if let Some(RuleOverride::Only(names)) = &v.overrides.rules {
                for (j, name) in names.iter().enumerate() {
                    if !rule_exists(name) {
                        return Err(Error::invalid(
                            format!("input.variants[{i}].rules[{j}]"),
                            format!("unknown rule '{name}'"),
                        ));
                    }
                }
            }
            if let Some(pin) = &v.overrides.pin {
                if self.content.get(pin).await?.is_none() {
                    return Err(Error::invalid(
                        format!("input.variants[{i}].pin"),
                        format!("unknown content item '{pin}'"),
                    ));
                }
            }
        }
        if let Some(segment) = &experiment.targeting_segment {
            if self
                .definitions
                .get(DefinitionKind::Segment, segment, None)
                .await?
                .is_none()
            {
                return Err(Error::invalid(
                    "input.targetingSegment",
                    format!("unknown segment '{segment}'"),
                ));
            }
        }
        let _changing = self.changes.lock().await;
        if self.load(&experiment.key).await?.is_some() {
            return Err(Error::invalid(
                "input.key",
                format!("experiment '{}' already exists", experiment.key),
            ));
        }
        if let Some(layer) = layer {
            let taken: Vec<LayerRange> = self
                .list()
                .await?
                .into_iter()
                .filter(|e| e.status != Status::Stopped)
                .filter_map(|e| e.layer.filter(|slot| slot.name == layer))
                .map(|slot| slot.range)
                .collect();
            let size = traffic_buckets(experiment.traffic_percent);
            let range = free_range(&taken, size).ok_or_else(|| {
                let free = BUCKETS - taken.iter().map(|r| r.end - r.start).sum::<u32>();
                Error::invalid(
                    "input.trafficPercent",
                    format!(
                        "layer '{layer}' has no free range of {}% (free in all: {}%)",
                        experiment.traffic_percent,
                        f64::from(free) / 100.0
                    ),
                )
            })?;
            experiment.layer = Some(LayerSlot { name: layer, range });
        }
        self.store(&experiment).await?;
        Ok(experiment)
    }

    /// Moves an experiment to `status` (draft → running → stopped; stopped is final).
    pub async fn set_status(&self, key: &str, status: Status) -> Result<Experiment> {
        let _changing = self.changes.lock().await;
        let mut experiment = self
            .load(key)
            .await?
            .ok_or_else(|| Error::not_found("key", "experiment", key))?;
        if experiment.status == status {
            return Ok(experiment);
        }
        if !experiment.status.can_become(status) {
            return Err(Error::invalid(
                "status",
                format!(
                    "experiment '{key}' is {} and cannot become {}",
                    experiment.status.as_str(),
                    status.as_str()
                ),
            ));
        }
        let now = Utc::now();
        match status {
            Status::Running => experiment.started_at = Some(now),
            Status::Stopped => experiment.stopped_at = Some(now),
            Status::Draft => {}
        }
        experiment.status = status;
        self.store(&experiment).await?;
        Ok(experiment)
    }

    pub async fn get(&self, key: &str) -> Result<Option<Experiment>> {
        Ok(self.load(key).await?)
    }

    /// Every experiment, by key.
    pub async fn list(&self) -> Result<Vec<Experiment>> {
        Ok(self.load_all().await?)
    }

    /// The running experiments, from a copy at most `ttl` old (or fresh after a change
    /// made by this process).
    pub async fn running(&self) -> StorageResult<Arc<Vec<Experiment>>> {
        self.running
            .get_or_load(|| async {
                Ok(self
                    .load_all()
                    .await?
                    .into_iter()
                    .filter(|e| e.status == Status::Running)
                    .collect())
            })
            .await
    }

    /// The customer's experiments and what they change for this decision.
    pub async fn assign(
        &self,
        customer: &CustomerId,
        segments: &[String],
    ) -> StorageResult<Applied> {
        let running = self.running().await?;
        let mut applied = Applied::default();
        for (experiment, variant) in
            assignment::assign(&running, customer.as_str(), segments, &self.holdout)
        {
            applied.assignments.push(Assignment {
                experiment: experiment.key.clone(),
                variant: variant.key.clone(),
            });
            let o = &variant.overrides;
            if applied.policy.is_none() {
                applied.policy = o.policy;
            }
            if applied.model_version.is_none() {
                applied.model_version.clone_from(&o.model_version);
            }
            if applied.rules.is_none() {
                applied.rules.clone_from(&o.rules);
            }
            if applied.pin.is_none() {
                applied.pin = o.pin.clone().map(|p| (p, experiment.key.clone()));
            }
        }
        Ok(applied)
    }

    /// Counts one exposure for each assignment of a decision.
    pub async fn record_exposures(&self, assignments: &[Assignment]) -> StorageResult<()> {
        self.add(assignments, VariantTotals::exposure()).await
    }

    /// Counts one conversion with `value` for each assignment of a decision. The caller
    /// makes sure a decision converts at most once.
    pub async fn record_conversion(
        &self,
        assignments: &[Assignment],
        value: f64,
    ) -> StorageResult<()> {
        self.add(assignments, VariantTotals::conversion(value))
            .await
    }

    async fn add(&self, assignments: &[Assignment], delta: VariantTotals) -> StorageResult<()> {
        if assignments.is_empty() {
            return Ok(());
        }
        let deltas: Vec<(String, String, VariantTotals)> = assignments
            .iter()
            .map(|a| (a.experiment.clone(), a.variant.clone(), delta))
            .collect();
        self.totals.add(&deltas).await
    }

    /// Per-variant figures, each treatment against the control, and the SRM check.
    pub async fn results(&self, key: &str) -> Result<Option<ExperimentResults>> {
        let Some(experiment) = self.load(key).await? else {
            return Ok(None);
        };
        let stored = self.totals.totals(key).await?;
        let totals: Vec<VariantTotals> = experiment
            .variants
            .iter()
            .map(|v| {
                stored
                    .iter()
                    .find(|(k, _)| *k == v.key)
                    .map(|(_, t)| *t)
                    .unwrap_or_default()
            })
            .collect();
        let control = totals[0];
        let variants = experiment
            .variants
            .iter()
            .zip(&totals)
            .enumerate()
            .map(|(i, (v, t))| VariantResult {
                key: v.key.clone(),
                weight: v.weight,
                summary: VariantSummary::of(t),
                vs_control: (i > 0).then(|| stats::compare(&control, t)),
            })
            .collect();
        let exposures: Vec<u64> = totals.iter().map(|t| t.exposures).collect();
        Ok(Some(ExperimentResults {
            key: experiment.key.clone(),
            status: experiment.status,
            control: experiment.control().key.clone(),
            variants,
            srm: stats::srm(&exposures, &experiment.weights()),
        }))
    }

    async fn store(&self, experiment: &Experiment) -> Result<()> {
        let body = serde_json::to_value(experiment)
            .map_err(|e| Error::Internal(anyhow::anyhow!("serializing an experiment: {e}")))?;
        self.definitions
            .put(DefinitionKind::Experiment, &experiment.key, body)
            .await?;
        self.running.invalidate();
        Ok(())
    }

    async fn load(&self, key: &str) -> StorageResult<Option<Experiment>> {
        self.definitions
            .get(DefinitionKind::Experiment, key, None)
            .await?
            .map(|d| decode(&d.name, d.body))
            .transpose()
    }

    async fn load_all(&self) -> StorageResult<Vec<Experiment>> {
        self.definitions
            .list(DefinitionKind::Experiment)
            .await?
            .into_iter()
            .map(|d| decode(&d.name, d.body))
            .collect()
    }
}

fn decode(name: &str, body: serde_json::Value) -> StorageResult<Experiment> {
    serde_json::from_value(body)
        .map_err(|e| StorageError::Corrupt(format!("experiment {name}: {e}")))
}

/// The lowest free range of `size` buckets among `taken` (disjoint ranges).
fn free_range(taken: &[LayerRange], size: u32) -> Option<LayerRange> {
    let mut taken = taken.to_vec();
    taken.sort_by_key(|r| r.start);
    let mut start = 0;
    for r in &taken {
        if r.start >= start + size {
            break;
        }
        start = start.max(r.end);
    }
    (start + size <= BUCKETS).then_some(LayerRange {
        start,
        end: start + size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u32, end: u32) -> LayerRange {
        LayerRange { start, end }
    }

    #[test]
    fn free_ranges_are_the_lowest_gap_that_fits() {
        let cases: &[(&[LayerRange], u32, Option<LayerRange>)] = &[
            (&[], 10_000, Some(r(0, 10_000))),
            (&[], 2_500, Some(r(0, 2_500))),
            (&[r(0, 5_000)], 5_000, Some(r(5_000, 10_000))),
            (&[r(0, 5_000)], 5_001, None),
            (&[r(1_000, 2_000)], 1_000, Some(r(0, 1_000))),
            (&[r(1_000, 2_000)], 1_001, Some(r(2_000, 3_001))),
            (
                &[r(3_000, 4_000), r(0, 1_000)],
                2_000,
                Some(r(1_000, 3_000)),
            ),
            (&[r(0, 10_000)], 1, None),
        ];
        for (taken, size, want) in cases {
            let got = free_range(taken, *size);
            assert_eq!(got, *want, "taken {taken:?}, size {size}");
            if let Some(got) = got {
                assert!(taken.iter().all(|t| !t.overlaps(&got)));
            }
        }
    }
}
