//! Field-level encryption, erasure and access, through the schema executed in-process
//! and the raw bytes of the data files.

mod common;

use common::{first_error, TestApp};
use serde_json::{json, Value};

/// Canaries that must never be in any data file in the clear.
const EMAIL: &str = "Canary.Email-7f3a@example.com";
const PHONE: &str = "+00-canary-phone-5521";
const NAME: &str = "Canaryname Zqxjv";
const BIRTHDAY: &str = "canary-birthday-1901";

async fn app() -> TestApp {
    TestApp::with(|s| s.encryption.sensitive_traits = vec!["birthday".into()]).await
}

async fn upsert(app: &TestApp, id: &str, extra: Value) -> Value {
    let mut input = json!({
        "id": id,
        "email": EMAIL,
        "phone": PHONE,
        "name": NAME,
        "traits": {"plan": "pro", "birthday": BIRTHDAY},
    });
    if let (Some(input), Value::Object(extra)) = (input.as_object_mut(), extra) {
        input.extend(extra);
    }
    app.exec(
        "mutation($i: CustomerInput!) { upsertCustomer(input: $i) { id traits } }",
        json!({"i": input}),
    )
    .await
}

async fn export(app: &TestApp, id: &str) -> Value {
    app.gql(
        "query($id: ID!) { exportCustomer(id: $id) }",
        json!({"id": id}),
    )
    .await["exportCustomer"]
        .clone()
}

/// Every regular file under `dir`, read whole.
fn files_under(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push((path.clone(), std::fs::read(&path).expect("read")));
            }
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    let needle = needle.as_bytes();
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// No file of the data directory holds any PII canary, in any case.
fn assert_no_pii_in_files(app: &TestApp, when: &str) {
    let files = files_under(app.dir.path());
    assert!(
        files
            .iter()
            .any(|(p, _)| p.ends_with(tailor::storage::embedded::FILE_NAME)),
        "the data file is there"
    );
    for (path, bytes) in &files {
        for canary in [EMAIL, &EMAIL.to_lowercase(), PHONE, NAME, BIRTHDAY] {
            assert!(
                !contains(bytes, canary),
                "{when}: {canary} in clear text in {}",
                path.display()
            );
        }
    }
}

#[tokio::test]
async fn pii_and_sensitive_traits_are_encrypted_at_rest_and_read_back() {
    let app = app().await;
    let resp = upsert(&app, "c1", json!({})).await;
    assert!(resp["errors"].is_null(), "{resp:#}");
    assert_eq!(
        resp["data"]["upsertCustomer"]["traits"],
        json!({"plan": "pro", "birthday": BIRTHDAY}),
        "the engine sees sensitive traits in the clear"
    );
    assert_no_pii_in_files(&app, "after the upsert");

    let exported = export(&app, "c1").await;
    let profile = &exported["profile"];
    assert_eq!(profile["email"], EMAIL);
    assert_eq!(profile["phone"], PHONE);
    assert_eq!(profile["name"], NAME);
    assert_eq!(profile["traits"]["birthday"], BIRTHDAY);

    // The blind index finds the customer by email, whatever its case; never by a part.
    let found = app
        .gql(
            "query($e: String!) { customerIdsByEmail(email: $e) }",
            json!({"e": format!("  {}  ", EMAIL.to_uppercase())}),
        )
        .await;
    assert_eq!(found["customerIdsByEmail"], json!(["c1"]));
    let none = app
        .gql(
            "query($e: String!) { customerIdsByEmail(email: $e) }",
            json!({"e": "example.com"}),
        )
        .await;
    assert_eq!(none["customerIdsByEmail"], json!([]));
    let resp = app
        .exec("{ customerIdsByEmail(email: \" \") }", json!({}))
        .await;
    let (code, message) = first_error(&resp);
    assert_eq!(
        (code.as_str(), message.as_str()),
        ("BAD_USER_INPUT", "email: must not be empty")
    );

    // The generated master key is owner-only, and it is not in the data file either.
    let key_file = app.dir.path().join("master-keys").join("k1.key");
    let key = std::fs::read_to_string(&key_file).expect("generated key file");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let data = std::fs::read(app.dir.path().join(tailor::storage::embedded::FILE_NAME)).unwrap();
    assert!(!contains(&data, key.trim()));
}

#[tokio::test]
async fn rotation_over_graphql_keeps_data_readable() {
    let app = app().await;
    upsert(&app, "c1", json!({})).await;
    let rotated = app
        .gql(
            "mutation { rotateMasterKey { masterKeyId rewrapped alreadyCurrent } }",
            json!({}),
        )
        .await;
    // Everything is already under the only key: the customer's and the blind index's.
    assert_eq!(
        rotated["rotateMasterKey"],
        json!({"masterKeyId": "k1", "rewrapped": 0, "alreadyCurrent": 2})
    );
    assert_eq!(export(&app, "c1").await["profile"]["email"], EMAIL);
}

