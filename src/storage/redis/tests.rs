//! Tests of the Redis backend against real servers: the conformance suites on a single
//! server and on a cluster, the per-call deadline, an engine that decides and learns
//! through Redis, and engines whose own `redis-server` is killed or stalled while they
//! run or before they start.
//!
//! The shared servers come from the environment (`scripts/test` starts them on free
//! ports): `REDIS_URL` (`redis://host:port`) and `REDIS_CLUSTER_URL`
//! (`redis+cluster://host:port,...`). Without them a test fails when `CI=true` and is
//! skipped with its reason otherwise. Each test works under a fresh key prefix. The
//! tests with a server of their own start `redis-server` from the PATH
//! ([`PrivateRedis`]), with the same rule when it is missing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::{RedisConfig, RedisStore};
use crate::app::Engine;
use crate::config::Settings;
use crate::decision::pipeline::PersonalizeRequest;
use crate::storage::catalog_copy::{CatalogCopy, CopiedContent, CopiedDefinitions};
use crate::storage::conformance::{self, customer_id, sample_content_item};
use crate::storage::embedded::EmbeddedStore;
use crate::storage::{BanditStore, DecisionStore, DefinitionStore, FeatureStore, StorageError};

const SINGLE: &str = "REDIS_URL";
const CLUSTER: &str = "REDIS_CLUSTER_URL";
/// Generous: tests share servers with each other (one of them pauses its server).
const TIMEOUT: Duration = Duration::from_secs(5);

/// The backend value for `var`, with a fresh key prefix, and that prefix (also usable as
/// the conformance suites' prefix); `None` (after saying why) when no server is set up.
fn location(var: &str) -> Option<(String, String)> {
    let url = match std::env::var(var) {
        Ok(url) if !url.is_empty() => url,
        _ => {
            let reason = format!("{var} is not set: no Redis server to test against");
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{reason} (CI=true requires one; scripts/test starts it)");
            }
            eprintln!("skipped: {reason} (scripts/test starts one)");
            return None;
        }
    };
    let prefix = format!("t-{}:", uuid::Uuid::now_v7());
    Some((format!("{url}?prefix={prefix}"), prefix))
}

async fn connect(value: &str, timeout: Duration) -> Arc<RedisStore> {
    let config = RedisConfig::parse(value, timeout).expect("valid test URL");
    match RedisStore::connect(&config).await {
        Ok(store) => store,
        Err(e) => panic!("connecting to {config:?}: {e}"),
    }
}

async fn features_conform(var: &str) {
    let Some((value, prefix)) = location(var) else {
        return;
    };
    let store = connect(&value, TIMEOUT).await;
    conformance::features(&store.features(), &prefix).await;
}

async fn segments_conform(var: &str) {
    let Some((value, prefix)) = location(var) else {
        return;
    };
    let store = connect(&value, TIMEOUT).await;
    conformance::segments(&store.segments(), &prefix).await;
}

async fn bandit_conforms(var: &str) {
    let Some((value, prefix)) = location(var) else {
        return;
    };
    let store = connect(&value, TIMEOUT).await;
    conformance::bandit(Arc::new(store.bandit()), &prefix).await;
}

/// Profiles, and data keys with erasure markers (the journal position stays local).
async fn profiles_conform(var: &str) {
    let Some((value, prefix)) = location(var) else {
        return;
    };
    let store = connect(&value, TIMEOUT).await;
    conformance::profiles(&store.profiles(), &prefix).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let local = crate::storage::embedded::open_keyring(dir.path()).expect("keyring");
    conformance::data_keys(&store.data_keys(local.clone()), &prefix).await;
    assert!(
        local.journal_position().await.expect("position").is_some(),
        "the journal position is kept in the local keyring"
    );
}

/// The catalog: content, definitions, experiment totals and API keys.
async fn catalog_conforms(var: &str) {
    let Some((value, prefix)) = location(var) else {
        return;
    };
    let store = connect(&value, TIMEOUT).await;
    conformance::content(&store.content(), &prefix).await;
    conformance::definitions(&store.definitions(), &prefix).await;
    conformance::experiments(Arc::new(store.experiments()), &prefix).await;
    conformance::keys(&store.keys(), &prefix).await;
    conformance::privacy_journal(&store.journal(), &prefix).await;
    let experiments = store.experiments();
    conformance::published_totals(&experiments, &experiments, &prefix).await;

    // Through the local copy's wrappers, as an engine reads them: the same answers.
    let Some((value, prefix)) = location(var) else {
        return;
    };
    let store = connect(&value, TIMEOUT).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let local = EmbeddedStore::open(dir.path())
        .expect("embedded store")
        .stores();
    let copy = CatalogCopy::open(local.definitions, &value)
        .await
        .expect("a copy");
    let content = CopiedContent::new(Arc::new(store.content()), copy.clone());
    let definitions = CopiedDefinitions::new(Arc::new(store.definitions()), copy.clone());
    conformance::content(&content, &prefix).await;
    conformance::definitions(&definitions, &prefix).await;
    assert!(!copy.is_serving(), "Redis answered every read");
}

/// Two engines starting at the same moment on an empty shared catalog: each built-in
/// feature is defined once (one version, active), whichever engine won it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn engines_starting_together_define_each_builtin_once() {
    let Some((value, _prefix)) = location(SINGLE) else {
        return;
    };
    let open = |dir: std::path::PathBuf| {
        let value = value.clone();
        async move {
            let mut settings = Settings {
                data_dir: dir,
                ..Settings::default()
            };
            settings.rules.dir = String::new();
            settings.rules.plugins_dir = String::new();
            settings.backends.definitions = value;
            Engine::open(settings).await.expect("engine opens")
        }
    };
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (first, second) = tokio::join!(open(a.path().into()), open(b.path().into()));
    let store = connect(&value, TIMEOUT).await.definitions();
    for (name, _) in crate::features::definition::builtin() {
        let versions = store
            .versions(crate::storage::DefinitionKind::Feature, name)
            .await
            .expect("versions");
        assert_eq!(versions.len(), 1, "{name}: one version, whoever defined it");
        for engine in [&first, &second] {
            assert_eq!(
                engine.features.catalog().get(name).map(|e| e.active),
                Some(1),
                "{name} is active at version 1 in both engines"
            );
        }
    }
}

/// Shared decisions over a fresh local store of their own.
async fn decisions_conform(var: &str) {
    let Some((value, prefix)) = location(var) else {
        return;
    };
    let store = connect(&value, TIMEOUT).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let local = EmbeddedStore::open(dir.path()).expect("embedded store");
    conformance::decisions(&store.decisions(local.stores().decisions), &prefix).await;
}

