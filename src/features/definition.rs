//! Feature definitions: what a feature computes, validated, and how it folds events and
//! evaluates at a point in time. Pure logic.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Bucket, FeatureState, Window};
use crate::error::{Error, Result};
use crate::events::StoredEvent;
use crate::expressions::Formula;

/// What a feature computes. Stateful kinds fold events into a [`FeatureState`]; derived
/// kinds combine other features (at their active versions) at read time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum FeatureKind {
    /// Number of events of a type within the window; with `where`, only events whose
    /// properties equal every given value (`{"category": "travel"}`).
    Count {
        event_type: String,
        window: Window,
        #[serde(
            default,
            rename = "where",
            skip_serializing_if = "serde_json::Map::is_empty"
        )]
        filter: serde_json::Map<String, Value>,
    },
    /// Sum of a numeric event property within the window.
    Sum {
        event_type: String,
        property: String,
        window: Window,
    },
    /// Days (fractional) since the newest event of the type, or of any type when absent.
    DaysSince {
        #[serde(default)]
        event_type: Option<String>,
    },
    /// `numerator / denominator`; the default when the denominator is 0.
    Ratio {
        numerator: String,
        denominator: String,
    },
    /// `min(cap, Σ weight · value / scale)`. Kept for stored definitions; an `expression`
    /// says the same and more.
    WeightedSum {
        terms: Vec<Term>,
        #[serde(default)]
        cap: Option<f64>,
    },
    /// A Rhai expression over other features, each a variable named after the feature:
    /// `min(1.0, email_opens_30d / 5.0 + page_views_30d / 10.0)`. Its result must be a
    /// finite number (an integer reads as a float). Parsed by [`FeatureSpec::parse`],
    /// which compiles it once, never by serde.
    #[serde(skip_deserializing)]
    Expression { expression: Formula },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Term {
    pub feature: String,
    pub weight: f64,
    /// The value divided by this before weighting: the value at which this signal alone
    /// counts as fully engaged. Must be > 0.
    #[serde(default = "one")]
    pub scale: f64,
}

fn one() -> f64 {
    1.0
}

/// One version of a feature definition, as stored: the kind's fields plus `default` and
/// `description`, in one flat JSON object.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FeatureSpec {
    #[serde(flatten)]
    pub kind: FeatureKind,
    /// Read when there is no value (never an error). 0.0 unless set.
    pub default: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

