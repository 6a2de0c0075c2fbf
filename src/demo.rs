//! The synthetic demo world: customers with traits and 30 days of events, a catalog over
//! three placements, and segments — built on first start of `tailor serve --demo`.
//!
//! Outcomes in the demo come from a hidden preference structure: every customer has a
//! persona (never stored) that favours one content category; [`click_probability`]
//! says how likely a customer is to respond to an item, so simulations and later
//! learning can be checked against the truth.
//!
//! For the model: [`simulate_history`] plays a uniform logging policy over the world (the
//! first model's training data), [`simulated_customer`] draws fresh customers with their
//! feature values, and [`compare_policies`] measures the click rate of the model's greedy
//! policy against Thompson sampling on them.
//!
//! [`ensure_keys`] creates one API key per role at first start and keeps their text in
//! [`KEYS_FILE`] in the data directory (readable by its owner only), so the demo can be
//! called at once; the store itself holds only their hashes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

use crate::app::Engine;
use crate::auth::Role;
use crate::bandit::ArmStats;
use crate::content::ContentItem;
use crate::customers::{parse_traits, Consent, CustomerId, CustomerUpdate, Pii};
use crate::decision::{Decision, LoggedArm, Outcome, PropensityKind, ScoredItem};
use crate::error::Result;
use crate::experiments::definition::VariantInput;
use crate::experiments::{ExperimentInput, Status};
use crate::model::schema::ScoreContext;
use crate::model::serving::{LoadedModel, ScoreRequest};
use crate::model::train::TrainParams;
use crate::model::TrainingSource;

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

/// One generated demo event: `day` days and `minutes` minutes before the world was built.
struct DemoEvent {
    day: i64,
    minutes: i64,
    event_type: &'static str,
    category: &'static str,
    value: Option<f64>,
}

/// 30 days of a customer's events: the more active, the more events; 70% of them about
/// the favourite category.
fn customer_events(p: &Persona, rng: &mut StdRng) -> Vec<DemoEvent> {
    let days_active: BTreeSet<i64> = (0..30)
        .filter(|_| rng.random_bool((p.activity / 1.5).min(1.0) * 0.6))
        .collect();
    let mut events = Vec::new();
    for day in days_active {
        let n = rng.random_range(1..=3);
        for _ in 0..n {
            let minutes = rng.random_range(1..1440);
            let event_type = match rng.random_range(0..100) {
                0..=59 => "page_view",
                60..=79 => "email_open",
                80..=89 => "click",
                90..=95 => "form_submit",
                _ => "purchase",
            };
            let category = if rng.random_bool(0.7) {
                p.favourite
            } else {
                CATEGORIES[rng.random_range(0..CATEGORIES.len())]
            };
            let value = (event_type == "purchase")
                .then(|| (rng.random_range(10.0..200.0f64) * 100.0).round() / 100.0);
            events.push(DemoEvent {
                day,
                minutes,
                event_type,
                category,
                value,
            });
        }
    }
    events
}

/// The demo's own feature definitions, beside the built-ins: page views per content
/// category over 30 days, the signal of each customer's taste.
pub fn features() -> Vec<(String, Value)> {
    CATEGORIES
        .iter()
        .map(|c| {
            (
                format!("category_views_{c}_30d"),
                json!({"kind": "count", "event_type": "page_view", "window": "30d",
                       "where": {"category": c},
                       "description": format!("Page views about {c} in the last 30 days")}),
            )
        })
        .collect()
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

/// The demo's key file in the data directory: one `ROLE KEY` line per role.
pub const KEYS_FILE: &str = "demo-keys.txt";

/// The demo's keys, one per role, and the file that keeps them.
pub struct DemoKeys {
    pub path: std::path::PathBuf,
    pub keys: Vec<(Role, String)>,
}

impl std::fmt::Display for DemoKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "Demo API keys (kept in {}); send one as `Authorization: Bearer KEY`:",
            self.path.display()
        )?;
        for (role, key) in &self.keys {
            writeln!(f, "  {:<8}  {key}", role.name())?;
        }
        Ok(())
    }
}

