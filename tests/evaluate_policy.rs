//! Off-policy evaluation of the engine's own decision log: `evaluatePolicy` over GraphQL
//! and `tailor ope` on the command line (decision log and imported JSONL).

mod common;

use common::{first_error, TestApp};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tailor::config::PolicyKind;

/// The hidden click probability of each item.
const ITEMS: [(&str, f64); 4] = [("a", 0.1), ("b", 0.3), ("c", 0.5), ("d", 0.2)];

const EVALUATE: &str = "query($i: EvaluatePolicyInput!) { evaluatePolicy(input: $i) { policy modelVersion regressor rounds loggedValue effectiveSampleSize maxWeight estimates { estimator value ciLow ciHigh stdError } skipped { unpersonalized openWindow otherPlacement inconsistent } } }";

/// An engine whose log holds `n` epsilon-greedy decisions (ε = 0.3) on "hero", each
/// rewarded by the items' hidden click probabilities, with their attribution windows
/// closed by the time it returns.
async fn logged_world(n: usize) -> TestApp {
    let app = TestApp::with(|s| {
        s.policy.default = PolicyKind::EpsilonGreedy;
        s.policy.epsilon = 0.3;
        s.policy.attribution_window_secs = 1;
    })
    .await;
    for (id, _) in ITEMS {
        app.upsert_content(id, "hero", 1, &[]).await;
    }
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..n {
        let d = app
            .gql(
                "{ personalize(input: {customerId: \"c1\", placement: \"hero\"}) { id selectedItem { id } } }",
                json!({}),
            )
            .await["personalize"]
            .clone();
        let p = ITEMS
            .iter()
            .find(|(id, _)| d["selectedItem"]["id"] == *id)
            .map_or(0.0, |(_, p)| *p);
        let reward = f64::from(u8::from(rng.random_bool(p)));
        app.gql(
            "mutation($d: ID!, $r: Float!) { recordOutcome(decisionId: $d, reward: $r) { itemId } }",
            json!({"d": d["id"], "r": reward}),
        )
        .await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    app
}

fn estimate<'a>(evaluation: &'a Value, name: &str) -> &'a Value {
    evaluation["estimates"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["estimator"] == name))
        .unwrap_or_else(|| panic!("no {name} estimate in {evaluation:#}"))
}

/// `value` lies within 4 standard errors of the estimate (a 99.99% interval: the test
/// must not fail by chance).
fn near(e: &Value, value: f64) -> bool {
    let (v, se) = (
        e["value"].as_f64().unwrap(),
        e["stdError"].as_f64().unwrap(),
    );
    (v - value).abs() <= 4.0 * se + 1e-9
}

#[tokio::test]
async fn evaluate_policy_recovers_the_logging_policy_and_a_uniform_one() {
    let app = logged_world(400).await;
    let own = app
        .gql(EVALUATE, json!({"i": {"policy": "epsilon_greedy"}}))
        .await["evaluatePolicy"]
        .clone();
    assert_eq!(own["rounds"], 400);
    assert_eq!(own["regressor"], "arm_mean", "no model: arm means");
    assert!(own["modelVersion"].is_null());
    let logged = own["loggedValue"].as_f64().unwrap();
    for name in ["ips", "snips", "direct_method", "doubly_robust"] {
        let e = estimate(&own, name);
        assert!(
            e["ciLow"].as_f64().unwrap() <= e["value"].as_f64().unwrap()
                && e["value"].as_f64().unwrap() <= e["ciHigh"].as_f64().unwrap()
        );
    }
    // Replayed over the same log, the logging policy's estimate is its observed value.
    for name in ["ips", "snips", "doubly_robust"] {
        assert!(near(estimate(&own, name), logged), "{name}: {own:#}");
    }

    // Uniform choice earns the mean click probability; the log says so within its
    // intervals, though epsilon-greedy rarely showed the worse items.
    let uniform = app
        .gql(
            EVALUATE,
            json!({"i": {"policy": "uniform", "placement": "hero"}}),
        )
        .await["evaluatePolicy"]
        .clone();
    let truth = ITEMS.iter().map(|(_, p)| p).sum::<f64>() / ITEMS.len() as f64;
    for name in ["ips", "snips", "doubly_robust"] {
        assert!(near(estimate(&uniform, name), truth), "{name}: {uniform:#}");
    }
    let ess = uniform["effectiveSampleSize"].as_f64().unwrap();
    assert!(
        ess < 400.0 && ess > 20.0,
        "skewed weights cost samples: {ess}"
    );
    assert!(uniform["maxWeight"].as_f64().unwrap() > 1.0);

    // Another placement has nothing to evaluate; its decisions are counted as skipped.
    let resp = app
        .exec(
            EVALUATE,
            json!({"i": {"policy": "uniform", "placement": "sidebar"}}),
        )
        .await;
    let (code, message) = first_error(&resp);
    assert_eq!(code, "BAD_USER_INPUT", "{resp:#}");
    assert!(message.contains("policy"), "{message}");
}

