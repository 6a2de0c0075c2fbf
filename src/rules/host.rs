//! What scripts see: the customer, the item, the request context, time and durations,
//! each a read-only Rhai type over data the decision already holds. Documented for
//! marketers in `rules/README.md`; the names there are this module's names.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Datelike, Duration, FixedOffset, Timelike, Utc};
use rhai::{Array, Dynamic, Engine, EvalAltResult, ImmutableString, Map};
use serde_json::Value;

use crate::content::ContentItem;
use crate::decision::Impression;
use crate::features::Window;

type Fallible<T> = Result<T, Box<EvalAltResult>>;

/// A JSON value as a Rhai value (objects become maps, arrays arrays, null `()`).
pub fn to_dynamic(value: &Value) -> Dynamic {
    match value {
        Value::Null => Dynamic::UNIT,
        Value::Bool(b) => (*b).into(),
        Value::Number(n) => match n.as_i64() {
            Some(i) => i.into(),
            None => n.as_f64().unwrap_or(f64::NAN).into(),
        },
        Value::String(s) => s.as_str().into(),
        Value::Array(items) => items.iter().map(to_dynamic).collect::<Array>().into(),
        Value::Object(map) => map_of(map).into(),
    }
}

/// A JSON object as a Rhai map (as `customer.traits`, say).
pub fn map_of(map: &serde_json::Map<String, Value>) -> Map {
    map.iter()
        .map(|(k, v)| (k.as_str().into(), to_dynamic(v)))
        .collect()
}

/// A Rhai value as JSON; `None` for what JSON cannot hold (functions, custom types, NaN).
pub fn to_json(value: &Dynamic) -> Option<Value> {
    if value.is_unit() {
        return Some(Value::Null);
    }
    if let Ok(b) = value.as_bool() {
        return Some(Value::Bool(b));
    }
    if let Ok(i) = value.as_int() {
        return Some(Value::from(i));
    }
    if let Ok(f) = value.as_float() {
        return serde_json::Number::from_f64(f).map(Value::Number);
    }
    if value.is_string() {
        return Some(Value::String(value.clone().into_string().ok()?));
    }
    if value.is_array() {
        let items = value.read_lock::<Array>()?;
        return items
            .iter()
            .map(to_json)
            .collect::<Option<Vec<_>>>()
            .map(Value::Array);
    }
    if value.is_map() {
        let map = value.read_lock::<Map>()?;
        return map
            .iter()
            .map(|(k, v)| Some((k.to_string(), to_json(v)?)))
            .collect::<Option<serde_json::Map<_, _>>>()
            .map(Value::Object);
    }
    None
}

/// A number a script returned, as f64.
pub fn as_number(value: &Dynamic) -> Option<f64> {
    value
        .as_float()
        .ok()
        .or_else(|| value.as_int().ok().map(|i| i as f64))
}

/// The customer a decision is for.
#[derive(Debug, Clone)]
pub struct CustomerView(pub Arc<CustomerData>);

#[derive(Debug, Clone, Default)]
pub struct CustomerData {
    pub id: String,
    /// Whether the customer has a profile.
    pub known: bool,
    pub traits: Map,
    pub features: BTreeMap<String, f64>,
    pub segments: Vec<String>,
    /// What the customer's consent allows, defaults applied.
    pub personalization: bool,
    pub marketing: bool,
    pub analytics: bool,
    /// Items shown to the customer, newest first (what the decision store returned).
    pub impressions: Vec<Impression>,
    /// The decision's time: impression windows end here.
    pub now: DateTime<Utc>,
}

impl CustomerData {
    /// Impressions of `item` (every item when `None`) within `window` before now.
    pub fn impressions(&self, item: Option<&str>, window: Window) -> i64 {
        count_impressions(&self.impressions, item, self.now - window.duration())
    }

    /// Impressions per item within `window` before now: what [`CustomerData::impressions`]
    /// answers for each item (absent: 0), counted in one pass for a whole decision.
    pub fn impressions_by_item(&self, window: Window) -> HashMap<&str, i64> {
        let mut counts = HashMap::new();
        for shown in recent(&self.impressions, self.now - window.duration()) {
            *counts.entry(shown.item_id.as_str()).or_insert(0) += 1;
        }
        counts
    }

    /// `customer.in_segment(name)`.
    pub fn in_segment(&self, name: &str) -> bool {
        self.segments.iter().any(|s| s == name)
    }

    /// `customer.feature(name)`: `0.0` when missing.
    pub fn feature(&self, name: &str) -> f64 {
        self.features.get(name).copied().unwrap_or(0.0)
    }

