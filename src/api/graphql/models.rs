//! The recommendation model over GraphQL: `models`, `trainModel`, `activateModel`,
//! `rollbackModel`.

use async_graphql::{Context, Json, Object, SimpleObject};
use chrono::{DateTime, Utc};
use serde_json::Value;

use super::auth::Allow;
use super::engine;
use super::error::{gql, GqlResult};
use crate::error::Error;
use crate::model::train::TrainParams;
use crate::model::{TrainingSource, VersionInfo};

#[derive(SimpleObject)]
#[graphql(name = "ReliabilityBin")]
pub struct ReliabilityBinObject {
    pub lower: f64,
    pub upper: f64,
    pub count: u64,
    pub mean_predicted: f64,
    pub observed_rate: f64,
}

/// Validation metrics of a version (on the newest part of its data).
#[derive(SimpleObject)]
#[graphql(name = "ModelMetrics")]
pub struct ModelMetricsObject {
    pub auc: f64,
    pub log_loss: f64,
    /// Log loss of always predicting the training positive rate.
    pub baseline_log_loss: f64,
    /// Expected calibration error over 10 bins.
    pub ece: f64,
    pub positive_rate: f64,
    pub reliability: Vec<ReliabilityBinObject>,
}

/// The decisions a version was trained and validated on.
#[derive(SimpleObject)]
#[graphql(name = "ModelData")]
pub struct ModelDataObject {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub validation_from: DateTime<Utc>,
    pub decisions: u64,
    pub examples: u64,
    pub train_examples: u64,
    pub validation_examples: u64,
    pub positives: u64,
}

#[derive(SimpleObject)]
#[graphql(name = "ModelVersion")]
pub struct ModelVersionObject {
    pub version: String,
    pub created_at: DateTime<Utc>,
    /// The version that was active when this one was trained.
    pub parent: Option<String>,
    pub active: bool,
    /// Scores beside the active version without serving.
    pub shadow: bool,
    pub metrics: ModelMetricsObject,
    pub data: ModelDataObject,
    /// The customer features the model reads.
    pub features: Vec<String>,
    pub training_seconds: f64,
    pub params: Json<Value>,
}

impl From<VersionInfo> for ModelVersionObject {
    fn from(info: VersionInfo) -> Self {
        let m = info.manifest;
        let r = m.report;
        ModelVersionObject {
            features: m.schema.feature_names().map(str::to_owned).collect(),
            version: m.version,
            created_at: m.created_at,
            parent: m.parent,
            active: info.active,
            shadow: info.shadow,
            metrics: ModelMetricsObject {
                auc: r.metrics.auc,
                log_loss: r.metrics.log_loss,
                baseline_log_loss: r.metrics.baseline_log_loss,
                ece: r.metrics.ece,
                positive_rate: r.metrics.positive_rate,
                reliability: r
                    .metrics
                    .reliability
                    .into_iter()
                    .map(|b| ReliabilityBinObject {
                        lower: b.lower,
                        upper: b.upper,
                        count: b.count as u64,
                        mean_predicted: b.mean_predicted,
                        observed_rate: b.observed_rate,
                    })
                    .collect(),
            },
            data: ModelDataObject {
                from: r.data.from,
                to: r.data.to,
                validation_from: r.data.validation_from,
                decisions: r.data.decisions as u64,
                examples: r.data.examples as u64,
                train_examples: r.data.train_examples as u64,
                validation_examples: r.data.validation_examples as u64,
                positives: r.data.positives as u64,
            },
            training_seconds: m.training_seconds,
            params: Json(serde_json::to_value(&m.params).unwrap_or(Value::Null)),
        }
    }
}

#[derive(Default)]
pub struct ModelQuery;

#[Object]
impl ModelQuery {
    /// Every model version, oldest first, with its validation metrics and pointers.
    #[graphql(guard = "Allow::ADMIN")]
    async fn models(&self, ctx: &Context<'_>) -> GqlResult<Vec<ModelVersionObject>> {
        let versions = engine(ctx).models.versions().map_err(|e| gql(e.into()))?;
        Ok(versions.into_iter().map(Into::into).collect())
    }
}

#[derive(Default)]
pub struct ModelMutation;

#[Object]
impl ModelMutation {
    /// Trains a new version from the decision log (off the request executor) and returns
    /// it with its validation report; `activate` makes it serve at once.
    #[graphql(guard = "Allow::ADMIN")]
    async fn train_model(
        &self,
        ctx: &Context<'_>,
        seed: Option<i64>,
        epochs: Option<i32>,
        #[graphql(default = false)] activate: bool,
    ) -> GqlResult<ModelVersionObject> {
        let engine = engine(ctx);
        let mut params = TrainParams::default();
        if let Some(seed) = seed {
            params.seed =
                u64::try_from(seed).map_err(|_| gql(Error::invalid("seed", "must be ≥ 0")))?;
        }
        if let Some(epochs) = epochs {
            params.epochs = usize::try_from(epochs)
                .map_err(|_| gql(Error::invalid("epochs", "must be between 1 and 1000")))?;
        }
        let manifest = engine
            .train_model(&TrainingSource::DecisionLog, params, |_| {})
            .await
            .map_err(gql)?;
        let info = if activate {
            engine
                .activate_model(&manifest.version, false)
                .await
                .map_err(gql)?
        } else {
            VersionInfo {
                manifest,
                active: false,
                shadow: false,
            }
        };
        Ok(info.into())
    }

    /// Makes `version` the active model, or with `shadow` runs it beside the active one
    /// (both scores logged, only the active one serves). Refused when the version reads
    /// features that are not live definitions.
    #[graphql(guard = "Allow::ADMIN")]
    async fn activate_model(
        &self,
        ctx: &Context<'_>,
        version: String,
        #[graphql(default = false)] shadow: bool,
    ) -> GqlResult<ModelVersionObject> {
        let info = engine(ctx)
            .activate_model(&version, shadow)
            .await
            .map_err(gql)?;
        Ok(info.into())
    }

    /// Returns to the version the active one replaced.
    #[graphql(guard = "Allow::ADMIN")]
    async fn rollback_model(&self, ctx: &Context<'_>) -> GqlResult<ModelVersionObject> {
        let info = engine(ctx)
            .models
            .rollback("requested over GraphQL")
            .await
            .map_err(|e| gql(e.into()))?;
        Ok(info.into())
    }
}
