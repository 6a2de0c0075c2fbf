//! The recommendation model at its boundaries: trained on simulated demo history it
//! learns the hidden preferences; over GraphQL it trains, lists, activates, shadows,
//! rolls back and refuses what it must.

mod common;

use std::sync::Arc;

use chrono::{Duration, Utc};
use common::TestApp;
use serde_json::json;
use tailor::demo;
use tailor::model::dataset::Dataset;
use tailor::model::registry::Registry;
use tailor::model::schema::ScoreContext;
use tailor::model::serving::ScoreRequest;
use tailor::model::train::{train, TrainParams};
use tailor::model::Device;

#[test]
fn training_on_simulated_demo_history_learns_the_hidden_preferences() {
    let customers: Vec<_> = (0..3_000)
        .map(|i| demo::simulated_customer(i, 11))
        .collect();
    let now = Utc::now();
    let history = demo::simulate_history(
        &customers,
        2,
        now - Duration::days(8),
        now - Duration::days(1),
        5,
    )
    .unwrap();
    let data = Dataset::from_decisions(history, Duration::days(1), now);
    assert_eq!(data.decisions, 6_000);
    let trained = train(&data, &TrainParams::default(), &Device::Cpu, &mut |_| {}).unwrap();
    let m = &trained.report.metrics;
    assert!(m.auc > 0.68, "validation AUC {}", m.auc);
    assert!(m.log_loss < m.baseline_log_loss, "{m:?}");

    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::new(dir.path());
    let manifest = registry
        .save(&trained, &TrainParams::default(), now, 0.0)
        .unwrap();
    let model = registry.load(&manifest.version, &Device::Cpu).unwrap();
    // Fresh customers, never seen in training.
    let cmp = demo::compare_policies(&model, 1_000_000, 2_000, 17).unwrap();
    assert!(
        cmp.model_click_rate > 1.5 * cmp.thompson_click_rate,
        "the model's greedy policy beats Thompson sampling: {cmp:?}"
    );
    assert!(
        cmp.thompson_click_rate > 0.9 * cmp.random_click_rate,
        "{cmp:?}"
    );
}

/// Stores `n` simulated decisions (with outcomes) whose features carry `extra` too.
async fn log_history(app: &TestApp, n: usize, extra: Option<&str>) {
    let customers: Vec<_> = (0..n)
        .map(|i| {
            let (i, f) = demo::simulated_customer(i, 3);
            let mut f = (*f).clone();
            if let Some(name) = extra {
                f.insert(name.to_string(), i as f64 % 7.0);
            }
            (i, Arc::new(f))
        })
        .collect();
    let now = Utc::now();
    let history = demo::simulate_history(
        &customers,
        1,
        now - Duration::days(9),
        now - Duration::days(2),
        extra.map_or(1, |_| 2),
    )
    .unwrap();
    for (d, outcomes) in &history {
        app.engine.stores.decisions.put(d).await.unwrap();
        for o in outcomes {
            app.engine.stores.decisions.put_outcome(o).await.unwrap();
        }
    }
}

/// The first error of a response.
fn first_error(resp: &serde_json::Value) -> serde_json::Value {
    resp["errors"][0].clone()
}

const VERSION_FIELDS: &str =
    "version active shadow parent features metrics { auc logLoss baselineLogLoss ece reliability { count } } data { decisions examples validationExamples }";