/// Creates one key per role on first start (recorded in [`KEYS_FILE`]); later starts
/// read the file.
pub async fn ensure_keys(engine: &Engine) -> Result<DemoKeys> {
    let path = engine.settings.data_dir.join(KEYS_FILE);
    let failed = |what: &str, e: std::io::Error| {
        crate::error::Error::Internal(anyhow::anyhow!("{what} {}: {e}", path.display()))
    };
    if path.exists() {
        let text = std::fs::read_to_string(&path).map_err(|e| failed("reading", e))?;
        let keys = text
            .lines()
            .filter_map(|l| l.split_once(' '))
            .filter_map(|(role, key)| Some((Role::parse("role", role).ok()?, key.to_owned())))
            .collect();
        return Ok(DemoKeys { path, keys });
    }
    let mut keys = Vec::new();
    for role in Role::ALL {
        let issued = engine
            .keys
            .create(role, Some(format!("demo {role}")), "name")
            .await?;
        keys.push((role, issued.key.expose().to_owned()));
    }
    let text: String = keys.iter().map(|(r, k)| format!("{r} {k}\n")).collect();
    write_private(&path, &text).map_err(|e| failed("writing", e))?;
    Ok(DemoKeys { path, keys })
}

/// Writes a file only its owner can read (on Unix).
fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(text.as_bytes())
}

/// The demo world (see [`ensure`]) and, with authentication on, its keys.
pub async fn prepare(engine: &Engine) -> Result<Option<DemoKeys>> {
    ensure(engine).await?;
    if engine.settings.auth.enabled {
        Ok(Some(ensure_keys(engine).await?))
    } else {
        Ok(None)
    }
}

/// How long [`prepare_when_reachable`] waits between tries.
const RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// [`prepare`], except that while a backend cannot be reached (a Redis outage) it keeps
/// trying in the background every few seconds instead of failing, so that the server
/// starts and serves (degraded) meanwhile. Any other error fails at once. `announce` gets
/// the keys once they exist.
pub async fn prepare_when_reachable(
    engine: Arc<Engine>,
    announce: impl Fn(&DemoKeys) + Send + 'static,
) -> Result<()> {
    let error = match prepare(&engine).await {
        Ok(keys) => {
            keys.iter().for_each(&announce);
            return Ok(());
        }
        Err(e) if e.is_unavailable() => e,
        Err(e) => return Err(e),
    };
    tracing::warn!(error = %error, "The demo world waits for its backends; trying again every few seconds");
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(RETRY).await;
            match prepare(&engine).await {
                Ok(keys) => {
                    tracing::info!("The demo world is ready");
                    keys.iter().for_each(&announce);
                    return;
                }
                Err(e) if e.is_unavailable() => {
                    tracing::debug!(error = %e, "The demo world still waits for its backends");
                }
                Err(e) => {
                    tracing::error!(error = %e, "Failed to build the demo world");
                    return;
                }
            }
        }
    });
    Ok(())
}

/// Builds the demo world unless the store already holds customers, then trains and
/// activates a first model unless one exists.
pub async fn ensure(engine: &Engine) -> Result<()> {
    if engine.profiles.count().await? > 0 {
        tracing::info!("Demo world already present");
    } else {
        build(engine).await?;
    }
    ensure_model(engine).await
}

async fn build(engine: &Engine) -> Result<()> {
    let started = std::time::Instant::now();
    tracing::info!(customers = CUSTOMERS, "Building the demo world");
    for item in catalog() {
        engine.upsert_content(item).await?;
    }
    // Before the events, so the processor counts them as they arrive.
    let live = engine.live_features();
    for (name, body) in features() {
        if !live.contains(&name) {
            engine.features.define(&name, body).await?;
        }
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
        for (seq, e) in customer_events(&p, &mut rng).into_iter().enumerate() {
            let at = now - Duration::days(e.day) - Duration::minutes(e.minutes);
            let mut props = Map::new();
            props.insert("category".into(), json!(e.category));
            if let Some(value) = e.value {
                props.insert("value".into(), json!(value));
            }
            batch.push(json!({
                "eventId": format!("demo-{id}-{seq}"),
                "customerId": id,
                "type": e.event_type,
                "timestamp": at.to_rfc3339(),
                "properties": props,
            }));
        }
        if batch.len() >= 5_000 {
            // Concurrent puts share the store's group commits.
            futures::future::try_join_all(profiles.iter().map(|c| engine.profiles.put(c))).await?;
            profiles.clear();
            events += batch.len();
            engine.ingestor.ingest(std::mem::take(&mut batch)).await?;
        }
    }
    futures::future::try_join_all(profiles.iter().map(|c| engine.profiles.put(c))).await?;
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
    let experiment = engine
        .experiments
        .create(experiment(), &|_: &str| false)
        .await?;
    engine
        .experiments
        .set_status(&experiment.key, Status::Running)
        .await?;
    tracing::info!(
        customers = CUSTOMERS,
        events,
        items = catalog().len(),
        seconds = started.elapsed().as_secs_f64(),
        "Demo world ready"
    );
    Ok(())
}

