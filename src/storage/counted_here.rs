//! Experiment totals of a deployment whose processes share a catalog: each process
//! counts its exposures and conversions in its own store, durably and at once, and
//! publishes its totals to the shared store as absolute figures under its own id
//! ([`PublishedTotals`]); results add up every process's figures.
//!
//! Counting here first means a decision never waits for the shared store to count, and
//! an outage loses nothing: what was counted meanwhile is published once the store
//! answers. Publishing absolute figures means a publication that timed out (and may or
//! may not have been applied) is simply sent again: it sets the same values, so nothing
//! is counted twice, which adding a delta again could not promise.
//!
//! The process id is a random id created with the local store and kept in it (a
//! [`DefinitionKind::Process`] record), so that a restarted process publishes under the
//! same id the totals its store still holds. A process whose data directory is lost
//! takes its unpublished counts with it; its published ones stay.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use async_trait::async_trait;

use crate::experiments::VariantTotals;
use crate::storage::{
    DefinitionKind, DefinitionStore, ExperimentStore, PublishedTotals, StorageError, StorageResult,
};

/// The name of the process id's record.
const PROCESS_ID: &str = "id";

/// [`ExperimentStore`] that counts in this process's store and publishes to a shared one.
pub struct CountedHere {
    local: Arc<dyn ExperimentStore>,
    shared: Arc<dyn PublishedTotals>,
    process: String,
    /// What was last published, per (experiment, variant).
    published: parking_lot::Mutex<HashMap<(String, String), VariantTotals>>,
    /// One publication at a time.
    publishing: tokio::sync::Mutex<()>,
}

impl CountedHere {
    /// Counts in `local`, publishes to `shared`; the process id is read from (or, the
    /// first time, created in) `local_definitions`.
    pub async fn open(
        local: Arc<dyn ExperimentStore>,
        local_definitions: Arc<dyn DefinitionStore>,
        shared: Arc<dyn PublishedTotals>,
    ) -> StorageResult<Arc<CountedHere>> {
        let fresh = uuid::Uuid::now_v7().simple().to_string();
        local_definitions
            .put_first(
                DefinitionKind::Process,
                PROCESS_ID,
                serde_json::Value::String(fresh),
            )
            .await?;
        let stored = local_definitions
            .get(DefinitionKind::Process, PROCESS_ID, None)
            .await?;
        let Some(serde_json::Value::String(process)) = stored.map(|d| d.body) else {
            return Err(StorageError::Corrupt(
                "this process's id is missing or not a string".into(),
            ));
        };
        Ok(Arc::new(CountedHere {
            local,
            shared,
            process,
            published: parking_lot::Mutex::default(),
            publishing: tokio::sync::Mutex::new(()),
        }))
    }

    /// The id this process publishes under.
    pub fn process(&self) -> &str {
        &self.process
    }

    /// Publishes this process's totals of `experiments` that changed since they were
    /// last published (all of them, the first time); returns how many (experiment,
    /// variant) totals it sent. A failed publication is sent again by the next call.
    pub async fn publish(&self, experiments: &[String]) -> StorageResult<usize> {
        let _publishing = self.publishing.lock().await;
        let mut changed = Vec::new();
        for experiment in experiments {
            for (variant, totals) in self.local.totals(experiment).await? {
                let key = (experiment.clone(), variant);
                if self.published.lock().get(&key) != Some(&totals) {
                    changed.push((key.0, key.1, totals));
                }
            }
        }
        if changed.is_empty() {
            return Ok(0);
        }
        self.shared.publish(&self.process, &changed).await?;
        let mut published = self.published.lock();
        for (experiment, variant, totals) in &changed {
            published.insert((experiment.clone(), variant.clone()), *totals);
        }
        Ok(changed.len())
    }
}

#[async_trait]
impl ExperimentStore for CountedHere {
    async fn add(&self, deltas: &[(String, String, VariantTotals)]) -> StorageResult<()> {
        self.local.add(deltas).await
    }

