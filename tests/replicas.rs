//! Two replicas, one truth: two `tailor serve --role api` processes and one
//! `--role worker` over the same Redis and the same Kafka-protocol broker. One API key
//! (made by the CLI in the shared store) works on every replica; content put through one
//! is served by the other; events sent to either replica change the features both serve;
//! decisions made on either are found by the other (an outcome may reach any replica),
//! and the bandit learns from both; a feature defined through a replica is backfilled by
//! the worker from the events topic. An erasure made on one replica reaches every
//! process's own stores (profiles, erasure markers, event logs, decision logs), a
//! process started later refuses the erased id, and renewed consent reaches them all.
//! Two workers keep features exact while partitions move between them.
//!
//! The servers come from the environment (`scripts/test` starts them): `REDIS_URL` and
//! `KAFKA_URL`. Without them the test fails when `CI=true` and is skipped otherwise.
#![cfg(all(feature = "redis", feature = "kafka"))]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;
use common::free_port;

const PATIENCE: Duration = Duration::from_secs(90);

/// `$var`, or `None` after saying why the test cannot run (a failure under `CI=true`).
fn service(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            let reason = format!("{var} is not set: no server to test against");
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{reason} (CI=true requires it; scripts/test starts it)");
            }
            eprintln!("skipped: {reason} (scripts/test starts it)");
            None
        }
    }
}

