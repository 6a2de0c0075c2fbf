//! No PII in logs, traces or error bodies: customers whose email, phone, name and a
//! sensitive trait are canary strings go through a range of REST and GraphQL calls over
//! the HTTP app (failing ones included: wrong types, malformed JSON, unknown ids, refused
//! keys), with every log event and span (their fields at creation and close) captured
//! at TRACE from every crate; no canary may appear in the capture or in any error body.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use common::TestApp;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tailor::auth::Role;
use tower::ServiceExt;
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::fmt::MakeWriter;

const EMAIL: &str = "canary.mail-4e1b@example.com";
const PHONE: &str = "+1-555-0199-canaryphone";
const NAME: &str = "Canaryname Wolqvist";
const DIAGNOSIS: &str = "canary-diagnosis-7d2c";
const CANARIES: [&str; 4] = [EMAIL, PHONE, NAME, DIAGNOSIS];

/// Everything every subscriber wrote, for the whole test binary.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Capture {
    type Writer = Capture;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Installs the capturing subscriber once, process-wide, so background tasks on other
/// threads are captured too.
fn capture() -> &'static Capture {
    static CAPTURE: OnceLock<Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let capture = Capture::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(capture.clone())
            .with_max_level(tracing::Level::TRACE)
            .with_span_events(FmtSpan::NEW | FmtSpan::CLOSE)
            .with_ansi(false)
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
        capture
    })
}

/// The parts of a response that are error text: a non-2xx body whole, else any
/// `errors` (GraphQL) or `error` (REST) member.
fn error_text(status: StatusCode, body: &str) -> String {
    if !status.is_success() {
        return body.to_owned();
    }
    let Ok(value) = serde_json::from_str::<Value>(body) else {
        return String::new();
    };
    let pick = |v: &Value| {
        let mut out = String::new();
        for key in ["errors", "error", "rejected"] {
            if !v[key].is_null() {
                out.push_str(&v[key].to_string());
            }
        }
        out
    };
    match &value {
        Value::Array(items) => items.iter().map(pick).collect(),
        one => pick(one),
    }
}

struct Client<'a> {
    app: &'a TestApp,
    router: axum::Router,
    /// Every error text seen, with the request that got it.
    errors: Vec<(String, String)>,
    calls: usize,
}

impl Client<'_> {
    async fn send(&mut self, what: &str, key: Option<&str>, mut req: Request<Body>) -> Value {
        let bearer = key.map_or_else(|| self.app.admin_bearer(), |k| format!("Bearer {k}"));
        req.headers_mut()
            .insert(header::AUTHORIZATION, bearer.parse().unwrap());
        let resp = self.router.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let body = String::from_utf8_lossy(&bytes).into_owned();
        self.errors
            .push((what.to_owned(), error_text(status, &body)));
        self.calls += 1;
        serde_json::from_str(&body).unwrap_or(Value::Null)
    }

    async fn gql(&mut self, what: &str, query: &str, variables: Value) -> Value {
        let body = json!({"query": query, "variables": variables}).to_string();
        self.send(what, None, post("/graphql", "application/json", body))
            .await
    }
}