/// Two replicas, each with its own local store, over one Redis: a decision made on one
/// is found, counted, capped and exported on the other.
async fn decisions_cross_replicas(var: &str) {
    let Some((value, prefix)) = location(var) else {
        return;
    };
    let store = connect(&value, TIMEOUT).await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let local_a = EmbeddedStore::open(dir_a.path())
        .unwrap()
        .stores()
        .decisions;
    let local_b = EmbeddedStore::open(dir_b.path())
        .unwrap()
        .stores()
        .decisions;
    let a = store.decisions(local_a.clone());
    let b = store.decisions(local_b.clone());
    let customer = customer_id(&format!("{prefix}c"));
    let mut made_on_a = conformance::sample_decision(&format!("{prefix}da"), &customer, 1);
    made_on_a.created_at = chrono::Utc::now();
    let mut made_on_b = conformance::sample_decision(&format!("{prefix}db"), &customer, 2);
    made_on_b.created_at = made_on_a.created_at + chrono::Duration::seconds(1);
    a.put(&made_on_a).await.expect("put on a");
    b.put(&made_on_b).await.expect("put on b");

    assert_eq!(
        b.get(&made_on_a.id).await.unwrap().as_ref(),
        Some(&made_on_a),
        "a replica finds a decision made on another"
    );
    assert_eq!(local_b.get(&made_on_a.id).await.unwrap(), None);
    let first = conformance::sample_outcome(&made_on_a, 0);
    let second = conformance::sample_outcome(&made_on_a, 1);
    assert_eq!(b.put_outcome(&first).await.unwrap(), Some(0));
    assert_eq!(
        a.put_outcome(&second).await.unwrap(),
        Some(1),
        "outcomes count across replicas: the second one knows of the first"
    );
    for replica in [&a, &b] {
        assert_eq!(
            replica.outcomes(&made_on_a.id).await.unwrap(),
            vec![first.clone(), second.clone()]
        );
    }
    // The replica that made the decision keeps the outcome it received in its own log.
    assert_eq!(
        local_a.outcomes(&made_on_a.id).await.unwrap(),
        vec![second.clone()]
    );

    let since = made_on_a.created_at - chrono::Duration::minutes(1);
    for replica in [&a, &b] {
        let shown: Vec<String> = replica
            .impressions(&customer, since, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.item_id)
            .collect();
        assert_eq!(
            shown,
            vec![format!("{prefix}db-item"), format!("{prefix}da-item")],
            "frequency caps see what every replica showed, newest first"
        );
    }
    let exported = b.customer_decisions(&customer).await.unwrap();
    assert_eq!(
        exported
            .iter()
            .map(|(d, o)| (d.id.clone(), o.len()))
            .collect::<Vec<_>>(),
        vec![(made_on_a.id.clone(), 2), (made_on_b.id.clone(), 0)],
        "the export holds the customer's decisions from both replicas, with every outcome"
    );
    // Erasure on one replica reaches the shared copies; the impressions go.
    let pseudonym = format!("{prefix}anon");
    assert_eq!(b.pseudonymise(&customer, &pseudonym).await.unwrap(), 2);
    assert_eq!(
        b.get(&made_on_a.id).await.unwrap().map(|d| d.customer_id),
        Some(customer_id(&pseudonym))
    );
    assert!(b
        .outcomes(&made_on_a.id)
        .await
        .unwrap()
        .iter()
        .all(|o| o.customer_id.as_str() == pseudonym));
    assert!(a
        .impressions(&customer, since, 100)
        .await
        .unwrap()
        .is_empty());
    assert!(b.customer_decisions(&customer).await.unwrap().is_empty());
}

/// Training and evaluation scan every replica's decisions: each replica's scan holds the
/// decisions made on the others, with the outcomes recorded anywhere, in id order and in
/// full pages even where a logged decision is gone from Redis.
async fn decisions_scan_every_replica(var: &str) {
    let Some((value, prefix)) = location(var) else {
        return;
    };
    let store = connect(&value, TIMEOUT).await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = store.decisions(
        EmbeddedStore::open(dir_a.path())
            .unwrap()
            .stores()
            .decisions,
    );
    let b = store.decisions(
        EmbeddedStore::open(dir_b.path())
            .unwrap()
            .stores()
            .decisions,
    );
    let customer = customer_id(&format!("{prefix}c"));
    let made = |name: &str, n: i32| {
        let mut d = conformance::sample_decision(&format!("{prefix}{name}"), &customer, n);
        d.created_at = chrono::Utc::now();
        d
    };
    let (d1, d2, d3, d4) = (made("d1", 1), made("d2", 2), made("d3", 3), made("d4", 4));
    // A decision whose id says it is older than the shared window: its log entry is
    // trimmed as it is written, so only the replica that made it scans it.
    let old_ms = chrono::Utc::now().timestamp_millis() - 31 * 86_400_000;
    let mut old = made("", 0);
    old.id = uuid::Uuid::new_v7(uuid::Timestamp::from_unix(
        uuid::NoContext,
        u64::try_from(old_ms / 1000).unwrap(),
        0,
    ))
    .to_string();
    a.put(&old).await.expect("put an old decision on a");
    assert_eq!(
        a.scan(None, 1)
            .await
            .expect("scan a")
            .first()
            .map(|(d, _)| &d.id),
        Some(&old.id),
        "a has it in its own log"
    );
    assert!(
        b.scan(None, 100)
            .await
            .expect("scan b")
            .iter()
            .all(|(d, _)| d.id != old.id),
        "the shared log no longer lists it"
    );
    a.put(&d1).await.expect("put d1 on a");
    b.put(&d2).await.expect("put d2 on b");
    b.put(&d3).await.expect("put d3 on b");
    a.put(&d4).await.expect("put d4 on a");
    let outcome = conformance::sample_outcome(&d1, 0);
    b.put_outcome(&outcome).await.expect("outcome of d1 on b");

    /// Every decision after `prefix`, paged by `limit` until a short page.
    async fn scan_all(
        replica: &super::decisions::RedisDecisions,
        prefix: &str,
        limit: usize,
    ) -> Vec<(crate::decision::Decision, Vec<crate::decision::Outcome>)> {
        let mut seen = Vec::new();
        let mut after = prefix.to_owned();
        loop {
            let page = replica.scan(Some(&after), limit).await.expect("scan");
            assert!(page.len() <= limit, "at most `limit` decisions");
            let full = page.len() == limit;
            if let Some((last, _)) = page.last() {
                after = last.id.clone();
            }
            seen.extend(page);
            if !full {
                return seen;
            }
        }
    }
    for (name, replica) in [("a", &a), ("b", &b)] {
        for limit in [1, 3, 10] {
            let seen = scan_all(replica, &prefix, limit).await;
            assert_eq!(
                seen,
                vec![
                    (d1.clone(), vec![outcome.clone()]),
                    (d2.clone(), vec![]),
                    (d3.clone(), vec![]),
                    (d4.clone(), vec![]),
                ],
                "replica {name}, pages of {limit}: every replica's decisions, with the outcome recorded on the other"
            );
        }
    }

    // d2's shared copy is gone (as after the window): a still pages in full past it, and
    // b, which made it, still has it.
    let gone = format!("{prefix}decision:{{{prefix}d2}}");
    store
        .call("delete", |mut c| async move {
            redis::cmd("DEL").arg(gone).query_async::<()>(&mut c).await
        })
        .await
        .expect("DEL");
    let ids = |seen: Vec<(crate::decision::Decision, Vec<crate::decision::Outcome>)>| {
        seen.into_iter().map(|(d, _)| d.id).collect::<Vec<_>>()
    };
    assert_eq!(
        ids(scan_all(&a, &prefix, 1).await),
        vec![d1.id.clone(), d3.id.clone(), d4.id.clone()],
        "a skips what Redis no longer holds, and its pages stay full"
    );
    assert_eq!(
        ids(scan_all(&b, &prefix, 2).await),
        vec![d1.id.clone(), d2.id.clone(), d3.id.clone(), d4.id.clone()],
        "b keeps its own decision"
    );
}