#[tokio::test]
async fn train_list_activate_shadow_and_roll_back_over_graphql() {
    let app = TestApp::new().await;
    // Before any data: a clear error naming what is missing.
    let resp = app
        .exec("mutation { trainModel { version } }", json!({}))
        .await;
    let err = first_error(&resp);
    assert_eq!(err["extensions"]["code"], "BAD_USER_INPUT", "{resp}");
    assert_eq!(err["extensions"]["field"], "data");

    for (name, body) in demo::features() {
        app.engine.features.define(&name, body).await.unwrap();
    }
    log_history(&app, 3_000, None).await;
    let q = format!("mutation {{ trainModel(seed: 3, epochs: 4) {{ {VERSION_FIELDS} }} }}");
    let v1 = app.gql(&q, json!({})).await["trainModel"].clone();
    assert_eq!(v1["version"], "v1");
    assert_eq!(v1["active"], false);
    assert_eq!(v1["data"]["decisions"], 3_000);
    assert!(v1["metrics"]["auc"].as_f64().unwrap() > 0.55, "{v1}");
    assert!(v1["features"]
        .as_array()
        .unwrap()
        .contains(&json!("category_views_travel_30d")));

    let active = app
        .gql(
            &format!("mutation {{ activateModel(version: \"v1\") {{ {VERSION_FIELDS} }} }}"),
            json!({}),
        )
        .await;
    assert_eq!(active["activateModel"]["active"], true);
    assert_eq!(
        app.engine.models.scorer().active_version().as_deref(),
        Some("v1")
    );

    let v2 = app
        .gql(
            "mutation { trainModel(seed: 4, epochs: 3) { version parent } }",
            json!({}),
        )
        .await;
    assert_eq!(v2["trainModel"], json!({"version": "v2", "parent": "v1"}));
    app.gql(
        "mutation { activateModel(version: \"v2\", shadow: true) { version shadow } }",
        json!({}),
    )
    .await;
    let list = app
        .gql("{ models { version active shadow } }", json!({}))
        .await;
    assert_eq!(
        list["models"],
        json!([
            {"version": "v1", "active": true, "shadow": false},
            {"version": "v2", "active": false, "shadow": true}
        ])
    );
    let items: Vec<_> = demo::catalog().into_iter().take(5).map(Arc::new).collect();
    let scores = app
        .engine
        .models
        .scorer()
        .score(ScoreRequest {
            features: demo::simulated_customer(77, 1).1,
            items,
            context: ScoreContext::default(),
            version: None,
        })
        .await
        .unwrap()
        .expect("a model is active");
    assert_eq!(scores.version, "v1");
    assert_eq!(
        scores.shadow.map(|s| (s.version, s.scores.len())),
        Some(("v2".into(), 5))
    );

    // Promote the shadow, then roll back to v1.
    app.gql(
        "mutation { activateModel(version: \"v2\") { version } }",
        json!({}),
    )
    .await;
    let back = app
        .gql("mutation { rollbackModel { version active } }", json!({}))
        .await;
    assert_eq!(
        back["rollbackModel"],
        json!({"version": "v1", "active": true})
    );
    assert_eq!(
        app.engine.models.scorer().active_version().as_deref(),
        Some("v1")
    );

    // Refusals name the field.
    let check = |resp: serde_json::Value, code: &str, field: &str, text: &str| {
        let err = first_error(&resp);
        assert_eq!(err["extensions"]["code"], code, "{resp}");
        assert_eq!(err["extensions"]["field"], field, "{resp}");
        assert!(err["message"].as_str().unwrap().contains(text), "{resp}");
    };
    check(
        app.exec(
            "mutation { activateModel(version: \"v9\") { version } }",
            json!({}),
        )
        .await,
        "NOT_FOUND",
        "version",
        "unknown model version 'v9'",
    );
    check(
        app.exec("mutation { trainModel(epochs: 0) { version } }", json!({}))
            .await,
        "BAD_USER_INPUT",
        "epochs",
        "between 1 and 1000",
    );
    check(
        app.exec("mutation { trainModel(seed: -1) { version } }", json!({}))
            .await,
        "BAD_USER_INPUT",
        "seed",
        "≥ 0",
    );
    // A version reading a feature that is not defined here cannot serve.
    log_history(&app, 600, Some("ghost_score")).await;
    let v3 = app
        .gql(
            "mutation { trainModel(epochs: 2) { version features } }",
            json!({}),
        )
        .await;
    assert_eq!(v3["trainModel"]["version"], "v3");
    check(
        app.exec(
            "mutation { activateModel(version: \"v3\") { version } }",
            json!({}),
        )
        .await,
        "BAD_USER_INPUT",
        "version",
        "not live feature definitions: ghost_score",
    );
    assert_eq!(
        app.engine.models.scorer().active_version().as_deref(),
        Some("v1"),
        "a refused activation changes nothing"
    );
}

