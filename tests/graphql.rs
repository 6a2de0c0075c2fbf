//! The GraphQL schema executed in-process against an embedded engine: the whole
//! personalization loop and its errors.

mod common;

use chrono::{Duration, Utc};
use common::{first_error, TestApp};
use serde_json::json;

#[tokio::test]
async fn events_change_features_and_segments_at_once() {
    let app = TestApp::new().await;
    app.gql(
        "mutation { upsertCustomer(input: {id: \"c1\", traits: {plan: \"pro\"}, email: \"c1@example.com\"}) { id traits } }",
        json!({}),
    )
    .await;
    let seg = app
        .gql(
            "mutation($c: JSON!) { defineSegment(name: \"browsers\", condition: $c) { segment { name size } joined left } }",
            json!({"c": {"all": [
                {"trait": "plan", "op": "eq", "value": "pro"},
                {"event": "page_view", "atLeast": 3, "within": "7d"}
            ]}}),
        )
        .await;
    assert_eq!(seg["defineSegment"]["segment"]["size"], 0);

    let now = Utc::now();
    let result = app
        .track(json!([
            {"eventId": "e1", "customerId": "c1", "type": "page_view", "timestamp": now.to_rfc3339()},
            {"eventId": "e2", "customerId": "c1", "type": "page_view", "timestamp": (now - Duration::days(2)).to_rfc3339()},
            {"eventId": "e3", "customerId": "c1", "type": "page_view"},
            {"eventId": "e4", "customerId": "c1", "type": "email_open"},
            {"eventId": "e5", "customerId": "c1", "type": "form_submit"},
            {"eventId": "old", "customerId": "c1", "type": "page_view", "timestamp": (now - Duration::days(40)).to_rfc3339()},
        ]))
        .await;
    assert_eq!(
        result,
        json!({"accepted": 6, "duplicates": 0, "rejected": []})
    );

    // Visible as soon as trackEvents returns.
    assert_eq!(app.feature("c1", "page_views_30d").await, 3.0);
    assert_eq!(app.feature("c1", "email_opens_30d").await, 1.0);
    assert!((app.feature("c1", "conversion_rate").await - 1.0 / 3.0).abs() < 1e-9);
    let engagement = 0.3 * 3.0 / 10.0 + 0.2 * 1.0 / 5.0 + 0.2 * 1.0 / 2.0;
    assert!((app.feature("c1", "engagement_score").await - engagement).abs() < 1e-9);
    assert!(app.feature("c1", "days_since_last_visit").await < 0.01);

    let data = app
        .gql(
            "{ segment(name: \"browsers\") { size contains(customerId: \"c1\") members(first: 10) { edges { node { id } cursor } pageInfo { hasNextPage } } }
               customer(id: \"c1\") { segments features(names: [\"page_views_30d\"]) { name value version } } }",
            json!({}),
        )
        .await;
    assert_eq!(data["segment"]["size"], 1);
    assert_eq!(data["segment"]["contains"], true);
    assert_eq!(data["segment"]["members"]["edges"][0]["node"]["id"], "c1");
    assert_eq!(data["customer"]["segments"], json!(["browsers"]));
    assert_eq!(data["customer"]["features"][0]["version"], 1);

    // Replaying the same events is idempotent.
    let again = app
        .track(json!([{"eventId": "e1", "customerId": "c1", "type": "page_view"}]))
        .await;
    assert_eq!(
        again,
        json!({"accepted": 0, "duplicates": 1, "rejected": []})
    );
    assert_eq!(app.feature("c1", "page_views_30d").await, 3.0);

    // A trait change moves the customer out at once.
    app.gql(
        "mutation { upsertCustomer(input: {id: \"c1\", traits: {plan: \"free\"}}) { id } }",
        json!({}),
    )
    .await;
    let data = app
        .gql("{ segment(name: \"browsers\") { size } }", json!({}))
        .await;
    assert_eq!(data["segment"]["size"], 0);
}

/// A segment's features come from several event types, applied in different batches: a
/// condition on two features, met only once both batches are in, and a derived feature
/// whose inputs come from both.
#[tokio::test]
async fn segments_read_features_of_event_types_applied_in_different_batches() {
    let app = TestApp::new().await;
    let define = |name: &'static str, condition: serde_json::Value| {
        let app = &app;
        async move {
            app.gql(
                "mutation($n: String!, $c: JSON!) { defineSegment(name: $n, condition: $c) { segment { size } } }",
                json!({"n": name, "c": condition}),
            )
            .await
        }
    };
    define(
        "readers",
        json!({"all": [
            {"feature": "page_views_30d", "op": "gte", "value": 2},
            {"feature": "email_opens_30d", "op": "gte", "value": 1}
        ]}),
    )
    .await;
    // 0.3 × 2/10 + 0.2 × 1/5 = 0.1: both inputs are needed to reach it.
    define(
        "engaged",
        json!({"feature": "engagement_score", "op": "gte", "value": 0.099}),
    )
    .await;
    let segments = |id: &'static str| {
        let app = &app;
        async move {
            app.gql(
                "query($id: ID!) { customer(id: $id) { segments } }",
                json!({"id": id}),
            )
            .await["customer"]["segments"]
                .clone()
        }
    };

    app.track(json!([{"eventId": "o1", "customerId": "c1", "type": "email_open"}]))
        .await;
    assert_eq!(segments("c1").await, json!([]));
    app.track(json!([
        {"eventId": "v1", "customerId": "c1", "type": "page_view"},
        {"eventId": "v2", "customerId": "c1", "type": "page_view"},
    ]))
    .await;
    assert_eq!(app.feature("c1", "email_opens_30d").await, 1.0);
    assert_eq!(segments("c1").await, json!(["engaged", "readers"]));

    // The other order, in one customer's two batches with another customer beside it.
    app.track(json!([
        {"eventId": "v3", "customerId": "c2", "type": "page_view"},
        {"eventId": "v4", "customerId": "c2", "type": "page_view"},
        {"eventId": "v5", "customerId": "c3", "type": "page_view"},
    ]))
    .await;
    assert_eq!(segments("c2").await, json!([]));
    app.track(json!([
        {"eventId": "o2", "customerId": "c2", "type": "email_open"},
        {"eventId": "o3", "customerId": "c3", "type": "email_open"},
    ]))
    .await;
    assert_eq!(segments("c2").await, json!(["engaged", "readers"]));
    assert_eq!(segments("c3").await, json!([]));
}