/// Decisions a logging policy would have made for the demo world: each picks a random
/// placement and shows one of its items uniformly at random (propensity 1/n), and the
/// customer responds with their [`click_probability`]. `customers` are (demo index,
/// feature values the decision is made with); decisions are spread evenly over
/// `[from, to)`; an outcome follows its decision within ten minutes.
pub fn simulate_history(
    customers: &[(usize, Arc<BTreeMap<String, f64>>)],
    decisions_per_customer: usize,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    seed: u64,
) -> Result<Vec<(Decision, Vec<Outcome>)>> {
    let items = catalog();
    let by_placement: Vec<Vec<&ContentItem>> = PLACEMENTS
        .iter()
        .map(|p| {
            items
                .iter()
                .filter(|i| i.placements.iter().any(|ip| ip == p))
                .collect()
        })
        .collect();
    let mut rng = StdRng::seed_from_u64(seed);
    let total = (customers.len() * decisions_per_customer).max(1);
    let step = (to - from).num_milliseconds().max(1) / total as i64;
    let mut out = Vec::with_capacity(total);
    let mut n = 0i64;
    for _ in 0..decisions_per_customer {
        for (i, features) in customers {
            let at = from + Duration::milliseconds(step * n);
            n += 1;
            let p = rng.random_range(0..PLACEMENTS.len());
            let candidates = &by_placement[p];
            let shown = candidates[rng.random_range(0..candidates.len())];
            let id = uuid::Uuid::new_v7(uuid::Timestamp::from_unix(
                uuid::NoContext,
                at.timestamp() as u64,
                at.timestamp_subsec_nanos(),
            ))
            .to_string();
            let customer_id = CustomerId::parse("customer", &customer_id(*i))?;
            let decision = Decision {
                id: id.clone(),
                customer_id: customer_id.clone(),
                placement: Some(PLACEMENTS[p].to_string()),
                items: vec![ScoredItem {
                    item: Arc::new(shown.clone()),
                    score: 0.0,
                }],
                alternatives: Vec::new(),
                confidence_score: 0.0,
                reasoning: "simulated history: uniform logging policy".into(),
                latency_ms: 0.0,
                policy: "uniform".into(),
                propensity: 1.0 / candidates.len() as f64,
                propensity_kind: PropensityKind::Exact,
                model_version: None,
                model_scores: None,
                experiments: Vec::new(),
                segments: Vec::new(),
                arms: candidates
                    .iter()
                    .map(|c| LoggedArm {
                        id: c.id.clone(),
                        weight: 1.0,
                    })
                    .collect(),
                rules: Vec::new(),
                degraded: false,
                explanation: None,
                context: json!({"device": (["web", "mobile"][rng.random_range(0..2)])}),
                features: BTreeMap::clone(features),
                created_at: at,
            };
            let mut outcomes = Vec::new();
            if rng.random_bool(click_probability(*i, shown)) {
                outcomes.push(Outcome {
                    decision_id: id,
                    customer_id,
                    item_id: shown.id.clone(),
                    reward: 1.0,
                    conversion_type: "click".into(),
                    value: None,
                    created_at: at + Duration::seconds(rng.random_range(1..600)),
                });
            }
            out.push((decision, outcomes));
        }
    }
    Ok(out)
}