/// A `tailor serve` process, killed when dropped.
struct Server {
    child: Child,
    base: String,
    client: reqwest::Client,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An admin key in the shared key store: the CLI reaches it without a data directory.
fn admin_key(redis: &str) -> String {
    let created = Command::new(env!("CARGO_BIN_EXE_tailor"))
        .args(["keys", "create", "--role", "admin"])
        .env("TAILOR_BACKENDS__DEFINITIONS", redis)
        .output()
        .expect("tailor runs");
    assert!(created.status.success(), "{created:?}");
    String::from_utf8(created.stdout).unwrap().trim().to_owned()
}

/// Where a deployment's processes keep what they share.
#[derive(Clone)]
struct Shape {
    redis: String,
    kafka: String,
    /// `Some`: profiles (with their data keys) on Redis too, every process under this
    /// master key.
    master_key: Option<String>,
    /// `Some`: `policy.attribution_window_secs`, so that decisions become evaluable soon.
    attribution_window_secs: Option<u64>,
}

impl Shape {
    /// `tailor` with this shape's backends.
    fn command(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tailor"));
        let redis = &self.redis;
        command
            .env("TAILOR_BACKENDS__FEATURES", redis)
            .env("TAILOR_BACKENDS__SEGMENTS", redis)
            .env("TAILOR_BACKENDS__BANDIT", redis)
            .env("TAILOR_BACKENDS__DECISIONS", redis)
            .env("TAILOR_BACKENDS__DEFINITIONS", redis)
            .env("TAILOR_BACKENDS__EVENTS", &self.kafka);
        if let Some(master_key) = &self.master_key {
            command
                .env("TAILOR_BACKENDS__PROFILES", redis)
                .env("TAILOR_ENCRYPTION_KEY", master_key);
        }
        if let Some(secs) = self.attribution_window_secs {
            command.env("TAILOR_POLICY__ATTRIBUTION_WINDOW_SECS", secs.to_string());
        }
        command
    }
}

async fn start(role: &str, data_dir: &Path, shape: &Shape, key: &str) -> Server {
    let port = free_port();
    let child = shape
        .command()
        .args([
            "serve",
            "--role",
            role,
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .env("RUST_LOG", "warn")
        .env("TAILOR_RULES__DIR", "")
        .env("TAILOR_RULES__PLUGINS_DIR", "")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("tailor starts");
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {key}").parse().unwrap(),
    );
    let server = Server {
        child,
        base: format!("http://127.0.0.1:{port}"),
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .default_headers(headers)
            .build()
            .unwrap(),
    };
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Ok(r) = server
            .client
            .get(format!("{}/readyz", server.base))
            .send()
            .await
        {
            if r.status().is_success() {
                return server;
            }
        }
        assert!(Instant::now() < deadline, "the {role} did not become ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Server {
    /// Runs a GraphQL document; panics on a transport error or any GraphQL error.
    async fn graphql(&self, query: &str, variables: Value) -> Value {
        let response: Value = self
            .client
            .post(format!("{}/graphql", self.base))
            .json(&json!({"query": query, "variables": variables}))
            .send()
            .await
            .expect("request sent")
            .json()
            .await
            .expect("a JSON answer");
        assert!(
            response.get("errors").is_none(),
            "{query}: {}",
            response["errors"]
        );
        response["data"].clone()
    }

    async fn page_views(&self, customer: &str) -> f64 {
        self.feature(customer, "page_views_30d").await
    }

    async fn feature(&self, customer: &str, name: &str) -> f64 {
        let data = self
            .graphql(
                "query($c: ID!, $n: [String!]) { features(customerId: $c, names: $n) { name value } }",
                json!({"c": customer, "n": [name]}),
            )
            .await;
        data["features"][0]["value"].as_f64().unwrap_or(0.0)
    }

    async fn track(&self, events: Vec<Value>) {
        let n = events.len() as u64;
        assert_eq!(self.accepted(events).await, n);
    }

    /// How many of `events` were accepted.
    async fn accepted(&self, events: Vec<Value>) -> u64 {
        let data = self
            .graphql(
                "mutation($e: [EventInput!]!) { trackEvents(events: $e) { accepted } }",
                json!({"e": events}),
            )
            .await;
        data["trackEvents"]["accepted"].as_u64().expect("a count")
    }

    async fn export(&self, customer: &str) -> Value {
        let data = self
            .graphql(
                "query($c: ID!) { exportCustomer(id: $c) }",
                json!({"c": customer}),
            )
            .await;
        data["exportCustomer"].clone()
    }

    async fn upsert(&self, customer: &str, email: &str) {
        self.graphql(
            "mutation($i: CustomerInput!) { upsertCustomer(input: $i) { id } }",
            json!({"i": {"id": customer, "email": email, "consent": {"marketing": true}}}),
        )
        .await;
    }

    async fn ids_by_email(&self, email: &str) -> Value {
        let data = self
            .graphql(
                "query($e: String!) { customerIdsByEmail(email: $e) }",
                json!({"e": email}),
            )
            .await;
        data["customerIdsByEmail"].clone()
    }

    async fn erase(&self, customer: &str) -> Value {
        let data = self
            .graphql(
                "mutation($c: ID!) { eraseCustomer(id: $c) { profile events decisions } }",
                json!({"c": customer}),
            )
            .await;
        data["eraseCustomer"].clone()
    }

    /// Each series of the metric `name` (its labels, as written) with its value.
    async fn metric(&self, name: &str) -> Vec<(String, f64)> {
        let text = self
            .client
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .expect("metrics answer")
            .text()
            .await
            .unwrap();
        text.lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(name)?;
                let (labels, value) = rest.rsplit_once(' ')?;
                (labels.is_empty() || labels.starts_with('{'))
                    .then(|| Some((labels.to_owned(), value.parse::<f64>().ok()?)))?
            })
            .collect()
    }

    /// `tailor_privacy_journal_applied_total` summed over its labels.
    async fn journal_applied(&self) -> f64 {
        let series = self.metric("tailor_privacy_journal_applied_total").await;
        series.iter().map(|(_, v)| v).sum()
    }

    /// The events this worker applied from the stream: how many in all, and how many of
    /// the partitions it applied any from.
    async fn stream_applied(&self) -> (f64, usize) {
        let series = self.metric("tailor_stream_events_applied_total").await;
        (
            series.iter().map(|(_, v)| v).sum(),
            series.iter().filter(|(_, v)| *v > 0.0).count(),
        )
    }

    async fn decide(&self, customer: &str, explain: bool) -> Value {
        let data = self
            .graphql(
                "query($c: ID!, $x: Boolean!) { personalize(input: {customerId: $c, placement: \"hero\", explain: $x}) { id explanation selectedItem { id } } }",
                json!({"c": customer, "x": explain}),
            )
            .await;
        data["personalize"].clone()
    }

    async fn reward(&self, decision: &str) {
        self.graphql(
            "mutation($d: ID!) { recordOutcome(decisionId: $d, reward: 1.0) { decisionId } }",
            json!({"d": decision}),
        )
        .await;
    }

    /// The bandit's (impressions, rewards) summed over the candidates, as a decision with
    /// `explain` shows them.
    async fn bandit_totals(&self) -> (f64, f64) {
        let decision = self.decide("observer", true).await;
        let candidates = decision["explanation"]["candidates"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        candidates.iter().fold((0.0, 0.0), |(n, r), c| {
            (
                n + c["impressions"].as_f64().unwrap_or(0.0),
                r + c["reward"].as_f64().unwrap_or(0.0),
            )
        })
    }
}

fn page_views(customer: &str, from: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            json!({
                "eventId": format!("{from}-{customer}-{i}"),
                "customerId": customer,
                "type": "page_view",
            })
        })
        .collect()
}

