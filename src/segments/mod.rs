//! Segments: named sets of customers defined by condition trees (whose nodes may be Rhai
//! predicates), kept current as events and profile changes arrive, rebuilt in bulk when
//! (re)defined, and re-evaluated on a timer when their conditions slide with time.
//!
//! - [`condition`]: the condition tree — parse/validate, evaluate over [`condition::Facts`];
//! - [`SegmentService`]: definitions, membership upkeep and the join/leave stream.

pub mod condition;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use opentelemetry::KeyValue;
use parking_lot::RwLock;
use serde_json::{json, Map, Value};
use tokio::sync::broadcast;

use crate::customers::{Customer, CustomerId};
use crate::error::{Error, Result};
use crate::events::StoredEvent;
use crate::expressions::EvalError;
use crate::features::{BatchStates, FeatureService, Window};
use crate::privacy::Profiles;
use crate::storage::{DefinitionKind, MembershipChange, Stores};
use crate::telemetry::Metrics;
use condition::{Condition, Facts};

/// A validated segment definition.
#[derive(Debug, Clone)]
pub struct SegmentDef {
    pub name: String,
    pub version: u32,
    pub condition: Condition,
    pub description: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl SegmentDef {
    pub fn to_json(&self) -> Value {
        json!({
            "condition": self.condition.to_json(),
            "description": self.description,
            "version": self.version,
        })
    }
}

/// What one customer looks like to segment conditions: what the conditions being
/// evaluated read, loaded once. Cheap to clone, as Rhai predicates need their own copy.
#[derive(Clone)]
struct CustomerFacts(Arc<LoadedFacts>);

struct LoadedFacts {
    traits: Map<String, Value>,
    features: HashMap<String, f64>,
    /// Event counts by (type, window), for the pairs the conditions name.
    counts: HashMap<(String, Window), u64>,
    /// The customer's events within the longest window read, kept for conditions that
    /// name an event type or window only at run time.
    events: Vec<StoredEvent>,
    now: DateTime<Utc>,
}

impl Facts for CustomerFacts {
    fn traits(&self) -> &Map<String, Value> {
        &self.0.traits
    }
    fn feature(&self, name: &str) -> f64 {
        self.0.features.get(name).copied().unwrap_or(0.0)
    }
    fn event_count(&self, event_type: &str, within: Window) -> u64 {
        if let Some(n) = self.0.counts.get(&(event_type.to_owned(), within)) {
            return *n;
        }
        count_events(&self.0.events, event_type, within, self.0.now)
    }
}

fn count_events(
    events: &[StoredEvent],
    event_type: &str,
    within: Window,
    now: DateTime<Utc>,
) -> u64 {
    let since = now - within.duration();
    events
        .iter()
        .filter(|e| e.event.event_type == event_type && e.event.timestamp > since)
        .count() as u64
}

/// Rhai predicates that failed while evaluating a batch, logged and counted once per
/// segment rather than once per customer.
#[derive(Default)]
struct Failures(BTreeMap<String, (u64, EvalError)>);

impl Failures {
    /// Whether `facts` match `def`; a failure counts as not matching and is remembered.
    fn evaluate(&mut self, def: &SegmentDef, facts: &CustomerFacts) -> bool {
        def.condition.try_evaluate(facts).unwrap_or_else(|e| {
            self.0.entry(def.name.clone()).or_insert((0, e)).0 += 1;
            false
        })
    }

    fn report(self, metrics: &Metrics) {
        for (segment, (count, first)) in self.0 {
            tracing::warn!(
                segment,
                customers = count,
                error = %first,
                "Segment predicate failed; counted as not a member"
            );
            metrics.segment_predicate_errors.add(count, &[]);
        }
    }
}

/// Capacity of the join/leave stream; slower subscribers skip ahead (they are told).
const CHANGES_CAPACITY: usize = 4096;
const PAGE: usize = 1000;

pub struct SegmentService {
    stores: Stores,
    profiles: Arc<Profiles>,
    features: Arc<FeatureService>,
    catalog: RwLock<Arc<Vec<Arc<SegmentDef>>>>,
    changes: broadcast::Sender<MembershipChange>,
    metrics: Arc<Metrics>,
}

fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "name",
            "must be 1–64 characters of [A-Za-z0-9_-]",
        ))
    }
}

