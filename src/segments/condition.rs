//! Segment conditions: the JSON tree marketers write in `defineSegment`, its validation,
//! and its evaluation against one customer's facts.
//!
//! ```json
//! {"all": [COND, ...]}                                   // and, non-empty
//! {"any": [COND, ...]}                                   // or, non-empty
//! {"not": COND}
//! {"trait": "plan", "op": "eq", "value": "pro"}
//! {"feature": "engagement_score", "op": "gte", "value": 0.5}
//! {"event": "purchase", "atLeast": 2, "within": "30d"}
//! {"rhai": "customer.traits.plan == \"pro\" && customer.feature(\"ltv\") > 100.0"}
//! ```
//!
//! Trait ops: `eq`, `ne`, `gt`, `gte`, `lt`, `lte`, `in`, `contains`, `exists`.
//! - Numbers compare as `f64`, strings compare lexicographically (by code point), booleans
//!   only with `eq`/`ne`/`in`/`contains`; values of different JSON types are never equal
//!   and never ordered (so `gt` on a number against a string is false).
//! - `ne` is exactly `not eq`: it is true for a missing trait. Every other op is false for a
//!   missing trait. A trait whose value is `null` counts as missing.
//! - `in`: the trait equals one element of the (non-empty) value array.
//! - `contains`: the trait is an array with an element equal to the value, or a string
//!   containing the value (which must then be a string) as a substring.
//! - `exists`: the trait is present; `value` must be absent.
//!
//! Feature ops: `eq`, `ne`, `gt`, `gte`, `lt`, `lte` against a finite number. The value of a
//! feature comes from [`Facts::feature`], which supplies the default when a customer has none.
//!
//! Event nodes hold when the customer has at least `atLeast` (default 1) events of that
//! type within the window.
//!
//! Rhai nodes hold when their predicate (a [`Predicate`]: one boolean Rhai expression)
//! returns `true` for a read-only `customer` with `customer.traits` (a map; a missing trait
//! is `()`), `customer.feature("name")` (float; the default when the customer has none) and
//! `customer.event_count("page_view", "7d")` (integer). At parse time the predicate must
//! compile (errors give line and column), every feature it names with a literal must be
//! defined and every literal window must be valid. A feature, event type or window it
//! computes at run time is not checked, and makes the condition read every feature and the
//! longest window of events ([`Condition::is_dynamic`]). A predicate that fails at run time
//! (an error, a result other than a boolean, its operations budget spent) makes the whole
//! condition false for that customer, whatever `not` surrounds it: see
//! [`Condition::try_evaluate`].
//!
//! In the JSON, `null` is the same as an absent key. Every validation error is an
//! [`Error::Invalid`] whose field is a path rooted at the `field` given to
//! [`Condition::parse`], e.g. `condition.all[2].value`.

use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::customers::validate_id;
use crate::error::{Error, Result};
use crate::expressions::{EvalError, Predicate};
use crate::features::Window;

/// Deepest nesting accepted; the root node is at depth 1.
pub const MAX_DEPTH: usize = 16;
/// Most nodes accepted in one condition tree.
pub const MAX_NODES: usize = 256;
/// Longest event type accepted (the same rule as event ingestion).
const MAX_EVENT_TYPE_LEN: usize = 64;

const SHAPE_KEYS: [&str; 7] = ["all", "any", "not", "trait", "feature", "event", "rhai"];
const SHAPES: &str = "all, any, not, trait, feature, event, rhai";

/// What a condition reads about one customer. Rhai predicates hold on to a shared copy
/// while they run, hence `Send + Sync`.
pub trait Facts: Send + Sync {
    /// The customer's traits; a trait whose value is `null` counts as missing.
    fn traits(&self) -> &Map<String, Value>;
    /// The feature's current value, or its default when the customer has none.
    fn feature(&self, name: &str) -> f64;
    /// How many events of this type the customer had within the window ending now.
    fn event_count(&self, event_type: &str, within: Window) -> u64;
}

/// Comparison for traits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TraitOp {
    Eq,
    Ne,
    Gt,
    Gte,
    Lt,
    Lte,
    In,
    Contains,
    Exists,
}

impl TraitOp {
    pub const ALL: [TraitOp; 9] = [
        TraitOp::Eq,
        TraitOp::Ne,
        TraitOp::Gt,
        TraitOp::Gte,
        TraitOp::Lt,
        TraitOp::Lte,
        TraitOp::In,
        TraitOp::Contains,
        TraitOp::Exists,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TraitOp::Eq => "eq",
            TraitOp::Ne => "ne",
            TraitOp::Gt => "gt",
            TraitOp::Gte => "gte",
            TraitOp::Lt => "lt",
            TraitOp::Lte => "lte",
            TraitOp::In => "in",
            TraitOp::Contains => "contains",
            TraitOp::Exists => "exists",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|op| op.as_str() == name)
    }
}

/// Numeric comparison for features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CmpOp {
    Eq,
    Ne,
    Gt,
    Gte,
    Lt,
    Lte,
}

impl CmpOp {
    pub const ALL: [CmpOp; 6] = [
        CmpOp::Eq,
        CmpOp::Ne,
        CmpOp::Gt,
        CmpOp::Gte,
        CmpOp::Lt,
        CmpOp::Lte,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CmpOp::Eq => "eq",
            CmpOp::Ne => "ne",
            CmpOp::Gt => "gt",
            CmpOp::Gte => "gte",
            CmpOp::Lt => "lt",
            CmpOp::Lte => "lte",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|op| op.as_str() == name)
    }

    /// `left op right`; false whenever either side is NaN, except `ne`.
    pub fn compare(self, left: f64, right: f64) -> bool {
        match self {
            CmpOp::Eq => left == right,
            CmpOp::Ne => left != right,
            CmpOp::Gt => left > right,
            CmpOp::Gte => left >= right,
            CmpOp::Lt => left < right,
            CmpOp::Lte => left <= right,
        }
    }
}

/// A validated condition tree. Build it with [`Condition::parse`], which enforces the
/// limits ([`MAX_DEPTH`], [`MAX_NODES`]) and value shapes that evaluation relies on.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    All(Vec<Condition>),
    Any(Vec<Condition>),
    Not(Box<Condition>),
    /// `value` is `None` exactly for [`TraitOp::Exists`]; for [`TraitOp::In`] it is a
    /// non-empty array of strings, numbers and booleans; otherwise a string, number or boolean.
    Trait {
        name: String,
        op: TraitOp,
        value: Option<Value>,
    },
    /// `value` is finite.
    Feature {
        name: String,
        op: CmpOp,
        value: f64,
    },
    /// `at_least` is at least 1.
    EventCount {
        event_type: String,
        at_least: u32,
        within: Window,
    },
    /// A compiled Rhai predicate; its features named by literals are defined.
    Rhai(Predicate),
}

