//! The network: a learned item embedding concatenated to the dense row, then an MLP with
//! ReLU hidden layers and one output logit; the score is its sigmoid.
//!
//! Tensors are named `item_embedding` `[item slots, embedding_dim]`, `layer{i}.weight`
//! `[out, in]` and `layer{i}.bias` `[out]`, the last layer having one output. [`PlainNet`]
//! recomputes the same forward pass in plain Rust, to check the candle one.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Module;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::schema::{EncodedBatch, InputSchema};
use super::{ModelError, ModelResult};

pub const EMBEDDING: &str = "item_embedding";

/// The network's parameters, on one device.
#[derive(Clone)]
pub struct Net {
    embedding: candle_nn::Embedding,
    layers: Vec<candle_nn::Linear>,
    tensors: HashMap<String, Tensor>,
    width: usize,
    device: Device,
}

fn layer_names(i: usize) -> (String, String) {
    (format!("layer{i}.weight"), format!("layer{i}.bias"))
}

/// (in, out) of each linear layer of `schema`'s architecture.
fn layer_shapes(schema: &InputSchema) -> Vec<(usize, usize)> {
    let a = &schema.architecture;
    let mut shapes = Vec::new();
    let mut input = schema.width() + a.embedding_dim;
    for &h in a.hidden.iter().chain(std::iter::once(&1)) {
        shapes.push((input, h));
        input = h;
    }
    shapes
}

