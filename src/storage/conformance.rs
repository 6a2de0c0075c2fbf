//! Conformance suites: one `pub async fn` per storage trait, exercising every method and
//! every sentence of the trait's contract. Every backend runs all of them.
//!
//! Each suite panics (with a message naming the broken rule) on the first violation, so a
//! backend's test is just `conformance::profiles(store, "t1:").await`.
//!
//! Sharing a real server (Redis, ...): every id, name and key a suite creates starts with
//! the caller's `prefix`, so leftovers of earlier runs and other prefixes do not collide.
//! Choose prefixes that are unique and not prefixes of each other (e.g. `"run-<uuid>:"`).
//! Whole-store figures (`count`, `last_seq`, `list`) are checked as differences, so each
//! suite must be the only writer of its capability while it runs. Properties that only a
//! fresh store can show (`last_seq` is 0 on an empty log) are checked when the store looks
//! fresh.
//!
//! This is plain library code (no dev-dependencies), so integration tests of any backend
//! can call it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use serde_json::{json, Map};

use super::{
    AppendOutcome, BanditStore, ContentStore, DataKeyStore, DecisionStore, DefinitionKind,
    DefinitionStore, EventClaims, EventLog, ExperimentStore, FeatureStore, KeyOwner, KeyStore,
    MembershipChange, PrivacyChange, PrivacyEntry, PrivacyJournal, ProfileStore, PublishedTotals,
    SealedField, SegmentStore, StorageResult, StoredProfile, WrappedKey,
};
use crate::auth::{KeyRecord, Role};
use crate::bandit::linear::LinearStats;
use crate::bandit::ArmStats;
use crate::content::ContentItem;
use crate::customers::{Consent, CustomerId};
use crate::decision::{Assignment, Decision, Impression, Outcome, PropensityKind, ScoredItem};
use crate::events::{Event, StoredEvent};
use crate::experiments::VariantTotals;
use crate::features::{Bucket, FeatureKey, FeatureState};

/// Unwraps a storage result, failing the suite with `what` and the error.
#[track_caller]
fn ok<T>(what: &str, result: StorageResult<T>) -> T {
    match result {
        Ok(value) => value,
        Err(e) => panic!("{what}: unexpected storage error: {e}"),
    }
}

/// A customer id, panicking if `raw` is not a valid one.
#[track_caller]
pub fn customer_id(raw: &str) -> CustomerId {
    match CustomerId::parse("customerId", raw) {
        Ok(id) => id,
        Err(e) => panic!("conformance: invalid test id {raw:?}: {e}"),
    }
}

/// A fixed instant, so that timestamps compare exactly.
pub fn base_time() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5)
        .single()
        .unwrap_or(DateTime::UNIX_EPOCH)
}

/// Suffixes whose byte order differs from their order under common wrong encodings
/// (length-prefixed strings, case-folding, `char` vs byte order).
const TRICKY_SUFFIXES: [&str; 9] = ["b", "a", "ab", "a b", "a\u{e9}", "a-1", "aa", "z", "B"];

// ---------------------------------------------------------------------------------------
// Profiles
// ---------------------------------------------------------------------------------------

/// A complete stored profile (traits, sealed fields, email index, consent, sub-second
/// timestamps) that varies with `n`. The sealed bytes are arbitrary: stores keep them
/// opaque.
pub fn sample_customer(id: &CustomerId, n: i64) -> StoredProfile {
    let mut traits = Map::new();
    traits.insert("n".into(), json!(n));
    traits.insert("plan".into(), json!("pro"));
    let mut sealed = BTreeMap::new();
    for (field, byte) in [("email", 1u8), ("name", 2), ("traits.birthday", 3)] {
        sealed.insert(
            field.to_owned(),
            SealedField {
                nonce: vec![byte; 12],
                ciphertext: vec![byte, 0, 255, (n & 0xff) as u8],
            },
        );
    }
    StoredProfile {
        id: id.clone(),
        traits,
        sealed,
        email_index: Some(format!("index-{n}")),
        consent: Consent {
            personalization: Some(true),
            // Differs between samples, so that a consent read for another id shows.
            marketing: (n % 3 != 0).then_some(n % 2 == 0),
            analytics: Some(false),
        },
        created_at: base_time() + Duration::nanoseconds(n * 1_001),
        updated_at: base_time() + Duration::milliseconds(n),
    }
}

/// [`ProfileStore`]: `None` for missing, whole-profile replace, delete's `bool`,
/// `list` order / `after` / `limit`, `count`, and the email index following puts and
/// deletes.
pub async fn profiles(store: &dyn ProfileStore, prefix: &str) {
    let id = |suffix: &str| customer_id(&format!("{prefix}{suffix}"));
    let count0 = ok("count", store.count().await);

    // Missing.
    assert_eq!(
        ok("get missing", store.get(&id("missing")).await),
        None,
        "get of an unknown id must be None"
    );
    assert!(
        !ok("delete missing", store.delete(&id("missing")).await),
        "delete of an unknown id must return false"
    );

    // Put and get.
    let mut expected: BTreeMap<String, StoredProfile> = BTreeMap::new();
    for (n, suffix) in TRICKY_SUFFIXES.iter().enumerate() {
        let c = sample_customer(&id(suffix), n as i64);
        ok("put", store.put(&c).await);
        expected.insert(c.id.as_str().to_owned(), c);
    }
    for c in expected.values() {
        assert_eq!(
            ok("get", store.get(&c.id).await).as_ref(),
            Some(c),
            "get must return exactly the profile that was put"
        );
    }
    let mut ids: Vec<CustomerId> = expected.values().map(|c| c.id.clone()).collect();
    ids.insert(1, id("missing"));
    let mut stored: Vec<Option<StoredProfile>> = expected.values().cloned().map(Some).collect();
    stored.insert(1, None);
    assert_eq!(
        ok("get_many", store.get_many(&ids).await),
        stored,
        "get_many must give each id's profile in order, None where there is none"
    );
    assert!(ok("get_many of none", store.get_many(&[]).await).is_empty());
    let mut consents: Vec<Option<Consent>> =
        expected.values().map(|c| Some(c.consent.clone())).collect();
    consents.insert(1, None);
    assert_eq!(
        ok("consents", store.consents(&ids).await),
        consents,
        "consents must give each id's stored consent in order, None where there is no profile"
    );
    assert!(ok("consents of none", store.consents(&[]).await).is_empty());
    assert_eq!(
        ok("count", store.count().await),
        count0 + expected.len() as u64,
        "count must grow by the number of new profiles"
    );

    // Put replaces the whole profile: nothing of the old one is merged in.
    let replaced_id = id("a");
    let mut replacement = sample_customer(&replaced_id, 100);
    replacement.traits = Map::new();
    replacement.traits.insert("only".into(), json!("this"));
    replacement.sealed = BTreeMap::new();
    replacement.email_index = None;
    replacement.consent = Consent::default();
    ok("put (replace)", store.put(&replacement).await);
    assert_eq!(
        ok("get replaced", store.get(&replaced_id).await).as_ref(),
        Some(&replacement),
        "put must replace the whole profile (merging is the caller's job)"
    );
    expected.insert(replaced_id.as_str().to_owned(), replacement);
    assert_eq!(
        ok("count", store.count().await),
        count0 + expected.len() as u64,
        "replacing a profile must not change count"
    );

    // List: ascending id order, strictly after `after`, at most `limit`.
    let expected_ids: Vec<String> = expected.keys().cloned().collect();
    let start = (!prefix.is_empty()).then(|| customer_id(prefix));
    let mut listed = Vec::new();
    let mut after = start.clone();
    'pages: loop {
        let page = ok("list", store.list(after.as_ref(), 2).await);
        assert!(page.len() <= 2, "list must return at most `limit` profiles");
        if page.is_empty() {
            break;
        }
        for c in &page {
            if let Some(after) = &after {
                assert!(c.id > *after, "list must return ids strictly after `after`");
            }
            if !c.id.as_str().starts_with(prefix) {
                break 'pages;
            }
            listed.push(c.clone());
        }
        after = page.last().map(|c| c.id.clone());
    }
    let listed_ids: Vec<String> = listed.iter().map(|c| c.id.as_str().to_owned()).collect();
    assert_eq!(
        listed_ids, expected_ids,
        "paging through list must give every profile once, in ascending (byte) id order"
    );
    assert_eq!(
        listed,
        expected.values().cloned().collect::<Vec<_>>(),
        "list must return the stored profiles"
    );
    assert!(
        ok("list limit 0", store.list(start.as_ref(), 0).await).is_empty(),
        "list with limit 0 must be empty"
    );
    // `after` need not be a stored id: "a " sorts between "a" and "a b".
    let between = ok("list after absent id", store.list(Some(&id("a ")), 1).await);
    assert_eq!(
        between.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        vec![id("a b").as_str()],
        "list after an id that is not stored must start at the next stored id"
    );
    let last = expected_ids.last().map(|s| customer_id(s));
    let tail = ok("list after last", store.list(last.as_ref(), 10).await);
    assert!(
        tail.iter().all(|c| !c.id.as_str().starts_with(prefix)),
        "list after the greatest id must not return it or anything before it"
    );
    let all = ok(
        "list all",
        store
            .list(None, (count0 as usize) + expected.len() + 1)
            .await,
    );
    assert_eq!(
        all.len() as u64,
        count0 + expected.len() as u64,
        "list from the start with a large limit must return count() profiles"
    );
    assert!(
        all.windows(2).all(|w| w[0].id < w[1].id),
        "list from the start must be strictly ascending by id"
    );
    if count0 == 0 {
        assert_eq!(
            all,
            expected.values().cloned().collect::<Vec<_>>(),
            "list from the start of a fresh store must return exactly the stored profiles"
        );
    }

    // Delete.
    assert!(
        ok("delete", store.delete(&replaced_id).await),
        "delete of a stored profile must return true"
    );
    assert_eq!(
        ok("get deleted", store.get(&replaced_id).await),
        None,
        "a deleted profile must read as None"
    );
    assert!(
        !ok("delete again", store.delete(&replaced_id).await),
        "a second delete must return false"
    );
    assert_eq!(
        ok("count", store.count().await),
        count0 + expected.len() as u64 - 1,
        "delete must decrease count by one"
    );
    let after_delete = ok("list after delete", store.list(start.as_ref(), 100).await);
    assert!(
        !after_delete.iter().any(|c| c.id == replaced_id),
        "a deleted profile must not be listed"
    );
    for c in expected.values().filter(|c| c.id != replaced_id) {
        assert_eq!(
            ok("get survivor", store.get(&c.id).await).as_ref(),
            Some(c),
            "delete must not touch other profiles"
        );
    }

    // Email index: follows puts (old entry gone, new one found) and deletes; shared
    // entries list every customer, ascending by id.
    let index = |suffix: &str| format!("{prefix}email-{suffix}");
    let (x, y) = (id("ix"), id("iy"));
    let mut px = sample_customer(&x, 1);
    px.email_index = Some(index("one"));
    ok("put indexed", store.put(&px).await);
    assert_eq!(
        ok("find", store.find_by_email(&index("one")).await),
        vec![x.clone()],
        "find_by_email must find the profile stored with that index"
    );
    let mut py = sample_customer(&y, 2);
    py.email_index = Some(index("one"));
    ok("put shared index", store.put(&py).await);
    assert_eq!(
        ok("find shared", store.find_by_email(&index("one")).await),
        vec![x.clone(), y.clone()],
        "find_by_email must list every customer with that index, by id"
    );
    px.email_index = Some(index("two"));
    ok("put new index", store.put(&px).await);
    assert_eq!(
        ok("find old", store.find_by_email(&index("one")).await),
        vec![y.clone()],
        "a put must remove the profile's old index entry"
    );
    assert_eq!(
        ok("find new", store.find_by_email(&index("two")).await),
        vec![x.clone()]
    );
    assert!(
        ok("find prefix", store.find_by_email(&index("tw")).await).is_empty(),
        "find_by_email must match whole index values only"
    );
    py.email_index = None;
    ok("put without index", store.put(&py).await);
    assert!(ok("find none", store.find_by_email(&index("one")).await).is_empty());
    ok("delete indexed", store.delete(&x).await);
    assert!(
        ok("find deleted", store.find_by_email(&index("two")).await).is_empty(),
        "delete must remove the profile's index entry"
    );
    ok("delete y", store.delete(&y).await);
}

