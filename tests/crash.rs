//! Crash safety: SIGKILL a running server during ingestion; after a restart every
//! acknowledged event is there (a replay is all duplicates) and features count it.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{json, Value};

mod common;
use common::free_port;

fn start(data_dir: &std::path::Path, port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_tailor"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(data_dir)
        .env("RUST_LOG", "warn")
        .env("TAILOR_RULES__DIR", "")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("tailor starts")
}

/// A client sending an admin key made by the command line, before the server holds the
/// data directory.
fn admin_client(data_dir: &std::path::Path) -> reqwest::Client {
    let created = Command::new(env!("CARGO_BIN_EXE_tailor"))
        .args(["keys", "create", "--role", "admin", "--data-dir"])
        .arg(data_dir)
        .output()
        .expect("tailor runs");
    assert!(created.status.success(), "{created:?}");
    let key = String::from_utf8(created.stdout).unwrap().trim().to_owned();
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {key}").parse().unwrap(),
    );
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .default_headers(headers)
        .build()
        .unwrap()
}

async fn wait_healthy(client: &reqwest::Client, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await {
            if r.status().is_success() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "server did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn batch(writer: usize, n: usize) -> Vec<Value> {
    (0..200)
        .map(|k| {
            json!({"eventId": format!("w{writer}-b{n}-{k}"), "customerId": format!("c{}", k % 10), "type": "page_view"})
        })
        .collect()
}

async fn post_json(client: &reqwest::Client, url: String, body: &impl serde::Serialize) -> Value {
    client
        .post(url)
        .json(body)
        .send()
        .await
        .expect("request sent")
        .json()
        .await
        .expect("JSON answer")
}

async fn total_page_views(client: &reqwest::Client, base: &str) -> f64 {
    let mut total = 0.0;
    for c in 0..10 {
        let query = format!(
            "{{ features(customerId: \"c{c}\", names: [\"page_views_30d\"]) {{ value }} }}"
        );
        let resp = post_json(
            client,
            format!("{base}/graphql"),
            &json!({ "query": query }),
        )
        .await;
        total += resp["data"]["features"][0]["value"].as_f64().unwrap_or(0.0);
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_events_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let client = admin_client(dir.path());
    let mut server = start(dir.path(), port);
    wait_healthy(&client, &base).await;

    let acked: Arc<Mutex<Vec<Value>>> = Arc::default();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let client = client.clone();
            let base = base.clone();
            let acked = acked.clone();
            tokio::spawn(async move {
                for n in 0.. {
                    let events = batch(w, n);
                    let sent = client
                        .post(format!("{base}/api/v1/events"))
                        .json(&events)
                        .send()
                        .await;
                    match sent {
                        Ok(r) if r.status().is_success() => {
                            let report: Value = r.json().await.unwrap_or_default();
                            if report["accepted"].as_u64() == Some(200) {
                                acked.lock().extend(events);
                            }
                        }
                        _ => return,
                    }
                }
            })
        })
        .collect();

    // Kill in the middle of ingestion, once a good number of batches went through.
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.lock().len() < 4_000 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill().expect("SIGKILL");
    server.wait().unwrap();
    for w in writers {
        let _ = w.await;
    }
    let acked = std::mem::take(&mut *acked.lock());
    assert!(
        acked.len() >= 4_000,
        "ingestion ran before the kill: {}",
        acked.len()
    );

    let mut server = start(dir.path(), port);
    wait_healthy(&client, &base).await;

    // Features catch up with the whole durable log after the restart: at least every
    // acknowledged event, plus any stored whose acknowledgement the kill cut off. Wait
    // until the count stops moving, so the replay below compares against a settled log.
    let mut total = 0.0;
    let mut steady = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let now = total_page_views(&client, &base).await;
        steady = if now == total { steady + 1 } else { 0 };
        total = now;
        if total >= acked.len() as f64 && steady >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        total >= acked.len() as f64,
        "features count {total} of {} acknowledged events",
        acked.len()
    );

    // Every acknowledged event is stored: replaying them is all duplicates.
    for chunk in acked.chunks(2_000) {
        let report = post_json(&client, format!("{base}/api/v1/events"), &chunk).await;
        assert_eq!(report["accepted"], 0, "{report}");
        assert_eq!(report["duplicates"].as_u64(), Some(chunk.len() as u64));
    }
    // And the replay counted nothing twice.
    assert_eq!(total_page_views(&client, &base).await, total);
    server.kill().unwrap();
    server.wait().unwrap();
}

/// The decision log is committed without waiting for an fsync (`storage.decision_log =
/// "relaxed"`), and on disk once the writer has been idle for 100 ms: decisions made
/// before a quiet moment survive a SIGKILL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relaxed_decisions_are_on_disk_after_an_idle_moment() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let client = admin_client(dir.path());
    let mut server = start(dir.path(), port);
    wait_healthy(&client, &base).await;

    let graphql = |query: &'static str, variables: Value| {
        let client = client.clone();
        let base = base.clone();
        async move {
            let answer = post_json(
                &client,
                format!("{base}/graphql"),
                &json!({"query": query, "variables": variables}),
            )
            .await;
            assert!(answer.get("errors").is_none(), "{answer}");
            answer["data"].clone()
        }
    };
    graphql(
        "mutation { upsertContent(input: {id: \"offer\", type: \"banner\", placements: [\"hero\"]}) { id } }",
        json!({}),
    )
    .await;
    let mut ids = Vec::new();
    for n in 0..20 {
        let decision = graphql(
            "query($c: ID!) { personalize(input: {customerId: $c, placement: \"hero\"}) { id } }",
            json!({"c": format!("c{n}")}),
        )
        .await;
        ids.push(decision["personalize"]["id"].as_str().unwrap().to_owned());
    }
    // Well past the flush deadline on a busy machine.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    server.kill().expect("SIGKILL");
    server.wait().unwrap();

    let mut server = start(dir.path(), port);
    wait_healthy(&client, &base).await;
    for id in &ids {
        let found = graphql(
            "query($d: ID!) { decision(id: $d) { id } }",
            json!({"d": id}),
        )
        .await;
        assert_eq!(
            found["decision"]["id"].as_str(),
            Some(id.as_str()),
            "decision {id} after a SIGKILL"
        );
    }
    server.kill().unwrap();
    server.wait().unwrap();
}