/// The feature values the demo's definitions give a customer whose 30 days of events
/// are `events`, evaluated at the end of those days: the built-ins and
/// [`features`], computed directly (the simulation needs no engine).
fn features_of(events: &[DemoEvent]) -> BTreeMap<String, f64> {
    let count = |ty: &str| events.iter().filter(|e| e.event_type == ty).count() as f64;
    let page_views = count("page_view");
    let opens = count("email_open");
    let submits = count("form_submit");
    let mut f = BTreeMap::new();
    f.insert("page_views_30d".to_string(), page_views);
    f.insert("email_opens_30d".to_string(), opens);
    f.insert("form_submits_30d".to_string(), submits);
    f.insert("clicks_30d".to_string(), count("click"));
    f.insert("purchases_30d".to_string(), count("purchase"));
    f.insert(
        "revenue_30d".to_string(),
        events.iter().filter_map(|e| e.value).sum(),
    );
    let last_visit = events
        .iter()
        .filter(|e| e.event_type == "page_view")
        .map(|e| e.day as f64 + e.minutes as f64 / 1440.0)
        .fold(f64::INFINITY, f64::min);
    f.insert(
        "days_since_last_visit".to_string(),
        if last_visit.is_finite() {
            last_visit
        } else {
            365.0
        },
    );
    f.insert(
        "conversion_rate".to_string(),
        if page_views > 0.0 {
            submits / page_views
        } else {
            0.0
        },
    );
    f.insert(
        "engagement_score".to_string(),
        (0.3 * page_views / 10.0 + 0.2 * opens / 5.0 + 0.2 * submits / 2.0).min(1.0),
    );
    for c in CATEGORIES {
        let views = events
            .iter()
            .filter(|e| e.event_type == "page_view" && e.category == c)
            .count() as f64;
        f.insert(format!("category_views_{c}_30d"), views);
    }
    f
}

/// A simulated demo customer `i` (any index; beyond [`CUSTOMERS`] they are fresh ones)
/// with features from their own freshly drawn 30 days of events.
pub fn simulated_customer(i: usize, seed: u64) -> (usize, Arc<BTreeMap<String, f64>>) {
    let mut rng = StdRng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
    (
        i,
        Arc::new(features_of(&customer_events(&persona(i), &mut rng))),
    )
}

/// Click rates of three policies on the same fresh simulated customers.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct PolicyComparison {
    pub decisions: usize,
    /// The model's greedy policy: the highest-scored candidate.
    pub model_click_rate: f64,
    /// Beta-Bernoulli Thompson sampling per (placement, item), learning online from the
    /// same decisions (the foundation's policy).
    pub thompson_click_rate: f64,
    /// Uniform random choice.
    pub random_click_rate: f64,
    /// `model_click_rate / thompson_click_rate`.
    pub lift: f64,
}

/// Plays `decisions` decisions on fresh simulated customers (indices from `first`) and
/// measures each policy's click rate as the mean true click probability of what it
/// picked (the expectation, so the comparison carries no Bernoulli noise). Thompson
/// learns online from simulated clicks; the model is fixed.
pub fn compare_policies(
    model: &LoadedModel,
    first: usize,
    decisions: usize,
    seed: u64,
) -> Result<PolicyComparison> {
    let items: Vec<Arc<ContentItem>> = catalog().into_iter().map(Arc::new).collect();
    let by_placement: Vec<Vec<Arc<ContentItem>>> = PLACEMENTS
        .iter()
        .map(|p| {
            items
                .iter()
                .filter(|i| i.placements.iter().any(|ip| ip == p))
                .cloned()
                .collect()
        })
        .collect();
    let mut arms: Vec<Vec<ArmStats>> = by_placement
        .iter()
        .map(|c| vec![ArmStats::default(); c.len()])
        .collect();
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut model_sum, mut thompson_sum, mut random_sum) = (0.0, 0.0, 0.0);
    for d in 0..decisions {
        let (i, features) = simulated_customer(first + d, seed);
        let p = rng.random_range(0..PLACEMENTS.len());
        let candidates = &by_placement[p];
        let request = ScoreRequest {
            features,
            items: candidates.clone(),
            context: ScoreContext {
                placement: Some(PLACEMENTS[p].to_string()),
                device: Some(["web", "mobile"][rng.random_range(0..2)].to_string()),
                hour: rng.random_range(0.0..24.0),
            },
            version: None,
        };
        let scores = model
            .score(&request)
            .map_err(|e| anyhow::anyhow!("scoring the simulation: {e}"))?;
        let best = (0..scores.len())
            .max_by(|&a, &b| scores[a].total_cmp(&scores[b]))
            .unwrap_or(0);
        model_sum += click_probability(i, &candidates[best]);

        let weights = vec![1.0; candidates.len()];
        let pick = crate::bandit::policy::thompson(&arms[p], &weights, 1, &mut rng).order[0].0;
        let truth = click_probability(i, &candidates[pick]);
        thompson_sum += truth;
        arms[p][pick].merge(ArmStats::trial());
        if rng.random_bool(truth) {
            arms[p][pick].merge(ArmStats::reward(1.0));
        }
        random_sum += click_probability(i, &candidates[rng.random_range(0..candidates.len())]);
    }
    let n = decisions.max(1) as f64;
    let (model_click_rate, thompson_click_rate) = (model_sum / n, thompson_sum / n);
    Ok(PolicyComparison {
        decisions,
        model_click_rate,
        thompson_click_rate,
        random_click_rate: random_sum / n,
        lift: model_click_rate / thompson_click_rate.max(f64::MIN_POSITIVE),
    })
}

