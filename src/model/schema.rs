//! The input schema: how a (customer features, item, context) triple becomes one dense
//! `f32` row plus an item index. It is fitted on the training part of the data and saved
//! in the version's manifest, so serving encodes exactly as training did.
//!
//! Row layout, in order:
//! 1. each customer feature, z-scored with the training mean and standard deviation
//!    (missing or non-finite → the mean, i.e. 0; clipped to ±[`Z_CLIP`]);
//! 2. item type, one-hot;
//! 3. item tags, multi-hot;
//! 4. item attributes as `key=value` strings (strings, numbers, booleans), multi-hot;
//! 5. placement, one-hot; 6. device (the request context's `device`), one-hot;
//! 7. hour of day as `sin`, `cos` of `2π·hour/24`.
//!
//! Every vocabulary has slot 0 for values not seen in training, so unknown values never
//! fail. The item id is not in the row: it indexes a learned embedding (slot 0: unknown).

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Timelike, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::content::ContentItem;

/// z-scores are clipped to this, so one extreme value cannot dominate a row.
pub const Z_CLIP: f32 = 10.0;
/// Most values kept per vocabulary (the most frequent), so numeric attributes with
/// many distinct values cannot blow up the row.
pub const MAX_VOCABULARY: usize = 2_000;
/// Most item ids with their own embedding.
pub const MAX_ITEMS: usize = 100_000;

/// One numeric customer feature and its training statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NumericInput {
    pub name: String,
    pub mean: f64,
    /// Never 0: a constant feature gets 1.
    pub std: f64,
}

/// A categorical vocabulary: sorted values; value `i` is slot `i + 1`, slot 0 is "unknown".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Vocabulary {
    values: Vec<String>,
}

impl Vocabulary {
    /// The values seen at least `min_count` times, the `max` most frequent of them.
    pub fn fit<'a>(
        values: impl IntoIterator<Item = &'a str>,
        min_count: usize,
        max: usize,
    ) -> Self {
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for v in values {
            *counts.entry(v).or_default() += 1;
        }
        let mut kept: Vec<(&str, usize)> = counts
            .into_iter()
            .filter(|(_, n)| *n >= min_count)
            .collect();
        kept.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        kept.truncate(max);
        let mut values: Vec<String> = kept.into_iter().map(|(v, _)| v.to_owned()).collect();
        values.sort();
        Vocabulary { values }
    }

    pub fn slot(&self, value: &str) -> usize {
        self.values
            .binary_search_by(|v| v.as_str().cmp(value))
            .map_or(0, |i| i + 1)
    }

    /// Number of slots, including the unknown slot.
    pub fn slots(&self) -> usize {
        self.values.len() + 1
    }

    pub fn values(&self) -> &[String] {
        &self.values
    }
}

/// Sizes of the network's layers; part of the schema so the weights' shapes are known.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Architecture {
    pub embedding_dim: usize,
    pub hidden: Vec<usize>,
}

impl Default for Architecture {
    fn default() -> Self {
        Architecture {
            embedding_dim: 8,
            hidden: vec![64, 32],
        }
    }
}

/// The request context a score depends on.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ScoreContext {
    pub placement: Option<String>,
    pub device: Option<String>,
    /// Hour of day in [0, 24), fractional.
    pub hour: f64,
}

impl ScoreContext {
    /// From a request: `context.device` when it is a string; `context.hour` when it is a
    /// number in [0, 24), else the hour (UTC) of `at`.
    pub fn from_request(placement: Option<&str>, context: &Value, at: DateTime<Utc>) -> Self {
        let hour = context
            .get("hour")
            .and_then(Value::as_f64)
            .filter(|h| (0.0..24.0).contains(h))
            .unwrap_or_else(|| f64::from(at.hour()) + f64::from(at.minute()) / 60.0);
        ScoreContext {
            placement: placement.map(str::to_owned),
            device: context
                .get("device")
                .and_then(Value::as_str)
                .map(str::to_owned),
            hour,
        }
    }
}

