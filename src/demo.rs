//! The synthetic demo world: customers with traits and 30 days of events, a catalog over
//! three placements, and segments — built on first start of `tailor serve --demo`.
//!
//! Outcomes in the demo come from a hidden preference structure: every customer has a
//! persona (never stored) that favours one content category; [`click_probability`]
//! says how likely a customer is to respond to an item, so simulations and later
//! learning can be checked against the truth.

use std::collections::BTreeSet;

use chrono::{Duration, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

use crate::app::Engine;
use crate::content::ContentItem;
use crate::customers::{parse_traits, Consent, CustomerId, CustomerUpdate, Pii};
use crate::error::Result;

pub const CUSTOMERS: usize = 10_000;
pub const PLACEMENTS: [&str; 3] = ["homepage_hero", "email_offer", "sidebar"];
const CATEGORIES: [&str; 6] = [
    "electronics",
    "travel",
    "fashion",
    "home",
    "sports",
    "books",
];
const COUNTRIES: [&str; 5] = ["FR", "DE", "US", "GB", "ES"];
const SEED: u64 = 20_261_127;

/// The hidden persona of a demo customer: the category they favour, and how active
/// they are (events per day).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Persona {
    pub favourite: &'static str,
    pub activity: f64,
}

pub fn customer_id(i: usize) -> String {
    format!("cust-{i:05}")
}