impl FeatureSpec {
    /// Parses and validates a definition body; `known` says which other features exist.
    pub fn parse(field: &str, body: &Value, known: &dyn Fn(&str) -> bool) -> Result<Self> {
        let mut object = body
            .as_object()
            .cloned()
            .ok_or_else(|| Error::invalid(field, "must be a JSON object"))?;
        let default = match object.remove("default") {
            None | Some(Value::Null) => 0.0,
            Some(v) => v
                .as_f64()
                .ok_or_else(|| Error::invalid(format!("{field}.default"), "must be a number"))?,
        };
        let description = match object.remove("description") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s),
            Some(_) => {
                return Err(Error::invalid(
                    format!("{field}.description"),
                    "must be a string",
                ))
            }
        };
        let kind = if object.get("kind").and_then(Value::as_str) == Some("expression") {
            parse_expression(field, &object, known)?
        } else {
            serde_json::from_value(Value::Object(object))
                .map_err(|e| Error::invalid(field, e.to_string()))?
        };
        let spec = FeatureSpec {
            kind,
            default,
            description,
        };
        if !spec.default.is_finite() {
            return Err(Error::invalid(format!("{field}.default"), "must be finite"));
        }
        match &spec.kind {
            FeatureKind::Count { event_type, .. } | FeatureKind::Sum { event_type, .. } => {
                if event_type.is_empty() {
                    return Err(Error::invalid(
                        format!("{field}.event_type"),
                        "must not be empty",
                    ));
                }
            }
            FeatureKind::DaysSince { .. } => {}
            FeatureKind::Ratio {
                numerator,
                denominator,
            } => {
                for (f, name) in [("numerator", numerator), ("denominator", denominator)] {
                    if !known(name) {
                        return Err(Error::invalid(
                            format!("{field}.{f}"),
                            format!("unknown feature '{name}'"),
                        ));
                    }
                }
            }
            FeatureKind::WeightedSum { terms, cap } => {
                if terms.is_empty() {
                    return Err(Error::invalid(
                        format!("{field}.terms"),
                        "must not be empty",
                    ));
                }
                for (i, t) in terms.iter().enumerate() {
                    if !known(&t.feature) {
                        return Err(Error::invalid(
                            format!("{field}.terms[{i}].feature"),
                            format!("unknown feature '{}'", t.feature),
                        ));
                    }
                    if !t.weight.is_finite() {
                        return Err(Error::invalid(
                            format!("{field}.terms[{i}].weight"),
                            "must be finite",
                        ));
                    }
                    if !(t.scale.is_finite() && t.scale > 0.0) {
                        return Err(Error::invalid(
                            format!("{field}.terms[{i}].scale"),
                            "must be > 0",
                        ));
                    }
                }
                if cap.is_some_and(|c| !c.is_finite()) {
                    return Err(Error::invalid(format!("{field}.cap"), "must be finite"));
                }
            }
            // Checked by `parse_expression`.
            FeatureKind::Expression { .. } => {}
        }
        Ok(spec)
    }

    /// Other features this one reads.
    pub fn inputs(&self) -> BTreeSet<&str> {
        match &self.kind {
            FeatureKind::Ratio {
                numerator,
                denominator,
            } => [numerator.as_str(), denominator.as_str()].into(),
            FeatureKind::WeightedSum { terms, .. } => {
                terms.iter().map(|t| t.feature.as_str()).collect()
            }
            FeatureKind::Expression { expression } => {
                expression.inputs().iter().map(String::as_str).collect()
            }
            _ => BTreeSet::new(),
        }
    }

    pub fn is_stateful(&self) -> bool {
        !matches!(
            self.kind,
            FeatureKind::Ratio { .. }
                | FeatureKind::WeightedSum { .. }
                | FeatureKind::Expression { .. }
        )
    }

    /// Whether events of this type change the state.
    pub fn matches(&self, incoming: &str) -> bool {
        match &self.kind {
            FeatureKind::Count { event_type, .. } | FeatureKind::Sum { event_type, .. } => {
                event_type == incoming
            }
            FeatureKind::DaysSince { event_type } => {
                event_type.as_deref().is_none_or(|t| t == incoming)
            }
            _ => false,
        }
    }

    /// Whether an event with these properties passes the definition's `where` filter.
    fn accepts(&self, properties: &serde_json::Map<String, Value>) -> bool {
        match &self.kind {
            FeatureKind::Count { filter, .. } => filter
                .iter()
                .all(|(key, wanted)| properties.get(key) == Some(wanted)),
            _ => true,
        }
    }

    /// How far back this version counts events: its window; `None` when it counts
    /// every event ever (`days_since`) or none (derived kinds).
    pub fn reach(&self) -> Option<chrono::Duration> {
        self.window().map(Window::duration)
    }

    fn window(&self) -> Option<Window> {
        match &self.kind {
            FeatureKind::Count { window, .. } | FeatureKind::Sum { window, .. } => Some(*window),
            _ => None,
        }
    }

    /// Folds one event into the state; `true` if it counted. Idempotent: an event with a
    /// stream position at or before `applied_position` in the same partition, or one
    /// without at or below `applied_seq`, was already counted and is skipped. Buckets that
    /// fell out of the window by `now` are pruned.
    pub fn fold(&self, state: &mut FeatureState, stored: &StoredEvent, now: DateTime<Utc>) -> bool {
        let counted = match (stored.event.position, state.applied_position) {
            (Some(at), Some(applied)) => {
                // A customer's events change partition only when the topic's partition
                // count changes; from then on the new partition's offsets count.
                at.partition == applied.partition && at.offset <= applied.offset
            }
            (Some(_), None) => false,
            (None, _) => stored.seq <= state.applied_seq,
        };
        if counted
            || !self.matches(&stored.event.event_type)
            || !self.accepts(&stored.event.properties)
        {
            return false;
        }
        match stored.event.position {
            Some(at) => state.applied_position = Some(at),
            None => state.applied_seq = stored.seq,
        }
        let ts = stored.event.timestamp;
        match &self.kind {
            FeatureKind::Count { window, .. } | FeatureKind::Sum { window, .. } => {
                let amount = match &self.kind {
                    FeatureKind::Sum { property, .. } => {
                        numeric(stored.event.properties.get(property)).unwrap_or(0.0)
                    }
                    _ => 0.0,
                };
                let minute = ts.timestamp().div_euclid(60);
                if minute > now_minute(now) - window.minutes() {
                    match state.buckets.binary_search_by_key(&minute, |b| b.minute) {
                        Ok(i) => {
                            state.buckets[i].count += 1;
                            state.buckets[i].sum += amount;
                        }
                        Err(i) => state.buckets.insert(
                            i,
                            Bucket {
                                minute,
                                count: 1,
                                sum: amount,
                            },
                        ),
                    }
                }
                prune(state, *window, now);
            }
            FeatureKind::DaysSince { .. } => {
                let ms = ts.timestamp_millis();
                state.last_seen_ms = Some(state.last_seen_ms.map_or(ms, |old| old.max(ms)));
            }
            FeatureKind::Ratio { .. }
            | FeatureKind::WeightedSum { .. }
            | FeatureKind::Expression { .. } => {}
        }
        true
    }

    /// The value at `now`. `state` is this feature's state (stateful kinds); `input`
    /// gives the value of another feature (derived kinds). Non-finite results and failed
    /// expressions read as the default and are reported as `Err` so callers can count
    /// compute errors.
    pub fn evaluate(
        &self,
        state: Option<&FeatureState>,
        now: DateTime<Utc>,
        input: &mut dyn FnMut(&str) -> f64,
    ) -> std::result::Result<f64, f64> {
        let value = match &self.kind {
            FeatureKind::Count { .. } | FeatureKind::Sum { .. } => {
                let Some(state) = state else {
                    return Ok(self.default);
                };
                let window = self.window().map_or(0, Window::minutes);
                let from = now_minute(now) - window;
                let live = state.buckets.iter().filter(|b| b.minute > from);
                if matches!(self.kind, FeatureKind::Count { .. }) {
                    live.map(|b| f64::from(b.count)).sum()
                } else {
                    live.map(|b| b.sum).sum()
                }
            }
            FeatureKind::DaysSince { .. } => match state.and_then(|s| s.last_seen_ms) {
                Some(ms) => ((now.timestamp_millis() - ms).max(0)) as f64 / 86_400_000.0,
                None => return Ok(self.default),
            },
            FeatureKind::Ratio {
                numerator,
                denominator,
            } => {
                let d = input(denominator);
                if d == 0.0 {
                    return Ok(self.default);
                }
                input(numerator) / d
            }
            FeatureKind::WeightedSum { terms, cap } => {
                let sum: f64 = terms
                    .iter()
                    .map(|t| t.weight * input(&t.feature) / t.scale)
                    .sum();
                cap.map_or(sum, |c| sum.min(c))
            }
            FeatureKind::Expression { expression } => match expression.evaluate(input) {
                Ok(value) => value,
                Err(e) => {
                    tracing::debug!(expression = expression.source(), error = %e, "Feature expression failed");
                    return Err(self.default);
                }
            },
        };
        if value.is_finite() {
            Ok(value)
        } else {
            Err(self.default)
        }
    }
}