/// An item attribute as a categorical value: `key=value` for strings, numbers and
/// booleans; other values (arrays, objects, null) are not encoded.
pub fn attribute_values(item: &ContentItem) -> impl Iterator<Item = String> + '_ {
    item.attributes.iter().filter_map(|(k, v)| match v {
        Value::String(s) => Some(format!("{k}={s}")),
        Value::Number(n) => Some(format!("{k}={n}")),
        Value::Bool(b) => Some(format!("{k}={b}")),
        _ => None,
    })
}

/// What the schema is fitted on: one shown item with the decision's inputs.
pub struct SchemaInput<'a> {
    pub features: &'a BTreeMap<String, f64>,
    pub item: &'a ContentItem,
    pub context: &'a ScoreContext,
}

/// The input schema of one model version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputSchema {
    pub customer_features: Vec<NumericInput>,
    pub item_types: Vocabulary,
    pub tags: Vocabulary,
    pub attributes: Vocabulary,
    pub items: Vocabulary,
    pub placements: Vocabulary,
    pub devices: Vocabulary,
    pub architecture: Architecture,
}

impl InputSchema {
    /// Fits the schema on training rows: every customer feature that appears, with its
    /// mean and standard deviation over the rows that have it; vocabularies of the values
    /// seen (attributes at least twice).
    pub fn fit(rows: &[SchemaInput<'_>], architecture: Architecture) -> Self {
        let mut sums: BTreeMap<&str, (f64, f64, u64)> = BTreeMap::new();
        for r in rows {
            for (name, v) in r.features {
                if v.is_finite() {
                    let e = sums.entry(name.as_str()).or_default();
                    e.0 += v;
                    e.1 += v * v;
                    e.2 += 1;
                }
            }
        }
        let customer_features = sums
            .into_iter()
            .map(|(name, (sum, sq, n))| {
                let n = n as f64;
                let mean = sum / n;
                let var = (sq / n - mean * mean).max(0.0);
                let std = var.sqrt();
                NumericInput {
                    name: name.to_owned(),
                    mean,
                    std: if std > 1e-9 { std } else { 1.0 },
                }
            })
            .collect();
        let attributes: Vec<String> = rows.iter().flat_map(|r| attribute_values(r.item)).collect();
        InputSchema {
            customer_features,
            item_types: Vocabulary::fit(
                rows.iter().map(|r| r.item.content_type.as_str()),
                1,
                MAX_VOCABULARY,
            ),
            tags: Vocabulary::fit(
                rows.iter()
                    .flat_map(|r| r.item.tags.iter().map(String::as_str)),
                1,
                MAX_VOCABULARY,
            ),
            attributes: Vocabulary::fit(attributes.iter().map(String::as_str), 2, MAX_VOCABULARY),
            items: Vocabulary::fit(rows.iter().map(|r| r.item.id.as_str()), 1, MAX_ITEMS),
            placements: Vocabulary::fit(
                rows.iter().filter_map(|r| r.context.placement.as_deref()),
                1,
                MAX_VOCABULARY,
            ),
            devices: Vocabulary::fit(
                rows.iter().filter_map(|r| r.context.device.as_deref()),
                1,
                MAX_VOCABULARY,
            ),
            architecture,
        }
    }

    /// Width of a dense row.
    pub fn width(&self) -> usize {
        self.customer_features.len()
            + self.item_types.slots()
            + self.tags.slots()
            + self.attributes.slots()
            + self.placements.slots()
            + self.devices.slots()
            + 2
    }

    /// Rows of the item embedding (including the unknown slot).
    pub fn item_slots(&self) -> usize {
        self.items.slots()
    }

    /// Names of the customer features the model reads.
    pub fn feature_names(&self) -> impl Iterator<Item = &str> {
        self.customer_features.iter().map(|f| f.name.as_str())
    }

    /// The customer part of a row (the same for every candidate of a request).
    pub fn encode_customer(&self, features: &BTreeMap<String, f64>, out: &mut Vec<f32>) {
        for f in &self.customer_features {
            let z = match features.get(&f.name) {
                Some(v) if v.is_finite() => ((v - f.mean) / f.std) as f32,
                _ => 0.0,
            };
            out.push(z.clamp(-Z_CLIP, Z_CLIP));
        }
    }

    /// The item and context part of a row, appended to `out`; returns the item's
    /// embedding slot.
    pub fn encode_item(&self, item: &ContentItem, ctx: &ScoreContext, out: &mut Vec<f32>) -> u32 {
        fn one_hot(out: &mut Vec<f32>, slots: usize, slot: usize) {
            let start = out.len();
            out.resize(start + slots, 0.0);
            out[start + slot] = 1.0;
        }
        one_hot(
            out,
            self.item_types.slots(),
            self.item_types.slot(&item.content_type),
        );
        let start = out.len();
        out.resize(start + self.tags.slots(), 0.0);
        for t in &item.tags {
            out[start + self.tags.slot(t)] = 1.0;
        }
        let start = out.len();
        out.resize(start + self.attributes.slots(), 0.0);
        for a in attribute_values(item) {
            out[start + self.attributes.slot(&a)] = 1.0;
        }
        one_hot(
            out,
            self.placements.slots(),
            ctx.placement
                .as_deref()
                .map_or(0, |p| self.placements.slot(p)),
        );
        one_hot(
            out,
            self.devices.slots(),
            ctx.device.as_deref().map_or(0, |d| self.devices.slot(d)),
        );
        let angle = std::f64::consts::TAU * ctx.hour / 24.0;
        out.push(angle.sin() as f32);
        out.push(angle.cos() as f32);
        self.items.slot(&item.id) as u32
    }

    /// One full row; returns the item's embedding slot.
    pub fn encode(
        &self,
        features: &BTreeMap<String, f64>,
        item: &ContentItem,
        ctx: &ScoreContext,
        out: &mut Vec<f32>,
    ) -> u32 {
        self.encode_customer(features, out);
        self.encode_item(item, ctx, out)
    }

    /// Every candidate of one request, appended to `batch`.
    pub fn encode_request(
        &self,
        features: &BTreeMap<String, f64>,
        items: &[std::sync::Arc<ContentItem>],
        ctx: &ScoreContext,
        batch: &mut EncodedBatch,
    ) {
        let mut customer = Vec::with_capacity(self.customer_features.len());
        self.encode_customer(features, &mut customer);
        for item in items {
            batch.rows.extend_from_slice(&customer);
            let slot = self.encode_item(item, ctx, &mut batch.rows);
            batch.items.push(slot);
        }
    }
}

/// Encoded rows, ready for one forward pass.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EncodedBatch {
    /// Row-major, `len() × width`.
    pub rows: Vec<f32>,
    /// One embedding slot per row.
    pub items: Vec<u32>,
}