// ---------------------------------------------------------------------------------------
// Data keys
// ---------------------------------------------------------------------------------------

fn sample_wrapped(master: &str, n: u8) -> WrappedKey {
    WrappedKey {
        master_key_id: master.to_owned(),
        nonce: vec![n; 12],
        ciphertext: vec![n; 48],
        created_at: base_time() + Duration::milliseconds(i64::from(n)),
    }
}

/// [`DataKeyStore`]: first insert wins, compare-and-replace, destroy, `list` order and
/// paging, system owners apart from customers, erasure markers.
pub async fn data_keys(store: &dyn DataKeyStore, prefix: &str) {
    let owner = |suffix: &str| KeyOwner::Customer(customer_id(&format!("{prefix}{suffix}")));
    let (a, b) = (owner("a"), owner("b"));
    assert_eq!(ok("get missing", store.get(&a).await), None);
    let k1 = sample_wrapped("k1", 1);
    assert_eq!(
        ok("insert", store.insert(&a, &k1).await),
        k1,
        "insert must return the key it stored"
    );
    assert_eq!(
        ok(
            "insert again",
            store.insert(&a, &sample_wrapped("k1", 2)).await
        ),
        k1,
        "a second insert must keep and return the first key"
    );
    assert_eq!(ok("get", store.get(&a).await), Some(k1.clone()));

    let k2 = sample_wrapped("k2", 3);
    assert!(
        !ok(
            "replace stale",
            store.replace(&a, &sample_wrapped("k1", 9), &k2).await
        ),
        "replace must refuse when the stored key is not `old`"
    );
    assert_eq!(ok("get after stale", store.get(&a).await), Some(k1.clone()));
    assert!(ok("replace", store.replace(&a, &k1, &k2).await));
    assert_eq!(ok("get replaced", store.get(&a).await), Some(k2.clone()));
    assert!(
        !ok("replace missing", store.replace(&b, &k1, &k2).await),
        "replace of an owner without a key must be false"
    );
    assert_eq!(ok("get b", store.get(&b).await), None, "and write nothing");

    // System owners never collide with customers of the same name.
    let system = KeyOwner::System(format!("{prefix}a"));
    let customer_a = KeyOwner::Customer(customer_id(&format!("{prefix}a")));
    ok("insert system", store.insert(&system, &k1).await);
    assert_eq!(ok("get system", store.get(&system).await), Some(k1.clone()));
    assert_eq!(
        ok("get customer", store.get(&customer_a).await),
        Some(k2.clone())
    );
    // Nor do the owners of a customer's records on the events topic.
    let stream = KeyOwner::Stream(format!("{prefix}a"));
    let k4 = sample_wrapped("k4", 5);
    ok("insert stream", store.insert(&stream, &k4).await);
    assert_eq!(
        ok(
            "get many",
            store
                .get_many(&[stream.clone(), b.clone(), system.clone(), a.clone()])
                .await
        ),
        vec![Some(k4.clone()), None, Some(k1.clone()), Some(k2.clone())],
        "get_many must read each owner's key, in order"
    );
    assert!(ok("get many of none", store.get_many(&[]).await).is_empty());

    // List: ascending by encoded owner, paged.
    ok("insert b", store.insert(&b, &k1).await);
    let mut listed = Vec::new();
    let mut after: Option<KeyOwner> = None;
    loop {
        let page = ok("list", store.list(after.as_ref(), 1).await);
        assert!(page.len() <= 1, "list must return at most `limit` keys");
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        listed.extend(page);
    }
    let ours: Vec<(KeyOwner, WrappedKey)> = listed
        .into_iter()
        .filter(|(o, _)| [&a, &b, &system, &stream].contains(&o))
        .collect();
    assert_eq!(
        ours,
        vec![
            (a.clone(), k2.clone()),
            (b.clone(), k1.clone()),
            (system.clone(), k1.clone()),
            (stream.clone(), k4.clone())
        ],
        "list must return every key once, ascending by encoded owner (customers, system, \
         then stream owners)"
    );
    assert!(ok("list 0", store.list(None, 0).await).is_empty());

    // Destroy.
    assert!(ok("destroy", store.destroy(&a).await));
    assert_eq!(ok("get destroyed", store.get(&a).await), None);
    assert!(!ok("destroy again", store.destroy(&a).await));
    assert_eq!(
        ok("get b", store.get(&b).await),
        Some(k1.clone()),
        "others stay"
    );
    let k3 = sample_wrapped("k1", 4);
    assert_eq!(
        ok("insert after destroy", store.insert(&a, &k3).await),
        k3,
        "a destroyed owner may get a new key"
    );
    for o in [&a, &b, &system, &stream] {
        ok("cleanup", store.destroy(o).await);
    }

    // Erasure markers.
    let tag = format!("{prefix}tag");
    assert_eq!(ok("erased_at none", store.erased_at(&tag).await), None);
    assert!(!ok("clear none", store.clear_erased(&tag).await));
    ok("mark", store.mark_erased(&tag, base_time()).await);
    assert_eq!(
        ok("erased_at", store.erased_at(&tag).await),
        Some(base_time())
    );
    let later = base_time() + Duration::seconds(5);
    ok("mark again", store.mark_erased(&tag, later).await);
    assert_eq!(
        ok("erased_at later", store.erased_at(&tag).await),
        Some(later),
        "the last mark wins"
    );
    assert_eq!(
        ok("other tag", store.erased_at(&format!("{tag}x")).await),
        None
    );
    assert_eq!(
        ok(
            "erased_many",
            store
                .erased_many(&[format!("{tag}x"), tag.clone(), tag.clone()])
                .await
        ),
        vec![None, Some(later), Some(later)],
        "erased_many must give each tag's marker in order"
    );
    assert!(ok("erased_many of none", store.erased_many(&[]).await).is_empty());
    assert!(ok("clear", store.clear_erased(&tag).await));
    assert_eq!(ok("erased_at cleared", store.erased_at(&tag).await), None);

    // How far the privacy journal was applied: the last position set wins.
    for position in [format!("{prefix}1-0"), format!("{prefix}2-5")] {
        ok(
            "set journal position",
            store.set_journal_position(&position).await,
        );
        assert_eq!(
            ok("journal position", store.journal_position().await),
            Some(position),
            "the journal position reads back as last set"
        );
    }
}

/// A [`BanditStore`] whose adds are flushed before they return.
struct Flushed(Arc<dyn BanditStore>);

#[async_trait::async_trait]
impl BanditStore for Flushed {
    async fn add(&self, placement: &str, arm: &str, delta: ArmStats) -> StorageResult<()> {
        self.0.add(placement, arm, delta).await?;
        self.0.flush().await
    }

    async fn get(&self, placement: &str, arms: &[String]) -> StorageResult<Vec<ArmStats>> {
        self.0.get(placement, arms).await
    }

    async fn add_linear(
        &self,
        placement: &str,
        arm: &str,
        delta: &LinearStats,
    ) -> StorageResult<()> {
        self.0.add_linear(placement, arm, delta).await?;
        self.0.flush().await
    }

    async fn get_linear(
        &self,
        placement: &str,
        arms: &[String],
        dims: usize,
    ) -> StorageResult<Vec<LinearStats>> {
        self.0.get_linear(placement, arms, dims).await
    }
}

// ---------------------------------------------------------------------------------------
// Published experiment totals
// ---------------------------------------------------------------------------------------

/// [`PublishedTotals`] on `published`, which is the same store as `store`: publications
/// set (not add) a process's figures, totals sum every process's and what `add` added,
/// and `totals_except` leaves one process out.
pub async fn published_totals(
    store: &dyn ExperimentStore,
    published: &dyn PublishedTotals,
    prefix: &str,
) {
    let exp = format!("{prefix}published");
    let totals = |exposures, conversions, value: f64| VariantTotals {
        exposures,
        conversions,
        value_sum: value,
        value_sum_sq: value * value,
    };
    let row = |variant: &str, t: VariantTotals| (exp.clone(), variant.to_owned(), t);
    let (p1, p2) = ("process-1", "process-2");
    let first = [row("control", totals(2, 1, 1.5))];
    ok("publish", published.publish(p1, &first).await);
    ok("publish again", published.publish(p1, &first).await);
    assert_eq!(
        ok("totals", store.totals(&exp).await),
        vec![("control".to_owned(), totals(2, 1, 1.5))],
        "a publication repeated sets the same figures, it does not add them"
    );
    ok(
        "publish another process",
        published
            .publish(
                p2,
                &[
                    row("control", totals(3, 0, 0.0)),
                    row("treatment", totals(4, 1, 2.0)),
                ],
            )
            .await,
    );
    ok("add", store.add(&[row("control", totals(1, 0, 0.0))]).await);
    assert_eq!(
        ok("totals", store.totals(&exp).await),
        vec![
            ("control".to_owned(), totals(6, 1, 1.5)),
            ("treatment".to_owned(), totals(4, 1, 2.0)),
        ],
        "totals sum every process's figures and what was added"
    );
    assert_eq!(
        ok("totals except", published.totals_except(&exp, p2).await),
        vec![("control".to_owned(), totals(3, 1, 1.5))],
        "totals_except leaves that process out"
    );
    ok(
        "publish newer",
        published
            .publish(p1, &[row("control", totals(5, 2, 3.0))])
            .await,
    );
    assert_eq!(
        ok("totals except", published.totals_except(&exp, p2).await),
        vec![("control".to_owned(), totals(6, 2, 3.0))],
        "the latest publication replaces the process's figures"
    );
    let nan = [row("control", totals(1, 0, f64::NAN))];
    assert!(
        published.publish(p1, &nan).await.is_err(),
        "a figure that is not finite is refused"
    );
}

// ---------------------------------------------------------------------------------------
// Privacy journal
// ---------------------------------------------------------------------------------------

/// [`PrivacyJournal`]: appends read back in order, strictly after a position, at most
/// `limit`. The suite must be the journal's only writer while it runs.
pub async fn privacy_journal(journal: &dyn PrivacyJournal, prefix: &str) {
    let erased = PrivacyEntry {
        customer: customer_id(&format!("{prefix}journal-c1")),
        at: base_time(),
        change: PrivacyChange::Erased {
            pseudonym: format!("{prefix}erased-1"),
        },
    };
    let consented = PrivacyEntry {
        customer: customer_id(&format!("{prefix}journal-c1")),
        at: base_time() + Duration::seconds(1),
        change: PrivacyChange::Consented,
    };
    let first = ok("append", journal.append(&erased).await);
    let second = ok("append", journal.append(&consented).await);
    assert_ne!(first, second, "each entry has its own position");
    let after_first = ok("read after", journal.read_after(Some(&first), 10).await);
    assert_eq!(
        after_first,
        vec![(second.clone(), consented.clone())],
        "read_after returns what follows the position, in order"
    );
    assert!(
        ok(
            "read after the last",
            journal.read_after(Some(&second), 10).await
        )
        .is_empty(),
        "nothing follows the last entry"
    );
    let all = ok(
        "read from the start",
        journal.read_after(None, usize::MAX).await,
    );
    let at = |p: &str| all.iter().position(|(q, _)| q == p);
    let (i, j) = (at(&first), at(&second));
    assert!(
        i.is_some() && j == i.map(|i| i + 1),
        "a read from the start holds both entries, in append order"
    );
    assert_eq!(
        all[i.unwrap_or_default()].1,
        erased,
        "an entry reads back as appended"
    );
    assert_eq!(
        ok("read one", journal.read_after(None, 1).await).len(),
        1,
        "limit bounds a read"
    );
}

