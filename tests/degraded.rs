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

#[tokio::test]
async fn a_slow_feature_backend_gives_degraded_decisions_within_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings {
        data_dir: dir.path().to_path_buf(),
        ..Settings::default()
    };
    settings.rules.dir = String::new();
    settings.timeouts.feature_read_ms = 20;
    let mut stores = EmbeddedStore::open(dir.path()).unwrap().stores();
    let slow = Arc::new(Slow {
        inner: stores.features.clone(),
        delay: parking_lot::Mutex::new(Duration::ZERO),
    });
    stores.features = slow.clone();
    let engine = Engine::with_stores(settings, stores).await.unwrap();
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
