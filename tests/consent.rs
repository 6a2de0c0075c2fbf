//! Consent per purpose (SPEC §7): configured defaults where the customer never said,
//! events without analytics consent used for nothing, decisions without personalization
//! consent non-personalized, marketing content only with marketing consent.

mod common;

use common::{first_error, TestApp};
use serde_json::{json, Value};

async fn consent(app: &TestApp, id: &str, consent: Value) {
    app.gql(
        "mutation($i: CustomerInput!) { upsertCustomer(input: $i) { id } }",
        json!({"i": {"id": id, "consent": consent}}),
    )
    .await;
}

async fn track(app: &TestApp, events: Value) -> Value {
    app.gql(
        "mutation($e: [EventInput!]!) { trackEvents(events: $e) { accepted duplicates withoutConsent rejected { index field message } } }",
        json!({"e": events}),
    )
    .await["trackEvents"]
        .clone()
}

fn page_views(customer: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| json!({"eventId": format!("{customer}-pv-{i}"), "customerId": customer, "type": "page_view"}))
        .collect()
}

async fn exported_events(app: &TestApp, id: &str) -> usize {
    app.gql(
        "query($id: ID!) { exportCustomer(id: $id) }",
        json!({"id": id}),
    )
    .await["exportCustomer"]["events"]
        .as_array()
        .map_or(0, Vec::len)
}

async fn decide(app: &TestApp, customer: &str, extra: Value) -> Value {
    let mut input = json!({"customerId": customer, "placement": "sidebar", "explain": true});
    if let (Some(input), Value::Object(extra)) = (input.as_object_mut(), extra) {
        input.extend(extra);
    }
    app.exec(
        "query($i: PersonalizeInput!) { personalize(input: $i) { selectedItem { id } alternatives { item { id } } policy explanation } }",
        json!({"i": input}),
    )
    .await
}

async fn content(app: &TestApp, id: &str, content_type: &str, priority: i32) {
    app.gql(
        "mutation($i: ContentItemInput!) { upsertContent(input: $i) { id } }",
        json!({"i": {"id": id, "type": content_type, "title": id, "placements": ["sidebar"],
                     "tags": ["t"], "priority": priority}}),
    )
    .await;
}

fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn events_without_analytics_consent_are_acknowledged_and_used_for_nothing() {
    let app = TestApp::new().await;
    consent(
        &app,
        "private",
        json!({"analytics": false, "personalization": true}),
    )
    .await;
    consent(&app, "open", json!({"analytics": true})).await;
    let mut events = page_views("private", 3);
    events.extend(page_views("open", 2));
    // Unknown customer, default analytics = true: collected.
    events.extend(page_views("new", 1));
    let report = track(&app, json!(events)).await;
    assert_eq!(report["accepted"], 3, "{report}");
    assert_eq!(report["withoutConsent"], 3, "{report}");
    assert_eq!(report["rejected"], json!([]), "{report}");
    assert_eq!(app.feature("private", "page_views_30d").await, 0.0);
    assert_eq!(app.feature("open", "page_views_30d").await, 2.0);
    assert_eq!(app.feature("new", "page_views_30d").await, 1.0);
    // Not stored: the right of access finds none of them.
    assert_eq!(exported_events(&app, "private").await, 0);
    assert_eq!(exported_events(&app, "open").await, 2);

    // Granting analytics collects the events that come after it, not the earlier ones.
    consent(&app, "private", json!({"analytics": true})).await;
    let report = track(&app, json!(page_views("private", 3))).await;
    assert_eq!(report["accepted"], 3, "{report}");
    assert_eq!(report["withoutConsent"], 0, "{report}");
    assert_eq!(app.feature("private", "page_views_30d").await, 3.0);

    let text = app.engine.metrics.render();
    assert_eq!(
        metric(&text, "tailor_events_without_consent_total{"),
        3.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "tailor_events_ingested_total{result=\"without_consent\""
        ),
        3.0
    );
}

#[tokio::test]
async fn default_deny_for_analytics_where_consent_is_unknown() {
    let app = TestApp::with(|s| s.consent.default_analytics = false).await;
    consent(&app, "granted", json!({"analytics": true})).await;
    consent(&app, "silent", json!({"marketing": true})).await;
    let mut events = page_views("granted", 2);
    events.extend(page_views("silent", 2));
    events.extend(page_views("stranger", 2));
    let report = track(&app, json!(events)).await;
    assert_eq!(report["accepted"], 2, "{report}");
    assert_eq!(report["withoutConsent"], 4, "{report}");
    assert_eq!(app.feature("granted", "page_views_30d").await, 2.0);
    assert_eq!(app.feature("silent", "page_views_30d").await, 0.0);
    // No event was stored for the stranger, so no profile was made for them either.
    let found = app
        .gql("query { customer(id: \"stranger\") { id } }", json!({}))
        .await;
    assert!(found["customer"].is_null(), "{found}");
}

