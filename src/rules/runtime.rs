//! Running rules: the active rule set, evaluated over a decision's candidates in
//! priority order (filters, weights, pins, with a trace for `explain`), and on events.
//!
//! Each rule runs once per decision over every candidate still eligible, in one
//! evaluation with its own deadline and operation budget. A rule that fails (throws,
//! returns the wrong type, runs out of budget) is skipped for the whole decision: none
//! of its effects apply, and the failure is reported for metrics and the explanation.
//!
//! A rule whose hooks [`compiled`](super::compiled) translated runs natively; when that
//! gives up (or its operation bound nears the budget), the same rule runs in Rhai, so
//! what a decision sees is always what the interpreter answers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rhai::{Array, Dynamic, Engine, Map, Scope};
use serde::Serialize;

use super::compiled::{Answer, Program};
use super::host::{self, CtxView, CustomerView, ItemView};
use super::{describe, with_deadline, Rule, MAX_OPERATIONS};
use crate::content::ContentItem;

/// A rule as it is active: compiled, with where it came from.
#[derive(Debug, Clone)]
pub struct ActiveRule {
    pub rule: Rule,
    pub version: u32,
    pub source: String,
}

/// The active rules with the engine they were compiled for; replaced as a whole when a
/// rule or plugin changes, so a decision sees one consistent set.
pub struct RuleSet {
    engine: Arc<Engine>,
    /// Enabled or not; highest priority first, then by name.
    rules: Vec<Arc<ActiveRule>>,
    needs_impressions: bool,
    budget: Duration,
}

/// What one rule did to one item.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "effect", rename_all = "snake_case")]
pub enum Effect {
    Filtered { rule: String },
    Weighted { rule: String, from: f64, to: f64 },
    Pinned { rule: String },
}

/// A rule skipped for a decision or an event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuleFailure {
    pub rule: String,
    pub error: String,
}

/// What the rules did to a decision's candidates (indexed like them).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RuleEffects {
    /// Multiplies the policy's score; `f64::INFINITY` is a pin.
    pub weights: Vec<f64>,
    /// The rule that removed the item, if one did.
    pub filtered: Vec<Option<String>>,
    /// Per item, every effect in the order the rules ran.
    pub trace: Vec<Vec<Effect>>,
    pub failures: Vec<RuleFailure>,
    /// Rules that filtered, re-weighted or pinned at least one item.
    pub fired: Vec<String>,
}

impl RuleEffects {
    /// No rules: every item eligible with weight 1.
    pub fn neutral(count: usize) -> Self {
        RuleEffects {
            weights: vec![1.0; count],
            filtered: vec![None; count],
            trace: vec![Vec::new(); count],
            ..Default::default()
        }
    }

    pub fn is_pinned(&self, i: usize) -> bool {
        self.weights[i] == f64::INFINITY
    }

    /// Removes item `i` for a reason that is not a script (a frequency cap on the item).
    pub fn filter(&mut self, i: usize, by: &str) {
        self.filtered[i] = Some(by.to_owned());
        self.trace[i].push(Effect::Filtered {
            rule: by.to_owned(),
        });
        if !self.fired.iter().any(|f| f == by) {
            self.fired.push(by.to_owned());
        }
    }
}

/// What one rule's evaluation returned, before it is applied.
enum Verdict {
    Keep,
    Filter,
    Weight(f64),
}