fn post(uri: &str, content_type: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(uri)
        .header(header::CONTENT_TYPE, content_type)
        .body(body.into())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canaries_never_reach_logs_spans_or_error_bodies() {
    let capture = capture();
    let app = TestApp::with(|s| s.encryption.sensitive_traits = vec!["diagnosis".into()]).await;
    app.upsert_content("hero-1", "homepage_hero", 1, &[]).await;
    let mut c = Client {
        router: tailor::api::router(app.engine.clone()),
        app: &app,
        errors: Vec::new(),
        calls: 0,
    };
    let upsert = "mutation($i: CustomerInput!) { upsertCustomer(input: $i) { id traits } }";
    let person = |id: &str| {
        json!({"id": id, "email": EMAIL, "phone": PHONE, "name": NAME,
               "traits": {"plan": "pro", "diagnosis": DIAGNOSIS}})
    };

    // Successful calls that carry the canaries.
    for id in ["pii-1", "pii-2"] {
        let r = c.gql("upsert", upsert, json!({"i": person(id)})).await;
        assert_eq!(r["data"]["upsertCustomer"]["id"], id, "{r}");
    }
    let r = c
        .gql(
            "by email",
            "query($e: String!) { customerIdsByEmail(email: $e) }",
            json!({"e": EMAIL}),
        )
        .await;
    assert_eq!(
        r["data"]["customerIdsByEmail"],
        json!(["pii-1", "pii-2"]),
        "{r}"
    );
    let r = c
        .gql(
            "export",
            "query($id: ID!) { exportCustomer(id: $id) }",
            json!({"id": "pii-1"}),
        )
        .await;
    assert!(
        r.to_string().contains(EMAIL),
        "the owner's export holds it: {r}"
    );
    c.gql(
        "customer",
        "{ customer(id: \"pii-1\") { id traits segments } }",
        json!({}),
    )
    .await;
    let events = json!([
        {"customerId": "pii-1", "type": "page_view", "properties": {"email": EMAIL, "note": NAME}},
        {"customerId": "pii-2", "type": "purchase", "properties": {"phone": PHONE}}
    ]);
    let r = c
        .send(
            "rest events",
            None,
            post("/api/v1/events", "application/json", events.to_string()),
        )
        .await;
    assert_eq!(r["accepted"], 2, "{r}");
    let r = c
        .send(
            "rest personalize",
            None,
            post(
                "/api/v1/personalize",
                "application/json",
                json!({"customer_id": "pii-1", "placement": "homepage_hero",
                       "context": {"email": EMAIL}})
                .to_string(),
            ),
        )
        .await;
    assert_eq!(r["selected_item"], "hero-1", "{r}");
    c.gql(
        "personalize",
        "query($c: JSON) { personalize(input: {customerId: \"pii-2\", placement: \"homepage_hero\", context: $c}) { id } }",
        json!({"c": {"name": NAME}}),
    )
    .await;

    // Failing calls with the canaries in the wrong places.
    let failing: Vec<(&str, Value)> = vec![
        (
            "email as an object",
            json!({"i": {"id": "pii-3", "email": {"x": EMAIL}}}),
        ),
        (
            "phone as a list",
            json!({"i": {"id": "pii-3", "phone": [PHONE]}}),
        ),
        (
            "traits as a string",
            json!({"i": {"id": "pii-3", "traits": DIAGNOSIS}}),
        ),
        (
            "name as a number",
            json!({"i": {"id": "pii-3", "name": 5, "email": EMAIL}}),
        ),
        (
            "consent as a string",
            json!({"i": {"id": "pii-3", "consent": NAME}}),
        ),
        (
            "consent purpose",
            json!({"i": {"id": "pii-3", "consent": {"email": EMAIL}}}),
        ),
        (
            "unknown field",
            json!({"i": {"id": "pii-3", "mail": EMAIL}}),
        ),
        (
            "id as the email",
            json!({"i": {"id": format!("{EMAIL}\n")}}),
        ),
    ];
    for (what, variables) in failing {
        let r = c.gql(what, upsert, variables).await;
        assert!(!r["errors"].is_null(), "{what} fails: {r}");
    }
    let r = c
        .gql(
            "wrong variable type",
            "query($c: Int!) { segments { name } }",
            json!({"c": EMAIL}),
        )
        .await;
    assert!(!r["errors"].is_null(), "{r}");
    let r = c
        .gql(
            "unknown decision",
            "mutation($d: ID!) { recordOutcome(decisionId: $d) { reward } }",
            json!({"d": "d-unknown"}),
        )
        .await;
    assert_eq!(r["errors"][0]["extensions"]["code"], "NOT_FOUND", "{r}");
    c.gql(
        "syntax error in a literal",
        &format!("{{ customerIdsByEmail(email: \"{EMAIL}) }}"),
        json!({}),
    )
    .await;
    c.gql(
        "literal of the wrong type",
        &format!(
            "{{ personalize(input: {{customerId: \"pii-1\", count: \"{PHONE}\"}}) {{ id }} }}"
        ),
        json!({}),
    )
    .await;
    c.send(
        "variables not an object",
        None,
        post(
            "/graphql",
            "application/json",
            json!({"query": "{ __typename }", "variables": EMAIL}).to_string(),
        ),
    )
    .await;
    c.send(
        "query not a string",
        None,
        post(
            "/graphql",
            "application/json",
            json!({"query": [NAME]}).to_string(),
        ),
    )
    .await;
    c.send(
        "malformed GraphQL body",
        None,
        post(
            "/graphql",
            "application/json",
            format!("{{\"query\": \"{EMAIL}"),
        ),
    )
    .await;
    for (what, body) in [
        (
            "rest customer_id as a list",
            json!({"customer_id": [EMAIL]}).to_string(),
        ),
        (
            "rest count as a string",
            json!({"customer_id": "pii-1", "count": PHONE}).to_string(),
        ),
        (
            "rest unknown field",
            json!({"customer_id": "pii-1", "email": EMAIL}).to_string(),
        ),
        (
            "rest unknown item",
            json!({"customer_id": "pii-1", "available_items": ["no-such-item"]}).to_string(),
        ),
        (
            "rest malformed",
            format!("{{\"customer_id\": {DIAGNOSIS}}}"),
        ),
    ] {
        let r = c
            .send(
                what,
                None,
                post("/api/v1/personalize", "application/json", body),
            )
            .await;
        assert!(!r["error"].is_null(), "{what}: {r}");
    }
    let r = c
        .send(
            "rest bad events",
            None,
            post(
                "/api/v1/events",
                "application/x-ndjson",
                format!(
                    "{{\"customerId\": {{\"e\": \"{EMAIL}\"}}, \"type\": \"x\"}}\n\
                     {{\"customerId\": \"pii-1\", \"type\": \"{NAME}\"}}\n\
                     {{\"customerId\": \"pii-1\", \"type\": \"v\", \"timestamp\": \"{PHONE}\"}}\n\
                     {{\"customerId\": \"pii-1\", \"type\": \"v\", \"properties\": \"{DIAGNOSIS}\"}}\n\
                     {{not json {EMAIL}\n"
                ),
            ),
        )
        .await;
    assert_eq!(r["rejected"].as_array().map(Vec::len), Some(5), "{r}");
    let frontend = app.key(Role::Frontend).await;
    let body = json!({"query": "query($e: String!) { customerIdsByEmail(email: $e) }",
                      "variables": {"e": EMAIL}})
    .to_string();
    let r = c
        .send(
            "forbidden role",
            Some(&frontend),
            post("/graphql", "application/json", body.clone()),
        )
        .await;
    assert_eq!(r["errors"][0]["extensions"]["code"], "FORBIDDEN", "{r}");
    let r = c
        .send(
            "a canary as the key",
            Some(EMAIL),
            post("/graphql", "application/json", body),
        )
        .await;
    assert_eq!(
        r["errors"][0]["extensions"]["code"], "UNAUTHENTICATED",
        "{r}"
    );
    let r = c
        .gql(
            "erase",
            "mutation { eraseCustomer(id: \"pii-2\") { events } }",
            json!({}),
        )
        .await;
    assert!(r["errors"].is_null(), "{r}");

    // Every error body is free of canaries.
    assert!(c.calls >= 30, "{} calls", c.calls);
    for (what, text) in &c.errors {
        for canary in CANARIES {
            assert!(!text.contains(canary), "{what}: {canary} in {text}");
        }
    }
    // So is everything logged; the capture did see the requests.
    drop(c);
    drop(app);
    let logged = String::from_utf8_lossy(&capture.0.lock().unwrap()).into_owned();
    assert!(
        logged.contains("request_id="),
        "the capture saw the requests"
    );
    assert!(logged.contains("path=/graphql"), "and their spans");
    for canary in CANARIES {
        if let Some(at) = logged.find(canary) {
            let from = logged[..at].rfind('\n').map_or(0, |i| i + 1);
            let to = logged[at..].find('\n').map_or(logged.len(), |i| at + i);
            panic!("{canary} logged: {}", &logged[from..to]);
        }
    }
}