// ---------------------------------------------------------------------------------------
// Event log
// ---------------------------------------------------------------------------------------

/// An event with nested properties that vary with `n`.
pub fn sample_event(id: &str, customer: &CustomerId, timestamp: DateTime<Utc>, n: i64) -> Event {
    let mut properties = Map::new();
    properties.insert("n".into(), json!(n));
    properties.insert(
        "nested".into(),
        json!({"list": [1, 2.5, "x"], "none": null}),
    );
    Event {
        event_id: id.to_owned(),
        customer_id: customer.clone(),
        event_type: "page_view".into(),
        timestamp,
        properties,
        position: None,
    }
}

#[track_caller]
fn appended(outcome: AppendOutcome, what: &str) -> u64 {
    match outcome {
        AppendOutcome::Appended(seq) => seq,
        AppendOutcome::Duplicate => panic!("{what}: expected Appended, got Duplicate"),
    }
}

fn stored(pairs: &[(u64, &Event)]) -> Vec<StoredEvent> {
    pairs
        .iter()
        .map(|&(seq, event)| StoredEvent {
            seq,
            event: event.clone(),
        })
        .collect()
}

/// [`EventLog`]: dedup within and across batches, seqs strictly increasing in input order
/// and across calls, `scan` paging, `customer_events` filter and (timestamp, seq) order,
/// `last_seq`, erasure keeping dedup keys, and consumer offsets.
pub async fn event_log(store: &dyn EventLog, prefix: &str) {
    let eid = |suffix: &str| format!("{prefix}{suffix}");
    let c1 = customer_id(&format!("{prefix}c1"));
    let c10 = customer_id(&format!("{prefix}c10")); // c1 is a prefix of c10
    let t = base_time();

    let start = ok("last_seq", store.last_seq().await);
    if start == 0 {
        assert!(
            ok("scan empty", store.scan(0, 10).await).is_empty(),
            "last_seq is 0 but the log is not empty"
        );
    }
    assert!(
        ok("scan after last", store.scan(start, 10).await).is_empty(),
        "scan after last_seq must be empty"
    );
    assert!(
        ok("append empty", store.append(&[]).await).is_empty(),
        "appending no events must return no outcomes"
    );
    assert_eq!(
        ok("last_seq", store.last_seq().await),
        start,
        "an empty append must not assign a seq"
    );

    // Batch A: out-of-order timestamps, a duplicate within the batch, sub-millisecond gaps.
    // The latest of c1's events is a purchase, the rest page views (counting by type).
    let mut a1 = sample_event(&eid("a1"), &c1, t + Duration::seconds(2), 1);
    a1.event_type = "purchase".into();
    let a2 = sample_event(&eid("a2"), &c1, t - Duration::nanoseconds(1), 2);
    let a1_again = sample_event(&eid("a1"), &c1, t + Duration::seconds(9), 99);
    let a3 = sample_event(&eid("a3"), &c10, t + Duration::seconds(1), 3);
    let a4 = sample_event(&eid("a4"), &c1, t + Duration::nanoseconds(1_000_000_500), 4);
    let a5 = sample_event(&eid("a5"), &c1, t + Duration::nanoseconds(1_000_000_200), 5);
    let batch_a = [
        a1.clone(),
        a2.clone(),
        a1_again.clone(),
        a3.clone(),
        a4.clone(),
        a5.clone(),
    ];
    let out_a = ok("append A", store.append(&batch_a).await);
    assert_eq!(
        out_a.len(),
        batch_a.len(),
        "append must return one outcome per input event"
    );
    assert_eq!(
        out_a[2],
        AppendOutcome::Duplicate,
        "an event_id repeated within a batch must be a Duplicate"
    );
    let s1 = appended(out_a[0], "append A[0]");
    let s2 = appended(out_a[1], "append A[1]");
    let s3 = appended(out_a[3], "append A[3]");
    let s4 = appended(out_a[4], "append A[4]");
    let s5 = appended(out_a[5], "append A[5]");
    assert!(
        s1 > start,
        "new seqs must be greater than every earlier one"
    );
    assert!(
        s1 < s2 && s2 < s3 && s3 < s4 && s4 < s5,
        "seqs must be strictly increasing in input order: {out_a:?}"
    );
    assert_eq!(
        ok("last_seq", store.last_seq().await),
        s5,
        "last_seq must be the highest seq assigned"
    );

    // Batch B: a duplicate of an earlier batch, an equal timestamp, a pre-1970 timestamp.
    let b1 = sample_event(&eid("b1"), &c1, a4.timestamp, 6);
    let b2 = sample_event(
        &eid("b2"),
        &c1,
        DateTime::UNIX_EPOCH - Duration::milliseconds(500),
        7,
    );
    let a2_again = sample_event(&eid("a2"), &c10, t, 98);
    let out_b = ok(
        "append B",
        store
            .append(&[a2_again.clone(), b1.clone(), b2.clone()])
            .await,
    );
    assert_eq!(
        out_b.len(),
        3,
        "append must return one outcome per input event"
    );
    assert_eq!(
        out_b[0],
        AppendOutcome::Duplicate,
        "an event_id stored by an earlier append must be a Duplicate"
    );
    let s6 = appended(out_b[1], "append B[1]");
    let s7 = appended(out_b[2], "append B[2]");
    assert!(
        s5 < s6 && s6 < s7,
        "seqs must be strictly increasing across calls"
    );
    assert_eq!(ok("last_seq", store.last_seq().await), s7);

    // Scan: seq > after, ascending, at most limit; the first stored copy of an id wins.
    let all = stored(&[
        (s1, &a1),
        (s2, &a2),
        (s3, &a3),
        (s4, &a4),
        (s5, &a5),
        (s6, &b1),
        (s7, &b2),
    ]);
    assert_eq!(
        ok("scan", store.scan(start, 100).await),
        all,
        "scan must return exactly the appended events (first copy of each id), by seq"
    );
    let mut paged = Vec::new();
    let mut after = start;
    loop {
        let page = ok("scan page", store.scan(after, 3).await);
        assert!(page.len() <= 3, "scan must return at most `limit` events");
        let Some(last) = page.last() else { break };
        after = last.seq;
        paged.extend(page);
    }
    assert_eq!(
        paged, all,
        "paging with scan(after = last seq) must visit every event once"
    );
    assert_eq!(
        ok("scan mid", store.scan(s3, 2).await),
        all[3..5].to_vec(),
        "scan must start strictly after `after`"
    );
    assert!(
        ok("scan limit 0", store.scan(start, 0).await).is_empty(),
        "scan with limit 0 must be empty"
    );
    assert!(
        ok("scan after last", store.scan(s7, 10).await).is_empty(),
        "scan after last_seq must be empty"
    );

    // Customer events: timestamp >= since, ascending by (timestamp, seq), that customer only.
    let long_ago = Utc
        .with_ymd_and_hms(1900, 1, 1, 0, 0, 0)
        .single()
        .unwrap_or(DateTime::UNIX_EPOCH);
    let c1_all = stored(&[
        (s7, &b2),
        (s2, &a2),
        (s5, &a5),
        (s4, &a4),
        (s6, &b1),
        (s1, &a1),
    ]);
    assert_eq!(
        ok(
            "customer_events",
            store.customer_events(&c1, long_ago).await
        ),
        c1_all,
        "customer_events must be ascending by (timestamp, seq), to the nanosecond, \
         pre-1970 included, and hold only that customer's events"
    );
    assert_eq!(
        ok(
            "customer_events since",
            store.customer_events(&c1, a4.timestamp).await
        ),
        c1_all[3..].to_vec(),
        "customer_events must include events exactly at `since` and exclude earlier ones \
         (even 300 ns earlier)"
    );
    assert_eq!(
        ok(
            "customer_events since+1ns",
            store
                .customer_events(&c1, a4.timestamp + Duration::nanoseconds(1))
                .await
        ),
        c1_all[5..].to_vec(),
        "customer_events must exclude events before `since`"
    );
    assert_eq!(
        ok(
            "customer_events c10",
            store.customer_events(&c10, long_ago).await
        ),
        stored(&[(s3, &a3)]),
        "customer_events must not mix customers whose ids share a prefix"
    );
    let nobody = customer_id(&format!("{prefix}nobody"));
    assert!(
        ok(
            "customer_events unknown",
            store.customer_events(&nobody, long_ago).await
        )
        .is_empty(),
        "customer_events of an unknown customer must be empty"
    );

    // Counts by type: timestamp > since (strictly), per customer and window, in order.
    let windows = [
        ("page_view", long_ago),
        ("purchase", long_ago),
        ("page_view", a4.timestamp),
        ("purchase", a4.timestamp),
        ("page_view", a5.timestamp),
        ("cart", long_ago),
    ]
    .map(|(t, since)| (t.to_owned(), since));
    assert_eq!(
        ok(
            "count_customer_events",
            store
                .count_customer_events(&[c1.clone(), c10.clone(), nobody.clone()], &windows)
                .await
        ),
        vec![vec![5, 1, 0, 1, 2, 0], vec![1, 0, 0, 0, 0, 0], vec![0; 6]],
        "count_customer_events must count each customer's events of the window's type \
         strictly after `since`, to the nanosecond (b1 shares a4's timestamp), pre-1970 \
         included, without mixing customers whose ids share a prefix"
    );
    assert_eq!(
        ok(
            "count_customer_events without windows",
            store
                .count_customer_events(&[c1.clone(), c10.clone()], &[])
                .await
        ),
        vec![Vec::<u64>::new(), Vec::new()],
        "no windows: one empty list per customer"
    );

    // Erasure: removes the customer's events, keeps their dedup keys and last_seq.
    assert_eq!(
        ok("delete_customer", store.delete_customer(&c1).await),
        6,
        "delete_customer must return how many events it removed"
    );
    assert!(
        ok(
            "customer_events erased",
            store.customer_events(&c1, long_ago).await
        )
        .is_empty(),
        "an erased customer must have no events"
    );
    assert_eq!(
        ok(
            "count_customer_events erased",
            store
                .count_customer_events(std::slice::from_ref(&c1), &windows)
                .await
        ),
        vec![vec![0; 6]],
        "an erased customer's events must not be counted"
    );
    assert_eq!(
        ok("scan after erasure", store.scan(start, 100).await),
        stored(&[(s3, &a3)]),
        "erasure must remove the customer's events from the log and nothing else"
    );
    assert_eq!(
        ok(
            "customer_events c10",
            store.customer_events(&c10, long_ago).await
        ),
        stored(&[(s3, &a3)]),
        "erasure must not touch other customers"
    );
    assert_eq!(
        ok("last_seq after erasure", store.last_seq().await),
        s7,
        "last_seq is the highest seq ever assigned, even when that event was erased"
    );
    let replay = sample_event(&eid("c1-new"), &c1, t, 8);
    let out_c = ok(
        "append replay",
        store.append(&[a1.clone(), replay.clone()]).await,
    );
    assert_eq!(
        out_c[0],
        AppendOutcome::Duplicate,
        "a replayed event of an erased customer must still be recognised as a Duplicate"
    );
    let s8 = appended(out_c[1], "append after erasure");
    assert!(s8 > s7, "seqs must not be reused after an erasure");
    assert_eq!(
        ok("delete_customer", store.delete_customer(&c1).await),
        1,
        "delete_customer must count only the events it removed"
    );
    assert_eq!(
        ok("delete_customer again", store.delete_customer(&c1).await),
        0,
        "delete_customer of a customer without events must return 0"
    );

    // Offsets.
    let consumer = format!("{prefix}consumer");
    let other = format!("{prefix}consumer-2");
    assert_eq!(
        ok("committed_offset", store.committed_offset(&consumer).await),
        0,
        "a consumer that never committed must read 0"
    );
    ok("commit_offset", store.commit_offset(&consumer, s3).await);
    assert_eq!(
        ok("committed_offset", store.committed_offset(&consumer).await),
        s3
    );
    ok("commit_offset", store.commit_offset(&consumer, s8).await);
    assert_eq!(
        ok("committed_offset", store.committed_offset(&consumer).await),
        s8,
        "a later commit must replace the offset"
    );
    assert_eq!(
        ok(
            "committed_offset other",
            store.committed_offset(&other).await
        ),
        0,
        "offsets must be per consumer"
    );
    ok("commit_offset other", store.commit_offset(&other, s1).await);
    assert_eq!(
        ok("committed_offset", store.committed_offset(&consumer).await),
        s8,
        "committing for one consumer must not change another's offset"
    );
}