#[tokio::test]
async fn rejected_events_are_reported_by_index_and_field() {
    let app = TestApp::new().await;
    let result = app
        .track(json!([
            {"customerId": "c1", "type": "page_view"},
            {"customerId": "c1", "type": "bad type"},
            {"customerId": "", "type": "page_view"},
            {"customerId": "c1", "type": "click", "properties": [1, 2]},
        ]))
        .await;
    assert_eq!(result["accepted"], 1);
    assert_eq!(
        result["rejected"],
        json!([
            {"index": 1, "field": "events[1].type", "message": "must be 1–64 characters of [A-Za-z0-9_.:-]"},
            {"index": 2, "field": "events[2].customerId", "message": "must not be empty"},
            {"index": 3, "field": "events[3].properties", "message": "must be a JSON object"},
        ])
    );
}

#[tokio::test]
async fn personalize_records_a_complete_decision_and_learns_from_outcomes() {
    let app = TestApp::new().await;
    app.upsert_content("a", "homepage_hero", 1, &[]).await;
    app.upsert_content("b", "homepage_hero", 5, &[]).await;
    app.upsert_content("vip-only", "homepage_hero", 9, &["vip"])
        .await;
    app.upsert_content("elsewhere", "sidebar", 9, &[]).await;

    let query = "query($i: PersonalizeInput!) { personalize(input: $i) {
        id customerId placement selectedItem { id } items { item { id } score } confidenceScore
        alternatives { item { id } score } reasoning latencyMs policy propensity propensityKind
        modelVersion experiments { experiment variant } segments degraded explanation createdAt } }";
    let d = app
        .gql(query, json!({"i": {"customerId": "c9", "placement": "homepage_hero", "explain": true, "context": {"device": "mobile"}}}))
        .await["personalize"]
        .clone();
    let selected = d["selectedItem"]["id"].as_str().unwrap().to_owned();
    assert!(
        selected == "a" || selected == "b",
        "vip-only and sidebar items are not candidates: {d:#}"
    );
    assert_eq!(d["policy"], "thompson_sampling");
    assert_eq!(
        d["propensityKind"], "exact",
        "Thompson sampling by quadrature"
    );
    let p = d["propensity"].as_f64().unwrap();
    assert!(p > 0.0 && p <= 1.0);
    assert_eq!(d["alternatives"].as_array().unwrap().len(), 1);
    assert_eq!(d["degraded"], false);
    assert!(d["reasoning"].as_str().unwrap().contains(&selected));
    assert!(d["latencyMs"].as_f64().unwrap() > 0.0);
    assert_eq!(d["explanation"]["candidates"].as_array().unwrap().len(), 2);
    assert_eq!(d["explanation"]["filtered"][0]["id"], "vip-only");

    // Read back by id.
    let id = d["id"].as_str().unwrap();
    let back = app
        .gql(
            "query($id: ID!) { decision(id: $id) { id selectedItem { id } propensity } }",
            json!({"id": id}),
        )
        .await;
    assert_eq!(back["decision"]["selectedItem"]["id"], selected.as_str());
    assert_eq!(back["decision"]["propensity"], d["propensity"]);

    // Outcomes update the bandit: after rewarding "a" only, it wins nearly always.
    for _ in 0..40 {
        let d = app
            .gql(
                query,
                json!({"i": {"customerId": "c9", "placement": "homepage_hero"}}),
            )
            .await["personalize"]
            .clone();
        let reward = if d["selectedItem"]["id"] == "a" {
            1.0
        } else {
            0.0
        };
        app.gql(
            "mutation($d: ID!, $r: Float!) { recordOutcome(decisionId: $d, reward: $r, conversionType: \"click\", value: 3.5) { itemId reward } }",
            json!({"d": d["id"], "r": reward}),
        )
        .await;
    }
    let mut a_wins = 0;
    for _ in 0..20 {
        let d = app
            .gql(
                query,
                json!({"i": {"customerId": "c9", "placement": "homepage_hero"}}),
            )
            .await;
        if d["personalize"]["selectedItem"]["id"] == "a" {
            a_wins += 1;
        }
    }
    assert!(
        a_wins >= 15,
        "Thompson sampling should exploit the rewarded item: {a_wins}/20"
    );

    let metrics = app.engine.metrics.render();
    assert!(
        metrics.contains("personalization_decisions_total{"),
        "{metrics}"
    );
    assert!(
        metrics.contains("personalization_conversions_total{"),
        "{metrics}"
    );
}

