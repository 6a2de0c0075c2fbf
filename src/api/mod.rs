//! The API: GraphQL (`/graphql`, GraphiQL on GET, subscriptions over WebSocket on
//! `/graphql` and `/graphql/ws`) and the REST routes. The only module that knows axum,
//! async-graphql and the wire formats.
//!
//! Authentication: every GraphQL request carries the [`Caller`] found from its
//! `Authorization: Bearer KEY` header (a WebSocket: from the `connection_init` payload's
//! `Authorization`, else the upgrade request's header), and each field's guard checks it
//! (`graphql::auth`); each REST route checks it in [`rest::authorize`]. Open without a
//! key: `/healthz`, `/readyz`, `/metrics` (numbers with bounded labels, no customer data,
//! for scrapers) and the GraphiQL page (static; its requests need a key like any other).
//!
//! Hardening, outermost first: a request id on every request ([`request_id`]); a panic
//! becomes a masked 500; the body limit (413 before the body is read); the request
//! timeout (408); then per route the key check and its rate limit ([`limits`]), the batch
//! cap and GraphQL's own depth, complexity, directive, recursion and alias limits.

pub mod graphql;
pub mod limits;
pub mod request_id;
pub mod rest;

use std::sync::Arc;
use std::time::Duration;

use async_graphql::http::GraphiQLSource;
use async_graphql::http::ALL_WEBSOCKET_PROTOCOLS;
use async_graphql::ErrorExtensions;
use async_graphql_axum::{GraphQLProtocol, GraphQLResponse, GraphQLWebSocket};
use axum::body::Bytes;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{from_fn, from_fn_with_state};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::app::Engine;
use crate::auth::{Caller, Role};
use graphql::TailorSchema;
use limits::RateLimit;
use rest::{authorize, RouteAccess};

#[derive(Clone)]
struct ApiState {
    engine: Arc<Engine>,
    schema: TailorSchema,
    rate: Option<Arc<RateLimit>>,
}

impl axum::extract::FromRef<ApiState> for Arc<Engine> {
    fn from_ref(state: &ApiState) -> Self {
        state.engine.clone()
    }
}

/// The whole HTTP app, injectable for `oneshot` tests.
pub fn router(engine: Arc<Engine>) -> Router {
    let limits = engine.settings.limits.clone();
    let timeout = Duration::from_millis(engine.settings.timeouts.request_ms);
    let rate = RateLimit::new(&limits);
    if let Some(rate) = &rate {
        // Buckets of keys idle long enough to be full again are dropped now and then.
        let rate = Arc::downgrade(rate);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(60));
                loop {
                    tick.tick().await;
                    match rate.upgrade() {
                        Some(rate) => rate.forget_idle(),
                        None => return,
                    }
                }
            });
        }
    }
    // The roles each REST route is open to, besides admin.
    let access = |roles: &'static [Role]| {
        from_fn_with_state(
            RouteAccess {
                engine: engine.clone(),
                roles,
                rate: rate.clone(),
            },
            authorize,
        )
    };
    let personalize = post(rest::personalize).layer(access(&[Role::Frontend]));
    let events = post(rest::events).layer(access(&[Role::Frontend]));
    let content = get(rest::content).layer(access(&[Role::Frontend, Role::Marketer]));
    let state = ApiState {
        schema: graphql::schema(engine.clone()),
        engine,
        rate,
    };
    Router::new()
        .route("/graphql", get(graphql_get).post(graphql_post))
        .route("/graphql/ws", get(graphql_ws))
        .route("/api/v1/personalize", personalize)
        .route("/api/v1/events", events)
        .route("/api/v2/content/personalized", content)
        .route("/metrics", get(rest::metrics))
        .route("/healthz", get(rest::healthz))
        .route("/readyz", get(rest::readyz))
        .with_state(state)
        // WebSocket connections outlive any request timeout, so the timeout sits inside
        // the body limit but only bounds the time to a response head.
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(RequestBodyLimitLayer::new(limits.max_body_bytes))
        .layer(CatchPanicLayer::custom(panicked))
        .layer(trace_layer())
        .layer(from_fn(request_id::assign))
}

/// HTTP spans and their events: method and path only (never the query string, whose
/// parameters are the client's), inside the request id's span.
fn trace_layer() -> TraceLayer<
    tower_http::classify::SharedClassifier<tower_http::classify::ServerErrorsAsFailures>,
    impl Fn(&Request) -> tracing::Span + Clone,
> {
    TraceLayer::new_for_http().make_span_with(|req: &Request| {
        tracing::debug_span!("http", method = %req.method(), path = %req.uri().path())
    })
}

/// A handler that panicked: 500 with the request id; the panic's text is logged only.
fn panicked(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let text = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("a panic without text");
    let id = graphql::error::internal(&format!("handler panicked: {text}"));
    let body = serde_json::json!({"error": {"code": "INTERNAL", "request_id": id,
        "message": format!("internal error (request id {id})")}});
    (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(body)).into_response()
}

