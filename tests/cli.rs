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
        .env("TAILOR_BACKENDS__EVENTS", "kafka://127.0.0.1:9092")
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
        case(1, true) + &case(2, false),
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
        case(1, true) + &case(2, true),
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
