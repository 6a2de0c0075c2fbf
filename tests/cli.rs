//! The command line: the committed SDL matches `tailor schema`; bad configuration is
//! refused with the key's name.

use std::process::Command;

fn tailor() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tailor"))
}

#[test]
fn committed_schema_matches_tailor_schema() {
    let out = tailor().arg("schema").output().expect("tailor runs");
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).unwrap();
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/schema/schema.graphql"
    ))
    .expect("schema/schema.graphql is committed");
    assert!(
        printed == committed,
        "schema/schema.graphql is stale: run `cargo run -- schema > schema/schema.graphql`"
    );
}

#[test]
fn unknown_config_keys_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tailor.toml");
    std::fs::write(
        &config,
        "listen = \"127.0.0.1:0\"\n[limits]\nmax_bodyy = 5\n",
    )
    .unwrap();
    let out = tailor()
        .args(["serve", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .expect("tailor runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unknown key 'limits.max_bodyy'"),
        "{stderr}"
    );

    let out = tailor()
        .args(["serve", "--data-dir"])
        .arg(dir.path().join("data"))
        // Refused by every build: unavailable without the `kafka` feature, an unknown
        // parameter with it.
        .env(
            "TAILOR_BACKENDS__EVENTS",
            "kafka://127.0.0.1:9092?colour=blue",
        )
        .env("TAILOR_LISTEN", "127.0.0.1:0")
        .output()
        .expect("tailor runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("backends.events"), "{stderr}");
}

fn rules_check(dir: &std::path::Path) -> std::process::Output {
    tailor()
        .args(["rules", "check"])
        .arg(dir)
        .output()
        .expect("tailor runs")
}

#[test]
fn rules_check_reports_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("good.rhai"),
        "const PRIORITY = 5;\nfn eligible(customer, item, ctx) { true }\n",
    )
    .unwrap();
    let out = rules_check(dir.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("good.rhai: ok: 'good' priority 5 hooks eligible"));

    std::fs::write(
        dir.path().join("bad.rhai"),
        "fn eligible(c, i, x) {\n  let y = ;\n}\n",
    )
    .unwrap();
    let out = rules_check(dir.path());
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad.rhai:2:11: "), "{stderr}");
}

#[test]
fn rules_test_runs_the_cases_beside_the_rules_and_reports_failures() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("cap.rhai"),
        "fn eligible(customer, item, ctx) { customer.impressions(item.id, \"1d\") < 2 }\n",
    )
    .unwrap();
    let case = |impressions: u32, eligible: bool| {
        format!(
            "[[case]]\nname = \"{impressions} shown\"\ncustomer = {{ impressions = {{ \"x\" = {impressions} }} }}\nitem = {{ id = \"x\" }}\nexpect = {{ eligible = {eligible} }}\n"
        )
    };
    std::fs::write(
        dir.path().join("cap.test.toml"),
        case(1, true) + case(2, false).as_str(),
    )
    .unwrap();
    let run = || {
        tailor()
            .args(["rules", "test"])
            .arg(dir.path())
            .output()
            .expect("tailor runs")
    };
    let out = run();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 rule test cases passed"));

    std::fs::write(
        dir.path().join("cap.test.toml"),
        case(1, true) + case(2, true).as_str(),
    )
    .unwrap();
    let out = run();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("FAIL 2 shown: eligible: expected true, got false"),
        "{stderr}"
    );
}

