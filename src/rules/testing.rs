//! Marketers' test cases for rules: `rules/NAME.test.toml` beside `rules/NAME.rhai`,
//! each case a customer, an item and a context (or an event) with what the rule must
//! answer. `tailor rules test DIR` runs them; no Rust needed to write one.
//!
//! ```toml
//! [[case]]
//! name = "third banner today is capped"
//! customer = { traits = { plan = "gold" }, impressions = { "hero-1" = 3 } }
//! item = { id = "hero-1", type = "banner" }
//! context = { placement = "homepage_hero", time = "2026-11-27T10:00:00Z" }
//! expect = { eligible = false }
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::host::{self, event_map, CtxData, CtxView, CustomerData, CustomerView};
use super::runtime::{ActiveRule, RuleEffects, RuleSet};
use super::{compile, Rule};
use crate::content::ContentItem;
use crate::decision::Impression;
use crate::features::Window;

/// The budget a test case's rule runs with (generous: test machines are slow).
const BUDGET: Duration = Duration::from_secs(1);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestFile {
    #[serde(rename = "case", default)]
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    #[serde(default)]
    customer: CustomerCase,
    #[serde(default)]
    item: Option<Value>,
    #[serde(default)]
    context: ContextCase,
    /// The weight `score` receives (default 1.0).
    #[serde(default = "one")]
    score: f64,
    #[serde(default)]
    event: Option<EventCase>,
    expect: Expect,
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CustomerCase {
    #[serde(default = "default_customer")]
    id: String,
    #[serde(default)]
    traits: Map<String, Value>,
    #[serde(default)]
    features: BTreeMap<String, f64>,
    #[serde(default)]
    segments: Vec<String>,
    #[serde(default = "yes")]
    personalization: bool,
    #[serde(default = "yes")]
    marketing: bool,
    #[serde(default = "yes")]
    analytics: bool,
    /// Impressions per item id: a count (shown one minute before the case's time) or a
    /// list of how long ago each was shown (`["2h", "3d"]`).
    #[serde(default)]
    impressions: BTreeMap<String, ImpressionCase>,
}

fn default_customer() -> String {
    "test-customer".into()
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ImpressionCase {
    Count(u32),
    Ago(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ContextCase {
    #[serde(default)]
    placement: String,
    #[serde(default)]
    content_type: String,
    /// RFC 3339; default: now.
    #[serde(default)]
    time: Option<DateTime<Utc>>,
    /// The request's `context` JSON (channel, device, timezone, ...).
    #[serde(default)]
    request: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventCase {
    #[serde(rename = "type")]
    event_type: String,
    #[serde(default)]
    properties: Map<String, Value>,
    #[serde(default)]
    time: Option<DateTime<Utc>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    eligible: Option<bool>,
    score: Option<f64>,
    pinned: Option<bool>,
    /// The traits `on_event` sets.
    traits: Option<Map<String, Value>>,
    /// A part of the error message the rule fails with.
    error: Option<String>,
}

/// The outcome of one test file.
#[derive(Debug)]
pub struct FileReport {
    pub path: PathBuf,
    pub passed: usize,
    /// (case name, what went wrong); a case named `-` is a problem with the file.
    pub failed: Vec<(String, String)>,
}

/// Runs every `*.test.toml` in `dir` against the rule file beside it, compiled with
/// `engine` (which holds the plugins).
pub fn run_dir(engine: &Arc<rhai::Engine>, dir: &Path) -> std::io::Result<Vec<FileReport>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".test.toml"))
        .collect();
    paths.sort();
    let mut reports = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(&path)?;
        let name = path
            .file_name()
            .map(|n| {
                n.to_string_lossy()
                    .trim_end_matches(".test.toml")
                    .to_owned()
            })
            .unwrap_or_default();
        let rule_path = dir.join(format!("{name}.rhai"));
        let report = match std::fs::read_to_string(&rule_path) {
            Ok(source) => run_file(engine, &name, &source, &text),
            Err(e) => Err(format!("cannot read {}: {e}", rule_path.display())),
        };
        reports.push(match report {
            Ok((passed, failed)) => FileReport {
                path,
                passed,
                failed,
            },
            Err(problem) => FileReport {
                path,
                passed: 0,
                failed: vec![("-".into(), problem)],
            },
        });
    }
    Ok(reports)
}

type Outcome = (usize, Vec<(String, String)>);

/// Runs the cases of one test file (`text`) against one rule's source.
pub fn run_file(
    engine: &Arc<rhai::Engine>,
    default_name: &str,
    source: &str,
    text: &str,
) -> Result<Outcome, String> {
    let file: TestFile = toml::from_str(text).map_err(|e| e.to_string())?;
    if file.cases.is_empty() {
        return Err("no [[case]] in the file".into());
    }
    let rule = compile(engine, default_name, source).map_err(|e| format!("rule: {e}"))?;
    let set = RuleSet::new(
        engine.clone(),
        vec![Arc::new(ActiveRule {
            rule: rule.clone(),
            version: 1,
            source: source.to_owned(),
        })],
        BUDGET,
    );
    let mut passed = 0;
    let mut failed = Vec::new();
    for case in file.cases {
        match run_case(&set, &rule, &case) {
            Ok(()) => passed += 1,
            Err(why) => failed.push((case.name.clone(), why)),
        }
    }
    Ok((passed, failed))
}

fn run_case(set: &RuleSet, rule: &Rule, case: &Case) -> Result<(), String> {
    let now = case.context.time.unwrap_or_else(Utc::now);
    let customer = customer_view(&case.customer, now)?;
    if let Some(event) = &case.event {
        return event_case(set, &customer, event, now, &case.expect);
    }
    let item_json = case
        .item
        .clone()
        .ok_or("a case needs an item (or an event)")?;
    let mut item_json = item_json;
    if let Value::Object(map) = &mut item_json {
        map.entry("type").or_insert_with(|| Value::from("banner"));
    }
    let item: ContentItem = serde_json::from_value(item_json).map_err(|e| format!("item: {e}"))?;
    let placement = case.context.placement.clone();
    let ctx = CtxView(Arc::new(CtxData {
        placement: placement.clone(),
        content_type: case.context.content_type.clone(),
        count: 1,
        request: case.context.request.clone().unwrap_or(Value::Null),
        now,
    }));
    let mut effects = RuleEffects::neutral(1);
    effects.weights[0] = case.score;
    let items = [Arc::new(item)];
    // The case tests the rule's hooks whatever its metadata says.
    let mut always = rule.clone();
    always.meta.enabled = true;
    always.meta.placements.clear();
    let set = RuleSet::new(
        set.engine().clone(),
        vec![Arc::new(ActiveRule {
            rule: always,
            version: 1,
            source: String::new(),
        })],
        BUDGET,
    );
    set.decide(&customer, &ctx, &items, &placement, &mut effects);
    let expect = &case.expect;
    if let Some(failure) = effects.failures.first() {
        return match &expect.error {
            Some(part) if failure.error.contains(part.as_str()) => Ok(()),
            _ => Err(format!("the rule failed: {}", failure.error)),
        };
    }
    if let Some(part) = &expect.error {
        return Err(format!(
            "expected an error containing '{part}', the rule succeeded"
        ));
    }
    let eligible = effects.filtered[0].is_none();
    let mut problems = Vec::new();
    if let Some(want) = expect.eligible {
        if want != eligible {
            problems.push(format!("eligible: expected {want}, got {eligible}"));
        }
    }
    if let Some(want) = expect.pinned {
        let pinned = effects.is_pinned(0);
        if want != pinned {
            problems.push(format!("pinned: expected {want}, got {pinned}"));
        }
    }
    if let Some(want) = expect.score {
        let got = effects.weights[0];
        if !eligible {
            problems.push(format!("score: expected {want}, but the item was filtered"));
        } else if (got - want).abs() > 1e-9 * want.abs().max(1.0) {
            problems.push(format!("score: expected {want}, got {got}"));
        }
    }
    if expect.eligible.is_none()
        && expect.score.is_none()
        && expect.pinned.is_none()
        && expect.traits.is_none()
    {
        problems.push("expect names nothing to check (eligible, score, pinned, error)".into());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

fn event_case(
    set: &RuleSet,
    customer: &CustomerView,
    event: &EventCase,
    now: DateTime<Utc>,
    expect: &Expect,
) -> Result<(), String> {
    let at = event.time.unwrap_or(now);
    let view = event_map(
        "test-event",
        &event.event_type,
        at,
        &Value::Object(event.properties.clone()),
    );
    let (changes, failures) = set.on_event(customer, &view);
    if let Some(failure) = failures.first() {
        return match &expect.error {
            Some(part) if failure.error.contains(part.as_str()) => Ok(()),
            _ => Err(format!("the rule failed: {}", failure.error)),
        };
    }
    let want = expect
        .traits
        .as_ref()
        .ok_or("an event case expects `traits` (the traits on_event sets)")?;
    if &changes != want {
        return Err(format!(
            "traits: expected {}, got {}",
            Value::Object(want.clone()),
            Value::Object(changes)
        ));
    }
    Ok(())
}

fn customer_view(case: &CustomerCase, now: DateTime<Utc>) -> Result<CustomerView, String> {
    let mut impressions = Vec::new();
    for (item, shown) in &case.impressions {
        match shown {
            ImpressionCase::Count(n) => {
                for _ in 0..*n {
                    impressions.push(Impression {
                        item_id: item.clone(),
                        at: now - chrono::Duration::minutes(1),
                    });
                }
            }
            ImpressionCase::Ago(list) => {
                for ago in list {
                    let window = Window::parse(&format!("customer.impressions.{item}"), ago)
                        .map_err(|e| e.to_string())?;
                    impressions.push(Impression {
                        item_id: item.clone(),
                        at: now - window.duration(),
                    });
                }
            }
        }
    }
    impressions.sort_by_key(|i| std::cmp::Reverse(i.at));
    let traits = host::to_dynamic(&Value::Object(case.traits.clone()));
    Ok(CustomerView(Arc::new(CustomerData {
        id: case.id.clone(),
        known: true,
        traits: traits.try_cast::<rhai::Map>().unwrap_or_default(),
        features: case.features.clone(),
        segments: case.segments.clone(),
        personalization: case.personalization,
        marketing: case.marketing,
        analytics: case.analytics,
        impressions,
        now,
    })))
}
