//! Authentication and roles: every GraphQL field and REST route is open to exactly its
//! roles (and admin); missing, unknown and revoked keys are unauthenticated; keys are
//! stored as hashes; switched off explicitly, every call succeeds without a key; SSO
//! JWTs verify with one algorithm, issuer and audience, their role from a claim.

mod common;

use std::collections::BTreeSet;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use common::{first_error, TestApp};
use futures::{FutureExt, StreamExt};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tailor::auth::Role;
use tower::ServiceExt;

use Role::{Frontend, Internal, Marketer};

/// Every Query, Mutation and Subscription field: a call of it, and the roles besides
/// admin it is open to. The access table of docs/ARCHITECTURE.md.
const FIELDS: &[(&str, &str, &[Role])] = &[
    // Query
    (
        "personalize",
        r#"{ personalize(input: {customerId: "c1"}) { id } }"#,
        &[Frontend],
    ),
    ("decision", r#"{ decision(id: "d") { id } }"#, &[Internal]),
    (
        "outcomes",
        r#"{ outcomes(decisionId: "d") { reward } }"#,
        &[Internal],
    ),
    ("customer", r#"{ customer(id: "c1") { id } }"#, &[Marketer]),
    (
        "customers",
        "{ customers { edges { cursor } } }",
        &[Marketer],
    ),
    (
        "features",
        r#"{ features(customerId: "c1") { name } }"#,
        &[Marketer],
    ),
    (
        "featureDefinitions",
        "{ featureDefinitions { __typename } }",
        &[Marketer],
    ),
    ("segment", r#"{ segment(name: "s") { name } }"#, &[Marketer]),
    ("segments", "{ segments { name } }", &[Marketer]),
    ("content", "{ content { id } }", &[Frontend, Marketer]),
    (
        "contentItem",
        r#"{ contentItem(id: "x") { id } }"#,
        &[Frontend, Marketer],
    ),
    (
        "experiment",
        r#"{ experiment(key: "e") { key } }"#,
        &[Marketer],
    ),
    ("experiments", "{ experiments { key } }", &[Marketer]),
    (
        "experimentResults",
        r#"{ experimentResults(key: "e") { __typename } }"#,
        &[Marketer],
    ),
    ("rules", "{ rules { name } }", &[Marketer]),
    ("rule", r#"{ rule(name: "r") { name } }"#, &[Marketer]),
    ("models", "{ models { version } }", &[]),
    (
        "evaluatePolicy",
        r#"{ evaluatePolicy(input: {policy: "uniform"}) { __typename } }"#,
        &[],
    ),
    ("apiKeys", "{ apiKeys { id } }", &[]),
    ("exportCustomer", r#"{ exportCustomer(id: "c1") }"#, &[]),
    (
        "customerIdsByEmail",
        r#"{ customerIdsByEmail(email: "a@example.com") }"#,
        &[],
    ),
    // Mutation
    (
        "trackEvents",
        r#"mutation { trackEvents(events: [{customerId: "c1", type: "page_view"}]) { accepted } }"#,
        &[Frontend],
    ),
    (
        "upsertCustomer",
        r#"mutation { upsertCustomer(input: {id: "c1"}) { id } }"#,
        &[],
    ),
    (
        "eraseCustomer",
        r#"mutation { eraseCustomer(id: "nobody") { events } }"#,
        &[],
    ),
    (
        "rotateMasterKey",
        "mutation { rotateMasterKey { rewrapped } }",
        &[],
    ),
    (
        "recordOutcome",
        r#"mutation { recordOutcome(decisionId: "d") { reward } }"#,
        &[Frontend, Internal],
    ),
    (
        "defineSegment",
        r#"mutation { defineSegment(name: "s", condition: {trait: "plan", op: "exists"}) { joined } }"#,
        &[Marketer],
    ),
    (
        "deleteSegment",
        r#"mutation { deleteSegment(name: "nope") }"#,
        &[Marketer],
    ),
    (
        "defineFeature",
        r#"mutation { defineFeature(name: "views", definition: {kind: "count", event_type: "page_view", window: "7d"}) { __typename } }"#,
        &[],
    ),
    (
        "activateFeatureVersion",
        r#"mutation { activateFeatureVersion(name: "nope", version: 1) { activated } }"#,
        &[],
    ),
    (
        "upsertContent",
        r#"mutation { upsertContent(input: {id: "x", type: "banner"}) { id } }"#,
        &[Marketer],
    ),
    (
        "deleteContent",
        r#"mutation { deleteContent(id: "nope") }"#,
        &[Marketer],
    ),
    (
        "createExperiment",
        r#"mutation { createExperiment(input: {key: "e", variants: [{key: "a", weight: 1}, {key: "b", weight: 1}]}) { key } }"#,
        &[Marketer],
    ),
    (
        "setExperimentStatus",
        r#"mutation { setExperimentStatus(key: "nope", status: STOPPED) { key } }"#,
        &[Marketer],
    ),
    (
        "putRule",
        r#"mutation { putRule(name: "r", source: "fn eligible(customer, item, ctx) { true }") { name } }"#,
        &[Marketer],
    ),
    (
        "deleteRule",
        r#"mutation { deleteRule(name: "nope") }"#,
        &[Marketer],
    ),
    (
        "activateRuleVersion",
        r#"mutation { activateRuleVersion(name: "nope", version: 1) { name } }"#,
        &[Marketer],
    ),
    (
        "trainModel",
        "mutation { trainModel(epochs: 1) { version } }",
        &[],
    ),
    (
        "activateModel",
        r#"mutation { activateModel(version: "nope") { version } }"#,
        &[],
    ),
    (
        "rollbackModel",
        "mutation { rollbackModel { version } }",
        &[],
    ),
    (
        "createApiKey",
        "mutation { createApiKey(role: FRONTEND) { key } }",
        &[],
    ),
    (
        "revokeApiKey",
        r#"mutation { revokeApiKey(id: "nope") { id } }"#,
        &[],
    ),
    // Subscription
    (
        "decisions",
        "subscription { decisions { id } }",
        &[Internal],
    ),
    (
        "segmentChanges",
        "subscription { segmentChanges { segment } }",
        &[Internal],
    ),
];

/// The `extensions.code` of the first error of `query` as the holder of `key`; `None`
/// when it has none. A subscription that is allowed waits for events: no error yet.
async fn code_of(app: &TestApp, key: Option<&str>, query: &str) -> Option<String> {
    let resp = if query.starts_with("subscription") {
        let mut request = async_graphql::Request::new(query);
        let header = key.map(|k| format!("Bearer {k}"));
        request = request.data(app.engine.keys.caller(header.as_deref()).await);
        let mut stream = app.schema.execute_stream(request);
        match stream.next().now_or_never() {
            None => return None,
            Some(first) => serde_json::to_value(first.expect("one response")).unwrap(),
        }
    } else {
        app.exec_as(key, query, json!({})).await
    };
    if resp["errors"].is_null() {
        return None;
    }
    Some(first_error(&resp).0)
}

#[tokio::test]
async fn the_access_table_covers_every_field() {
    let app = TestApp::new().await;
    let data = app
        .gql(
            "{ __schema { queryType { fields { name } } mutationType { fields { name } } \
               subscriptionType { fields { name } } } }",
            json!({}),
        )
        .await;
    let mut schema_fields = BTreeSet::new();
    for kind in ["queryType", "mutationType", "subscriptionType"] {
        for f in data["__schema"][kind]["fields"].as_array().unwrap() {
            schema_fields.insert(f["name"].as_str().unwrap().to_owned());
        }
    }
    let table: BTreeSet<String> = FIELDS.iter().map(|(f, _, _)| f.to_string()).collect();
    assert_eq!(
        schema_fields, table,
        "every field of the schema needs its row in FIELDS (and its guard)"
    );
}

#[tokio::test]
async fn every_field_is_forbidden_to_other_roles_and_open_to_its_own() {
    let app = TestApp::new().await;
    for role in [Frontend, Marketer, Internal] {
        let key = app.key(role).await;
        for (field, query, allowed) in FIELDS {
            let code = code_of(&app, Some(&key), query).await;
            if allowed.contains(&role) {
                assert!(
                    !matches!(code.as_deref(), Some("FORBIDDEN" | "UNAUTHENTICATED")),
                    "{role} may use {field}, got {code:?}"
                );
            } else {
                assert_eq!(
                    code.as_deref(),
                    Some("FORBIDDEN"),
                    "{role} may not use {field}"
                );
            }
        }
    }
    // Admin may use every field (the cheap ones here; the rest run in the other tests
    // with the harness's admin key).
    for (field, query, _) in FIELDS {
        if ["trainModel", "evaluatePolicy"].contains(field) {
            continue;
        }
        let code = code_of(&app, app.admin_key.as_deref(), query).await;
        assert!(
            !matches!(code.as_deref(), Some("FORBIDDEN" | "UNAUTHENTICATED")),
            "admin may use {field}, got {code:?}"
        );
    }
}

#[tokio::test]
async fn missing_malformed_and_unknown_keys_are_unauthenticated() {
    let app = TestApp::new().await;
    let unknown = format!("tk_{}_{}", "0".repeat(16), "a".repeat(64));
    let admin = app.admin_key.clone().unwrap();
    let wrong_secret = format!(
        "{}{}",
        &admin[..admin.len() - 1],
        if admin.ends_with('0') { '1' } else { '0' }
    );
    for key in [
        None,
        Some("nonsense"),
        Some(unknown.as_str()),
        Some(wrong_secret.as_str()),
    ] {
        for (field, query, _) in FIELDS {
            assert_eq!(
                code_of(&app, key, query).await.as_deref(),
                Some("UNAUTHENTICATED"),
                "{field} with {key:?}"
            );
        }
    }
    let resp = app.exec_as(None, "{ segments { name } }", json!({})).await;
    assert!(resp["data"].is_null(), "{resp}");
    let (_, message) = first_error(&resp);
    assert!(message.contains("Authorization: Bearer"), "{message}");
}

async fn call(app: &TestApp, req: Request<Body>) -> (StatusCode, Value) {
    let resp = tailor::api::router(app.engine.clone())
        .oneshot(req)
        .await
        .expect("infallible");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// A REST route: its name, its request, a valid body, and the roles besides admin it is
/// open to.
type Route = (
    &'static str,
    fn() -> axum::http::request::Builder,
    &'static str,
    &'static [Role],
);

fn rest_routes() -> Vec<Route> {
    vec![
        (
            "personalize",
            || Request::post("/api/v1/personalize"),
            r#"{"customer_id": "c1"}"#,
            &[Frontend],
        ),
        (
            "events",
            || Request::post("/api/v1/events"),
            r#"[{"customerId": "c1", "type": "page_view"}]"#,
            &[Frontend],
        ),
        (
            "content",
            || Request::get("/api/v2/content/personalized"),
            "",
            &[Frontend, Marketer],
        ),
    ]
}

fn with_key(builder: axum::http::request::Builder, key: Option<&str>, body: &str) -> Request<Body> {
    let mut builder = builder.header(header::CONTENT_TYPE, "application/json");
    if let Some(key) = key {
        builder = builder.header(header::AUTHORIZATION, format!("Bearer {key}"));
    }
    builder.body(Body::from(body.to_owned())).unwrap()
}

#[tokio::test]
async fn rest_routes_answer_401_403_or_serve_by_role() {
    let app = TestApp::new().await;
    app.upsert_content("x", "hero", 1, &[]).await;
    let unknown = format!("tk_{}_{}", "0".repeat(16), "a".repeat(64));
    for (route, request, body, allowed) in rest_routes() {
        for key in [None, Some("tk_bad"), Some(unknown.as_str())] {
            let (status, answer) = call(&app, with_key(request(), key, body)).await;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{route} with {key:?}: {answer}"
            );
            assert_eq!(answer["error"]["code"], "UNAUTHENTICATED");
        }
        for role in [Frontend, Marketer, Internal, Role::Admin] {
            let key = app.key(role).await;
            let (status, answer) = call(&app, with_key(request(), Some(&key), body)).await;
            if role == Role::Admin || allowed.contains(&role) {
                assert_eq!(status, StatusCode::OK, "{role} on {route}: {answer}");
            } else {
                assert_eq!(status, StatusCode::FORBIDDEN, "{role} on {route}: {answer}");
                assert_eq!(answer["error"]["code"], "FORBIDDEN");
            }
        }
    }
    // A malformed header is unauthenticated too, with a challenge.
    let req = Request::get("/api/v2/content/personalized")
        .header(header::AUTHORIZATION, "Basic dXNlcjpwYXNz")
        .body(Body::empty())
        .unwrap();
    let resp = tailor::api::router(app.engine.clone())
        .oneshot(req)
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(resp.headers()[header::WWW_AUTHENTICATE], "Bearer");
    // Health, readiness and metrics stay open.
    for path in ["/healthz", "/readyz", "/metrics"] {
        let (status, _) = call(&app, Request::get(path).body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::OK, "{path}");
    }
}

#[tokio::test]
async fn graphql_over_http_reads_the_bearer_header() {
    let app = TestApp::new().await;
    let marketer = app.key(Marketer).await;
    let post = |key: Option<&str>, query: &str| {
        with_key(
            Request::post("/graphql"),
            key,
            &json!({ "query": query }).to_string(),
        )
    };
    let (status, answer) = call(&app, post(Some(&marketer), "{ segments { name } }")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(answer["errors"].is_null(), "{answer}");
    let (_, answer) = call(&app, post(Some(&marketer), "{ models { version } }")).await;
    assert_eq!(
        answer["errors"][0]["extensions"]["code"], "FORBIDDEN",
        "{answer}"
    );
    let (_, answer) = call(&app, post(None, "{ segments { name } }")).await;
    assert_eq!(
        answer["errors"][0]["extensions"]["code"], "UNAUTHENTICATED",
        "{answer}"
    );
}

#[tokio::test]
async fn keys_are_managed_over_graphql_and_a_revoked_key_stops_at_once() {
    let app = TestApp::new().await;
    let created = app
        .gql(
            r#"mutation { createApiKey(role: FRONTEND, name: "web") { key apiKey { id name role revokedAt } } }"#,
            json!({}),
        )
        .await;
    let key = created["createApiKey"]["key"].as_str().unwrap().to_owned();
    let id = created["createApiKey"]["apiKey"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(key.starts_with(&format!("tk_{id}_")), "{key}");
    assert_eq!(
        created["createApiKey"]["apiKey"],
        json!({"id": id, "name": "web", "role": "FRONTEND", "revokedAt": null})
    );
    // Used once, so it sits in the verification cache when it is revoked.
    assert_eq!(code_of(&app, Some(&key), "{ content { id } }").await, None);
    let rest = || with_key(Request::get("/api/v2/content/personalized"), Some(&key), "");
    assert_eq!(call(&app, rest()).await.0, StatusCode::OK);

    let listed = app
        .gql(
            "{ apiKeys { id name role createdAt revokedAt } }",
            json!({}),
        )
        .await;
    let ours: Vec<&Value> = listed["apiKeys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["id"] == id.as_str())
        .collect();
    assert_eq!(ours.len(), 1, "{listed}");
    assert!(
        !listed.to_string().contains(&key[key.len() - 64..]),
        "no secret is listed"
    );

    let revoked = app
        .gql(
            "mutation($id: ID!) { revokeApiKey(id: $id) { id revokedAt } }",
            json!({"id": id}),
        )
        .await;
    assert!(
        revoked["revokeApiKey"]["revokedAt"].is_string(),
        "{revoked}"
    );
    assert_eq!(
        code_of(&app, Some(&key), "{ content { id } }")
            .await
            .as_deref(),
        Some("UNAUTHENTICATED")
    );
    assert_eq!(call(&app, rest()).await.0, StatusCode::UNAUTHORIZED);

    // Bad input names its field.
    let resp = app
        .exec(r#"mutation { revokeApiKey(id: "nope") { id } }"#, json!({}))
        .await;
    assert_eq!(
        first_error(&resp),
        ("NOT_FOUND".into(), "id: unknown API key 'nope'".into())
    );
    let resp = app
        .exec(
            "mutation($n: String) { createApiKey(role: ADMIN, name: $n) { key } }",
            json!({"n": "x".repeat(65)}),
        )
        .await;
    let (code, message) = first_error(&resp);
    assert_eq!(code, "BAD_USER_INPUT");
    assert!(message.starts_with("name: "), "{message}");
    let resp = app
        .exec("mutation { createApiKey(role: ROOT) { key } }", json!({}))
        .await;
    assert!(first_error(&resp).1.contains("ROOT"), "{resp}");
}

#[tokio::test]
async fn the_store_holds_no_plaintext_secret() {
    let app = TestApp::new().await;
    let mut secrets = vec![app.admin_key.clone().unwrap()];
    for role in Role::ALL {
        secrets.push(app.key(role).await);
    }
    let records = app.engine.keys.list().await.unwrap();
    assert_eq!(records.len(), secrets.len());
    let bytes = std::fs::read(app.dir.path().join(tailor::storage::embedded::FILE_NAME)).unwrap();
    let contains = |needle: &str| bytes.windows(needle.len()).any(|w| w == needle.as_bytes());
    for key in &secrets {
        let record = records
            .iter()
            .find(|r| key.starts_with(&format!("tk_{}_", r.id)))
            .expect("every key is listed");
        let secret = &key[key.len() - 64..];
        assert!(
            !contains(secret),
            "the secret of {} is in the store file",
            record.id
        );
        assert!(!format!("{record:?}").contains(secret));
    }
    // The scan does see what is stored: every record's hash.
    for record in &records {
        assert!(
            contains(&record.secret_sha256),
            "hash of {} not found",
            record.id
        );
    }
}

#[tokio::test]
async fn switched_off_explicitly_every_call_succeeds_without_a_key() {
    let app = TestApp::with(|s| s.auth.enabled = false).await;
    assert!(app.admin_key.is_none());
    let resp = app
        .exec_as(None, r#"mutation { upsertContent(input: {id: "x", type: "banner", placements: ["hero"]}) { id } }"#, json!({}))
        .await;
    assert!(resp["errors"].is_null(), "{resp}");
    let resp = app
        .exec_as(None, "{ models { version } apiKeys { id } }", json!({}))
        .await;
    assert!(resp["errors"].is_null(), "{resp}");
    for (route, request, body, _) in rest_routes() {
        let (status, answer) = call(&app, with_key(request(), None, body)).await;
        assert_eq!(status, StatusCode::OK, "{route}: {answer}");
    }
}

#[tokio::test]
async fn the_demo_creates_one_key_per_role_once_and_reads_them_back() {
    let app = TestApp::new().await;
    let first = tailor::demo::ensure_keys(&app.engine).await.unwrap();
    let roles: Vec<Role> = first.keys.iter().map(|(r, _)| *r).collect();
    assert_eq!(roles, Role::ALL.to_vec());
    for (role, key) in &first.keys {
        let principal = app.engine.keys.verify(key).await.unwrap().unwrap();
        assert_eq!(principal.role, *role);
        assert!(
            first.to_string().contains(&format!("{role}"))
                && first.to_string().contains(key.as_str())
        );
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&first.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "only the owner may read the demo's keys");
    }
    let again = tailor::demo::ensure_keys(&app.engine).await.unwrap();
    assert_eq!(again.keys, first.keys, "a later start reads the same keys");
    // The harness's admin key and the demo's four.
    assert_eq!(app.engine.keys.list().await.unwrap().len(), 5);
}

/// An SSO's HS256 token for `claims`, signed with `secret`.
fn jwt(secret: &[u8], alg: jsonwebtoken::Algorithm, claims: Value) -> String {
    let key = jsonwebtoken::EncodingKey::from_secret(secret).unwrap();
    jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), &claims, &key).unwrap()
}

#[tokio::test]
async fn sso_jwts_map_their_role_claim_to_a_role() {
    use jsonwebtoken::Algorithm::{HS256, HS512};
    let secret = b"the sso's shared secret, long enough";
    let keys = tempfile::tempdir().unwrap();
    let key_file = keys.path().join("sso.key");
    std::fs::write(&key_file, [&secret[..], b"\n"].concat()).unwrap();
    let app = TestApp::with(|s| {
        s.auth.jwt.enabled = true;
        s.auth.jwt.algorithm = "HS256".into();
        s.auth.jwt.key_file = key_file.display().to_string();
        s.auth.jwt.issuer = "https://sso.example.com".into();
        s.auth.jwt.audience = "tailor".into();
        s.auth.jwt.role_claim = "groups".into();
    })
    .await;
    let exp = jsonwebtoken::get_current_timestamp() + 600;
    let claims = |role: &str| {
        json!({"iss": "https://sso.example.com", "aud": "tailor", "sub": "u-1",
               "exp": exp, "groups": ["staff", role]})
    };
    let post = |token: &str, query: &str| {
        with_key(
            Request::post("/graphql"),
            Some(token),
            &json!({ "query": query }).to_string(),
        )
    };
    let marketer = jwt(secret, HS256, claims("marketer"));
    let (status, answer) = call(&app, post(&marketer, "{ segments { name } }")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(answer["errors"].is_null(), "{answer}");
    let (_, answer) = call(&app, post(&marketer, "{ models { version } }")).await;
    assert_eq!(answer["errors"][0]["extensions"]["code"], "FORBIDDEN");
    // REST too.
    let frontend = jwt(secret, HS256, claims("frontend"));
    let req = with_key(
        Request::get("/api/v2/content/personalized"),
        Some(&frontend),
        "",
    );
    assert_eq!(call(&app, req).await.0, StatusCode::OK);

    // Refused: another algorithm, issuer or audience, expired, no role, unsigned.
    let mut other_iss = claims("admin");
    other_iss["iss"] = json!("https://evil.example.com");
    let mut other_aud = claims("admin");
    other_aud["aud"] = json!("someone-else");
    let mut expired = claims("admin");
    expired["exp"] = json!(exp - 3_600);
    let refused = [
        jwt(secret, HS512, claims("admin")),
        jwt(secret, HS256, other_iss),
        jwt(secret, HS256, other_aud),
        jwt(secret, HS256, expired),
        jwt(secret, HS256, claims("superuser")),
        jwt(b"not the sso's secret at all, no", HS256, claims("admin")),
    ];
    for token in &refused {
        let (_, answer) = call(&app, post(token, "{ segments { name } }")).await;
        assert_eq!(
            answer["errors"][0]["extensions"]["code"], "UNAUTHENTICATED",
            "{answer}"
        );
        let req = with_key(
            Request::get("/api/v2/content/personalized"),
            Some(token),
            "",
        );
        assert_eq!(call(&app, req).await.0, StatusCode::UNAUTHORIZED);
    }
    // API keys keep working beside JWTs.
    let key = app.key(Marketer).await;
    let (_, answer) = call(&app, post(&key, "{ segments { name } }")).await;
    assert!(answer["errors"].is_null(), "{answer}");

    // Without `[auth.jwt]`, a JWT is not a key.
    let plain = TestApp::new().await;
    let (_, answer) = call(&plain, post(&marketer, "{ segments { name } }")).await;
    assert_eq!(answer["errors"][0]["extensions"]["code"], "UNAUTHENTICATED");
    let message = answer["errors"][0]["message"].as_str().unwrap();
    assert!(message.contains("JWTs are not accepted"), "{message}");
}