/// The caller of a request with this `Authorization` value; `None` while authentication
/// is switched off (every field is open then).
async fn caller(engine: &Engine, authorization: Option<&str>) -> Option<Caller> {
    if !engine.settings.auth.enabled {
        return None;
    }
    Some(engine.keys.caller(authorization).await)
}

fn authorization(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

/// The operations routes alone (`/metrics`, `/healthz`, `/readyz`): what a worker serves.
pub fn ops_router(engine: Arc<Engine>) -> Router {
    Router::new()
        .route("/metrics", get(rest::metrics))
        .route("/healthz", get(rest::healthz))
        .route("/readyz", get(rest::readyz))
        .with_state(engine)
        .layer(trace_layer())
        .layer(from_fn(request_id::assign))
}

/// The body is read with axum's limit (413 past it, before any parsing), then parsed
/// as a single or batched GraphQL request (400 `BAD_REQUEST` past the batch cap), which
/// carries the caller for the guards. A key past its rate limit gets 429 `RATE_LIMITED`;
/// each operation of a batch counts.
async fn graphql_post(State(state): State<ApiState>, headers: HeaderMap, body: Bytes) -> Response {
    let mut batch = match limits::parse_batch(&body, &state.engine.settings.limits) {
        Ok(batch) => batch,
        Err(refused) => {
            let body = graphql::error::http_errors("BAD_REQUEST", &refused.0);
            return (StatusCode::BAD_REQUEST, axum::Json(body)).into_response();
        }
    };
    if let Some(caller) = caller(&state.engine, authorization(&headers)).await {
        if let (Some(rate), Caller::Key(principal)) = (&state.rate, &caller) {
            if let Err(wait) = rate.check(&principal.key_id, limits::operations(&batch)) {
                let message = format!(
                    "rate limit of this key reached; retry in {} s",
                    wait.as_secs()
                );
                let body = graphql::error::http_errors("RATE_LIMITED", &message);
                return (
                    StatusCode::TOO_MANY_REQUESTS,
                    [(header::RETRY_AFTER, wait.as_secs().to_string())],
                    axum::Json(body),
                )
                    .into_response();
            }
        }
        batch = batch.data(caller);
    }
    GraphQLResponse::from(state.schema.execute_batch(batch).await).into_response()
}

/// GraphiQL for browsers; a WebSocket upgrade goes to the subscription endpoint.
async fn graphql_get(State(state): State<ApiState>, req: Request) -> Response {
    if req.headers().contains_key(header::UPGRADE) {
        return graphql_ws(State(state), req).await;
    }
    if !state.engine.settings.api.graphiql() {
        return (StatusCode::NOT_FOUND, "GraphiQL is switched off").into_response();
    }
    Html(
        GraphiQLSource::build()
            .endpoint("/graphql")
            .subscription_endpoint("/graphql/ws")
            .finish(),
    )
    .into_response()
}

/// Subscriptions over WebSocket (`graphql-transport-ws` or `graphql-ws`). The key comes
/// in the `connection_init` payload (`{"Authorization": "Bearer KEY"}`; browsers cannot
/// set headers on a WebSocket), else from the upgrade request's header. A missing or
/// invalid key refuses the connection, and so does a key past its rate limit (each
/// connection counts once); each subscription's guard checks the role.
async fn graphql_ws(State(state): State<ApiState>, req: Request) -> Response {
    let (mut parts, _body) = req.into_parts();
    let protocol = match GraphQLProtocol::from_request_parts(&mut parts, &()).await {
        Ok(protocol) => protocol,
        Err(e) => return e.into_response(),
    };
    let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(upgrade) => upgrade,
        Err(e) => return e.into_response(),
    };
    let header = authorization(&parts.headers).map(str::to_owned);
    let (engine, schema, rate) = (state.engine, state.schema, state.rate);
    upgrade
        .protocols(ALL_WEBSOCKET_PROTOCOLS)
        .on_upgrade(move |stream| {
            GraphQLWebSocket::new(stream, schema, protocol)
                .on_connection_init(move |payload| async move {
                    let from_payload = ["Authorization", "authorization"]
                        .iter()
                        .find_map(|k| payload.get(*k).and_then(|v| v.as_str()))
                        .map(str::to_owned);
                    let mut data = async_graphql::Data::default();
                    let Some(caller) = caller(&engine, from_payload.or(header).as_deref()).await
                    else {
                        return Ok(data);
                    };
                    if let Caller::Key(principal) = &caller {
                        // A connection takes one request from the key's rate limit.
                        if let Some(Err(wait)) = rate.map(|r| r.check(&principal.key_id, 1)) {
                            let message = format!(
                                "rate limit of this key reached; retry in {} s",
                                wait.as_secs()
                            );
                            return Err(async_graphql::Error::new(message)
                                .extend_with(|_, e| e.set("code", "RATE_LIMITED")));
                        }
                        data.insert(caller);
                        return Ok(data);
                    }
                    // Any role will do here; the subscription's guard checks its own.
                    match caller.check(true, &Role::ALL) {
                        Ok(()) => Ok(data),
                        Err(denied) => Err(graphql::error::denied(denied)),
                    }
                })
                .serve()
        })
        .into_response()
}