impl Condition {
    /// Validates a condition tree; `field` roots every error path (`condition.all[2].value`).
    /// `known_feature` says whether a feature name is defined.
    pub fn parse(
        field: &str,
        json: &Value,
        known_feature: &dyn Fn(&str) -> bool,
    ) -> Result<Condition> {
        Parser {
            root: field,
            known_feature,
            nodes: 0,
        }
        .node(field, json, 1)
    }

    /// The canonical JSON form; [`Condition::parse`] reads it back to an equal condition.
    pub fn to_json(&self) -> Value {
        match self {
            Condition::All(items) => {
                json!({ "all": items.iter().map(Condition::to_json).collect::<Vec<_>>() })
            }
            Condition::Any(items) => {
                json!({ "any": items.iter().map(Condition::to_json).collect::<Vec<_>>() })
            }
            Condition::Not(inner) => json!({ "not": inner.to_json() }),
            Condition::Trait { name, op, value } => {
                let mut map = Map::new();
                map.insert("trait".into(), Value::String(name.clone()));
                map.insert("op".into(), Value::String(op.as_str().into()));
                if let Some(value) = value {
                    map.insert("value".into(), value.clone());
                }
                Value::Object(map)
            }
            Condition::Feature { name, op, value } => {
                json!({ "feature": name, "op": op.as_str(), "value": number_json(*value) })
            }
            Condition::EventCount {
                event_type,
                at_least,
                within,
            } => json!({ "event": event_type, "atLeast": at_least, "within": within.to_string() }),
            Condition::Rhai(predicate) => json!({ "rhai": predicate.source() }),
        }
    }

    /// Whether the customer described by `facts` matches; a failed Rhai predicate makes
    /// it false (see [`Condition::try_evaluate`]). Never panics.
    pub fn evaluate<F: Facts + Clone + 'static>(&self, facts: &F) -> bool {
        self.try_evaluate(facts).unwrap_or(false)
    }

    /// Whether the customer described by `facts` matches, or why a Rhai predicate on the
    /// way failed. `all` and `any` stop at the first child that decides them, so a
    /// predicate they never reach cannot fail them. Each Rhai predicate evaluated gets a
    /// clone of `facts`, so make cloning cheap (share the data behind an `Arc`).
    pub fn try_evaluate<F: Facts + Clone + 'static>(
        &self,
        facts: &F,
    ) -> std::result::Result<bool, EvalError> {
        Ok(match self {
            Condition::All(items) => {
                for item in items {
                    if !item.try_evaluate(facts)? {
                        return Ok(false);
                    }
                }
                true
            }
            Condition::Any(items) => {
                for item in items {
                    if item.try_evaluate(facts)? {
                        return Ok(true);
                    }
                }
                false
            }
            Condition::Not(inner) => !inner.try_evaluate(facts)?,
            Condition::Trait { name, op, value } => {
                eval_trait(*op, facts.traits().get(name), value.as_ref())
            }
            Condition::Feature { name, op, value } => op.compare(facts.feature(name), *value),
            Condition::EventCount {
                event_type,
                at_least,
                within,
            } => facts.event_count(event_type, *within) >= u64::from(*at_least),
            Condition::Rhai(predicate) => predicate.evaluate(Arc::new(facts.clone()))?,
        })
    }

    /// The feature names referenced anywhere in the tree: by feature nodes, and by Rhai
    /// predicates with a literal name. See also [`Condition::is_dynamic`].
    pub fn features(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        self.visit(&mut |c| match c {
            Condition::Feature { name, .. } => {
                out.insert(name.clone());
            }
            Condition::Rhai(p) => out.extend(p.reads().features.iter().cloned()),
            _ => {}
        });
        out
    }

    /// The (event type, window) pairs referenced, without duplicates, in order of first
    /// use: by event nodes, and by Rhai predicates with literal arguments. See also
    /// [`Condition::is_dynamic`].
    pub fn event_windows(&self) -> Vec<(String, Window)> {
        let mut out: Vec<(String, Window)> = Vec::new();
        let mut add = |event_type: &String, within: &Window| {
            if !out.iter().any(|(t, w)| t == event_type && w == within) {
                out.push((event_type.clone(), *within));
            }
        };
        self.visit(&mut |c| match c {
            Condition::EventCount {
                event_type, within, ..
            } => add(event_type, within),
            Condition::Rhai(p) => {
                for (event_type, within) in &p.reads().events {
                    add(event_type, within);
                }
            }
            _ => {}
        });
        out
    }

    /// True when a Rhai predicate names a feature, event type or window only at run
    /// time: evaluating the condition may then read any feature, and any event count up
    /// to [`Window::LONGEST`].
    pub fn is_dynamic(&self) -> bool {
        self.any_node(&|c| matches!(c, Condition::Rhai(p) if p.reads().dynamic))
    }

    /// True when evaluating may read the customer's traits: a trait node, or any Rhai
    /// predicate (which sees the whole customer).
    pub fn reads_traits(&self) -> bool {
        self.any_node(&|c| matches!(c, Condition::Trait { .. } | Condition::Rhai(_)))
    }

    /// True when the outcome can change with time alone: any feature or event-count node,
    /// and any Rhai predicate that reads a feature, an event count or the clock.
    pub fn depends_on_time(&self) -> bool {
        self.any_node(&|c| match c {
            Condition::Feature { .. } | Condition::EventCount { .. } => true,
            Condition::Rhai(p) => {
                let r = p.reads();
                r.dynamic || r.clock || !r.features.is_empty() || !r.events.is_empty()
            }
            _ => false,
        })
    }

    /// True when an event of this type can change the outcome: an event-count node of that
    /// type, or any feature node (a feature may be computed from any event type); for Rhai
    /// predicates likewise, and any dynamic one.
    pub fn depends_on_event(&self, event_type: &str) -> bool {
        self.any_node(&|c| match c {
            Condition::Feature { .. } => true,
            Condition::EventCount { event_type: t, .. } => t == event_type,
            Condition::Rhai(p) => {
                let r = p.reads();
                r.dynamic || !r.features.is_empty() || r.events.iter().any(|(t, _)| t == event_type)
            }
            _ => false,
        })
    }

    fn visit(&self, f: &mut dyn FnMut(&Condition)) {
        f(self);
        match self {
            Condition::All(items) | Condition::Any(items) => {
                for item in items {
                    item.visit(f);
                }
            }
            Condition::Not(inner) => inner.visit(f),
            _ => {}
        }
    }

    fn any_node(&self, pred: &dyn Fn(&Condition) -> bool) -> bool {
        pred(self)
            || match self {
                Condition::All(items) | Condition::Any(items) => {
                    items.iter().any(|c| c.any_node(pred))
                }
                Condition::Not(inner) => inner.any_node(pred),
                _ => false,
            }
    }
}

