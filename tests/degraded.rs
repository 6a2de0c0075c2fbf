//! A slow feature backend degrades decisions instead of failing them.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use tailor::app::Engine;
use tailor::config::Settings;
use tailor::customers::CustomerId;
use tailor::decision::pipeline::PersonalizeRequest;
use tailor::features::{FeatureKey, FeatureState};
use tailor::storage::embedded::EmbeddedStore;
use tailor::storage::{FeatureStore, StorageResult};

/// The embedded feature store behind a switchable delay.
struct Slow {
    inner: Arc<dyn FeatureStore>,
    delay: parking_lot::Mutex<Duration>,
}

#[async_trait]
impl FeatureStore for Slow {
    async fn read(
        &self,
        customer: &CustomerId,
        keys: &[FeatureKey],
    ) -> StorageResult<Vec<Option<FeatureState>>> {
        let delay = *self.delay.lock();
        tokio::time::sleep(delay).await;
        self.inner.read(customer, keys).await
    }
    async fn write(
        &self,
        updates: Vec<(CustomerId, FeatureKey, FeatureState)>,
    ) -> StorageResult<()> {
        self.inner.write(updates).await
    }
    async fn delete_customer(&self, customer: &CustomerId) -> StorageResult<()> {
        self.inner.delete_customer(customer).await
    }
    async fn delete_key(&self, key: &FeatureKey) -> StorageResult<()> {
        self.inner.delete_key(key).await
    }
    async fn backfilled_partitions(&self, key: &FeatureKey) -> StorageResult<BTreeSet<i32>> {
        self.inner.backfilled_partitions(key).await
    }
    async fn mark_backfilled(&self, key: &FeatureKey, partition: i32) -> StorageResult<()> {
        self.inner.mark_backfilled(key, partition).await
    }
}

/// An engine on `dir` without rules, whose feature store is behind [`Slow`] (no delay
/// yet) and whose feature reads give up after 20 ms; `tweak` changes the rest.
async fn engine_with_slow_features(
    dir: &std::path::Path,
    tweak: impl FnOnce(&mut Settings),
) -> (Arc<Engine>, Arc<Slow>) {
    let mut settings = Settings {
        data_dir: dir.to_path_buf(),
        ..Settings::default()
    };
    settings.rules.dir = String::new();
    settings.timeouts.feature_read_ms = 20;
    tweak(&mut settings);
    let mut stores = EmbeddedStore::open(dir).unwrap().stores();
    let slow = Arc::new(Slow {
        inner: stores.features.clone(),
        delay: parking_lot::Mutex::new(Duration::ZERO),
    });
    stores.features = slow.clone();
    (Engine::with_stores(settings, stores).await.unwrap(), slow)
}

#[tokio::test]
async fn a_slow_feature_backend_gives_degraded_decisions_within_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, slow) = engine_with_slow_features(dir.path(), |_| {}).await;
    engine
        .upsert_content(
            serde_json::from_value(json!({"id": "x", "type": "banner", "placements": ["hero"]}))
                .unwrap(),
        )
        .await
        .unwrap();
    let request = || PersonalizeRequest {
        customer_id: CustomerId::parse("c", "c1").unwrap(),
        placement: Some("hero".into()),
        available_items: None,
        content_type: None,
        context: json!({}),
        count: 1,
        explain: false,
    };

    let healthy = engine.decisions.personalize(request()).await.unwrap();
    assert!(!healthy.degraded);

    *slow.delay.lock() = Duration::from_secs(5);
    let started = std::time::Instant::now();
    let degraded = engine.decisions.personalize(request()).await.unwrap();
    assert!(degraded.degraded);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered at the deadline, not after the backend"
    );
    assert!(
        degraded.reasoning.contains("degraded"),
        "{}",
        degraded.reasoning
    );
    assert_eq!(
        degraded.features.get("engagement_score"),
        Some(&0.0),
        "defaults are used"
    );
    assert!(engine
        .metrics
        .render()
        .contains("tailor_degraded_decisions_total"));
}

/// Segment membership is never decided on default values: while the feature backend
/// misses its deadline, a refresh of the segments that slide with time fails (and is
/// tried again at the next), and the members stay members.
#[tokio::test]
async fn a_slow_feature_backend_leaves_segment_membership_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    // No processor runs here: ingestion does not wait for one.
    let (engine, slow) =
        engine_with_slow_features(dir.path(), |s| s.timeouts.ingest_apply_ms = 0).await;
    engine
        .features
        .define(
            "views_30d",
            json!({"kind": "count", "event_type": "page_view", "window": "30d"}),
        )
        .await
        .unwrap();
    engine
        .segments
        .define(
            "viewers",
            &json!({"feature": "views_30d", "op": "gte", "value": 1}),
            None,
        )
        .await
        .unwrap();
    let report = engine
        .ingestor
        .ingest(vec![json!({"customerId": "c1", "type": "page_view"})])
        .await
        .unwrap();
    assert_eq!(report.accepted, 1);
    while engine.processor.step().await.unwrap() > 0 {}
    let c1 = CustomerId::parse("c", "c1").unwrap();
    let member = || async {
        engine
            .stores
            .segments
            .contains("viewers", &c1)
            .await
            .unwrap()
    };
    assert!(member().await, "c1 viewed a page");
    engine.segments.refresh_time_dependent().await.unwrap();
    assert!(member().await, "still a member after a refresh");

    *slow.delay.lock() = Duration::from_secs(5);
    let refresh = engine.segments.refresh_time_dependent().await;
    assert!(
        refresh.as_ref().is_err_and(|e| e.is_unavailable()),
        "{refresh:?}"
    );
    assert!(member().await, "not evicted on a default value");
}