/// [`EventClaims`]: the first position an event id is read at is kept for the window; a
/// redelivery at that position is no copy, a read at another position is, in another
/// customer's space the same id is unrelated, and after the window the id is forgotten.
pub async fn event_claims(claims: &dyn EventClaims, prefix: &str) {
    let customer = customer_id(&format!("{prefix}claims"));
    let other = customer_id(&format!("{prefix}claims-other"));
    let at = |id: &str, who: &CustomerId, partition: i32, offset: i64| {
        let mut e = sample_event(id, who, Utc::now(), 0);
        e.position = Some(crate::events::StreamPosition { partition, offset });
        e
    };
    let hour = std::time::Duration::from_secs(3600);
    let copies = |events: Vec<Event>, window| async move {
        ok("copies", claims.copies(&events, window).await)
    };
    assert_eq!(
        copies(
            vec![at("e1", &customer, 0, 10), at("e2", &customer, 0, 11)],
            hour
        )
        .await,
        [false, false],
        "first reads"
    );
    assert_eq!(
        copies(
            vec![
                at("e1", &customer, 0, 10),
                at("e2", &customer, 0, 40),
                at("e1", &other, 1, 5),
                sample_event("e2", &customer, Utc::now(), 0),
            ],
            hour
        )
        .await,
        [false, true, false, false],
        "a redelivery, a copy, another customer's id, an event without a position"
    );
    // Two copies in one batch: the first in stream order is the original.
    assert_eq!(
        copies(
            vec![at("e3", &customer, 0, 50), at("e3", &customer, 0, 51)],
            hour
        )
        .await,
        [false, true]
    );
    // Forgotten after the window.
    let short = std::time::Duration::from_millis(50);
    assert_eq!(
        copies(vec![at("e4", &customer, 0, 60)], short).await,
        [false]
    );
    tokio::time::sleep(std::time::Duration::from_millis(120)).await;
    assert_eq!(
        copies(vec![at("e4", &customer, 0, 90)], short).await,
        [false],
        "the window has passed"
    );
}

// ---------------------------------------------------------------------------------------
// Features
// ---------------------------------------------------------------------------------------

/// A feature state with two buckets that varies with `n`.
pub fn sample_feature_state(n: u64) -> FeatureState {
    FeatureState {
        applied_seq: n,
        // Round-trips through every backend's encoding.
        applied_position: (n % 2 == 1).then_some(crate::events::StreamPosition {
            partition: 2,
            offset: 7_000_000_000 + n as i64,
        }),
        buckets: vec![
            Bucket {
                minute: 29_000_000 + n as i64,
                count: 2,
                sum: 1.5,
            },
            Bucket {
                minute: 29_000_001 + n as i64,
                count: 1,
                sum: -0.25,
            },
        ],
        last_seen_ms: Some(1_767_323_045_000 + n as i64),
    }
}

/// [`FeatureStore`]: one entry per key in order, `None` where never written, overwrite,
/// whole-batch visibility, `delete_customer` and `delete_key`.
pub async fn features(store: &dyn FeatureStore, prefix: &str) {
    let c1 = customer_id(&format!("{prefix}c1"));
    let c12 = customer_id(&format!("{prefix}c12")); // c1 is a prefix of c12
    let f1 = FeatureKey::new(format!("{prefix}f"), 1);
    let f2 = FeatureKey::new(format!("{prefix}f"), 2);
    let f2_1 = FeatureKey::new(format!("{prefix}f2"), 1); // "f" is a prefix of "f2"
    let g1 = FeatureKey::new(format!("{prefix}g"), 1);

    assert!(
        ok("read no keys", store.read(&c1, &[]).await).is_empty(),
        "read of no keys must return no entries"
    );
    assert_eq!(
        ok(
            "read unwritten",
            store.read(&c1, &[f1.clone(), f2.clone()]).await
        ),
        vec![None, None],
        "keys never written must read as None"
    );
    ok("write nothing", store.write(Vec::new()).await);

    let (s1, s2, s3, s4, s5) = (
        sample_feature_state(1),
        sample_feature_state(2),
        sample_feature_state(3),
        sample_feature_state(4),
        sample_feature_state(5),
    );
    ok(
        "write",
        store
            .write(vec![
                (c1.clone(), f1.clone(), s1.clone()),
                (c1.clone(), f2.clone(), s2.clone()),
                (c1.clone(), f2_1.clone(), s3.clone()),
                (c12.clone(), f1.clone(), s4.clone()),
                (c12.clone(), g1.clone(), s5.clone()),
            ])
            .await,
    );
    assert_eq!(
        ok(
            "read",
            store
                .read(
                    &c1,
                    &[f2.clone(), g1.clone(), f1.clone(), f2_1.clone(), f1.clone()]
                )
                .await
        ),
        vec![
            Some(s2.clone()),
            None,
            Some(s1.clone()),
            Some(s3.clone()),
            Some(s1.clone())
        ],
        "read must return one entry per key, in order (repeats included), None where unwritten"
    );
    assert_eq!(
        ok(
            "read c12",
            store
                .read(&c12, &[f1.clone(), g1.clone(), f2.clone()])
                .await
        ),
        vec![Some(s4.clone()), Some(s5.clone()), None],
        "states are per customer"
    );
    let nobody = customer_id(&format!("{prefix}nobody"));
    assert_eq!(
        ok(
            "read many",
            store
                .read_many(&[
                    (c12.clone(), vec![g1.clone(), f2.clone()]),
                    (nobody, vec![f1.clone()]),
                    (c1.clone(), vec![]),
                    (c1.clone(), vec![f2_1.clone(), f1.clone()]),
                ])
                .await
        ),
        vec![
            vec![Some(s5.clone()), None],
            vec![None],
            vec![],
            vec![Some(s3.clone()), Some(s1.clone())]
        ],
        "read_many must answer each request as read does, in order"
    );
    assert!(
        ok("read many of none", store.read_many(&[]).await).is_empty(),
        "read_many of no requests must return none"
    );

    // Overwrite.
    let s1b = sample_feature_state(11);
    ok(
        "overwrite",
        store
            .write(vec![(c1.clone(), f1.clone(), s1b.clone())])
            .await,
    );
    assert_eq!(
        ok(
            "read overwritten",
            store.read(&c1, &[f1.clone(), f2.clone()]).await
        ),
        vec![Some(s1b.clone()), Some(s2.clone())],
        "a write must replace the state of its key only"
    );

    // Whole-batch visibility: a concurrent reader sees all of a batch or none of it.
    let c3 = customer_id(&format!("{prefix}c3"));
    let keys: Vec<FeatureKey> = (0..32)
        .map(|v| FeatureKey::new(format!("{prefix}w"), v))
        .collect();
    let batch: Vec<_> = keys
        .iter()
        .map(|k| {
            (
                c3.clone(),
                k.clone(),
                sample_feature_state(u64::from(k.version)),
            )
        })
        .collect();
    let done = AtomicBool::new(false);
    let writing = async {
        let result = store.write(batch).await;
        done.store(true, Ordering::SeqCst);
        result
    };
    let reading = async {
        loop {
            let finished = done.load(Ordering::SeqCst);
            let states = ok("read during write", store.read(&c3, &keys).await);
            let present = states.iter().filter(|s| s.is_some()).count();
            assert!(
                present == 0 || present == keys.len(),
                "a batch write must become visible all at once (saw {present} of {})",
                keys.len()
            );
            if finished {
                assert_eq!(present, keys.len(), "a returned write must be visible");
                break;
            }
            tokio::task::yield_now().await;
        }
    };
    let (written, ()) = tokio::join!(writing, reading);
    ok("batch write", written);

    // Backfill marks: per version, read by any process; delete_key drops that version's.
    assert!(
        ok("no marks", store.backfilled_partitions(&f1).await).is_empty(),
        "a version never marked must have no backfilled partitions"
    );
    for (key, partition) in [(&f1, 2), (&f1, 0), (&f1, 2), (&f2, 1), (&f2_1, 5)] {
        ok("mark", store.mark_backfilled(key, partition).await);
    }
    assert_eq!(
        ok("marks", store.backfilled_partitions(&f1).await),
        BTreeSet::from([0, 2]),
        "marks must read back once each, and per version"
    );
    assert_eq!(
        ok("marks of f2", store.backfilled_partitions(&f2).await),
        BTreeSet::from([1])
    );

    // delete_key: that version, every customer; nothing else.
    ok("delete_key", store.delete_key(&f1).await);
    assert!(
        ok(
            "marks after delete_key",
            store.backfilled_partitions(&f1).await
        )
        .is_empty(),
        "delete_key must drop the version's backfill marks"
    );
    assert_eq!(
        ok(
            "other marks after delete_key",
            store.backfilled_partitions(&f2_1).await
        ),
        BTreeSet::from([5]),
        "delete_key must keep other versions' marks (\"f\" is a prefix of \"f2\")"
    );
    assert_eq!(
        ok(
            "read after delete_key",
            store
                .read(&c1, &[f1.clone(), f2.clone(), f2_1.clone()])
                .await
        ),
        vec![None, Some(s2.clone()), Some(s3.clone())],
        "delete_key must remove only that (name, version)"
    );
    assert_eq!(
        ok(
            "read c12 after delete_key",
            store.read(&c12, &[f1.clone(), g1.clone()]).await
        ),
        vec![None, Some(s5.clone())],
        "delete_key must remove the key for every customer"
    );
    ok(
        "delete_key unknown",
        store
            .delete_key(&FeatureKey::new(format!("{prefix}none"), 7))
            .await,
    );

    // delete_customer: every state of that customer; nobody else's.
    ok("delete_customer", store.delete_customer(&c1).await);
    assert_eq!(
        ok(
            "read erased",
            store
                .read(&c1, &[f1.clone(), f2.clone(), f2_1.clone()])
                .await
        ),
        vec![None, None, None],
        "delete_customer must remove every state of the customer"
    );
    assert_eq!(
        ok(
            "read c12 after erasure",
            store.read(&c12, std::slice::from_ref(&g1)).await
        ),
        vec![Some(s5.clone())],
        "delete_customer must not touch customers whose ids share a prefix"
    );
    assert_eq!(
        ok("read c3", store.read(&c3, &keys[..2]).await),
        vec![Some(sample_feature_state(0)), Some(sample_feature_state(1))],
        "delete_customer must not touch other customers"
    );
    ok("delete_customer again", store.delete_customer(&c1).await);
    ok(
        "write after erasure",
        store
            .write(vec![(c1.clone(), f2.clone(), s2.clone())])
            .await,
    );
    assert_eq!(
        ok(
            "read rewritten",
            store.read(&c1, std::slice::from_ref(&f2)).await
        ),
        vec![Some(s2)],
        "a customer can be written again after erasure"
    );
}

// ---------------------------------------------------------------------------------------
// Segments
// ---------------------------------------------------------------------------------------

fn change(segment: &str, customer: &CustomerId, joined: bool) -> MembershipChange {
    MembershipChange {
        segment: segment.to_owned(),
        customer: customer.clone(),
        joined,
    }
}

