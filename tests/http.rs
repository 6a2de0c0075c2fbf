//! The HTTP app through `oneshot`: REST routes, body limits, malformed input, metrics.

mod common;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use common::TestApp;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

/// Sends `req` with the app's admin key unless it carries an `Authorization` header.
async fn call(app: &TestApp, mut req: Request<Body>) -> (StatusCode, String) {
    if app.admin_key.is_some() && !req.headers().contains_key(header::AUTHORIZATION) {
        let value = app.admin_bearer().parse().expect("header value");
        req.headers_mut().insert(header::AUTHORIZATION, value);
    }
    let router = tailor::api::router(app.engine.clone());
    let resp = router.oneshot(req).await.expect("infallible");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

fn post(uri: &str, content_type: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(uri)
        .header(header::CONTENT_TYPE, content_type)
        .body(body.into())
        .expect("request")
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[tokio::test]
async fn rest_events_personalize_and_content() {
    let app = TestApp::new().await;
    app.upsert_content("hero-1", "homepage_hero", 3, &[]).await;
    app.upsert_content("hero-2", "homepage_hero", 1, &["vip"])
        .await;

    let ndjson = "{\"eventId\":\"n1\",\"customerId\":\"c1\",\"type\":\"page_view\"}\n\
                  {\"eventId\":\"n2\",\"customerId\":\"c1\",\"type\":\"email_open\"}\n\
                  {not json}\n";
    let (status, body) = call(&app, post("/api/v1/events", "application/x-ndjson", ndjson)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let report = json_of(&body);
    assert_eq!(report["accepted"], 2);
    assert_eq!(report["rejected"][0]["index"], 2);
    assert!(
        report["rejected"][0]["message"]
            .as_str()
            .unwrap()
            .starts_with("malformed JSON"),
        "{report}"
    );

    let array = json!([{"eventId": "n1", "customerId": "c1", "type": "page_view"},
                       {"eventId": "a1", "customer_id": "c1", "type": "page_view"}]);
    let (status, body) = call(
        &app,
        post("/api/v1/events", "application/json", array.to_string()),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        json_of(&body),
        json!({"accepted": 1, "duplicates": 1, "without_consent": 0, "rejected": []})
    );

    let (status, body) = call(
        &app,
        post(
            "/api/v1/personalize",
            "application/json",
            json!({"customer_id": "c1", "available_items": ["hero-1", "hero-2"], "placement": "homepage_hero"}).to_string(),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let d = json_of(&body);
    for key in [
        "selected_item",
        "confidence_score",
        "alternative_options",
        "reasoning",
        "latency_ms",
        "decision_id",
    ] {
        assert!(!d[key].is_null(), "{key} missing: {d}");
    }
    assert_eq!(d["alternative_options"].as_array().unwrap().len(), 1);

    let (status, body) = call(
        &app,
        Request::get(
            "/api/v2/content/personalized?segment=vip&type=banner&limit=5&include_metadata=true",
        )
        .body(Body::empty())
        .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let content = json_of(&body);
    let items = content["content_items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["id"], "hero-1", "highest priority first");
    assert_eq!(items[1]["segments"], json!(["vip"]));

    let (status, body) = call(&app, Request::get("/metrics").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    for name in [
        "personalization_decision_latency_ms_bucket",
        "personalization_decisions_total",
        "tailor_events_ingested_total",
        "tailor_feature_read_latency_ms_bucket",
    ] {
        assert!(body.contains(name), "{name} missing:\n{body}");
    }
    for path in ["/healthz", "/readyz"] {
        let (status, _) = call(&app, Request::get(path).body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::OK, "{path}");
    }
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_the_server_stays_up() {
    let app = TestApp::new().await;

    // 10 MB, refused before it is read.
    let big = vec![b'['; 10 * 1024 * 1024];
    let req = Request::post("/api/v1/events")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, big.len())
        .body(Body::from(big))
        .unwrap();
    let (status, _) = call(&app, req).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let big_query =
        json!({"query": format!("{{ __typename }} #{}", "x".repeat(10 * 1024 * 1024))}).to_string();
    let (status, _) = call(&app, post("/graphql", "application/json", big_query)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    let (status, body) = call(
        &app,
        post("/api/v1/events", "application/json", "[{\"customerId\": "),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(json_of(&body)["error"]["code"], "BAD_USER_INPUT");

    let (status, body) = call(
        &app,
        post(
            "/api/v1/personalize",
            "application/json",
            json!({"customer_id": 5}).to_string(),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        json_of(&body)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("customer_id"),
        "{body}"
    );

    let (status, body) = call(
        &app,
        post(
            "/api/v1/personalize",
            "application/json",
            json!({"customer_id": "c", "available_items": ["ghost"]}).to_string(),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(json_of(&body)["error"]["field"], "available_items[0]");

    let (status, body) = call(&app, post("/graphql", "application/json", "{\"query\": ")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    let (status, body) = call(
        &app,
        Request::get("/api/v2/content/personalized?limit=0")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(json_of(&body)["error"]["field"], "limit");

    // Still serving.
    let (status, body) = call(
        &app,
        post(
            "/graphql",
            "application/json",
            json!({"query": "{ segments { name } }"}).to_string(),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json_of(&body), json!({"data": {"segments": []}}));
}

#[tokio::test]
async fn graphiql_is_served_and_can_be_switched_off() {
    let app = TestApp::new().await;
    let (status, body) = call(&app, Request::get("/graphql").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("graphiql"), "{body}");

    let app = TestApp::with(|s| {
        s.api.graphiql = Some(false);
        s.api.introspection = Some(false);
    })
    .await;
    let (status, _) = call(&app, Request::get("/graphql").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, body) = call(
        &app,
        post(
            "/graphql",
            "application/json",
            json!({"query": "{ __schema { types { name } } }"}).to_string(),
        ),
    )
    .await;
    assert_eq!(json_of(&body)["data"]["__schema"], Value::Null, "{body}");
}
