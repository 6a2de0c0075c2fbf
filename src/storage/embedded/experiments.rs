//! Experiment counters ([`ExperimentStore`]).
//!
//! Table `experiment_totals`: (experiment, variant) → (exposures `u64`, conversions `u64`,
//! value sum `f64`, value sum of squares `f64`). `add` reads and rewrites each tuple inside
//! the writer's transaction, so concurrent adds (even in one batch) merge by addition.

use std::sync::Arc;

use async_trait::async_trait;
use redb::{ReadableTable, TableDefinition, WriteTransaction};

use super::{db_err, EmbeddedStore};
use crate::experiments::VariantTotals;
use crate::storage::{ExperimentStore, StorageResult};

type Totals = (u64, u64, f64, f64);

pub(super) const EXPERIMENT_TOTALS: TableDefinition<(&str, &str), Totals> =
    TableDefinition::new("experiment_totals");

pub(super) fn create_tables(txn: &WriteTransaction) -> StorageResult<()> {
    txn.open_table(EXPERIMENT_TOTALS).map_err(db_err)?;
    Ok(())
}

/// [`ExperimentStore`] on the embedded store.
pub struct EmbeddedExperiments {
    store: Arc<EmbeddedStore>,
}

impl EmbeddedExperiments {
    pub fn new(store: Arc<EmbeddedStore>) -> Self {
        EmbeddedExperiments { store }
    }
}

fn totals((exposures, conversions, value_sum, value_sum_sq): Totals) -> VariantTotals {
    VariantTotals {
        exposures,
        conversions,
        value_sum,
        value_sum_sq,
    }
}

#[async_trait]
impl ExperimentStore for EmbeddedExperiments {
    async fn add(&self, deltas: &[(String, String, VariantTotals)]) -> StorageResult<()> {
        VariantTotals::check_finite(deltas)?;
        if deltas.is_empty() {
            return Ok(());
        }
        // Exposures alone are counted by decisions (the decision log); conversions come
        // from acknowledged outcomes.
        let relaxed = deltas
            .iter()
            .all(|(_, _, d)| d.conversions == 0 && d.value_sum == 0.0 && d.value_sum_sq == 0.0);
        let deltas = deltas.to_vec();
        let op = move |txn: &redb::WriteTransaction| {
            let mut table = txn.open_table(EXPERIMENT_TOTALS).map_err(db_err)?;
            for (experiment, variant, delta) in &deltas {
                let key = (experiment.as_str(), variant.as_str());
                let mut sum = table
                    .get(key)
                    .map_err(db_err)?
                    .map(|v| totals(v.value()))
                    .unwrap_or_default();
                sum.merge(*delta);
                table
                    .insert(
                        key,
                        (
                            sum.exposures,
                            sum.conversions,
                            sum.value_sum,
                            sum.value_sum_sq,
                        ),
                    )
                    .map_err(db_err)?;
            }
            Ok(())
        };
        self.store.write_as(relaxed, op).await
    }

    async fn totals(&self, experiment: &str) -> StorageResult<Vec<(String, VariantTotals)>> {
        self.store.read(|txn| {
            let table = txn.open_table(EXPERIMENT_TOTALS).map_err(db_err)?;
            let mut out = Vec::new();
            // Tuples compare element by element: every variant of `experiment`, and only
            // those, sorts from (experiment, "") until the experiment key changes.
            for entry in table.range((experiment, "")..).map_err(db_err)? {
                let (key, value) = entry.map_err(db_err)?;
                let (e, variant) = key.value();
                if e != experiment {
                    break;
                }
                out.push((variant.to_owned(), totals(value.value())));
            }
            Ok(out)
        })
    }
}
