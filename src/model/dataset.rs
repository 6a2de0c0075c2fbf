//! Training data: labelled examples from logged decisions.
//!
//! Each decision contributes one example per **shown** item (`items`): the customer saw
//! it, so an outcome (or its absence) says something about it. Alternatives were never
//! shown and contribute nothing — labelling them negative would teach the model that
//! what the old policy did not pick is bad.
//!
//! Point-in-time correctness: an example's customer features are the values stored
//! *on the decision* (what the decision was made with), never the customer's current
//! features. Its label is 1 when an outcome with a positive reward for that item was
//! recorded within the attribution window after the decision (`decision time ≤ outcome
//! time ≤ decision time + window`), else 0. Decisions whose window has not closed yet are
//! left out: their label is not final.
//!
//! ## Logged decisions from another system (JSONL)
//!
//! One JSON object per line (blank lines are skipped):
//!
//! ```json
//! {"id": "ext-1", "timestamp": "2026-01-05T10:00:00Z", "placement": "homepage_hero",
//!  "context": {"device": "mobile"}, "features": {"page_views_30d": 3, "clicks_30d": 1},
//!  "shown": ["hero-travel-0", {"id": "x-1", "type": "banner", "tags": ["travel"]}],
//!  "propensity": 0.25,
//!  "outcomes": [{"item_id": "hero-travel-0", "reward": 1, "timestamp": "2026-01-05T10:02:00Z"}]}
//! ```
//!
//! `id`, `timestamp`, `features` and `shown` are required; `features` are the values the
//! decision was made with. A shown item is a catalog id or a whole content item (as in
//! `upsertContent`). `outcomes` lists what happened after, with the same attribution rule.
//! Errors name the line and the field.

use std::collections::{BTreeMap, HashMap};
use std::io::BufRead;
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use serde::Deserialize;
use serde_json::Value;

use super::schema::ScoreContext;
use super::{ModelError, ModelResult};
use crate::content::ContentItem;
use crate::decision::{Decision, Outcome};
use crate::jsonl;
use crate::storage::DecisionStore;

/// One shown item of one decision, with its label.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub decision_id: String,
    pub at: DateTime<Utc>,
    /// The decision's point-in-time feature values (shared by its examples).
    pub features: Arc<BTreeMap<String, f64>>,
    pub item: Arc<ContentItem>,
    pub context: ScoreContext,
    pub label: bool,
    /// Probability that the logging policy showed this item first (1 when unknown).
    pub propensity: f64,
}

/// Labelled examples, sorted by (time, decision id).
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    pub examples: Vec<Example>,
    /// Decisions that contributed examples.
    pub decisions: usize,
    /// Decisions left out because their attribution window had not closed.
    pub open: usize,
}

/// A logged decision reduced to what training reads.
struct Logged {
    id: String,
    at: DateTime<Utc>,
    placement: Option<String>,
    context: Value,
    features: BTreeMap<String, f64>,
    shown: Vec<Arc<ContentItem>>,
    propensity: f64,
    /// (item id, reward, time)
    outcomes: Vec<(String, f64, DateTime<Utc>)>,
}

impl Logged {
    fn from_decision(decision: Decision, outcomes: Vec<Outcome>) -> Self {
        Logged {
            id: decision.id,
            at: decision.created_at,
            placement: decision.placement,
            context: decision.context,
            features: decision.features,
            shown: decision.items.into_iter().map(|s| s.item).collect(),
            propensity: decision.propensity,
            outcomes: outcomes
                .into_iter()
                .map(|o| (o.item_id, o.reward, o.created_at))
                .collect(),
        }
    }

    fn examples(self, window: Duration, out: &mut Vec<Example>) {
        let features = Arc::new(self.features);
        let context = ScoreContext::from_request(self.placement.as_deref(), &self.context, self.at);
        let until = self.at + window;
        for item in self.shown {
            let label = self.outcomes.iter().any(|(id, reward, at)| {
                *id == item.id && *reward > 0.0 && *at >= self.at && *at <= until
            });
            out.push(Example {
                decision_id: self.id.clone(),
                at: self.at,
                features: features.clone(),
                item,
                context: context.clone(),
                label,
                propensity: self.propensity,
            });
        }
    }
}

