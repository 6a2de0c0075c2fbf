//! Experiments through GraphQL against an embedded engine: creation and its errors,
//! status, assignments on decisions, variant overrides (pin, policy, rule set),
//! targeting, layers, exposures, conversions and results.

mod common;

use std::collections::BTreeMap;

use common::TestApp;
use serde_json::{json, Value};

const CREATE: &str = "mutation($i: ExperimentInput!) { createExperiment(input: $i) { key salt status trafficPercent layer layerRange targetingSegment variants { key weight policy modelVersion rules pin } } }";
const STATUS: &str = "mutation($k: String!, $s: ExperimentStatus!) { setExperimentStatus(key: $k, status: $s) { key status startedAt stoppedAt } }";
const DECIDE: &str = "query($c: ID!, $x: Boolean) { personalize(input: {customerId: $c, placement: \"hero\", explain: $x}) { id selectedItem { id } policy propensity experiments { experiment variant } } }";
const RESULTS: &str = "query($k: String!) { experimentResults(key: $k) { experiment status control srmPValue srmDetected variants { variant weight exposures conversions conversionRate value valueMean vsControl { rateDifference rateDifferenceCi { lower upper } lift liftCi { lower upper } zScore pValue alwaysValidCi { lower upper } valueDifference valueDifferenceCi { lower upper } valueTScore valueDegreesOfFreedom valuePValue valueAlwaysValidCi { lower upper } } } } }";
const OUTCOME: &str = "mutation($d: ID!, $r: Float, $v: Float) { recordOutcome(decisionId: $d, reward: $r, value: $v) { decisionId } }";

/// Three hero items: a (priority 3), b (2), c (1).
async fn catalog(app: &TestApp) {
    for (id, priority) in [("a", 3), ("b", 2), ("c", 1)] {
        app.upsert_content(id, "hero", priority, &[]).await;
    }
}

async fn create(app: &TestApp, input: Value) -> Value {
    app.gql(CREATE, json!({"i": input})).await["createExperiment"].clone()
}

async fn set_status(app: &TestApp, key: &str, status: &str) -> Value {
    app.gql(STATUS, json!({"k": key, "s": status})).await["setExperimentStatus"].clone()
}

async fn decide(app: &TestApp, customer: &str) -> Value {
    app.gql(DECIDE, json!({"c": customer, "x": false})).await["personalize"].clone()
}