/// [`SegmentStore`]: `apply` returns only real changes (applied in order), exact sizes,
/// `members` order / `after` / `limit`, `segments_of` by name, `clear`, `remove_customer`.
pub async fn segments(store: &dyn SegmentStore, prefix: &str) {
    let s = format!("{prefix}s");
    let s1 = format!("{prefix}s1"); // s is a prefix of s1
    let s2 = format!("{prefix}s2");
    let c1 = customer_id(&format!("{prefix}c1"));
    let c10 = customer_id(&format!("{prefix}c10"));
    let c2 = customer_id(&format!("{prefix}c2"));

    assert_eq!(
        ok("size unknown", store.size(&s).await),
        0,
        "an unknown segment has size 0"
    );
    assert!(!ok("contains", store.contains(&s, &c1).await));
    assert!(ok("members unknown", store.members(&s, None, 10).await).is_empty());
    assert!(ok("segments_of unknown", store.segments_of(&c1).await).is_empty());
    assert!(
        ok("apply nothing", store.apply(&[]).await).is_empty(),
        "applying no changes must change nothing"
    );

    let first = vec![
        change(&s, &c1, true),
        change(&s, &c2, true),
        change(&s, &c1, true),   // already joined earlier in this batch
        change(&s, &c10, false), // leave of a non-member
        change(&s1, &c1, true),
        change(&s1, &c10, true),
    ];
    assert_eq!(
        ok("apply", store.apply(&first).await),
        vec![
            first[0].clone(),
            first[1].clone(),
            first[4].clone(),
            first[5].clone()
        ],
        "apply must return only the changes that changed something, in input order"
    );
    let second = vec![
        change(&s, &c1, true), // already a member
        change(&s, &c2, false),
        change(&s, &c2, true),
        change(&s, &c2, false),
    ];
    assert_eq!(
        ok("apply", store.apply(&second).await),
        second[1..].to_vec(),
        "apply must apply a batch in order: leave, join, leave of one pair are three changes"
    );
    assert!(
        ok("apply repeat", store.apply(&second[..2]).await).is_empty(),
        "a join of a member and a leave of a non-member are not changes"
    );

    assert_eq!(
        ok("size s", store.size(&s).await),
        1,
        "size must count members exactly"
    );
    assert_eq!(
        ok("size s1", store.size(&s1).await),
        2,
        "size must count members exactly"
    );
    assert!(ok("contains", store.contains(&s, &c1).await), "c1 joined s");
    assert!(!ok("contains", store.contains(&s, &c2).await), "c2 left s");
    assert!(
        !ok("contains", store.contains(&s, &c10).await),
        "c10 never joined s"
    );
    assert!(
        ok("contains", store.contains(&s1, &c10).await),
        "c10 joined s1"
    );

    // Members: ascending id, strictly after `after`, at most `limit`, that segment only.
    assert_eq!(
        ok("members s1", store.members(&s1, None, 10).await),
        vec![c1.clone(), c10.clone()],
        "members must be in ascending id order"
    );
    assert_eq!(
        ok("members s", store.members(&s, None, 10).await),
        vec![c1.clone()],
        "members must not include members of a segment whose name extends this one"
    );
    assert_eq!(
        ok("members after", store.members(&s1, Some(&c1), 10).await),
        vec![c10.clone()]
    );
    assert_eq!(
        ok("members limit", store.members(&s1, None, 1).await),
        vec![c1.clone()]
    );
    assert!(ok("members limit 0", store.members(&s1, None, 0).await).is_empty());
    assert!(ok(
        "members after last",
        store.members(&s1, Some(&c10), 10).await
    )
    .is_empty());

    let crowd: Vec<CustomerId> = ["m05", "m01", "m10", "m03", "m02"]
        .iter()
        .map(|m| customer_id(&format!("{prefix}{m}")))
        .collect();
    let joins: Vec<_> = crowd.iter().map(|c| change(&s2, c, true)).collect();
    assert_eq!(
        ok("apply crowd", store.apply(&joins).await).len(),
        crowd.len()
    );
    ok(
        "apply c1 to s2",
        store.apply(&[change(&s2, &c1, true)]).await,
    );
    let mut expected: Vec<CustomerId> = crowd.clone();
    expected.push(c1.clone());
    expected.sort();
    let mut paged = Vec::new();
    let mut after: Option<CustomerId> = None;
    loop {
        let page = ok("members page", store.members(&s2, after.as_ref(), 2).await);
        assert!(page.len() <= 2, "members must return at most `limit` ids");
        let Some(last) = page.last().cloned() else {
            break;
        };
        paged.extend(page);
        after = Some(last);
    }
    assert_eq!(
        paged, expected,
        "paging through members must list every member once, in order"
    );
    assert_eq!(ok("size s2", store.size(&s2).await), expected.len() as u64);

    assert_eq!(
        ok("segments_of c1", store.segments_of(&c1).await),
        vec![s.clone(), s1.clone(), s2.clone()],
        "segments_of must list the customer's segments sorted by name"
    );
    assert_eq!(
        ok("segments_of c10", store.segments_of(&c10).await),
        vec![s1.clone()]
    );
    assert!(
        ok("segments_of c2", store.segments_of(&c2).await).is_empty(),
        "a customer who left every segment has none"
    );
    assert_eq!(
        ok(
            "segments_of_many",
            store
                .segments_of_many(&[c10.clone(), c2.clone(), c1.clone()])
                .await
        ),
        vec![
            vec![s1.clone()],
            Vec::new(),
            vec![s.clone(), s1.clone(), s2.clone()]
        ],
        "segments_of_many must give each customer's segments, in order"
    );
    assert!(ok(
        "segments_of_many of none",
        store.segments_of_many(&[]).await
    )
    .is_empty());

    // Clear: the segment and all its memberships; nothing else.
    ok("clear", store.clear(&s1).await);
    assert_eq!(
        ok("size cleared", store.size(&s1).await),
        0,
        "a cleared segment has size 0"
    );
    assert!(ok("members cleared", store.members(&s1, None, 10).await).is_empty());
    assert!(!ok("contains cleared", store.contains(&s1, &c1).await));
    assert_eq!(
        ok("segments_of after clear", store.segments_of(&c1).await),
        vec![s.clone(), s2.clone()],
        "clear must remove the segment from its members' segment lists"
    );
    assert!(ok("segments_of c10 after clear", store.segments_of(&c10).await).is_empty());
    assert_eq!(
        ok("size s after clear", store.size(&s).await),
        1,
        "clear must not touch s"
    );
    ok("clear unknown", store.clear(&format!("{prefix}none")).await);
    assert_eq!(
        ok("rejoin", store.apply(&[change(&s1, &c10, true)]).await),
        vec![change(&s1, &c10, true)],
        "a member of a cleared segment can join again, as a change"
    );
    assert_eq!(
        ok("size rejoined", store.size(&s1).await),
        1,
        "size restarts after clear"
    );

    // Remove a customer from every segment.
    let mut leaves = ok("remove_customer", store.remove_customer(&c1).await);
    leaves.sort_by(|a, b| a.segment.cmp(&b.segment));
    assert_eq!(
        leaves,
        vec![change(&s, &c1, false), change(&s2, &c1, false)],
        "remove_customer must return one leave per segment the customer was in"
    );
    assert!(ok("segments_of removed", store.segments_of(&c1).await).is_empty());
    assert!(!ok("contains removed", store.contains(&s, &c1).await));
    assert_eq!(
        ok("size s", store.size(&s).await),
        0,
        "remove_customer must update sizes"
    );
    assert_eq!(ok("size s2", store.size(&s2).await), crowd.len() as u64);
    assert_eq!(
        ok("members s2", store.members(&s2, None, 100).await),
        {
            let mut c = crowd.clone();
            c.sort();
            c
        },
        "remove_customer must remove the customer from member lists"
    );
    assert!(
        ok("remove_customer again", store.remove_customer(&c1).await).is_empty(),
        "removing a customer who is in no segment returns no leaves"
    );
    assert_eq!(
        ok("size s1", store.size(&s1).await),
        1,
        "remove_customer must not touch other customers"
    );
}

// ---------------------------------------------------------------------------------------
// Content
// ---------------------------------------------------------------------------------------

/// A content item with every optional field set, varying with `n`.
pub fn sample_content_item(id: &str, n: i32) -> ContentItem {
    let mut attributes = Map::new();
    attributes.insert("price".into(), json!(9.5));
    ContentItem {
        id: id.to_owned(),
        content_type: "banner".into(),
        title: Some(format!("Item {n}")),
        placements: vec!["homepage_hero".into()],
        tags: vec!["t1".into()],
        segments: vec![],
        priority: n,
        attributes,
        active_from: Some(base_time()),
        active_until: None,
        frequency_cap: Some(3),
    }
}

/// [`ContentStore`]: upsert/get, `get_many` one entry per id in order, `list` ascending by
/// id, delete's `bool`.
pub async fn content(store: &dyn ContentStore, prefix: &str) {
    let id = |suffix: &str| format!("{prefix}{suffix}");
    let ours = |items: Vec<ContentItem>| -> Vec<ContentItem> {
        items
            .into_iter()
            .filter(|i| i.id.starts_with(prefix))
            .collect()
    };

    assert_eq!(ok("get missing", store.get(&id("missing")).await), None);
    assert!(!ok("delete missing", store.delete(&id("missing")).await));
    assert!(ok("get_many none", store.get_many(&[]).await).is_empty());
    let before = ours(ok("list", store.list().await));
    assert!(before.is_empty(), "the prefix {prefix:?} is not fresh");

    let mut expected = BTreeMap::new();
    for (n, suffix) in TRICKY_SUFFIXES.iter().enumerate() {
        let item = sample_content_item(&id(suffix), n as i32);
        ok("upsert", store.upsert(&item).await);
        expected.insert(item.id.clone(), item);
    }
    for item in expected.values() {
        assert_eq!(ok("get", store.get(&item.id).await).as_ref(), Some(item));
    }
    let (a, b) = (expected[&id("a")].clone(), expected[&id("b")].clone());
    assert_eq!(
        ok(
            "get_many",
            store
                .get_many(&[id("a"), id("missing"), id("b"), id("a")])
                .await
        ),
        vec![Some(a.clone()), None, Some(b.clone()), Some(a.clone())],
        "get_many must return one entry per id, in order, None for unknown ids"
    );
    let all = ok("list", store.list().await);
    assert!(
        all.windows(2).all(|w| w[0].id < w[1].id),
        "list must be strictly ascending by id"
    );
    assert_eq!(
        ours(all),
        expected.values().cloned().collect::<Vec<_>>(),
        "list must return every item in ascending (byte) id order"
    );

    // Upsert replaces.
    let mut a2 = sample_content_item(&a.id, 42);
    a2.title = None;
    a2.tags = vec![];
    ok("upsert replace", store.upsert(&a2).await);
    assert_eq!(ok("get replaced", store.get(&a.id).await), Some(a2.clone()));
    assert_eq!(
        ours(ok("list", store.list().await)).len(),
        expected.len(),
        "replacing an item must not add one"
    );

    assert!(
        ok("delete", store.delete(&a.id).await),
        "delete of a stored item returns true"
    );
    assert!(
        !ok("delete again", store.delete(&a.id).await),
        "a second delete returns false"
    );
    assert_eq!(ok("get deleted", store.get(&a.id).await), None);
    assert_eq!(
        ok(
            "get_many deleted",
            store.get_many(&[a.id.clone(), b.id.clone()]).await
        ),
        vec![None, Some(b.clone())]
    );
    let listed = ours(ok("list", store.list().await));
    assert_eq!(
        listed.len(),
        expected.len() - 1,
        "a deleted item must not be listed"
    );
    assert!(!listed.iter().any(|i| i.id == a.id));
}

// ---------------------------------------------------------------------------------------
// Decisions
// ---------------------------------------------------------------------------------------

