//! `tailor bench` against a real HTTP server on a free port: the open loop sends what it
//! offers and measures it, the closed loop finds a throughput, and failed requests are
//! counted as errors with their reason. Requests carry the test app's admin key
//! (`TAILOR_API_KEY`); without one every request is refused and counted.

mod common;

use std::process::Command;

use common::TestApp;
use serde_json::Value;

/// Serves `app` over HTTP on a free loopback port; returns the base URL.
async fn serve(app: &TestApp) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let engine = app.engine.clone();
    tokio::spawn(async move {
        tailor::app::serve_http(engine, listener, std::future::pending())
            .await
            .unwrap()
    });
    url
}

/// Runs `tailor bench` with `args` and the app's admin key and parses its JSON.
async fn bench(app: &TestApp, args: Vec<String>) -> Value {
    bench_as(app.admin_key.clone(), args).await
}

/// Runs `tailor bench` with `args` and `key` (off the async executor) and parses its JSON.
async fn bench_as(key: Option<String>, args: Vec<String>) -> Value {
    let output = tokio::task::spawn_blocking(move || {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tailor"));
        command.arg("bench").args(args).env_remove("TAILOR_API_KEY");
        if let Some(key) = key {
            command.env("TAILOR_API_KEY", key);
        }
        command.output().unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_and_closed_loops_measure_a_real_server_and_count_errors() {
    let app = TestApp::new().await;
    app.upsert_content("hero-1", "homepage_hero", 3, &[]).await;
    app.upsert_content("hero-2", "homepage_hero", 1, &[]).await;
    let url = serve(&app).await;

    let open = bench(
        &app,
        args(&[
            "--url",
            &url,
            "--workload",
            "personalize",
            "--rate",
            "100",
            "--duration",
            "1s",
            "--customers",
            "50",
            "--dist",
            "zipf",
        ]),
    )
    .await;
    assert_eq!(open["mode"], "open", "{open:#}");
    assert_eq!(open["offered_rps"], 100.0);
    assert_eq!(open["requests"], 100, "{open:#}");
    assert_eq!(open["errors"], 0, "{open:#}");
    let (p50, p99, max) = (
        open["p50_ms"].as_f64().unwrap(),
        open["p99_ms"].as_f64().unwrap(),
        open["max_ms"].as_f64().unwrap(),
    );
    assert!(p50 > 0.0 && p50 <= p99 && p99 <= max, "{open:#}");
    assert!(open["achieved_rps"].as_f64().unwrap() > 50.0, "{open:#}");
    // Every request decided: the server counted them.
    let metrics = reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let decided: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("personalization_decisions_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(decided, 100.0, "{metrics}");
    // And timed every stage of them.
    for stage in [
        "candidates",
        "context",
        "experiments",
        "rules",
        "model",
        "policy",
        "record",
    ] {
        let count = format!("tailor_decision_stage_latency_ms_count{{stage=\"{stage}\"}} 100");
        assert!(metrics.contains(&count), "{count}: {metrics}");
    }

    let events = bench(
        &app,
        args(&[
            "--url",
            &url,
            "--workload",
            "events",
            "--rate",
            "0",
            "--duration",
            "500ms",
            "--concurrency",
            "2",
            "--events-per-request",
            "10",
            "--customers",
            "20",
        ]),
    )
    .await;
    assert_eq!(events["mode"], "closed", "{events:#}");
    assert_eq!(events["errors"], 0, "{events:#}");
    let requests = events["requests"].as_u64().unwrap();
    assert!(requests > 0, "{events:#}");
    let per_s = events["events_per_s"].as_f64().unwrap();
    let duration = events["duration_s"].as_f64().unwrap();
    assert!(
        (per_s * duration - requests as f64 * 10.0).abs() < 1e-6 * per_s.max(1.0),
        "{events:#}"
    );

    // The same events through the REST route.
    let rest = bench(
        &app,
        args(&[
            "--url",
            &url,
            "--workload",
            "rest-events",
            "--rate",
            "20",
            "--duration",
            "500ms",
            "--events-per-request",
            "10",
            "--customers",
            "20",
        ]),
    )
    .await;
    assert_eq!(rest["requests"], 10, "{rest:#}");
    assert_eq!(rest["errors"], 0, "{rest:#}");
    assert!(rest["events_per_s"].as_f64().unwrap() > 0.0, "{rest:#}");

    let features = bench(
        &app,
        args(&[
            "--url",
            &url,
            "--workload",
            "features",
            "--rate",
            "50",
            "--duration",
            "500ms",
            "--dist",
            "uniform",
            "--customers",
            "20",
        ]),
    )
    .await;
    assert_eq!(features["errors"], 0, "{features:#}");
    assert_eq!(features["requests"], 25, "{features:#}");

    // The two ceilings `personalize` is compared with answer on the same server, and
    // decide nothing.
    for workload in ["http-ceiling", "graphql-ceiling"] {
        let ceiling = bench(
            &app,
            args(&[
                "--url",
                &url,
                "--workload",
                workload,
                "--rate",
                "0",
                "--concurrency",
                "2",
                "--duration",
                "300ms",
            ]),
        )
        .await;
        assert_eq!(ceiling["mode"], "closed", "{ceiling:#}");
        assert_eq!(ceiling["errors"], 0, "{ceiling:#}");
        assert!(ceiling["requests"].as_u64().unwrap() > 0, "{ceiling:#}");
    }
    let metrics = reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tailor_decision_stage_latency_ms_count{stage=\"record\"} 100"),
        "{metrics}"
    );
    // On a wrong path the bare route's check fails too.
    let wrong = bench(
        &app,
        args(&[
            "--url",
            &format!("{url}/nope"),
            "--workload",
            "http-ceiling",
            "--rate",
            "20",
            "--duration",
            "500ms",
        ]),
    )
    .await;
    assert_eq!(wrong["errors"], 10, "{wrong:#}");

    // Without a key every request is refused, and counted.
    let refused = bench_as(
        None,
        args(&["--url", &url, "--rate", "20", "--duration", "500ms"]),
    )
    .await;
    assert_eq!(refused["errors"], refused["requests"], "{refused:#}");
    assert!(
        refused["error_samples"][0]
            .as_str()
            .unwrap()
            .contains("UNAUTHENTICATED"),
        "{refused:#}"
    );

    // A wrong path: every request fails, and says why.
    let wrong = bench(
        &app,
        args(&[
            "--url",
            &format!("{url}/nope"),
            "--rate",
            "20",
            "--duration",
            "500ms",
        ]),
    )
    .await;
    assert_eq!(wrong["requests"], 10, "{wrong:#}");
    assert_eq!(wrong["errors"], 10, "{wrong:#}");
    assert!(
        wrong["error_samples"][0]
            .as_str()
            .unwrap()
            .starts_with("HTTP 404"),
        "{wrong:#}"
    );
}

#[test]
fn bad_arguments_are_refused_naming_them() {
    for (flag, value, says) in [
        ("--url", "localhost:1", "url"),
        ("--duration", "10", "10"),
        ("--rate=-5", "", "rate"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_tailor"))
            .args(["bench", flag])
            .args((!value.is_empty()).then_some(value))
            .output()
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(says), "{flag} {value}: {stderr}");
    }
}