/// The demo's running experiment: half the customers get the model's greedy ranking,
/// the other half (the control) the configured policy, whose prior is the model's score.
pub fn experiment() -> ExperimentInput {
    let variant = |key: &str, policy: Option<&str>| VariantInput {
        key: key.into(),
        weight: 1.0,
        policy: policy.map(str::to_owned),
        ..VariantInput::default()
    };
    ExperimentInput {
        key: "model_greedy_vs_bandit".into(),
        description: Some(
            "Does ranking by the model's score alone beat the bandit that uses it as a prior?"
                .into(),
        ),
        salt: None,
        variants: vec![
            variant("control", None),
            variant("model_greedy", Some("model_greedy")),
        ],
        traffic_percent: 100.0,
        targeting_segment: None,
        layer: None,
    }
}

/// Decisions simulated per demo customer for the first model.
const HISTORY_PER_CUSTOMER: usize = 2;

/// Trains and activates a first model from a simulated decision log, unless the registry
/// already holds a version. The log is stored like any other (policy `uniform`), stamped
/// in the week before the attribution window so that every outcome is final; each
/// decision carries the customer's feature values read when the log is simulated.
pub async fn ensure_model(engine: &Engine) -> Result<()> {
    if !engine.models.versions()?.is_empty() {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let now = Utc::now();
    let mut customers = Vec::with_capacity(CUSTOMERS);
    for i in 0..CUSTOMERS {
        let id = CustomerId::parse("customer", &customer_id(i))?;
        let read = engine.features.read(&id, None, "features", now).await?;
        let features: BTreeMap<String, f64> =
            read.values.into_iter().map(|v| (v.name, v.value)).collect();
        customers.push((i, Arc::new(features)));
    }
    let until = now - engine.models.attribution_window() - Duration::minutes(1);
    let history = simulate_history(
        &customers,
        HISTORY_PER_CUSTOMER,
        until - Duration::days(7),
        until,
        SEED,
    )?;
    for chunk in history.chunks(512) {
        futures::future::try_join_all(chunk.iter().map(|(d, _)| engine.stores.decisions.put(d)))
            .await?;
        futures::future::try_join_all(
            chunk
                .iter()
                .flat_map(|(_, o)| o.iter())
                .map(|o| engine.stores.decisions.put_outcome(o)),
        )
        .await?;
    }
    let simulated = started.elapsed().as_secs_f64();
    let manifest = engine
        .train_model(&TrainingSource::DecisionLog, TrainParams::default(), |_| {})
        .await?;
    engine.activate_model(&manifest.version, false).await?;
    tracing::info!(
        version = manifest.version,
        auc = manifest.report.metrics.auc,
        decisions = history.len(),
        simulate_seconds = simulated,
        train_seconds = manifest.training_seconds,
        "Demo model trained and active"
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

    #[test]
    fn the_demo_experiment_is_valid() {
        let (experiment, layer) = experiment().validate(Utc::now()).unwrap();
        assert_eq!(experiment.variants.len(), 2);
        assert_eq!(layer, None);
    }
}