/// A decision with every field set (items, alternatives, experiments, features), varying with `n`.
pub fn sample_decision(id: &str, customer: &CustomerId, n: i32) -> Decision {
    let item = sample_content_item(&format!("{id}-item"), n);
    let other = sample_content_item(&format!("{id}-other"), n + 1);
    let mut features = BTreeMap::new();
    features.insert("views_7d".into(), 3.0);
    Decision {
        id: id.to_owned(),
        customer_id: customer.clone(),
        placement: Some("homepage_hero".into()),
        items: vec![ScoredItem {
            item: Arc::new(item),
            score: 0.75,
        }],
        alternatives: vec![ScoredItem {
            item: Arc::new(other),
            score: 0.5,
        }],
        confidence_score: 0.6,
        reasoning: format!("decision {n}"),
        latency_ms: 1.25,
        policy: "thompson".into(),
        propensity: 0.8125,
        propensity_kind: PropensityKind::Estimated,
        model_version: None,
        model_scores: None,
        experiments: vec![Assignment {
            experiment: "exp".into(),
            variant: "b".into(),
        }],
        segments: vec!["vip".into()],
        arms: vec![crate::decision::LoggedArm {
            id: "a".into(),
            weight: 2.0,
        }],
        rules: vec!["vip_boost".into()],
        degraded: false,
        explanation: Some(json!({"why": "score"})),
        context: json!({"page": "/home"}),
        features,
        created_at: base_time() + Duration::nanoseconds(i64::from(n)),
    }
}

/// The `n`th outcome of `decision`.
pub fn sample_outcome(decision: &Decision, n: i32) -> Outcome {
    Outcome {
        decision_id: decision.id.clone(),
        customer_id: decision.customer_id.clone(),
        item_id: decision.selected().item.id.clone(),
        reward: if n % 2 == 0 { 1.0 } else { 0.0 },
        conversion_type: format!("click-{n}"),
        value: (n % 2 == 0).then_some(12.5),
        created_at: base_time() + Duration::seconds(i64::from(n)),
    }
}

/// [`DecisionStore`]: `None` for missing, `put_outcome` counts and stores nothing for an
/// unknown decision, outcome order, `pseudonymise` on decisions and outcomes.
pub async fn decisions(store: &dyn DecisionStore, prefix: &str) {
    let id = |suffix: &str| format!("{prefix}{suffix}");
    let c1 = customer_id(&id("c1"));
    let c10 = customer_id(&id("c10"));

    assert_eq!(ok("get missing", store.get(&id("d0")).await), None);
    assert!(ok("outcomes missing", store.outcomes(&id("d0")).await).is_empty());
    let orphan = sample_outcome(&sample_decision(&id("d0"), &c1, 0), 0);
    assert_eq!(
        ok("put_outcome unknown", store.put_outcome(&orphan).await),
        None,
        "put_outcome of an unknown decision must return None"
    );
    assert!(
        ok("outcomes unknown", store.outcomes(&id("d0")).await).is_empty(),
        "put_outcome of an unknown decision must store nothing"
    );
    let d0 = sample_decision(&id("d0"), &c1, 0);
    ok("put d0", store.put(&d0).await);
    assert!(
        ok("outcomes d0", store.outcomes(&d0.id).await).is_empty(),
        "an outcome refused before its decision existed must not appear later"
    );

    let d1 = sample_decision(&id("d1"), &c1, 1);
    let d2 = sample_decision(&id("d2"), &c1, 2);
    let d3 = sample_decision(&id("d3"), &c10, 3);
    for d in [&d1, &d2, &d3] {
        ok("put", store.put(d).await);
    }
    for d in [&d0, &d1, &d2, &d3] {
        assert_eq!(
            ok("get", store.get(&d.id).await).as_ref(),
            Some(d),
            "get must return the decision"
        );
    }

    let o: Vec<Outcome> = (0..3).map(|n| sample_outcome(&d1, n)).collect();
    for (n, out) in o.iter().enumerate() {
        assert_eq!(
            ok("put_outcome", store.put_outcome(out).await),
            Some(n as u64),
            "put_outcome must return how many outcomes the decision had before"
        );
    }
    assert_eq!(
        ok("outcomes", store.outcomes(&d1.id).await),
        o,
        "outcomes must be returned in the order they were stored"
    );
    assert!(
        ok("outcomes d2", store.outcomes(&d2.id).await).is_empty(),
        "outcomes are per decision"
    );
    let o2 = sample_outcome(&d2, 7);
    assert_eq!(ok("put_outcome d2", store.put_outcome(&o2).await), Some(0));
    let o3 = sample_outcome(&d3, 8);
    assert_eq!(ok("put_outcome d3", store.put_outcome(&o3).await), Some(0));

    // Put replaces a decision; its outcomes stay.
    let mut d1b = d1.clone();
    d1b.reasoning = "replaced".into();
    ok("put replace", store.put(&d1b).await);
    assert_eq!(
        ok("get replaced", store.get(&d1.id).await),
        Some(d1b.clone())
    );
    assert_eq!(ok("outcomes kept", store.outcomes(&d1.id).await).len(), 3);

    // Impressions: the shown items of a customer's decisions since a time, newest first.
    let c2 = customer_id(&id("c2"));
    let at = |minutes: i64| base_time() + Duration::minutes(minutes);
    let mut d5 = sample_decision(&id("d5"), &c2, 5);
    d5.created_at = at(1);
    let mut d6 = sample_decision(&id("d6"), &c2, 6);
    d6.created_at = at(10);
    d6.items.push(ScoredItem {
        item: Arc::new(sample_content_item(&id("d6-second"), 6)),
        score: 0.5,
    });
    for d in [&d5, &d6] {
        ok("put for impressions", store.put(d).await);
    }
    let shown = |list: Vec<Impression>| {
        list.into_iter()
            .map(|i| (i.item_id, i.at))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        shown(ok("impressions", store.impressions(&c2, at(0), 100).await)),
        vec![
            (id("d6-item"), at(10)),
            (id("d6-second"), at(10)),
            (id("d5-item"), at(1)),
        ],
        "impressions must list each decision's items, newest decision first"
    );
    assert_eq!(
        shown(ok(
            "impressions since",
            store.impressions(&c2, at(2), 100).await
        ))
        .len(),
        2,
        "impressions before `since` must not be listed"
    );
    assert_eq!(
        shown(ok(
            "impressions limit",
            store.impressions(&c2, at(0), 1).await
        )),
        vec![(id("d6-item"), at(10))],
        "impressions must stop at `limit`"
    );
    assert!(
        ok(
            "impressions of another customer",
            store.impressions(&customer_id(&id("c3")), at(0), 100).await
        )
        .is_empty(),
        "impressions are per customer"
    );
    // A decision replaced under another customer moves its impressions.
    let mut d5b = d5.clone();
    d5b.customer_id = c10.clone();
    ok("put d5 for c10", store.put(&d5b).await);
    assert_eq!(
        shown(ok(
            "impressions moved",
            store.impressions(&c10, at(1), 100).await
        )),
        vec![(id("d5-item"), at(1))]
    );
    assert_eq!(
        ok(
            "impressions after move",
            store.impressions(&c2, at(0), 100).await
        )
        .len(),
        2
    );
    assert_eq!(
        ok(
            "pseudonymise c2",
            store.pseudonymise(&c2, &id("anon-2")).await
        ),
        1
    );
    assert!(
        ok(
            "impressions erased",
            store.impressions(&c2, at(-1), 100).await
        )
        .is_empty(),
        "pseudonymise must delete the customer's impressions"
    );
    assert!(
        ok(
            "impressions of the pseudonym",
            store
                .impressions(&customer_id(&id("anon-2")), at(-1), 100)
                .await
        )
        .is_empty(),
        "impressions must not follow the pseudonym"
    );
    // Customer decisions: the customer's own, ascending by id, each with its outcomes.
    let mut expected_mine = Vec::new();
    for d in [&d0, &d1b, &d2] {
        let stored = ok("get", store.get(&d.id).await);
        let outcomes = ok("outcomes", store.outcomes(&d.id).await);
        expected_mine.push((stored.expect("stored decision"), outcomes));
    }
    expected_mine.sort_by(|a, b| a.0.id.cmp(&b.0.id));
    assert_eq!(
        ok("customer_decisions", store.customer_decisions(&c1).await),
        expected_mine,
        "customer_decisions must return the customer's decisions in id order, with their \
         outcomes, and none of customers whose ids share a prefix"
    );
    assert!(
        ok(
            "customer_decisions unknown",
            store.customer_decisions(&customer_id(&id("nobody"))).await
        )
        .is_empty(),
        "a customer without decisions has none"
    );
    // Pseudonymise.
    let pseudonym = id("anon-1");
    assert_eq!(
        ok("pseudonymise", store.pseudonymise(&c1, &pseudonym).await),
        3,
        "pseudonymise must return how many decisions it changed"
    );
    let anon = customer_id(&pseudonym);
    for d in [&d0, &d1b, &d2] {
        let mut expected = d.clone();
        expected.customer_id = anon.clone();
        assert_eq!(
            ok("get pseudonymised", store.get(&d.id).await),
            Some(expected),
            "pseudonymise must replace the customer id and nothing else"
        );
    }
    let expected_outcomes: Vec<Outcome> = o
        .iter()
        .map(|out| Outcome {
            customer_id: anon.clone(),
            ..out.clone()
        })
        .collect();
    assert_eq!(
        ok("outcomes pseudonymised", store.outcomes(&d1.id).await),
        expected_outcomes,
        "pseudonymise must replace the customer id on outcomes, keeping their order"
    );
    assert_eq!(
        ok("outcomes d2 pseudonymised", store.outcomes(&d2.id).await),
        vec![Outcome {
            customer_id: anon.clone(),
            ..o2.clone()
        }]
    );
    assert_eq!(
        ok("get d3", store.get(&d3.id).await),
        Some(d3.clone()),
        "pseudonymise must not touch customers whose ids share a prefix"
    );
    assert_eq!(ok("outcomes d3", store.outcomes(&d3.id).await), vec![o3]);
    assert!(
        ok(
            "customer_decisions after",
            store.customer_decisions(&c1).await
        )
        .is_empty(),
        "after pseudonymise the customer has no decisions"
    );
    assert_eq!(
        ok(
            "customer_decisions of the pseudonym",
            store.customer_decisions(&anon).await
        )
        .len(),
        3,
        "the pseudonym has them"
    );
    assert_eq!(
        ok(
            "pseudonymise again",
            store.pseudonymise(&c1, &pseudonym).await
        ),
        0,
        "a customer without decisions has nothing to pseudonymise"
    );
    assert_eq!(
        ok(
            "pseudonymise unknown",
            store.pseudonymise(&customer_id(&id("nobody")), "x").await
        ),
        0
    );
    assert_eq!(
        ok(
            "put_outcome after",
            store.put_outcome(&sample_outcome(&d1, 9)).await
        ),
        Some(3),
        "outcomes keep counting after pseudonymisation"
    );
    // A new decision of the original id is that customer's again.
    let d4 = sample_decision(&id("d4"), &c1, 4);
    ok("put d4", store.put(&d4).await);
    assert_eq!(
        ok(
            "pseudonymise new",
            store.pseudonymise(&c1, &pseudonym).await
        ),
        1
    );

    // Scan: the log in ascending id order, each decision with its outcomes, paged.
    let mut seen: Vec<(Decision, Vec<Outcome>)> = Vec::new();
    let mut after = prefix.to_owned();
    loop {
        let page = ok("scan", store.scan(Some(&after), 2).await);
        assert!(
            page.len() <= 2,
            "scan must return at most `limit` decisions"
        );
        let mine: Vec<_> = page
            .iter()
            .take_while(|(d, _)| d.id.starts_with(prefix))
            .cloned()
            .collect();
        let done = mine.len() < page.len() || page.len() < 2;
        if let Some((last, _)) = mine.last() {
            after = last.id.clone();
        }
        seen.extend(mine);
        if done {
            break;
        }
    }
    let ids: Vec<&str> = seen.iter().map(|(d, _)| d.id.as_str()).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(
        ids, sorted,
        "scan must return decisions in ascending id order"
    );
    let expected: Vec<String> = ["d0", "d1", "d2", "d3", "d4", "d5", "d6"]
        .iter()
        .map(|s| id(s))
        .collect();
    assert_eq!(ids, expected, "scan must return every decision once");
    for (d, outcomes) in &seen {
        assert_eq!(
            ok("get for scan", store.get(&d.id).await).as_ref(),
            Some(d),
            "scan must return the stored decision"
        );
        assert_eq!(
            outcomes,
            &ok("outcomes for scan", store.outcomes(&d.id).await),
            "scan must return each decision's outcomes in stored order"
        );
    }
    assert_eq!(
        seen.iter().map(|(_, o)| o.len()).sum::<usize>(),
        6,
        "scan must carry every outcome"
    );
    assert!(
        ok("scan limit 0", store.scan(None, 0).await).is_empty(),
        "scan with limit 0 returns nothing"
    );
}

