//! The one mapping from domain errors to GraphQL errors (`extensions.code`).
//! Storage and internal errors are logged with the request id and sent only as that id
//! (`INTERNAL`, `extensions.requestId`); their text never leaves the process.
//!
//! Codes: `BAD_USER_INPUT`, `NOT_FOUND`, `UNAUTHENTICATED`, `FORBIDDEN`, `INTERNAL` from
//! resolvers; `BAD_REQUEST` (a body or query refused before execution) and
//! `RATE_LIMITED` (the key's rate limit, HTTP 429) from the HTTP layer ([`http_errors`]).

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
            let id = internal(&error);
            async_graphql::Error::new(format!("internal error (request id {id})")).extend_with(
                |_, e| {
                    e.set("code", "INTERNAL");
                    e.set("requestId", id.clone());
                },
            )
        }
    }
}

/// Logs an internal error with the current request's id and returns that id, the only
/// thing about the error a client gets.
pub fn internal(error: &dyn std::fmt::Display) -> String {
    let id = crate::api::request_id::current();
    tracing::error!(request_id = %id, error = %error, "Request failed");
    id
}

/// A GraphQL response body holding one error that the HTTP layer answers with before
/// any operation runs (`BAD_REQUEST`, `RATE_LIMITED`, `INTERNAL`).
pub fn http_errors(code: &str, message: &str) -> serde_json::Value {
    serde_json::json!({"errors": [{"message": message, "extensions": {"code": code}}]})
}

/// A caller turned away: `UNAUTHENTICATED` (no, malformed, unknown or revoked key) or
/// `FORBIDDEN` (the key's role may not use the field).
pub fn denied(d: Denied) -> async_graphql::Error {
    let code = match &d {
        Denied::Unauthenticated(_) => "UNAUTHENTICATED",
        Denied::Forbidden { .. } => "FORBIDDEN",
        Denied::Unverified(_) => "INTERNAL",
        Denied::Unavailable(_) => "UNAVAILABLE",
    };
    async_graphql::Error::new(d.message()).extend_with(|_, e| e.set("code", code))
}

/// `Result` of a resolver.
pub type GqlResult<T> = async_graphql::Result<T>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::request_id;

    #[tokio::test]
    async fn internal_errors_send_only_the_request_id() {
        let error = request_id::scope("req-42".into(), async {
            gql(Error::Internal(anyhow::anyhow!(
                "disk full under /var/lib/tailor/customer-7"
            )))
        })
        .await;
        let server = error.into_server_error(async_graphql::Pos::default());
        assert_eq!(server.message, "internal error (request id req-42)");
        let extensions = serde_json::to_value(server.extensions.unwrap()).unwrap();
        assert_eq!(
            extensions,
            serde_json::json!({"code": "INTERNAL", "requestId": "req-42"})
        );
        let body = http_errors("RATE_LIMITED", "slow down");
        assert_eq!(body["errors"][0]["extensions"]["code"], "RATE_LIMITED");
    }
}
