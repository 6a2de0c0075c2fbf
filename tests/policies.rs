//! Policies per placement, the linear contextual bandits, and what teaches the bandit:
//! reward definitions per placement and the attribution window.

mod common;

use common::TestApp;
use serde_json::{json, Value};
use tailor::bandit::ArmStats;
use tailor::config::{PlacementPolicy, PolicyKind, RewardKind};

const PERSONALIZE: &str = "query($i: PersonalizeInput!) { personalize(input: $i) { id policy propensity propensityKind selectedItem { id } } }";

async fn decide(app: &TestApp, placement: &str, context: Value) -> Value {
    app.gql(
        PERSONALIZE,
        json!({"i": {"customerId": "c1", "placement": placement, "context": context}}),
    )
    .await["personalize"]
        .clone()
}

async fn outcome(app: &TestApp, decision: &Value, reward: f64, ty: &str, value: Option<f64>) {
    app.gql(
        "mutation($d: ID!, $r: Float!, $t: String, $v: Float) { recordOutcome(decisionId: $d, reward: $r, conversionType: $t, value: $v) { itemId } }",
        json!({"d": decision["id"], "r": reward, "t": ty, "v": value}),
    )
    .await;
}

async fn arm(app: &TestApp, placement: &str, item: &str) -> ArmStats {
    app.engine
        .stores
        .bandit
        .get(placement, &[item.to_owned()])
        .await
        .expect("bandit state")[0]
}

fn placement(policy: Option<PolicyKind>, reward: RewardKind) -> PlacementPolicy {
    PlacementPolicy {
        policy,
        reward,
        value_cap: None,
    }
}

#[tokio::test]
async fn lin_ucb_learns_which_item_suits_which_context() {
    let app = TestApp::with(|s| {
        s.policy.placements.insert(
            "hero".into(),
            placement(Some(PolicyKind::LinUcb), RewardKind::Outcome),
        );
    })
    .await;
    for id in ["web_offer", "app_offer", "other"] {
        app.upsert_content(id, "hero", 1, &[]).await;
    }
    app.upsert_content("s1", "side", 1, &[]).await;
    // Web visitors respond to web_offer only, mobile visitors to app_offer only.
    let best = |device: &str| {
        if device == "web" {
            "web_offer"
        } else {
            "app_offer"
        }
    };
    for round in 0..120 {
        let device = ["web", "mobile"][round % 2];
        let d = decide(&app, "hero", json!({"device": device})).await;
        assert_eq!(d["policy"], "lin_ucb");
        assert_eq!(d["propensity"], 1.0, "LinUCB is deterministic");
        assert_eq!(d["propensityKind"], "exact");
        let reward = f64::from(u8::from(d["selectedItem"]["id"] == best(device)));
        outcome(&app, &d, reward, "click", None).await;
    }
    let mut right = 0;
    for round in 0..20 {
        let device = ["web", "mobile"][round % 2];
        let d = decide(&app, "hero", json!({"device": device})).await;
        if d["selectedItem"]["id"] == best(device) {
            right += 1;
        }
    }
    assert!(right >= 18, "the context decides the pick: {right}/20");
    // Other placements keep the default policy.
    assert_eq!(
        decide(&app, "side", json!({})).await["policy"],
        "thompson_sampling"
    );
    // The regression of each item holds its impressions.
    let stats = app
        .engine
        .stores
        .bandit
        .get_linear(
            "hero",
            &["web_offer".into(), "app_offer".into(), "other".into()],
            app.engine.settings.policy.linear_dims,
        )
        .await
        .expect("linear state");
    let total: f64 = stats.iter().map(|s| s.n).sum();
    assert_eq!(total, 140.0, "one impression per decision");
}

#[tokio::test]
async fn linear_thompson_gives_each_pick_its_computed_propensity() {
    let app = TestApp::with(|s| s.policy.default = PolicyKind::LinearThompson).await;
    for id in ["a", "b", "c"] {
        app.upsert_content(id, "hero", 1, &[]).await;
    }
    let mut firsts = std::collections::BTreeMap::<String, usize>::new();
    for round in 0..30 {
        let d = decide(&app, "hero", json!({"device": "web"})).await;
        assert_eq!(d["policy"], "linear_thompson");
        assert_eq!(d["propensityKind"], "exact");
        let p = d["propensity"].as_f64().expect("propensity");
        if round == 0 {
            // Three fresh arms with the same prior: each is first with probability 1/3.
            assert!((p - 1.0 / 3.0).abs() < 1e-6, "{p}");
        }
        assert!(p > 0.0 && p <= 1.0, "{p}");
        *firsts
            .entry(d["selectedItem"]["id"].as_str().unwrap_or_default().into())
            .or_default() += 1;
    }
    assert_eq!(firsts.len(), 3, "it explores: {firsts:?}");
}

