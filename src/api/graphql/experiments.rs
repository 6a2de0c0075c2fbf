//! Experiments over GraphQL: `experiment(key)`, `experiments`, `experimentResults(key)`,
//! `createExperiment`, `setExperimentStatus`.

use async_graphql::{Context, Enum, InputObject, Object, SimpleObject};
use chrono::{DateTime, Utc};

use super::auth::Allow;
use super::engine;
use super::error::{gql, GqlResult};
use crate::experiments::definition::VariantInput as DomainVariantInput;
use crate::experiments::stats::{Comparison, Interval, VariantSummary};
use crate::experiments::{
    Experiment, ExperimentInput as DomainExperimentInput, ExperimentResults, RuleOverride, Status,
    Variant, VariantResult,
};

#[derive(Enum, Clone, Copy, PartialEq, Eq)]
#[graphql(name = "ExperimentStatus")]
pub enum StatusGql {
    Draft,
    Running,
    Stopped,
}

impl From<Status> for StatusGql {
    fn from(s: Status) -> Self {
        match s {
            Status::Draft => StatusGql::Draft,
            Status::Running => StatusGql::Running,
            Status::Stopped => StatusGql::Stopped,
        }
    }
}

impl From<StatusGql> for Status {
    fn from(s: StatusGql) -> Self {
        match s {
            StatusGql::Draft => Status::Draft,
            StatusGql::Running => Status::Running,
            StatusGql::Stopped => Status::Stopped,
        }
    }
}

/// One variant of a new experiment. Overrides left out change nothing.
#[derive(InputObject)]
pub struct VariantInput {
    pub key: String,
    /// Relative share of the experiment's traffic, > 0.
    pub weight: f64,
    /// `thompson_sampling`, `epsilon_greedy` or `model_greedy`.
    pub policy: Option<String>,
    /// The saved model version to score with instead of the active one (the active one
    /// scores when it cannot be loaded; the decision's `modelVersion` says which did).
    pub model_version: Option<String>,
    /// Run only these rules; `[]` runs none.
    pub rules: Option<Vec<String>>,
    /// A content item shown first whenever it is an eligible candidate.
    pub pin: Option<String>,
}

#[derive(InputObject)]
pub struct ExperimentInput {
    pub key: String,
    pub description: Option<String>,
    /// Hashed with the customer id; defaults to the key.
    pub salt: Option<String>,
    /// At least two; the first is the control.
    pub variants: Vec<VariantInput>,
    /// Share of eligible customers in the experiment, 0.01–100.
    #[graphql(default = 100.0)]
    pub traffic_percent: f64,
    /// Only members of this segment are eligible.
    pub targeting_segment: Option<String>,
    /// Experiments of one layer are mutually exclusive.
    pub layer: Option<String>,
}

impl From<ExperimentInput> for DomainExperimentInput {
    fn from(i: ExperimentInput) -> Self {
        DomainExperimentInput {
            key: i.key,
            description: i.description,
            salt: i.salt,
            variants: i
                .variants
                .into_iter()
                .map(|v| DomainVariantInput {
                    key: v.key,
                    weight: v.weight,
                    policy: v.policy,
                    model_version: v.model_version,
                    rules: v.rules,
                    pin: v.pin,
                })
                .collect(),
            traffic_percent: i.traffic_percent,
            targeting_segment: i.targeting_segment,
            layer: i.layer,
        }
    }
}

pub struct ExperimentObject(pub Experiment);

#[Object(name = "Experiment")]
impl ExperimentObject {
    async fn key(&self) -> &str {
        &self.0.key
    }
    async fn description(&self) -> Option<&str> {
        self.0.description.as_deref()
    }
    async fn salt(&self) -> &str {
        &self.0.salt
    }
    async fn status(&self) -> StatusGql {
        self.0.status.into()
    }
    /// The first is the control.
    async fn variants(&self) -> Vec<VariantObject<'_>> {
        self.0.variants.iter().map(VariantObject).collect()
    }
    async fn traffic_percent(&self) -> f64 {
        self.0.traffic_percent
    }
    async fn targeting_segment(&self) -> Option<&str> {
        self.0.targeting_segment.as_deref()
    }
    async fn layer(&self) -> Option<&str> {
        self.0.layer.as_ref().map(|l| l.name.as_str())
    }
    /// The buckets `[start, end)` of the layer's 10,000 that this experiment owns.
    async fn layer_range(&self) -> Option<Vec<u32>> {
        self.0
            .layer
            .as_ref()
            .map(|l| vec![l.range.start, l.range.end])
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
    async fn started_at(&self) -> Option<DateTime<Utc>> {
        self.0.started_at
    }
    async fn stopped_at(&self) -> Option<DateTime<Utc>> {
        self.0.stopped_at
    }
}