/// The persona of demo customer `i`, derived from the seed (the same on every machine).
pub fn persona(i: usize) -> Persona {
    let mut rng = StdRng::seed_from_u64(SEED ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    Persona {
        favourite: CATEGORIES[rng.random_range(0..CATEGORIES.len())],
        activity: rng.random_range(0.05..1.5),
    }
}

/// The true probability that demo customer `i` clicks or converts on `item`: 2% base,
/// 25 points more for their favourite category, scaled up a little for active customers.
pub fn click_probability(i: usize, item: &ContentItem) -> f64 {
    let p = persona(i);
    let affinity = if item.tags.iter().any(|t| t == p.favourite) {
        0.25
    } else {
        0.0
    };
    ((0.02 + affinity) * (0.8 + 0.2 * p.activity)).min(1.0)
}

pub fn catalog() -> Vec<ContentItem> {
    let types = [
        ("homepage_hero", "banner"),
        ("email_offer", "email"),
        ("sidebar", "offer"),
    ];
    let mut items = Vec::new();
    for (p, (placement, content_type)) in types.iter().enumerate() {
        for (c, category) in CATEGORIES.iter().enumerate() {
            for variant in 0..4 {
                let id = format!(
                    "{}-{category}-{variant}",
                    &placement[..placement.find('_').unwrap_or(placement.len())]
                );
                let segments = match variant {
                    3 => vec!["engaged".to_string()],
                    _ => vec![],
                };
                items.push(ContentItem {
                    id,
                    content_type: content_type.to_string(),
                    title: Some(format!(
                        "{} {category} #{variant}",
                        capitalise(content_type)
                    )),
                    placements: vec![placement.to_string()],
                    tags: vec![category.to_string()],
                    segments,
                    priority: ((p + c + variant) % 5) as i32,
                    attributes: json!({"category": category, "discount": (variant * 5)})
                        .as_object()
                        .cloned()
                        .unwrap_or_default(),
                    active_from: None,
                    active_until: None,
                    frequency_cap: None,
                });
            }
        }
    }
    items
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

/// Segment definitions of the demo: (name, condition, description).
pub fn segments() -> Vec<(&'static str, Value, &'static str)> {
    vec![
        (
            "engaged",
            json!({"feature": "engagement_score", "op": "gte", "value": 0.5}),
            "Engagement score of at least 0.5",
        ),
        (
            "frequent_buyers",
            json!({"event": "purchase", "atLeast": 3, "within": "30d"}),
            "Three or more purchases in the last 30 days",
        ),
        (
            "premium_at_risk",
            json!({"all": [
                {"trait": "plan", "op": "in", "value": ["pro", "enterprise"]},
                {"feature": "days_since_last_visit", "op": "gt", "value": 7}
            ]}),
            "Paying customers who have not visited for a week",
        ),
    ]
}

/// Builds the demo world unless the store already holds customers.
pub async fn ensure(engine: &Engine) -> Result<()> {
    if engine.stores.profiles.count().await? > 0 {
        tracing::info!("Demo world already present");
        return Ok(());
    }
    let started = std::time::Instant::now();
    tracing::info!(customers = CUSTOMERS, "Building the demo world");
    for item in catalog() {
        engine.upsert_content(item).await?;
    }
    let mut rng = StdRng::seed_from_u64(SEED);
    let now = Utc::now();
    let mut batch: Vec<Value> = Vec::new();
    let mut events = 0usize;
    let mut profiles = Vec::new();
    for i in 0..CUSTOMERS {
        let p = persona(i);
        let id = customer_id(i);
        let plan = match rng.random_range(0..10) {
            0..=5 => "free",
            6..=8 => "pro",
            _ => "enterprise",
        };
        // The stated interest matches the hidden favourite 60% of the time.
        let interest = if rng.random_bool(0.6) {
            p.favourite
        } else {
            CATEGORIES[rng.random_range(0..CATEGORIES.len())]
        };
        let traits = json!({
            "country": COUNTRIES[rng.random_range(0..COUNTRIES.len())],
            "plan": plan,
            "age": rng.random_range(18..75),
            "interest": interest,
        });
        let consent =
            json!({"personalization": !rng.random_bool(0.05), "marketing": rng.random_bool(0.7)});
        profiles.push(
            CustomerUpdate {
                id: CustomerId::parse("id", &id)?,
                traits: parse_traits("traits", Some(traits))?,
                pii: Pii {
                    email: Some(format!("{id}@example.com")),
                    ..Pii::default()
                },
                consent: Consent::from_json("consent", &consent)?,
            }
            .apply(None, now - Duration::days(30)),
        );
        // 30 days of events; the more active, the more events.
        let days_active: BTreeSet<i64> = (0..30)
            .filter(|_| rng.random_bool((p.activity / 1.5).min(1.0) * 0.6))
            .collect();
        let mut seq = 0;
        for day in days_active {
            let n = rng.random_range(1..=3);
            for _ in 0..n {
                let at = now - Duration::days(day) - Duration::minutes(rng.random_range(1..1440));
                let ty = match rng.random_range(0..100) {
                    0..=59 => "page_view",
                    60..=79 => "email_open",
                    80..=89 => "click",
                    90..=95 => "form_submit",
                    _ => "purchase",
                };
                let mut props = Map::new();
                props.insert(
                    "category".into(),
                    json!(if rng.random_bool(0.7) {
                        p.favourite
                    } else {
                        CATEGORIES[rng.random_range(0..CATEGORIES.len())]
                    }),
                );
                if ty == "purchase" {
                    props.insert(
                        "value".into(),
                        json!((rng.random_range(10.0..200.0f64) * 100.0).round() / 100.0),
                    );
                }
                batch.push(json!({
                    "eventId": format!("demo-{id}-{seq}"),
                    "customerId": id,
                    "type": ty,
                    "timestamp": at.to_rfc3339(),
                    "properties": props,
                }));
                seq += 1;
            }
        }
        if batch.len() >= 5_000 {
            // Concurrent puts share the store's group commits.
            futures::future::try_join_all(profiles.iter().map(|c| engine.stores.profiles.put(c)))
                .await?;
            profiles.clear();
            events += batch.len();
            engine.ingestor.ingest(std::mem::take(&mut batch)).await?;
        }
    }
    futures::future::try_join_all(profiles.iter().map(|c| engine.stores.profiles.put(c))).await?;
    events += batch.len();
    if !batch.is_empty() {
        engine.ingestor.ingest(batch).await?;
    }
    for (name, condition, description) in segments() {
        engine
            .segments
            .define(name, &condition, Some(description.to_string()))
            .await?;
    }
    // Started outside a checkout there is no `rules/` directory: the demo then stores the
    // example frequency cap through the API, so a newcomer still sees a rule fire.
    if engine.rules.list().is_empty() {
        engine
            .rules
            .put(None, include_str!("../rules/frequency_cap.rhai"))
            .await?;
    }
    tracing::info!(
        customers = CUSTOMERS,
        events,
        items = catalog().len(),
        seconds = started.elapsed().as_secs_f64(),
        "Demo world ready"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn personas_are_deterministic_and_preferences_favour_the_category() {
        assert_eq!(persona(42), persona(42));
        let items = catalog();
        assert!(items.len() >= 50);
        let placements: BTreeSet<_> = items.iter().flat_map(|i| i.placements.clone()).collect();
        assert_eq!(placements.len(), 3);
        let p = persona(7);
        let fav = items.iter().find(|i| i.tags[0] == p.favourite).unwrap();
        let other = items.iter().find(|i| i.tags[0] != p.favourite).unwrap();
        assert!(click_probability(7, fav) > 5.0 * click_probability(7, other));
        let ids: BTreeSet<_> = items.iter().map(|i| i.id.clone()).collect();
        assert_eq!(ids.len(), items.len(), "ids are unique");
    }
}
