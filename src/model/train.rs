//! Training: a time-ordered train/validation split, minibatch AdamW on binary
//! cross-entropy, early stopping on the validation loss, and the validation report.
//!
//! Reproducible: the same examples and [`TrainParams`] (seed included) give the same
//! weights and the same report, on any machine with the same CPU backend. The seed drives
//! the initial weights and the minibatch order; nothing reads a clock or a global RNG.
//!
//! The split is by time: the oldest `1 - validation_fraction` of the examples train, the
//! newest validate (never split inside one decision), as the model will serve decisions
//! that come after its data. The schema (normalisation, vocabularies) is fitted on the
//! training part only.

use candle_core::{Device, Tensor};
use candle_nn::Optimizer;
use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::dataset::{Dataset, Example};
use super::net::Net;
use super::schema::{Architecture, EncodedBatch, InputSchema, SchemaInput};
use super::{ModelError, ModelResult};

/// Training parameters, stored in the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainParams {
    pub seed: u64,
    /// Most passes over the training part.
    pub epochs: usize,
    /// Stop after this many epochs without a better validation loss (0: never stop
    /// early); the best epoch's weights are kept.
    pub patience: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub validation_fraction: f64,
    pub architecture: Architecture,
}

impl Default for TrainParams {
    fn default() -> Self {
        TrainParams {
            seed: 42,
            epochs: 12,
            patience: 3,
            batch_size: 256,
            learning_rate: 3e-3,
            weight_decay: 1e-4,
            validation_fraction: 0.2,
            architecture: Architecture::default(),
        }
    }
}

impl TrainParams {
    pub fn validate(&self) -> ModelResult<()> {
        if self.epochs == 0 || self.epochs > 1_000 {
            return Err(ModelError::invalid("epochs", "must be between 1 and 1000"));
        }
        if self.batch_size == 0 {
            return Err(ModelError::invalid("batchSize", "must be at least 1"));
        }
        if !(self.learning_rate > 0.0 && self.learning_rate < 1.0) {
            return Err(ModelError::invalid("learningRate", "must be in (0, 1)"));
        }
        if !(self.validation_fraction > 0.0 && self.validation_fraction < 1.0) {
            return Err(ModelError::invalid(
                "validationFraction",
                "must be in (0, 1)",
            ));
        }
        let a = &self.architecture;
        if a.embedding_dim == 0 || a.hidden.is_empty() || a.hidden.contains(&0) {
            return Err(ModelError::invalid(
                "architecture",
                "needs a positive embedding size and at least one non-empty hidden layer",
            ));
        }
        Ok(())
    }
}

/// Where training is; the CLI draws its progress bar from this.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// 1-based.
    pub epoch: usize,
    pub epochs: usize,
    /// Minibatch steps done so far, over all epochs.
    pub step: usize,
    /// Steps if every epoch runs.
    pub total_steps: usize,
    /// Mean training loss of the epoch so far.
    pub train_loss: f64,
    /// Set at the end of each epoch.
    pub validation_loss: Option<f64>,
}

/// One bin of the reliability diagram.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReliabilityBin {
    /// Predictions in `[lower, upper)` (the last bin includes 1).
    pub lower: f64,
    pub upper: f64,
    pub count: usize,
    pub mean_predicted: f64,
    pub observed_rate: f64,
}

/// Quality on the validation part.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Area under the ROC curve (ties count half).
    pub auc: f64,
    /// Mean binary cross-entropy of the predictions.
    pub log_loss: f64,
    /// Log loss of always predicting the training positive rate: what `log_loss` must beat.
    pub baseline_log_loss: f64,
    /// Expected calibration error over 10 equal-width bins.
    pub ece: f64,
    pub reliability: Vec<ReliabilityBin>,
    pub positive_rate: f64,
}

/// What the model was trained on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataRange {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// First time in the validation part.
    pub validation_from: DateTime<Utc>,
    pub decisions: usize,
    pub examples: usize,
    pub train_examples: usize,
    pub validation_examples: usize,
    pub positives: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainReport {
    pub metrics: Metrics,
    pub data: DataRange,
    pub epochs_run: usize,
    pub best_epoch: usize,
}

/// A trained network with its schema and report.
pub struct Trained {
    pub schema: InputSchema,
    pub net: Net,
    pub report: TrainReport,
}

fn encode(schema: &InputSchema, examples: &[Example]) -> (EncodedBatch, Vec<f32>) {
    let mut batch = EncodedBatch {
        rows: Vec::with_capacity(examples.len() * schema.width()),
        items: Vec::with_capacity(examples.len()),
    };
    for e in examples {
        let slot = schema.encode(&e.features, &e.item, &e.context, &mut batch.rows);
        batch.items.push(slot);
    }
    let labels = examples
        .iter()
        .map(|e| if e.label { 1.0 } else { 0.0 })
        .collect();
    (batch, labels)
}