/// An `expression` definition: `kind`, `expression` and nothing else (`default` and
/// `description` are already taken out). Compiled here, once.
fn parse_expression(
    field: &str,
    object: &serde_json::Map<String, Value>,
    known: &dyn Fn(&str) -> bool,
) -> Result<FeatureKind> {
    if let Some(key) = object
        .keys()
        .find(|k| !matches!(k.as_str(), "kind" | "expression"))
    {
        return Err(Error::invalid(format!("{field}.{key}"), "unknown key"));
    }
    let path = format!("{field}.expression");
    let source = match object.get("expression") {
        Some(Value::String(s)) => s,
        Some(_) => return Err(Error::invalid(path, "must be a string")),
        None => return Err(Error::invalid(path, "is required")),
    };
    let expression = Formula::compile(source).map_err(|e| Error::invalid(&path, e.to_string()))?;
    let unknown: Vec<&str> = expression
        .inputs()
        .iter()
        .map(String::as_str)
        .filter(|name| !known(name))
        .collect();
    if !unknown.is_empty() {
        return Err(Error::unknown_features(path, &unknown));
    }
    Ok(FeatureKind::Expression { expression })
}

fn now_minute(now: DateTime<Utc>) -> i64 {
    now.timestamp().div_euclid(60)
}

fn prune(state: &mut FeatureState, window: Window, now: DateTime<Utc>) {
    let from = now_minute(now) - window.minutes();
    state.buckets.retain(|b| b.minute > from);
}