/// The decision's assignments as `experiment → variant`.
fn assignments(decision: &Value) -> BTreeMap<String, String> {
    decision["experiments"]
        .as_array()
        .expect("experiments is a list")
        .iter()
        .map(|a| {
            (
                a["experiment"].as_str().unwrap().to_owned(),
                a["variant"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// The error's `extensions.code` and `extensions.field`.
fn error(resp: &Value) -> (String, String) {
    let e = &resp["errors"][0];
    (
        e["extensions"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        e["extensions"]["field"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

fn hero(pin: Option<&str>) -> Value {
    json!({
        "key": "hero",
        "variants": [
            {"key": "control", "weight": 1},
            {"key": "pinned", "weight": 1, "pin": pin, "policy": "epsilon_greedy", "modelVersion": "v2"},
        ],
    })
}

#[tokio::test]
async fn bad_experiments_are_refused_naming_the_field() {
    let app = TestApp::new().await;
    catalog(&app).await;
    create(&app, hero(Some("c"))).await;
    let cases = [
        (
            json!({"key": "x", "variants": [{"key": "a", "weight": 1}, {"key": "b", "weight": 0}]}),
            "input.variants[1].weight",
        ),
        (
            json!({"key": "x", "variants": [{"key": "a", "weight": 1}]}),
            "input.variants",
        ),
        (
            json!({"key": "x", "variants": [{"key": "a", "weight": 1}, {"key": "a", "weight": 1}]}),
            "input.variants[1].key",
        ),
        (
            json!({"key": "x", "variants": [{"key": "a", "weight": 1}, {"key": "b", "weight": 1, "pin": "nope"}]}),
            "input.variants[1].pin",
        ),
        (
            json!({"key": "x", "variants": [{"key": "a", "weight": 1}, {"key": "b", "weight": 1, "rules": ["nope"]}]}),
            "input.variants[1].rules[0]",
        ),
        (
            json!({"key": "x", "variants": [{"key": "a", "weight": 1, "policy": "greedy"}, {"key": "b", "weight": 1}]}),
            "input.variants[0].policy",
        ),
        (
            json!({"key": "x", "trafficPercent": 0, "variants": [{"key": "a", "weight": 1}, {"key": "b", "weight": 1}]}),
            "input.trafficPercent",
        ),
        (
            json!({"key": "x", "targetingSegment": "nobody", "variants": [{"key": "a", "weight": 1}, {"key": "b", "weight": 1}]}),
            "input.targetingSegment",
        ),
        (
            json!({"key": "bad key", "variants": [{"key": "a", "weight": 1}, {"key": "b", "weight": 1}]}),
            "input.key",
        ),
        (hero(None), "input.key"),
    ];
    for (input, field) in cases {
        let resp = app.exec(CREATE, json!({"i": input})).await;
        assert_eq!(
            error(&resp),
            ("BAD_USER_INPUT".to_owned(), field.to_owned()),
            "{input}: {resp:#}"
        );
    }
    let resp = app.exec(STATUS, json!({"k": "nope", "s": "RUNNING"})).await;
    assert_eq!(error(&resp), ("NOT_FOUND".to_owned(), "key".to_owned()));
    set_status(&app, "hero", "STOPPED").await;
    let resp = app.exec(STATUS, json!({"k": "hero", "s": "RUNNING"})).await;
    assert_eq!(
        error(&resp),
        ("BAD_USER_INPUT".to_owned(), "status".to_owned())
    );
}

#[tokio::test]
async fn decisions_carry_assignments_pins_serve_and_outcomes_make_results() {
    let app = TestApp::new().await;
    catalog(&app).await;
    let created = create(&app, hero(Some("c"))).await;
    assert_eq!(created["status"], "DRAFT");
    assert_eq!(created["salt"], "hero");
    assert_eq!(
        created["variants"][1],
        json!({"key": "pinned", "weight": 1.0, "policy": "epsilon_greedy", "modelVersion": "v2", "rules": null, "pin": "c"})
    );

    // A draft assigns nobody.
    assert!(assignments(&decide(&app, "c0").await).is_empty());
    let started = set_status(&app, "hero", "RUNNING").await;
    assert_eq!(started["status"], "RUNNING");
    assert!(started["startedAt"].is_string());

    let customers = 60;
    let mut variant_of = BTreeMap::new();
    let mut decisions = Vec::new();
    for i in 0..customers {
        let customer = format!("c{i}");
        let d = decide(&app, &customer).await;
        let assigned = assignments(&d);
        assert_eq!(assigned.len(), 1, "{d:#}");
        let variant = assigned["hero"].clone();
        // The same customer always gets the same variant.
        let again = decide(&app, &customer).await;
        assert_eq!(assignments(&again)["hero"], variant);
        if variant == "pinned" {
            assert_eq!(
                d["selectedItem"]["id"], "c",
                "the pin is served first: {d:#}"
            );
            assert_eq!(d["policy"], "epsilon_greedy");
            assert_eq!(d["propensity"], 1.0);
        } else {
            assert_eq!(d["policy"], "thompson_sampling");
        }
        variant_of.insert(customer, variant.clone());
        decisions.push((d["id"].as_str().unwrap().to_owned(), variant));
        decisions.push((
            again["id"].as_str().unwrap().to_owned(),
            assignments(&again)["hero"].clone(),
        ));
    }
    let pinned = variant_of.values().filter(|v| *v == "pinned").count() as u64;
    let control = customers as u64 - pinned;
    assert!(
        pinned > 10 && control > 10,
        "{pinned} pinned of {customers}"
    );

    // Every pinned decision converts with value 10 (twice: counted once); every third
    // control decision converts with value 4; a zero reward is no conversion.
    let mut expected_conversions = BTreeMap::from([("control", 0u64), ("pinned", 0u64)]);
    for (i, (id, variant)) in decisions.iter().enumerate() {
        if variant == "pinned" {
            app.gql(OUTCOME, json!({"d": id, "r": 0.0})).await;
            app.gql(OUTCOME, json!({"d": id, "r": 1.0, "v": 10.0}))
                .await;
            app.gql(OUTCOME, json!({"d": id, "r": 1.0, "v": 10.0}))
                .await;
            *expected_conversions.get_mut("pinned").unwrap() += 1;
        } else if i % 3 == 0 {
            app.gql(OUTCOME, json!({"d": id, "r": 1.0, "v": 4.0})).await;
            *expected_conversions.get_mut("control").unwrap() += 1;
        }
    }

    let results = app.gql(RESULTS, json!({"k": "hero"})).await["experimentResults"].clone();
    assert_eq!(results["control"], "control");
    let variants = results["variants"].as_array().unwrap();
    assert_eq!(variants[0]["variant"], "control");
    assert_eq!(variants[0]["exposures"], 2 * control);
    assert_eq!(variants[0]["conversions"], expected_conversions["control"]);
    assert_eq!(
        variants[0]["value"],
        4.0 * expected_conversions["control"] as f64
    );
    assert!(variants[0]["vsControl"].is_null());
    assert_eq!(variants[1]["variant"], "pinned");
    assert_eq!(variants[1]["exposures"], 2 * pinned);
    assert_eq!(variants[1]["conversions"], 2 * pinned);
    assert_eq!(variants[1]["conversionRate"], 1.0);
    assert_eq!(variants[1]["valueMean"], 10.0);
    let vs = &variants[1]["vsControl"];
    let control_rate = expected_conversions["control"] as f64 / (2 * control) as f64;
    let diff = vs["rateDifference"].as_f64().unwrap();
    assert!((diff - (1.0 - control_rate)).abs() < 1e-12, "{vs:#}");
    assert!((vs["lift"].as_f64().unwrap() - (1.0 / control_rate - 1.0)).abs() < 1e-9);
    assert!(vs["pValue"].as_f64().unwrap() < 1e-6, "{vs:#}");
    let ci = &vs["rateDifferenceCi"];
    let av = &vs["alwaysValidCi"];
    assert!(
        av["lower"].as_f64() < ci["lower"].as_f64() && ci["upper"].as_f64() < av["upper"].as_f64()
    );
    assert!(vs["valuePValue"].as_f64().unwrap() < 1e-6);
    assert!(vs["valueDegreesOfFreedom"].as_f64().unwrap() > 1.0);
    assert!(results["srmPValue"].as_f64().is_some());

    // Stopped: nobody is assigned any more; the results stay.
    let stopped = set_status(&app, "hero", "STOPPED").await;
    assert!(stopped["stoppedAt"].is_string());
    assert!(assignments(&decide(&app, "c0").await).is_empty());
    let after = app.gql(RESULTS, json!({"k": "hero"})).await["experimentResults"].clone();
    assert_eq!(after["status"], "STOPPED");
    assert_eq!(after["variants"][0]["exposures"], 2 * control);
    let listed = app
        .gql(
            "{ experiments { key status } experiment(key: \"hero\") { key } }",
            json!({}),
        )
        .await;
    assert_eq!(
        listed["experiments"],
        json!([{"key": "hero", "status": "STOPPED"}])
    );
    assert_eq!(listed["experiment"]["key"], "hero");
}

#[tokio::test]
async fn layers_are_exclusive_and_targeting_needs_the_segment() {
    let app = TestApp::new().await;
    catalog(&app).await;
    app.gql(
        "mutation($c: JSON!) { defineSegment(name: \"pros\", condition: $c) { joined } }",
        json!({"c": {"trait": "plan", "op": "eq", "value": "pro"}}),
    )
    .await;
    let two = |key: &str| json!([{"key": format!("{key}-a"), "weight": 1}, {"key": format!("{key}-b"), "weight": 1}]);
    let first = create(
        &app,
        json!({"key": "l1", "layer": "home", "trafficPercent": 60, "variants": two("l1")}),
    )
    .await;
    let second = create(
        &app,
        json!({"key": "l2", "layer": "home", "trafficPercent": 40, "variants": two("l2")}),
    )
    .await;
    assert_eq!(first["layerRange"], json!([0, 6000]));
    assert_eq!(second["layerRange"], json!([6000, 10000]));
    let full = app
        .exec(CREATE, json!({"i": {"key": "l3", "layer": "home", "trafficPercent": 10, "variants": two("l3")}}))
        .await;
    assert_eq!(
        error(&full),
        (
            "BAD_USER_INPUT".to_owned(),
            "input.trafficPercent".to_owned()
        )
    );
    create(
        &app,
        json!({"key": "pro-only", "targetingSegment": "pros", "variants": two("pro")}),
    )
    .await;
    for key in ["l1", "l2", "pro-only"] {
        set_status(&app, key, "RUNNING").await;
    }
    for i in 0..10 {
        app.gql(
            "mutation($i: CustomerInput!) { upsertCustomer(input: $i) { id } }",
            json!({"i": {"id": format!("pro{i}"), "traits": {"plan": "pro"}}}),
        )
        .await;
    }

    let mut in_layer = BTreeMap::from([("l1", 0), ("l2", 0)]);
    for i in 0..80 {
        let d = decide(&app, &format!("u{i}")).await;
        let a = assignments(&d);
        let layered: Vec<&String> = a.keys().filter(|k| k.starts_with('l')).collect();
        assert_eq!(
            layered.len(),
            1,
            "exactly one experiment of the layer at 100%: {a:?}"
        );
        *in_layer.get_mut(layered[0].as_str()).unwrap() += 1;
        assert!(!a.contains_key("pro-only"), "not a pro: {a:?}");
    }
    assert!(in_layer["l1"] > 20 && in_layer["l2"] > 10, "{in_layer:?}");
    for i in 0..10 {
        let a = assignments(&decide(&app, &format!("pro{i}")).await);
        assert!(a.contains_key("pro-only"), "a pro is targeted: {a:?}");
    }

    // Stopping l2 frees its range for a new experiment of the layer.
    set_status(&app, "l2", "STOPPED").await;
    let l3 = create(
        &app,
        json!({"key": "l3", "layer": "home", "trafficPercent": 10, "variants": two("l3")}),
    )
    .await;
    assert_eq!(l3["layerRange"], json!([6000, 7000]));
}

#[tokio::test]
async fn a_variant_can_switch_rules_off_and_a_pin_respects_the_rules() {
    let app = TestApp::new().await;
    catalog(&app).await;
    app.gql(
        "mutation($s: String!) { putRule(source: $s) { name } }",
        json!({"s": "const NAME = \"no_a\";\nfn eligible(c, item, x) { item.id != \"a\" }"}),
    )
    .await;
    create(
        &app,
        json!({"key": "rules-off", "variants": [
            {"key": "with-rules", "weight": 1, "pin": "a"},
            {"key": "no-rules", "weight": 1, "pin": "a", "rules": []},
        ]}),
    )
    .await;
    set_status(&app, "rules-off", "RUNNING").await;
    let mut seen = BTreeMap::new();
    for i in 0..40 {
        let d = decide(&app, &format!("r{i}")).await;
        let variant = assignments(&d)["rules-off"].clone();
        let selected = d["selectedItem"]["id"].as_str().unwrap().to_owned();
        if variant == "no-rules" {
            assert_eq!(selected, "a", "without rules the pin is eligible: {d:#}");
        } else {
            assert_ne!(selected, "a", "the rule removes the pinned item: {d:#}");
        }
        *seen.entry(variant).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "both variants seen: {seen:?}");
}