pub struct VariantObject<'a>(&'a Variant);

#[Object(name = "ExperimentVariant")]
impl VariantObject<'_> {
    async fn key(&self) -> &str {
        &self.0.key
    }
    async fn weight(&self) -> f64 {
        self.0.weight
    }
    async fn policy(&self) -> Option<&str> {
        self.0.overrides.policy.map(crate::config::PolicyKind::name)
    }
    async fn model_version(&self) -> Option<&str> {
        self.0.overrides.model_version.as_deref()
    }
    /// The only rules that run (`[]`: none); null: all of them.
    async fn rules(&self) -> Option<Vec<&str>> {
        self.0.overrides.rules.as_ref().map(|r| match r {
            RuleOverride::Only(names) => names.iter().map(String::as_str).collect(),
            RuleOverride::None => Vec::new(),
        })
    }
    async fn pin(&self) -> Option<&str> {
        self.0.overrides.pin.as_deref()
    }
}

/// A 95% interval.
#[derive(SimpleObject)]
#[graphql(name = "StatInterval")]
pub struct IntervalObject {
    pub lower: f64,
    pub upper: f64,
}

fn interval(i: Option<Interval>) -> Option<IntervalObject> {
    i.map(|i| IntervalObject {
        lower: i.lower,
        upper: i.upper,
    })
}

/// A treatment against the control. Null where the data do not define a figure (no
/// exposures, a control rate of 0, zero variance).
#[derive(SimpleObject)]
#[graphql(name = "ControlComparison")]
pub struct ComparisonObject {
    /// Treatment rate − control rate.
    pub rate_difference: Option<f64>,
    pub rate_difference_ci: Option<IntervalObject>,
    /// Relative lift of the conversion rate: treatment / control − 1.
    pub lift: Option<f64>,
    /// 95% interval of the lift (delta method).
    pub lift_ci: Option<IntervalObject>,
    /// Pooled two-proportion z statistic.
    pub z_score: Option<f64>,
    /// Two-sided p-value of the z-test.
    pub p_value: Option<f64>,
    /// Always-valid 95% interval of the rate difference: safe to look at any time.
    pub always_valid_ci: Option<IntervalObject>,
    /// Treatment − control value per exposure.
    pub value_difference: Option<f64>,
    pub value_difference_ci: Option<IntervalObject>,
    /// Welch's t statistic of the value per exposure.
    pub value_t_score: Option<f64>,
    /// Welch–Satterthwaite degrees of freedom.
    pub value_degrees_of_freedom: Option<f64>,
    /// Two-sided p-value of Welch's t-test.
    pub value_p_value: Option<f64>,
    /// Always-valid 95% interval of the value difference.
    pub value_always_valid_ci: Option<IntervalObject>,
}

impl From<Comparison> for ComparisonObject {
    fn from(c: Comparison) -> Self {
        ComparisonObject {
            rate_difference: c.rate_diff,
            rate_difference_ci: interval(c.rate_diff_ci),
            lift: c.lift,
            lift_ci: interval(c.lift_ci),
            z_score: c.z_score,
            p_value: c.p_value,
            always_valid_ci: interval(c.rate_always_valid_ci),
            value_difference: c.value_diff,
            value_difference_ci: interval(c.value_diff_ci),
            value_t_score: c.value_t_score,
            value_degrees_of_freedom: c.value_df,
            value_p_value: c.value_p_value,
            value_always_valid_ci: interval(c.value_always_valid_ci),
        }
    }
}