impl Net {
    /// Fresh parameters from `seed` (uniform Glorot weights, zero biases, the output bias
    /// at the logit of `base_rate`) as trainable variables.
    pub fn init(
        schema: &InputSchema,
        seed: u64,
        base_rate: f64,
        device: &Device,
    ) -> ModelResult<(Net, Vec<Var>)> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut uniform = |n: usize, limit: f64| -> Vec<f32> {
            (0..n)
                .map(|_| rng.random_range(-limit..limit) as f32)
                .collect()
        };
        let mut tensors = HashMap::new();
        let dim = schema.architecture.embedding_dim;
        let slots = schema.item_slots();
        tensors.insert(
            EMBEDDING.to_owned(),
            Tensor::from_vec(uniform(slots * dim, 0.05), (slots, dim), device)?,
        );
        let shapes = layer_shapes(schema);
        let last = shapes.len() - 1;
        for (i, &(input, output)) in shapes.iter().enumerate() {
            let limit = (6.0 / (input + output) as f64).sqrt();
            let (w, b) = layer_names(i);
            tensors.insert(
                w,
                Tensor::from_vec(uniform(input * output, limit), (output, input), device)?,
            );
            let p = base_rate.clamp(1e-4, 1.0 - 1e-4);
            let bias = if i == last {
                (p / (1.0 - p)).ln() as f32
            } else {
                0.0
            };
            tensors.insert(b, Tensor::from_vec(vec![bias; output], output, device)?);
        }
        let mut vars = Vec::new();
        let mut names: Vec<String> = tensors.keys().cloned().collect();
        names.sort();
        for name in names {
            let var = Var::from_tensor(&tensors[&name])?;
            // The net holds the variables' own tensors, so optimizer steps update it.
            tensors.insert(name, var.as_tensor().clone());
            vars.push(var);
        }
        Ok((Net::from_tensors(schema, tensors, device)?, vars))
    }

    /// The net from named tensors, checking every shape against the schema.
    pub fn from_tensors(
        schema: &InputSchema,
        mut tensors: HashMap<String, Tensor>,
        device: &Device,
    ) -> ModelResult<Net> {
        let take = |name: &str, shape: &[usize]| -> ModelResult<Tensor> {
            let t = tensors
                .get(name)
                .ok_or_else(|| ModelError::Io(format!("weights: tensor '{name}' is missing")))?;
            if t.dims() != shape {
                return Err(ModelError::Io(format!(
                    "weights: tensor '{name}' has shape {:?}, the schema needs {shape:?}",
                    t.dims()
                )));
            }
            Ok(t.to_dtype(DType::F32)?.to_device(device)?)
        };
        let dim = schema.architecture.embedding_dim;
        let emb = take(EMBEDDING, &[schema.item_slots(), dim])?;
        let mut layers = Vec::new();
        let mut kept = HashMap::new();
        kept.insert(EMBEDDING.to_owned(), emb.clone());
        for (i, (input, output)) in layer_shapes(schema).into_iter().enumerate() {
            let (wn, bn) = layer_names(i);
            let w = take(&wn, &[output, input])?;
            let b = take(&bn, &[output])?;
            kept.insert(wn, w.clone());
            kept.insert(bn, b.clone());
            layers.push(candle_nn::Linear::new(w, Some(b)));
        }
        tensors.clear();
        Ok(Net {
            embedding: candle_nn::Embedding::new(emb, dim),
            layers,
            tensors: kept,
            width: schema.width(),
            device: device.clone(),
        })
    }

    pub fn load(path: &Path, schema: &InputSchema, device: &Device) -> ModelResult<Net> {
        let tensors = candle_core::safetensors::load(path, device)
            .map_err(|e| ModelError::Io(format!("{}: {e}", path.display())))?;
        Net::from_tensors(schema, tensors, device)
    }

    pub fn save(&self, path: &Path) -> ModelResult<()> {
        candle_core::safetensors::save(&self.tensors, path)
            .map_err(|e| ModelError::Io(format!("{}: {e}", path.display())))
    }

    /// A deep copy of the parameters (to keep the best epoch while training goes on).
    pub fn snapshot(&self, schema: &InputSchema) -> ModelResult<Net> {
        let copied = self
            .tensors
            .iter()
            .map(|(k, t)| Ok((k.clone(), t.copy()?.detach())))
            .collect::<ModelResult<HashMap<_, _>>>()?;
        Net::from_tensors(schema, copied, &self.device)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn tensor(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// Logits `[rows]` of a batch given as tensors: `dense` `[rows, width]` f32 and
    /// `items` `[rows]` u32.
    pub fn logits(&self, dense: &Tensor, items: &Tensor) -> ModelResult<Tensor> {
        let emb = self.embedding.forward(items)?;
        let mut x = Tensor::cat(&[dense, &emb], 1)?;
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x)?;
            if i < last {
                x = x.relu()?;
            }
        }
        Ok(x.squeeze(1)?)
    }

    /// The batch as tensors on this net's device.
    pub fn tensors_of(&self, batch: &EncodedBatch) -> ModelResult<(Tensor, Tensor)> {
        let rows = batch.len();
        if batch.rows.len() != rows * self.width {
            return Err(ModelError::Compute(format!(
                "batch of {rows} rows has {} values, expected width {}",
                batch.rows.len(),
                self.width
            )));
        }
        let dense = Tensor::from_slice(&batch.rows, (rows, self.width), &self.device)?;
        let items = Tensor::from_slice(&batch.items, rows, &self.device)?;
        Ok((dense, items))
    }

    /// Probabilities of a positive outcome, one per row, in one forward pass.
    pub fn score(&self, batch: &EncodedBatch) -> ModelResult<Vec<f32>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let (dense, items) = self.tensors_of(batch)?;
        let p = candle_nn::ops::sigmoid(&self.logits(&dense, &items)?)?;
        let scores = p.to_vec1::<f32>()?;
        if let Some(bad) = scores.iter().position(|s| !s.is_finite()) {
            return Err(ModelError::Compute(format!(
                "score of row {bad} is not finite"
            )));
        }
        Ok(scores)
    }
}

/// The same forward pass in plain Rust over `f32` vectors: the reference the candle
/// pass is checked against.
pub struct PlainNet {
    embedding: Vec<Vec<f32>>,
    /// (weight rows `[out][in]`, bias `[out]`)
    layers: Vec<(Vec<Vec<f32>>, Vec<f32>)>,
}

impl PlainNet {
    pub fn from_net(net: &Net) -> ModelResult<PlainNet> {
        let get = |name: &str| -> ModelResult<&Tensor> {
            net.tensor(name)
                .ok_or_else(|| ModelError::Compute(format!("no tensor '{name}'")))
        };
        let embedding = get(EMBEDDING)?.to_vec2::<f32>()?;
        let mut layers = Vec::new();
        for i in 0..net.layers.len() {
            let (w, b) = layer_names(i);
            layers.push((get(&w)?.to_vec2::<f32>()?, get(&b)?.to_vec1::<f32>()?));
        }
        Ok(PlainNet { embedding, layers })
    }

