//! The hardened API through the HTTP app: hostile GraphQL requests are refused quickly
//! and the server stays healthy; production mode hides GraphiQL, introspection and
//! suggestions; each key has its rate limit (429 on REST, `RATE_LIMITED` on GraphQL);
//! every response carries a request id.

mod common;

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, HeaderMap, Request, StatusCode};
use common::TestApp;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tailor::auth::Role;
use tower::ServiceExt;

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
    took: Duration,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The first GraphQL error's code and message.
    fn first_error(&self) -> (String, String) {
        common::first_error(&self.json())
    }
}

/// Sends `req` with `key` (the admin key when `None` and authentication is on) to a
/// new router of `app`.
async fn call_as(app: &TestApp, key: Option<&str>, req: Request<Body>) -> Answer {
    let router = tailor::api::router(app.engine.clone());
    send(&router, app, key, req).await
}

/// Sends `req` to `router`, which keeps its state (the rate limits) between calls.
async fn send(
    router: &axum::Router,
    app: &TestApp,
    key: Option<&str>,
    mut req: Request<Body>,
) -> Answer {
    let bearer = match key {
        Some(k) => format!("Bearer {k}"),
        None => app.admin_bearer(),
    };
    if !bearer.is_empty() {
        req.headers_mut()
            .insert(header::AUTHORIZATION, bearer.parse().unwrap());
    }
    let started = Instant::now();
    let resp = router.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
        took: started.elapsed(),
    }
}

async fn call(app: &TestApp, req: Request<Body>) -> Answer {
    call_as(app, None, req).await
}

fn graphql(body: impl Into<Body>) -> Request<Body> {
    Request::post("/graphql")
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.into())
        .unwrap()
}

fn query(q: &str) -> Request<Body> {
    graphql(json!({ "query": q }).to_string())
}

#[tokio::test]
async fn hostile_graphql_is_refused_quickly_and_the_server_stays_healthy() {
    let app = TestApp::new().await;

    // 50-deep nesting.
    let mut deep = String::from("name");
    for _ in 0..47 {
        deep = format!("ofType {{ {deep} }}");
    }
    let deep = format!("{{ __schema {{ types {{ {deep} }} }} }}");
    assert_eq!(deep.matches('{').count(), 50);

    // 500 aliases of one cheap field.
    let aliases: String = (0..500).map(|i| format!("a{i}: __typename ")).collect();
    let aliases = format!("{{ {aliases} }}");

    // 50,000 directives on one field.
    let directives = format!("{{ __typename {} }}", "@skip(if: false) ".repeat(50_000));

    // 1,000 operations in one batch.
    let batch = Value::Array(vec![json!({"query": "{ __typename }"}); 1_000]).to_string();

    // 10 MB, refused by its length before it is read.
    let big = vec![b' '; 10 * 1024 * 1024];

    let cases: Vec<(&str, Request<Body>, StatusCode, &str)> = vec![
        ("nesting", query(&deep), StatusCode::OK, "nested too deep"),
        ("aliases", query(&aliases), StatusCode::OK, "500 aliases"),
        (
            "directives",
            query(&directives),
            StatusCode::OK,
            "directives",
        ),
        (
            "batch",
            graphql(batch),
            StatusCode::BAD_REQUEST,
            "a batch of 1000 operations; at most 16",
        ),
    ];
    for (name, req, status, message) in cases {
        let answer = call(&app, req).await;
        assert_eq!(answer.status, status, "{name}: {}", answer.body);
        let (_, got) = answer.first_error();
        assert!(got.contains(message), "{name}: {got}");
        assert!(answer.json()["data"].is_null(), "{name}: nothing ran");
        // Refused by its limit before anything ran, not by the request timeout (the
        // message says which); how long that takes is a benchmark's business, not a
        // test's, so it is only reported.
        eprintln!("{name}: refused in {:?}", answer.took);
    }
    let req = Request::post("/graphql")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, big.len())
        .body(Body::from(big))
        .unwrap();
    let answer = call(&app, req).await;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
    eprintln!("10 MB body: refused in {:?}", answer.took);

    // Healthy: health checks and an ordinary query still answer.
    let answer = call(&app, Request::get("/healthz").body(Body::empty()).unwrap()).await;
    assert_eq!(answer.status, StatusCode::OK);
    let answer = call(&app, query("{ a: __typename segments { name } }")).await;
    assert_eq!(
        answer.json(),
        json!({"data": {"a": "Query", "segments": []}})
    );
}

#[tokio::test]
async fn limits_are_settings() {
    let app = TestApp::with(|s| {
        s.limits.max_aliases = 2;
        s.limits.max_batch_operations = 2;
        s.limits.max_directives = 1;
    })
    .await;
    // Twice each: the second time, an accepted text's document is cached, and a refused
    // text is refused again (it never is).
    for _ in 0..2 {
        let answer = call(&app, query("{ a: __typename b: __typename }")).await;
        assert!(answer.json()["errors"].is_null(), "{}", answer.body);
        let answer = call(&app, query("{ a: __typename b: __typename c: __typename }")).await;
        assert_eq!(
            answer.first_error(),
            (
                "BAD_REQUEST".into(),
                "query has 3 aliases; at most 2 are allowed".into()
            )
        );
        let answer = call(
            &app,
            query("{ __typename @skip(if: false) @include(if: true) }"),
        )
        .await;
        assert!(
            answer.first_error().1.contains("directives"),
            "{}",
            answer.body
        );
    }
    let two = json!([{"query": "{ __typename }"}, {"query": "{ __typename }"}]);
    let answer = call(&app, graphql(two.to_string())).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json().as_array().map(Vec::len), Some(2));
}

