//! The rule loader and evaluation under arbitrary input: any bytes as a rule file are
//! compiled with the sandboxed engine (with the committed plugins importable) and, when
//! they compile, run as a decision over 20 candidates and as an event handler. Nothing
//! may panic, hang past the deadline or escape the limits; errors are fine.
//!
//! `cargo fuzz run rules` (see fuzz/README.md for seeds, the dictionary and long runs).
#![no_main]

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chrono::Utc;
use libfuzzer_sys::fuzz_target;
use serde_json::json;

use tailor::content::ContentItem;
use tailor::decision::Impression;
use tailor::rules::host::{event_map, to_dynamic, CtxData, CtxView, CustomerData, CustomerView};
use tailor::rules::runtime::{ActiveRule, RuleEffects, RuleSet};
use tailor::rules::{compile, engine_with, Engine, Natives, Plugins};

struct Fixture {
    engine: Arc<Engine>,
    items: Vec<Arc<ContentItem>>,
    customer: CustomerView,
    ctx: CtxView,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let natives = Natives::builtin();
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins");
        let (plugins, errors) = Plugins::load_dir(&engine_with(&natives, None), &dir);
        assert!(
            errors.is_empty(),
            "the committed plugins compile: {errors:?}"
        );
        let now = Utc::now();
        let items = (0..20)
            .map(|i| {
                Arc::new(ContentItem {
                    id: format!("item-{i}"),
                    content_type: "banner".into(),
                    title: Some(format!("Item {i}")),
                    placements: vec!["homepage_hero".into()],
                    tags: vec![["premium", "win_back", "needs_agent", "basics"][i % 4].into()],
                    segments: vec![],
                    priority: (i % 5) as i32,
                    attributes: json!({"category": "shoes", "discount": i * 5})
                        .as_object()
                        .cloned()
                        .unwrap_or_default(),
                    active_from: None,
                    active_until: None,
                    frequency_cap: Some(3),
                })
            })
            .collect();
        let traits = json!({"plan": "premium", "purchased": ["item-3"], "age": 41});
        let customer = CustomerView(Arc::new(CustomerData {
            id: "fuzz-customer".into(),
            known: true,
            traits: to_dynamic(&traits).cast(),
            features: [("page_views_7d".to_string(), 12.0)].into_iter().collect(),
            segments: vec!["engaged".into()],
            personalization: true,
            marketing: true,
            analytics: true,
            impressions: (0..10)
                .map(|i| Impression {
                    item_id: format!("item-{i}"),
                    at: now - chrono::Duration::hours(i),
                })
                .collect(),
            now,
        }));
        let ctx = CtxView(Arc::new(CtxData {
            placement: "homepage_hero".into(),
            content_type: String::new(),
            count: 1,
            request: json!({"channel": "web", "device": "mobile", "timezone": "Europe/Paris"}),
            now,
        }));
        Fixture {
            engine: Arc::new(engine_with(&natives, Some(&plugins))),
            items,
            customer,
            ctx,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(source) = std::str::from_utf8(data) else {
        return;
    };
    let f = fixture();
    let Ok(rule) = compile(&f.engine, "fuzz", source) else {
        return;
    };
    let set = RuleSet::new(
        f.engine.clone(),
        vec![Arc::new(ActiveRule {
            rule,
            version: 1,
            source: source.to_owned(),
        })],
        Duration::from_millis(20),
    );
    let mut effects = RuleEffects::neutral(f.items.len());
    set.decide(&f.customer, &f.ctx, &f.items, "homepage_hero", &mut effects);
    for (i, weight) in effects.weights.iter().enumerate() {
        assert!(
            *weight >= 0.0 && !weight.is_nan(),
            "item {i} got weight {weight}: weights are checked before they apply"
        );
    }
    let event = event_map("e-1", "purchase", Utc::now(), &json!({"item_id": "item-4"}));
    let _ = set.on_event(&f.customer, &event);
});