    /// Every other process's published totals and this one's own, which may not be
    /// published yet.
    async fn totals(&self, experiment: &str) -> StorageResult<Vec<(String, VariantTotals)>> {
        let (others, own) = tokio::try_join!(
            self.shared.totals_except(experiment, &self.process),
            self.local.totals(experiment),
        )?;
        let mut sum: BTreeMap<String, VariantTotals> = others.into_iter().collect();
        for (variant, totals) in own {
            sum.entry(variant).or_default().merge(totals);
        }
        Ok(sum.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::embedded::EmbeddedStore;

    /// A shared store in memory that may fail a publication before or after applying it,
    /// as a timed-out network call can.
    #[derive(Default)]
    struct Shared {
        by_process: parking_lot::Mutex<BTreeMap<(String, String, String), VariantTotals>>,
        fail: parking_lot::Mutex<Vec<bool>>,
    }

    #[async_trait]
    impl PublishedTotals for Shared {
        async fn publish(
            &self,
            process: &str,
            totals: &[(String, String, VariantTotals)],
        ) -> StorageResult<()> {
            let fail = self.fail.lock().pop();
            if fail == Some(false) {
                return Err(StorageError::Unavailable("refused".into()));
            }
            let mut stored = self.by_process.lock();
            for (experiment, variant, t) in totals {
                stored.insert(
                    (experiment.clone(), variant.clone(), process.to_owned()),
                    *t,
                );
            }
            match fail {
                Some(true) => Err(StorageError::Unavailable("timed out after applying".into())),
                _ => Ok(()),
            }
        }

        async fn totals_except(
            &self,
            experiment: &str,
            process: &str,
        ) -> StorageResult<Vec<(String, VariantTotals)>> {
            let mut sum: BTreeMap<String, VariantTotals> = BTreeMap::new();
            for ((e, variant, p), t) in self.by_process.lock().iter() {
                if e == experiment && p != process {
                    sum.entry(variant.clone()).or_default().merge(*t);
                }
            }
            Ok(sum.into_iter().collect())
        }
    }

    fn exposures(n: u64) -> VariantTotals {
        VariantTotals {
            exposures: n,
            ..VariantTotals::default()
        }
    }

    /// Two processes over one shared store, publications failing before and after they
    /// apply: every count is read once, by both, once published; and a process reopened
    /// on its store publishes under the same id.
    #[tokio::test]
    async fn counts_once_whatever_publications_fail() {
        let shared = Arc::new(Shared::default());
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let locals = dirs
            .each_ref()
            .map(|dir| EmbeddedStore::open(dir.path()).unwrap().stores());
        let open = |local: &crate::storage::Stores| {
            let (experiments, definitions) = (local.experiments.clone(), local.definitions.clone());
            let shared = shared.clone();
            async move {
                CountedHere::open(experiments, definitions, shared)
                    .await
                    .unwrap()
            }
        };
        let (a, b) = (open(&locals[0]).await, open(&locals[1]).await);
        assert_ne!(a.process(), b.process());
        let exp = vec!["exp".to_owned()];
        let add = |n| vec![("exp".to_owned(), "control".to_owned(), exposures(n))];

        a.add(&add(2)).await.unwrap();
        b.add(&add(3)).await.unwrap();
        // Each reads its own counts at once, the other's once published.
        assert_eq!(a.totals("exp").await.unwrap()[0].1, exposures(2));
        assert_eq!(b.publish(&exp).await.unwrap(), 1);
        assert_eq!(a.totals("exp").await.unwrap()[0].1, exposures(5));

        // a's publication fails before applying, then after applying (a timeout), then
        // goes through: each retry sets the same figures, so nothing counts twice.
        shared.fail.lock().extend([true, false]);
        a.add(&add(1)).await.unwrap();
        assert!(a.publish(&exp).await.is_err());
        assert!(a.publish(&exp).await.is_err());
        assert_eq!(b.totals("exp").await.unwrap()[0].1, exposures(6));
        assert_eq!(a.publish(&exp).await.unwrap(), 1);
        assert_eq!(a.publish(&exp).await.unwrap(), 0, "nothing changed since");
        assert_eq!(b.totals("exp").await.unwrap()[0].1, exposures(6));
        assert_eq!(a.totals("exp").await.unwrap()[0].1, exposures(6));

        // Opened again on its store (a restart): the same id, so its totals are not
        // counted twice.
        let id = a.process().to_owned();
        drop(a);
        let a = open(&locals[0]).await;
        assert_eq!(a.process(), id);
        assert_eq!(
            a.publish(&exp).await.unwrap(),
            1,
            "everything, the first time"
        );
        assert_eq!(b.totals("exp").await.unwrap()[0].1, exposures(6));
    }
}