/// A whole number prints as an integer (`1`, not `1.0`); both parse to the same `f64`.
fn number_json(v: f64) -> Value {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    if v.fract() == 0.0 && v.abs() < EXACT {
        Value::from(v as i64)
    } else {
        serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)
    }
}

fn eval_trait(op: TraitOp, actual: Option<&Value>, expected: Option<&Value>) -> bool {
    let actual = match actual {
        Some(v) if !v.is_null() => v,
        _ => return op == TraitOp::Ne,
    };
    if op == TraitOp::Exists {
        return true;
    }
    let Some(expected) = expected else {
        return false;
    };
    match op {
        TraitOp::Eq => scalar_eq(actual, expected),
        TraitOp::Ne => !scalar_eq(actual, expected),
        TraitOp::Gt => order(actual, expected) == Some(Ordering::Greater),
        TraitOp::Gte => matches!(
            order(actual, expected),
            Some(Ordering::Greater | Ordering::Equal)
        ),
        TraitOp::Lt => order(actual, expected) == Some(Ordering::Less),
        TraitOp::Lte => matches!(
            order(actual, expected),
            Some(Ordering::Less | Ordering::Equal)
        ),
        TraitOp::In => expected
            .as_array()
            .is_some_and(|options| options.iter().any(|o| scalar_eq(actual, o))),
        TraitOp::Contains => match actual {
            Value::Array(items) => items.iter().any(|item| scalar_eq(item, expected)),
            Value::String(s) => expected.as_str().is_some_and(|sub| s.contains(sub)),
            _ => false,
        },
        TraitOp::Exists => true,
    }
}

/// Equality of strings, numbers (as `f64`) and booleans; anything else is unequal.
fn scalar_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => x == y,
            _ => false,
        },
        (Value::String(x), Value::String(y)) => x == y,
        (Value::Bool(x), Value::Bool(y)) => x == y,
        _ => false,
    }
}

/// Order of two numbers (as `f64`) or two strings; `None` for anything else.
fn order(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64()?.partial_cmp(&y.as_f64()?),
        (Value::String(x), Value::String(y)) => Some(x.as_str().cmp(y.as_str())),
        _ => None,
    }
}

struct Parser<'a> {
    root: &'a str,
    known_feature: &'a dyn Fn(&str) -> bool,
    nodes: usize,
}

/// `null` reads as absent.
fn get<'v>(map: &'v Map<String, Value>, key: &str) -> Option<&'v Value> {
    map.get(key).filter(|v| !v.is_null())
}

fn finite(n: &serde_json::Number) -> Option<f64> {
    n.as_f64().filter(|v| v.is_finite())
}

impl Parser<'_> {
    fn node(&mut self, field: &str, json: &Value, depth: usize) -> Result<Condition> {
        if depth > MAX_DEPTH {
            return Err(Error::invalid(
                field,
                format!("nested deeper than {MAX_DEPTH}"),
            ));
        }
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(Error::invalid(
                self.root,
                format!("more than {MAX_NODES} nodes"),
            ));
        }
        let shape_error = || {
            Error::invalid(
                field,
                format!("must be an object with one of the keys {SHAPES}"),
            )
        };
        let map = json.as_object().ok_or_else(shape_error)?;
        let mut shapes = SHAPE_KEYS.into_iter().filter(|k| map.contains_key(*k));
        let shape = shapes.next().ok_or_else(shape_error)?;
        if let Some(other) = shapes.next() {
            return Err(Error::invalid(
                field,
                format!(
                    "has both '{shape}' and '{other}'; a condition has exactly one of {SHAPES}"
                ),
            ));
        }
        let allowed: &[&str] = match shape {
            "trait" | "feature" => &[shape, "op", "value"],
            "event" => &["event", "atLeast", "within"],
            _ => &[shape],
        };
        if let Some(key) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(Error::invalid(format!("{field}.{key}"), "unknown key"));
        }
        match shape {
            "all" | "any" => {
                let items = self.children(field, shape, &map[shape], depth)?;
                Ok(if shape == "all" {
                    Condition::All(items)
                } else {
                    Condition::Any(items)
                })
            }
            "not" => {
                let inner = self.node(&format!("{field}.not"), &map["not"], depth + 1)?;
                Ok(Condition::Not(Box::new(inner)))
            }
            "trait" => parse_trait(field, map),
            "feature" => parse_feature(field, map, self.known_feature),
            "event" => parse_event(field, map),
            _ => parse_rhai(field, map, self.known_feature),
        }
    }

    fn children(
        &mut self,
        field: &str,
        key: &str,
        json: &Value,
        depth: usize,
    ) -> Result<Vec<Condition>> {
        let path = format!("{field}.{key}");
        let items = json
            .as_array()
            .ok_or_else(|| Error::invalid(&path, "must be an array of conditions"))?;
        if items.is_empty() {
            return Err(Error::invalid(&path, "must not be empty"));
        }
        items
            .iter()
            .enumerate()
            .map(|(i, item)| self.node(&format!("{path}[{i}]"), item, depth + 1))
            .collect()
    }
}

fn name_field<'v>(field: &str, map: &'v Map<String, Value>, key: &str) -> Result<&'v str> {
    match get(map, key) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(Error::invalid(format!("{field}.{key}"), "must be a string")),
        None => Err(Error::invalid(format!("{field}.{key}"), "is required")),
    }
}

fn op_field<'v>(field: &str, map: &'v Map<String, Value>) -> Result<&'v str> {
    name_field(field, map, "op")
}