impl RuleSet {
    pub fn new(engine: Arc<Engine>, mut rules: Vec<Arc<ActiveRule>>, budget: Duration) -> Self {
        rules.sort_by(|a, b| {
            b.rule
                .meta
                .priority
                .cmp(&a.rule.meta.priority)
                .then_with(|| a.rule.meta.name.cmp(&b.rule.meta.name))
        });
        let needs_impressions = rules
            .iter()
            .any(|r| r.rule.meta.enabled && r.source.contains("impressions"));
        RuleSet {
            engine,
            rules,
            needs_impressions,
            budget,
        }
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The same set with only the rules named in `names` (an experiment variant's rule
    /// set); names that are not in the set are ignored.
    pub fn restricted(&self, names: &[String]) -> RuleSet {
        let rules = self
            .rules
            .iter()
            .filter(|r| names.contains(&r.rule.meta.name))
            .cloned()
            .collect();
        RuleSet::new(self.engine.clone(), rules, self.budget)
    }

    /// Every rule, enabled or not, in the order they run.
    pub fn rules(&self) -> &[Arc<ActiveRule>] {
        &self.rules
    }

    pub fn get(&self, name: &str) -> Option<&Arc<ActiveRule>> {
        self.rules.iter().find(|r| r.rule.meta.name == name)
    }

    /// Whether decisions must load the customer's impressions for these rules.
    pub fn needs_impressions(&self) -> bool {
        self.needs_impressions
    }

    /// Whether any enabled rule has an `eligible` or `score` hook.
    pub fn decides(&self) -> bool {
        self.rules
            .iter()
            .any(|r| r.rule.meta.enabled && r.rule.decide.is_some())
    }

    /// Whether any enabled rule has an `on_event` hook.
    pub fn handles_events(&self) -> bool {
        self.rules
            .iter()
            .any(|r| r.rule.meta.enabled && r.rule.event.is_some())
    }

    fn applies(rule: &ActiveRule, placement: &str) -> bool {
        let meta = &rule.rule.meta;
        meta.enabled
            && (meta.placements.is_empty() || meta.placements.iter().any(|p| p == placement))
    }

    /// Runs the `eligible` and `score` hooks of every enabled rule for `placement` over
    /// the candidates, highest priority first. `effects` starts as
    /// [`RuleEffects::neutral`] (or with items already filtered) and is updated in place.
    pub fn decide(
        &self,
        customer: &CustomerView,
        ctx: &CtxView,
        items: &[Arc<ContentItem>],
        placement: &str,
        effects: &mut RuleEffects,
    ) {
        // Built once for every rule of the decision.
        let mut views: Option<Vec<ItemView>> = None;
        for active in &self.rules {
            let Some(ast) = active.rule.decide.as_ref() else {
                continue;
            };
            if !Self::applies(active, placement) {
                continue;
            }
            let alive: Vec<usize> = (0..items.len())
                .filter(|&i| effects.filtered[i].is_none())
                .collect();
            if alive.is_empty() {
                break;
            }
            let name = &active.rule.meta.name;
            let views = views.get_or_insert_with(|| {
                items
                    .iter()
                    .map(|item| ItemView::new(item.clone()))
                    .collect()
            });
            let compiled = active
                .rule
                .compiled
                .as_deref()
                .filter(|p| p.cost(alive.len()) <= MAX_OPERATIONS / 4)
                .and_then(|p| run_compiled(p, customer, ctx, views, &alive, effects));
            let verdicts = match compiled {
                Some(verdicts) => Ok(verdicts),
                None => self.run_decide(
                    &active.rule,
                    ast,
                    customer,
                    ctx,
                    items,
                    views,
                    &alive,
                    effects,
                ),
            };
            match verdicts {
                Ok(verdicts) => apply(name, &alive, verdicts, effects),
                Err(error) => effects.failures.push(RuleFailure {
                    rule: name.clone(),
                    error,
                }),
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn run_decide(
        &self,
        rule: &Rule,
        ast: &rhai::AST,
        customer: &CustomerView,
        ctx: &CtxView,
        items: &[Arc<ContentItem>],
        views: &[ItemView],
        alive: &[usize],
        effects: &RuleEffects,
    ) -> Result<Vec<Verdict>, String> {
        let mut scope = Scope::new();
        scope.push("__customer", customer.clone());
        scope.push("__ctx", ctx.clone());
        scope.push(
            "__items",
            alive
                .iter()
                .map(|&i| Dynamic::from(views[i].clone()))
                .collect::<Array>(),
        );
        scope.push(
            "__weights",
            alive
                .iter()
                .map(|&i| Dynamic::from(effects.weights[i]))
                .collect::<Array>(),
        );
        scope.push(
            "__pinned",
            alive
                .iter()
                .map(|&i| Dynamic::from(effects.is_pinned(i)))
                .collect::<Array>(),
        );
        let out = with_deadline(Instant::now() + self.budget, || {
            self.engine.eval_ast_with_scope::<Array>(&mut scope, ast)
        })
        .map_err(|e| describe(&e))?;
        let mut out = out.into_iter();
        let (Some(eligible), Some(scores)) = (out.next(), out.next()) else {
            return Err("the script returned early from its top level".into());
        };
        let (Ok(eligible), Ok(scores)) = (eligible.into_array(), scores.into_array()) else {
            return Err("the script returned early from its top level".into());
        };
        let mut eligible = eligible.into_iter();
        let mut scores = scores.into_iter();
        let mut verdicts = Vec::with_capacity(alive.len());
        for &i in alive {
            if rule.has("eligible") {
                let value = eligible.next().ok_or("eligible: missing result")?;
                let ok = value.as_bool().map_err(|t| {
                    format!(
                        "eligible returned {t} for item '{}', not true or false",
                        items[i].id
                    )
                })?;
                if !ok {
                    verdicts.push(Verdict::Filter);
                    continue;
                }
            }
            if rule.has("score") && !effects.is_pinned(i) {
                let value = scores.next().ok_or("score: missing result")?;
                let weight = host::as_number(&value).ok_or_else(|| {
                    format!(
                        "score returned {} for item '{}', not a number",
                        value.type_name(),
                        items[i].id
                    )
                })?;
                if weight.is_nan() || weight < 0.0 {
                    return Err(format!(
                        "score returned {weight} for item '{}': must be at least 0 (or pin())",
                        items[i].id
                    ));
                }
                verdicts.push(Verdict::Weight(weight));
            } else {
                verdicts.push(Verdict::Keep);
            }
        }
        Ok(verdicts)
    }

    /// Runs every enabled rule's `on_event` hook for one event, highest priority first.
    /// Returns the trait changes to merge into the customer's profile (a `()` value
    /// removes a trait; when two rules set one trait the higher-priority rule wins) and
    /// the rules that failed.
    pub fn on_event(
        &self,
        customer: &CustomerView,
        event: &Map,
    ) -> (serde_json::Map<String, serde_json::Value>, Vec<RuleFailure>) {
        let mut changes = serde_json::Map::new();
        let mut failures = Vec::new();
        for active in &self.rules {
            let Some(ast) = active.rule.event.as_ref() else {
                continue;
            };
            if !active.rule.meta.enabled {
                continue;
            }
            let name = &active.rule.meta.name;
            let mut scope = Scope::new();
            scope.push("__customer", customer.clone());
            scope.push("__event", event.clone());
            let result = with_deadline(Instant::now() + self.budget, || {
                self.engine.eval_ast_with_scope::<Dynamic>(&mut scope, ast)
            })
            .map_err(|e| describe(&e))
            .and_then(|value| trait_changes(&value));
            match result {
                Ok(set) => {
                    for (key, value) in set {
                        changes.entry(key).or_insert(value);
                    }
                }
                Err(error) => failures.push(RuleFailure {
                    rule: name.clone(),
                    error,
                }),
            }
        }
        (changes, failures)
    }
}

/// The rule's compiled hooks over the candidates still alive; `None` when they gave up
/// and the interpreter must decide.
fn run_compiled(
    program: &Program,
    customer: &CustomerView,
    ctx: &CtxView,
    views: &[ItemView],
    alive: &[usize],
    effects: &RuleEffects,
) -> Option<Vec<Verdict>> {
    let items: Vec<&ItemView> = alive.iter().map(|&i| &views[i]).collect();
    let weights: Vec<f64> = alive.iter().map(|&i| effects.weights[i]).collect();
    let pinned: Vec<bool> = alive.iter().map(|&i| effects.is_pinned(i)).collect();
    let answers = program
        .run(&customer.0, &ctx.0, &items, &weights, &pinned)
        .ok()?;
    Some(
        answers
            .into_iter()
            .map(|a| match a {
                Answer::Filter => Verdict::Filter,
                Answer::Keep => Verdict::Keep,
                Answer::Weight(w) => Verdict::Weight(w),
            })
            .collect(),
    )
}

/// `on_event`'s result: `()` for nothing, or a map of traits to set.
fn trait_changes(value: &Dynamic) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    if value.is_unit() {
        return Ok(serde_json::Map::new());
    }
    match host::to_json(value) {
        Some(serde_json::Value::Object(map)) => Ok(map),
        _ => Err(format!(
            "on_event returned {}, not a map of traits to set (or nothing)",
            value.type_name()
        )),
    }
}

fn apply(rule: &str, alive: &[usize], verdicts: Vec<Verdict>, effects: &mut RuleEffects) {
    let mut fired = false;
    for (&i, verdict) in alive.iter().zip(verdicts) {
        match verdict {
            Verdict::Keep => {}
            Verdict::Filter => {
                effects.filtered[i] = Some(rule.to_owned());
                effects.trace[i].push(Effect::Filtered {
                    rule: rule.to_owned(),
                });
                fired = true;
            }
            Verdict::Weight(to) => {
                let from = effects.weights[i];
                if to == from {
                    continue;
                }
                effects.weights[i] = to;
                effects.trace[i].push(if to == f64::INFINITY {
                    Effect::Pinned {
                        rule: rule.to_owned(),
                    }
                } else {
                    Effect::Weighted {
                        rule: rule.to_owned(),
                        from,
                        to,
                    }
                });
                fired = true;
            }
        }
    }
    if fired && !effects.fired.iter().any(|f| f == rule) {
        effects.fired.push(rule.to_owned());
    }
}