#[tokio::test]
async fn a_placement_learns_only_from_its_own_conversion_type_once() {
    let app = TestApp::with(|s| {
        s.policy.placements.insert(
            "checkout".into(),
            placement(None, RewardKind::Conversion(vec!["purchase".into()])),
        );
    })
    .await;
    app.upsert_content("only", "checkout", 1, &[]).await;
    let d = decide(&app, "checkout", json!({})).await;
    outcome(&app, &d, 1.0, "click", None).await;
    assert_eq!(
        arm(&app, "checkout", "only").await.reward,
        0.0,
        "a click does not count"
    );
    outcome(&app, &d, 1.0, "purchase", None).await;
    assert_eq!(
        arm(&app, "checkout", "only").await.reward,
        1.0,
        "a purchase does"
    );
    outcome(&app, &d, 1.0, "purchase", None).await;
    assert_eq!(
        arm(&app, "checkout", "only").await,
        ArmStats {
            trials: 1.0,
            reward: 1.0
        },
        "a decision teaches once"
    );
}

#[tokio::test]
async fn a_value_reward_is_scaled_by_its_cap() {
    let app = TestApp::with(|s| {
        s.policy.placements.insert(
            "basket".into(),
            PlacementPolicy {
                policy: Some(PolicyKind::LinUcb),
                reward: RewardKind::Value,
                value_cap: Some(200.0),
            },
        );
    })
    .await;
    app.upsert_content("x", "basket", 1, &[]).await;
    let d = decide(&app, "basket", json!({})).await;
    outcome(&app, &d, 1.0, "click", None).await;
    assert_eq!(
        arm(&app, "basket", "x").await.reward,
        0.0,
        "no value, no reward"
    );
    outcome(&app, &d, 1.0, "purchase", Some(50.0)).await;
    assert_eq!(arm(&app, "basket", "x").await.reward, 0.25);
    let linear = app
        .engine
        .stores
        .bandit
        .get_linear(
            "basket",
            &["x".into()],
            app.engine.settings.policy.linear_dims,
        )
        .await
        .expect("linear state");
    assert_eq!(linear[0].n, 1.0);
    assert_eq!(linear[0].b[0], 0.25, "the bias slot of b holds the reward");
}

#[tokio::test]
async fn outcomes_after_the_attribution_window_do_not_teach() {
    let app = TestApp::with(|s| s.policy.attribution_window_secs = 0).await;
    app.upsert_content("only", "hero", 1, &[]).await;
    let d = decide(&app, "hero", json!({})).await;
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    outcome(&app, &d, 1.0, "click", None).await;
    assert_eq!(arm(&app, "hero", "only").await.reward, 0.0);
}

#[tokio::test]
async fn experiments_accept_every_policy_name() {
    let app = TestApp::new().await;
    app.upsert_content("a", "hero", 1, &[]).await;
    let resp = app
        .exec(
            r#"mutation { createExperiment(input: {key: "p", variants: [{key: "control", weight: 1}, {key: "lin", weight: 1, policy: "lin_ucb"}]}) { key variants { policy } } }"#,
            json!({}),
        )
        .await;
    assert!(resp["errors"].is_null(), "{resp:#}");
    assert_eq!(
        resp["data"]["createExperiment"]["variants"][1]["policy"],
        "lin_ucb"
    );
    let resp = app
        .exec(
            r#"mutation { createExperiment(input: {key: "q", variants: [{key: "control", weight: 1}, {key: "x", weight: 1, policy: "nope"}]}) { key } }"#,
            json!({}),
        )
        .await;
    let (code, message) = common::first_error(&resp);
    assert_eq!(code, "BAD_USER_INPUT");
    assert!(message.contains("linear_thompson"), "{message}");
}