/// A JSON number, or a string holding one.
fn numeric(value: Option<&Value>) -> Option<f64> {
    match value? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|v: &f64| v.is_finite())
}

/// The built-in definitions installed on first start (version 1 of each).
///
/// `engagement_score` is the seed's `min(1, 0.3·page views + 0.2·email opens + 0.2·form
/// submits)` with each 30-day count normalised by the count at which that signal alone
/// counts as fully engaged: 10 page views, 5 email opens, 2 form submits. It is a Rhai
/// expression computing exactly what the equivalent `weighted_sum` computes (each term
/// `weight · value / scale`, summed left to right, then capped).
pub fn builtin() -> Vec<(&'static str, Value)> {
    use serde_json::json;
    vec![
        (
            "page_views_30d",
            json!({"kind": "count", "event_type": "page_view", "window": "30d", "description": "Page views in the last 30 days"}),
        ),
        (
            "email_opens_30d",
            json!({"kind": "count", "event_type": "email_open", "window": "30d", "description": "Email opens in the last 30 days"}),
        ),
        (
            "form_submits_30d",
            json!({"kind": "count", "event_type": "form_submit", "window": "30d", "description": "Form submits in the last 30 days"}),
        ),
        (
            "clicks_30d",
            json!({"kind": "count", "event_type": "click", "window": "30d", "description": "Clicks in the last 30 days"}),
        ),
        (
            "purchases_30d",
            json!({"kind": "count", "event_type": "purchase", "window": "30d", "description": "Purchases in the last 30 days"}),
        ),
        (
            "revenue_30d",
            json!({"kind": "sum", "event_type": "purchase", "property": "value", "window": "30d", "description": "Sum of purchase values in the last 30 days"}),
        ),
        (
            "days_since_last_visit",
            json!({"kind": "days_since", "event_type": "page_view", "default": 365.0, "description": "Days since the last page view (365 when never seen)"}),
        ),
        (
            "conversion_rate",
            json!({"kind": "ratio", "numerator": "form_submits_30d", "denominator": "page_views_30d", "description": "Form submits per page view over 30 days"}),
        ),
        (
            "engagement_score",
            json!({"kind": "expression",
                   "expression": "min(1.0, 0.3 * page_views_30d / 10.0 + 0.2 * email_opens_30d / 5.0 + 0.2 * form_submits_30d / 2.0)",
                   "description": "min(1, 0.3·pv/10 + 0.2·opens/5 + 0.2·submits/2) over 30 days"}),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::customers::CustomerId;
    use crate::events::Event;
    use chrono::Duration;
    use serde_json::json;

    fn spec(v: Value) -> FeatureSpec {
        FeatureSpec::parse("definition", &v, &|_| true).unwrap()
    }

    fn ev(seq: u64, ty: &str, at: DateTime<Utc>, props: Value) -> StoredEvent {
        StoredEvent {
            seq,
            event: Event {
                event_id: format!("e{seq}"),
                customer_id: CustomerId::parse("c", "c1").unwrap(),
                event_type: ty.into(),
                timestamp: at,
                properties: props.as_object().cloned().unwrap_or_default(),
                position: None,
            },
        }
    }

    #[test]
    fn counts_slide_out_of_the_window_without_new_events() {
        let now = Utc::now();
        let f = spec(json!({"kind": "count", "event_type": "page_view", "window": "1d"}));
        let mut st = FeatureState::default();
        f.fold(
            &mut st,
            &ev(1, "page_view", now - Duration::hours(23), json!({})),
            now,
        );
        f.fold(
            &mut st,
            &ev(2, "page_view", now - Duration::hours(1), json!({})),
            now,
        );
        f.fold(&mut st, &ev(3, "email_open", now, json!({})), now);
        f.fold(
            &mut st,
            &ev(4, "page_view", now - Duration::days(3), json!({})),
            now,
        );
        let mut none = |_: &str| 0.0;
        assert_eq!(f.evaluate(Some(&st), now, &mut none), Ok(2.0));
        assert_eq!(
            f.evaluate(Some(&st), now + Duration::hours(2), &mut none),
            Ok(1.0)
        );
        assert_eq!(
            f.evaluate(Some(&st), now + Duration::days(1), &mut none),
            Ok(0.0)
        );
        assert_eq!(st.buckets.len(), 2, "the 3-day-old event was never stored");
    }

    #[test]
    fn counts_with_where_see_only_matching_events() {
        let now = Utc::now();
        let f = spec(
            json!({"kind": "count", "event_type": "page_view", "window": "30d",
                            "where": {"category": "travel"}}),
        );
        let mut st = FeatureState::default();
        for (seq, props) in [
            (1, json!({"category": "travel"})),
            (2, json!({"category": "books"})),
            (3, json!({})),
            (4, json!({"category": "travel", "other": 1})),
        ] {
            f.fold(&mut st, &ev(seq, "page_view", now, props), now);
        }
        assert_eq!(f.evaluate(Some(&st), now, &mut |_| 0.0), Ok(2.0));
        let stored = serde_json::to_value(&f).unwrap();
        assert_eq!(stored["where"], json!({"category": "travel"}));
        let plain = serde_json::to_value(spec(
            json!({"kind": "count", "event_type": "page_view", "window": "30d"}),
        ))
        .unwrap();
        assert!(plain.get("where").is_none(), "{plain}");
    }

    #[test]
    fn folding_is_idempotent_on_replay() {
        let now = Utc::now();
        let f = spec(
            json!({"kind": "sum", "event_type": "purchase", "property": "value", "window": "30d"}),
        );
        let mut st = FeatureState::default();
        let e1 = ev(7, "purchase", now, json!({"value": 12.5}));
        let e2 = ev(8, "purchase", now, json!({"value": "2.5"}));
        for e in [&e1, &e2, &e1, &e2] {
            f.fold(&mut st, e, now);
        }
        assert_eq!(f.evaluate(Some(&st), now, &mut |_| 0.0), Ok(15.0));
    }

    /// Two workers number the same events differently; the stream position does not.
    #[test]
    fn folding_by_stream_position_is_the_same_on_every_worker() {
        let now = Utc::now();
        let f = spec(json!({"kind": "count", "event_type": "page_view", "window": "30d"}));
        let at = |seq: u64, partition: i32, offset: i64| {
            let mut e = ev(seq, "page_view", now, json!({}));
            e.event.position = Some(crate::events::StreamPosition { partition, offset });
            e
        };
        let mut st = FeatureState::default();
        // Worker a, whose log is long: its seqs are high.
        for (seq, offset) in [(9_000, 10), (9_001, 11)] {
            assert!(f.fold(&mut st, &at(seq, 1, offset), now));
        }
        // Worker b took the partition over: a redelivered offset is counted already, the
        // next is new although b's log numbers it far lower.
        assert!(!f.fold(&mut st, &at(3, 1, 11), now), "redelivered");
        assert!(f.fold(&mut st, &at(4, 1, 12), now), "new on b");
        assert_eq!(f.evaluate(Some(&st), now, &mut |_| 0.0), Ok(3.0));
        assert_eq!(
            st.applied_seq, 0,
            "positioned events leave the log's numbering alone"
        );
        // The topic grew and the customer's key moved: the new partition counts.
        assert!(f.fold(&mut st, &at(5, 4, 0), now));
        assert!(!f.fold(&mut st, &at(5, 4, 0), now));
        // An event without a position (a single process's own log) is told by its seq.
        assert!(f.fold(&mut st, &ev(6, "page_view", now, json!({})), now));
        assert!(!f.fold(&mut st, &ev(6, "page_view", now, json!({})), now));
        assert_eq!(f.evaluate(Some(&st), now, &mut |_| 0.0), Ok(5.0));
    }

    #[test]
    fn derived_features_and_defaults() {
        let now = Utc::now();
        let ratio = spec(json!({"kind": "ratio", "numerator": "a", "denominator": "b"}));
        assert_eq!(
            ratio.evaluate(None, now, &mut |n| if n == "a" { 1.0 } else { 4.0 }),
            Ok(0.25)
        );
        assert_eq!(ratio.evaluate(None, now, &mut |_| 0.0), Ok(0.0));
        let engagement = spec(builtin_body("engagement_score"));
        let values = |n: &str| match n {
            "page_views_30d" => 5.0,
            "email_opens_30d" => 5.0,
            _ => 1.0,
        };
        let v = engagement.evaluate(None, now, &mut { values }).unwrap();
        assert!((v - (0.15 + 0.2 + 0.1)).abs() < 1e-12, "{v}");
        assert_eq!(
            engagement.evaluate(None, now, &mut |_| 100.0),
            Ok(1.0),
            "capped at 1"
        );
        let days = spec(json!({"kind": "days_since", "default": 365.0}));
        assert_eq!(days.evaluate(None, now, &mut |_| 0.0), Ok(365.0));
        let mut st = FeatureState::default();
        days.fold(
            &mut st,
            &ev(1, "anything", now - Duration::hours(36), json!({})),
            now,
        );
        assert_eq!(days.evaluate(Some(&st), now, &mut |_| 0.0), Ok(1.5));
    }

    #[test]
    fn validation_names_the_field() {
        let cases = [
            (
                json!({"kind": "count", "event_type": "x", "window": "3y"}),
                "definition: window: '3y' is not a window such as 30d, 12h or 90m",
            ),
            (
                json!({"kind": "ratio", "numerator": "nope", "denominator": "x"}),
                "definition.numerator: unknown feature 'nope'",
            ),
            (
                json!({"kind": "weighted_sum", "terms": [{"feature": "x", "weight": 1, "scale": 0}]}),
                "definition.terms[0].scale: must be > 0",
            ),
            (
                json!({"kind": "count", "event_type": "", "window": "1d"}),
                "definition.event_type: must not be empty",
            ),
        ];
        for (body, expected) in cases {
            let err = FeatureSpec::parse("definition", &body, &|n| n == "x").unwrap_err();
            assert!(err.to_string().starts_with(expected), "{err} vs {expected}");
        }
        let err = FeatureSpec::parse(
            "definition",
            &json!({"kind": "count", "event_type": "x", "window": "1d", "colour": 1}),
            &|_| true,
        )
        .unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
    }

    fn builtin_body(name: &str) -> Value {
        builtin()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, body)| body)
            .unwrap()
    }

    #[test]
    fn expressions_read_other_features() {
        let now = Utc::now();
        let f =
            spec(json!({"kind": "expression", "expression": "max(a, b) / 2 + 1", "default": 7}));
        assert!(!f.is_stateful());
        assert_eq!(f.inputs(), BTreeSet::from(["a", "b"]));
        assert_eq!(
            f.evaluate(None, now, &mut |n| if n == "a" { 3.0 } else { 5.0 }),
            Ok(3.5)
        );
        assert_eq!(
            f.evaluate(None, now, &mut |n| if n == "a" { 0.0 } else { 1.0 }),
            Ok(1.5),
            "an integer result reads as a float"
        );
        assert_eq!(
            serde_json::to_value(&f).unwrap(),
            json!({"kind": "expression", "expression": "max(a, b) / 2 + 1", "default": 7.0}),
            "stored as written, and read back the same"
        );
        assert_eq!(
            FeatureSpec::parse("f", &serde_json::to_value(&f).unwrap(), &|_| true).unwrap(),
            f
        );
    }

    #[test]
    fn a_failed_expression_reads_as_the_default_and_is_reported() {
        let now = Utc::now();
        for expression in [
            "\"high\"",
            "a > 1",
            "a / 0.0",
            "1 / 0",
            "(|f| f.call(f)).call(|f| f.call(f))",
        ] {
            let f = spec(json!({"kind": "expression", "expression": expression, "default": 0.5}));
            assert_eq!(
                f.evaluate(None, now, &mut |_| 1.0),
                Err(0.5),
                "{expression}"
            );
        }
        // An endless computation is stopped by the operations budget, not waited for.
        let long = "x".repeat(500);
        let endless = format!(
            "\"{long}\".split(\"\").reduce(|s, c| s + \"{long}\".split(\"\").reduce(|t, d| t + a, 0.0), 0.0)"
        );
        let f = spec(json!({"kind": "expression", "expression": endless}));
        assert_eq!(f.evaluate(None, now, &mut |_| 1.0), Err(0.0));
    }

    /// The built-in `engagement_score` (an expression) gives bit for bit what the
    /// `weighted_sum` it replaced gives.
    #[test]
    fn engagement_score_is_unchanged() {
        let now = Utc::now();
        let expression = spec(builtin_body("engagement_score"));
        assert!(matches!(expression.kind, FeatureKind::Expression { .. }));
        let weighted = spec(json!({"kind": "weighted_sum", "terms": [
            {"feature": "page_views_30d", "weight": 0.3, "scale": 10.0},
            {"feature": "email_opens_30d", "weight": 0.2, "scale": 5.0},
            {"feature": "form_submits_30d", "weight": 0.2, "scale": 2.0}
        ], "cap": 1.0}));
        let counts = [0.0, 1.0, 2.0, 3.0, 5.0, 7.0, 10.0, 13.0, 0.5, 1e6];
        for pv in counts {
            for opens in counts {
                for submits in counts {
                    let mut values = |n: &str| match n {
                        "page_views_30d" => pv,
                        "email_opens_30d" => opens,
                        "form_submits_30d" => submits,
                        _ => f64::NAN,
                    };
                    let a = expression.evaluate(None, now, &mut values).unwrap();
                    let b = weighted.evaluate(None, now, &mut values).unwrap();
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "{pv} {opens} {submits}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn expression_validation_names_the_field() {
        let cases = [
            (
                json!({"kind": "expression", "expression": "x + nope + y + other"}),
                "definition.expression: unknown features 'nope', 'y', 'other'",
            ),
            (
                json!({"kind": "expression", "expression": "min(1.0, x / 5.0"}),
                "definition.expression: line 1, column 17: Expecting ')'",
            ),
            (
                json!({"kind": "expression", "expression": "x +\n  * 2"}),
                "definition.expression: line 2, column 3: ",
            ),
            (
                json!({"kind": "expression", "expression": "let y = x; y"}),
                "definition.expression: line 1, column 1: Unexpected 'let'",
            ),
            (
                json!({"kind": "expression", "expression": " "}),
                "definition.expression: must not be empty",
            ),
            (
                json!({"kind": "expression", "expression": 3}),
                "definition.expression: must be a string",
            ),
            (
                json!({"kind": "expression"}),
                "definition.expression: is required",
            ),
            (
                json!({"kind": "expression", "expression": "x", "terms": []}),
                "definition.terms: unknown key",
            ),
        ];
        for (body, expected) in cases {
            let err = FeatureSpec::parse("definition", &body, &|n| n == "x").unwrap_err();
            assert!(err.to_string().starts_with(expected), "{err} vs {expected}");
        }
    }

    #[test]
    fn builtins_parse() {
        let names: Vec<_> = builtin().iter().map(|(n, _)| *n).collect();
        for (name, body) in builtin() {
            FeatureSpec::parse(name, &body, &|n| names.contains(&n)).unwrap();
        }
    }
}