impl SegmentService {
    pub async fn start(
        stores: Stores,
        profiles: Arc<Profiles>,
        features: Arc<FeatureService>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>> {
        let service = Arc::new(SegmentService {
            stores,
            profiles,
            features,
            catalog: RwLock::new(Arc::new(Vec::new())),
            changes: broadcast::channel(CHANGES_CAPACITY).0,
            metrics,
        });
        service.reload().await?;
        Ok(service)
    }

    /// Rebuilds the definitions from the definition store (also how a replica picks up
    /// what another one defined there).
    pub async fn reload(&self) -> Result<()> {
        let mut defs = Vec::new();
        for d in self
            .stores
            .definitions
            .list(DefinitionKind::Segment)
            .await?
        {
            defs.push(Arc::new(self.parse_stored(
                &d.name,
                d.version,
                &d.body,
                d.created_at,
            )?));
        }
        *self.catalog.write() = Arc::new(defs);
        Ok(())
    }

    fn parse_stored(
        &self,
        name: &str,
        version: u32,
        body: &Value,
        created_at: DateTime<Utc>,
    ) -> Result<SegmentDef> {
        let condition = body
            .get("condition")
            .ok_or_else(|| Error::invalid("condition", "is required"))?;
        Ok(SegmentDef {
            name: name.to_owned(),
            version,
            // Stored definitions were validated when defined; a feature deleted since
            // then reads as its default rather than failing the whole catalog.
            condition: Condition::parse("condition", condition, &|_| true)?,
            description: body
                .get("description")
                .and_then(Value::as_str)
                .map(str::to_owned),
            created_at,
        })
    }

    pub fn list(&self) -> Arc<Vec<Arc<SegmentDef>>> {
        self.catalog.read().clone()
    }

    pub fn get(&self, name: &str) -> Option<Arc<SegmentDef>> {
        self.list().iter().find(|d| d.name == name).cloned()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<MembershipChange> {
        self.changes.subscribe()
    }

    /// Validates and stores a new version of the segment, then rebuilds its membership
    /// in bulk. Returns the definition and how many customers joined and left.
    pub async fn define(
        &self,
        name: &str,
        condition: &Value,
        description: Option<String>,
    ) -> Result<(Arc<SegmentDef>, u64, u64)> {
        validate_name(name)?;
        let catalog = self.features.catalog();
        let parsed = Condition::parse("condition", condition, &|f| catalog.get(f).is_some())?;
        let body = json!({"condition": parsed.to_json(), "description": description});
        self.stores
            .definitions
            .put(DefinitionKind::Segment, name, body)
            .await?;
        self.reload().await?;
        let def = self.get(name).ok_or_else(|| {
            Error::Internal(anyhow::anyhow!("segment {name} vanished after define"))
        })?;
        let (joined, left) = self.rebuild(&def).await?;
        Ok((def, joined, left))
    }

    /// Deletes the definition and every membership; members' leaves are published.
    pub async fn delete(&self, name: &str) -> Result<bool> {
        let existed = self
            .stores
            .definitions
            .delete(DefinitionKind::Segment, name)
            .await?;
        self.reload().await?;
        loop {
            let members = self.stores.segments.members(name, None, PAGE).await?;
            if members.is_empty() {
                break;
            }
            let leaves: Vec<MembershipChange> = members
                .into_iter()
                .map(|customer| MembershipChange {
                    segment: name.to_owned(),
                    customer,
                    joined: false,
                })
                .collect();
            self.apply(&leaves).await?;
        }
        self.stores.segments.clear(name).await?;
        Ok(existed)
    }

    /// Recomputes the whole membership of one segment and applies the difference.
    pub async fn rebuild(&self, def: &SegmentDef) -> Result<(u64, u64)> {
        let plan = FactsPlan::new(&[Arc::new(def.clone())]);
        let empty = BatchStates::default();
        let now = Utc::now();
        let mut wanted = BTreeSet::new();
        let mut failures = Failures::default();
        let mut after: Option<CustomerId> = None;
        loop {
            let page = self.profiles.list(after.as_ref(), PAGE).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id.clone());
            let customers: Vec<(&CustomerId, Option<&Customer>)> =
                page.iter().map(|c| (&c.id, Some(c))).collect();
            let facts = self.facts_many(&customers, &plan, &empty, now).await?;
            for (customer, facts) in page.iter().zip(&facts) {
                if failures.evaluate(def, facts) {
                    wanted.insert(customer.id.clone());
                }
            }
        }
        failures.report(&self.metrics);
        let mut current = BTreeSet::new();
        let mut after: Option<CustomerId> = None;
        loop {
            let page = self
                .stores
                .segments
                .members(&def.name, after.as_ref(), PAGE)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.clone());
            current.extend(page);
        }
        let changes: Vec<MembershipChange> = wanted
            .difference(&current)
            .map(|c| (c, true))
            .chain(current.difference(&wanted).map(|c| (c, false)))
            .map(|(customer, joined)| MembershipChange {
                segment: def.name.clone(),
                customer: customer.clone(),
                joined,
            })
            .collect();
        let mut joined = 0;
        let mut left = 0;
        for chunk in changes.chunks(PAGE) {
            for c in self.apply(chunk).await? {
                if c.joined {
                    joined += 1;
                } else {
                    left += 1;
                }
            }
        }
        Ok((joined, left))
    }