    /// `customer.traits[name]`: `None` when missing (`()` to scripts).
    pub fn trait_value(&self, name: &str) -> Option<&Dynamic> {
        self.traits.get(name)
    }
}

/// Impressions (newest first) of `item`, or of every item when `None`, at or after `since`.
pub fn count_impressions(
    impressions: &[Impression],
    item: Option<&str>,
    since: DateTime<Utc>,
) -> i64 {
    recent(impressions, since)
        .filter(|i| item.is_none_or(|id| i.item_id == id))
        .count() as i64
}

/// The impressions (newest first) at or after `since`.
fn recent(impressions: &[Impression], since: DateTime<Utc>) -> impl Iterator<Item = &Impression> {
    impressions.iter().take_while(move |i| i.at >= since)
}

/// The map `on_event` receives: `id`, `type`, `time` (a Time), `properties`.
pub fn event_map(id: &str, event_type: &str, at: DateTime<Utc>, properties: &Value) -> Map {
    let mut map = Map::new();
    map.insert("id".into(), id.into());
    map.insert("type".into(), event_type.into());
    map.insert("time".into(), Dynamic::from(Time(at.fixed_offset())));
    map.insert("properties".into(), to_dynamic(properties));
    map
}

/// A candidate item, with its id ready as a script string (read once per rule and
/// candidate by most rules).
#[derive(Debug, Clone)]
pub struct ItemView {
    item: Arc<ContentItem>,
    id: ImmutableString,
}

impl ItemView {
    pub fn new(item: Arc<ContentItem>) -> Self {
        let id = item.id.as_str().into();
        ItemView { item, id }
    }

    pub fn item(&self) -> &ContentItem {
        &self.item
    }

    /// `item.id`.
    pub fn id(&self) -> &ImmutableString {
        &self.id
    }

    /// `item.has_tag(tag)`.
    pub fn has_tag(&self, tag: &str) -> bool {
        self.item.tags.iter().any(|t| t == tag)
    }

    /// `item.attr(name)`: `()` when missing.
    pub fn attr(&self, name: &str) -> Dynamic {
        self.item
            .attributes
            .get(name)
            .map_or(Dynamic::UNIT, to_dynamic)
    }

    /// `item.title`: `()` when missing.
    pub fn title(&self) -> Dynamic {
        self.item
            .title
            .as_deref()
            .map_or(Dynamic::UNIT, |t| t.into())
    }

    /// `item.frequency_cap`: `()` when missing.
    pub fn frequency_cap(&self) -> Dynamic {
        self.item
            .frequency_cap
            .map_or(Dynamic::UNIT, |c| Dynamic::from(i64::from(c)))
    }
}

/// The request: placement, channel, device, time and the whole request context.
#[derive(Debug, Clone)]
pub struct CtxView(pub Arc<CtxData>);

#[derive(Debug, Clone)]
pub struct CtxData {
    pub placement: String,
    pub content_type: String,
    pub count: i64,
    /// The request's `context` JSON.
    pub request: Value,
    pub now: DateTime<Utc>,
}

impl CtxData {
    /// A text field of the request context (`ctx.channel`, `ctx.device`); `""` when
    /// absent.
    pub fn text(&self, key: &str) -> ImmutableString {
        self.request
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .into()
    }

    /// The request's time zone (`context.timezone`, an IANA name or a `+02:00` offset);
    /// UTC when absent or unknown.
    fn zone(&self) -> FixedOffset {
        self.request
            .get("timezone")
            .and_then(Value::as_str)
            .and_then(|tz| offset_at(tz, self.now))
            .unwrap_or(FixedOffset::east_opt(0).expect("zero offset"))
    }

    /// `ctx.now`.
    pub fn now_time(&self) -> Time {
        Time(self.now.fixed_offset())
    }

    /// `ctx.local_time`.
    pub fn local_time(&self) -> Time {
        Time(self.now.with_timezone(&self.zone()))
    }
}

/// A point in time with the offset it is shown in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Time(pub DateTime<FixedOffset>);

impl Time {
    pub fn year(&self) -> i64 {
        i64::from(self.0.year())
    }

    pub fn month(&self) -> i64 {
        i64::from(self.0.month())
    }

    pub fn day(&self) -> i64 {
        i64::from(self.0.day())
    }

    pub fn hour(&self) -> i64 {
        i64::from(self.0.hour())
    }

    pub fn minute(&self) -> i64 {
        i64::from(self.0.minute())
    }

