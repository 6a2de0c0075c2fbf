//! The API: GraphQL (`/graphql`, GraphiQL on GET, subscriptions over WebSocket on
//! `/graphql` and `/graphql/ws`) and the REST routes. The only module that knows axum,
//! async-graphql and the wire formats.

pub mod graphql;
pub mod rest;

use std::sync::Arc;
use std::time::Duration;

use async_graphql::http::GraphiQLSource;
use async_graphql_axum::{GraphQLResponse, GraphQLSubscription};
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tower::ServiceExt;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::app::Engine;
use graphql::TailorSchema;

#[derive(Clone)]
struct ApiState {
    engine: Arc<Engine>,
    schema: TailorSchema,
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
    let state = ApiState {
        schema: graphql::schema(engine.clone()),
        engine,
    };
    Router::new()
        .route("/graphql", get(graphql_get).post(graphql_post))
        .route("/graphql/ws", get(graphql_ws))
        .route("/api/v1/personalize", post(rest::personalize))
        .route("/api/v1/events", post(rest::events))
        .route("/api/v2/content/personalized", get(rest::content))
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
        .layer(TraceLayer::new_for_http())
}

/// The operations routes alone (`/metrics`, `/healthz`, `/readyz`): what a worker serves.
pub fn ops_router(engine: Arc<Engine>) -> Router {
    Router::new()
        .route("/metrics", get(rest::metrics))
        .route("/healthz", get(rest::healthz))
        .route("/readyz", get(rest::readyz))
        .with_state(engine)
        .layer(TraceLayer::new_for_http())
}

/// The body is read with axum's limit (413 past it, before any parsing), then parsed
/// as a single or batched GraphQL request.
async fn graphql_post(State(state): State<ApiState>, body: Bytes) -> Response {
    match serde_json::from_slice::<async_graphql::BatchRequest>(&body) {
        Ok(batch) => GraphQLResponse::from(state.schema.execute_batch(batch).await).into_response(),
        Err(e) => (
            StatusCode::BAD_REQUEST,
            axum::Json(serde_json::json!({
                "errors": [{"message": format!("body: not a GraphQL request: {e}"),
                            "extensions": {"code": "BAD_REQUEST"}}]
            })),
        )
            .into_response(),
    }
}

/// GraphiQL for browsers; a WebSocket upgrade goes to the subscription endpoint.
async fn graphql_get(State(state): State<ApiState>, req: Request) -> Response {
    if req.headers().contains_key(header::UPGRADE) {
        return graphql_ws(State(state), req).await;
    }
    if !state.engine.settings.api.graphiql {
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

async fn graphql_ws(State(state): State<ApiState>, req: Request) -> Response {
    match GraphQLSubscription::new(state.schema).oneshot(req).await {
        Ok(resp) => resp.map(Body::new),
        Err(never) => match never {},
    }
}