    /// The probability for one encoded row.
    pub fn forward(&self, row: &[f32], item: u32) -> f32 {
        let mut x: Vec<f32> = row.to_vec();
        x.extend_from_slice(&self.embedding[item as usize]);
        let last = self.layers.len() - 1;
        for (i, (w, b)) in self.layers.iter().enumerate() {
            x = w
                .iter()
                .zip(b)
                .map(|(wr, bias)| {
                    let v = wr.iter().zip(&x).map(|(a, b)| a * b).sum::<f32>() + bias;
                    if i < last {
                        v.max(0.0)
                    } else {
                        v
                    }
                })
                .collect();
        }
        1.0 / (1.0 + (-x[0]).exp())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::schema::tests::item;
    use crate::model::schema::{Architecture, SchemaInput, ScoreContext};
    use serde_json::json;
    use std::collections::BTreeMap;
    use std::sync::Arc;

    pub(crate) fn schema_and_items() -> (InputSchema, Vec<Arc<crate::content::ContentItem>>) {
        let items: Vec<_> = (0..12)
            .map(|i| {
                Arc::new(item(
                    &format!("item-{i}"),
                    ["banner", "email"][i % 2],
                    &[["travel", "books", "home"][i % 3]],
                    json!({"discount": (i % 4) * 5}),
                ))
            })
            .collect();
        let f: BTreeMap<String, f64> = [("a".to_string(), 1.0), ("b".to_string(), 3.0)].into();
        let g: BTreeMap<String, f64> = [("a".to_string(), 4.0), ("b".to_string(), -1.0)].into();
        let ctx = ScoreContext {
            placement: Some("sidebar".into()),
            device: Some("web".into()),
            hour: 3.0,
        };
        let rows: Vec<SchemaInput> = items
            .iter()
            .enumerate()
            .map(|(i, it)| SchemaInput {
                features: if i % 2 == 0 { &f } else { &g },
                item: it,
                context: &ctx,
            })
            .collect();
        (
            InputSchema::fit(
                &rows,
                Architecture {
                    embedding_dim: 4,
                    hidden: vec![16, 8],
                },
            ),
            items,
        )
    }

    #[test]
    fn candle_forward_agrees_with_the_plain_forward() {
        let (schema, items) = schema_and_items();
        let (net, _) = Net::init(&schema, 3, 0.1, &Device::Cpu).unwrap();
        let plain = PlainNet::from_net(&net).unwrap();
        let mut batch = EncodedBatch::default();
        for (i, hour) in [0.0, 7.5, 23.0].into_iter().enumerate() {
            let f: BTreeMap<String, f64> =
                [("a".to_string(), i as f64 * 2.5), ("b".to_string(), -3.0)].into();
            let mut unknown = (*items[i]).clone();
            unknown.id = "never-seen".into();
            let mut candidates = items.clone();
            candidates.push(Arc::new(unknown));
            let ctx = ScoreContext {
                placement: Some("sidebar".into()),
                device: None,
                hour,
            };
            schema.encode_request(&f, &candidates, &ctx, &mut batch);
        }
        let scores = net.score(&batch).unwrap();
        assert_eq!(scores.len(), 3 * 13);
        let width = schema.width();
        let mut spread = (f32::MAX, f32::MIN);
        for (r, s) in scores.iter().enumerate() {
            let expected = plain.forward(&batch.rows[r * width..(r + 1) * width], batch.items[r]);
            assert!(
                (s - expected).abs() <= 1e-5,
                "row {r}: candle {s}, plain {expected}"
            );
            spread = (spread.0.min(*s), spread.1.max(*s));
        }
        assert!(
            spread.1 - spread.0 > 1e-3,
            "scores differ between rows: {spread:?}"
        );
    }

    #[test]
    fn weights_round_trip_through_safetensors_and_shapes_are_checked() {
        let (schema, items) = schema_and_items();
        let (net, _) = Net::init(&schema, 9, 0.2, &Device::Cpu).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        net.save(&path).unwrap();
        let back = Net::load(&path, &schema, &Device::Cpu).unwrap();
        let mut batch = EncodedBatch::default();
        schema.encode_request(
            &BTreeMap::new(),
            &items,
            &ScoreContext::default(),
            &mut batch,
        );
        assert_eq!(net.score(&batch).unwrap(), back.score(&batch).unwrap());

        let mut other = schema.clone();
        other.architecture.hidden = vec![16, 9];
        let err = Net::load(&path, &other, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("layer1.weight"), "{err}");
        // The same seed gives the same parameters.
        let (again, _) = Net::init(&schema, 9, 0.2, &Device::Cpu).unwrap();
        assert_eq!(net.score(&batch).unwrap(), again.score(&batch).unwrap());
    }
}