#[tokio::test]
async fn erasure_leaves_nothing_readable_and_suppresses_the_id_until_consent() {
    let app = app().await;
    upsert(&app, "c1", json!({})).await;
    upsert(&app, "c2", json!({"email": "other@example.com"})).await;
    app.gql(
        "mutation { defineSegment(name: \"pro\", condition: {trait: \"plan\", op: \"exists\"}) { joined } }",
        json!({}),
    )
    .await;
    let tracked = app
        .track(json!([
            {"eventId": "e1", "customerId": "c1", "type": "page_view", "properties": {"path": "/canary-path"}},
            {"eventId": "e2", "customerId": "c2", "type": "page_view"},
        ]))
        .await;
    assert_eq!(tracked["accepted"], 2, "{tracked:#}");
    app.upsert_content("hero", "home", 1, &[]).await;
    let decision = app
        .gql(
            "{ personalize(input: {customerId: \"c1\", placement: \"home\"}) { id } }",
            json!({}),
        )
        .await["personalize"]["id"]
        .as_str()
        .expect("decision id")
        .to_owned();
    app.gql(
        "mutation($d: ID!) { recordOutcome(decisionId: $d, reward: 1) { reward } }",
        json!({"d": decision}),
    )
    .await;

    // Right of access: everything, before the erasure.
    let before = export(&app, "c1").await;
    assert_eq!(before["customerId"], "c1");
    assert_eq!(before["events"][0]["properties"]["path"], "/canary-path");
    assert_eq!(before["segments"], json!(["pro"]));
    assert_eq!(before["decisions"][0]["decision"]["id"], decision);
    assert_eq!(before["decisions"][0]["outcomes"][0]["reward"], 1.0);
    assert!(
        before["features"].as_array().is_some_and(|f| f
            .iter()
            .any(|v| v["name"] == "page_views_30d" && v["value"] == 1.0)),
        "{:#}",
        before["features"]
    );
    assert!(before["erasedAt"].is_null());
    // The event's properties are not PII fields: in the clear in the data file.
    assert!(contains(
        &std::fs::read(app.dir.path().join(tailor::storage::embedded::FILE_NAME)).unwrap(),
        "/canary-path"
    ));
    // A backup of the data, taken now.
    let backup = tempfile::tempdir().unwrap();
    let data_file = app.dir.path().join(tailor::storage::embedded::FILE_NAME);
    std::fs::copy(
        &data_file,
        backup.path().join(tailor::storage::embedded::FILE_NAME),
    )
    .unwrap();

    let erased = app
        .gql(
            "mutation { eraseCustomer(id: \"c1\") { customerId profile events segments decisions pseudonym } }",
            json!({}),
        )
        .await["eraseCustomer"]
        .clone();
    assert_eq!(erased["customerId"], "c1");
    assert_eq!(erased["profile"], true);
    assert_eq!(erased["events"], 1);
    assert_eq!(erased["segments"], json!(["pro"]));
    assert_eq!(erased["decisions"], 1);
    let pseudonym = erased["pseudonym"].as_str().expect("pseudonym").to_owned();
    assert!(pseudonym.starts_with("erased-"), "{pseudonym}");

    // Nothing about c1 is readable through the API.
    let after = export(&app, "c1").await;
    assert!(after["profile"].is_null(), "{after:#}");
    assert_eq!(after["events"], json!([]));
    assert_eq!(after["segments"], json!([]));
    assert_eq!(after["decisions"], json!([]));
    assert_eq!(
        after["features"],
        export(&app, "never-seen").await["features"],
        "feature values are the defaults, as for a customer never seen"
    );
    assert!(after["erasedAt"].is_string());
    let data = app
        .gql(
            "query($d: ID!) { customer(id: \"c1\") { id } decision(id: $d) { customerId } customerIdsByEmail(email: \"Canary.Email-7f3a@example.com\") }",
            json!({"d": decision}),
        )
        .await;
    assert!(data["customer"].is_null());
    assert_eq!(
        data["decision"]["customerId"], pseudonym,
        "pseudonymised, kept"
    );
    assert_eq!(data["customerIdsByEmail"], json!([]));
    // The other customer is untouched.
    assert_eq!(
        export(&app, "c2").await["profile"]["email"],
        "other@example.com"
    );

    // The encrypted PII was never in the clear in any file, and is not now.
    assert_no_pii_in_files(&app, "after the erasure");
    // The erased event's bytes are gone from the file too. redb does not zero a freed
    // page, but the erasure's own commits rewrite the pages that held them; what is
    // guaranteed whatever the page reuse is the PII check above (sealed, never clear).
    for (path, bytes) in files_under(app.dir.path()) {
        assert!(
            !contains(&bytes, "/canary-path"),
            "erased event data in {}",
            path.display()
        );
    }

    // The backup's sealed copy of c1 no longer opens: its data key is gone.
    let restored = tailor::storage::embedded::EmbeddedStore::open(backup.path()).unwrap();
    let mut stores = restored.stores();
    stores.data_keys = app.engine.stores.data_keys.clone();
    let ring = tailor::privacy::KeyRing::load(&app.engine.settings.encryption, app.dir.path())
        .expect("the live key ring");
    let from_backup = tailor::privacy::Profiles::open(&stores, ring, &["birthday".into()])
        .await
        .expect("profiles over the backup");
    let c1 = tailor::customers::CustomerId::parse("id", "c1").unwrap();
    assert!(
        stores.profiles.get(&c1).await.unwrap().is_some(),
        "the backup holds the sealed profile"
    );
    let err = from_backup.get(&c1).await.expect_err("must not open");
    assert!(err.to_string().contains("no data key"), "{err}");
    let c2 = tailor::customers::CustomerId::parse("id", "c2").unwrap();
    assert_eq!(
        from_backup
            .get(&c2)
            .await
            .unwrap()
            .unwrap()
            .pii
            .email
            .as_deref(),
        Some("other@example.com"),
        "the rest of the backup stays readable"
    );

    // Re-ingesting the id is refused, naming the field, and counted.
    let refused = app
        .track(json!([
            {"eventId": "e3", "customerId": "c1", "type": "page_view"},
            {"eventId": "e4", "customerId": "c2", "type": "page_view"},
        ]))
        .await;
    assert_eq!(refused["accepted"], 1);
    assert_eq!(refused["rejected"][0]["index"], 0);
    assert_eq!(refused["rejected"][0]["field"], "events[0].customerId");
    assert!(
        refused["rejected"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("was erased")),
        "{refused:#}"
    );
    let resp = upsert(&app, "c1", json!({})).await;
    let (code, message) = first_error(&resp);
    assert_eq!(code, "BAD_USER_INPUT");
    assert!(
        message.starts_with("input.id: customer 'c1' was erased"),
        "{message}"
    );
    let metrics = app.engine.metrics.render();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("tailor_erased_writes_suppressed_total")
                && l.contains("kind=\"event\"")
                && l.ends_with(" 1")),
        "the suppression is counted: {metrics}"
    );
    assert!(export(&app, "c1").await["profile"].is_null());

    // An event that got past ingestion's check just before the erasure finished is
    // skipped by the processor: it brings back neither the profile nor feature values.
    let late = tailor::events::Event {
        event_id: "late".into(),
        customer_id: c1.clone(),
        event_type: "page_view".into(),
        timestamp: chrono::Utc::now(),
        properties: Default::default(),
        position: None,
    };
    let appended = app.engine.stores.events.append(&[late]).await.unwrap();
    let tailor::storage::AppendOutcome::Appended(seq) = appended[0] else {
        panic!("appended: {appended:?}");
    };
    app.engine.processor.wake();
    assert!(
        app.engine
            .processor
            .wait_applied(seq, std::time::Duration::from_secs(10))
            .await
    );
    let late_export = export(&app, "c1").await;
    assert!(late_export["profile"].is_null(), "{late_export:#}");
    assert_eq!(
        late_export["features"],
        export(&app, "never-seen").await["features"]
    );
    // The skipped event itself is then deleted from the log: by the background task
    // each second, after it followed the privacy journal, or here.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        app.engine.purge_skipped_erased().await.unwrap();
        let left = app
            .engine
            .stores
            .events
            .customer_events(&c1, chrono::DateTime::<chrono::Utc>::MIN_UTC)
            .await
            .unwrap();
        if left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the late event of an erased customer is deleted: {left:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // Consent granted again lifts the suppression; the new profile has a new data key.
    let resp = upsert(
        &app,
        "c1",
        json!({"consent": {"marketing": true}, "email": "back@example.com"}),
    )
    .await;
    assert!(resp["errors"].is_null(), "{resp:#}");
    let back = export(&app, "c1").await;
    assert_eq!(back["profile"]["email"], "back@example.com");
    assert!(back["erasedAt"].is_null());
    assert_eq!(back["events"], json!([]), "nothing of before came back");
    let tracked = app
        .track(json!([{"eventId": "e5", "customerId": "c1", "type": "page_view"}]))
        .await;
    assert_eq!(tracked["accepted"], 1, "{tracked:#}");
}

#[tokio::test]
async fn erasing_an_unknown_customer_is_harmless_and_bad_ids_name_the_field() {
    let app = app().await;
    let erased = app
        .gql(
            "mutation { eraseCustomer(id: \"nobody\") { profile events decisions pseudonym } }",
            json!({}),
        )
        .await;
    assert_eq!(
        erased["eraseCustomer"],
        json!({"profile": false, "events": 0, "decisions": 0, "pseudonym": null})
    );
    for query in [
        "mutation { eraseCustomer(id: \"\") { profile } }",
        "{ exportCustomer(id: \"\") }",
    ] {
        let resp = app.exec(query, json!({})).await;
        let (code, message) = first_error(&resp);
        assert_eq!(
            (code.as_str(), message.as_str()),
            ("BAD_USER_INPUT", "id: must not be empty"),
            "{query}"
        );
    }
}
