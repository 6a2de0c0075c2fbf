//! `tailor serve --demo` over a shared catalog on Redis that is down at start: the server
//! starts and answers (degraded) instead of exiting, and builds the demo world once
//! Redis answers.
//!
//! Needs `redis-server` on the PATH (`scripts/test` installs it); without it the test
//! fails when `CI=true` and is skipped otherwise.
#![cfg(feature = "redis")]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;
use common::free_port;

const PATIENCE: Duration = Duration::from_secs(120);

/// A child process, killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn redis_server_available() -> bool {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        let reason = "redis-server is not on the PATH";
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{reason} (CI=true requires it; scripts/test installs it)");
        }
        eprintln!("skipped: {reason} (scripts/test installs it)");
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_starts_while_redis_is_down_and_builds_once_it_answers() {
    if !redis_server_available() {
        return;
    }
    let (redis_port, port) = (free_port(), free_port());
    let redis = format!("redis://127.0.0.1:{redis_port}");
    let dir = tempfile::tempdir().unwrap();
    let mut server = Killed(
        Command::new(env!("CARGO_BIN_EXE_tailor"))
            .args(["serve", "--demo", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(dir.path())
            .env("RUST_LOG", "warn")
            .env("TAILOR_AUTH__ENABLED", "false")
            .env("TAILOR_BACKENDS__DEFINITIONS", &redis)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("tailor starts"),
    );
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");

    // Up and saying why it is degraded, though the demo world could not be built.
    let deadline = Instant::now() + PATIENCE;
    let readiness = loop {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await {
            if r.status().is_success() {
                break r.text().await.unwrap();
            }
        }
        assert!(
            server.0.try_wait().unwrap().is_none(),
            "the server exited while Redis was down"
        );
        assert!(Instant::now() < deadline, "the server did not become ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(readiness.contains("degraded"), "{readiness}");

    // Redis comes up: the demo's catalog is built there.
    let _redis = Killed(
        Command::new("redis-server")
            .args(["--port", &redis_port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server starts"),
    );
    let deadline = Instant::now() + PATIENCE;
    loop {
        let listed: Value = client
            .post(format!("{base}/graphql"))
            .json(&json!({"query": "{ content(limit: 100) { id } }"}))
            .send()
            .await
            .expect("the server answers")
            .json()
            .await
            .expect("JSON");
        let items = listed["data"]["content"].as_array().map_or(0, Vec::len);
        if items > 0 {
            break;
        }
        assert!(
            server.0.try_wait().unwrap().is_none(),
            "the server exited: {listed}"
        );
        assert!(
            Instant::now() < deadline,
            "the demo's content never reached Redis: {listed}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