#[derive(SimpleObject)]
#[graphql(name = "VariantResult")]
pub struct VariantResultObject {
    pub variant: String,
    pub weight: f64,
    /// Decisions made under the variant.
    pub exposures: u64,
    /// Decisions with a positive outcome (each counted once).
    pub conversions: u64,
    pub conversion_rate: Option<f64>,
    /// Summed value of the converting outcomes.
    pub value: f64,
    /// Value per exposure.
    pub value_mean: Option<f64>,
    /// Null for the control.
    pub vs_control: Option<ComparisonObject>,
}

impl From<VariantResult> for VariantResultObject {
    fn from(v: VariantResult) -> Self {
        let s: VariantSummary = v.summary;
        VariantResultObject {
            variant: v.key,
            weight: v.weight,
            exposures: s.exposures,
            conversions: s.conversions,
            conversion_rate: s.conversion_rate,
            value: s.value_sum,
            value_mean: s.value_mean,
            vs_control: v.vs_control.map(Into::into),
        }
    }
}

#[derive(SimpleObject)]
#[graphql(name = "ExperimentResults")]
pub struct ExperimentResultsObject {
    pub experiment: String,
    pub status: StatusGql,
    pub control: String,
    pub variants: Vec<VariantResultObject>,
    /// Chi-square p-value of the exposures against the configured weights.
    pub srm_p_value: Option<f64>,
    /// Sample-ratio mismatch: `srmPValue` below 0.001. Do not trust the other figures.
    pub srm_detected: bool,
}

impl From<ExperimentResults> for ExperimentResultsObject {
    fn from(r: ExperimentResults) -> Self {
        ExperimentResultsObject {
            experiment: r.key,
            status: r.status.into(),
            control: r.control,
            variants: r.variants.into_iter().map(Into::into).collect(),
            srm_p_value: r.srm.map(|s| s.p_value),
            srm_detected: r.srm.is_some_and(|s| s.mismatch),
        }
    }
}

#[derive(Default)]
pub struct ExperimentQuery;

#[Object]
impl ExperimentQuery {
    #[graphql(guard = "Allow::MARKETER")]
    async fn experiment(
        &self,
        ctx: &Context<'_>,
        key: String,
    ) -> GqlResult<Option<ExperimentObject>> {
        let e = engine(ctx).experiments.get(&key).await.map_err(gql)?;
        Ok(e.map(ExperimentObject))
    }

    /// Every experiment, by key.
    #[graphql(guard = "Allow::MARKETER")]
    async fn experiments(&self, ctx: &Context<'_>) -> GqlResult<Vec<ExperimentObject>> {
        let list = engine(ctx).experiments.list().await.map_err(gql)?;
        Ok(list.into_iter().map(ExperimentObject).collect())
    }

    /// Per-variant exposures, conversions and value, each treatment against the control,
    /// and the sample-ratio-mismatch check. Null for an unknown key.
    #[graphql(guard = "Allow::MARKETER")]
    async fn experiment_results(
        &self,
        ctx: &Context<'_>,
        key: String,
    ) -> GqlResult<Option<ExperimentResultsObject>> {
        let r = engine(ctx).experiments.results(&key).await.map_err(gql)?;
        Ok(r.map(Into::into))
    }
}

#[derive(Default)]
pub struct ExperimentMutation;

#[Object]
impl ExperimentMutation {
    /// Creates an experiment as a draft; `setExperimentStatus(key, RUNNING)` starts it.
    #[graphql(guard = "Allow::MARKETER")]
    async fn create_experiment(
        &self,
        ctx: &Context<'_>,
        input: ExperimentInput,
    ) -> GqlResult<ExperimentObject> {
        let engine = engine(ctx);
        let rules = engine.rules.clone();
        let created = engine
            .experiments
            .create(input.into(), &|name| rules.get(name).is_some())
            .await
            .map_err(gql)?;
        Ok(ExperimentObject(created))
    }

    /// DRAFT → RUNNING → STOPPED (STOPPED is final; DRAFT may stop directly).
    #[graphql(guard = "Allow::MARKETER")]
    async fn set_experiment_status(
        &self,
        ctx: &Context<'_>,
        key: String,
        status: StatusGql,
    ) -> GqlResult<ExperimentObject> {
        let e = engine(ctx)
            .experiments
            .set_status(&key, status.into())
            .await
            .map_err(gql)?;
        Ok(ExperimentObject(e))
    }
}
