//! The recommendation model: a candle network that scores every candidate of a decision
//! from customer features ⊕ item features ⊕ context, trained from Tailor's own decision
//! log. The only module that knows candle.
//!
//! Map:
//! - [`schema`]: the input schema (feature names and normalisation, vocabularies, cyclic
//!   hour) that travels with the weights, and `encode` into dense rows;
//! - [`net`]: the network (learned item embedding + MLP → sigmoid), its batched forward
//!   pass, and a plain re-implementation of that pass for checking;
//! - [`dataset`]: labelled examples from the decision log (point-in-time features, outcomes
//!   within the attribution window) or from logged decisions imported as JSONL;
//! - [`train`]: seeded, time-split minibatch AdamW training and the validation report
//!   (AUC, log loss, calibration);
//! - [`registry`]: versions on disk (safetensors + JSON manifest), the active and shadow
//!   pointers, activation checks and rollback;
//! - [`serving`]: the [`serving::Scorer`]: one forward pass per batch on its own thread,
//!   a micro-batcher, hot swap, shadow scores, automatic rollback;
//! - [`service`]: [`ModelService`], what the API, the CLI and the demo call.

pub mod dataset;
pub mod net;
pub mod registry;
pub mod schema;
pub mod service;
pub mod serving;
pub mod train;

/// Where tensors live (CPU, or a CUDA device with the `cuda` feature), re-exported so
/// callers need not depend on candle.
pub use candle_core::Device;
pub use service::{ModelService, TrainingSource, VersionInfo};

use crate::error::Error;
use crate::storage::StorageError;

/// What callers of the model branch on.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Bad input from a caller or an imported file; `field` names it.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("version: unknown model version '{0}'")]
    UnknownVersion(String),
    /// Activation refused: the model reads features that are not live definitions.
    #[error("version: model {version} reads features that are not live feature definitions: {}", .missing.join(", "))]
    SchemaMismatch {
        version: String,
        missing: Vec<String>,
    },
    #[error("version: no earlier model version to roll back to")]
    NothingToRollBack,
    /// Training cannot start or report on this data.
    #[error("data: not enough training data: {0}")]
    NotEnoughData(String),
    #[error("model files: {0}")]
    Io(String),
    /// candle failed (shapes, device, numerics).
    #[error("model computation: {0}")]
    Compute(String),
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    /// The scorer's thread is gone (the engine is shutting down).
    #[error("the scorer has stopped")]
    Stopped,
}

impl ModelError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ModelError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl From<candle_core::Error> for ModelError {
    fn from(e: candle_core::Error) -> Self {
        ModelError::Compute(e.to_string())
    }
}

impl From<ModelError> for Error {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::Invalid { field, message } => Error::Invalid { field, message },
            ModelError::UnknownVersion(v) => Error::not_found("version", "model version", v),
            e @ (ModelError::SchemaMismatch { .. } | ModelError::NothingToRollBack) => {
                let text = e.to_string();
                let message = text.strip_prefix("version: ").unwrap_or(&text);
                Error::invalid("version", message)
            }
            ModelError::NotEnoughData(message) => {
                Error::invalid("data", format!("not enough training data: {message}"))
            }
            ModelError::Storage(e) => Error::Storage(e),
            e @ (ModelError::Io(_) | ModelError::Compute(_) | ModelError::Stopped) => {
                Error::Internal(anyhow::anyhow!(e))
            }
        }
    }
}

pub type ModelResult<T> = std::result::Result<T, ModelError>;