/// Index where validation starts: `fraction` of the examples from the end, moved forward
/// to a decision boundary.
fn split_point(examples: &[Example], fraction: f64) -> usize {
    let n = examples.len();
    let mut split = n - ((n as f64 * fraction).round() as usize).clamp(1, n - 1);
    while split < n && examples[split].decision_id == examples[split - 1].decision_id {
        split += 1;
    }
    split
}

/// Trains on `data` (sorted by time, as [`Dataset`] builds it) on `device`.
pub fn train(
    data: &Dataset,
    params: &TrainParams,
    device: &Device,
    progress: &mut dyn FnMut(Progress),
) -> ModelResult<Trained> {
    params.validate()?;
    let examples = &data.examples;
    if examples.len() < 20 {
        return Err(ModelError::NotEnoughData(format!(
            "{} labelled examples from {} decisions ({} more still inside their attribution window); at least 20 are needed",
            examples.len(),
            data.decisions,
            data.open
        )));
    }
    let split = split_point(examples, params.validation_fraction);
    let (train_part, validation) = examples.split_at(split);
    for (name, part) in [("training", train_part), ("validation", validation)] {
        let positives = part.iter().filter(|e| e.label).count();
        if part.is_empty() || positives == 0 || positives == part.len() {
            return Err(ModelError::NotEnoughData(format!(
                "the {name} part ({} examples, {positives} positive) needs both positive and negative outcomes",
                part.len()
            )));
        }
    }
    let rows: Vec<SchemaInput> = train_part
        .iter()
        .map(|e| SchemaInput {
            features: &e.features,
            item: &e.item,
            context: &e.context,
        })
        .collect();
    let schema = InputSchema::fit(&rows, params.architecture.clone());
    let (train_x, train_y) = encode(&schema, train_part);
    let (val_x, val_y) = encode(&schema, validation);
    let base_rate = train_y.iter().map(|&y| f64::from(y)).sum::<f64>() / train_y.len() as f64;

    let (mut net, vars) = Net::init(&schema, params.seed, base_rate, device)?;
    let mut optimizer = candle_nn::AdamW::new(
        vars,
        candle_nn::ParamsAdamW {
            lr: params.learning_rate,
            weight_decay: params.weight_decay,
            ..Default::default()
        },
    )?;
    let width = schema.width();
    let (train_dense, train_items) = net.tensors_of(&train_x)?;
    let train_labels = Tensor::from_slice(&train_y, train_y.len(), device)?;
    let (val_dense, val_items) = net.tensors_of(&val_x)?;
    let val_labels = Tensor::from_slice(&val_y, val_y.len(), device)?;
    debug_assert_eq!(train_dense.dims(), &[train_y.len(), width]);

    let mut rng = StdRng::seed_from_u64(params.seed ^ 0x005E_ED0F_0DE2);
    let mut order: Vec<u32> = (0..train_y.len() as u32).collect();
    let batches = train_y.len().div_ceil(params.batch_size);
    let total_steps = batches * params.epochs;
    let mut step = 0;
    let mut best: Option<(f64, usize, Net)> = None;
    let mut epochs_run = 0;
    for epoch in 1..=params.epochs {
        epochs_run = epoch;
        order.shuffle(&mut rng);
        let mut loss_sum = 0.0;
        for (b, chunk) in order.chunks(params.batch_size).enumerate() {
            let idx = Tensor::from_slice(chunk, chunk.len(), device)?;
            let logits = net.logits(
                &train_dense.index_select(&idx, 0)?,
                &train_items.index_select(&idx, 0)?,
            )?;
            let loss = candle_nn::loss::binary_cross_entropy_with_logit(
                &logits,
                &train_labels.index_select(&idx, 0)?,
            )?;
            optimizer.backward_step(&loss)?;
            loss_sum += f64::from(loss.to_scalar::<f32>()?);
            step += 1;
            progress(Progress {
                epoch,
                epochs: params.epochs,
                step,
                total_steps,
                train_loss: loss_sum / (b + 1) as f64,
                validation_loss: None,
            });
        }
        let val_logits = net.logits(&val_dense, &val_items)?;
        let val_loss = f64::from(
            candle_nn::loss::binary_cross_entropy_with_logit(&val_logits, &val_labels)?
                .to_scalar::<f32>()?,
        );
        if !val_loss.is_finite() {
            return Err(ModelError::Compute(format!(
                "validation loss is not finite after epoch {epoch}; try a lower learning rate"
            )));
        }
        progress(Progress {
            epoch,
            epochs: params.epochs,
            step,
            total_steps,
            train_loss: loss_sum / batches as f64,
            validation_loss: Some(val_loss),
        });
        let improved = best.as_ref().is_none_or(|(l, _, _)| val_loss < *l);
        if improved {
            best = Some((val_loss, epoch, net.snapshot(&schema)?));
        } else if params.patience > 0
            && best
                .as_ref()
                .is_some_and(|(_, e, _)| epoch - e >= params.patience)
        {
            break;
        }
    }
    let (_, best_epoch, best_net) =
        best.ok_or_else(|| ModelError::Compute("no epoch ran".into()))?;
    net = best_net;
    let predictions = net.score(&val_x)?;
    let labels: Vec<bool> = validation.iter().map(|e| e.label).collect();
    let metrics = evaluate(&predictions, &labels, base_rate);
    let report = TrainReport {
        metrics,
        data: DataRange {
            from: examples[0].at,
            to: examples[examples.len() - 1].at,
            validation_from: validation[0].at,
            decisions: data.decisions,
            examples: examples.len(),
            train_examples: train_part.len(),
            validation_examples: validation.len(),
            positives: data.positives(),
        },
        epochs_run,
        best_epoch,
    };
    Ok(Trained {
        schema,
        net,
        report,
    })
}