// ---------------------------------------------------------------------------------------
// Bandit
// ---------------------------------------------------------------------------------------

fn stats(trials: f64, reward: f64) -> ArmStats {
    ArmStats { trials, reward }
}

/// [`BanditStore`]: never-seen arms read as zero, one entry per arm in order, additive
/// `add`, including concurrent adds from several tasks. Takes an `Arc` to spawn them.
pub async fn bandit(store: Arc<dyn BanditStore>, prefix: &str) {
    // Every add flushed at once, so that the reads below see it on a store that writes
    // behind.
    let store: Arc<dyn BanditStore> = Arc::new(Flushed(store));
    let p = format!("{prefix}p");
    let p2 = format!("{prefix}p2"); // p is a prefix of p2
    let arms = |names: &[&str]| names.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>();

    assert!(ok("get no arms", store.get(&p, &[]).await).is_empty());
    assert_eq!(
        ok("get unseen", store.get(&p, &arms(&["a", "b"])).await),
        vec![ArmStats::default(), ArmStats::default()],
        "never-seen arms must read as zero"
    );

    ok("add", store.add(&p, "a", stats(1.0, 0.5)).await);
    ok("add", store.add(&p, "a", stats(2.0, 0.25)).await);
    ok("add", store.add(&p, "b", ArmStats::trial()).await);
    ok("add", store.add(&p2, "a", stats(8.0, 4.0)).await);
    assert_eq!(
        ok("get", store.get(&p, &arms(&["b", "a", "zz", "a"])).await),
        vec![
            stats(1.0, 0.0),
            stats(3.0, 0.75),
            ArmStats::default(),
            stats(3.0, 0.75)
        ],
        "add must sum into the arm; get must return one entry per arm, in order"
    );
    assert_eq!(
        ok("get p2", store.get(&p2, &arms(&["a", "b"])).await),
        vec![stats(8.0, 4.0), ArmStats::default()],
        "statistics are per placement"
    );

    // Concurrent adds, from several tasks and from one task's concurrent futures.
    let tasks = 8;
    let per_task = 25;
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let store = store.clone();
        let p = p.clone();
        handles.push(tokio::spawn(async move {
            for _ in 0..per_task {
                ok("concurrent add", store.add(&p, "c", stats(1.0, 0.5)).await);
            }
        }));
    }
    let joined =
        futures::future::join_all((0..per_task).map(|_| store.add(&p, "c", ArmStats::reward(1.0))))
            .await;
    for result in joined {
        ok("concurrent add", result);
    }
    for handle in handles {
        if let Err(e) = handle.await {
            panic!("a concurrent add task failed: {e}");
        }
    }
    let n = f64::from(tasks * per_task);
    assert_eq!(
        ok("get c", store.get(&p, &arms(&["c"])).await),
        vec![stats(n, n * 0.5 + f64::from(per_task))],
        "concurrent adds must all be merged by addition"
    );

    // Linear statistics: per (placement, arm, dims), additive, concurrent adds merged.
    let x = [1.0, 0.5, -0.25];
    assert_eq!(
        ok(
            "get_linear unseen",
            store.get_linear(&p, &arms(&["a"]), 3).await
        ),
        vec![LinearStats::zero(3)],
        "never-seen arms must read as zero"
    );
    ok(
        "add_linear",
        store
            .add_linear(&p, "a", &LinearStats::impression(&x))
            .await,
    );
    ok(
        "add_linear",
        store
            .add_linear(&p, "a", &LinearStats::reward(&x, 0.5))
            .await,
    );
    ok(
        "add_linear",
        store
            .add_linear(&p2, "a", &LinearStats::impression(&x))
            .await,
    );
    ok(
        "add_linear 2 dims",
        store
            .add_linear(&p, "a", &LinearStats::impression(&[1.0, 1.0]))
            .await,
    );
    let mut expected = LinearStats::impression(&x);
    expected.merge(&LinearStats::reward(&x, 0.5));
    assert_eq!(
        ok(
            "get_linear",
            store.get_linear(&p, &arms(&["a", "b"]), 3).await
        ),
        vec![expected.clone(), LinearStats::zero(3)],
        "add_linear must sum into the arm of its dimension"
    );
    assert_eq!(
        ok("get_linear 2", store.get_linear(&p, &arms(&["a"]), 2).await),
        vec![LinearStats::impression(&[1.0, 1.0])],
        "each dimension is kept apart"
    );
    let mut bad = LinearStats::impression(&x);
    bad.b[1] = f64::NAN;
    assert!(
        store.add_linear(&p, "a", &bad).await.is_err(),
        "non-finite linear statistics are refused"
    );
    bad.b.pop();
    assert!(
        store.add_linear(&p, "a", &bad).await.is_err(),
        "statistics whose lengths do not fit their dims are refused"
    );
    let one = LinearStats::impression(&x);
    let joined = futures::future::join_all((0..50).map(|_| store.add_linear(&p, "c", &one))).await;
    for result in joined {
        ok("concurrent add_linear", result);
    }
    let c = ok(
        "get_linear c",
        store.get_linear(&p, &arms(&["c", "a"]), 3).await,
    );
    assert_eq!(c[0].n, 50.0, "concurrent linear adds must all be merged");
    assert_eq!(c[0].a[0], 50.0);
    assert_eq!(c[1], expected, "invalid adds stored nothing");
}

// ---------------------------------------------------------------------------------------
// Experiments
// ---------------------------------------------------------------------------------------

fn totals(exposures: u64, conversions: u64, value_sum: f64, value_sum_sq: f64) -> VariantTotals {
    VariantTotals {
        exposures,
        conversions,
        value_sum,
        value_sum_sq,
    }
}

/// [`ExperimentStore`]: unseen experiments read as empty, totals per (experiment,
/// variant) ascending by variant, additive `add` (a pair named twice in one call gets
/// both), one call all-or-nothing (a non-finite delta stores nothing), concurrent adds
/// from several tasks. Takes an `Arc` to spawn them.
pub async fn experiments(store: Arc<dyn ExperimentStore>, prefix: &str) {
    let e = format!("{prefix}e");
    let e2 = format!("{prefix}e2"); // e is a prefix of e2
    let e_colon = format!("{prefix}e:b"); // a separator-looking key
    let add = |deltas: Vec<(&str, &str, VariantTotals)>| {
        deltas
            .into_iter()
            .map(|(e, v, d)| (e.to_owned(), v.to_owned(), d))
            .collect::<Vec<_>>()
    };

    assert!(
        ok("totals unseen", store.totals(&e).await).is_empty(),
        "an experiment never added to has no totals"
    );
    ok("add nothing", store.add(&[]).await);
    ok(
        "add",
        store
            .add(&add(vec![
                (&e, "control", VariantTotals::exposure()),
                (&e, "control", VariantTotals::exposure()),
                (&e, "b", totals(3, 1, 2.5, 6.25)),
                (&e2, "a", totals(7, 0, 0.0, 0.0)),
                (&e_colon, "a", totals(1, 1, 1.0, 1.0)),
            ]))
            .await,
    );
    ok(
        "add",
        store
            .add(&add(vec![(&e, "b", VariantTotals::conversion(0.5))]))
            .await,
    );
    let got = ok("totals", store.totals(&e).await);
    assert_eq!(
        got,
        vec![
            ("b".to_owned(), totals(3, 2, 3.0, 6.5)),
            ("control".to_owned(), totals(2, 0, 0.0, 0.0)),
        ],
        "add must sum into each (experiment, variant); totals ascend by variant and \
         belong to that experiment only"
    );
    assert_eq!(
        ok("totals e2", store.totals(&e2).await),
        vec![("a".to_owned(), totals(7, 0, 0.0, 0.0))]
    );

    let bad = add(vec![
        (&e, "control", VariantTotals::exposure()),
        (&e, "b", totals(1, 1, f64::NAN, 0.0)),
    ]);
    assert!(
        store.add(&bad).await.is_err(),
        "a non-finite delta must be refused"
    );
    assert_eq!(
        ok("totals after refusal", store.totals(&e).await),
        got,
        "a refused add must store nothing"
    );

    let tasks = 8;
    let per_task = 25;
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let store = store.clone();
        let deltas = add(vec![(&e2, "c", totals(1, 1, 0.5, 0.25))]);
        handles.push(tokio::spawn(async move {
            for _ in 0..per_task {
                ok("concurrent add", store.add(&deltas).await);
            }
        }));
    }
    let one = add(vec![(&e2, "c", VariantTotals::exposure())]);
    let joined = futures::future::join_all((0..per_task).map(|_| store.add(&one))).await;
    for result in joined {
        ok("concurrent add", result);
    }
    for handle in handles {
        if let Err(e) = handle.await {
            panic!("a concurrent add task failed: {e}");
        }
    }
    let n = (tasks * per_task) as u64;
    assert_eq!(
        ok("totals c", store.totals(&e2).await),
        vec![
            ("a".to_owned(), totals(7, 0, 0.0, 0.0)),
            (
                "c".to_owned(),
                totals(n + per_task as u64, n, 0.5 * n as f64, 0.25 * n as f64)
            ),
        ],
        "concurrent adds must all be merged by addition"
    );
}

// ---------------------------------------------------------------------------------------
// Definitions
// ---------------------------------------------------------------------------------------