    /// 1 = Monday … 7 = Sunday (ISO 8601).
    pub fn weekday(&self) -> i64 {
        i64::from(self.0.weekday().number_from_monday())
    }

    /// `"2026-11-27"`.
    pub fn date(&self) -> String {
        self.0.format("%Y-%m-%d").to_string()
    }

    pub fn timestamp(&self) -> i64 {
        self.0.timestamp()
    }
}

/// A length of time (may be negative: the difference of two times).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Span(pub Duration);

/// The offset of `zone` (IANA name or `±HH:MM`) at `at`.
fn offset_at(zone: &str, at: DateTime<Utc>) -> Option<FixedOffset> {
    if let Ok(tz) = zone.parse::<chrono_tz::Tz>() {
        return Some(at.with_timezone(&tz).fixed_offset().offset().to_owned());
    }
    DateTime::parse_from_rfc3339(&format!("2000-01-01T00:00:00{zone}"))
        .ok()
        .map(|t| *t.offset())
}

/// An impression window as scripts write it (`"1d"`).
pub fn window(raw: &str) -> Fallible<Window> {
    Window::parse("window", raw).map_err(|e| e.to_string().into())
}

fn span_of(unit_ms: f64, n: f64) -> Fallible<Span> {
    let ms = n * unit_ms;
    if !ms.is_finite() || ms.abs() > 1e15 {
        return Err(format!("duration out of range: {n}").into());
    }
    Ok(Span(Duration::milliseconds(ms as i64)))
}

fn shift(t: Time, d: Span, sign: i32) -> Fallible<Time> {
    let moved = if sign > 0 {
        t.0.checked_add_signed(d.0)
    } else {
        t.0.checked_sub_signed(d.0)
    };
    moved.map(Time).ok_or_else(|| "time out of range".into())
}

/// Registers every host type and helper on `engine`.
pub fn register(engine: &mut Engine) {
    register_customer(engine);
    register_traits(engine);
    register_item(engine);
    register_ctx(engine);
    register_time(engine);
}

fn register_customer(engine: &mut Engine) {
    engine
        .register_type_with_name::<CustomerView>("Customer")
        .register_get("id", |c: &mut CustomerView| -> ImmutableString {
            c.0.id.as_str().into()
        })
        .register_get("known", |c: &mut CustomerView| c.0.known)
        .register_get("traits", |c: &mut CustomerView| Traits(c.0.clone()))
        .register_get("features", |c: &mut CustomerView| -> Map {
            c.0.features
                .iter()
                .map(|(k, v)| (k.as_str().into(), (*v).into()))
                .collect()
        })
        .register_fn("feature", |c: &mut CustomerView, name: &str| {
            c.0.feature(name)
        })
        .register_get("segments", |c: &mut CustomerView| -> Array {
            c.0.segments.iter().map(|s| s.as_str().into()).collect()
        })
        .register_fn("in_segment", |c: &mut CustomerView, name: &str| {
            c.0.in_segment(name)
        })
        .register_get("consent", |c: &mut CustomerView| -> Map {
            let mut map = Map::new();
            map.insert("personalization".into(), c.0.personalization.into());
            map.insert("marketing".into(), c.0.marketing.into());
            map.insert("analytics".into(), c.0.analytics.into());
            map
        })
        .register_fn(
            "impressions",
            |c: &mut CustomerView, item: &str, within: &str| -> Fallible<i64> {
                Ok(c.0.impressions(Some(item), window(within)?))
            },
        )
        .register_fn(
            "impressions",
            |c: &mut CustomerView, within: &str| -> Fallible<i64> {
                Ok(c.0.impressions(None, window(within)?))
            },
        )
        .register_fn("to_string", |c: &mut CustomerView| {
            format!("Customer({})", c.0.id)
        })
        .register_fn("to_debug", |c: &mut CustomerView| {
            format!("Customer({})", c.0.id)
        });
}

/// `customer.traits`: a read-only view of the customer's traits. Reading a trait
/// (`customer.traits.plan`, `customer.traits["plan"]`) copies that trait only; a missing
/// trait is `()`. `to_map()` gives a copy of them all as a map.
///
/// A view, not a map, because a hook reads traits once per candidate: copying every
/// trait (lists included) on each read was the largest cost of the example rules.
#[derive(Debug, Clone)]
pub struct Traits(Arc<CustomerData>);

