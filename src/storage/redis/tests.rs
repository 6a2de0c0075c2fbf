//! Tests of the Redis backend against real servers: the conformance suites on a single
//! server and on a cluster, the per-call deadline, and an engine that decides and learns
//! through Redis.
//!
//! The servers come from the environment (`scripts/test` starts them on free ports):
//! `REDIS_URL` (`redis://host:port`) and `REDIS_CLUSTER_URL`
//! (`redis+cluster://host:port,...`). Without them a test fails when `CI=true` and is
//! skipped with its reason otherwise. Each test works under a fresh key prefix.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::{RedisConfig, RedisStore};
use crate::app::Engine;
use crate::config::Settings;
use crate::decision::pipeline::PersonalizeRequest;
use crate::storage::conformance::{self, customer_id, sample_content_item};
use crate::storage::embedded::EmbeddedStore;
use crate::storage::{BanditStore, FeatureStore, StorageError};

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

#[tokio::test]
async fn features_conform_on_a_single_server() {
    features_conform(SINGLE).await;
}

#[tokio::test]
async fn features_conform_on_a_cluster() {
    features_conform(CLUSTER).await;
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
            Err(e) if Instant::now() < give_up => {
                let _ = e;
                tokio::task::yield_now().await;
            }
            Err(e) => panic!("the store did not recover after the pause: {e}"),
        }
    }
}

/// An engine with features, segments and bandit on Redis decides, and learns from the
/// outcome: the statistics are in Redis, seen through a second connection.
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
    settings.timeouts.backend_ms = TIMEOUT.as_millis() as u64;
    // The decision must not degrade because another test paused the server briefly.
    settings.timeouts.feature_read_ms = TIMEOUT.as_millis() as u64;
    let engine = Engine::open(settings).await.expect("engine opens on Redis");

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
    // The engine's own stores are the Redis ones.
    let through_engine = engine.stores.bandit.get(placement, &arms).await;
    assert_eq!(
        through_engine.expect("engine bandit read")[0].reward,
        1.0,
        "the engine reads its statistics from Redis"
    );
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
    let stores = crate::storage::with_backends(embedded.stores(), &backends, TIMEOUT)
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