#[tokio::test]
async fn evaluate_policy_names_bad_input() {
    let app = logged_world(5).await;
    for (input, field, code) in [
        (json!({"policy": "nope"}), "policy", "BAD_USER_INPUT"),
        (
            json!({"policy": "uniform", "rounds": 0}),
            "rounds",
            "BAD_USER_INPUT",
        ),
        (
            json!({"policy": "uniform", "rounds": -3}),
            "rounds",
            "BAD_USER_INPUT",
        ),
        (
            json!({"policy": "uniform", "clip": 0.5}),
            "clip",
            "BAD_USER_INPUT",
        ),
        (
            json!({"policy": "model_greedy", "modelVersion": "v9"}),
            "modelVersion",
            "NOT_FOUND",
        ),
    ] {
        let resp = app.exec(EVALUATE, json!({"i": input})).await;
        let (got, message) = first_error(&resp);
        assert_eq!(got, code, "{input}: {resp:#}");
        assert!(message.contains(field), "{input}: {message}");
    }
}

#[test]
fn tailor_ope_evaluates_imported_jsonl_and_names_bad_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.jsonl");
    // A uniform logging policy over three actions; "y" always pays.
    let mut rng = StdRng::seed_from_u64(3);
    let mut lines = String::new();
    for _ in 0..300 {
        let action = ["x", "y", "z"][rng.random_range(0..3)];
        let reward = f64::from(u8::from(action == "y"));
        lines.push_str(
            &json!({"context": {"age": rng.random_range(18..80)}, "actions": ["x", "y", "z"],
                    "action": action, "propensity": 1.0 / 3.0, "reward": reward})
            .to_string(),
        );
        lines.push('\n');
    }
    std::fs::write(&path, &lines).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tailor"))
        .args(["ope", "--policy", "uniform", "--input"])
        .arg(&path)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .expect("tailor runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let evaluation: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(evaluation["rounds"], 300);
    let ips = estimate(&evaluation, "ips")["value"].as_f64().unwrap();
    let logged = evaluation["logged_value"].as_f64().unwrap();
    assert!(
        (ips - logged).abs() < 1e-9,
        "uniform on a uniform log: IPS = the mean"
    );

    // A learning policy finds "y": its replayed value is far above uniform's 1/3.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tailor"))
        .args(["ope", "--policy", "thompson_sampling", "--input"])
        .arg(&path)
        .output()
        .expect("tailor runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let thompson: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let snips = estimate(&thompson, "snips")["value"].as_f64().unwrap();
    assert!(snips > 0.8, "{thompson:#}");

    std::fs::write(&path, "{\"context\": {}, \"actions\": [\"a\"], \"action\": \"b\", \"propensity\": 1, \"reward\": 0}\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tailor"))
        .args(["ope", "--policy", "uniform", "--input"])
        .arg(&path)
        .output()
        .expect("tailor runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("line 1") && stderr.contains("action"),
        "{stderr}"
    );
}