/// Area under the ROC curve by ranks (ties get their average rank).
pub fn auc(predictions: &[f32], labels: &[bool]) -> f64 {
    let mut order: Vec<usize> = (0..predictions.len()).collect();
    order.sort_by(|&a, &b| predictions[a].total_cmp(&predictions[b]));
    let positives = labels.iter().filter(|&&l| l).count() as f64;
    let negatives = labels.len() as f64 - positives;
    if positives == 0.0 || negatives == 0.0 {
        return 0.5;
    }
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && predictions[order[j + 1]] == predictions[order[i]] {
            j += 1;
        }
        let average_rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            if labels[k] {
                rank_sum += average_rank;
            }
        }
        i = j + 1;
    }
    (rank_sum - positives * (positives + 1.0) / 2.0) / (positives * negatives)
}

fn log_loss_of(p: f64, label: bool) -> f64 {
    let p = p.clamp(1e-7, 1.0 - 1e-7);
    if label {
        -p.ln()
    } else {
        -(1.0 - p).ln()
    }
}

/// The validation report of `predictions` against `labels`.
pub fn evaluate(predictions: &[f32], labels: &[bool], base_rate: f64) -> Metrics {
    let n = predictions.len().max(1) as f64;
    let log_loss = predictions
        .iter()
        .zip(labels)
        .map(|(&p, &l)| log_loss_of(f64::from(p), l))
        .sum::<f64>()
        / n;
    let baseline_log_loss = labels
        .iter()
        .map(|&l| log_loss_of(base_rate, l))
        .sum::<f64>()
        / n;
    const BINS: usize = 10;
    let mut sums = [(0usize, 0.0f64, 0usize); BINS];
    for (&p, &l) in predictions.iter().zip(labels) {
        let b = ((f64::from(p) * BINS as f64) as usize).min(BINS - 1);
        sums[b].0 += 1;
        sums[b].1 += f64::from(p);
        sums[b].2 += usize::from(l);
    }
    let mut ece = 0.0;
    let mut reliability = Vec::new();
    for (b, &(count, sum, positives)) in sums.iter().enumerate() {
        if count == 0 {
            continue;
        }
        let mean_predicted = sum / count as f64;
        let observed_rate = positives as f64 / count as f64;
        ece += count as f64 / n * (mean_predicted - observed_rate).abs();
        reliability.push(ReliabilityBin {
            lower: b as f64 / BINS as f64,
            upper: (b + 1) as f64 / BINS as f64,
            count,
            mean_predicted,
            observed_rate,
        });
    }
    Metrics {
        auc: auc(predictions, labels),
        log_loss,
        baseline_log_loss,
        ece,
        reliability,
        positive_rate: labels.iter().filter(|&&l| l).count() as f64 / n,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::schema::tests::item;
    use chrono::Duration;
    use rand::Rng;
    use serde_json::json;
    use std::collections::BTreeMap;
    use std::sync::Arc;

    /// A small world: the customer's `affinity_<tag>` feature says which tag they click.
    pub(crate) fn synthetic(n_decisions: usize, seed: u64) -> Dataset {
        let tags = ["travel", "books", "home"];
        let items: Vec<Arc<crate::content::ContentItem>> = (0..9)
            .map(|i| {
                Arc::new(item(
                    &format!("i{i}"),
                    "banner",
                    &[tags[i % 3]],
                    json!({"discount": i % 2}),
                ))
            })
            .collect();
        let mut rng = StdRng::seed_from_u64(seed);
        let t0: DateTime<Utc> = "2026-01-01T00:00:00Z".parse().unwrap();
        let mut examples = Vec::new();
        for d in 0..n_decisions {
            let favourite = rng.random_range(0..3);
            let features: BTreeMap<String, f64> = tags
                .iter()
                .enumerate()
                .map(|(t, name)| {
                    let base = if t == favourite { 5.0 } else { 1.0 };
                    (
                        format!("affinity_{name}"),
                        base + rng.random_range(0.0..2.0),
                    )
                })
                .collect();
            let it = items[rng.random_range(0..items.len())].clone();
            let p = if it.tags[0] == tags[favourite] {
                0.5
            } else {
                0.05
            };
            examples.push(Example {
                decision_id: format!("d{d:06}"),
                at: t0 + Duration::seconds(d as i64),
                features: Arc::new(features),
                item: it,
                context: Default::default(),
                label: rng.random_bool(p),
                propensity: 1.0 / 9.0,
            });
        }
        Dataset {
            examples,
            decisions: n_decisions,
            open: 0,
        }
    }

    pub(crate) fn small_params(seed: u64) -> TrainParams {
        TrainParams {
            seed,
            epochs: 6,
            batch_size: 64,
            learning_rate: 1e-2,
            architecture: Architecture {
                embedding_dim: 4,
                hidden: vec![16, 8],
            },
            ..TrainParams::default()
        }
    }

    #[test]
    fn learns_a_hidden_preference_reproducibly() {
        let data = synthetic(1_500, 1);
        let mut steps = Vec::new();
        let a = train(&data, &small_params(7), &Device::Cpu, &mut |p| {
            steps.push(p)
        })
        .unwrap();
        let b = train(&data, &small_params(7), &Device::Cpu, &mut |_| {}).unwrap();
        assert_eq!(a.report, b.report, "same seed and data, same report");
        let m = &a.report.metrics;
        assert!(m.auc > 0.75, "AUC {}", m.auc);
        assert!(m.log_loss < m.baseline_log_loss, "{m:?}");
        assert!(m.ece < 0.1, "{m:?}");
        assert_eq!(
            a.report.data.train_examples + a.report.data.validation_examples,
            1_500
        );
        assert_eq!(a.report.data.validation_examples, 300);
        assert!(a.report.data.validation_from > a.report.data.from);
        let last = steps.last().unwrap();
        assert_eq!(last.epoch, a.report.epochs_run);
        assert!(last.validation_loss.is_some());
        assert!(steps.windows(2).all(|w| w[0].step <= w[1].step));
        let c = train(&data, &small_params(8), &Device::Cpu, &mut |_| {}).unwrap();
        assert_ne!(
            a.report.metrics, c.report.metrics,
            "another seed, another model"
        );
    }

    #[test]
    fn refuses_data_it_cannot_learn_or_judge() {
        let err = |data: &Dataset| {
            train(data, &small_params(1), &Device::Cpu, &mut |_| {})
                .err()
                .unwrap()
                .to_string()
        };
        assert!(err(&synthetic(10, 1))
            .starts_with("data: not enough training data: 10 labelled examples"));
        let mut all_negative = synthetic(200, 1);
        all_negative
            .examples
            .iter_mut()
            .for_each(|e| e.label = false);
        assert!(
            err(&all_negative).contains("training part (160 examples, 0 positive)"),
            "{}",
            err(&all_negative)
        );
        let mut bad = small_params(1);
        bad.epochs = 0;
        assert_eq!(
            train(&synthetic(100, 1), &bad, &Device::Cpu, &mut |_| {})
                .err()
                .unwrap()
                .to_string(),
            "epochs: must be between 1 and 1000"
        );
    }

    /// predictions, labels → (AUC, ECE): data-driven checks of the metrics.
    #[test]
    fn metrics() {
        let check = |p: &[f32], l: &[bool], expect: (f64, f64)| {
            let m = evaluate(p, l, 0.5);
            assert!(
                (m.auc - expect.0).abs() < 1e-6 && (m.ece - expect.1).abs() < 1e-6,
                "{m:?} vs {expect:?}"
            );
        };
        check(&[0.1, 0.9], &[false, true], (1.0, 0.1));
        check(&[0.9, 0.1], &[false, true], (0.0, 0.9));
        check(
            &[0.5, 0.5, 0.5, 0.5],
            &[false, true, false, true],
            (0.5, 0.0),
        );
        check(
            &[0.2, 0.4, 0.6, 0.8],
            &[false, true, false, true],
            (0.75, 0.4),
        );
    }
}
