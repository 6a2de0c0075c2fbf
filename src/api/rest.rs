//! REST routes for clients that do not speak GraphQL; the same engine underneath.
//! [`authorize`] checks each route's roles before its handler runs.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::limits::RateLimit;
use crate::app::Engine;
use crate::auth::{Caller, Denied, Role};
use crate::customers::CustomerId;
use crate::decision::pipeline::PersonalizeRequest;
use crate::error::Error;

/// An error as a REST response: 400/404 with `{error: {code, field, message}}`, and
/// 500 with only the request id for anything internal.
pub struct ApiError(Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = match &self.0 {
            Error::Invalid { field, message } => (
                StatusCode::BAD_REQUEST,
                json!({"code": "BAD_USER_INPUT", "field": field, "message": format!("{field}: {message}")}),
            ),
            Error::Script {
                field,
                line,
                column,
                ..
            } => (
                StatusCode::BAD_REQUEST,
                json!({"code": "BAD_USER_INPUT", "field": field, "line": line, "column": column, "message": self.0.to_string()}),
            ),
            Error::NotFound { field, .. } => (
                StatusCode::NOT_FOUND,
                json!({"code": "NOT_FOUND", "field": field, "message": self.0.to_string()}),
            ),
            Error::Storage(_) | Error::Internal(_) => {
                let id = super::graphql::error::internal(&self.0);
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"code": "INTERNAL", "request_id": id, "message": format!("internal error (request id {id})")}),
                )
            }
        };
        (status, Json(json!({ "error": body }))).into_response()
    }
}

/// The roles a route is open to (besides admin), for [`authorize`].
#[derive(Clone)]
pub struct RouteAccess {
    pub engine: Arc<Engine>,
    pub roles: &'static [Role],
    /// The per-key rate limit; `None` for none.
    pub rate: Option<Arc<RateLimit>>,
}

/// Runs the route only for a caller whose key's role it is open to: 401 (with
/// `WWW-Authenticate: Bearer`) without a valid key, 403 for another role, 429 (with
/// `Retry-After`) past the key's rate limit, before the body is read. Open to everyone
/// while authentication is switched off.
pub async fn authorize(State(access): State<RouteAccess>, req: Request, next: Next) -> Response {
    let engine = &access.engine;
    if !engine.settings.auth.enabled {
        return next.run(req).await;
    }
    let value = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let caller = engine.keys.caller(value).await;
    let denied = match caller.check(true, access.roles) {
        Ok(()) => {
            if let (Some(rate), Caller::Key(principal)) = (&access.rate, &caller) {
                if let Err(wait) = rate.check(&principal.key_id, 1) {
                    return rate_limited(wait);
                }
            }
            return next.run(req).await;
        }
        Err(denied) => denied,
    };
    let (status, code) = match denied {
        Denied::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, "UNAUTHENTICATED"),
        Denied::Forbidden { .. } => (StatusCode::FORBIDDEN, "FORBIDDEN"),
        Denied::Unverified(_) => (StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL"),
        Denied::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
    };
    let body = Json(json!({"error": {"code": code, "message": denied.message()}}));
    if status == StatusCode::UNAUTHORIZED {
        (status, [(header::WWW_AUTHENTICATE, "Bearer")], body).into_response()
    } else if status == StatusCode::SERVICE_UNAVAILABLE {
        (status, [(header::RETRY_AFTER, "1")], body).into_response()
    } else {
        (status, body).into_response()
    }
}

/// 429 with `Retry-After` (whole seconds) and `{error: {code: "RATE_LIMITED"}}`.
pub fn rate_limited(wait: std::time::Duration) -> Response {
    let body = Json(json!({"error": {"code": "RATE_LIMITED",
        "message": format!("rate limit of this key reached; retry in {} s", wait.as_secs())}}));
    (
        StatusCode::TOO_MANY_REQUESTS,
        [(header::RETRY_AFTER, wait.as_secs().to_string())],
        body,
    )
        .into_response()
}

/// Parses a JSON body; a type error names the field it is in (`available_items[2]`).
fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let field = if inner.is_data() && path != "." {
            path
        } else {
            "body".to_owned()
        };
        // Never the error's own text: it may quote the value sent.
        let message = if inner.is_syntax() || inner.is_eof() {
            format!("malformed JSON: {}", super::limits::json_error(&inner))
        } else {
            super::limits::json_error(&inner)
        };
        ApiError(Error::invalid(field, message))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersonalizeBody {
    customer_id: String,
    #[serde(default)]
    available_items: Option<Vec<String>>,
    #[serde(default)]
    placement: Option<String>,
    #[serde(default)]
    content_type: Option<String>,
    #[serde(default)]
    context: Option<Value>,
    #[serde(default)]
    count: Option<usize>,
    #[serde(default)]
    explain: Option<bool>,
}

/// `POST /api/v1/personalize`, answering in the seed's shape.
pub async fn personalize(
    State(engine): State<Arc<Engine>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body: PersonalizeBody = parse_json(&body)?;
    let req = PersonalizeRequest {
        customer_id: CustomerId::parse("customer_id", &body.customer_id)?,
        placement: body.placement,
        available_items: body.available_items,
        content_type: body.content_type,
        context: body.context.unwrap_or_default(),
        count: body.count.unwrap_or(1),
        explain: body.explain.unwrap_or(false),
    };
    let d = engine
        .decisions
        .personalize(req)
        .await
        .map_err(snake_case_fields)?;
    let selected = d.selected();
    Ok(Json(json!({
        "decision_id": d.id,
        "selected_item": selected.item.id,
        "selected_items": d.items.iter().map(|s| json!({"item_id": s.item.id, "score": s.score})).collect::<Vec<_>>(),
        "confidence_score": d.confidence_score,
        "alternative_options": d.alternatives.iter().map(|s| json!({"item_id": s.item.id, "score": s.score})).collect::<Vec<_>>(),
        "reasoning": d.reasoning,
        "latency_ms": d.latency_ms,
        "policy": d.policy,
        "propensity": d.propensity,
        "segments": d.segments,
        "degraded": d.degraded,
        "explanation": d.explanation,
    }))
    .into_response())
}

