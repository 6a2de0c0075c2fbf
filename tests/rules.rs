//! Rules inside decisions and their lifecycle, through GraphQL against an embedded
//! engine: filters, weights, pins, frequency caps, explanations, failure isolation, the
//! sandbox, versions and rollback, hot reload of the rules directory, `on_event`.

mod common;

use std::time::Duration;

use common::{first_error, TestApp};
use serde_json::{json, Value};

const PUT: &str = "mutation($s: String!, $n: String) { putRule(source: $s, name: $n) { name version priority placements enabled hooks origin } }";
const DECIDE: &str = "query($c: ID!, $p: String, $x: JSON) { personalize(input: {customerId: $c, placement: $p, context: $x, explain: true}) { id selectedItem { id } items { item { id } score } propensity policy reasoning rules explanation } }";

async fn put(app: &TestApp, source: &str) -> Value {
    app.gql(PUT, json!({"s": source})).await["putRule"].clone()
}

async fn decide(app: &TestApp, customer: &str) -> Value {
    app.gql(DECIDE, json!({"c": customer, "p": "hero"})).await["personalize"].clone()
}

/// Three hero items: a (priority 3), b (2), c (1).
async fn catalog(app: &TestApp) {
    for (id, priority) in [("a", 3), ("b", 2), ("c", 1)] {
        app.upsert_content(id, "hero", priority, &[]).await;
    }
}