/// `tailor model ...` on a data directory: refusals name the problem, JSONL training
/// prints its report and activation checks the features.
#[test]
fn model_commands_train_from_jsonl_list_and_refuse_clearly() {
    use chrono::{Duration, Utc};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let run = |args: &[&str]| {
        let out = tailor()
            .args(["model"])
            .args(args)
            .arg("--data-dir")
            .arg(&data)
            .output()
            .expect("tailor runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stdout, _) = run(&["list"]);
    assert!(ok && stdout.contains("no model versions yet"), "{stdout}");
    let (ok, _, stderr) = run(&["train"]);
    assert!(
        !ok && stderr.contains("not enough training data"),
        "{stderr}"
    );
    let (ok, _, stderr) = run(&["activate", "v1"]);
    assert!(
        !ok && stderr.contains("unknown model version 'v1'"),
        "{stderr}"
    );
    let (ok, _, stderr) = run(&["rollback"]);
    assert!(
        !ok && stderr.contains("no earlier model version"),
        "{stderr}"
    );

    // Logged decisions from elsewhere, as JSONL; with only the built-in features.
    let customers: Vec<_> = (0..800)
        .map(|i| {
            let (i, f) = tailor::demo::simulated_customer(i, 5);
            let builtin: std::collections::BTreeMap<String, f64> = f
                .iter()
                .filter(|(k, _)| !k.starts_with("category_"))
                .map(|(k, v)| (k.clone(), *v))
                .collect();
            (i, std::sync::Arc::new(builtin))
        })
        .collect();
    let now = Utc::now();
    let history = tailor::demo::simulate_history(
        &customers,
        1,
        now - Duration::days(5),
        now - Duration::days(2),
        3,
    )
    .unwrap();
    let lines: Vec<String> = history
        .iter()
        .map(|(d, outcomes)| {
            serde_json::json!({
                "id": d.id, "timestamp": d.created_at, "placement": d.placement,
                "context": d.context, "features": d.features, "propensity": d.propensity,
                "shown": d.items.iter().map(|s| &s.item).collect::<Vec<_>>(),
                "outcomes": outcomes.iter().map(|o| serde_json::json!({
                    "item_id": o.item_id, "reward": o.reward, "timestamp": o.created_at
                })).collect::<Vec<_>>(),
            })
            .to_string()
        })
        .collect();
    let file = dir.path().join("logged.jsonl");
    std::fs::write(&file, lines.join("\n")).unwrap();
    let file = file.to_str().unwrap();
    let (ok, stdout, stderr) = run(&[
        "train",
        "--from-jsonl",
        file,
        "--seed",
        "1",
        "--epochs",
        "3",
        "--activate",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("trained v1"), "{stdout}");
    assert!(
        stdout.contains("validation (") && stdout.contains("AUC"),
        "{stdout}"
    );
    assert!(stdout.contains("activated v1"), "{stdout}");
    let (ok, stdout, _) = run(&["list"]);
    assert!(ok && stdout.starts_with("v1     active"), "{stdout}");

    std::fs::write(dir.path().join("bad.jsonl"), "{\"id\": 1}\n").unwrap();
    let bad = dir.path().join("bad.jsonl");
    let (ok, _, stderr) = run(&["train", "--from-jsonl", bad.to_str().unwrap()]);
    assert!(
        !ok && stderr.contains("line 1.id: invalid type"),
        "{stderr}"
    );

    // A running server holds the store: the command says what to do instead.
    let _held = tailor::storage::embedded::EmbeddedStore::open(&data).unwrap();
    let (ok, _, stderr) = run(&["list"]);
    assert!(
        !ok && stderr.contains("in use by a running server"),
        "{stderr}"
    );
}

#[test]
fn simulate_prints_the_report_and_exports_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    let export = dir.path().join("stream.jsonl");
    let out = tailor()
        .args([
            "simulate", "--policy", "lin_ucb", "--rounds", "40", "--seed", "3",
        ])
        .arg("--export")
        .arg(&export)
        .output()
        .expect("tailor runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let mut keys: Vec<&str> = report
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    expect_test::expect![[r#"
        [
            "click_rate",
            "cumulative_reward",
            "decisions_per_second",
            "expected_click_rate",
            "expected_cumulative_reward",
            "model",
            "oracle_expected_cumulative_reward",
            "policy",
            "regret",
            "rounds",
            "seed",
        ]
    "#]]
    .assert_debug_eq(&keys);
    assert_eq!(report["policy"], "lin_ucb");
    assert_eq!(report["rounds"], 40);
    assert_eq!(report["model"], serde_json::Value::Null);
    assert!(report["regret"].as_f64().unwrap() >= 0.0);

    let stream = std::fs::read_to_string(&export).unwrap();
    let lines: Vec<serde_json::Value> = stream
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 40);
    let first = &lines[0];
    assert_eq!(first["round"], 0);
    for key in ["placement", "device", "at", "features", "click_draw"] {
        assert!(!first[key].is_null(), "{key} in {first}");
    }
    let candidate = &first["candidates"][0];
    assert!(candidate["id"].is_string() && candidate["tags"].is_array());
    assert!(candidate["click_probability"].is_number());
}

#[test]
fn simulate_refuses_bad_flags_by_name() {
    let out = tailor()
        .args(["simulate", "--policy", "greedy"])
        .output()
        .expect("tailor runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--policy") && stderr.contains("unknown policy; one of: thompson_sampling"),
        "{stderr}"
    );
    let out = tailor()
        .args(["simulate", "--policy", "uniform", "--rounds", "0"])
        .output()
        .expect("tailor runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--rounds") && stderr.contains("must be at least 1"),
        "{stderr}"
    );
}

/// `tailor keys create|list|revoke` on a data directory: the key is printed once, works
/// against the engine, is listed without its secret, and stops working once revoked.
#[test]
fn keys_commands_create_list_and_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let run = |args: &[&str]| {
        let out = tailor()
            .arg("keys")
            .args(args)
            .arg("--data-dir")
            .arg(&data)
            .output()
            .expect("tailor runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stdout, stderr) = run(&["create", "--role", "marketer", "--name", "campaigns"]);
    assert!(ok, "{stderr}");
    let key = stdout.trim().to_owned();
    assert!(
        key.starts_with("tk_") && key.len() == 3 + 16 + 1 + 64,
        "{stdout}"
    );
    let id = &key[3..19];
    assert!(
        stderr.contains(id) && stderr.contains("only this once"),
        "{stderr}"
    );
    let (ok, second, _) = run(&["create", "--role", "frontend"]);
    assert!(ok && second.trim() != key);

    let (ok, stdout, _) = run(&["list"]);
    assert!(ok, "{stdout}");
    let line = stdout.lines().find(|l| l.starts_with(id)).expect("listed");
    assert!(
        line.contains("marketer") && line.ends_with("campaigns") && line.contains(" - "),
        "{line}"
    );
    assert_eq!(stdout.lines().count(), 3, "a header and two keys: {stdout}");
    assert!(
        !stdout.contains(&key[20..]),
        "no secret is listed: {stdout}"
    );

    // The key verifies against the same store.
    let verify = |key: &str| {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let store = tailor::storage::embedded::EmbeddedStore::open(&data).unwrap();
            let keys = tailor::auth::KeyService::new(store.stores().keys);
            keys.verify(key).await.unwrap()
        })
    };
    assert_eq!(verify(&key).unwrap().role, tailor::auth::Role::Marketer);

    let (ok, stdout, stderr) = run(&["revoke", id]);
    assert!(
        ok && stdout.starts_with(&format!("revoked API key {id}")),
        "{stderr}"
    );
    assert_eq!(verify(&key), Err("revoked API key"));
    let (_, stdout, _) = run(&["list"]);
    let line = stdout.lines().find(|l| l.starts_with(id)).unwrap();
    assert!(
        !line.contains(" - "),
        "the revocation time is listed: {line}"
    );

    // Bad input names its argument.
    let (ok, _, stderr) = run(&["create", "--role", "root"]);
    assert!(
        !ok && stderr.contains("--role") && stderr.contains("unknown role 'root'"),
        "{stderr}"
    );
    let (ok, _, stderr) = run(&["create", "--role", "admin", "--name", &"x".repeat(65)]);
    assert!(
        !ok && stderr.contains("--name: must be 1 to 64"),
        "{stderr}"
    );
    let (ok, _, stderr) = run(&["revoke", "nope"]);
    assert!(
        !ok && stderr.contains("ID: unknown API key 'nope'"),
        "{stderr}"
    );

    let _held = tailor::storage::embedded::EmbeddedStore::open(&data).unwrap();
    let (ok, _, stderr) = run(&["list"]);
    assert!(!ok && stderr.contains("createApiKey"), "{stderr}");
}

#[test]
fn keys_rotate_master_rewraps_so_the_old_key_can_go() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let settings = |key_id: &str| tailor::config::Settings {
        data_dir: data.clone(),
        encryption: tailor::config::EncryptionSettings {
            key_id: key_id.into(),
            key_env: String::new(),
            ..Default::default()
        },
        ..Default::default()
    };
    let id = tailor::customers::CustomerId::parse("id", "c1").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let email = |key_id: &str| {
        rt.block_on(async {
            let engine = tailor::app::Engine::open(settings(key_id)).await?;
            let customer = engine.customer(&id).await?;
            anyhow::Ok(customer.and_then(|c| c.pii.email))
        })
    };
    rt.block_on(async {
        let engine = tailor::app::Engine::open(settings("k1")).await.unwrap();
        let update = tailor::customers::CustomerUpdate {
            id: id.clone(),
            traits: Default::default(),
            pii: tailor::customers::Pii {
                email: Some("ada@example.com".into()),
                ..Default::default()
            },
            consent: Default::default(),
        };
        engine.upsert_customer(update).await.unwrap();
    });

    let rotate = |key_id: &str| {
        let out = tailor()
            .args(["keys", "rotate-master", "--data-dir"])
            .arg(&data)
            .env("TAILOR_ENCRYPTION__KEY_ID", key_id)
            .env("TAILOR_ENCRYPTION__KEY_ENV", "")
            .output()
            .expect("tailor runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // A new generated key k2; k1's file stays, so everything still reads.
    let (ok, stdout, stderr) = rotate("k2");
    assert!(ok, "{stderr}");
    assert_eq!(
        stdout,
        "re-wrapped 2 data keys under master key 'k2' (0 were already under it)\n\
         no data key needs master keys 'k1' any more\n",
        "the customer's key and the blind-index key"
    );
    assert!(
        stderr.contains("Generated a master key") && stderr.contains("k2.key"),
        "{stderr}"
    );
    let (ok, stdout, _) = rotate("k2");
    assert!(
        ok && stdout.starts_with("re-wrapped 0 data keys"),
        "{stdout}"
    );

    // Without k1 the data still reads under k2, unchanged.
    std::fs::remove_file(data.join("master-keys").join("k1.key")).unwrap();
    assert_eq!(email("k2").unwrap().as_deref(), Some("ada@example.com"));
}