/// The pipeline names request fields as GraphQL does; REST clients sent snake_case.
fn snake_case_fields(e: Error) -> Error {
    let rename = |field: String| {
        [
            ("availableItems", "available_items"),
            ("contentType", "content_type"),
        ]
        .iter()
        .find_map(|(from, to)| field.strip_prefix(from).map(|rest| format!("{to}{rest}")))
        .unwrap_or(field)
    };
    match e {
        Error::Invalid { field, message } => Error::Invalid {
            field: rename(field),
            message,
        },
        Error::NotFound { field, what, id } => Error::NotFound {
            field: rename(field),
            what,
            id,
        },
        other => other,
    }
}

#[derive(Deserialize)]
pub struct ContentParams {
    segment: Option<String>,
    #[serde(rename = "type")]
    content_type: Option<String>,
    limit: Option<usize>,
    include_metadata: Option<bool>,
}

/// `GET /api/v2/content/personalized?segment=&type=&limit=&include_metadata=`.
pub async fn content(
    State(engine): State<Arc<Engine>>,
    Query(params): Query<ContentParams>,
) -> Result<Response, ApiError> {
    let limit = params.limit.unwrap_or(20);
    if !(1..=1000).contains(&limit) {
        return Err(Error::invalid("limit", "must be between 1 and 1000").into());
    }
    let items = engine
        .content(
            params.segment.as_deref(),
            params.content_type.as_deref(),
            limit,
        )
        .await?;
    let metadata = params.include_metadata.unwrap_or(false);
    let content_items: Vec<Value> = items
        .into_iter()
        .map(|i| {
            let mut v = json!({"id": i.id, "type": i.content_type, "title": i.title, "priority": i.priority});
            if metadata {
                v["placements"] = json!(i.placements);
                v["tags"] = json!(i.tags);
                v["segments"] = json!(i.segments);
                v["attributes"] = Value::Object(i.attributes);
                v["active_from"] = json!(i.active_from);
                v["active_until"] = json!(i.active_until);
            }
            v
        })
        .collect();
    Ok(Json(json!({ "content_items": content_items })).into_response())
}

/// `POST /api/v1/events`: a JSON array of events, one event object, or NDJSON (one
/// event per line). A malformed NDJSON line is rejected by index; the others go on.
pub async fn events(
    State(engine): State<Arc<Engine>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let ndjson = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.contains("ndjson") || ct.contains("jsonlines"));
    let first = body.iter().find(|b| !b.is_ascii_whitespace()).copied();
    let mut malformed = Vec::new();
    let raw: Vec<Value> = if !ndjson && first == Some(b'[') {
        parse_json(&body)?
    } else if !ndjson && first == Some(b'{') && serde_json::from_slice::<Value>(&body).is_ok() {
        vec![parse_json(&body)?]
    } else {
        let text = std::str::from_utf8(&body)
            .map_err(|_| ApiError(Error::invalid("body", "is not UTF-8")))?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .enumerate()
            .map(|(i, line)| {
                serde_json::from_str(line).unwrap_or_else(|e| {
                    malformed.push((i, super::limits::json_error(&e)));
                    Value::Null
                })
            })
            .collect()
    };
    if raw.is_empty() {
        return Err(Error::invalid("body", "holds no events").into());
    }
    let mut report = engine.ingestor.ingest(raw).await?;
    for (index, message) in malformed {
        if let Some(r) = report.rejected.iter_mut().find(|r| r.index == index) {
            r.message = format!("malformed JSON: {message}");
        }
    }
    Ok(Json(report).into_response())
}

pub async fn metrics(State(engine): State<Arc<Engine>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        engine.metrics.render(),
    )
        .into_response()
}

pub async fn healthz() -> &'static str {
    "ok"
}

/// Ready (200) when this process can answer: its own event log reads. The body is
/// `ready`, or `ready, degraded: …` naming each shared backend whose last call did not
/// reach it, and whether the catalog is served from the local copy (or there is none).
///
/// A shared backend that is down does not make the process unready: decisions still
/// answer, from defaults and the local copy of the catalog, marked `degraded`; a load
/// balancer that took every replica out during a Redis outage would turn degraded
/// answers into none. Only a failing local store (nothing can be served) answers 503.
/// Breaker and call metrics tell the rest (`tailor_backend_breaker_open`).
pub async fn readyz(State(engine): State<Arc<Engine>>) -> Response {
    if let Err(e) = engine.stores.events.last_seq().await {
        tracing::warn!(error = %e, "Readiness check failed");
        return (StatusCode::SERVICE_UNAVAILABLE, "event log unavailable").into_response();
    }
    let mut down: Vec<String> = engine
        .stores
        .health
        .iter()
        .filter(|b| !b.breaker.is_reachable())
        .map(|b| format!("{} ({}) unreachable", b.backend, b.serves))
        .collect();
    if let Some(copy) = engine
        .stores
        .catalog_copy
        .as_ref()
        .filter(|c| c.is_serving())
    {
        down.push(if copy.has_data() {
            "catalog served from the local copy".to_owned()
        } else {
            "catalog unreachable and no local copy yet".to_owned()
        });
    }
    if down.is_empty() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (
            StatusCode::OK,
            format!("ready, degraded: {}", down.join("; ")),
        )
            .into_response()
    }
}