    /// Re-evaluates every segment for one customer whose profile changed (`customer` as
    /// now stored), and applies and publishes the changes.
    pub async fn evaluate_customer(&self, customer: &Customer) -> Result<Vec<MembershipChange>> {
        let id = &customer.id;
        self.evaluate_batch(
            std::slice::from_ref(id),
            &BTreeSet::new(),
            &BTreeSet::from([id.clone()]),
            &HashMap::from([(id.clone(), customer.clone())]),
            &BatchStates::default(),
        )
        .await
    }

    /// What a batch of events changes: for each of `customers` (those with events in the
    /// batch), the segments that `event_types` can affect, and every segment for the
    /// customers in `changed` (their traits changed: any trait condition may have a new
    /// answer). `profiles` are profiles already read for the batch (PII not needed);
    /// other customers' are read from the store when a condition reads traits. Feature
    /// values come from `features` (the batch's states, as folded) where they cover the
    /// conditions, else from the store. Applies and publishes the changes.
    pub async fn evaluate_batch(
        &self,
        customers: &[CustomerId],
        event_types: &BTreeSet<&str>,
        changed: &BTreeSet<CustomerId>,
        profiles: &HashMap<CustomerId, Customer>,
        features: &BatchStates,
    ) -> Result<Vec<MembershipChange>> {
        let by_event = self.affected_by(Some(event_types));
        let by_event_plan = FactsPlan::new(&by_event);
        let all = if changed.is_empty() {
            Vec::new()
        } else {
            self.affected_by(None)
        };
        let all_plan = FactsPlan::new(&all);
        let now = Utc::now();
        let mut wanted = Vec::new();
        let mut failures = Failures::default();
        // The customers whose traits changed are evaluated against every segment, the
        // others against those their events can affect: one read of facts for each group.
        let (with_changes, others): (Vec<&CustomerId>, Vec<&CustomerId>) =
            customers.iter().partition(|c| changed.contains(*c));
        for (group, defs, plan) in [
            (with_changes, &all, &all_plan),
            (others, &by_event, &by_event_plan),
        ] {
            if defs.is_empty() || group.is_empty() {
                continue;
            }
            let group: Vec<(&CustomerId, Option<&Customer>)> =
                group.into_iter().map(|c| (c, profiles.get(c))).collect();
            let facts = self.facts_many(&group, plan, features, now).await?;
            for ((customer, _), facts) in group.iter().zip(&facts) {
                wanted.extend(membership(customer, defs, facts, &mut failures));
            }
        }
        failures.report(&self.metrics);
        self.apply(&wanted).await
    }

    /// The features that [`SegmentService::evaluate_batch`] reads of a customer with
    /// events of `event_types` (whose traits did not change): `None` when any may be.
    pub fn features_read_for(&self, event_types: &BTreeSet<&str>) -> Option<Vec<String>> {
        FactsPlan::new(&self.affected_by(Some(event_types))).features
    }

    /// The definitions that an event of one of `event_types` can affect; all when `None`.
    fn affected_by(&self, event_types: Option<&BTreeSet<&str>>) -> Vec<Arc<SegmentDef>> {
        self.list()
            .iter()
            .filter(|d| {
                event_types
                    .is_none_or(|types| types.iter().any(|t| d.condition.depends_on_event(t)))
            })
            .cloned()
            .collect()
    }

    /// Rebuilds every segment whose condition slides with time.
    pub async fn refresh_time_dependent(&self) -> Result<()> {
        for def in self.list().iter().filter(|d| d.condition.depends_on_time()) {
            self.rebuild(def).await?;
        }
        Ok(())
    }

    async fn apply(&self, wanted: &[MembershipChange]) -> Result<Vec<MembershipChange>> {
        let changed = self.stores.segments.apply(wanted).await?;
        self.announce(&changed);
        Ok(changed)
    }

    /// Counts and publishes changes that were applied to the store (also those made
    /// outside this service, such as an erasure's leaves).
    pub fn announce(&self, changed: &[MembershipChange]) {
        for c in changed {
            let kind = if c.joined { "join" } else { "leave" };
            self.metrics
                .segment_changes
                .add(1, &[KeyValue::new("change", kind)]);
            // No receiver is not an error: nobody is subscribed.
            let _ = self.changes.send(c.clone());
        }
    }