fn register_traits(engine: &mut Engine) {
    fn get(t: &mut Traits, name: &str) -> Dynamic {
        t.0.trait_value(name).cloned().unwrap_or(Dynamic::UNIT)
    }
    engine
        .register_type_with_name::<Traits>("Traits")
        // `traits.plan` falls back to this indexer for any property name.
        .register_indexer_get(get)
        .register_fn("get", get)
        .register_fn("contains", |t: &mut Traits, name: &str| {
            t.0.traits.contains_key(name)
        })
        .register_fn("keys", |t: &mut Traits| -> Array {
            t.0.traits.keys().map(|k| k.clone().into()).collect()
        })
        .register_fn("values", |t: &mut Traits| -> Array {
            t.0.traits.values().cloned().collect()
        })
        .register_fn("len", |t: &mut Traits| t.0.traits.len() as i64)
        .register_fn("is_empty", |t: &mut Traits| t.0.traits.is_empty())
        .register_fn("to_map", |t: &mut Traits| t.0.traits.clone())
        .register_fn("to_string", |t: &mut Traits| format!("{:?}", t.0.traits))
        .register_fn("to_debug", |t: &mut Traits| format!("{:?}", t.0.traits));
}

fn register_item(engine: &mut Engine) {
    fn strings(list: &[String]) -> Array {
        list.iter().map(|s| s.as_str().into()).collect()
    }
    engine
        .register_type_with_name::<ItemView>("Item")
        .register_get("id", |i: &mut ItemView| i.id.clone())
        .register_get("type", |i: &mut ItemView| -> ImmutableString {
            i.item.content_type.as_str().into()
        })
        .register_get("title", |i: &mut ItemView| i.title())
        .register_get("tags", |i: &mut ItemView| strings(&i.item.tags))
        .register_fn("has_tag", |i: &mut ItemView, tag: &str| i.has_tag(tag))
        .register_get("placements", |i: &mut ItemView| strings(&i.item.placements))
        .register_get("segments", |i: &mut ItemView| strings(&i.item.segments))
        .register_get("priority", |i: &mut ItemView| i64::from(i.item.priority))
        .register_get("attributes", |i: &mut ItemView| map_of(&i.item.attributes))
        .register_fn("attr", |i: &mut ItemView, name: &str| i.attr(name))
        .register_get("frequency_cap", |i: &mut ItemView| i.frequency_cap())
        .register_fn("to_string", |i: &mut ItemView| {
            format!("Item({})", i.item.id)
        })
        .register_fn("to_debug", |i: &mut ItemView| {
            format!("Item({})", i.item.id)
        });
}

fn register_ctx(engine: &mut Engine) {
    engine
        .register_type_with_name::<CtxView>("Context")
        .register_get("placement", |x: &mut CtxView| -> ImmutableString {
            x.0.placement.as_str().into()
        })
        .register_get("content_type", |x: &mut CtxView| -> ImmutableString {
            x.0.content_type.as_str().into()
        })
        .register_get("count", |x: &mut CtxView| x.0.count)
        .register_get("channel", |x: &mut CtxView| x.0.text("channel"))
        .register_get("device", |x: &mut CtxView| x.0.text("device"))
        .register_get("request", |x: &mut CtxView| to_dynamic(&x.0.request))
        .register_get("now", |x: &mut CtxView| x.0.now_time())
        .register_get("local_time", |x: &mut CtxView| x.0.local_time())
        .register_fn("to_string", |_: &mut CtxView| "Context".to_string())
        .register_fn("to_debug", |_: &mut CtxView| "Context".to_string());
}