#[tokio::test]
async fn available_items_and_no_consent() {
    let app = TestApp::new().await;
    app.upsert_content("low", "sidebar", 1, &[]).await;
    app.upsert_content("high", "sidebar", 7, &[]).await;
    app.gql(
        "mutation { upsertCustomer(input: {id: \"shy\", consent: {personalization: false}}) { id } }",
        json!({}),
    )
    .await;
    for _ in 0..5 {
        let d = app
            .gql(
                "{ personalize(input: {customerId: \"shy\", availableItems: [\"low\", \"high\"]}) { id selectedItem { id } policy propensity reasoning } }",
                json!({}),
            )
            .await["personalize"]
            .clone();
        assert_eq!(d["selectedItem"]["id"], "high");
        assert_eq!(d["policy"], "default");
        assert_eq!(d["propensity"], 1.0);
        // Still recorded.
        let back = app
            .gql(
                "query($id: ID!) { decision(id: $id) { id } }",
                json!({"id": d["id"]}),
            )
            .await;
        assert_eq!(back["decision"]["id"], d["id"]);
    }
    // An item named twice is one candidate.
    let d = app
        .gql(
            "{ personalize(input: {customerId: \"c\", availableItems: [\"high\", \"low\", \"high\"]}) { alternatives { item { id } } } }",
            json!({}),
        )
        .await;
    assert_eq!(
        d["personalize"]["alternatives"].as_array().unwrap().len(),
        1,
        "{d}"
    );
    let resp = app
        .exec("{ personalize(input: {customerId: \"c\", availableItems: [\"high\", \"nope\"]}) { id } }", json!({}))
        .await;
    assert_eq!(
        first_error(&resp),
        (
            "NOT_FOUND".into(),
            "availableItems[1]: unknown content item 'nope'".into()
        )
    );
}