fn parse_trait(field: &str, map: &Map<String, Value>) -> Result<Condition> {
    let name = name_field(field, map, "trait")?;
    validate_id(&format!("{field}.trait"), name)?;
    let raw_op = op_field(field, map)?;
    let op = TraitOp::from_name(raw_op).ok_or_else(|| {
        Error::invalid(
            format!("{field}.op"),
            format!("'{raw_op}' is not a trait op (expected eq, ne, gt, gte, lt, lte, in, contains or exists)"),
        )
    })?;
    let path = format!("{field}.value");
    let value = get(map, "value");
    let value = match (op, value) {
        (TraitOp::Exists, None) => None,
        (TraitOp::Exists, Some(_)) => {
            return Err(Error::invalid(path, "must be absent for op 'exists'"))
        }
        (_, None) => {
            return Err(Error::invalid(
                path,
                format!("is required for op '{}'", op.as_str()),
            ))
        }
        (TraitOp::In, Some(value)) => {
            let options = value
                .as_array()
                .ok_or_else(|| Error::invalid(&path, "must be an array for op 'in'"))?;
            if options.is_empty() {
                return Err(Error::invalid(path, "must not be empty"));
            }
            for (i, option) in options.iter().enumerate() {
                check_scalar(&format!("{path}[{i}]"), option)?;
            }
            Some(value.clone())
        }
        (TraitOp::Gt | TraitOp::Gte | TraitOp::Lt | TraitOp::Lte, Some(value)) => {
            match value {
                Value::String(_) => {}
                Value::Number(n) if finite(n).is_some() => {}
                Value::Number(_) => return Err(Error::invalid(path, "must be a finite number")),
                _ => return Err(Error::invalid(path, "must be a number or a string")),
            }
            Some(value.clone())
        }
        (_, Some(value)) => {
            check_scalar(&path, value)?;
            Some(value.clone())
        }
    };
    Ok(Condition::Trait {
        name: name.to_owned(),
        op,
        value,
    })
}

fn check_scalar(path: &str, value: &Value) -> Result<()> {
    match value {
        Value::String(_) | Value::Bool(_) => Ok(()),
        Value::Number(n) if finite(n).is_some() => Ok(()),
        Value::Number(_) => Err(Error::invalid(path, "must be a finite number")),
        _ => Err(Error::invalid(path, "must be a string, number or boolean")),
    }
}

fn parse_feature(
    field: &str,
    map: &Map<String, Value>,
    known_feature: &dyn Fn(&str) -> bool,
) -> Result<Condition> {
    let name = name_field(field, map, "feature")?;
    if !known_feature(name) {
        return Err(Error::invalid(
            format!("{field}.feature"),
            format!("unknown feature '{name}'"),
        ));
    }
    let raw_op = op_field(field, map)?;
    let op = CmpOp::from_name(raw_op).ok_or_else(|| {
        Error::invalid(
            format!("{field}.op"),
            format!("'{raw_op}' is not a feature op (expected eq, ne, gt, gte, lt or lte)"),
        )
    })?;
    let path = format!("{field}.value");
    let value = match get(map, "value") {
        None => return Err(Error::invalid(path, "is required")),
        Some(Value::Number(n)) => {
            finite(n).ok_or_else(|| Error::invalid(&path, "must be a finite number"))?
        }
        Some(_) => return Err(Error::invalid(path, "must be a finite number")),
    };
    Ok(Condition::Feature {
        name: name.to_owned(),
        op,
        value,
    })
}

fn parse_rhai(
    field: &str,
    map: &Map<String, Value>,
    known_feature: &dyn Fn(&str) -> bool,
) -> Result<Condition> {
    let path = format!("{field}.rhai");
    let source = name_field(field, map, "rhai")?;
    let predicate = Predicate::compile(source).map_err(|e| Error::invalid(&path, e.to_string()))?;
    let unknown: Vec<&str> = predicate
        .reads()
        .features
        .iter()
        .map(String::as_str)
        .filter(|name| !known_feature(name))
        .collect();
    if !unknown.is_empty() {
        return Err(Error::unknown_features(path, &unknown));
    }
    Ok(Condition::Rhai(predicate))
}