#[tokio::test]
async fn decisions_are_scored_by_the_active_model_and_feed_its_online_reward() {
    let app = TestApp::with(|s| s.policy.default = tailor::config::PolicyKind::ModelGreedy).await;
    for item in demo::catalog() {
        app.engine.upsert_content(item).await.unwrap();
    }
    let personalize = r#"query($c: ID!) { personalize(input: {customerId: $c, placement: "homepage_hero", explain: true}) {
        id policy propensity modelVersion selectedItem { id } explanation } }"#;

    // Cold start: no model yet, so the bandit decides alone.
    let cold = app.gql(personalize, json!({"c": "cust-1"})).await["personalize"].clone();
    assert_eq!(cold["modelVersion"], json!(null), "{cold}");
    assert_eq!(cold["policy"], "thompson_sampling");

    for (name, body) in demo::features() {
        app.engine.features.define(&name, body).await.unwrap();
    }
    log_history(&app, 3_000, None).await;
    app.gql(
        "mutation { trainModel(seed: 5, epochs: 3, activate: true) { version } }",
        json!({}),
    )
    .await;
    // Off-policy evaluation of the model's greedy policy on the uniform log: it beats
    // what the log earned, and the model as regressor makes doubly robust tighter.
    let evaluation = app
        .gql(
            "{ evaluatePolicy(input: {policy: \"model_greedy\", rounds: 3000}) { modelVersion regressor rounds loggedValue estimates { estimator value stdError } } }",
            json!({}),
        )
        .await["evaluatePolicy"]
        .clone();
    assert_eq!(evaluation["modelVersion"], "v1", "{evaluation:#}");
    assert_eq!(evaluation["regressor"], "model v1");
    assert_eq!(evaluation["rounds"], 3000);
    let by_name = |name: &str| {
        evaluation["estimates"]
            .as_array()
            .and_then(|e| e.iter().find(|e| e["estimator"] == name).cloned())
            .unwrap_or_else(|| panic!("{name}: {evaluation:#}"))
    };
    let logged = evaluation["loggedValue"].as_f64().unwrap();
    let (ips, dr) = (by_name("ips"), by_name("doubly_robust"));
    assert!(
        dr["value"].as_f64().unwrap() > 1.5 * logged,
        "the model's policy is worth more than uniform choice: {evaluation:#}"
    );
    assert!(
        dr["stdError"].as_f64().unwrap() < ips["stdError"].as_f64().unwrap(),
        "{evaluation:#}"
    );

    let d = app.gql(personalize, json!({"c": "cust-1"})).await["personalize"].clone();
    assert_eq!(d["modelVersion"], "v1", "{d}");
    assert_eq!(d["policy"], "model_greedy");
    assert_eq!(d["propensity"], 1.0);
    let candidates = d["explanation"]["candidates"].as_array().unwrap();
    assert!(candidates.len() >= 2, "{candidates:?}");
    let scores: Vec<f64> = candidates
        .iter()
        .map(|c| c["model_score"].as_f64().expect("every candidate scored"))
        .collect();
    assert!(scores.iter().all(|s| (0.0..=1.0).contains(s)), "{scores:?}");
    assert!(
        scores.windows(2).all(|w| w[0] >= w[1]),
        "greedy on the model's score: {scores:?}"
    );
    assert_eq!(d["selectedItem"]["id"], candidates[0]["id"]);
    assert_eq!(d["explanation"]["model"]["version"], "v1");

    // The decision keeps the scores it was made with, for evaluation and training.
    let id = d["id"].as_str().unwrap();
    let stored = app.engine.stores.decisions.get(id).await.unwrap().unwrap();
    let logged = stored.model_scores.expect("model scores are logged");
    assert_eq!(logged.version, "v1");
    assert_eq!(logged.scores.len(), candidates.len());
    assert_eq!(
        logged.scores[d["selectedItem"]["id"].as_str().unwrap()],
        scores[0]
    );

    // Outcomes count toward the version's online reward (automatic rollback compares it).
    app.gql(
        "mutation($d: ID!) { recordOutcome(decisionId: $d, reward: 1.0) { reward } }",
        json!({"d": id}),
    )
    .await;
    let online = app.engine.models.scorer().online_reward("v1");
    assert_eq!((online.decisions, online.reward), (1, 1.0));
}

#[tokio::test]
async fn an_experiment_variant_scores_with_its_own_model_version() {
    let app = TestApp::new().await;
    for item in demo::catalog() {
        app.engine.upsert_content(item).await.unwrap();
    }
    for (name, body) in demo::features() {
        app.engine.features.define(&name, body).await.unwrap();
    }
    log_history(&app, 3_000, None).await;
    app.gql(
        "mutation { trainModel(seed: 5, epochs: 2, activate: true) { version } }",
        json!({}),
    )
    .await;
    app.gql(
        "mutation { trainModel(seed: 6, epochs: 2) { version } }",
        json!({}),
    )
    .await;
    app.gql(
        "mutation($i: ExperimentInput!) { createExperiment(input: $i) { key } }",
        json!({"i": {"key": "model_v2", "variants": [
            {"key": "control", "weight": 1.0},
            {"key": "candidate", "weight": 1.0, "modelVersion": "v2"},
        ]}}),
    )
    .await;
    app.gql(
        "mutation { setExperimentStatus(key: \"model_v2\", status: RUNNING) { status } }",
        json!({}),
    )
    .await;
    let mut seen = std::collections::BTreeSet::new();
    for c in 0..24 {
        let d = app
            .gql(
                r#"query($c: ID!) { personalize(input: {customerId: $c, placement: "homepage_hero"}) {
                    modelVersion experiments { experiment variant } } }"#,
                json!({"c": format!("cust-{c}")}),
            )
            .await["personalize"]
            .clone();
        let variant = d["experiments"][0]["variant"].as_str().unwrap().to_owned();
        let expected = if variant == "candidate" { "v2" } else { "v1" };
        assert_eq!(d["modelVersion"], expected, "{d}");
        seen.insert(variant);
    }
    assert_eq!(seen.len(), 2, "both variants were served: {seen:?}");
}
