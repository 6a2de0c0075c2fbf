//! The crate-wide error type: what callers branch on.
//!
//! Domain code returns [`Error`]; `src/api/` maps each variant to one GraphQL
//! `extensions.code` and one HTTP status. `Internal` and `Storage` text is logged, never sent.

use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller sent something wrong; `field` names it (`events[3].timestamp`).
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// A script the caller sent does not compile; `line`/`column` are 1-based (0: the
    /// whole script).
    #[error("{field}: {line}:{column}: {message}")]
    Script {
        field: String,
        line: usize,
        column: usize,
        message: String,
    },
    /// An id the caller named does not exist.
    #[error("{field}: unknown {what} '{id}'")]
    NotFound {
        field: String,
        what: &'static str,
        id: String,
    },
    /// A backend failed; the detail stays in the logs.
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl Error {
    /// Whether a backend could not be reached (trying again later may succeed).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::Storage(StorageError::Unavailable(_)))
    }

    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    /// `field: unknown feature 'a'`, or `field: unknown features 'a', 'b'`.
    pub fn unknown_features(field: impl Into<String>, names: &[&str]) -> Self {
        let quoted: Vec<String> = names.iter().map(|n| format!("'{n}'")).collect();
        let plural = if names.len() == 1 { "" } else { "s" };
        Error::invalid(
            field,
            format!("unknown feature{plural} {}", quoted.join(", ")),
        )
    }

    pub fn not_found(field: impl Into<String>, what: &'static str, id: impl Into<String>) -> Self {
        Error::NotFound {
            field: field.into(),
            what,
            id: id.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