impl EncodedBatch {
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::{json, Map};

    pub(crate) fn item(id: &str, ty: &str, tags: &[&str], attributes: Value) -> ContentItem {
        ContentItem {
            id: id.into(),
            content_type: ty.into(),
            title: None,
            placements: vec!["homepage_hero".into()],
            tags: tags.iter().map(|t| t.to_string()).collect(),
            segments: vec![],
            priority: 0,
            attributes: attributes.as_object().cloned().unwrap_or_else(Map::new),
            active_from: None,
            active_until: None,
            frequency_cap: None,
        }
    }

    fn features(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    fn fitted() -> InputSchema {
        let a = item(
            "a",
            "banner",
            &["travel"],
            json!({"discount": 5, "tier": "gold"}),
        );
        let b = item("b", "email", &["books", "travel"], json!({"discount": 5}));
        let fa = features(&[("views", 2.0), ("opens", 1.0)]);
        let fb = features(&[("views", 4.0)]);
        let ctx = ScoreContext {
            placement: Some("homepage_hero".into()),
            device: Some("mobile".into()),
            hour: 6.0,
        };
        InputSchema::fit(
            &[
                SchemaInput {
                    features: &fa,
                    item: &a,
                    context: &ctx,
                },
                SchemaInput {
                    features: &fb,
                    item: &b,
                    context: &ctx,
                },
            ],
            Architecture::default(),
        )
    }

    #[test]
    fn fit_learns_statistics_and_vocabularies() {
        let s = fitted();
        assert_eq!(
            s.customer_features,
            vec![
                NumericInput {
                    name: "opens".into(),
                    mean: 1.0,
                    std: 1.0
                },
                NumericInput {
                    name: "views".into(),
                    mean: 3.0,
                    std: 1.0
                },
            ]
        );
        assert_eq!(s.tags.values(), ["books", "travel"]);
        // Seen once only: `tier=gold` is left out.
        assert_eq!(s.attributes.values(), ["discount=5"]);
        assert_eq!(s.items.values(), ["a", "b"]);
        assert_eq!(s.width(), 2 + 3 + 3 + 2 + 2 + 2 + 2);
        let back: InputSchema = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    /// (features, item, context) → (row, slot): unknown values land in slot 0, missing
    /// and non-finite features read as the mean, extreme ones are clipped.
    #[test]
    fn encoding_edge_cases() {
        let s = fitted();
        let check = |f: BTreeMap<String, f64>,
                     it: ContentItem,
                     ctx: ScoreContext,
                     expect: (Vec<f32>, u32)| {
            let mut row = Vec::new();
            let slot = s.encode(&f, &it, &ctx, &mut row);
            assert_eq!(row.len(), s.width());
            let rounded: Vec<f32> = row.iter().map(|v| (v * 1000.0).round() / 1000.0).collect();
            assert_eq!((rounded, slot), expect);
        };
        let ctx = ScoreContext {
            placement: Some("homepage_hero".into()),
            device: Some("mobile".into()),
            hour: 6.0,
        };
        check(
            features(&[("views", 4.0), ("opens", 1.0)]),
            item("b", "email", &["books"], json!({"discount": 5})),
            ctx.clone(),
            (
                vec![
                    0.0, 1.0, /*type*/ 0.0, 0.0, 1.0, /*tags*/ 0.0, 1.0, 0.0,
                    /*attr*/ 0.0, 1.0, /*placement*/ 0.0, 1.0, /*device*/ 0.0, 1.0,
                    /*hour*/ 1.0, 0.0,
                ],
                2,
            ),
        );
        check(
            features(&[("views", f64::NAN), ("opens", 1e9), ("unknown", 3.0)]),
            item(
                "zzz",
                "popup",
                &["garden", "travel"],
                json!({"discount": 7, "nested": {"a": 1}}),
            ),
            ScoreContext {
                placement: Some("nowhere".into()),
                device: None,
                hour: 18.0,
            },
            (
                vec![
                    10.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, -1.0,
                    -0.0,
                ],
                0,
            ),
        );
        check(
            BTreeMap::new(),
            item("a", "banner", &[], json!({})),
            ScoreContext::default(),
            (
                vec![
                    0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0,
                ],
                1,
            ),
        );
    }

    #[test]
    fn context_from_request() {
        let at = "2026-01-01T13:30:00Z".parse().unwrap();
        assert_eq!(
            ScoreContext::from_request(
                Some("sidebar"),
                &json!({"device": "mobile", "hour": 9}),
                at
            ),
            ScoreContext {
                placement: Some("sidebar".into()),
                device: Some("mobile".into()),
                hour: 9.0
            }
        );
        // Bad values are ignored, never an error.
        assert_eq!(
            ScoreContext::from_request(None, &json!({"device": 3, "hour": 99}), at),
            ScoreContext {
                placement: None,
                device: None,
                hour: 13.5
            }
        );
        assert_eq!(
            ScoreContext::from_request(None, &Value::Null, at).hour,
            13.5
        );
    }
}
