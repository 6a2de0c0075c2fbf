//! A copy of something every decision reads (the catalog, the running experiments), kept
//! in memory: dropped when this process changes the original, and reloaded after its time
//! to live so changes made by another replica show within it.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;

pub struct Snapshot<T> {
    ttl: Duration,
    /// A std lock: held only to clone or replace the `Arc`, never across an await.
    copy: RwLock<Option<(Instant, Arc<T>)>>,
}

impl<T> Snapshot<T> {
    pub fn new(ttl: Duration) -> Self {
        Snapshot {
            ttl,
            copy: RwLock::new(None),
        }
    }

    /// The copy when it is younger than the time to live, else what `load` returns (kept
    /// as the new copy). Concurrent callers may each load once after it expires.
    pub async fn get_or_load<E, F>(&self, load: impl FnOnce() -> F) -> Result<Arc<T>, E>
    where
        F: Future<Output = Result<T, E>>,
    {
        if let Some((at, copy)) = self.copy.read().as_ref() {
            if at.elapsed() < self.ttl {
                return Ok(copy.clone());
            }
        }
        let copy = Arc::new(load().await?);
        *self.copy.write() = Some((Instant::now(), copy.clone()));
        Ok(copy)
    }

    /// Drops the copy: the next read loads afresh.
    pub fn invalidate(&self) {
        *self.copy.write() = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn loads_once_until_invalidated_or_expired() {
        let loads = AtomicU32::new(0);
        let load = || async { Ok::<_, ()>(loads.fetch_add(1, Ordering::SeqCst) + 1) };
        let kept = Snapshot::new(Duration::from_secs(3600));
        assert_eq!(*kept.get_or_load(load).await.unwrap(), 1);
        assert_eq!(*kept.get_or_load(load).await.unwrap(), 1, "still fresh");
        kept.invalidate();
        assert_eq!(*kept.get_or_load(load).await.unwrap(), 2);
        let expiring = Snapshot::new(Duration::ZERO);
        assert_eq!(*expiring.get_or_load(load).await.unwrap(), 3);
        assert_eq!(
            *expiring.get_or_load(load).await.unwrap(),
            4,
            "expired at once"
        );
        assert_eq!(
            kept.get_or_load(|| async { Err::<u32, _>("down") })
                .await
                .unwrap(),
            Arc::new(2)
        );
    }
}