impl Dataset {
    fn build(
        logged: impl IntoIterator<Item = Logged>,
        window: Duration,
        now: DateTime<Utc>,
    ) -> Self {
        let mut data = Dataset::default();
        for l in logged {
            if l.at + window > now {
                data.open += 1;
                continue;
            }
            if l.shown.is_empty() {
                continue;
            }
            data.decisions += 1;
            l.examples(window, &mut data.examples);
        }
        data.examples.sort_by(|a, b| {
            a.at.cmp(&b.at)
                .then_with(|| a.decision_id.cmp(&b.decision_id))
        });
        data
    }

    /// Labelled decisions from pairs of a decision and its outcomes.
    pub fn from_decisions(
        decisions: impl IntoIterator<Item = (Decision, Vec<Outcome>)>,
        window: Duration,
        now: DateTime<Utc>,
    ) -> Self {
        Self::build(
            decisions
                .into_iter()
                .map(|(d, o)| Logged::from_decision(d, o)),
            window,
            now,
        )
    }

    /// The whole decision log of `store`, read in pages.
    pub async fn from_store(
        store: &dyn DecisionStore,
        window: Duration,
        now: DateTime<Utc>,
    ) -> ModelResult<Self> {
        const PAGE: usize = 2_000;
        let mut logged = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = store.scan(after.as_deref(), PAGE).await?;
            let full = page.len() == PAGE;
            after = page.last().map(|(d, _)| d.id.clone());
            logged.extend(page.into_iter().map(|(d, o)| Logged::from_decision(d, o)));
            if !full {
                break;
            }
        }
        Ok(Self::build(logged, window, now))
    }

    /// Logged decisions in the JSONL format above; shown items given by id are looked up
    /// in `catalog`.
    pub fn from_jsonl(
        reader: impl BufRead,
        catalog: &HashMap<String, Arc<ContentItem>>,
        window: Duration,
        now: DateTime<Utc>,
    ) -> ModelResult<Self> {
        let mut logged = Vec::new();
        for (n, line) in reader.lines().enumerate() {
            let line_no = n + 1;
            let line =
                line.map_err(|e| ModelError::invalid(format!("line {line_no}"), e.to_string()))?;
            if line.trim().is_empty() {
                continue;
            }
            logged.push(parse_line(&line, line_no, catalog)?);
        }
        Ok(Self::build(logged, window, now))
    }

    pub fn positives(&self) -> usize {
        self.examples.iter().filter(|e| e.label).count()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonlDecision {
    id: String,
    timestamp: DateTime<Utc>,
    #[serde(default)]
    customer_id: Option<String>,
    #[serde(default)]
    placement: Option<String>,
    #[serde(default)]
    context: Value,
    features: BTreeMap<String, f64>,
    shown: Vec<JsonlItem>,
    #[serde(default)]
    propensity: Option<f64>,
    #[serde(default)]
    outcomes: Vec<JsonlOutcome>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum JsonlItem {
    Id(String),
    Item(Box<ContentItem>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonlOutcome {
    item_id: String,
    reward: f64,
    timestamp: DateTime<Utc>,
}

fn parse_line(
    line: &str,
    line_no: usize,
    catalog: &HashMap<String, Arc<ContentItem>>,
) -> ModelResult<Logged> {
    let field = |path: &str| jsonl::field(line_no, path);
    let d: JsonlDecision =
        jsonl::parse_line(line, line_no).map_err(|e| ModelError::invalid(e.field, e.message))?;
    let _ = d.customer_id;
    if d.id.trim().is_empty() {
        return Err(ModelError::invalid(field("id"), "must not be empty"));
    }
    if let Some((name, _)) = d.features.iter().find(|(_, v)| !v.is_finite()) {
        return Err(ModelError::invalid(
            field(&format!("features.{name}")),
            "must be finite",
        ));
    }
    let propensity = d.propensity.unwrap_or(1.0);
    if !(propensity > 0.0 && propensity <= 1.0) {
        return Err(ModelError::invalid(
            field("propensity"),
            "must be in (0, 1]",
        ));
    }
    let mut shown = Vec::with_capacity(d.shown.len());
    for (i, s) in d.shown.into_iter().enumerate() {
        shown.push(match s {
            JsonlItem::Id(id) => catalog.get(&id).cloned().ok_or_else(|| {
                ModelError::invalid(
                    field(&format!("shown[{i}]")),
                    format!("unknown content item '{id}'"),
                )
            })?,
            JsonlItem::Item(item) => {
                item.validate(&field(&format!("shown[{i}]"))).map_err(|e| {
                    ModelError::invalid(field(&format!("shown[{i}]")), e.to_string())
                })?;
                Arc::new(*item)
            }
        });
    }
    let mut outcomes = Vec::with_capacity(d.outcomes.len());
    for (i, o) in d.outcomes.into_iter().enumerate() {
        if !o.reward.is_finite() {
            return Err(ModelError::invalid(
                field(&format!("outcomes[{i}].reward")),
                "must be finite",
            ));
        }
        outcomes.push((o.item_id, o.reward, o.timestamp));
    }
    Ok(Logged {
        id: d.id,
        at: d.timestamp,
        placement: d.placement,
        context: d.context,
        features: d.features,
        shown,
        propensity,
        outcomes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::customers::CustomerId;
    use crate::decision::{PropensityKind, ScoredItem};
    use crate::model::schema::tests::item;
    use serde_json::json;

    fn decision(id: &str, at: DateTime<Utc>, shown: &[&str], alternatives: &[&str]) -> Decision {
        let scored = |ids: &[&str]| {
            ids.iter()
                .map(|i| ScoredItem {
                    item: Arc::new(item(i, "banner", &["travel"], json!({}))),
                    score: 0.5,
                })
                .collect()
        };
        Decision {
            id: id.into(),
            customer_id: CustomerId::parse("c", "c1").unwrap(),
            placement: Some("homepage_hero".into()),
            items: scored(shown),
            alternatives: scored(alternatives),
            confidence_score: 0.5,
            reasoning: String::new(),
            latency_ms: 1.0,
            policy: "thompson".into(),
            propensity: 0.5,
            propensity_kind: PropensityKind::Estimated,
            model_version: None,
            model_scores: None,
            experiments: vec![],
            segments: vec![],
            arms: vec![],
            rules: vec![],
            degraded: false,
            explanation: None,
            context: json!({"device": "mobile"}),
            features: [("views".to_string(), 3.0)].into(),
            created_at: at,
        }
    }

    fn outcome(d: &Decision, item: &str, reward: f64, after: Duration) -> Outcome {
        Outcome {
            decision_id: d.id.clone(),
            customer_id: d.customer_id.clone(),
            item_id: item.into(),
            reward,
            conversion_type: "click".into(),
            value: None,
            created_at: d.created_at + after,
        }
    }

    /// (decision, outcomes) → labels of its examples, by item.
    #[test]
    fn labels_follow_the_attribution_window_and_only_shown_items_count() {
        let t0: DateTime<Utc> = "2026-01-01T00:00:00Z".parse().unwrap();
        let window = Duration::hours(1);
        let now = t0 + Duration::days(1);
        let check = |d: Decision, outcomes: Vec<Outcome>, expect: Vec<(&str, bool)>| {
            let data = Dataset::from_decisions([(d, outcomes)], window, now);
            let got: Vec<(&str, bool)> = data
                .examples
                .iter()
                .map(|e| (e.item.id.as_str(), e.label))
                .collect();
            assert_eq!(got, expect);
        };
        let d = decision("d1", t0, &["a"], &["b"]);
        check(d.clone(), vec![], vec![("a", false)]);
        check(
            d.clone(),
            vec![outcome(&d, "a", 1.0, Duration::minutes(5))],
            vec![("a", true)],
        );
        // Too late, before the decision, zero reward, or for an alternative: not positive.
        check(
            d.clone(),
            vec![outcome(&d, "a", 1.0, Duration::minutes(61))],
            vec![("a", false)],
        );
        check(
            d.clone(),
            vec![outcome(&d, "a", 1.0, Duration::minutes(-1))],
            vec![("a", false)],
        );
        check(
            d.clone(),
            vec![outcome(&d, "a", 0.0, Duration::minutes(1))],
            vec![("a", false)],
        );
        check(
            d.clone(),
            vec![outcome(&d, "b", 1.0, Duration::minutes(1))],
            vec![("a", false)],
        );
        let two = decision("d2", t0, &["a", "c"], &[]);
        check(
            two.clone(),
            vec![outcome(&two, "c", 1.0, Duration::hours(1))],
            vec![("a", false), ("c", true)],
        );
    }

    #[test]
    fn stored_features_are_used_and_open_windows_wait() {
        let t0: DateTime<Utc> = "2026-01-01T00:00:00Z".parse().unwrap();
        let old = decision("d-old", t0, &["a"], &[]);
        let recent = decision("d-new", t0 + Duration::minutes(50), &["a"], &[]);
        let data = Dataset::from_decisions(
            [(recent, vec![]), (old, vec![])],
            Duration::hours(1),
            t0 + Duration::minutes(70),
        );
        assert_eq!((data.decisions, data.open), (1, 1));
        let e = &data.examples[0];
        assert_eq!(e.decision_id, "d-old");
        assert_eq!(e.features.get("views"), Some(&3.0));
        assert_eq!(e.context.device.as_deref(), Some("mobile"));
        assert_eq!(e.context.hour, 0.0);
    }

    #[test]
    fn jsonl_import_and_its_errors() {
        let catalog: HashMap<String, Arc<ContentItem>> = [(
            "hero-1".to_string(),
            Arc::new(item("hero-1", "banner", &["books"], json!({}))),
        )]
        .into();
        let now: DateTime<Utc> = "2026-02-01T00:00:00Z".parse().unwrap();
        let good = r#"{"id": "x1", "timestamp": "2026-01-05T10:00:00Z", "placement": "sidebar", "features": {"views": 2},
 "shown": ["hero-1", {"id": "ext-2", "type": "offer", "tags": ["travel"]}], "propensity": 0.25,
 "outcomes": [{"item_id": "ext-2", "reward": 1, "timestamp": "2026-01-05T10:02:00Z"}]}"#
            .replace('\n', "");
        let data = Dataset::from_jsonl(
            format!("{good}\n\n").as_bytes(),
            &catalog,
            Duration::hours(1),
            now,
        )
        .unwrap();
        let got: Vec<(&str, bool, f64)> = data
            .examples
            .iter()
            .map(|e| (e.item.id.as_str(), e.label, e.propensity))
            .collect();
        assert_eq!(got, vec![("hero-1", false, 0.25), ("ext-2", true, 0.25)]);

        let check = |line: &str, expect: &str| {
            let input = format!("{good}\n{line}\n");
            let err = Dataset::from_jsonl(input.as_bytes(), &catalog, Duration::hours(1), now)
                .unwrap_err();
            assert_eq!(err.to_string(), expect);
        };
        check("not json", "line 2: expected ident (column 2)");
        check(
            r#"{"id": "x", "timestamp": "2026-01-05T10:00:00Z", "features": {}, "shown": ["nope"]}"#,
            "line 2.shown[0]: unknown content item 'nope'",
        );
        check(
            r#"{"id": "x", "timestamp": "yesterday", "features": {}, "shown": []}"#,
            "line 2.timestamp: input contains invalid characters (column 36)",
        );
        check(
            r#"{"id": "x", "timestamp": "2026-01-05T10:00:00Z", "features": {"v": "high"}, "shown": []}"#,
            "line 2.features.v: invalid type: string \"high\", expected f64 (column 73)",
        );
        check(
            r#"{"id": "x", "timestamp": "2026-01-05T10:00:00Z", "features": {}, "shown": [], "propensity": 0}"#,
            "line 2.propensity: must be in (0, 1]",
        );
        check(
            r#"{"id": "x", "timestamp": "2026-01-05T10:00:00Z", "features": {}, "shown": [], "extra": 1}"#,
            "line 2.extra: unknown field `extra`, expected one of `id`, `timestamp`, `customer_id`, `placement`, `context`, `features`, `shown`, `propensity`, `outcomes` (column 85)",
        );
    }
}