/// Feature states read back bit for bit (decisions on the embedded store, which the
/// suite needs beside them).
async fn floats_are_exact(var: &str) {
    let Some((value, prefix)) = location(var) else {
        return;
    };
    let store = connect(&value, TIMEOUT).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let embedded = EmbeddedStore::open(dir.path()).expect("embedded store");
    let stores = embedded.stores();
    conformance::exact_floats(stores.decisions.as_ref(), &store.features(), &prefix).await;
}

async fn claims_conform(var: &str) {
    let Some((value, prefix)) = location(var) else {
        return;
    };
    let store = connect(&value, TIMEOUT).await;
    conformance::event_claims(&store.claims(), &prefix).await;
}

#[tokio::test]
async fn event_claims_conform_on_a_single_server() {
    claims_conform(SINGLE).await;
}

#[tokio::test]
async fn event_claims_conform_on_a_cluster() {
    claims_conform(CLUSTER).await;
}

#[tokio::test]
async fn features_conform_on_a_single_server() {
    features_conform(SINGLE).await;
}

#[tokio::test]
async fn features_conform_on_a_cluster() {
    features_conform(CLUSTER).await;
}

#[tokio::test]
async fn profiles_conform_on_a_single_server() {
    profiles_conform(SINGLE).await;
}

#[tokio::test]
async fn profiles_conform_on_a_cluster() {
    profiles_conform(CLUSTER).await;
}

#[tokio::test]
async fn segments_conform_on_a_single_server() {
    segments_conform(SINGLE).await;
}