fn candidate<'a>(decision: &'a Value, id: &str) -> &'a Value {
    decision["explanation"]["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("{id} is a candidate: {decision:#}"))
}

#[tokio::test]
async fn rules_filter_reweight_and_pin_in_priority_order_and_explain_it() {
    let app = TestApp::new().await;
    catalog(&app).await;
    put(
        &app,
        r#"const NAME = "no_c"; const PRIORITY = 100;
           fn eligible(customer, item, ctx) { item.id != "c" }"#,
    )
    .await;
    put(
        &app,
        r#"const NAME = "boost_b"; const PRIORITY = 50;
           fn score(customer, item, ctx, score) { if item.id == "b" { score * 2.5 } else { score } }"#,
    )
    .await;
    let d = decide(&app, "c1").await;
    assert_eq!(
        d["explanation"]["filtered"],
        json!([{"id": "c", "reason": "rule", "rule": "no_c"}])
    );
    assert_eq!(
        candidate(&d, "b")["rules"],
        json!([{"effect": "weighted", "rule": "boost_b", "from": 1.0, "to": 2.5}])
    );
    assert_eq!(candidate(&d, "b")["weight"], 2.5);
    assert_eq!(candidate(&d, "a")["rules"], json!([]));
    let rules: Vec<&str> = d["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert_eq!(
        rules,
        ["no_c", "boost_b"],
        "fired rules, in the order they ran"
    );
    assert_eq!(d["explanation"]["rules"][0]["name"], "no_c");
    assert!(d["reasoning"]
        .as_str()
        .unwrap()
        .contains("rules applied: no_c, boost_b"));

    // A pin is final: the pinned item leads with certainty.
    put(
        &app,
        r#"const NAME = "pin_c_a"; const PRIORITY = 10;
           fn score(customer, item, ctx, score) { if item.id == "a" { pin() } else { score } }"#,
    )
    .await;
    for customer in ["c1", "c2", "c3"] {
        let d = decide(&app, customer).await;
        assert_eq!(d["selectedItem"]["id"], "a", "{d:#}");
        assert_eq!(d["propensity"], 1.0);
        assert_eq!(candidate(&d, "a")["weight"], "pin");
        assert!(d["reasoning"]
            .as_str()
            .unwrap()
            .starts_with("'a' pinned by rule 'pin_c_a'"));
    }
}

#[tokio::test]
async fn a_rule_only_runs_for_its_placements_and_when_enabled() {
    let app = TestApp::new().await;
    catalog(&app).await;
    put(
        &app,
        r#"const NAME = "elsewhere"; const PLACEMENTS = ["sidebar"];
           fn eligible(customer, item, ctx) { false }"#,
    )
    .await;
    put(
        &app,
        r#"const NAME = "off"; const ENABLED = false;
           fn eligible(customer, item, ctx) { false }"#,
    )
    .await;
    let d = decide(&app, "c1").await;
    assert_eq!(d["rules"], json!([]));
    assert_eq!(d["explanation"]["filtered"], json!([]));
}

#[tokio::test]
async fn a_frequency_cap_is_a_three_line_rule_counting_impressions() {
    let app = TestApp::new().await;
    app.upsert_content("only", "hero", 1, &[]).await;
    app.upsert_content("fallback", "hero", 0, &[]).await;
    put(
        &app,
        r#"const NAME = "cap";
           fn eligible(customer, item, ctx) { item.id != "only" || customer.impressions(item.id, "1d") < 2 }"#,
    )
    .await;
    // Pin "only" so that it is shown while it may be.
    put(
        &app,
        r#"const NAME = "pin_only"; const PRIORITY = -1;
           fn score(customer, item, ctx, score) { if item.id == "only" { pin() } else { score } }"#,
    )
    .await;
    for _ in 0..2 {
        assert_eq!(decide(&app, "c1").await["selectedItem"]["id"], "only");
    }
    let d = decide(&app, "c1").await;
    assert_eq!(d["selectedItem"]["id"], "fallback", "{d:#}");
    assert_eq!(
        d["explanation"]["filtered"],
        json!([{"id": "only", "reason": "rule", "rule": "cap"}])
    );
    // Another customer has seen nothing.
    assert_eq!(decide(&app, "c2").await["selectedItem"]["id"], "only");
}

#[tokio::test]
async fn an_items_own_frequency_cap_is_enforced() {
    let app = TestApp::new().await;
    app.gql(
        "mutation { upsertContent(input: {id: \"capped\", type: \"banner\", placements: [\"hero\"], priority: 5, frequencyCap: 1}) { id } }",
        json!({}),
    )
    .await;
    app.upsert_content("other", "hero", 0, &[]).await;
    app.gql(
        "mutation { upsertCustomer(input: {id: \"c1\", consent: {personalization: false}}) { id } }",
        json!({}),
    )
    .await;
    // Without consent, priority decides: the capped item first, once.
    assert_eq!(decide(&app, "c1").await["selectedItem"]["id"], "capped");
    let d = decide(&app, "c1").await;
    assert_eq!(d["selectedItem"]["id"], "other");
    assert_eq!(
        d["explanation"]["filtered"][0],
        json!({"id": "capped", "reason": "rule", "rule": "frequency_cap(item)"})
    );
}

#[tokio::test]
async fn a_failing_rule_is_skipped_counted_and_explained_and_the_decision_succeeds() {
    let app = TestApp::new().await;
    catalog(&app).await;
    put(
        &app,
        r#"const NAME = "broken";
           fn eligible(customer, item, ctx) { if item.id == "b" { throw "no stock data" } false }"#,
    )
    .await;
    let d = decide(&app, "c1").await;
    // Skipped for the whole decision: its `false` for "a" did not apply either.
    assert_eq!(d["explanation"]["filtered"], json!([]));
    let errors = &d["explanation"]["rule_errors"];
    assert_eq!(errors[0]["rule"], "broken");
    assert!(
        errors[0]["error"]
            .as_str()
            .unwrap()
            .contains("no stock data"),
        "{errors}"
    );
    assert!(d["reasoning"]
        .as_str()
        .unwrap()
        .contains("rule 'broken' skipped"));
    let metrics = app.engine.metrics.render();
    assert!(
        metrics.contains("tailor_rule_errors_total{rule=\"broken\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_sandbox_stops_every_runaway_script_and_the_server_stays_healthy() {
    let app = TestApp::new().await;
    catalog(&app).await;
    let runaway = [
        ("endless_loop", "loop { }", &["budget"][..]),
        ("recursion", "deep(0)", &["Stack overflow"]),
        (
            "string_doubling",
            r#"let s = "xx"; loop { s += s; }"#,
            &["Length of string"],
        ),
        // Stopped by the size limit, or by the clock first on a slow (debug) build.
        (
            "growing_array",
            "let a = []; loop { a.push(1); }",
            &["Size of array", "time budget"],
        ),
        // The map: by its size limit, the operation budget (a release build gets there
        // first) or the clock (a debug build), whichever comes first.
        (
            "growing_map",
            "let m = #{}; let i = 0; loop { m[`k${i}`] = i; i += 1; }",
            &["Size of object map", "budget"],
        ),
        ("sleep", "sleep(10); true", &["Function not found: sleep"]),
        // Found by the fuzz target: a window whose unit is a multi-byte character.
        (
            "multibyte_window",
            r#"customer.impressions(item.id, "Л") < 3"#,
            &["is not a window"],
        ),
    ];
    for (name, body, expected) in runaway {
        let source = format!(
            "const NAME = \"{name}\";\nfn deep(n) {{ deep(n + 1) }}\nfn eligible(customer, item, ctx) {{ {body} }}\n"
        );
        put(&app, &source).await;
        let d = decide(&app, "c1").await;
        let errors = &d["explanation"]["rule_errors"];
        let failure = errors
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["rule"] == name)
            .unwrap_or_else(|| panic!("{name} fails: {errors:#}"));
        let error = failure["error"].as_str().unwrap();
        assert!(
            expected.iter().any(|e| error.contains(e)),
            "{name}: {failure}"
        );
        app.gql(
            "mutation($n: String!) { deleteRule(name: $n) }",
            json!({"n": name}),
        )
        .await;
    }
    // eval and imports of paths never compile.
    for (source, expected) in [
        ("fn eligible(c, i, x) { eval(\"true\") }", "eval"),
        (
            "import \"../../etc/passwd\" as p;\nfn eligible(c, i, x) { true }",
            "Module not found",
        ),
    ] {
        let resp = app.exec(PUT, json!({"s": source, "n": "bad"})).await;
        let (code, message) = first_error(&resp);
        assert_eq!(code, "BAD_USER_INPUT");
        assert!(message.contains(expected), "{message}");
    }
    let d = decide(&app, "c1").await;
    assert_eq!(d["explanation"]["rule_errors"], json!([]));
}

#[tokio::test]
async fn rule_versions_compile_errors_and_rollback() {
    let app = TestApp::new().await;
    catalog(&app).await;
    let v1 = put(
        &app,
        "const NAME = \"gate\";\nfn eligible(c, item, x) { item.id != \"a\" }",
    )
    .await;
    assert_eq!(v1["version"], 1);
    assert_eq!(v1["hooks"], json!(["eligible"]));
    assert_eq!(v1["origin"], "api");

    // A script that does not compile: refused with line and column; v1 stays active.
    let resp = app
        .exec(
            PUT,
            json!({"s": "const NAME = \"gate\";\nfn eligible(c, item, x) {\n  let = 1;\n}"}),
        )
        .await;
    let error = &resp["errors"][0];
    assert_eq!(error["extensions"]["code"], "BAD_USER_INPUT");
    assert_eq!(error["extensions"]["field"], "source");
    assert_eq!(error["extensions"]["line"], 3);
    assert!(error["extensions"]["column"].as_u64().unwrap() > 0);
    let rules = app
        .gql("{ rules { name version versions { version } } }", json!({}))
        .await;
    assert_eq!(
        rules["rules"],
        json!([{"name": "gate", "version": 1, "versions": [{"version": 1}]}])
    );

    let v2 = put(
        &app,
        "const NAME = \"gate\";\nfn eligible(c, item, x) { item.id != \"b\" }",
    )
    .await;
    assert_eq!(v2["version"], 2);
    let d = decide(&app, "c1").await;
    assert_eq!(d["explanation"]["filtered"][0]["id"], "b");

    let back = app
        .gql(
            "mutation { activateRuleVersion(name: \"gate\", version: 1) { version source } }",
            json!({}),
        )
        .await;
    assert_eq!(back["activateRuleVersion"]["version"], 1);
    let d = decide(&app, "c1").await;
    assert_eq!(d["explanation"]["filtered"][0]["id"], "a");

    let resp = app
        .exec(
            "mutation { activateRuleVersion(name: \"gate\", version: 9) { version } }",
            json!({}),
        )
        .await;
    assert_eq!(first_error(&resp).0, "NOT_FOUND");
    // A name that disagrees with the script's NAME is refused by field.
    let resp = app
        .exec(
            PUT,
            json!({"s": "const NAME = \"x\";\nfn eligible(c, i, x) { true }", "n": "y"}),
        )
        .await;
    assert_eq!(resp["errors"][0]["extensions"]["field"], "name");

    let deleted = app
        .gql("mutation { deleteRule(name: \"gate\") }", json!({}))
        .await;
    assert_eq!(deleted["deleteRule"], true);
    assert_eq!(
        app.gql("{ rules { name } }", json!({})).await["rules"],
        json!([])
    );
    assert_eq!(
        decide(&app, "c1").await["explanation"]["filtered"],
        json!([])
    );
}

async fn wait_for(app: &TestApp, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..100 {
        let rules = app
            .gql("{ rules { name version source origin } }", json!({}))
            .await["rules"]
            .clone();
        if check(&rules) {
            return rules;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn the_rules_directory_is_hot_reloaded_and_a_broken_file_keeps_the_previous_version() {
    let rules = tempfile::tempdir().unwrap();
    let plugins = tempfile::tempdir().unwrap();
    std::fs::write(
        plugins.path().join("helpers.rhai"),
        "fn not_a(item) { item.id != \"a\" }",
    )
    .unwrap();
    let file = rules.path().join("gate.rhai");
    std::fs::write(
        &file,
        "import \"helpers\" as h;\nfn eligible(c, item, x) { h::not_a(item) }",
    )
    .unwrap();
    let (dir, plugins_dir) = (
        rules.path().display().to_string(),
        plugins.path().display().to_string(),
    );
    let app = TestApp::with(move |s| {
        s.rules.dir = dir;
        s.rules.plugins_dir = plugins_dir;
        s.rules.reload_interval_secs = 1;
    })
    .await;
    catalog(&app).await;
    let loaded = wait_for(&app, "the file's rule", |r| r[0]["name"] == "gate").await;
    assert_eq!(loaded[0]["origin"], "file:gate.rhai");
    assert_eq!(
        decide(&app, "c1").await["explanation"]["filtered"][0]["id"],
        "a"
    );

    std::fs::write(&file, "fn eligible(c, item, x) { item.id != \"b\" }").unwrap();
    wait_for(&app, "version 2", |r| r[0]["version"] == 2).await;
    assert_eq!(
        decide(&app, "c1").await["explanation"]["filtered"][0]["id"],
        "b"
    );

    // A broken edit is refused; version 2 stays active.
    std::fs::write(&file, "fn eligible(c, item, x) { item.id != }").unwrap();
    std::fs::write(
        rules.path().join("other.rhai"),
        "fn score(c, i, x, s) { s }",
    )
    .unwrap();
    let now = wait_for(&app, "the next file", |r| r.as_array().unwrap().len() == 2).await;
    let gate = now
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "gate")
        .unwrap();
    assert_eq!(gate["version"], 2);
    assert!(app
        .engine
        .metrics
        .render()
        .contains("tailor_rule_errors_total{rule=\"gate\"}"));

    std::fs::remove_file(&file).unwrap();
    wait_for(&app, "the rule of the removed file to go", |r| {
        r.as_array().unwrap().iter().all(|r| r["name"] != "gate")
    })
    .await;
}

#[tokio::test]
async fn on_event_sets_traits_that_later_decisions_see() {
    let app = TestApp::new().await;
    catalog(&app).await;
    put(
        &app,
        r#"const NAME = "bought";
           fn on_event(customer, event) {
               if event.type != "purchase" { return; }
               let list = customer.traits.purchased ?? [];
               if list.contains(event.properties.item_id) { return; }
               list.push(event.properties.item_id);
               #{ purchased: list }
           }
           fn eligible(customer, item, ctx) {
               !(customer.traits.purchased ?? []).contains(item.id)
           }"#,
    )
    .await;
    app.track(json!([
        {"eventId": "p1", "customerId": "c1", "type": "purchase", "properties": {"item_id": "a"}},
        {"eventId": "p2", "customerId": "c1", "type": "purchase", "properties": {"item_id": "b"}},
        {"eventId": "v1", "customerId": "c1", "type": "page_view"},
    ]))
    .await;
    let customer = app
        .gql("{ customer(id: \"c1\") { traits } }", json!({}))
        .await;
    assert_eq!(
        customer["customer"]["traits"]["purchased"],
        json!(["a", "b"])
    );
    let d = decide(&app, "c1").await;
    assert_eq!(d["selectedItem"]["id"], "c");
    assert_eq!(d["explanation"]["filtered"].as_array().unwrap().len(), 2);
}

/// The processor shows hooks the traits alone (PII stays sealed), yet a trait change it
/// stores keeps the PII, a sensitive trait stays readable, and the segments that read
/// the changed trait follow in the same batch (also one that reads a feature the batch
/// did not load).
#[tokio::test]
async fn on_event_trait_changes_keep_pii_and_sensitive_traits_and_move_segments() {
    let app = TestApp::with(|s| s.encryption.sensitive_traits = vec!["birthday".into()]).await;
    app.gql(
        "mutation($i: CustomerInput!) { upsertCustomer(input: $i) { id } }",
        json!({"i": {"id": "c1", "email": "ada@example.com", "name": "Ada",
                     "traits": {"birthday": "1990-01-01", "tier": "silver"}}}),
    )
    .await;
    app.gql(
        "mutation($c: JSON!) { defineSegment(name: \"gold\", condition: $c) { joined } }",
        json!({"c": {"trait": "tier", "op": "eq", "value": "gold"}}),
    )
    .await;
    // A segment over the changed trait and a feature that the batch's event types do not
    // touch: its state is not among those the batch loaded, so it is read from the store.
    app.gql(
        "mutation($c: JSON!) { defineSegment(name: \"gold_readers\", condition: $c) { joined } }",
        json!({"c": {"all": [
            {"trait": "tier", "op": "eq", "value": "gold"},
            {"feature": "email_opens_30d", "op": "gte", "value": 1}
        ]}}),
    )
    .await;
    app.track(json!([{"eventId": "o1", "customerId": "c1", "type": "email_open"}]))
        .await;
    put(
        &app,
        r#"const NAME = "upgrade";
           fn on_event(customer, event) {
               if event.type != "purchase" { return; }
               // A sensitive trait is opened for hooks.
               if customer.traits.birthday != "1990-01-01" { return; }
               #{ tier: "gold" }
           }"#,
    )
    .await;
    app.track(json!([
        {"eventId": "v1", "customerId": "c1", "type": "page_view"},
        {"eventId": "p1", "customerId": "c1", "type": "purchase"},
    ]))
    .await;
    let data = app
        .gql(
            r#"{ customer(id: "c1") { traits segments }
                 customerIdsByEmail(email: "ada@example.com")
                 exportCustomer(id: "c1") }"#,
            json!({}),
        )
        .await;
    assert_eq!(
        data["customer"]["traits"],
        json!({"birthday": "1990-01-01", "tier": "gold"})
    );
    assert_eq!(
        data["customer"]["segments"],
        json!(["gold", "gold_readers"])
    );
    assert_eq!(data["customerIdsByEmail"], json!(["c1"]));
    let export = data["exportCustomer"].to_string();
    assert!(export.contains("ada@example.com"), "{export}");
    assert!(export.contains("\"Ada\""), "{export}");
}