fn parse_event(field: &str, map: &Map<String, Value>) -> Result<Condition> {
    let event_type = name_field(field, map, "event")?;
    if event_type.is_empty()
        || event_type.len() > MAX_EVENT_TYPE_LEN
        || !event_type
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'))
    {
        return Err(Error::invalid(
            format!("{field}.event"),
            format!("must be 1–{MAX_EVENT_TYPE_LEN} characters of [A-Za-z0-9_.:-]"),
        ));
    }
    let at_least = match get(map, "atLeast") {
        None => 1,
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| *n >= 1)
            .ok_or_else(|| {
                Error::invalid(
                    format!("{field}.atLeast"),
                    format!("must be an integer from 1 to {}", u32::MAX),
                )
            })?,
    };
    let path = format!("{field}.within");
    let within = match get(map, "within") {
        None => return Err(Error::invalid(path, "is required")),
        Some(Value::String(raw)) => Window::parse(&path, raw)?,
        Some(_) => {
            return Err(Error::invalid(
                path,
                "must be a string such as 30d, 12h or 90m",
            ))
        }
    };
    Ok(Condition::EventCount {
        event_type: event_type.to_owned(),
        at_least,
        within,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// Facts from JSON: `{"traits": {..}, "features": {..}, "events": {"type": {"30d": n}}}`.
    /// A feature not listed reads as 0; an event count not listed reads as 0.
    #[derive(Clone)]
    struct TestFacts {
        traits: Map<String, Value>,
        features: HashMap<String, f64>,
        events: HashMap<(String, Window), u64>,
    }

    impl TestFacts {
        fn from_json(json: Value) -> Self {
            let traits = json["traits"].as_object().cloned().unwrap_or_default();
            let features = json["features"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.as_f64().unwrap()))
                .collect();
            let mut events = HashMap::new();
            for (event_type, windows) in json["events"].as_object().into_iter().flatten() {
                for (window, count) in windows.as_object().unwrap() {
                    let window = Window::parse("test", window).unwrap();
                    events.insert((event_type.clone(), window), count.as_u64().unwrap());
                }
            }
            TestFacts {
                traits,
                features,
                events,
            }
        }
    }

    impl Facts for TestFacts {
        fn traits(&self) -> &Map<String, Value> {
            &self.traits
        }

        fn feature(&self, name: &str) -> f64 {
            self.features.get(name).copied().unwrap_or(0.0)
        }

        fn event_count(&self, event_type: &str, within: Window) -> u64 {
            self.events
                .get(&(event_type.to_owned(), within))
                .copied()
                .unwrap_or(0)
        }
    }

    fn known(name: &str) -> bool {
        matches!(name, "engagement_score" | "ltv" | "days_since_purchase")
    }

    fn parse(json: &Value) -> Result<Condition> {
        Condition::parse("condition", json, &known)
    }

    fn customer() -> TestFacts {
        TestFacts::from_json(json!({
            "traits": {
                "plan": "pro", "age": 31, "score": 2.5, "country": "FR", "verified": true,
                "tags": ["vip", "beta", 7], "nickname": "bobby", "gone": null
            },
            "features": {"engagement_score": 0.7, "ltv": 120},
            "events": {"purchase": {"30d": 3, "7d": 1}, "view": {"1d": 0}}
        }))
    }

    /// (condition, facts, expected) over `customer()` and `nobody` (a customer with no
    /// traits, features or events).
    #[rustfmt::skip]
    fn evaluation_cases<'f>(customer: &'f TestFacts, nobody: &'f TestFacts) -> Vec<(Value, &'f TestFacts, bool)> {
        let c = customer;
        vec![
            // eq / ne on strings, numbers (as f64), booleans, mismatched types, arrays
            (json!({"trait": "plan", "op": "eq", "value": "pro"}), c, true),
            (json!({"trait": "plan", "op": "eq", "value": "free"}), c, false),
            (json!({"trait": "age", "op": "eq", "value": 31.0}), c, true),
            (json!({"trait": "age", "op": "eq", "value": "31"}), c, false),
            (json!({"trait": "verified", "op": "eq", "value": true}), c, true),
            (json!({"trait": "verified", "op": "eq", "value": 1}), c, false),
            (json!({"trait": "tags", "op": "eq", "value": "vip"}), c, false),
            (json!({"trait": "plan", "op": "ne", "value": "free"}), c, true),
            (json!({"trait": "plan", "op": "ne", "value": "pro"}), c, false),
            (json!({"trait": "age", "op": "ne", "value": "31"}), c, true),
            (json!({"trait": "verified", "op": "ne", "value": false}), c, true),
            // ordering: numbers as f64, strings lexicographically, mixed types never
            (json!({"trait": "age", "op": "gt", "value": 30}), c, true),
            (json!({"trait": "age", "op": "gt", "value": 31}), c, false),
            (json!({"trait": "age", "op": "gte", "value": 31}), c, true),
            (json!({"trait": "age", "op": "gte", "value": 31.5}), c, false),
            (json!({"trait": "score", "op": "lt", "value": 2.6}), c, true),
            (json!({"trait": "score", "op": "lt", "value": 2.5}), c, false),
            (json!({"trait": "score", "op": "lte", "value": 2.5}), c, true),
            (json!({"trait": "score", "op": "lte", "value": -3}), c, false),
            (json!({"trait": "country", "op": "gt", "value": "DE"}), c, true),
            (json!({"trait": "country", "op": "lt", "value": "DE"}), c, false),
            (json!({"trait": "country", "op": "gte", "value": "FR"}), c, true),
            (json!({"trait": "country", "op": "lte", "value": "FRA"}), c, true),
            (json!({"trait": "country", "op": "gt", "value": 1}), c, false),
            (json!({"trait": "age", "op": "lt", "value": "zzz"}), c, false),
            (json!({"trait": "verified", "op": "gte", "value": 0}), c, false),
            (json!({"trait": "tags", "op": "gt", "value": "a"}), c, false),
            // in
            (json!({"trait": "plan", "op": "in", "value": ["free", "pro"]}), c, true),
            (json!({"trait": "plan", "op": "in", "value": ["free", "team"]}), c, false),
            (json!({"trait": "age", "op": "in", "value": [30, 31.0]}), c, true),
            (json!({"trait": "verified", "op": "in", "value": [true]}), c, true),
            (json!({"trait": "tags", "op": "in", "value": ["vip"]}), c, false),
            // contains: arrays by element, strings by substring
            (json!({"trait": "tags", "op": "contains", "value": "vip"}), c, true),
            (json!({"trait": "tags", "op": "contains", "value": "vi"}), c, false),
            (json!({"trait": "tags", "op": "contains", "value": 7.0}), c, true),
            (json!({"trait": "tags", "op": "contains", "value": "7"}), c, false),
            (json!({"trait": "nickname", "op": "contains", "value": "bob"}), c, true),
            (json!({"trait": "nickname", "op": "contains", "value": "alice"}), c, false),
            (json!({"trait": "age", "op": "contains", "value": 3}), c, false),
            (json!({"trait": "age", "op": "contains", "value": "3"}), c, false),
            // exists
            (json!({"trait": "plan", "op": "exists"}), c, true),
            (json!({"trait": "tags", "op": "exists"}), c, true),
            // missing traits (absent, or null): false for everything except ne
            (json!({"trait": "missing", "op": "exists"}), c, false),
            (json!({"trait": "gone", "op": "exists"}), c, false),
            (json!({"trait": "missing", "op": "eq", "value": "x"}), c, false),
            (json!({"trait": "missing", "op": "ne", "value": "x"}), c, true),
            (json!({"trait": "gone", "op": "ne", "value": "x"}), c, true),
            (json!({"trait": "missing", "op": "gt", "value": 0}), c, false),
            (json!({"trait": "missing", "op": "gte", "value": 0}), c, false),
            (json!({"trait": "missing", "op": "lt", "value": 0}), c, false),
            (json!({"trait": "missing", "op": "lte", "value": 0}), c, false),
            (json!({"trait": "missing", "op": "in", "value": ["x"]}), c, false),
            (json!({"trait": "missing", "op": "contains", "value": "x"}), c, false),
            (json!({"trait": "plan", "op": "exists"}), nobody, false),
            (json!({"trait": "plan", "op": "eq", "value": "pro"}), nobody, false),
            (json!({"trait": "plan", "op": "ne", "value": "pro"}), nobody, true),
            // features, with the caller's default (0 here) for a missing value
            (json!({"feature": "engagement_score", "op": "gte", "value": 0.5}), c, true),
            (json!({"feature": "engagement_score", "op": "gte", "value": 0.75}), c, false),
            (json!({"feature": "engagement_score", "op": "gt", "value": 0.6}), c, true),
            (json!({"feature": "engagement_score", "op": "gt", "value": 0.7}), c, false),
            (json!({"feature": "engagement_score", "op": "eq", "value": 0.7}), c, true),
            (json!({"feature": "engagement_score", "op": "ne", "value": 0.7}), c, false),
            (json!({"feature": "ltv", "op": "lt", "value": 120.5}), c, true),
            (json!({"feature": "ltv", "op": "lt", "value": 120}), c, false),
            (json!({"feature": "ltv", "op": "lte", "value": 120}), c, true),
            (json!({"feature": "ltv", "op": "lte", "value": 119}), c, false),
            (json!({"feature": "days_since_purchase", "op": "eq", "value": 0}), c, true),
            (json!({"feature": "engagement_score", "op": "lt", "value": 0.5}), nobody, true),
            // event counts
            (json!({"event": "purchase", "atLeast": 2, "within": "30d"}), c, true),
            (json!({"event": "purchase", "atLeast": 3, "within": "30d"}), c, true),
            (json!({"event": "purchase", "atLeast": 4, "within": "30d"}), c, false),
            (json!({"event": "purchase", "within": "7d"}), c, true),
            (json!({"event": "purchase", "atLeast": 2, "within": "1w"}), c, false),
            (json!({"event": "view", "within": "1d"}), c, false),
            (json!({"event": "signup", "within": "90m"}), c, false),
            (json!({"event": "purchase", "within": "30d"}), nobody, false),
            // combinators
            (json!({"all": [{"trait": "plan", "op": "eq", "value": "pro"}]}), c, true),
            (json!({"all": [{"trait": "plan", "op": "eq", "value": "pro"},
                            {"feature": "ltv", "op": "gt", "value": 100}]}), c, true),
            (json!({"all": [{"trait": "plan", "op": "eq", "value": "pro"},
                            {"feature": "ltv", "op": "gt", "value": 1000}]}), c, false),
            (json!({"any": [{"trait": "plan", "op": "eq", "value": "free"},
                            {"event": "purchase", "atLeast": 1, "within": "30d"}]}), c, true),
            (json!({"any": [{"trait": "plan", "op": "eq", "value": "free"},
                            {"trait": "country", "op": "eq", "value": "DE"}]}), c, false),
            (json!({"any": [{"trait": "plan", "op": "eq", "value": "free"}]}), nobody, false),
            (json!({"not": {"trait": "plan", "op": "eq", "value": "pro"}}), c, false),
            (json!({"not": {"trait": "plan", "op": "exists"}}), nobody, true),
            (json!({"not": {"not": {"any": [
                {"all": [{"trait": "tags", "op": "contains", "value": "beta"},
                         {"not": {"event": "view", "within": "1d"}}]},
                {"trait": "missing", "op": "exists"}]}}}), c, true),
            // rhai predicates, alone and combined
            (json!({"rhai": "customer.traits.plan == \"pro\" && customer.feature(\"ltv\") > 100.0"}), c, true),
            (json!({"rhai": "customer.traits.plan == \"pro\" && customer.feature(\"ltv\") > 100.0"}), nobody, false),
            (json!({"rhai": "customer.traits.plan == ()"}), nobody, true),
            (json!({"rhai": "customer.event_count(\"purchase\", \"30d\") >= 3"}), c, true),
            (json!({"rhai": "customer.event_count(\"purchase\", \"7d\") >= 3"}), c, false),
            (json!({"all": [{"trait": "plan", "op": "exists"},
                            {"rhai": "customer.traits.tags.contains(\"beta\")"}]}), c, true),
            (json!({"any": [{"trait": "plan", "op": "eq", "value": "free"},
                            {"rhai": "customer.traits.age >= 18"}]}), c, true),
            (json!({"not": {"rhai": "customer.feature(\"engagement_score\") < 0.5"}}), c, true),
        ]
    }

    #[test]
    fn evaluates_every_op_and_combinator() {
        let (customer, nobody) = (customer(), TestFacts::from_json(json!({})));
        for (json, facts, expected) in evaluation_cases(&customer, &nobody) {
            let condition = parse(&json).unwrap_or_else(|e| panic!("{json}: {e}"));
            let who = if std::ptr::eq(facts, &nobody) {
                "nobody"
            } else {
                "customer"
            };
            assert_eq!(condition.evaluate(facts), expected, "{json} for {who}");
        }
    }

    #[test]
    fn round_trips_through_json() {
        let (customer, nobody) = (customer(), TestFacts::from_json(json!({})));
        for (json, _, _) in evaluation_cases(&customer, &nobody) {
            let condition = parse(&json).unwrap();
            let again = parse(&condition.to_json()).unwrap_or_else(|e| panic!("{json}: {e}"));
            assert_eq!(again, condition, "{json}");
            assert_eq!(again.to_json(), condition.to_json(), "{json}");
        }
    }

    #[test]
    fn to_json_is_canonical() {
        let condition = parse(&json!({"all": [
            {"event": "purchase", "within": "1w", "atLeast": null},
            {"feature": "ltv", "op": "gte", "value": 100.0},
            {"feature": "engagement_score", "op": "lt", "value": 0.25},
            {"trait": "plan", "op": "exists", "value": null}
        ]}))
        .unwrap();
        assert_eq!(
            condition.to_json(),
            json!({"all": [
                {"event": "purchase", "atLeast": 1, "within": "7d"},
                {"feature": "ltv", "op": "gte", "value": 100},
                {"feature": "engagement_score", "op": "lt", "value": 0.25},
                {"trait": "plan", "op": "exists"}
            ]})
        );
    }

    fn nested(depth: usize) -> Value {
        (1..depth).fold(
            json!({"trait": "plan", "op": "exists"}),
            |inner, _| json!({ "not": inner }),
        )
    }

    fn wide(children: usize) -> Value {
        json!({ "any": vec![json!({"trait": "plan", "op": "exists"}); children] })
    }

    #[test]
    fn limits_allow_exactly_the_maximum() {
        assert!(parse(&nested(MAX_DEPTH)).is_ok());
        assert!(parse(&wide(MAX_NODES - 1)).is_ok());
    }

    /// (invalid condition, the exact error).
    #[rustfmt::skip]
    fn invalid_cases() -> Vec<(Value, String)> {
        let long_type = "e".repeat(65);
        vec![
            // shapes and keys
            (json!("plan"), "condition: must be an object with one of the keys all, any, not, trait, feature, event, rhai".into()),
            (json!({}), "condition: must be an object with one of the keys all, any, not, trait, feature, event, rhai".into()),
            (json!({"op": "eq", "value": 1}), "condition: must be an object with one of the keys all, any, not, trait, feature, event, rhai".into()),
            (json!({"all": [{"trait": "a", "op": "exists"}], "any": []}), "condition: has both 'all' and 'any'; a condition has exactly one of all, any, not, trait, feature, event, rhai".into()),
            (json!({"trait": "plan", "feature": "ltv", "op": "eq", "value": 1}), "condition: has both 'trait' and 'feature'; a condition has exactly one of all, any, not, trait, feature, event, rhai".into()),
            (json!({"any": [{"trait": "a", "op": "exists"}, {"trait": "plan", "opp": "eq", "value": "pro"}]}), "condition.any[1].opp: unknown key".into()),
            (json!({"not": {"trait": "a", "op": "exists"}, "negate": true}), "condition.negate: unknown key".into()),
            (json!({"feature": "ltv", "op": "gt", "value": 1, "default": 0}), "condition.default: unknown key".into()),
            (json!({"event": "purchase", "within": "30d", "op": "gte"}), "condition.op: unknown key".into()),
            (json!({"all": [{"trait": "a", "op": "exists"}, 3]}), "condition.all[1]: must be an object with one of the keys all, any, not, trait, feature, event, rhai".into()),
            (json!({"not": null}), "condition.not: must be an object with one of the keys all, any, not, trait, feature, event, rhai".into()),
            // combinators
            (json!({"all": []}), "condition.all: must not be empty".into()),
            (json!({"any": []}), "condition.any: must not be empty".into()),
            (json!({"all": {"trait": "a", "op": "exists"}}), "condition.all: must be an array of conditions".into()),
            (json!({"any": [{"all": [{"any": []}]}]}), "condition.any[0].all[0].any: must not be empty".into()),
            // traits
            (json!({"trait": 3, "op": "exists"}), "condition.trait: must be a string".into()),
            (json!({"trait": "", "op": "exists"}), "condition.trait: must not be empty".into()),
            (json!({"trait": "plan"}), "condition.op: is required".into()),
            (json!({"trait": "plan", "op": 1, "value": 1}), "condition.op: must be a string".into()),
            (json!({"trait": "plan", "op": "equals", "value": "pro"}), "condition.op: 'equals' is not a trait op (expected eq, ne, gt, gte, lt, lte, in, contains or exists)".into()),
            (json!({"trait": "plan", "op": "eq"}), "condition.value: is required for op 'eq'".into()),
            (json!({"trait": "plan", "op": "ne", "value": null}), "condition.value: is required for op 'ne'".into()),
            (json!({"trait": "plan", "op": "eq", "value": ["pro"]}), "condition.value: must be a string, number or boolean".into()),
            (json!({"trait": "plan", "op": "contains", "value": {"a": 1}}), "condition.value: must be a string, number or boolean".into()),
            (json!({"trait": "age", "op": "gt", "value": true}), "condition.value: must be a number or a string".into()),
            (json!({"trait": "age", "op": "lte"}), "condition.value: is required for op 'lte'".into()),
            (json!({"trait": "plan", "op": "in", "value": "pro"}), "condition.value: must be an array for op 'in'".into()),
            (json!({"trait": "plan", "op": "in", "value": []}), "condition.value: must not be empty".into()),
            (json!({"trait": "plan", "op": "in", "value": ["pro", null]}), "condition.value[1]: must be a string, number or boolean".into()),
            (json!({"trait": "plan", "op": "exists", "value": true}), "condition.value: must be absent for op 'exists'".into()),
            // features
            (json!({"feature": "clv", "op": "gt", "value": 1}), "condition.feature: unknown feature 'clv'".into()),
            (json!({"feature": ["ltv"], "op": "gt", "value": 1}), "condition.feature: must be a string".into()),
            (json!({"feature": "ltv", "op": "in", "value": [1]}), "condition.op: 'in' is not a feature op (expected eq, ne, gt, gte, lt or lte)".into()),
            (json!({"feature": "ltv", "op": "exists"}), "condition.op: 'exists' is not a feature op (expected eq, ne, gt, gte, lt or lte)".into()),
            (json!({"feature": "ltv", "op": "gt"}), "condition.value: is required".into()),
            (json!({"feature": "ltv", "op": "gt", "value": "100"}), "condition.value: must be a finite number".into()),
            // events
            (json!({"event": "purchase"}), "condition.within: is required".into()),
            (json!({"event": "purchase", "within": 30}), "condition.within: must be a string such as 30d, 12h or 90m".into()),
            (json!({"event": "purchase", "within": "30y"}), "condition.within: '30y' is not a window such as 30d, 12h or 90m".into()),
            (json!({"event": "purchase", "within": "400d"}), "condition.within: must be between 1m and 366d".into()),
            (json!({"event": "purchase", "atLeast": 0, "within": "30d"}), "condition.atLeast: must be an integer from 1 to 4294967295".into()),
            (json!({"event": "purchase", "atLeast": 1.5, "within": "30d"}), "condition.atLeast: must be an integer from 1 to 4294967295".into()),
            (json!({"event": "purchase", "atLeast": -1, "within": "30d"}), "condition.atLeast: must be an integer from 1 to 4294967295".into()),
            (json!({"event": "purchase", "atLeast": 4294967296u64, "within": "30d"}), "condition.atLeast: must be an integer from 1 to 4294967295".into()),
            (json!({"event": "purchase", "atLeast": "2", "within": "30d"}), "condition.atLeast: must be an integer from 1 to 4294967295".into()),
            (json!({"event": "", "within": "30d"}), "condition.event: must be 1–64 characters of [A-Za-z0-9_.:-]".into()),
            (json!({"event": "add to cart", "within": "30d"}), "condition.event: must be 1–64 characters of [A-Za-z0-9_.:-]".into()),
            (json!({"event": long_type, "within": "30d"}), "condition.event: must be 1–64 characters of [A-Za-z0-9_.:-]".into()),
            (json!({"event": true, "within": "30d"}), "condition.event: must be a string".into()),
            // limits
            (nested(MAX_DEPTH + 1), format!("condition{}: nested deeper than 16", ".not".repeat(MAX_DEPTH))),
            (json!({"all": [nested(MAX_DEPTH)]}), format!("condition.all[0]{}: nested deeper than 16", ".not".repeat(MAX_DEPTH - 1))),
            (wide(MAX_NODES), "condition: more than 256 nodes".into()),
            // rhai
            (json!({"rhai": 3}), "condition.rhai: must be a string".into()),
            (json!({"rhai": null}), "condition.rhai: is required".into()),
            (json!({"rhai": " "}), "condition.rhai: must not be empty".into()),
            (json!({"rhai": "customer.traits.plan =="}), "condition.rhai: line 1, column 24: Script is incomplete".into()),
            (json!({"rhai": "plan == \"pro\""}), "condition.rhai: line 1, column 1: Undefined variable: plan".into()),
            (json!({"all": [{"trait": "a", "op": "exists"},
                            {"rhai": "customer.feature(\"clv\") > 1.0 || customer.feature(\"ltv\") > customer.feature(\"x\")"}]}),
             "condition.all[1].rhai: unknown features 'clv', 'x'".into()),
            (json!({"rhai": "customer.event_count(\"click\", \"3y\") > 0"}), "condition.rhai: line 1, column 10: '3y' is not a window such as 30d, 12h or 90m".into()),
            (json!({"rhai": "true", "op": "eq"}), "condition.op: unknown key".into()),
            (json!({"rhai": "true", "trait": "plan"}), "condition: has both 'trait' and 'rhai'; a condition has exactly one of all, any, not, trait, feature, event, rhai".into()),
            (json!({"all": [wide(200), wide(100)]}), "condition: more than 256 nodes".into()),
        ]
    }

    #[test]
    fn rejects_invalid_conditions_naming_the_field() {
        for (json, expected) in invalid_cases() {
            let err = parse(&json).expect_err(&json.to_string());
            assert!(matches!(err, Error::Invalid { .. }), "{json}: {err:?}");
            assert_eq!(err.to_string(), expected, "{json}");
        }
    }

    #[test]
    fn errors_are_rooted_at_the_given_field() {
        let err = Condition::parse(
            "segments[3].condition",
            &json!({"not": {"all": [{"trait": "a", "op": "exists"}, {"feature": "x", "op": "eq", "value": 1}]}}),
            &known,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "segments[3].condition.not.all[1].feature: unknown feature 'x'"
        );
    }

    #[test]
    fn reports_what_a_condition_depends_on() {
        let condition = parse(&json!({"any": [
            {"all": [
                {"trait": "plan", "op": "eq", "value": "pro"},
                {"feature": "ltv", "op": "gt", "value": 100},
                {"event": "purchase", "atLeast": 2, "within": "30d"}
            ]},
            {"not": {"any": [
                {"feature": "engagement_score", "op": "lt", "value": 0.2},
                {"event": "purchase", "within": "1w"},
                {"event": "purchase", "atLeast": 5, "within": "30d"},
                {"event": "view", "within": "12h"},
                {"feature": "ltv", "op": "lt", "value": 5}
            ]}}
        ]}))
        .unwrap();
        assert_eq!(
            condition.features(),
            BTreeSet::from(["engagement_score".to_owned(), "ltv".to_owned()])
        );
        assert_eq!(
            condition.event_windows(),
            vec![
                ("purchase".to_owned(), Window::days(30)),
                ("purchase".to_owned(), Window::days(7)),
                ("view".to_owned(), Window::parse("w", "12h").unwrap()),
            ]
        );
        assert!(condition.depends_on_time());
        assert!(condition.depends_on_event("purchase"));
        assert!(
            condition.depends_on_event("signup"),
            "features may read any event"
        );

        let events_only = parse(&json!({"all": [
            {"trait": "plan", "op": "exists"},
            {"not": {"event": "purchase", "within": "30d"}}
        ]}))
        .unwrap();
        assert!(events_only.features().is_empty());
        assert!(events_only.depends_on_time());
        assert!(events_only.depends_on_event("purchase"));
        assert!(!events_only.depends_on_event("view"));

        let traits_only = parse(&json!({"any": [
            {"trait": "plan", "op": "exists"},
            {"not": {"trait": "country", "op": "in", "value": ["FR", "DE"]}}
        ]}))
        .unwrap();
        assert!(!traits_only.depends_on_time());
        assert!(!traits_only.depends_on_event("purchase"));
        assert!(traits_only.event_windows().is_empty());
        assert!(traits_only.features().is_empty());
    }

    #[test]
    fn reports_what_a_rhai_predicate_depends_on() {
        let literal = parse(&json!({"all": [
            {"trait": "plan", "op": "exists"},
            {"rhai": "customer.event_count(\"purchase\", \"7d\") > 0 && customer.feature(\"ltv\") > 1.0"},
            {"event": "purchase", "within": "7d"}
        ]}))
        .unwrap();
        assert_eq!(literal.features(), BTreeSet::from(["ltv".to_owned()]));
        assert_eq!(
            literal.event_windows(),
            vec![("purchase".to_owned(), Window::days(7))]
        );
        assert!(!literal.is_dynamic());
        assert!(literal.depends_on_time());
        assert!(
            literal.depends_on_event("signup"),
            "features may read any event"
        );

        let events_only =
            parse(&json!({"rhai": "customer.event_count(\"purchase\", \"7d\") > 0"})).unwrap();
        assert!(events_only.depends_on_time());
        assert!(events_only.depends_on_event("purchase"));
        assert!(!events_only.depends_on_event("view"));

        let traits_only = parse(&json!({"rhai": "customer.traits.plan == \"pro\""})).unwrap();
        assert!(!traits_only.depends_on_time());
        assert!(!traits_only.depends_on_event("purchase"));
        assert!(!traits_only.is_dynamic());
        assert!(traits_only.features().is_empty());

        let dynamic = parse(&json!({"not": {"rhai":
            "customer.feature(customer.traits.favourite) > 1.0"}}))
        .unwrap();
        assert!(dynamic.is_dynamic());
        assert!(dynamic.depends_on_time());
        assert!(dynamic.depends_on_event("anything"));
    }

    #[test]
    fn a_failed_predicate_makes_the_whole_condition_false() {
        let facts = customer();
        let failing = json!({"rhai": "customer.traits.plan"});
        for json in [
            failing.clone(),
            json!({"not": failing}),
            json!({"any": [{"not": failing}, {"trait": "plan", "op": "eq", "value": "free"}]}),
        ] {
            let condition = parse(&json).unwrap();
            let err = condition.try_evaluate(&facts).unwrap_err();
            assert_eq!(err.to_string(), "returned string, not true or false");
            assert!(!condition.evaluate(&facts), "{json}");
        }
        // A predicate that is never reached cannot fail the condition.
        let decided = [
            (
                json!({"any": [{"trait": "plan", "op": "eq", "value": "pro"}, failing]}),
                true,
            ),
            (
                json!({"all": [{"trait": "plan", "op": "eq", "value": "free"}, failing]}),
                false,
            ),
        ];
        for (json, expected) in decided {
            assert_eq!(
                parse(&json).unwrap().try_evaluate(&facts),
                Ok(expected),
                "{json}"
            );
        }
    }

    #[test]
    fn hand_built_conditions_never_panic() {
        // Shapes parse would reject still evaluate to a plain answer.
        let facts = customer();
        let odd = [
            Condition::Trait {
                name: "plan".into(),
                op: TraitOp::Eq,
                value: None,
            },
            Condition::Trait {
                name: "plan".into(),
                op: TraitOp::In,
                value: Some(json!("pro")),
            },
            Condition::Feature {
                name: "ltv".into(),
                op: CmpOp::Gt,
                value: f64::NAN,
            },
            Condition::All(vec![]),
        ];
        let results: Vec<bool> = odd.iter().map(|c| c.evaluate(&facts)).collect();
        assert_eq!(results, [false, false, false, true]);
    }
}