#[tokio::test]
async fn bad_input_gets_clear_errors() {
    let app = TestApp::new().await;
    let cases = [
        (
            "mutation { recordOutcome(decisionId: \"nope\", reward: 1) { reward } }",
            ("NOT_FOUND", "decisionId: unknown decision 'nope'"),
        ),
        (
            "{ personalize(input: {customerId: \"\", placement: \"x\"}) { id } }",
            ("BAD_USER_INPUT", "input.customerId: must not be empty"),
        ),
        (
            "{ personalize(input: {customerId: \"c\", placement: \"nowhere\"}) { id } }",
            ("BAD_USER_INPUT", "placement: no eligible content for placement 'nowhere'"),
        ),
        (
            "{ features(customerId: \"c\", names: [\"page_views_30d\", \"nope\"]) { value } }",
            ("NOT_FOUND", "names[1]: unknown feature 'nope'"),
        ),
        (
            "mutation { defineSegment(name: \"s\", condition: {trait: \"plan\", op: \"eqq\", value: 1}) { joined } }",
            ("BAD_USER_INPUT", "condition.op: "),
        ),
        (
            "mutation { defineFeature(name: \"x\", definition: {kind: \"ratio\", numerator: \"nope\", denominator: \"page_views_30d\"}) { name } }",
            ("BAD_USER_INPUT", "definition.numerator: unknown feature 'nope'"),
        ),
        (
            "mutation { upsertCustomer(input: {id: \"c\", traits: [1]}) { id } }",
            ("BAD_USER_INPUT", "input.traits: must be a JSON object"),
        ),
    ];
    for (query, (code, message)) in cases {
        let resp = app.exec(query, json!({})).await;
        let (got_code, got_message) = first_error(&resp);
        assert_eq!(got_code, code, "{query}: {resp:#}");
        assert!(got_message.starts_with(message), "{query}: {got_message}");
    }

    // Nested 50 deep: refused by the depth limit, not a crash.
    let mut deep = String::from("name");
    for _ in 0..47 {
        deep = format!("ofType {{ {deep} }}");
    }
    let query = format!("{{ __schema {{ types {{ {deep} }} }} }}");
    assert_eq!(query.matches('{').count(), 50);
    let resp = app.exec(&query, json!({})).await;
    assert!(
        resp["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("nested too deep"),
        "{resp:#}"
    );
    // Wrong types are reported by GraphQL validation.
    let resp = app
        .exec(
            "{ personalize(input: {customerId: \"c\", count: \"many\"}) { id } }",
            json!({}),
        )
        .await;
    assert!(
        resp["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("count"),
        "{resp:#}"
    );
}

#[tokio::test]
async fn feature_versions_backfill_activate_and_roll_back() {
    let app = TestApp::new().await;
    let now = Utc::now();
    let mut events = Vec::new();
    for c in 0..30 {
        for k in 0..(c % 7 + 1) {
            events.push(json!({"customerId": format!("c{c}"), "type": "page_view",
                "timestamp": (now - Duration::hours(k * 30)).to_rfc3339()}));
        }
        events.push(json!({"customerId": format!("c{c}"), "type": "purchase", "properties": {"value": 10.0 + c as f64}}));
    }
    app.track(json!(events)).await;

    // Version 2 of page_views_30d: a 7-day window, backfilled from history.
    let v2 = app
        .gql(
            "mutation { defineFeature(name: \"page_views_30d\", definition: {kind: \"count\", event_type: \"page_view\", window: \"7d\"}) { name activeVersion versions { version active } } }",
            json!({}),
        )
        .await;
    assert_eq!(
        v2["defineFeature"]["activeVersion"], 1,
        "a new version waits for activation"
    );
    let before = app.feature("c6", "page_views_30d").await;
    assert_eq!(before, 7.0);

    let activated = app
        .gql(
            "mutation { activateFeatureVersion(name: \"page_views_30d\", version: 2) { activated health feature { activeVersion } } }",
            json!({}),
        )
        .await;
    assert_eq!(
        activated["activateFeatureVersion"]["activated"], true,
        "{activated:#}"
    );
    // c6 has page views at 0h, 30h, ... 180h: six are within 7 days.
    assert_eq!(app.feature("c6", "page_views_30d").await, 6.0);

    // Explicit rollback.
    app.gql(
        "mutation { activateFeatureVersion(name: \"page_views_30d\", version: 1) { activated } }",
        json!({}),
    )
    .await;
    assert_eq!(app.feature("c6", "page_views_30d").await, 7.0);

    // A version counting another event type shifts the distribution: rolled back on its own.
    app.gql(
        "mutation { defineFeature(name: \"page_views_30d\", definition: {kind: \"sum\", event_type: \"purchase\", property: \"value\", window: \"30d\"}) { name } }",
        json!({}),
    )
    .await;
    let bad = app
        .gql(
            "mutation { activateFeatureVersion(name: \"page_views_30d\", version: 3) { activated health feature { activeVersion } } }",
            json!({}),
        )
        .await;
    assert_eq!(bad["activateFeatureVersion"]["activated"], false, "{bad:#}");
    assert_eq!(bad["activateFeatureVersion"]["feature"]["activeVersion"], 1);
    assert_eq!(app.feature("c6", "page_views_30d").await, 7.0);
    let history = app
        .gql(
            "{ featureDefinitions { name activeVersion activations { fromVersion toVersion automatic reason } } }",
            json!({}),
        )
        .await;
    let pv = history["featureDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "page_views_30d")
        .unwrap()
        .clone();
    let last = pv["activations"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["automatic"], true);
    assert_eq!(last["fromVersion"], 3);
    assert_eq!(last["toVersion"], 1);
    assert!(
        last["reason"]
            .as_str()
            .unwrap()
            .contains("distribution shift"),
        "{last:#}"
    );
    assert!(app
        .engine
        .metrics
        .render()
        .contains("tailor_feature_rollbacks_total"));
}

#[tokio::test]
async fn new_features_and_segments_see_the_whole_history() {
    let app = TestApp::new().await;
    app.track(json!([
        {"customerId": "a", "type": "purchase", "properties": {"value": 20}},
        {"customerId": "a", "type": "purchase", "properties": {"value": "5.5"}},
        {"customerId": "b", "type": "purchase", "properties": {"value": 1}},
    ]))
    .await;
    app.gql(
        "mutation { defineFeature(name: \"spend_7d\", definition: {kind: \"sum\", event_type: \"purchase\", property: \"value\", window: \"7d\"}) { activeVersion } }",
        json!({}),
    )
    .await;
    assert_eq!(app.feature("a", "spend_7d").await, 25.5);
    let seg = app
        .gql(
            "mutation { defineSegment(name: \"spenders\", condition: {feature: \"spend_7d\", op: \"gte\", value: 10}) { joined segment { size } } }",
            json!({}),
        )
        .await;
    assert_eq!(seg["defineSegment"]["joined"], 1);
    // Live events keep the new feature and segment current.
    app.track(json!([{"customerId": "b", "type": "purchase", "properties": {"value": 9}}]))
        .await;
    assert_eq!(app.feature("b", "spend_7d").await, 10.0);
    let data = app
        .gql("{ customers(segment: \"spenders\", first: 1) { edges { node { id } cursor } pageInfo { hasNextPage endCursor } } }", json!({}))
        .await;
    assert_eq!(data["customers"]["edges"][0]["node"]["id"], "a");
    assert_eq!(data["customers"]["pageInfo"]["hasNextPage"], true);
    let next = app
        .gql(
            "query($a: String) { customers(segment: \"spenders\", first: 1, after: $a) { edges { node { id } } pageInfo { hasNextPage } } }",
            json!({"a": data["customers"]["pageInfo"]["endCursor"]}),
        )
        .await;
    assert_eq!(next["customers"]["edges"][0]["node"]["id"], "b");
    assert_eq!(next["customers"]["pageInfo"]["hasNextPage"], false);
}

#[tokio::test]
async fn segments_slide_with_time_without_new_events() {
    let app = TestApp::new().await;
    // An event just inside the 1-day window: the customer joins at once ...
    let almost_a_day = Utc::now() - Duration::days(1) + Duration::seconds(2);
    app.track(
        json!([{"customerId": "c1", "type": "click", "timestamp": almost_a_day.to_rfc3339()}]),
    )
    .await;
    app.gql(
        "mutation { defineSegment(name: \"recent_clickers\", condition: {event: \"click\", within: \"1d\"}) { joined } }",
        json!({}),
    )
    .await;
    assert_eq!(segment_size(&app, "recent_clickers").await, 1);
    // ... and leaves on the next refresh once the event has slid out, with no new event.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    app.engine.segments.refresh_time_dependent().await.unwrap();
    assert_eq!(segment_size(&app, "recent_clickers").await, 0);
}

#[tokio::test]
async fn epsilon_greedy_is_selectable_with_an_exact_propensity() {
    let app = TestApp::with(|s| {
        s.policy.default = tailor::config::PolicyKind::EpsilonGreedy;
        s.policy.epsilon = 0.2;
    })
    .await;
    for id in ["a", "b", "c", "d"] {
        app.upsert_content(id, "sidebar", 1, &[]).await;
    }
    for _ in 0..20 {
        let d = app
            .gql(
                "{ personalize(input: {customerId: \"c\", placement: \"sidebar\"}) { policy propensity propensityKind } }",
                json!({}),
            )
            .await["personalize"]
            .clone();
        assert_eq!(d["policy"], "epsilon_greedy");
        assert_eq!(d["propensityKind"], "exact");
        let p = d["propensity"].as_f64().unwrap();
        let greedy = 0.8 + 0.2 / 4.0;
        let explored = 0.2 / 4.0;
        assert!(
            (p - greedy).abs() < 1e-9 || (p - explored).abs() < 1e-9,
            "{p}"
        );
    }
}

async fn segment_size(app: &TestApp, name: &str) -> i64 {
    app.gql(
        "query($n: String!) { segment(name: $n) { size } }",
        json!({"n": name}),
    )
    .await["segment"]["size"]
        .as_i64()
        .expect("a size")
}

#[tokio::test]
async fn deleting_a_segment_removes_its_memberships() {
    let app = TestApp::new().await;
    app.track(json!([{"customerId": "c1", "type": "click"}]))
        .await;
    app.gql(
        "mutation { defineSegment(name: \"clickers\", condition: {event: \"click\", within: \"7d\"}) { joined } }",
        json!({}),
    )
    .await;
    assert_eq!(segment_size(&app, "clickers").await, 1);
    let mut changes = app.engine.segments.subscribe();
    let deleted = app
        .gql("mutation { deleteSegment(name: \"clickers\") }", json!({}))
        .await;
    assert_eq!(deleted["deleteSegment"], true);
    let leave = changes.try_recv().expect("a leave was published");
    assert!(!leave.joined);
    let data = app
        .gql(
            "{ segment(name: \"clickers\") { size } customer(id: \"c1\") { segments } }",
            json!({}),
        )
        .await;
    assert_eq!(data["segment"], serde_json::Value::Null);
    assert_eq!(data["customer"]["segments"], json!([]));
}

#[tokio::test]
async fn a_version_that_fails_at_runtime_is_rolled_back() {
    let app = TestApp::new().await;
    app.gql(
        "mutation { defineFeature(name: \"intensity\", definition: {kind: \"weighted_sum\", terms: [{feature: \"page_views_30d\", weight: 1}]}) { activeVersion } }",
        json!({}),
    )
    .await;
    // Version 2 overflows to infinity for anyone with a page view. No customer exists
    // yet, so the activation's health check has nothing to object to.
    app.gql(
        "mutation { defineFeature(name: \"intensity\", definition: {kind: \"weighted_sum\", terms: [{feature: \"page_views_30d\", weight: 1e308, scale: 1e-308}]}) { activeVersion } }",
        json!({}),
    )
    .await;
    let activated = app
        .gql(
            "mutation { activateFeatureVersion(name: \"intensity\", version: 2) { activated } }",
            json!({}),
        )
        .await;
    assert_eq!(activated["activateFeatureVersion"]["activated"], true);

    app.track(json!([{"customerId": "c1", "type": "page_view"}]))
        .await;
    for _ in 0..120 {
        // The failed value reads as the default, never as an error.
        assert_eq!(app.feature("c1", "intensity").await, 0.0);
    }
    let rolled_back = app.engine.features.check_runtime_health().await.unwrap();
    assert_eq!(rolled_back, vec!["intensity".to_string()]);
    assert_eq!(app.feature("c1", "intensity").await, 1.0);
    let history = app
        .gql("{ featureDefinitions { name activeVersion activations { fromVersion toVersion automatic reason } } }", json!({}))
        .await;
    let f = history["featureDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "intensity")
        .unwrap()
        .clone();
    assert_eq!(f["activeVersion"], 1);
    let last = f["activations"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["automatic"], true);
    assert!(
        last["reason"]
            .as_str()
            .unwrap()
            .starts_with("runtime health check failed: 120 of 120"),
        "{last}"
    );
}

const DEFINE_FEATURE: &str = "mutation($n: String!, $d: JSON!) { defineFeature(name: $n, definition: $d) { name activeVersion versions { version active definition } } }";

#[tokio::test]
async fn expression_features_are_versioned_like_any_feature() {
    let app = TestApp::new().await;
    app.track(json!([
        {"customerId": "c1", "type": "page_view"},
        {"customerId": "c1", "type": "page_view"},
        {"customerId": "c1", "type": "email_open"},
        {"customerId": "c1", "type": "form_submit"},
    ]))
    .await;
    // The built-in engagement_score is an expression and gives the seed's value.
    let engagement = 0.3 * 2.0 / 10.0 + 0.2 * 1.0 / 5.0 + 0.2 * 1.0 / 2.0;
    assert_eq!(app.feature("c1", "engagement_score").await, engagement);

    let v1 = app
        .gql(
            DEFINE_FEATURE,
            json!({"n": "intent", "d": {"kind": "expression",
                "expression": "if form_submits_30d > 0 { 1 } else { page_views_30d / 10.0 }",
                "description": "Submitted a form, or the share of ten page views"}}),
        )
        .await;
    let f = &v1["defineFeature"];
    assert_eq!(f["activeVersion"], 1);
    assert_eq!(
        f["versions"][0]["definition"],
        json!({"kind": "expression", "expression": "if form_submits_30d > 0 { 1 } else { page_views_30d / 10.0 }",
               "default": 0.0, "description": "Submitted a form, or the share of ten page views"})
    );
    assert_eq!(
        app.feature("c1", "intent").await,
        1.0,
        "an integer reads as a float"
    );
    assert_eq!(app.feature("c2", "intent").await, 0.0);

    // An expression over an expression, then version 2 of the inner one.
    app.gql(
        DEFINE_FEATURE,
        json!({"n": "intent_squared", "d": {"kind": "expression", "expression": "intent * intent"}}),
    )
    .await;
    assert_eq!(app.feature("c1", "intent_squared").await, 1.0);
    // Version 2 gives c1 the same value, so the activation's health check (which compares
    // distributions) lets it through.
    let v2 = app
        .gql(
            DEFINE_FEATURE,
            json!({"n": "intent", "d": {"kind": "expression", "expression": "min(1, page_views_30d / 2)"}}),
        )
        .await;
    assert_eq!(
        v2["defineFeature"]["activeVersion"], 1,
        "a new version waits for activation"
    );
    let activated = app
        .gql(
            "mutation { activateFeatureVersion(name: \"intent\", version: 2) { activated feature { activeVersion } } }",
            json!({}),
        )
        .await;
    assert_eq!(
        activated["activateFeatureVersion"]["activated"], true,
        "{activated:#}"
    );
    let read = app
        .gql(
            "{ features(customerId: \"c1\", names: [\"intent\", \"intent_squared\"]) { name value version } }",
            json!({}),
        )
        .await;
    assert_eq!(
        read["features"],
        json!([{"name": "intent", "value": 1.0, "version": 2},
               {"name": "intent_squared", "value": 1.0, "version": 1}])
    );

    // No cycles, directly or through another feature.
    let resp = app
        .exec(
            DEFINE_FEATURE,
            json!({"n": "intent", "d": {"kind": "expression", "expression": "intent_squared + 1"}}),
        )
        .await;
    assert_eq!(
        first_error(&resp),
        (
            "BAD_USER_INPUT".to_owned(),
            "definition: 'intent' would depend on itself".to_owned()
        )
    );
}

#[tokio::test]
async fn expression_features_are_checked_when_defined() {
    let app = TestApp::new().await;
    let cases = [
        (
            json!({"kind": "expression", "expression": "page_views_30d / visits + bounce_rate"}),
            "definition.expression: unknown features 'visits', 'bounce_rate'",
        ),
        (
            json!({"kind": "expression", "expression": "min(1.0,\n  page_views_30d / )"}),
            "definition.expression: line 2, column 20: ",
        ),
        (
            json!({"kind": "expression", "expression": ""}),
            "definition.expression: must not be empty",
        ),
    ];
    for (definition, message) in cases {
        let resp = app
            .exec(DEFINE_FEATURE, json!({"n": "broken", "d": definition}))
            .await;
        let (code, got) = first_error(&resp);
        assert_eq!(code, "BAD_USER_INPUT", "{resp:#}");
        assert!(got.starts_with(message), "{got} vs {message}");
    }
}

#[tokio::test]
async fn an_expression_that_fails_at_runtime_is_rolled_back() {
    let app = TestApp::new().await;
    app.gql(
        DEFINE_FEATURE,
        json!({"n": "views", "d": {"kind": "expression", "expression": "page_views_30d"}}),
    )
    .await;
    // Version 2 returns a string: not a number, for everyone.
    app.gql(
        DEFINE_FEATURE,
        json!({"n": "views", "d": {"kind": "expression", "expression": "`${page_views_30d} views`", "default": -1}}),
    )
    .await;
    app.gql(
        "mutation { activateFeatureVersion(name: \"views\", version: 2) { activated } }",
        json!({}),
    )
    .await;
    app.track(json!([{"customerId": "c1", "type": "page_view"}]))
        .await;
    for _ in 0..120 {
        assert_eq!(app.feature("c1", "views").await, -1.0, "the default");
    }
    let rolled_back = app.engine.features.check_runtime_health().await.unwrap();
    assert_eq!(rolled_back, vec!["views".to_string()]);
    assert_eq!(app.feature("c1", "views").await, 1.0);
}

const DEFINE_SEGMENT: &str = "mutation($n: String!, $c: JSON!) { defineSegment(name: $n, condition: $c) { segment { name size definition } joined left } }";

#[tokio::test]
async fn rhai_segments_follow_events_and_traits_in_real_time() {
    let app = TestApp::new().await;
    for (id, plan) in [("c1", "pro"), ("c2", "pro"), ("c3", "free")] {
        app.gql(
            "mutation($i: CustomerInput!) { upsertCustomer(input: $i) { id } }",
            json!({"i": {"id": id, "traits": {"plan": plan}}}),
        )
        .await;
    }
    app.track(json!([{"customerId": "c1", "type": "page_view"}]))
        .await;
    let predicate =
        "customer.traits.plan == \"pro\" && customer.event_count(\"page_view\", \"7d\") >= 2";
    let defined = app
        .gql(
            DEFINE_SEGMENT,
            json!({"n": "keen_pros", "c": {"all": [
                {"rhai": predicate},
                {"not": {"rhai": "customer.feature(\"purchases_30d\") > 0.0"}}
            ]}}),
        )
        .await;
    let d = &defined["defineSegment"];
    assert_eq!(d["joined"], 0);
    assert_eq!(
        d["segment"]["definition"]["condition"],
        json!({"all": [
            {"rhai": predicate},
            {"not": {"rhai": "customer.feature(\"purchases_30d\") > 0.0"}}
        ]}),
        "stored and shown as written"
    );

    // A second page view: c1 joins as soon as trackEvents returns.
    let mut changes = app.engine.segments.subscribe();
    app.track(json!([
        {"customerId": "c1", "type": "page_view"},
        {"customerId": "c3", "type": "page_view"},
        {"customerId": "c3", "type": "page_view"},
    ]))
    .await;
    assert_eq!(segment_size(&app, "keen_pros").await, 1);
    let joined = changes.try_recv().expect("a join was published");
    assert_eq!(
        (
            joined.segment.as_str(),
            joined.customer.as_str(),
            joined.joined
        ),
        ("keen_pros", "c1", true)
    );

    // A purchase (through a feature) moves c1 out; a trait change moves c3 in.
    app.track(json!([{"customerId": "c1", "type": "purchase"}]))
        .await;
    app.gql(
        "mutation { upsertCustomer(input: {id: \"c3\", traits: {plan: \"pro\"}}) { id } }",
        json!({}),
    )
    .await;
    let data = app
        .gql(
            "{ segment(name: \"keen_pros\") { size members(first: 10) { edges { node { id } } } } }",
            json!({}),
        )
        .await;
    assert_eq!(data["segment"]["size"], 1);
    assert_eq!(data["segment"]["members"]["edges"][0]["node"]["id"], "c3");
}

#[tokio::test]
async fn rhai_segments_that_name_events_at_run_time_read_every_event() {
    let app = TestApp::new().await;
    app.gql(
        "mutation { upsertCustomer(input: {id: \"c1\", traits: {watches: \"webinar\"}}) { id } }",
        json!({}),
    )
    .await;
    app.gql(
        DEFINE_SEGMENT,
        json!({"n": "watchers", "c": {"rhai": "customer.event_count(customer.traits.watches, \"30d\") > 0"}}),
    )
    .await;
    assert_eq!(segment_size(&app, "watchers").await, 0);
    app.track(json!([{"customerId": "c1", "type": "webinar"}]))
        .await;
    assert_eq!(segment_size(&app, "watchers").await, 1);
}

#[tokio::test]
async fn rhai_segments_are_checked_when_defined_and_fail_closed() {
    let app = TestApp::new().await;
    let cases = [
        (
            json!({"all": [{"trait": "plan", "op": "exists"}, {"rhai": "customer.traits.plan =="}]}),
            "condition.all[1].rhai: line 1, column 24: ",
        ),
        (
            json!({"any": [{"rhai": "customer.feature(\"ltv\") > 1.0"}]}),
            "condition.any[0].rhai: unknown feature 'ltv'",
        ),
        (
            json!({"rhai": "customer.event_count(\"click\", \"5y\") > 0"}),
            "condition.rhai: line 1, column 10: '5y' is not a window",
        ),
    ];
    for (condition, message) in cases {
        let resp = app
            .exec(DEFINE_SEGMENT, json!({"n": "broken", "c": condition}))
            .await;
        let (code, got) = first_error(&resp);
        assert_eq!(code, "BAD_USER_INPUT", "{resp:#}");
        assert!(got.starts_with(message), "{got} vs {message}");
    }

    // A predicate that fails for a customer keeps them out, even under `not`, and is counted.
    app.gql(
        "mutation { upsertCustomer(input: {id: \"c1\", traits: {plan: \"pro\"}}) { id } }",
        json!({}),
    )
    .await;
    let defined = app
        .gql(
            DEFINE_SEGMENT,
            json!({"n": "odd", "c": {"not": {"rhai": "customer.traits.plan"}}}),
        )
        .await;
    assert_eq!(defined["defineSegment"]["joined"], 0);
    let metrics = app.engine.metrics.render();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("tailor_segment_predicate_errors_total") && l.ends_with(" 1")),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_batch_reads_the_states_it_folded_before_they_are_stored() {
    let app = TestApp::new().await;
    let features = &app.engine.features;
    let now = Utc::now();
    // Events built here, not appended: the background processor never sees them.
    let batch: Vec<tailor::events::StoredEvent> = (1..=3)
        .map(|seq| {
            let input: tailor::events::EventInput = serde_json::from_value(json!({
                "eventId": format!("fold-{seq}"),
                "customerId": "c1",
                "type": "page_view",
            }))
            .unwrap();
            tailor::events::StoredEvent {
                seq,
                event: input.validate("events[0]", now).unwrap(),
            }
        })
        .collect();
    let c1 = tailor::customers::CustomerId::parse("id", "c1").unwrap();
    let views = ["page_views_30d".to_owned()];
    let value = |values: Vec<tailor::features::FeatureValue>| {
        values
            .iter()
            .map(|v| (v.name.clone(), v.value))
            .collect::<std::collections::BTreeMap<_, _>>()
    };

    // Its `where` passes none of the events: its state is not written.
    features
        .define(
            "home_views_30d",
            json!({"kind": "count", "event_type": "page_view", "window": "30d",
                   "where": {"path": "/home"}}),
        )
        .await
        .unwrap();

    let (states, updates) = features
        .fold(&features.catalog(), &batch, now, None)
        .await
        .unwrap();
    // c2 had no events in the batch: read from the store, in the same read.
    let c2 = tailor::customers::CustomerId::parse("id", "c2").unwrap();
    let mut after = features
        .read_after_batch(&states, &[&c1, &c2], Some(&views), "features", now)
        .await
        .unwrap();
    assert_eq!(after.len(), 2);
    assert_eq!(value(after.remove(1))["page_views_30d"], 0.0);
    assert_eq!(value(after.remove(0))["page_views_30d"], 3.0);
    let stored = features
        .read(&c1, Some(&views), "features", now)
        .await
        .unwrap();
    assert_eq!(
        value(stored.values)["page_views_30d"],
        0.0,
        "not stored before write"
    );

    // A feature defined after the fold: read from the store, the folded one from the batch.
    features
        .define(
            "clicks_7d",
            json!({"kind": "count", "event_type": "click", "window": "7d"}),
        )
        .await
        .unwrap();
    let both = ["page_views_30d".to_owned(), "clicks_7d".to_owned()];
    let after = value(
        features
            .read_after_batch(&states, &[&c1], Some(&both), "features", now)
            .await
            .unwrap()
            .remove(0),
    );
    assert_eq!(
        (after["page_views_30d"], after["clicks_7d"]),
        (3.0, 0.0),
        "{after:?}"
    );
    let err = features
        .read_after_batch(&states, &[&c1], Some(&["nope".to_owned()]), "features", now)
        .await
        .expect_err("unknown feature");
    assert!(err.to_string().contains("features[0]"), "{err}");

    features.write(updates).await.unwrap();
    let stored = features
        .read(&c1, Some(&views), "features", now)
        .await
        .unwrap();
    assert_eq!(value(stored.values)["page_views_30d"], 3.0);
    let key = |name: &str| tailor::features::FeatureKey::new(name, 1);
    let raw = app
        .engine
        .stores
        .features
        .read(&c1, &[key("page_views_30d"), key("home_views_30d")])
        .await
        .unwrap();
    assert!(raw[0].is_some(), "folded: stored");
    assert!(raw[1].is_none(), "nothing folded: not stored");
}