/// A deployment of its own (key prefix, topics, consumer group) on the shared servers.
struct Deployment {
    shape: Shape,
    key: String,
    dirs: Vec<tempfile::TempDir>,
}

impl Deployment {
    fn new(redis: &str, kafka: &str) -> Deployment {
        let run = uuid::Uuid::now_v7().simple().to_string();
        let redis = format!("{redis}?prefix=t-{run}:");
        let kafka = format!("{kafka}?topic_prefix=t{run}.&group=g{run}&partitions=3");
        // One key for every replica.
        let key = admin_key(&redis);
        Deployment {
            shape: Shape {
                redis,
                kafka,
                master_key: None,
                attribution_window_secs: None,
            },
            key,
            dirs: Vec::new(),
        }
    }

    /// Profiles on Redis too, under one master key.
    fn with_shared_profiles(redis: &str, kafka: &str) -> Deployment {
        let mut deployment = Deployment::new(redis, kafka);
        deployment.shape.master_key = Some("42".repeat(32));
        deployment
    }

    /// A `role` process on a data directory of its own.
    async fn start(&mut self, role: &str) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let server = start(role, dir.path(), &self.shape, &self.key).await;
        self.dirs.push(dir);
        server
    }

    /// A worker and two API replicas, started together on the empty shared store (each
    /// built-in feature is defined once, by whichever gets there first).
    async fn start_three(&mut self) -> (Server, Server, Server) {
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let (shape, key) = (&self.shape, &self.key);
        let started = tokio::join!(
            start("worker", dirs[0].path(), shape, key),
            start("api", dirs[1].path(), shape, key),
            start("api", dirs[2].path(), shape, key),
        );
        self.dirs.extend(dirs);
        started
    }
}

