//! The rules stage of one decision: 20 candidates × the 5 example rules of `rules/`
//! (with their plugin), as a decision runs them. Target: ≤ 50 µs median on one core.
//! Each benchmark runs twice: as decisions run rules (the compiled path, with Rhai when
//! it gives up) and with Rhai alone (`.../interpreted`, how every rule ran before the
//! compiled path). Figures and the machine they come from: `docs/BENCHMARKS.md`.
//!
//! `cargo bench --bench rules`

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::json;

use tailor::content::ContentItem;
use tailor::decision::Impression;
use tailor::rules::host::{CtxData, CtxView, CustomerData, CustomerView};
use tailor::rules::runtime::{ActiveRule, RuleEffects, RuleSet};
use tailor::rules::{check_dir, engine_with, Natives, Plugins, Rule};

/// How a benchmark's rules run.
#[derive(Clone, Copy)]
enum Run {
    Compiled,
    Interpreted,
}

impl Run {
    const BOTH: [Run; 2] = [Run::Compiled, Run::Interpreted];

    fn suffix(self) -> &'static str {
        match self {
            Run::Compiled => "",
            Run::Interpreted => "/interpreted",
        }
    }

    fn apply(self, mut rule: Rule) -> Rule {
        if let Run::Interpreted = self {
            rule.compiled = None;
        }
        rule
    }
}

fn rule_set(path: Run) -> RuleSet {
    rule_set_of(|_| true, path)
}

fn rule_set_of(keep: impl Fn(&str) -> bool, path: Run) -> RuleSet {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let natives = Natives::builtin();
    let (plugins, errors) = Plugins::load_dir(&engine_with(&natives, None), &root.join("plugins"));
    assert!(errors.is_empty());
    let engine = Arc::new(engine_with(&natives, Some(&plugins)));
    let rules = check_dir(&engine, &root.join("rules"))
        .expect("rules/ is readable")
        .into_iter()
        .map(|checked| {
            let source = std::fs::read_to_string(&checked.path).unwrap();
            Arc::new(ActiveRule {
                rule: path.apply(checked.result.expect("example rules compile")),
                version: 1,
                source,
            })
        })
        .filter(|r| keep(&r.rule.meta.name))
        .collect::<Vec<_>>();
    RuleSet::new(engine, rules, Duration::from_millis(50))
}

fn candidates() -> Vec<Arc<ContentItem>> {
    (0..20)
        .map(|i| {
            let tags = match i % 4 {
                0 => vec!["premium".to_string()],
                1 => vec!["needs_agent".to_string()],
                2 => vec!["win_back".to_string()],
                _ => vec!["basics".to_string()],
            };
            Arc::new(ContentItem {
                id: format!("item-{i}"),
                content_type: "banner".into(),
                title: Some(format!("Item {i}")),
                placements: vec!["homepage_hero".into()],
                tags,
                segments: vec![],
                priority: i % 5,
                attributes: json!({"category": "shoes", "discount": i * 5})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
                active_from: None,
                active_until: None,
                frequency_cap: None,
            })
        })
        .collect()
}

fn customer() -> CustomerView {
    let now = Utc::now();
    let traits = json!({"plan": "premium", "country": "DE", "purchased": ["item-3", "item-7"]});
    CustomerView(Arc::new(CustomerData {
        id: "bench-customer".into(),
        known: true,
        traits: tailor::rules::host::to_dynamic(&traits).cast(),
        features: [("page_views_7d", 12.0), ("engagement_score", 0.7)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        segments: vec!["engaged".into(), "premium_at_risk".into()],
        personalization: true,
        marketing: true,
        analytics: true,
        impressions: (0..40)
            .map(|i| Impression {
                item_id: format!("item-{}", i % 20),
                at: now - chrono::Duration::minutes(i * 30),
            })
            .collect(),
        now,
    }))
}

fn context() -> CtxView {
    CtxView(Arc::new(CtxData {
        placement: "homepage_hero".into(),
        content_type: String::new(),
        count: 1,
        request: json!({"channel": "web", "device": "mobile", "timezone": "Europe/Berlin"}),
        now: Utc::now(),
    }))
}

fn rules_stage(c: &mut Criterion) {
    let items = candidates();
    let customer = customer();
    let ctx = context();
    for path in Run::BOTH {
        let set = rule_set(path);
        let name = format!("rules/20_candidates_x_5_rules{}", path.suffix());
        c.bench_function(&name, |b| {
            b.iter(|| {
                let mut effects = RuleEffects::neutral(items.len());
                set.decide(&customer, &ctx, &items, "homepage_hero", &mut effects);
                assert!(effects.failures.is_empty(), "{:?}", effects.failures);
                effects
            })
        });
    }
}

/// Each example rule alone, to see where the time goes.
fn each_rule(c: &mut Criterion) {
    let items = candidates();
    let customer = customer();
    let ctx = context();
    let mut group = c.benchmark_group("rules/one_rule_20_candidates");
    group.measurement_time(Duration::from_secs(2));
    for path in Run::BOTH {
        for name in [
            "frequency_cap",
            "vip_boost",
            "exclude_purchased",
            "business_hours",
            "win_back_offer",
        ] {
            let set = rule_set_of(|n| n == name, path);
            group.bench_function(format!("{name}{}", path.suffix()), |b| {
                b.iter(|| {
                    let mut effects = RuleEffects::neutral(items.len());
                    set.decide(&customer, &ctx, &items, "homepage_hero", &mut effects);
                    effects
                })
            });
        }
        let set = rule_set_of(|n| n == "frequency_cap", path);
        group.bench_function(format!("frequency_cap_1_candidate{}", path.suffix()), |b| {
            b.iter(|| {
                let mut effects = RuleEffects::neutral(1);
                set.decide(&customer, &ctx, &items[..1], "homepage_hero", &mut effects);
                effects
            })
        });
    }
    group.finish();
}

/// The floor: rules whose hooks do nothing, so only the cost of running a rule over the
/// candidates remains.
fn floor(c: &mut Criterion) {
    let items = candidates();
    let customer = customer();
    let ctx = context();
    let engine = Arc::new(tailor::rules::engine());
    let mut group = c.benchmark_group("rules/floor_20_candidates");
    group.measurement_time(Duration::from_secs(2));
    for (name, source, path) in [
        (
            "eligible_true",
            "fn eligible(c, i, x) { true }",
            Run::Compiled,
        ),
        (
            "score_identity",
            "fn score(c, i, x, s) { s }",
            Run::Compiled,
        ),
        (
            "eligible_true",
            "fn eligible(c, i, x) { true }",
            Run::Interpreted,
        ),
        (
            "score_identity",
            "fn score(c, i, x, s) { s }",
            Run::Interpreted,
        ),
    ] {
        let rule = path.apply(tailor::rules::compile(&engine, name, source).expect("compiles"));
        let name = format!("{name}{}", path.suffix());
        let set = RuleSet::new(
            engine.clone(),
            vec![Arc::new(ActiveRule {
                rule,
                version: 1,
                source: source.into(),
            })],
            Duration::from_millis(50),
        );
        group.bench_function(&name, |b| {
            b.iter(|| {
                let mut effects = RuleEffects::neutral(items.len());
                set.decide(&customer, &ctx, &items, "homepage_hero", &mut effects);
                effects
            })
        });
    }
    group.finish();
}

criterion_group!(benches, rules_stage, each_rule, floor);
criterion_main!(benches);