/// Parsed documents are kept by query text: a repeated text is executed with each
/// request's own variables (and `@skip` on its own copy), and validated against them
/// every time. (`limits_are_settings` sends refused texts twice.)
#[tokio::test]
async fn repeated_query_texts_are_parsed_once_and_checked_every_time() {
    let app = TestApp::new().await;
    for (id, plan) in [("c1", "pro"), ("c2", "free")] {
        app.gql(
            "mutation($i: CustomerInput!) { upsertCustomer(input: $i) { id } }",
            json!({"i": {"id": id, "traits": {"plan": plan}}}),
        )
        .await;
    }
    let q = "query($id: ID!, $skip: Boolean!) { customer(id: $id) { id traits @skip(if: $skip) } }";
    for (id, skip, plan) in [
        ("c1", false, Some("pro")),
        ("c2", true, None),
        ("c1", true, None),
        ("c2", false, Some("free")),
    ] {
        let data = app.gql(q, json!({"id": id, "skip": skip})).await;
        assert_eq!(data["customer"]["id"], id);
        match plan {
            Some(plan) => assert_eq!(data["customer"]["traits"]["plan"], plan),
            None => assert!(data["customer"].get("traits").is_none(), "{data}"),
        }
    }
    // A required variable that is missing is an error, every time.
    for _ in 0..2 {
        let resp = app.exec(q, json!({"skip": false})).await;
        assert!(
            resp["errors"][0]["message"]
                .as_str()
                .is_some_and(|m| m.contains("id")),
            "{resp}"
        );
    }
}

#[tokio::test]
async fn production_mode_hides_graphiql_introspection_and_suggestions() {
    let typo = "{ segmnts { name } }";
    let introspect = "{ __schema { queryType { name } } }";

    // The default (and the demo): all on.
    let app = TestApp::new().await;
    let answer = call(&app, Request::get("/graphql").body(Body::empty()).unwrap()).await;
    assert_eq!(answer.status, StatusCode::OK);
    let answer = call(&app, query(typo)).await;
    assert!(
        answer.first_error().1.contains("Did you mean"),
        "{}",
        answer.body
    );
    let answer = call(&app, query(introspect)).await;
    assert_eq!(
        answer.json()["data"]["__schema"]["queryType"]["name"],
        "Query"
    );

    let app = TestApp::with(|s| s.api.production = true).await;
    let answer = call(&app, Request::get("/graphql").body(Body::empty()).unwrap()).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    let answer = call(&app, query(typo)).await;
    let (_, message) = answer.first_error();
    assert!(message.contains("segmnts"), "{message}");
    assert!(!message.contains("Did you mean"), "{message}");
    let answer = call(&app, query(introspect)).await;
    assert!(
        answer.json()["data"]["__schema"].is_null(),
        "{}",
        answer.body
    );

    // Explicit settings win over production's defaults.
    let app = TestApp::with(|s| {
        s.api.production = true;
        s.api.graphiql = Some(true);
    })
    .await;
    let answer = call(&app, Request::get("/graphql").body(Body::empty()).unwrap()).await;
    assert_eq!(answer.status, StatusCode::OK);
}

#[tokio::test]
async fn each_key_has_its_rate_limit() {
    let app = TestApp::with(|s| {
        s.limits.rate_per_key_per_second = 1;
        s.limits.rate_burst = 3;
    })
    .await;
    // One router: the limits are its state.
    let router = tailor::api::router(app.engine.clone());
    let call_as = |app, key, req| send(&router, app, key, req);
    let frontend = app.key(Role::Frontend).await;
    let content = || {
        Request::get("/api/v2/content/personalized")
            .body(Body::empty())
            .unwrap()
    };
    for _ in 0..3 {
        let answer = call_as(&app, Some(&frontend), content()).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    }
    let answer = call_as(&app, Some(&frontend), content()).await;
    assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(answer.json()["error"]["code"], "RATE_LIMITED");
    let retry: u64 = answer.headers[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "{retry}");

    // Another key has its own bucket; a batch takes one request per operation.
    let marketer = app.key(Role::Marketer).await;
    let two = json!([{"query": "{ segments { name } }"}, {"query": "{ __typename }"}]);
    let answer = call_as(&app, Some(&marketer), graphql(two.to_string())).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    let answer = call_as(&app, Some(&marketer), graphql(two.to_string())).await;
    assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
    let (code, message) = answer.first_error();
    assert_eq!(code, "RATE_LIMITED");
    assert!(
        message.starts_with("rate limit of this key reached"),
        "{message}"
    );
    assert!(answer.headers.contains_key(header::RETRY_AFTER));

    // Unauthenticated calls are refused as before, not counted against any key.
    let answer = call_as(&app, Some("tk_nope"), query("{ segments { name } }")).await;
    assert_eq!(answer.first_error().0, "UNAUTHENTICATED");
}

#[tokio::test]
async fn every_response_carries_a_request_id() {
    let app = TestApp::new().await;
    let answer = call(&app, query("{ __typename }")).await;
    let id = answer.headers["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 7);

    let req = Request::get("/healthz")
        .header("x-request-id", "edge-1234.abc")
        .body(Body::empty())
        .unwrap();
    let answer = call(&app, req).await;
    assert_eq!(answer.headers["x-request-id"], "edge-1234.abc");
    let req = Request::get("/healthz")
        .header("x-request-id", "not a token")
        .body(Body::empty())
        .unwrap();
    let answer = call(&app, req).await;
    assert_ne!(answer.headers["x-request-id"], "not a token");
}