/// Polls `check` until it holds or `PATIENCE` is spent, then fails with `what`.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        match check().await {
            Ok(()) => return,
            Err(seen) => assert!(Instant::now() < deadline, "{what}: {seen}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Puts the three offers through `a` and waits until `b` lists them.
async fn shared_offers(a: &Server, b: &Server) {
    for id in ["offer-1", "offer-2", "offer-3"] {
        a.graphql(
            "mutation($i: ContentItemInput!) { upsertContent(input: $i) { id } }",
            json!({"i": {"id": id, "type": "banner", "placements": ["hero"]}}),
        )
        .await;
    }
    // Within the content cache's lifetime (a second): b may have read the catalog before
    // a wrote it (its reload task reads it every second).
    let deadline = Instant::now() + PATIENCE;
    loop {
        let listed = b.graphql("{ content(limit: 100) { id } }", json!({})).await;
        if listed["content"].as_array().map(Vec::len) == Some(3) {
            break;
        }
        assert!(Instant::now() < deadline, "b lists what a stored: {listed}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_api_replicas_and_a_worker_share_features_decisions_and_learning() {
    let (Some(redis), Some(kafka)) = (service("REDIS_URL"), service("KAFKA_URL")) else {
        return;
    };
    let mut deployment = Deployment::new(&redis, &kafka);
    // Short, so that the decisions below can be evaluated within the test.
    let window = Duration::from_secs(8);
    deployment.shape.attribution_window_secs = Some(window.as_secs());
    let (worker, a, b) = deployment.start_three().await;

    // The catalog is shared: content put through a serves decisions on b.
    shared_offers(&a, &b).await;

    // Events through either replica reach the worker, and both serve what it applied.
    a.track(page_views("alice", "a", 3)).await;
    b.track(page_views("alice", "b", 2)).await;
    b.track(page_views("bob", "b", 4)).await;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let seen = [
            a.page_views("alice").await,
            b.page_views("alice").await,
            a.page_views("bob").await,
            b.page_views("bob").await,
        ];
        if seen == [5.0, 5.0, 4.0, 4.0] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "features after events through both replicas: {seen:?}, expected alice 5 and bob 4 on both"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A feature defined through an API replica is backfilled by the worker, from the
    // events topic: alice's history counts at once, not only what comes after.
    a.graphql(
        r#"mutation { defineFeature(name: "views_all", definition: {kind: "count", event_type: "page_view", window: "30d"}) { name } }"#,
        json!({}),
    )
    .await;
    eventually("the worker backfilled the new feature", || async {
        let data = a
            .graphql(
                r#"{ features(customerId: "alice", names: ["views_all"]) { value } }"#,
                json!({}),
            )
            .await;
        let value = data["features"][0]["value"].as_f64();
        (value == Some(5.0))
            .then_some(())
            .ok_or(format!("views_all of alice: {value:?}"))
    })
    .await;

    // Decisions made on each replica, rewarded through the other one.
    let first_decision = Instant::now();
    let mut decided = 0.0;
    for (maker, rewarder) in [(&a, &b), (&b, &a)] {
        for n in 0..5 {
            let decision = maker.decide(&format!("shopper-{n}"), false).await;
            let id = decision["id"].as_str().expect("a decision id").to_owned();
            rewarder.reward(&id).await;
            decided += 1.0;
        }
    }
    // A second outcome of one decision, on its own replica, does not teach the bandit
    // again: the first-outcome count is shared.
    let once = a.decide("shopper-once", false).await;
    let once = once["id"].as_str().unwrap().to_owned();
    b.reward(&once).await;
    a.reward(&once).await;
    decided += 1.0;

    // Both replicas read the bandit that learned from both, once each wrote what it
    // holds (every 100 ms; the observer decisions add impressions as they go).
    eventually("both replicas see every reward", || async {
        let (rewards_a, rewards_b) = (a.bandit_totals().await.1, b.bandit_totals().await.1);
        (rewards_a == decided && rewards_b == decided)
            .then_some(())
            .ok_or(format!(
                "rewards {rewards_a} on a, {rewards_b} on b, of {decided}"
            ))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (shown_a, _) = a.bandit_totals().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (shown_b, _) = b.bandit_totals().await;
    assert!(shown_a >= decided, "impressions seen on a: {shown_a}");
    assert!(
        shown_b > shown_a,
        "b sees a's observer decision too: {shown_b} after {shown_a}"
    );
    // No reward is counted twice (the second outcome above included), however long one
    // waits.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        a.bandit_totals().await.1,
        decided,
        "rewards seen on a, later"
    );

    // Off-policy evaluation on either replica reads every replica's decisions (once the
    // first ones are out of their attribution window: it refuses a log with none).
    tokio::time::sleep_until((first_decision + window + Duration::from_secs(1)).into()).await;
    let scanned = |replica: &'static str, data: Value| {
        let e = &data["evaluatePolicy"];
        let skipped = &e["skipped"];
        [
            "unpersonalized",
            "openWindow",
            "otherPlacement",
            "inconsistent",
        ]
        .iter()
        .map(|k| skipped[k].as_f64().unwrap_or_default())
        .sum::<f64>()
            + e["rounds"]
                .as_f64()
                .unwrap_or_else(|| panic!("rounds on {replica}: {data}"))
    };
    const EVALUATE: &str = r#"{ evaluatePolicy(input: {policy: "uniform"}) { rounds skipped { unpersonalized openWindow otherPlacement inconsistent } } }"#;
    let on_a = scanned("a", a.graphql(EVALUATE, json!({})).await);
    let on_b = scanned("b", b.graphql(EVALUATE, json!({})).await);
    assert!(
        on_a >= decided && on_a == on_b,
        "decisions evaluated: {on_a} on a, {on_b} on b, of at least {decided} made on both"
    );
    drop(worker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_on_one_replica_reaches_every_process() {
    let (Some(redis), Some(kafka)) = (service("REDIS_URL"), service("KAFKA_URL")) else {
        return;
    };
    let mut deployment = Deployment::new(&redis, &kafka);
    let (worker, a, b) = deployment.start_three().await;
    let worker_dir = deployment.dirs[0].path().to_path_buf();
    shared_offers(&a, &b).await;

    // Carol is known to b alone (her profile), to the worker (her events) and to b's
    // decision log.
    b.upsert("carol", "carol@example.com").await;
    b.track(page_views("carol", "b", 3)).await;
    eventually("the worker applied carol's events", || async {
        let seen = a.page_views("carol").await;
        (seen == 3.0)
            .then_some(())
            .ok_or(format!("page views {seen}"))
    })
    .await;
    let decision = b.decide("carol", false).await;
    assert!(decision["id"].is_string(), "{decision}");
    // Dave is erased too, and consents again later.
    b.upsert("dave", "dave@example.com").await;

    // Both erased through a, which holds none of their profiles.
    let erased = a.erase("carol").await;
    assert_eq!(
        erased["profile"], false,
        "a never held carol's profile: {erased}"
    );
    a.erase("dave").await;

    // b forgets carol: profile, decisions in its own log, and it refuses her events.
    eventually("b applied the erasure", || async {
        let export = b.export("carol").await;
        let done = !export["erasedAt"].is_null()
            && export["profile"].is_null()
            && export["decisions"] == json!([])
            && export["events"] == json!([]);
        done.then_some(()).ok_or(export.to_string())
    })
    .await;
    assert_eq!(b.accepted(page_views("carol", "b-after", 1)).await, 0);
    assert_eq!(
        a.page_views("carol").await,
        0.0,
        "the shared features are gone"
    );

    // A process started after the erasure refuses carol from its first request.
    let c = deployment.start("api").await;
    assert_eq!(c.accepted(page_views("carol", "c", 1)).await, 0);

    // The worker applied both erasures to its own stores: its event log has nothing of
    // carol's left once it stops.
    eventually("the worker applied the journal", || async {
        let applied = worker.journal_applied().await;
        (applied >= 2.0)
            .then_some(())
            .ok_or(format!("{applied} entries"))
    })
    .await;
    drop(worker);
    let store = tailor::storage::embedded::EmbeddedStore::open(&worker_dir).expect("opens");
    let carol = tailor::customers::CustomerId::parse("id", "carol").unwrap();
    let left = store
        .stores()
        .events
        .customer_events(&carol, chrono::DateTime::<chrono::Utc>::MIN_UTC)
        .await
        .unwrap();
    assert!(
        left.is_empty(),
        "the worker's log kept carol's events: {left:?}"
    );

    // Dave consents again through b: every replica accepts his events again, and carol
    // stays erased.
    b.upsert("dave", "dave@example.com").await;
    let tries = std::sync::atomic::AtomicUsize::new(0);
    for replica in [&a, &c] {
        eventually("every replica accepts dave again", || async {
            let n = tries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let accepted = replica
                .accepted(page_views("dave", &format!("back-{n}"), 1))
                .await;
            (accepted == 1)
                .then_some(())
                .ok_or(format!("{accepted} accepted"))
        })
        .await;
    }
    assert_eq!(a.accepted(page_views("carol", "a-after", 1)).await, 0);
}

/// With `backends.profiles` on Redis too, the API replicas keep nothing of a customer's
/// profile: one written through a replica is read, decrypted, and found by its email on
/// the other; events sent through one, sealed on the events topic, are counted by the
/// worker; an erasure through one is seen by all at once; and a process catching up
/// with the privacy journal late (erased, then consented again) leaves alone the profile
/// the customer gave after consenting again. A process whose master key is its data
/// directory's own refuses to start on shared profiles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_on_redis_are_one_truth_for_every_process() {
    let (Some(redis), Some(kafka)) = (service("REDIS_URL"), service("KAFKA_URL")) else {
        return;
    };
    let mut deployment = Deployment::with_shared_profiles(&redis, &kafka);
    let (worker, a, b) = deployment.start_three().await;

    a.upsert("erin", "erin@example.com").await;
    let export = b.export("erin").await;
    assert_eq!(
        export["profile"]["email"], "erin@example.com",
        "b reads, decrypted, what a wrote: {export}"
    );
    assert_eq!(b.ids_by_email(" Erin@Example.com").await, json!(["erin"]));
    // With the data keys shared, the events topic is sealed: what a sends, the worker
    // opens and counts, and b serves.
    assert_eq!(a.accepted(page_views("erin", "sealed", 3)).await, 3);
    feature_is_exact(
        &b,
        "page_views_30d",
        &BTreeMap::from([("erin".to_owned(), 3.0)]),
        "erin's sealed events",
    )
    .await;

    // Erased through a: b holds no copy, so it is gone there at once.
    a.erase("erin").await;
    let export = b.export("erin").await;
    assert!(
        export["profile"].is_null() && !export["erasedAt"].is_null(),
        "b sees the erasure at once: {export}"
    );
    assert_eq!(b.accepted(page_views("erin", "b", 1)).await, 0);
    assert_eq!(b.ids_by_email("erin@example.com").await, json!([]));

    // Erin consents again through b, with a new email.
    b.upsert("erin", "erin@new.example").await;
    // A process started now applies the whole journal (the erasure, then the consent)
    // before it serves; the worker and a apply it too, each in its own time.
    let c = deployment.start("api").await;
    for (name, process) in [("c", &c), ("a", &a), ("worker", &worker)] {
        eventually(&format!("{name} applied the journal"), || async {
            let applied = process.journal_applied().await;
            (applied >= 2.0)
                .then_some(())
                .ok_or(format!("{applied} entries"))
        })
        .await;
    }
    for replica in [&a, &b, &c] {
        let export = replica.export("erin").await;
        assert_eq!(
            export["profile"]["email"], "erin@new.example",
            "the profile given after consenting again stays: {export}"
        );
        assert!(export["erasedAt"].is_null(), "{export}");
    }
    assert_eq!(c.accepted(page_views("erin", "c", 1)).await, 1);
    assert_eq!(a.ids_by_email("erin@new.example").await, json!(["erin"]));
    assert_eq!(a.ids_by_email("erin@example.com").await, json!([]));

    // Without a master key of the deployment's (the generated key is one data
    // directory's own), a process refuses to start on shared profiles.
    let dir = tempfile::tempdir().unwrap();
    let mut shape = deployment.shape.clone();
    shape.master_key = None;
    let refused = shape
        .command()
        .env("TAILOR_BACKENDS__PROFILES", &shape.redis)
        .env_remove("TAILOR_ENCRYPTION_KEY")
        .args(["serve", "--listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .expect("tailor runs");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("encryption.key_env"),
        "{refused:?}"
    );
}

/// Sends `n` page views to each customer, round-robin (so that each customer's last event
/// is among the last the log numbers), 50 to a request; counts them in `sent`.
async fn views_round_robin(
    api: &Server,
    customers: &[String],
    n: usize,
    round: &str,
    sent: &mut BTreeMap<String, f64>,
) {
    let events: Vec<Value> = (0..n)
        .flat_map(|i| {
            customers.iter().map(move |c| {
                json!({"eventId": format!("{round}-{c}-{i}"), "customerId": c, "type": "page_view"})
            })
        })
        .collect();
    for chunk in events.chunks(50) {
        api.track(chunk.to_vec()).await;
    }
    for c in customers {
        *sent.entry(c.clone()).or_default() += n as f64;
    }
}

/// Waits until `api` serves, for every customer, as many page views as were sent.
async fn views_are_exact(api: &Server, sent: &BTreeMap<String, f64>, when: &str) {
    feature_is_exact(api, "page_views_30d", sent, when).await;
}

/// Waits until `api` serves, for every customer, `sent` as the value of `feature`.
async fn feature_is_exact(api: &Server, feature: &str, sent: &BTreeMap<String, f64>, when: &str) {
    eventually(when, || async {
        let mut wrong = Vec::new();
        for (customer, expected) in sent {
            let seen = api.feature(customer, feature).await;
            if seen != *expected {
                wrong.push(format!("{customer}: {seen} of {expected}"));
            }
        }
        wrong.is_empty().then_some(()).ok_or(wrong.join(", "))
    })
    .await;
}

/// Two workers share the partitions, and a partition moves between them: when a second
/// worker joins (its log numbers events from 1, far below the first one's), and when the
/// first is killed while events flow (what it applied and had not committed is delivered
/// again, to the other). Each customer's page views stay exactly the events sent: the
/// feature states remember the stream position, which both workers agree on, rather
/// than a log sequence number, which they do not. Copies of events the first worker
/// read, sent again through another replica, are dropped by the second: the workers
/// share the event ids they read. A feature defined afterwards counts each customer's
/// whole history, read from the events topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn features_stay_exact_while_partitions_move_between_workers() {
    let (Some(redis), Some(kafka)) = (service("REDIS_URL"), service("KAFKA_URL")) else {
        return;
    };
    let mut deployment = Deployment::new(&redis, &kafka);
    let api = deployment.start("api").await;
    let first = deployment.start("worker").await;
    let customers: Vec<String> = (0..24).map(|i| format!("mover-{i}")).collect();
    let mut sent = BTreeMap::new();

    // The first worker alone: its log numbers these 480 events up to 480.
    views_round_robin(&api, &customers, 20, "alone", &mut sent).await;
    views_are_exact(&api, &sent, "page views applied by the first worker").await;
    assert_eq!(first.stream_applied().await, (480.0, 3));

    // A second worker joins; the group gives it some of the three partitions. Rounds
    // of two events a customer go on until it has applied some: every one of them is
    // numbered below 480 in its log.
    let second = deployment.start("worker").await;
    let deadline = Instant::now() + PATIENCE;
    for round in 0.. {
        views_round_robin(&api, &customers, 2, &format!("joined-{round}"), &mut sent).await;
        if second.stream_applied().await.0 > 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the second worker took no partition over"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    views_are_exact(&api, &sent, "page views with two workers").await;
    let (_, held_by_second) = second.stream_applied().await;
    assert!(
        held_by_second < 3,
        "the first worker kept partitions: {held_by_second}"
    );

    // The first worker dies while events flow; the second takes its partitions over from
    // their committed offsets.
    let before = second.stream_applied().await.0;
    let stream = async {
        for i in 0..6 {
            views_round_robin(&api, &customers, 2, &format!("takeover-{i}"), &mut sent).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let kill = async {
        tokio::time::sleep(Duration::from_millis(250)).await;
        drop(first);
    };
    tokio::join!(stream, kill);
    views_are_exact(&api, &sent, "page views after the first worker died").await;
    let (after, partitions) = second.stream_applied().await;
    assert_eq!(partitions, 3, "the second worker holds every partition");
    assert!(after > before, "{before} → {after}");

    // A client sends the first round again through another replica (a retry after a
    // timeout, say): that replica's outbox never saw these ids, so they reach the
    // stream a second time, and the second worker, whose log never saw them either.
    // The first worker's claims make them copies, dropped.
    let other = deployment.start("api").await;
    let mut again = BTreeMap::new();
    views_round_robin(&other, &customers, 20, "alone", &mut again).await;
    eventually("the second worker drops the copies", || async {
        let dropped: f64 = second
            .metric("tailor_stream_copies_dropped_total")
            .await
            .iter()
            .map(|(_, v)| v)
            .sum();
        (dropped == 480.0)
            .then_some(())
            .ok_or(format!("{dropped} of 480 dropped"))
    })
    .await;
    views_are_exact(&api, &sent, "page views after copies of the first round").await;

    // A feature defined now is backfilled from the events topic, partition by
    // partition: each customer's whole history counts, though the second worker's log
    // holds only what it consumed since it joined, and the first worker is gone.
    // (Backfilled from the second worker's log, a customer whose partition it took
    // over would count only the events since.) What comes after counts live.
    api.graphql(
        r#"mutation { defineFeature(name: "views_history", definition: {kind: "count", event_type: "page_view", window: "30d"}) { name } }"#,
        json!({}),
    )
    .await;
    feature_is_exact(&api, "views_history", &sent, "the new feature's backfill").await;
    views_round_robin(&api, &customers, 3, "defined", &mut sent).await;
    feature_is_exact(
        &api,
        "views_history",
        &sent,
        "the new feature after more events",
    )
    .await;
    views_are_exact(&api, &sent, "page views after the new feature").await;
}
