//! The one mapping from domain errors to GraphQL errors (`extensions.code`).
//! Storage and internal errors are logged with an id and sent only as that id.

use async_graphql::ErrorExtensions;

use crate::auth::Denied;
use crate::error::Error;

pub fn gql(error: Error) -> async_graphql::Error {
    match error {
        Error::Invalid { field, message } => {
            async_graphql::Error::new(format!("{field}: {message}")).extend_with(|_, e| {
                e.set("code", "BAD_USER_INPUT");
                e.set("field", field.clone());
            })
        }
        Error::Script {
            field,
            line,
            column,
            message,
        } => async_graphql::Error::new(format!("{field}: {line}:{column}: {message}")).extend_with(
            |_, e| {
                e.set("code", "BAD_USER_INPUT");
                e.set("field", field.clone());
                e.set("line", line as u64);
                e.set("column", column as u64);
            },
        ),
        Error::NotFound { field, what, id } => async_graphql::Error::new(format!(
            "{field}: unknown {what} '{id}'"
        ))
        .extend_with(|_, e| {
            e.set("code", "NOT_FOUND");
            e.set("field", field.clone());
        }),
        Error::Storage(_) | Error::Internal(_) => {
            let id = uuid::Uuid::now_v7();
            tracing::error!(error_id = %id, error = %error, "Request failed");
            async_graphql::Error::new(format!("internal error (id {id})")).extend_with(|_, e| {
                e.set("code", "INTERNAL");
            })
        }
    }
}

/// A caller turned away: `UNAUTHENTICATED` (no, malformed, unknown or revoked key) or
/// `FORBIDDEN` (the key's role may not use the field).
pub fn denied(d: Denied) -> async_graphql::Error {
    let code = match &d {
        Denied::Unauthenticated(_) => "UNAUTHENTICATED",
        Denied::Forbidden { .. } => "FORBIDDEN",
        Denied::Unverified(_) => "INTERNAL",
    };
    async_graphql::Error::new(d.message()).extend_with(|_, e| e.set("code", code))
}

/// `Result` of a resolver.
pub type GqlResult<T> = async_graphql::Result<T>;