    /// What `plan` says the conditions read of each of `customers`, in order. Each comes
    /// with its profile when the caller has it; otherwise profiles are read, together,
    /// when a condition reads traits. `batch`: feature states already loaded for the
    /// customers. Event counts of the named windows are read for all of them at once,
    /// from the customer index alone; the events themselves only for a dynamic
    /// condition.
    async fn facts_many(
        &self,
        customers: &[(&CustomerId, Option<&Customer>)],
        plan: &FactsPlan,
        batch: &BatchStates,
        now: DateTime<Utc>,
    ) -> Result<Vec<CustomerFacts>> {
        let unread: Vec<CustomerId> = if plan.traits {
            customers
                .iter()
                .filter(|(_, profile)| profile.is_none())
                .map(|(id, _)| (*id).clone())
                .collect()
        } else {
            Vec::new()
        };
        let mut read: HashMap<CustomerId, Customer> = if unread.is_empty() {
            HashMap::new()
        } else {
            let profiles = self.profiles.get_many_without_pii(&unread).await?;
            unread
                .into_iter()
                .zip(profiles)
                .filter_map(|(id, p)| p.map(|p| (id, p)))
                .collect()
        };
        let ids: Vec<&CustomerId> = customers.iter().map(|(id, _)| *id).collect();
        let windows: Vec<(String, Window)> = plan.windows.iter().cloned().collect();
        let mut counted = if plan.dynamic || windows.is_empty() {
            Vec::new()
        } else {
            let since: Vec<(String, DateTime<Utc>)> = windows
                .iter()
                .map(|(t, w)| (t.clone(), now - w.duration()))
                .collect();
            let owned: Vec<CustomerId> = ids.iter().map(|id| (*id).clone()).collect();
            self.stores
                .events
                .count_customer_events(&owned, &since)
                .await?
        }
        .into_iter();
        // A feature read that fails is an error here, never default values: membership
        // decided on them would be wrong (the batch or the refresh is tried again).
        let mut features = match &plan.features {
            Some(names) if names.is_empty() => Vec::new(),
            names => {
                self.features
                    .read_after_batch(batch, &ids, names.as_deref(), "features", now)
                    .await?
            }
        }
        .into_iter();
        let mut out = Vec::with_capacity(customers.len());
        for (id, profile) in customers {
            let traits = match profile {
                Some(c) => c.traits.clone(),
                None => read.remove(*id).map(|c| c.traits).unwrap_or_default(),
            };
            let features = features
                .next()
                .unwrap_or_default()
                .into_iter()
                .map(|v| (v.name, v.value))
                .collect();
            let (counts, events) = match (plan.dynamic, plan.longest) {
                // A dynamic condition may count any type and window: keep the events.
                (true, Some(longest)) => {
                    let events = self
                        .stores
                        .events
                        .customer_events(id, now - longest.duration())
                        .await?;
                    let counts = windows
                        .iter()
                        .map(|(ty, w)| ((ty.clone(), *w), count_events(&events, ty, *w, now)))
                        .collect();
                    (counts, events)
                }
                _ => {
                    let counts = counted.next().unwrap_or_default();
                    (windows.iter().cloned().zip(counts).collect(), Vec::new())
                }
            };
            out.push(CustomerFacts(Arc::new(LoadedFacts {
                traits,
                features,
                counts,
                events,
                now,
            })));
        }
        Ok(out)
    }
}

/// The memberships of one customer in `defs` as `facts` decide them.
fn membership(
    customer: &CustomerId,
    defs: &[Arc<SegmentDef>],
    facts: &CustomerFacts,
    failures: &mut Failures,
) -> Vec<MembershipChange> {
    defs.iter()
        .map(|d| MembershipChange {
            segment: d.name.clone(),
            customer: customer.clone(),
            joined: failures.evaluate(d, facts),
        })
        .collect()
}

/// What evaluating a set of definitions reads of each customer, worked out once for a
/// batch of customers rather than once per customer.
struct FactsPlan {
    /// A condition reads traits (a trait node, or a Rhai predicate, which may).
    traits: bool,
    /// The features read; `None`: any may be (a condition names one only at run time).
    features: Option<Vec<String>>,
    /// The (event type, window) pairs counted.
    windows: BTreeSet<(String, Window)>,
    /// The customer's events are read back this far.
    longest: Option<Window>,
    /// A condition names features or events only at run time.
    dynamic: bool,
}

impl FactsPlan {
    fn new(defs: &[Arc<SegmentDef>]) -> FactsPlan {
        let dynamic = defs.iter().any(|d| d.condition.is_dynamic());
        let features = (!dynamic).then(|| {
            defs.iter()
                .flat_map(|d| d.condition.features())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect()
        });
        let windows: BTreeSet<(String, Window)> = defs
            .iter()
            .flat_map(|d| d.condition.event_windows())
            .collect();
        let longest = if dynamic {
            Some(Window::LONGEST)
        } else {
            windows.iter().map(|(_, w)| *w).max()
        };
        FactsPlan {
            traits: defs.iter().any(|d| d.condition.reads_traits()),
            features,
            windows,
            longest,
            dynamic,
        }
    }
}