fn register_time(engine: &mut Engine) {
    engine
        .register_type_with_name::<Time>("Time")
        .register_fn("time", |raw: &str| -> Fallible<Time> {
            DateTime::parse_from_rfc3339(raw)
                .map(Time)
                .map_err(|e| format!("'{raw}' is not an RFC 3339 time: {e}").into())
        })
        .register_get("year", |t: &mut Time| t.year())
        .register_get("month", |t: &mut Time| t.month())
        .register_get("day", |t: &mut Time| t.day())
        .register_get("hour", |t: &mut Time| t.hour())
        .register_get("minute", |t: &mut Time| t.minute())
        .register_get("weekday", |t: &mut Time| t.weekday())
        .register_get("date", |t: &mut Time| t.date())
        .register_get("timestamp", |t: &mut Time| t.timestamp())
        .register_fn("in_zone", |t: &mut Time, zone: &str| -> Fallible<Time> {
            let offset = offset_at(zone, t.0.to_utc())
                .ok_or_else(|| format!("unknown time zone '{zone}'"))?;
            Ok(Time(t.0.with_timezone(&offset)))
        })
        .register_fn("+", |t: Time, d: Span| shift(t, d, 1))
        .register_fn("-", |t: Time, d: Span| shift(t, d, -1))
        .register_fn("-", |a: Time, b: Time| Span(a.0.signed_duration_since(b.0)))
        .register_fn("==", |a: Time, b: Time| a.0 == b.0)
        .register_fn("!=", |a: Time, b: Time| a.0 != b.0)
        .register_fn("<", |a: Time, b: Time| a.0 < b.0)
        .register_fn("<=", |a: Time, b: Time| a.0 <= b.0)
        .register_fn(">", |a: Time, b: Time| a.0 > b.0)
        .register_fn(">=", |a: Time, b: Time| a.0 >= b.0)
        .register_fn("to_string", |t: &mut Time| t.0.to_rfc3339())
        .register_fn("to_debug", |t: &mut Time| t.0.to_rfc3339());

    const MINUTE: f64 = 60_000.0;
    for (name, unit) in [
        ("days", 24.0 * 60.0 * MINUTE),
        ("hours", 60.0 * MINUTE),
        ("minutes", MINUTE),
        ("seconds", 1000.0),
    ] {
        engine
            .register_fn(name, move |n: i64| span_of(unit, n as f64))
            .register_fn(name, move |n: f64| span_of(unit, n))
            .register_get(name, move |d: &mut Span| {
                d.0.num_milliseconds() as f64 / unit
            });
    }
    engine
        .register_type_with_name::<Span>("Duration")
        .register_fn("duration", |raw: &str| -> Fallible<Span> {
            Ok(Span(window(raw)?.duration()))
        })
        .register_fn("+", |a: Span, b: Span| Span(a.0 + b.0))
        .register_fn("-", |a: Span, b: Span| Span(a.0 - b.0))
        .register_fn("*", |a: Span, n: i64| {
            span_of(a.0.num_milliseconds() as f64, n as f64)
        })
        .register_fn("*", |a: Span, n: f64| {
            span_of(a.0.num_milliseconds() as f64, n)
        })
        .register_fn("==", |a: Span, b: Span| a == b)
        .register_fn("!=", |a: Span, b: Span| a != b)
        .register_fn("<", |a: Span, b: Span| a < b)
        .register_fn("<=", |a: Span, b: Span| a <= b)
        .register_fn(">", |a: Span, b: Span| a > b)
        .register_fn(">=", |a: Span, b: Span| a >= b)
        .register_fn("to_string", |d: &mut Span| {
            format!("{}ms", d.0.num_milliseconds())
        })
        .register_fn("to_debug", |d: &mut Span| {
            format!("{}ms", d.0.num_milliseconds())
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traits_read_like_a_map_without_being_copied_whole_and_cannot_be_changed() {
        let engine = crate::rules::engine();
        let traits = to_dynamic(&serde_json::json!({"plan": "gold", "bought": ["a", "b"]}));
        let customer = CustomerView(Arc::new(CustomerData {
            id: "c1".into(),
            traits: traits.cast(),
            ..Default::default()
        }));
        let eval = |script: &str| {
            let mut scope = rhai::Scope::new();
            scope.push("customer", customer.clone());
            engine.eval_with_scope::<Dynamic>(&mut scope, script)
        };
        let text = |script: &str| eval(script).unwrap().to_string();
        assert_eq!(text("customer.traits.plan"), "gold");
        assert_eq!(text(r#"customer.traits["plan"]"#), "gold");
        assert_eq!(text(r#"customer.traits.get("plan")"#), "gold");
        assert!(eval("customer.traits.missing").unwrap().is_unit());
        assert_eq!(text(r#"customer.traits.missing ?? "free""#), "free");
        assert_eq!(text(r#"customer.traits.bought.contains("b")"#), "true");
        assert_eq!(text(r#""plan" in customer.traits"#), "true");
        assert_eq!(text(r#"customer.traits.contains("nope")"#), "false");
        assert_eq!(text("customer.traits.len()"), "2");
        assert_eq!(text("customer.traits.keys()"), r#"["bought", "plan"]"#);
        assert_eq!(text("type_of(customer.traits.to_map())"), "map");
        // A copy as a map may be changed; the customer's traits stay as they were.
        assert_eq!(
            text(
                r#"let m = customer.traits.to_map(); m.plan = "x"; m.plan + customer.traits.plan"#
            ),
            "xgold"
        );
        // The view itself has no setters: writing a trait is an error, not a change.
        assert!(eval(r#"customer.traits.plan = "x"; 1"#).is_err());
        assert!(eval(r#"let t = customer.traits; t.plan = "x"; 1"#).is_err());
        assert_eq!(text("customer.traits.plan"), "gold");
    }
}