#[tokio::test]
async fn consent_withdrawn_after_ingestion_stops_the_processor_using_the_events() {
    let app = TestApp::with(|s| s.timeouts.ingest_apply_ms = 0).await;
    consent(&app, "fickle", json!({"analytics": true})).await;
    // Stop the background processor from racing the withdrawal: hold its lock.
    let lock = app.engine.features.apply_lock().lock().await;
    let report = track(&app, json!(page_views("fickle", 4))).await;
    assert_eq!(report["accepted"], 4, "{report}");
    // Withdrawn straight in the profile store: `upsertCustomer` would wait for the lock.
    let id = tailor::customers::CustomerId::parse("id", "fickle").unwrap();
    let mut profile = app.engine.profiles.get(&id).await.unwrap().unwrap();
    profile.consent.analytics = Some(false);
    app.engine.profiles.put(&profile).await.unwrap();
    drop(lock);
    let last = app.engine.stores.events.last_seq().await.unwrap();
    assert!(
        app.engine
            .processor
            .wait_applied(last, std::time::Duration::from_secs(10))
            .await
    );
    assert_eq!(app.feature("fickle", "page_views_30d").await, 0.0);
    let text = app.engine.metrics.render();
    assert_eq!(
        metric(&text, "tailor_events_without_consent_total{stage=\"apply\""),
        4.0,
        "{text}"
    );
}

#[tokio::test]
async fn default_deny_for_personalization_where_consent_is_unknown() {
    let app = TestApp::with(|s| s.consent.default_personalization = false).await;
    content(&app, "low", "banner", 1).await;
    content(&app, "high", "banner", 9).await;
    consent(&app, "yes", json!({"personalization": true})).await;
    consent(&app, "silent", json!({"analytics": true})).await;
    for customer in ["silent", "stranger"] {
        for _ in 0..3 {
            let d = decide(&app, customer, json!({})).await;
            let d = &d["data"]["personalize"];
            assert_eq!(d["policy"], "default", "{customer}: {d}");
            assert_eq!(d["selectedItem"]["id"], "high", "{customer}: {d}");
            assert_eq!(d["explanation"]["personalized"], false);
            // Nothing about them was used, or logged for training.
            assert_eq!(d["explanation"]["features"], json!({}), "{d}");
        }
    }
    let d = decide(&app, "yes", json!({})).await;
    assert_ne!(d["data"]["personalize"]["policy"], "default", "{d}");
    assert_ne!(
        d["data"]["personalize"]["explanation"]["features"],
        json!({}),
        "{d}"
    );
    assert_eq!(
        d["data"]["personalize"]["explanation"]["personalized"],
        true
    );
}

#[tokio::test]
async fn marketing_content_only_with_marketing_consent() {
    let app = TestApp::with(|s| {
        s.consent.marketing_content_types = vec!["offer".into()];
    })
    .await;
    content(&app, "promo", "offer", 9).await;
    content(&app, "news", "banner", 1).await;
    consent(&app, "opted-in", json!({"marketing": true})).await;
    consent(&app, "opted-out", json!({"marketing": false})).await;
    // Never said (default marketing = false), explicitly no, and no profile at all.
    for customer in ["opted-out", "stranger"] {
        for _ in 0..5 {
            let d = decide(&app, customer, json!({})).await;
            let d = &d["data"]["personalize"];
            assert_eq!(d["selectedItem"]["id"], "news", "{customer}: {d}");
            assert_eq!(d["alternatives"], json!([]), "{customer}: {d}");
            let filtered = d["explanation"]["filtered"].to_string();
            assert!(
                filtered.contains("promo") && filtered.contains("no marketing consent"),
                "{filtered}"
            );
        }
        // Naming the item does not get round the customer's choice.
        let resp = decide(&app, customer, json!({"availableItems": ["promo"]})).await;
        let (code, message) = first_error(&resp);
        assert_eq!(code, "BAD_USER_INPUT", "{resp}");
        assert!(message.contains("availableItems"), "{message}");
        assert!(message.contains("no marketing consent"), "{message}");
        assert!(!message.contains(customer), "{message}");
    }
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..5 {
        let d = decide(&app, "opted-in", json!({})).await;
        let d = &d["data"]["personalize"];
        seen.insert(d["selectedItem"]["id"].as_str().unwrap().to_owned());
        for alt in d["alternatives"].as_array().unwrap() {
            seen.insert(alt["item"]["id"].as_str().unwrap().to_owned());
        }
        assert_eq!(d["explanation"]["marketing_consent"], true);
    }
    assert!(seen.contains("promo"), "{seen:?}");
    let d = decide(&app, "opted-in", json!({"availableItems": ["promo"]})).await;
    assert_eq!(
        d["data"]["personalize"]["selectedItem"]["id"], "promo",
        "{d}"
    );
}