/// [`DefinitionStore`]: versions 1, 2, ... never reused even after `delete`, latest vs given
/// version, `versions` ascending, `list` (latest of every live name, by name), delete's
/// `bool`, active pointers (`set_active` on a missing version is `false`).
pub async fn definitions(store: &dyn DefinitionStore, prefix: &str) {
    let kind = DefinitionKind::Segment;
    let other_kind = DefinitionKind::Feature;
    let n = format!("{prefix}n");
    let n2 = format!("{prefix}n2"); // n is a prefix of n2
    let m = format!("{prefix}m");
    let ours = |defs: Vec<super::Definition>| -> Vec<(String, u32)> {
        defs.into_iter()
            .filter(|d| d.name.starts_with(prefix))
            .map(|d| (d.name, d.version))
            .collect()
    };

    assert_eq!(ok("get missing", store.get(kind, &n, None).await), None);
    assert_eq!(
        ok("get missing version", store.get(kind, &n, Some(1)).await),
        None
    );
    assert!(ok("versions missing", store.versions(kind, &n).await).is_empty());
    assert_eq!(
        ok("active missing", store.active(kind, &n).await),
        None,
        "never set: None"
    );
    assert!(
        !ok("delete missing", store.delete(kind, &n).await),
        "nothing to delete: false"
    );
    assert!(
        !ok("set_active missing", store.set_active(kind, &n, 1).await),
        "set_active on a missing version must return false"
    );
    assert_eq!(ok("active", store.active(kind, &n).await), None);

    let bodies = [
        json!({"v": 1}),
        json!({"v": 2, "x": [1, 2]}),
        json!("three"),
    ];
    for (i, body) in bodies.iter().enumerate() {
        assert_eq!(
            ok("put", store.put(kind, &n, body.clone()).await),
            i as u32 + 1,
            "put must return 1 for the first version and n+1 after"
        );
    }
    let versions = ok("versions", store.versions(kind, &n).await);
    assert_eq!(
        versions.iter().map(|d| d.version).collect::<Vec<_>>(),
        vec![1, 2, 3],
        "versions must list every version, ascending"
    );
    for (d, body) in versions.iter().zip(&bodies) {
        assert_eq!(d.kind, kind);
        assert_eq!(d.name, n);
        assert_eq!(&d.body, body, "each version must keep its own body");
    }
    assert!(
        versions
            .windows(2)
            .all(|w| w[0].created_at <= w[1].created_at),
        "later versions must not be created before earlier ones"
    );
    assert_eq!(
        ok("get v2", store.get(kind, &n, Some(2)).await).as_ref(),
        Some(&versions[1]),
        "get(Some(v)) must return that version"
    );
    assert_eq!(
        ok("get latest", store.get(kind, &n, None).await).as_ref(),
        Some(&versions[2]),
        "get(None) must return the latest version"
    );
    assert_eq!(ok("get v4", store.get(kind, &n, Some(4)).await), None);
    assert_eq!(ok("get v0", store.get(kind, &n, Some(0)).await), None);

    // Kinds and names are independent.
    assert_eq!(
        ok(
            "put other kind",
            store.put(other_kind, &n, json!({"f": 1})).await
        ),
        1,
        "versions are counted per (kind, name)"
    );
    assert_eq!(
        ok("put n2", store.put(kind, &n2, json!({"n2": true})).await),
        1
    );
    assert_eq!(
        ok("put m", store.put(kind, &m, json!({"m": true})).await),
        1
    );
    assert_eq!(ok("put m", store.put(kind, &m, json!({"m": 2})).await), 2);
    assert_eq!(
        ok("versions n", store.versions(kind, &n).await).len(),
        3,
        "versions must not include names that extend this one"
    );
    assert_eq!(
        ours(ok("list", store.list(kind).await)),
        vec![(m.clone(), 2), (n.clone(), 3), (n2.clone(), 1)],
        "list must return the latest version of every live name, sorted by name"
    );
    assert_eq!(
        ours(ok("list other", store.list(other_kind).await)),
        vec![(n.clone(), 1)],
        "list must return only the given kind"
    );
    let listed = ok("list", store.list(kind).await);
    assert!(
        listed.iter().all(|d| d.kind == kind),
        "list must return only the given kind"
    );

    // Active pointer.
    assert!(
        ok("set_active", store.set_active(kind, &n, 2).await),
        "set_active on a stored version"
    );
    assert_eq!(ok("active", store.active(kind, &n).await), Some(2));
    assert!(
        !ok("set_active v9", store.set_active(kind, &n, 9).await),
        "set_active on a missing version must return false"
    );
    assert_eq!(
        ok("active unchanged", store.active(kind, &n).await),
        Some(2),
        "a refused set_active must not move the pointer"
    );
    assert!(!ok("set_active m v3", store.set_active(kind, &m, 3).await));
    assert_eq!(ok("active m", store.active(kind, &m).await), None);
    assert_eq!(
        ok("active other kind", store.active(other_kind, &n).await),
        None,
        "active pointers are per (kind, name)"
    );
    assert!(ok("set_active", store.set_active(kind, &n, 3).await));
    assert_eq!(ok("active", store.active(kind, &n).await), Some(3));

    // Delete: every version and the pointer; the version counter survives.
    assert!(
        ok("delete", store.delete(kind, &n).await),
        "delete of a stored name returns true"
    );
    assert_eq!(ok("get deleted", store.get(kind, &n, None).await), None);
    assert_eq!(
        ok("get deleted v1", store.get(kind, &n, Some(1)).await),
        None
    );
    assert!(ok("versions deleted", store.versions(kind, &n).await).is_empty());
    assert_eq!(
        ok("active deleted", store.active(kind, &n).await),
        None,
        "delete drops the pointer"
    );
    assert!(
        !ok("delete again", store.delete(kind, &n).await),
        "a second delete returns false"
    );
    assert_eq!(
        ours(ok("list after delete", store.list(kind).await)),
        vec![(m.clone(), 2), (n2.clone(), 1)],
        "a deleted name must not be listed"
    );
    assert_eq!(
        ok("other kind survives", store.get(other_kind, &n, None).await).map(|d| d.version),
        Some(1),
        "delete must not touch other kinds"
    );
    assert_eq!(ok("n2 survives", store.versions(kind, &n2).await).len(), 1);
    assert!(
        !ok("set_active deleted", store.set_active(kind, &n, 2).await),
        "set_active on a deleted version must return false"
    );
    assert_eq!(
        ok(
            "put after delete",
            store.put(kind, &n, json!({"v": 4})).await
        ),
        4,
        "version numbers must never be reused, even after delete"
    );
    assert_eq!(
        ok("versions after delete", store.versions(kind, &n).await)
            .iter()
            .map(|d| d.version)
            .collect::<Vec<_>>(),
        vec![4]
    );
    assert_eq!(
        ok("get latest", store.get(kind, &n, None).await).map(|d| (d.version, d.body)),
        Some((4, json!({"v": 4})))
    );
    assert_eq!(
        ok("active after re-put", store.active(kind, &n).await),
        None
    );

    // put_first: version 1 of a name that never had one, else nothing.
    let first = format!("{prefix}first");
    assert!(
        ok(
            "put_first new",
            store.put_first(kind, &first, json!({"first": 1})).await
        ),
        "put_first of a new name must create it"
    );
    assert_eq!(
        ok("get first", store.get(kind, &first, None).await).map(|d| (d.version, d.body)),
        Some((1, json!({"first": 1})))
    );
    assert!(
        !ok(
            "put_first again",
            store.put_first(kind, &first, json!({"first": 2})).await
        ),
        "put_first of an existing name must store nothing"
    );
    assert_eq!(
        ok("versions first", store.versions(kind, &first).await).len(),
        1
    );
    assert_eq!(
        ok(
            "put after put_first",
            store.put(kind, &first, json!({})).await
        ),
        2
    );
    assert!(ok("delete first", store.delete(kind, &first).await));
    assert!(
        !ok(
            "put_first after delete",
            store.put_first(kind, &first, json!({"first": 3})).await
        ),
        "put_first of a deleted name must store nothing (its versions are not reused)"
    );
    assert!(
        !ok("put_first of n", store.put_first(kind, &n, json!({})).await),
        "put_first of a name with versions must store nothing"
    );
    assert!(
        ok(
            "put_first other kind",
            store.put_first(other_kind, &first, json!({})).await
        ),
        "put_first is per kind"
    );
}

// ---------------------------------------------------------------------------------------
// API keys
// ---------------------------------------------------------------------------------------

/// A key record (a hash, never a secret) with every field set, varying with `n`.
pub fn sample_key(id: &str, n: u8) -> KeyRecord {
    KeyRecord {
        id: id.to_owned(),
        name: Some(format!("key {n} \u{e9}")),
        role: Role::ALL[usize::from(n) % Role::ALL.len()],
        secret_sha256: format!("{n:02x}").repeat(32),
        created_at: base_time() + Duration::seconds(i64::from(n)),
        revoked_at: None,
    }
}

/// [`KeyStore`]: unknown ids, insert refusing an existing id without writing, get and
/// list ascending by (byte) id, revoke setting the time once and only on its key.
pub async fn keys(store: &dyn KeyStore, prefix: &str) {
    let id = |suffix: &str| format!("{prefix}{suffix}");
    let ours = |keys: Vec<KeyRecord>| -> Vec<KeyRecord> {
        keys.into_iter()
            .filter(|k| k.id.starts_with(prefix))
            .collect()
    };
    assert_eq!(ok("get missing", store.get(&id("missing")).await), None);
    assert_eq!(
        ok(
            "revoke missing",
            store.revoke(&id("missing"), base_time()).await
        ),
        None,
        "revoking an unknown id returns None"
    );
    assert!(
        ours(ok("list", store.list().await)).is_empty(),
        "the prefix {prefix:?} is not fresh"
    );

    let mut expected = BTreeMap::new();
    for (n, suffix) in TRICKY_SUFFIXES.iter().enumerate() {
        let key = sample_key(&id(suffix), n as u8);
        assert!(
            ok("insert", store.insert(&key).await),
            "a new id is inserted"
        );
        expected.insert(key.id.clone(), key);
    }
    for key in expected.values() {
        assert_eq!(ok("get", store.get(&key.id).await).as_ref(), Some(key));
    }
    let a = expected[&id("a")].clone();
    let mut impostor = sample_key(&a.id, 200);
    impostor.role = Role::Admin;
    assert!(
        !ok("insert existing", store.insert(&impostor).await),
        "insert of an existing id returns false"
    );
    assert_eq!(
        ok("get after refused insert", store.get(&a.id).await),
        Some(a.clone()),
        "a refused insert must not change the stored key"
    );
    assert_eq!(
        ours(ok("list", store.list().await)),
        expected.values().cloned().collect::<Vec<_>>(),
        "list must return every key in ascending (byte) id order"
    );

    let first = base_time() + Duration::days(1);
    let revoked = ok("revoke", store.revoke(&a.id, first).await);
    let mut want = a.clone();
    want.revoked_at = Some(first);
    assert_eq!(
        revoked.as_ref(),
        Some(&want),
        "revoke returns the revoked record"
    );
    assert_eq!(
        ok("get revoked", store.get(&a.id).await),
        Some(want.clone())
    );
    assert_eq!(
        ok(
            "revoke again",
            store.revoke(&a.id, first + Duration::days(1)).await
        ),
        Some(want.clone()),
        "a second revoke keeps the first time"
    );
    let b = &expected[&id("b")];
    assert_eq!(
        ok("get other", store.get(&b.id).await).as_ref(),
        Some(b),
        "revoke touches only its key"
    );
    expected.insert(want.id.clone(), want);
    assert_eq!(
        ours(ok("list", store.list().await)),
        expected.values().cloned().collect::<Vec<_>>(),
        "revoked keys stay listed"
    );
}

// ---------------------------------------------------------------------------------------
// Exact numbers
// ---------------------------------------------------------------------------------------

/// Stored `f64`s read back bit for bit (scores, propensities, feature sums): a backend
/// that stores text must parse floats exactly (serde_json: the `float_roundtrip` feature;
/// without it about one value in seven, e.g. 1/11, comes back one ULP off).
pub async fn exact_floats(
    decisions: &dyn DecisionStore,
    features: &dyn FeatureStore,
    prefix: &str,
) {
    let c1 = customer_id(&format!("{prefix}c1"));
    let awkward: Vec<f64> = (1..=40).map(|i| 1.0 / f64::from(i)).collect();

    let mut decision = sample_decision(&format!("{prefix}d-float"), &c1, 1);
    decision.confidence_score = awkward[10];
    decision.propensity = awkward[12];
    decision.latency_ms = awkward[16] * 1000.0;
    decision.items[0].score = awkward[18];
    decision.features = awkward
        .iter()
        .enumerate()
        .map(|(i, v)| (format!("f{i}"), *v))
        .collect();
    ok("put", decisions.put(&decision).await);
    assert_eq!(
        ok("get", decisions.get(&decision.id).await),
        Some(decision.clone()),
        "decisions must store f64 values exactly"
    );
    let mut outcome = sample_outcome(&decision, 1);
    outcome.reward = awkward[10];
    outcome.value = Some(awkward[22] * 100.0);
    ok("put_outcome", decisions.put_outcome(&outcome).await);
    assert_eq!(
        ok("outcomes", decisions.outcomes(&decision.id).await),
        vec![outcome],
        "outcomes must store f64 values exactly"
    );

    let key = FeatureKey::new(format!("{prefix}float"), 1);
    let mut state = sample_feature_state(1);
    state.buckets = awkward
        .iter()
        .enumerate()
        .map(|(i, v)| Bucket {
            minute: 29_000_000 + i as i64,
            count: 1,
            sum: *v,
        })
        .collect();
    ok(
        "write",
        features
            .write(vec![(c1.clone(), key.clone(), state.clone())])
            .await,
    );
    assert_eq!(
        ok("read", features.read(&c1, std::slice::from_ref(&key)).await),
        vec![Some(state)],
        "feature states must store f64 values exactly"
    );
}