#[tokio::test]
async fn segments_conform_on_a_cluster() {
    segments_conform(CLUSTER).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bandit_conforms_on_a_single_server() {
    bandit_conforms(SINGLE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bandit_conforms_on_a_cluster() {
    bandit_conforms(CLUSTER).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn catalog_conforms_on_a_single_server() {
    catalog_conforms(SINGLE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn catalog_conforms_on_a_cluster() {
    catalog_conforms(CLUSTER).await;
}

#[tokio::test]
async fn decisions_scan_every_replica_on_a_single_server() {
    decisions_scan_every_replica(SINGLE).await;
}

#[tokio::test]
async fn decisions_scan_every_replica_on_a_cluster() {
    decisions_scan_every_replica(CLUSTER).await;
}

#[tokio::test]
async fn decisions_conform_on_a_single_server() {
    decisions_conform(SINGLE).await;
}

#[tokio::test]
async fn decisions_conform_on_a_cluster() {
    decisions_conform(CLUSTER).await;
}

#[tokio::test]
async fn decisions_are_shared_between_replicas_on_a_single_server() {
    decisions_cross_replicas(SINGLE).await;
}

#[tokio::test]
async fn decisions_are_shared_between_replicas_on_a_cluster() {
    decisions_cross_replicas(CLUSTER).await;
}

#[tokio::test]
async fn floats_are_exact_on_a_single_server() {
    floats_are_exact(SINGLE).await;
}

#[tokio::test]
async fn floats_are_exact_on_a_cluster() {
    floats_are_exact(CLUSTER).await;
}

/// Values that `HINCRBYFLOAT` would round away (it keeps 17 decimals) add up exactly.
#[tokio::test]
async fn bandit_sums_keep_small_magnitudes() {
    let Some((value, prefix)) = location(SINGLE) else {
        return;
    };
    let bandit = connect(&value, TIMEOUT).await.bandit();
    let placement = format!("{prefix}p");
    let delta = crate::bandit::ArmStats {
        trials: 1e-20,
        reward: 1.0 / 3.0,
    };
    for _ in 0..2 {
        bandit.add(&placement, "a", delta).await.expect("add");
        bandit.flush().await.expect("flush");
    }
    let stats = bandit
        .get(&placement, &["a".to_owned()])
        .await
        .expect("get");
    assert_eq!(stats[0].trials, 2e-20);
    assert_eq!(stats[0].reward, 1.0 / 3.0 + 1.0 / 3.0);
}

/// A call to a server that does not answer fails with `Unavailable` at its deadline
/// instead of waiting; the store works again once the server does.
#[tokio::test]
async fn a_call_to_a_paused_server_fails_at_its_deadline() {
    let Some((value, prefix)) = location(SINGLE) else {
        return;
    };
    let deadline = Duration::from_millis(200);
    let store = connect(&value, deadline).await;
    let features = store.features();
    let customer = customer_id(&format!("{prefix}c"));
    let keys = [crate::features::FeatureKey::new("f", 1)];
    features
        .read(&customer, &keys)
        .await
        .expect("read before the pause");

    // The server stops answering every client for 1.5s (it acknowledges the pause first).
    let pause = Duration::from_millis(1_500);
    let admin = connect(&value, TIMEOUT).await;
    admin
        .call("pause", |mut c| async move {
            redis::cmd("CLIENT")
                .arg("PAUSE")
                .arg(pause.as_millis() as u64)
                .arg("ALL")
                .query_async::<()>(&mut c)
                .await
        })
        .await
        .expect("CLIENT PAUSE");
    let started = Instant::now();
    let result = features.read(&customer, &keys).await;
    let took = started.elapsed();
    assert!(
        matches!(result, Err(StorageError::Unavailable(_))),
        "a call past its deadline must fail as Unavailable, got {result:?}"
    );
    assert!(
        took < deadline + Duration::from_millis(300),
        "the call must return at its deadline ({deadline:?}), took {took:?}"
    );

    // Once the pause ends, calls succeed again (polled, with a deadline).
    let give_up = Instant::now() + pause + Duration::from_secs(10);
    loop {
        match features.read(&customer, &keys).await {
            Ok(states) => {
                assert_eq!(states, vec![None]);
                break;
            }
            // Refused at once while the breaker is open, until its probe succeeds.
            Err(e) if Instant::now() < give_up => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("the store did not recover after the pause: {e}"),
        }
    }
}

/// An engine with features, segments, bandit and decisions on Redis decides, and learns
/// from the outcome: the statistics and the decision are in Redis, seen through a second
/// connection.
async fn engine_learns_through_redis(var: &str) {
    let Some((value, prefix)) = location(var) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut settings = Settings {
        data_dir: dir.path().to_path_buf(),
        ..Settings::default()
    };
    settings.rules.dir = String::new();
    settings.rules.plugins_dir = String::new();
    settings.backends.features = value.clone();
    settings.backends.segments = value.clone();
    settings.backends.bandit = value.clone();
    settings.backends.decisions = value.clone();
    settings.timeouts.backend_ms = TIMEOUT.as_millis() as u64;
    // The decision must not degrade because another test paused the server briefly.
    settings.timeouts.feature_read_ms = TIMEOUT.as_millis() as u64;
    let engine = Engine::open(settings).await.expect("engine opens on Redis");
    // Its background tasks write the bandit statistics behind.
    let background = crate::app::Background::start(&engine);

    let placement = "home";
    for (id, priority) in [("i1", 1), ("i2", 2)] {
        let mut item = sample_content_item(id, priority);
        item.placements = vec![placement.to_owned()];
        item.frequency_cap = None;
        engine.upsert_content(item).await.expect("upsert content");
    }
    let customer = customer_id(&format!("{prefix}c1"));
    let decision = engine
        .decisions
        .personalize(PersonalizeRequest {
            customer_id: customer.clone(),
            placement: Some(placement.to_owned()),
            available_items: None,
            content_type: None,
            context: json!({}),
            count: 1,
            explain: false,
        })
        .await
        .expect("a decision");
    assert!(!decision.degraded, "the decision must not be degraded");
    let shown = decision.items[0].item.id.clone();
    engine
        .decisions
        .record_outcome(&decision.id, 1.0, None, None)
        .await
        .expect("an outcome");

    let observer = connect(&value, TIMEOUT).await.bandit();
    let arms = [shown.clone()];
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = observer.get(placement, &arms).await.expect("bandit read");
        if stats[0].trials >= 1.0 && stats[0].reward >= 1.0 {
            assert_eq!((stats[0].trials, stats[0].reward), (1.0, 1.0));
            break;
        }
        assert!(
            Instant::now() < give_up,
            "the engine did not learn through Redis: {shown} has {:?}",
            stats[0]
        );
        tokio::task::yield_now().await;
    }
    // Another replica (its own local store) finds the decision and its outcome.
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let other = connect(&value, TIMEOUT).await.decisions(
        EmbeddedStore::open(elsewhere.path())
            .expect("embedded store")
            .stores()
            .decisions,
    );
    assert_eq!(
        other.get(&decision.id).await.expect("shared read"),
        Some(decision.clone())
    );
    assert_eq!(
        other.outcomes(&decision.id).await.expect("outcomes").len(),
        1
    );
    // The engine's own stores are the Redis ones.
    let through_engine = engine.stores.bandit.get(placement, &arms).await;
    assert_eq!(
        through_engine.expect("engine bandit read")[0].reward,
        1.0,
        "the engine reads its statistics from Redis"
    );
    background.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_on_a_single_server_decides_and_learns() {
    engine_learns_through_redis(SINGLE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_on_a_cluster_decides_and_learns() {
    engine_learns_through_redis(CLUSTER).await;
}

/// `with_backends` puts on Redis exactly the capabilities that name it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_named_capabilities_move_to_redis() {
    let Some((value, prefix)) = location(SINGLE) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let embedded = EmbeddedStore::open(dir.path()).expect("embedded store");
    let backends = crate::config::Backends {
        features: value.clone(),
        bandit: value.clone(),
        ..Default::default()
    };
    let stores =
        crate::storage::with_backends(embedded.stores(), &backends, TIMEOUT, &Default::default())
            .await
            .expect("stores");
    conformance::features(stores.features.as_ref(), &prefix).await;
    conformance::bandit(stores.bandit.clone(), &prefix).await;
    conformance::segments(stores.segments.as_ref(), &prefix).await;

    let observer = connect(&value, TIMEOUT).await;
    let count = |pattern: String| {
        let observer = observer.clone();
        async move {
            observer
                .call("count keys", |mut c| async move {
                    redis::cmd("KEYS")
                        .arg(pattern)
                        .query_async::<Vec<String>>(&mut c)
                        .await
                })
                .await
                .expect("KEYS")
                .len()
        }
    };
    assert!(
        count(format!("{prefix}customer_features:*")).await > 0,
        "features are on Redis"
    );
    assert!(
        count(format!("{prefix}bandit_arm:*")).await > 0,
        "bandit is on Redis"
    );
    assert_eq!(
        count(format!("{prefix}segment:*")).await,
        0,
        "segments stay embedded when not named"
    );
}

/// Whether a missing prerequisite fails the test (`CI=true`) or skips it.
fn unavailable(reason: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{reason} (CI=true requires it; scripts/test installs it)");
    }
    eprintln!("skipped: {reason} (scripts/test installs it)");
}

/// A Redis server of this test's own, on a fixed port in a scratch directory, with an
/// append-only file fsynced at every write, so that it can be killed, paused and started
/// again at the same address with its data.
struct PrivateRedis {
    binary: std::path::PathBuf,
    port: u16,
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
}

impl PrivateRedis {
    /// `None` (after saying why) when `redis-server` is not on the PATH.
    fn start() -> Option<PrivateRedis> {
        let binary = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("redis-server"))
                .find(|path| path.is_file())
        });
        let Some(binary) = binary else {
            unavailable("redis-server is not on the PATH: no server to stop and restart");
            return None;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut server = PrivateRedis {
            binary,
            port,
            dir: tempfile::tempdir().expect("tempdir"),
            child: None,
        };
        server.resume();
        Some(server)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the process and waits until it answers `PING`.
    fn resume(&mut self) {
        assert!(self.child.is_none(), "the server is running already");
        let child = std::process::Command::new(&self.binary)
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .args(["--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.answers_ping() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer on port {} within 30 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One `PING` over a plain socket (loading the append-only file answers an error).
    fn answers_ping(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut socket) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = socket.set_read_timeout(Some(Duration::from_secs(1)));
        let mut answer = [0u8; 7];
        socket.write_all(b"PING\r\n").is_ok()
            && socket.read_exact(&mut answer).is_ok()
            && &answer == b"+PONG\r\n"
    }

    /// Kills the process (as a crash would) and waits for it to be gone.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP (`true`) or SIGCONT: a server that keeps its connections but answers
    /// nothing, as a stalled one does.
    fn pause(&self, paused: bool) {
        let child = self.child.as_ref().expect("the server is running");
        let pid = libc::pid_t::try_from(child.id()).expect("a pid");
        let signal = if paused { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: signals a child process this test started and has not reaped.
        let sent = unsafe { libc::kill(pid, signal) };
        assert_eq!(sent, 0, "signalling redis-server");
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The value of one sample in a Prometheus text exposition (0 when absent).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The engine's view of its Redis connection's breaker, from its metrics.
struct BreakerView {
    open: bool,
    calls: f64,
    short_circuited: f64,
    degraded: f64,
}

fn breaker_view(engine: &Engine) -> BreakerView {
    let text = engine.metrics.render();
    let labels = r#"backend="redis""#;
    let serves = r#"serves="features,segments,bandit,decisions""#;
    BreakerView {
        open: sample(
            &text,
            &format!("tailor_backend_breaker_open{{{labels},{serves}}}"),
        ) == 1.0,
        calls: sample(
            &text,
            &format!(r#"tailor_backend_calls_total{{{labels},result="ok",{serves}}}"#),
        ) + sample(
            &text,
            &format!(r#"tailor_backend_calls_total{{{labels},result="failed",{serves}}}"#),
        ),
        short_circuited: sample(
            &text,
            &format!("tailor_backend_short_circuited_total{{{labels},{serves}}}"),
        ),
        degraded: sample(&text, "tailor_degraded_decisions_total"),
    }
}

/// Redis killed (SIGKILL) and stalled (SIGSTOP) under an engine that keeps features,
/// segments, bandit statistics and shared decisions there: decisions keep answering within the request
/// deadline, degraded and counted; the breaker opens and stops calling the server;
/// outcomes are still recorded; events acknowledged meanwhile are applied once it is
/// back; and once it is back decisions are whole again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn decisions_survive_a_killed_and_a_stalled_redis() {
    let Some(mut redis) = PrivateRedis::start() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut settings = Settings {
        data_dir: dir.path().to_path_buf(),
        ..Settings::default()
    };
    settings.rules.dir = String::new();
    settings.rules.plugins_dir = String::new();
    settings.backends.features = redis.url();
    settings.backends.segments = redis.url();
    settings.backends.bandit = redis.url();
    settings.backends.decisions = redis.url();
    // Generous for a busy machine: only a server that is really gone fails a call.
    settings.timeouts.backend_ms = 1_000;
    settings.timeouts.feature_read_ms = 5_000;
    settings.breaker.failure_threshold = 3;
    settings.breaker.cool_down_ms = 1_000;
    let request_deadline = Duration::from_millis(settings.timeouts.request_ms);
    let cool_down = settings.breaker.cool_down();
    let engine = Engine::open(settings).await.expect("engine opens on Redis");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    engine.spawn_background(stopped);

    let placement = "home";
    for (id, priority) in [("i1", 1), ("i2", 2)] {
        let mut item = sample_content_item(id, priority);
        item.placements = vec![placement.to_owned()];
        item.frequency_cap = None;
        engine.upsert_content(item).await.expect("upsert content");
    }
    let customer = customer_id("c1");
    let page_view = |n: u32| {
        json!({
            "eventId": format!("view-{n}"),
            "customerId": "c1",
            "type": "page_view",
            "properties": {},
        })
    };
    let page_views = || {
        let engine = engine.clone();
        let customer = customer.clone();
        async move {
            let names = ["page_views_30d".to_owned()];
            let read = engine
                .features
                .read(&customer, Some(&names), "features", chrono::Utc::now())
                .await
                .expect("a feature read");
            (read.values[0].value, read.degraded)
        }
    };
    // A decision, answered within the request deadline whatever Redis does.
    let decide = || {
        let engine = engine.clone();
        let customer = customer.clone();
        async move {
            let request = PersonalizeRequest {
                customer_id: customer,
                placement: Some(placement.to_owned()),
                available_items: None,
                content_type: None,
                context: json!({}),
                count: 1,
                explain: false,
            };
            tokio::time::timeout(request_deadline, engine.decisions.personalize(request))
                .await
                .expect("a decision within the request deadline")
                .expect("a decision, not an error")
        }
    };
    // Decides until `done` holds for a decision and the breaker, for at most 60 s.
    let decide_until = |what: &'static str, done: fn(bool, &BreakerView) -> bool| {
        let engine = engine.clone();
        async move {
            let give_up = Instant::now() + Duration::from_secs(60);
            loop {
                let decision = decide().await;
                let view = breaker_view(&engine);
                if done(decision.degraded, &view) {
                    return decision;
                }
                assert!(
                    Instant::now() < give_up,
                    "{what}: not within 60 s (last decision degraded: {}, breaker open: {})",
                    decision.degraded,
                    view.open
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };

    let report = engine
        .ingestor
        .ingest(vec![page_view(1)])
        .await
        .expect("ingest");
    assert_eq!(report.accepted, 1);
    let give_up = Instant::now() + Duration::from_secs(30);
    while page_views().await != (1.0, false) {
        assert!(Instant::now() < give_up, "the event never reached Redis");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let healthy = decide().await;
    assert!(!healthy.degraded, "a decision on a healthy Redis is whole");
    assert_eq!(healthy.features.get("page_views_30d"), Some(&1.0));
    let before = breaker_view(&engine);
    assert!(!before.open && before.calls > 0.0, "calls reach Redis");

    for fault in ["SIGKILL", "SIGSTOP"] {
        let degraded_before = breaker_view(&engine).degraded;
        if fault == "SIGKILL" {
            redis.kill();
        } else {
            redis.pause(true);
        }

        // Decisions degrade at once and keep answering while the breaker opens.
        let decision = decide().await;
        assert!(
            decision.degraded,
            "{fault}: a decision without Redis is degraded"
        );
        assert!(
            decision.reasoning.contains("degraded"),
            "{fault}: {}",
            decision.reasoning
        );
        decide_until("the breaker opens", |degraded, view| degraded && view.open).await;
        assert!(
            breaker_view(&engine).degraded > degraded_before,
            "{fault}: degraded decisions are counted"
        );

        // Open: decisions fail over without calling Redis, except the breaker's probes
        // (one per cool-down) and calls that were under way when it opened.
        let open = breaker_view(&engine);
        let started = Instant::now();
        for _ in 0..20 {
            let decision = decide().await;
            assert!(decision.degraded, "{fault}: still degraded while open");
            assert_eq!(
                decision.features.get("page_views_30d"),
                Some(&0.0),
                "{fault}: features default while Redis is away"
            );
        }
        let after = breaker_view(&engine);
        let probes = (started.elapsed().as_secs_f64() / cool_down.as_secs_f64()).ceil() + 1.0;
        assert!(
            after.short_circuited >= open.short_circuited + 20.0,
            "{fault}: each decision's calls were refused at once: {} → {}",
            open.short_circuited,
            after.short_circuited
        );
        assert!(
            after.calls - open.calls <= probes + 3.0,
            "{fault}: the open breaker kept calling Redis: {} calls for at most {probes} probes",
            after.calls - open.calls
        );

        // An outcome is stored and acknowledged though the bandit cannot learn from it.
        if fault == "SIGKILL" {
            engine
                .decisions
                .record_outcome(&healthy.id, 1.0, None, None)
                .await
                .expect("an outcome is acknowledged while Redis is away");
            let stored = engine
                .stores
                .decisions
                .outcomes(&healthy.id)
                .await
                .expect("outcomes");
            assert_eq!(stored.len(), 1, "the outcome is stored");
        }

        // An event acknowledged while Redis is away is applied once it is back.
        let n = if fault == "SIGKILL" { 2 } else { 3 };
        let report = engine
            .ingestor
            .ingest(vec![page_view(n)])
            .await
            .expect("an event is acknowledged while Redis is away");
        assert_eq!(report.accepted, 1, "{fault}: the event is accepted");

        if fault == "SIGKILL" {
            redis.resume();
        } else {
            redis.pause(false);
        }
        let whole = decide_until("decisions are whole again", |degraded, view| {
            !degraded && !view.open
        })
        .await;
        // What Redis kept through the fault (its append-only file), not defaults: the event
        // acknowledged during the outage may not be applied yet.
        let views = whole.features.get("page_views_30d").copied().unwrap_or(0.0);
        assert!(
            views >= f64::from(n - 1),
            "{fault}: the features come back from Redis, got {views} page views"
        );
        let give_up = Instant::now() + Duration::from_secs(60);
        loop {
            let (views, degraded) = page_views().await;
            if !degraded && views == f64::from(n) {
                break;
            }
            assert!(
                Instant::now() < give_up,
                "{fault}: the event acknowledged during the outage was not applied: {views} page views"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // The bandit learned from the outcome recorded while Redis was killed, once: the
    // reward was held and written when it came back, and the retries of batches that
    // timed out against the stalled server counted nothing twice.
    let arms = ["i1".to_owned(), "i2".to_owned()];
    let rewards = || {
        let (engine, arms) = (engine.clone(), arms.clone());
        async move {
            engine
                .stores
                .bandit
                .get(placement, &arms)
                .await
                .map(|stats| stats.iter().map(|s| s.reward).sum::<f64>())
                .unwrap_or(-1.0)
        }
    };
    let give_up = Instant::now() + Duration::from_secs(30);
    while rewards().await != 1.0 {
        assert!(
            Instant::now() < give_up,
            "the outcome recorded during the outage never reached the bandit: {}",
            rewards().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rewards().await, 1.0, "the reward is counted once");
    let _ = stop.send(true);
}

/// Settings of an engine with every shared capability (the catalog included) on `url`,
/// in `dir`, with deadlines generous for a busy machine and a breaker that opens fast.
fn shared_settings(url: &str, dir: &std::path::Path) -> Settings {
    let mut settings = Settings {
        data_dir: dir.to_path_buf(),
        ..Settings::default()
    };
    settings.rules.dir = String::new();
    settings.rules.plugins_dir = String::new();
    settings.backends.features = url.to_owned();
    settings.backends.segments = url.to_owned();
    settings.backends.bandit = url.to_owned();
    settings.backends.decisions = url.to_owned();
    settings.backends.definitions = url.to_owned();
    settings.timeouts.backend_ms = 1_000;
    settings.timeouts.feature_read_ms = 5_000;
    settings.breaker.failure_threshold = 3;
    settings.breaker.cool_down_ms = 500;
    settings
}

/// One decision for customer `c1` on `placement`, within the request deadline.
async fn decide_on(
    engine: &Engine,
    placement: &str,
) -> crate::error::Result<crate::decision::Decision> {
    let request = PersonalizeRequest {
        customer_id: customer_id("c1"),
        placement: Some(placement.to_owned()),
        available_items: None,
        content_type: None,
        context: json!({}),
        count: 1,
        explain: false,
    };
    let deadline = Duration::from_millis(engine.settings.timeouts.request_ms);
    tokio::time::timeout(deadline, engine.decisions.personalize(request))
        .await
        .expect("a decision (or its error) within the request deadline")
}

/// What `/readyz` answers: status and body.
async fn readiness(engine: &Arc<Engine>) -> (u16, String) {
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;
    let request = axum::http::Request::get("/readyz")
        .body(axum::body::Body::empty())
        .expect("a request");
    let response = crate::api::router(engine.clone())
        .oneshot(request)
        .await
        .expect("an answer");
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("a body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A replica restarted while Redis (its shared catalog included) is down, killed
/// (SIGKILL: connections refused) or stalled (SIGSTOP: connections hang): it starts on
/// the local copy of the catalog its previous run saved and decides from it, degraded,
/// saying so in `/readyz`; once Redis is back (same port, same data: its append-only
/// file) its answers are whole again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_engine_starts_while_redis_is_down_from_its_local_catalog_copy() {
    let Some(mut redis) = PrivateRedis::start() else {
        return;
    };
    let placement = "home";
    for fault in ["SIGKILL", "SIGSTOP"] {
        let dir = tempfile::tempdir().expect("tempdir");
        // Every decision is an exposure of this experiment, counted once whatever Redis
        // did meanwhile.
        let experiment = format!("outage-{}", &fault[3..].to_lowercase());
        let mut decided = 0u64;

        // First run, Redis up: the shared catalog gets content, an experiment and the
        // built-in features, and the local copy is saved (at open, by the reload task,
        // and at its shutdown).
        {
            let engine = Engine::open(shared_settings(&redis.url(), dir.path()))
                .await
                .expect("engine opens on Redis");
            let background = crate::app::Background::start(&engine);
            for (id, priority) in [("i1", 1), ("i2", 2)] {
                let mut item = sample_content_item(id, priority);
                item.placements = vec![placement.to_owned()];
                item.frequency_cap = None;
                engine.upsert_content(item).await.expect("upsert content");
            }
            let mut input = crate::demo::experiment();
            input.key = experiment.clone();
            engine
                .experiments
                .create(input, &|_| true)
                .await
                .expect("an experiment");
            engine
                .experiments
                .set_status(&experiment, crate::experiments::Status::Running)
                .await
                .expect("it runs");
            let decision = decide_on(&engine, placement).await.expect("a decision");
            decided += 1;
            assert!(
                !decision.degraded,
                "{fault}: a decision on a healthy Redis is whole"
            );
            assert_eq!(readiness(&engine).await, (200, "ready".to_owned()));
            background.stop().await;
        }

        // Redis goes away; the replica restarts.
        if fault == "SIGKILL" {
            redis.kill();
        } else {
            redis.pause(true);
        }
        let engine = Engine::open(shared_settings(&redis.url(), dir.path()))
            .await
            .expect("the engine opens while Redis is down");
        let background = crate::app::Background::start(&engine);
        assert!(
            engine.features.catalog().get("page_views_30d").is_some(),
            "{fault}: the feature definitions come from the local copy"
        );
        let decision = decide_on(&engine, placement)
            .await
            .expect("a decision while Redis is down, not an error");
        decided += 1;
        assert!(
            decision.degraded,
            "{fault}: a decision without Redis is degraded"
        );
        assert!(
            decision
                .experiments
                .iter()
                .any(|a| a.experiment == experiment),
            "{fault}: the experiment assigns from the local copy"
        );
        assert!(
            ["i1", "i2"].contains(&decision.items[0].item.id.as_str()),
            "{fault}: the candidates come from the local copy: {:?}",
            decision.items
        );
        let (status, body) = readiness(&engine).await;
        assert_eq!(status, 200, "{fault}: up while Redis is down: {body}");
        assert!(
            body.starts_with("ready, degraded: redis (")
                && body.contains("unreachable")
                && body.contains("catalog served from the local copy"),
            "{fault}: {body}"
        );

        // Redis is back with its data: decisions become whole within a few seconds.
        if fault == "SIGKILL" {
            redis.resume();
        } else {
            redis.pause(false);
        }
        let give_up = Instant::now() + Duration::from_secs(60);
        loop {
            let decision = decide_on(&engine, placement).await.expect("a decision");
            decided += 1;
            if !decision.degraded {
                break;
            }
            assert!(
                Instant::now() < give_up,
                "{fault}: decisions are still degraded 60 s after Redis came back: {}",
                decision.reasoning
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let give_up = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, body) = readiness(&engine).await;
            if (status, body.as_str()) == (200, "ready") {
                break;
            }
            assert!(
                Instant::now() < give_up,
                "{fault}: still not plainly ready: {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Exposures counted while Redis was away are neither lost nor, though some
        // publications failed or timed out, counted twice; so also after the stop's
        // last publication.
        let exposures = |engine: Arc<Engine>| {
            let experiment = experiment.clone();
            async move {
                let results = engine
                    .experiments
                    .results(&experiment)
                    .await
                    .expect("results")
                    .expect("the experiment");
                results
                    .variants
                    .iter()
                    .map(|v| v.summary.exposures)
                    .sum::<u64>()
            }
        };
        assert_eq!(exposures(engine.clone()).await, decided, "{fault}");
        background.stop().await;
        drop(engine);
        let elsewhere = tempfile::tempdir().expect("tempdir");
        let other = Engine::open(shared_settings(&redis.url(), elsewhere.path()))
            .await
            .expect("another process opens");
        assert_eq!(
            exposures(other).await,
            decided,
            "{fault}: another process reads them all from what was published"
        );
    }
}

/// A first start with neither Redis nor a local copy: the engine starts, decisions fail
/// with a clear error (the catalog is empty) rather than the process; once Redis
/// answers, the built-in features get defined there and content written there is
/// decided on, whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_engine_starts_without_redis_or_a_local_copy() {
    let Some(mut redis) = PrivateRedis::start() else {
        return;
    };
    redis.kill();
    let dir = tempfile::tempdir().expect("tempdir");
    let placement = "home";
    let engine = Engine::open(shared_settings(&redis.url(), dir.path()))
        .await
        .expect("the engine opens with no Redis and no local copy");
    let background = crate::app::Background::start(&engine);
    let refused = decide_on(&engine, placement)
        .await
        .expect_err("nothing to decide on");
    assert!(
        refused.to_string().contains("no eligible content"),
        "{refused}"
    );
    let (status, body) = readiness(&engine).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.starts_with("ready, degraded: redis (")
            && body.contains("catalog unreachable and no local copy yet"),
        "{body}"
    );

    redis.resume();
    let store = connect(&redis.url(), TIMEOUT).await.definitions();
    let give_up = Instant::now() + Duration::from_secs(60);
    loop {
        let defined = store
            .versions(crate::storage::DefinitionKind::Feature, "page_views_30d")
            .await
            .expect("versions");
        if defined.len() == 1 && engine.features.catalog().get("page_views_30d").is_some() {
            break;
        }
        assert!(
            Instant::now() < give_up,
            "the built-in features were not defined within 60 s of Redis coming back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut item = sample_content_item("i1", 1);
    item.placements = vec![placement.to_owned()];
    item.frequency_cap = None;
    engine.upsert_content(item).await.expect("upsert content");
    let give_up = Instant::now() + Duration::from_secs(60);
    loop {
        match decide_on(&engine, placement).await {
            Ok(decision) if !decision.degraded => break,
            outcome => assert!(
                Instant::now() < give_up,
                "no whole decision within 60 s of Redis coming back: {outcome:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    background.stop().await;
}

/// API keys on Redis while it is down: a key this process verified keeps verifying past
/// its cache's lifetime (from its last verified record), a key it never verified is
/// refused (fail closed) until Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_fail_closed_while_redis_is_down() {
    let Some(mut redis) = PrivateRedis::start() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(shared_settings(&redis.url(), dir.path()))
        .await
        .expect("engine opens on Redis");
    let role = crate::auth::Role::Frontend;
    let known = engine.keys.create(role, None, "name").await.expect("a key");
    let unknown = engine.keys.create(role, None, "name").await.expect("a key");
    let verifies = |key: &crate::auth::keys::IssuedKey| {
        let (engine, text) = (engine.clone(), key.key.expose().to_owned());
        async move { matches!(engine.keys.verify(&text).await, Ok(Ok(_))) }
    };
    assert!(verifies(&known).await);

    redis.kill();
    let past_the_cache = Instant::now() + crate::auth::keys::CACHE_TTL + Duration::from_secs(1);
    while Instant::now() < past_the_cache {
        assert!(
            verifies(&known).await,
            "a key verified before keeps verifying while Redis is down"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        engine.keys.verify(unknown.key.expose()).await.is_err(),
        "a key never verified here cannot be checked: refused"
    );
    // Refused as unavailable (503, worth a retry), not as an internal error.
    let bearer = format!("Bearer {}", unknown.key.expose());
    let caller = engine.keys.caller(Some(&bearer)).await;
    assert!(
        matches!(caller, crate::auth::Caller::KeyStoreUnavailable(_)),
        "{caller:?}"
    );

    redis.resume();
    let give_up = Instant::now() + Duration::from_secs(60);
    while !verifies(&unknown).await {
        assert!(
            Instant::now() < give_up,
            "the other key does not verify 60 s after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Profiles on Redis (`backends.profiles`), their server killed: a decision goes on
/// without the profile, marked degraded; events and profile writes are refused as
/// unavailable (their consent and erasure cannot be checked) rather than taken unchecked;
/// once the server is back, the profile written before the outage reads again, decrypted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn profiles_on_a_killed_redis_degrade_decisions_and_refuse_writes() {
    let Some(mut redis) = PrivateRedis::start() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let key_file = dir.path().join("master.key");
    std::fs::write(&key_file, "5a".repeat(32)).expect("key file");
    let mut settings = Settings {
        data_dir: dir.path().join("data"),
        ..Settings::default()
    };
    settings.rules.dir = String::new();
    settings.rules.plugins_dir = String::new();
    settings.backends.profiles = redis.url();
    settings.encryption.key_file = key_file.display().to_string();
    settings.timeouts.backend_ms = 1_000;
    settings.breaker.failure_threshold = 3;
    settings.breaker.cool_down_ms = 500;
    let engine = Engine::open(settings).await.expect("engine opens on Redis");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    engine.spawn_background(stopped);
    for (id, priority) in [("i1", 1), ("i2", 2)] {
        let mut item = sample_content_item(id, priority);
        item.placements = vec!["home".to_owned()];
        item.frequency_cap = None;
        engine.upsert_content(item).await.expect("upsert content");
    }
    let now = chrono::Utc::now();
    let customer = crate::customers::Customer {
        id: customer_id("c1"),
        traits: serde_json::Map::new(),
        pii: crate::customers::Pii {
            email: Some("c1@example.com".into()),
            ..Default::default()
        },
        consent: Default::default(),
        created_at: now,
        updated_at: now,
    };
    engine
        .profiles
        .put(&customer)
        .await
        .expect("profile stored");
    let healthy = decide_on(&engine, "home").await.expect("a decision");
    assert!(!healthy.degraded, "a decision with Redis up is whole");
    let event =
        |n: u32| json!({"eventId": format!("e{n}"), "customerId": "c1", "type": "page_view"});

    redis.kill();
    let decision = decide_on(&engine, "home")
        .await
        .expect("a decision without the profile's Redis");
    assert!(
        decision.degraded,
        "a decision without its profile is degraded"
    );
    let refused = engine
        .ingestor
        .ingest(vec![event(1)])
        .await
        .expect_err("events are not taken unchecked");
    assert!(refused.is_unavailable(), "{refused}");
    let refused = engine
        .profiles
        .put(&customer)
        .await
        .expect_err("profile writes fail");
    assert!(matches!(refused, StorageError::Unavailable(_)), "{refused}");

    redis.resume();
    let give_up = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(d) = decide_on(&engine, "home").await {
            if !d.degraded {
                break;
            }
        }
        assert!(
            Instant::now() < give_up,
            "decisions never became whole again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let read = engine
        .customer(&customer_id("c1"))
        .await
        .expect("a read")
        .expect("the profile survived the outage");
    assert_eq!(read.pii.email.as_deref(), Some("c1@example.com"));
    let report = engine
        .ingestor
        .ingest(vec![event(2)])
        .await
        .expect("ingest");
    assert_eq!(report.accepted, 1, "events are taken again");
    let _ = stop.send(true);
}

/// A state written with a stream position older than the stored one, in the same
/// partition, is not written: a worker that lost its partitions and writes late does not
/// undo what the new owner wrote. A new partition, or a state without a position, is
/// written; dropping the version forgets the position too.
async fn stale_feature_writes_are_fenced(var: &str) {
    let Some((value, prefix)) = location(var) else {
        return;
    };
    let store = connect(&value, TIMEOUT).await;
    let features = store.features();
    let customer = customer_id(&format!("{prefix}fenced"));
    let key = crate::features::FeatureKey::new("views", 1);
    let state = |n: u64, at: Option<(i32, i64)>| {
        let mut s = conformance::sample_feature_state(n);
        s.applied_position =
            at.map(|(partition, offset)| crate::events::StreamPosition { partition, offset });
        s
    };
    let write = |s: crate::features::FeatureState| {
        let (features, customer, key) = (&features, &customer, &key);
        async move {
            features
                .write(vec![(customer.clone(), key.clone(), s)])
                .await
                .expect("write");
        }
    };
    let read = || async {
        features
            .read(&customer, std::slice::from_ref(&key))
            .await
            .expect("read")
            .pop()
            .flatten()
    };
    let steps = [
        (state(1, Some((1, 100))), true, "first"),
        (state(2, Some((1, 99))), false, "older, same partition"),
        (state(3, Some((1, 100))), true, "the same position"),
        (
            state(4, Some((1, 10_000_000_000))),
            true,
            "newer, a longer offset",
        ),
        (
            state(5, Some((1, 9_999_999_999))),
            false,
            "older, a shorter offset",
        ),
        (state(6, Some((2, 0))), true, "another partition"),
        (state(7, None), true, "no position"),
        (state(8, Some((2, 0))), true, "a position after none"),
    ];
    let mut expected = None;
    for (s, taken, what) in steps {
        write(s.clone()).await;
        if taken {
            expected = Some(s);
        }
        assert_eq!(read().await, expected, "{what}");
    }
    features.delete_key(&key).await.expect("drop the version");
    assert_eq!(read().await, None);
    let fresh = state(9, Some((2, -1)));
    write(fresh.clone()).await;
    assert_eq!(
        read().await,
        Some(fresh),
        "the dropped version's position is gone"
    );
}

#[tokio::test]
async fn stale_feature_writes_are_fenced_on_a_single_server() {
    stale_feature_writes_are_fenced(SINGLE).await;
}

#[tokio::test]
async fn stale_feature_writes_are_fenced_on_a_cluster() {
    stale_feature_writes_are_fenced(CLUSTER).await;
}
