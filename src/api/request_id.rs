//! Request ids: every HTTP request gets one (the client's `X-Request-Id` when it is a
//! plain token of at most 64 characters, else a fresh UUIDv7), sent back in the
//! `X-Request-Id` header, recorded on the request's span and available to the error
//! mapping through [`current`], so an `INTERNAL` answer names the id its log line
//! carries and nothing else.
//!
//! The span records the method and the path only: query strings may hold anything a
//! client put there.

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

pub static HEADER: HeaderName = HeaderName::from_static("x-request-id");

tokio::task_local! {
    static REQUEST_ID: String;
}

/// The id of the request being served; a fresh one outside any request (a WebSocket
/// subscription's events, an in-process schema call), so every id still names exactly
/// the log line written with it.
pub fn current() -> String {
    REQUEST_ID
        .try_with(Clone::clone)
        .unwrap_or_else(|_| uuid::Uuid::now_v7().to_string())
}

/// Runs `fut` as the request `id` (what [`assign`] does for each HTTP request).
pub async fn scope<F: std::future::Future>(id: String, fut: F) -> F::Output {
    REQUEST_ID.scope(id, fut).await
}

fn acceptable(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// The middleware: finds or makes the id, serves the request inside its scope and span,
/// and sets the response header.
pub async fn assign(req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(&HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| acceptable(v))
        .map_or_else(|| uuid::Uuid::now_v7().to_string(), str::to_owned);
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method = %req.method(),
        path = %req.uri().path(),
    );
    let mut response = scope(id.clone(), next.run(req).instrument(span)).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(HEADER.clone(), value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_tokens_are_taken_from_clients() {
        assert!(acceptable("0190c1a2-7b6e-7c3d-9f00-1234567890ab"));
        assert!(acceptable("trace:abc.1_2"));
        for bad in ["", "a b", "x\n", "é", &"a".repeat(65)] {
            assert!(!acceptable(bad), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn current_is_the_scoped_id_or_a_fresh_one() {
        let scoped = REQUEST_ID.scope("req-1".into(), async { current() }).await;
        assert_eq!(scoped, "req-1");
        assert_ne!(current(), current());
    }
}
