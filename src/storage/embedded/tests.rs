//! Tests of the embedded backend: every conformance suite on a fresh store, then what only
//! this backend can show: durability across reopen, the writer draining its queue on drop,
//! group commit, per-operation atomicity inside a batch, and corrupt values.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use redb::{ReadableDatabase, TableDefinition, TableHandle, WriteTransaction};
use serde_json::json;

use super::{
    content, decisions, definitions, events, features as feature_tables, profiles, EmbeddedStore,
    FILE_NAME,
};
use crate::bandit::ArmStats;
use crate::events::Event;
use crate::features::FeatureKey;
use crate::storage::conformance::{
    self, base_time, customer_id, sample_content_item, sample_customer, sample_decision,
    sample_event, sample_feature_state, sample_outcome,
};
use crate::storage::{
    AppendOutcome, DefinitionKind, EventLog, MembershipChange, StorageError, StorageResult, Stores,
};

/// The names of the store's tables.
fn table_names(store: &EmbeddedStore) -> Vec<String> {
    store
        .read(|txn| {
            Ok(txn
                .list_tables()
                .map_err(super::db_err)?
                .map(|t| t.name().to_owned())
                .collect())
        })
        .expect("tables")
}

/// A scratch table for tests that drive the writer directly.
const SCRATCH: TableDefinition<&str, u64> = TableDefinition::new("test_scratch");

fn open(dir: &Path) -> Arc<EmbeddedStore> {
    match EmbeddedStore::open(dir) {
        Ok(store) => store,
        Err(e) => panic!("opening the embedded store in {}: {e:#}", dir.display()),
    }
}

fn fresh() -> (tempfile::TempDir, Arc<EmbeddedStore>, Stores) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let stores = store.stores();
    (dir, store, stores)
}

/// Writes `value` under `key` in the scratch table.
fn scratch_put(txn: &WriteTransaction, key: &str, value: u64) -> StorageResult<()> {
    let mut table = txn.open_table(SCRATCH).map_err(super::db_err)?;
    table.insert(key, value).map_err(super::db_err)?;
    Ok(())
}

fn scratch_get(store: &EmbeddedStore, key: &str) -> Option<u64> {
    store
        .read(|txn| {
            let table = txn.open_table(SCRATCH).map_err(super::db_err)?;
            Ok(table.get(key).map_err(super::db_err)?.map(|v| v.value()))
        })
        .expect("scratch read")
}

/// Queues an operation that holds the writer thread for `hold`, and returns once the
/// writer is running it: whatever is submitted next lands in the following batch.
async fn hold_writer(store: &Arc<EmbeddedStore>, hold: Duration) -> tokio::task::JoinHandle<()> {
    let (started_tx, started) = std::sync::mpsc::channel::<()>();
    let store = store.clone();
    let handle = tokio::spawn(async move {
        store
            .write(move |_txn| {
                let _ = started_tx.send(());
                std::thread::sleep(hold);
                Ok(())
            })
            .await
            .expect("holding op");
    });
    tokio::task::spawn_blocking(move || started.recv().expect("holding op started"))
        .await
        .expect("join");
    handle
}

/// Overwrites one stored value with bytes that are not JSON, behind the store's back.
fn corrupt<K: redb::Key + 'static>(
    store: &EmbeddedStore,
    table: TableDefinition<K, &'static [u8]>,
    key: K::SelfType<'_>,
) {
    let txn = store.db.begin_write().expect("begin_write");
    {
        let mut table = txn.open_table(table).expect("open_table");
        table.insert(key, b"{not json".as_slice()).expect("insert");
    }
    txn.commit().expect("commit");
}

#[track_caller]
fn assert_corrupt<T: std::fmt::Debug>(what: &str, result: StorageResult<T>) {
    match result {
        Err(StorageError::Corrupt(msg)) => assert!(!msg.is_empty(), "{what}: empty message"),
        other => panic!("{what}: expected StorageError::Corrupt, got {other:?}"),
    }
}

// --- the conformance suites --------------------------------------------------------------

#[tokio::test]
async fn profiles_conform() {
    let (_dir, _store, stores) = fresh();
    conformance::profiles(stores.profiles.as_ref(), "t:").await;
}

#[tokio::test]
async fn event_log_conforms() {
    let (_dir, _store, stores) = fresh();
    assert_eq!(
        stores.events.last_seq().await.expect("last_seq"),
        0,
        "a fresh log has last_seq 0"
    );
    conformance::event_log(stores.events.as_ref(), "t:").await;
}

#[tokio::test]
async fn features_conform() {
    let (_dir, _store, stores) = fresh();
    conformance::features(stores.features.as_ref(), "t:").await;
}

#[tokio::test]
async fn segments_conform() {
    let (_dir, _store, stores) = fresh();
    conformance::segments(stores.segments.as_ref(), "t:").await;
}

#[tokio::test]
async fn content_conforms() {
    let (_dir, _store, stores) = fresh();
    conformance::content(stores.content.as_ref(), "t:").await;
}

#[tokio::test]
async fn decisions_conform() {
    let (_dir, _store, stores) = fresh();
    conformance::decisions(stores.decisions.as_ref(), "t:").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bandit_conforms() {
    let (_dir, _store, stores) = fresh();
    conformance::bandit(stores.bandit.clone(), "t:").await;
}

#[tokio::test]
async fn definitions_conform() {
    let (_dir, _store, stores) = fresh();
    conformance::definitions(stores.definitions.as_ref(), "t:").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn experiments_conform() {
    let (_dir, _store, stores) = fresh();
    conformance::experiments(stores.experiments.clone(), "t:").await;
}

#[tokio::test]
async fn data_keys_conform() {
    let (_dir, _store, stores) = fresh();
    conformance::data_keys(stores.data_keys.as_ref(), "t:").await;
}

#[tokio::test]
async fn keys_conform() {
    let (_dir, _store, stores) = fresh();
    conformance::keys(stores.keys.as_ref(), "t:").await;
}

/// The suites isolate themselves by prefix, as they must on a shared server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suites_share_one_store_by_prefix() {
    let (_dir, _store, s) = fresh();
    for prefix in ["run-a:", "run-b:"] {
        conformance::profiles(s.profiles.as_ref(), prefix).await;
        conformance::data_keys(s.data_keys.as_ref(), prefix).await;
        conformance::event_log(s.events.as_ref(), prefix).await;
        conformance::features(s.features.as_ref(), prefix).await;
        conformance::segments(s.segments.as_ref(), prefix).await;
        conformance::content(s.content.as_ref(), prefix).await;
        conformance::decisions(s.decisions.as_ref(), prefix).await;
        conformance::bandit(s.bandit.clone(), prefix).await;
        conformance::definitions(s.definitions.as_ref(), prefix).await;
        conformance::experiments(s.experiments.clone(), prefix).await;
        conformance::keys(s.keys.as_ref(), prefix).await;
    }
}

// --- opening -----------------------------------------------------------------------------

#[tokio::test]
async fn open_creates_the_directory_and_locks_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nested = dir.path().join("a").join("b");
    let store = open(&nested);
    assert!(
        nested.join(FILE_NAME).is_file(),
        "the database file is <dir>/{FILE_NAME}"
    );
    assert!(
        EmbeddedStore::open(&nested).is_err(),
        "a second open of an open store must fail, not share the file"
    );
    drop(store);
    let _reopened = open(&nested);
}

// --- durability --------------------------------------------------------------------------

#[tokio::test]
async fn everything_survives_drop_and_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c1 = customer_id("c1");
    let profile = sample_customer(&c1, 1);
    let event = sample_event("e1", &c1, base_time(), 1);
    let key = FeatureKey::new("views", 1);
    let state = sample_feature_state(1);
    let item = sample_content_item("hero", 1);
    let decision = sample_decision("d1", &c1, 1);
    let outcome = sample_outcome(&decision, 1);
    let joined = MembershipChange {
        segment: "vip".into(),
        customer: c1.clone(),
        joined: true,
    };
    {
        let store = open(dir.path());
        let s = store.stores();
        s.profiles.put(&profile).await.expect("put profile");
        let out = s
            .events
            .append(std::slice::from_ref(&event))
            .await
            .expect("append");
        assert_eq!(out, vec![AppendOutcome::Appended(1)]);
        s.events
            .commit_offset("proc", 1)
            .await
            .expect("commit_offset");
        s.features
            .write(vec![(c1.clone(), key.clone(), state.clone())])
            .await
            .expect("features");
        s.segments
            .apply(std::slice::from_ref(&joined))
            .await
            .expect("segments");
        s.content.upsert(&item).await.expect("content");
        s.decisions.put(&decision).await.expect("decision");
        assert_eq!(
            s.decisions.put_outcome(&outcome).await.expect("outcome"),
            Some(0)
        );
        s.bandit
            .add(
                "hero",
                "a",
                ArmStats {
                    trials: 2.0,
                    reward: 1.0,
                },
            )
            .await
            .expect("bandit");
        let v = s
            .definitions
            .put(DefinitionKind::Rule, "r", json!({"x": 1}))
            .await
            .expect("definition");
        assert!(s
            .definitions
            .set_active(DefinitionKind::Rule, "r", v)
            .await
            .expect("active"));

        let db = Arc::downgrade(&store.db);
        drop(s);
        drop(store);
        assert!(
            db.upgrade().is_none(),
            "dropping the store must stop the writer thread and close the database"
        );
    }

    let store = open(dir.path());
    let s = store.stores();
    assert_eq!(s.profiles.get(&c1).await.expect("get"), Some(profile));
    assert_eq!(s.profiles.count().await.expect("count"), 1);
    assert_eq!(s.events.last_seq().await.expect("last_seq"), 1);
    let scanned = s.events.scan(0, 10).await.expect("scan");
    assert_eq!(scanned.len(), 1);
    assert_eq!(scanned[0].event, event);
    assert_eq!(
        s.events
            .append(std::slice::from_ref(&event))
            .await
            .expect("append"),
        vec![AppendOutcome::Duplicate],
        "dedup keys survive a reopen"
    );
    assert_eq!(s.events.committed_offset("proc").await.expect("offset"), 1);
    assert_eq!(
        s.features.read(&c1, &[key]).await.expect("read"),
        vec![Some(state)]
    );
    assert!(s.segments.contains("vip", &c1).await.expect("contains"));
    assert_eq!(s.segments.size("vip").await.expect("size"), 1);
    assert_eq!(
        s.segments.segments_of(&c1).await.expect("segments_of"),
        vec!["vip".to_owned()]
    );
    assert_eq!(s.content.get("hero").await.expect("content"), Some(item));
    assert_eq!(
        s.decisions.get("d1").await.expect("decision"),
        Some(decision)
    );
    assert_eq!(
        s.decisions.outcomes("d1").await.expect("outcomes"),
        vec![outcome]
    );
    assert_eq!(
        s.bandit
            .get("hero", &["a".to_owned()])
            .await
            .expect("bandit"),
        vec![ArmStats {
            trials: 2.0,
            reward: 1.0
        }]
    );
    assert_eq!(
        s.definitions
            .active(DefinitionKind::Rule, "r")
            .await
            .expect("active"),
        Some(1)
    );
    assert_eq!(
        s.definitions
            .put(DefinitionKind::Rule, "r", json!({}))
            .await
            .expect("put"),
        2,
        "version counters survive a reopen"
    );
}

/// A store written before the impressions table became the customer index of decisions
/// has a `customer_decisions` table. Opening it moves every live entry into
/// `impressions` without items (a decision that already had its row keeps it, items
/// included), drops stale entries, and drops the table; opening it again changes nothing.
#[tokio::test]
async fn an_old_customer_index_is_moved_into_the_impressions_on_open() {
    const OLD_INDEX: TableDefinition<(&str, &str), ()> = TableDefinition::new("customer_decisions");
    let dir = tempfile::tempdir().expect("tempdir");
    let c1 = customer_id("c1");
    let c2 = customer_id("c2");
    // d1 predates the impressions; d2 has its row; d3 is c2's (the entry under c1 is
    // stale); "gone" names no decision; "bad" cannot be decoded (the store still opens).
    let d1 = sample_decision("d1", &c1, 1);
    let d2 = sample_decision("d2", &c1, 2);
    let d3 = sample_decision("d3", &c2, 3);
    {
        let db = redb::Database::create(dir.path().join(FILE_NAME)).expect("create");
        let txn = db.begin_write().expect("begin");
        {
            let mut table = txn.open_table(decisions::DECISIONS).expect("decisions");
            for d in [&d1, &d2, &d3] {
                let value = serde_json::to_vec(d).expect("encode");
                table
                    .insert(d.id.as_str(), value.as_slice())
                    .expect("insert");
            }
            table.insert("bad", b"not json".as_slice()).expect("insert");
            let mut index = txn.open_table(OLD_INDEX).expect("old index");
            for (c, d) in [
                ("c1", "d1"),
                ("c1", "d2"),
                ("c1", "d3"),
                ("c1", "gone"),
                ("c1", "bad"),
            ] {
                index.insert((c, d), ()).expect("index");
            }
            index.insert(("c2", "d3"), ()).expect("index");
            let mut impressions = txn.open_table(decisions::IMPRESSIONS).expect("impressions");
            let shown = d2.items[0].item.id.as_str();
            impressions
                .insert(("c1", d2.created_at.timestamp_millis(), "d2"), shown)
                .expect("impression");
        }
        txn.commit().expect("commit");
    }
    for round in ["first open", "second open"] {
        let store = open(dir.path());
        let s = store.stores();
        let ids = |list: Vec<(crate::decision::Decision, Vec<crate::decision::Outcome>)>| {
            let mut ids: Vec<String> = list.into_iter().map(|(d, _)| d.id).collect();
            ids.sort();
            ids
        };
        let of_c1 = s.decisions.customer_decisions(&c1).await.expect("c1");
        assert_eq!(ids(of_c1), ["d1", "d2"], "{round}: c1's decisions");
        let of_c2 = s.decisions.customer_decisions(&c2).await.expect("c2");
        assert_eq!(ids(of_c2), ["d3"], "{round}: c2's decisions");
        let shown = s
            .decisions
            .impressions(&c1, base_time() - chrono::Duration::days(1), 100)
            .await
            .expect("impressions");
        let shown: Vec<&str> = shown.iter().map(|i| i.item_id.as_str()).collect();
        assert_eq!(
            shown,
            [d2.items[0].item.id.as_str()],
            "{round}: only the row that had items counts"
        );
        let tables = table_names(&store);
        assert!(
            !tables.iter().any(|t| t == "customer_decisions"),
            "{round}: the old index is gone: {tables:?}"
        );
    }
}

/// A store written before the customer index of events held the types has a
/// `customer_events` table with `()` values. Opening it moves every entry into
/// `customer_event_types` with its event's type (an entry naming a missing event is
/// dropped; one naming an undecodable event is kept, counted by no condition), drops
/// the old table, and counts and reads work as on a new store; opening again changes
/// nothing.
#[tokio::test]
async fn an_old_customer_index_of_events_gains_the_types_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (c1, c2) = (customer_id("c1"), customer_id("c2"));
    let t = base_time();
    let view = sample_event("e1", &c1, t, 1);
    let mut purchase = sample_event("e2", &c1, t + chrono::Duration::seconds(1), 2);
    purchase.event_type = "purchase".into();
    let key = |c: &str, e: &Event, seq: u64| {
        (
            c.to_owned(),
            e.timestamp.timestamp(),
            e.timestamp.timestamp_subsec_nanos(),
            seq,
        )
    };
    {
        let db = redb::Database::create(dir.path().join(FILE_NAME)).expect("create");
        let txn = db.begin_write().expect("begin");
        {
            let mut log = txn.open_table(events::EVENTS).expect("events");
            for (seq, e) in [(1u64, &view), (2, &purchase)] {
                let value = serde_json::to_vec(e).expect("encode");
                log.insert(seq, value.as_slice()).expect("insert");
            }
            log.insert(3u64, b"not json".as_slice()).expect("insert");
            let mut index = txn
                .open_table(events::OLD_CUSTOMER_EVENTS)
                .expect("old index");
            let rows = [
                key("c1", &view, 1),
                key("c1", &purchase, 2),
                key("c2", &view, 3),
                // Names no event.
                key("c2", &view, 4),
            ];
            for (c, secs, nanos, seq) in &rows {
                index
                    .insert((c.as_str(), *secs, *nanos, *seq), ())
                    .expect("index");
            }
        }
        txn.commit().expect("commit");
    }
    let windows = [
        ("page_view".to_owned(), t - chrono::Duration::days(1)),
        ("purchase".to_owned(), t - chrono::Duration::days(1)),
        (String::new(), t - chrono::Duration::days(1)),
    ];
    for round in ["first open", "second open"] {
        let store = open(dir.path());
        let s = store.stores();
        let of_c1 = s
            .events
            .customer_events(&c1, t - chrono::Duration::days(1))
            .await
            .expect("c1's events");
        assert_eq!(
            of_c1.into_iter().map(|e| e.event).collect::<Vec<_>>(),
            [view.clone(), purchase.clone()],
            "{round}: c1's events"
        );
        let counts = s
            .events
            .count_customer_events(&[c1.clone(), c2.clone()], &windows)
            .await
            .expect("counts");
        assert_eq!(
            counts,
            [[1, 1, 0], [0, 0, 1]],
            "{round}: the types came along; c2's undecodable event has none, its \
             missing one is gone"
        );
        let tables = table_names(&store);
        assert!(
            !tables.iter().any(|t| t == "customer_events"),
            "{round}: the old index is gone: {tables:?}"
        );
    }
}

#[tokio::test]
async fn queued_writes_finish_when_the_store_is_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c1 = customer_id("c1");
    let events: Vec<Event> = (0..100)
        .map(|i| sample_event(&format!("e{i}"), &c1, base_time(), i))
        .collect();
    {
        let store = open(dir.path());
        let s = store.stores();
        // Keep the writer busy, then queue 100 appends whose callers give up at once.
        let holding = hold_writer(&store, Duration::from_millis(200)).await;
        for event in &events {
            let pending = s.events.append(std::slice::from_ref(event)).now_or_never();
            assert!(
                pending.is_none(),
                "the writer is busy: the append must still be queued"
            );
        }
        holding.await.expect("holding task");
        drop(s);
        drop(store);
    }
    let store = open(dir.path());
    let s = store.stores();
    assert_eq!(s.events.last_seq().await.expect("last_seq"), 100);
    let scanned = s.events.scan(0, 1000).await.expect("scan");
    assert_eq!(
        scanned.into_iter().map(|e| e.event).collect::<Vec<_>>(),
        events,
        "every queued append must be committed, in queue order"
    );
}

// --- group commit ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_share_commits_and_get_gap_free_seqs() {
    let (_dir, store, stores) = fresh();
    let tasks = 50;
    let per_task = 20;
    let holding = hold_writer(&store, Duration::from_millis(300)).await;
    let commits_before = store.writer.commits();
    let mut handles = Vec::new();
    for task in 0..tasks {
        let log = stores.events.clone();
        handles.push(tokio::spawn(async move {
            let customer = customer_id(&format!("c{task}"));
            let events: Vec<Event> = (0..per_task)
                .map(|i| sample_event(&format!("t{task}-e{i}"), &customer, base_time(), i))
                .collect();
            let outcomes = log.append(&events).await.expect("append");
            (events, outcomes)
        }));
    }
    let mut by_seq = std::collections::BTreeMap::new();
    for handle in handles {
        let (events, outcomes) = handle.await.expect("task");
        let seqs: Vec<u64> = outcomes
            .iter()
            .map(|o| match o {
                AppendOutcome::Appended(seq) => *seq,
                AppendOutcome::Duplicate => panic!("no event was a duplicate"),
            })
            .collect();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "seqs follow input order"
        );
        for (seq, event) in seqs.into_iter().zip(events) {
            assert!(
                by_seq.insert(seq, event).is_none(),
                "seq {seq} was assigned twice"
            );
        }
    }
    holding.await.expect("holding task");
    let total = (tasks * per_task) as u64;
    assert_eq!(
        by_seq.keys().copied().collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>(),
        "seqs must be distinct and gap-free"
    );
    let commits = store.writer.commits() - commits_before;
    assert!(
        commits < tasks as u64,
        "{tasks} concurrent appends must share commits (took {commits})"
    );
    assert_eq!(stores.events.last_seq().await.expect("last_seq"), total);
    let scanned = stores.events.scan(0, 10_000).await.expect("scan");
    assert_eq!(scanned.len() as u64, total);
    for stored in scanned {
        assert_eq!(
            Some(&stored.event),
            by_seq.get(&stored.seq),
            "event at seq {}",
            stored.seq
        );
    }
}

/// A failing operation is rolled back alone; the rest of its batch commits once.
#[tokio::test]
async fn a_failed_operation_leaves_nothing_and_spares_its_batch() {
    let (_dir, store, _stores) = fresh();
    let holding = hold_writer(&store, Duration::from_millis(200)).await;
    let commits_before = store.writer.commits();
    let a = store.write(|txn| scratch_put(txn, "a", 1));
    let b = store.write(|txn| {
        scratch_put(txn, "b", 2)?;
        Err::<(), _>(StorageError::Backend("refused after writing".into()))
    });
    let c = store.write(|txn| scratch_put(txn, "c", 3));
    let (a, b, c) = tokio::join!(a, b, c);
    holding.await.expect("holding task");
    a.expect("a commits");
    assert!(matches!(b, Err(StorageError::Backend(ref m)) if m == "refused after writing"));
    c.expect("c commits");
    assert_eq!(scratch_get(&store, "a"), Some(1));
    assert_eq!(
        scratch_get(&store, "b"),
        None,
        "the failed operation's write must be rolled back"
    );
    assert_eq!(scratch_get(&store, "c"), Some(3));
    assert_eq!(
        store.writer.commits() - commits_before,
        2,
        "the holding op, then a, b and c in one batch committed once"
    );
}

#[tokio::test]
async fn a_panicking_operation_fails_alone() {
    let (_dir, store, _stores) = fresh();
    let holding = hold_writer(&store, Duration::from_millis(200)).await;
    let a = store.write(|txn| scratch_put(txn, "a", 1));
    let b = store.write(|txn| -> StorageResult<()> {
        scratch_put(txn, "b", 2)?;
        panic!("bug in an operation");
    });
    let (a, b) = tokio::join!(a, b);
    holding.await.expect("holding task");
    a.expect("a commits");
    assert!(matches!(b, Err(StorageError::Backend(_))), "got {b:?}");
    assert_eq!(scratch_get(&store, "b"), None);
    // The writer is still alive.
    store
        .write(|txn| scratch_put(txn, "d", 4))
        .await
        .expect("later write");
    assert_eq!(scratch_get(&store, "d"), Some(4));
}

#[tokio::test]
async fn floats_are_stored_exactly() {
    let (_dir, _store, s) = fresh();
    conformance::exact_floats(s.decisions.as_ref(), s.features.as_ref(), "t:").await;
}

/// JSON cannot hold NaN or infinity: such values are refused, never stored as `null`
/// (which would read back as corrupt).
#[tokio::test]
async fn non_finite_numbers_are_refused_not_stored() {
    let (_dir, _store, s) = fresh();
    let c1 = customer_id("c1");
    let mut decision = sample_decision("d1", &c1, 1);
    decision.confidence_score = f64::NAN;
    assert!(
        s.decisions.put(&decision).await.is_err(),
        "a NaN decision must be refused"
    );
    assert_eq!(
        s.decisions.get("d1").await.expect("get"),
        None,
        "and not stored"
    );

    let decision = sample_decision("d2", &c1, 2);
    s.decisions.put(&decision).await.expect("put");
    let mut outcome = sample_outcome(&decision, 1);
    outcome.reward = f64::INFINITY;
    assert!(
        s.decisions.put_outcome(&outcome).await.is_err(),
        "an infinite reward is refused"
    );
    assert!(s
        .decisions
        .outcomes("d2")
        .await
        .expect("outcomes")
        .is_empty());

    let key = FeatureKey::new("f", 1);
    let mut state = sample_feature_state(1);
    state.buckets[0].sum = f64::NEG_INFINITY;
    let good = (customer_id("c2"), key.clone(), sample_feature_state(2));
    assert!(
        s.features
            .write(vec![good, (c1.clone(), key.clone(), state)])
            .await
            .is_err(),
        "a batch with an infinite sum is refused"
    );
    assert_eq!(
        s.features
            .read(&customer_id("c2"), std::slice::from_ref(&key))
            .await
            .expect("read"),
        vec![None],
        "a refused batch stores nothing"
    );

    let nan = ArmStats {
        trials: 1.0,
        reward: f64::NAN,
    };
    assert!(
        s.bandit.add("p", "a", nan).await.is_err(),
        "a NaN bandit delta is refused"
    );
    assert_eq!(
        s.bandit.get("p", &["a".to_owned()]).await.expect("get"),
        vec![ArmStats::default()]
    );
}

// --- corruption --------------------------------------------------------------------------

#[tokio::test]
async fn corrupt_values_are_reported_not_panicked_on() {
    let (_dir, store, s) = fresh();
    let c1 = customer_id("c1");

    s.profiles.put(&sample_customer(&c1, 1)).await.expect("put");
    corrupt(&store, profiles::PROFILES, "c1");
    assert_corrupt("profiles.get", s.profiles.get(&c1).await);
    assert_corrupt("profiles.list", s.profiles.list(None, 10).await);

    let event = sample_event("e1", &c1, base_time(), 1);
    s.events
        .append(std::slice::from_ref(&event))
        .await
        .expect("append");
    corrupt(&store, events::EVENTS, 1u64);
    assert_corrupt("events.scan", s.events.scan(0, 10).await);
    assert_corrupt(
        "events.customer_events",
        s.events.customer_events(&c1, base_time()).await,
    );

    let d1 = sample_decision("d1", &c1, 1);
    let d2 = sample_decision("d2", &c1, 2);
    s.decisions.put(&d1).await.expect("put d1");
    s.decisions.put(&d2).await.expect("put d2");
    corrupt(&store, decisions::DECISIONS, "d1");
    assert_corrupt("decisions.get", s.decisions.get("d1").await);
    assert_corrupt(
        "decisions.pseudonymise",
        s.decisions.pseudonymise(&c1, "anon").await,
    );
    assert_eq!(
        s.decisions.get("d2").await.expect("get d2"),
        Some(d2.clone()),
        "a failed pseudonymise must change nothing"
    );
    s.decisions.put(&d1).await.expect("repair d1");
    assert_eq!(
        s.decisions
            .pseudonymise(&c1, "anon")
            .await
            .expect("pseudonymise"),
        2
    );

    s.content
        .upsert(&sample_content_item("i1", 1))
        .await
        .expect("upsert");
    corrupt(&store, content::CONTENT, "i1");
    assert_corrupt("content.get", s.content.get("i1").await);
    assert_corrupt(
        "content.get_many",
        s.content.get_many(&["i1".to_owned()]).await,
    );
    assert_corrupt("content.list", s.content.list().await);

    let key = FeatureKey::new("f", 1);
    s.features
        .write(vec![(c1.clone(), key.clone(), sample_feature_state(1))])
        .await
        .expect("write");
    corrupt(&store, feature_tables::FEATURES, ("c1", "f", 1u32));
    assert_corrupt("features.read", s.features.read(&c1, &[key]).await);

    s.definitions
        .put(DefinitionKind::Model, "m", json!(1))
        .await
        .expect("put");
    corrupt(&store, definitions::DEFINITIONS, ("model", "m", 1u32));
    assert_corrupt(
        "definitions.get",
        s.definitions.get(DefinitionKind::Model, "m", None).await,
    );
    assert_corrupt(
        "definitions.list",
        s.definitions.list(DefinitionKind::Model).await,
    );
}

/// What an outbox forgets: the oldest records at or below a seq, a bounded number per
/// call, with their index rows and ids (an id forgotten is new again); the numbering goes
/// on where it was, and what is newer stays untouched.
#[tokio::test]
async fn forgetting_delivered_events_keeps_the_newer_ones_and_the_numbering() {
    let (_dir, store, _) = fresh();
    let log = events::EmbeddedEventLog::new(store.clone());
    let (a, b) = (customer_id("forget-a"), customer_id("forget-b"));
    let sent: Vec<Event> = (0..10)
        .map(|i| {
            let who = if i % 2 == 0 { &a } else { &b };
            sample_event(
                &format!("e{i}"),
                who,
                base_time() + chrono::Duration::seconds(i),
                i,
            )
        })
        .collect();
    log.append(&sent).await.expect("append");

    assert_eq!(log.forget_through(6, 4).await.expect("forget"), 4);
    assert_eq!(log.forget_through(6, 4).await.expect("forget"), 2);
    assert_eq!(log.forget_through(6, 4).await.expect("forget"), 0);
    let left: Vec<u64> = log
        .scan(0, 100)
        .await
        .expect("scan")
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(left, [7, 8, 9, 10]);
    let of_a: Vec<u64> = log
        .customer_events(&a, base_time())
        .await
        .expect("a's events")
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(
        of_a,
        [7, 9],
        "the index lost the forgotten rows, kept the rest"
    );
    assert_eq!(log.last_seq().await.expect("last seq"), 10);
    // e1 was forgotten and is new again; e8 is still known.
    let again = log
        .append(&[sent[1].clone(), sent[8].clone()])
        .await
        .expect("append again");
    assert_eq!(
        again,
        [AppendOutcome::Appended(11), AppendOutcome::Duplicate]
    );
}

/// Feature states are stored in the binary form, which reads back exactly and is smaller
/// than the JSON they were stored as before; states stored as JSON still read; a binary
/// state cut short, or with bytes after it, is reported corrupt.
#[tokio::test]
async fn feature_states_are_binary_and_json_ones_still_read() {
    let (_dir, store, s) = fresh();
    let c1 = customer_id("c1");
    let key = FeatureKey::new("f", 1);
    let mut state = sample_feature_state(3);
    state.applied_position = Some(crate::events::StreamPosition {
        partition: 2,
        offset: 1_234_567,
    });
    let raw = |store: &EmbeddedStore| {
        let txn = store.db.begin_read().expect("begin_read");
        let table = txn
            .open_table(feature_tables::FEATURES)
            .expect("open_table");
        let value = table.get(("c1", "f", 1u32)).expect("get").expect("stored");
        value.value().to_vec()
    };
    let put_raw = |store: &EmbeddedStore, bytes: &[u8]| {
        let txn = store.db.begin_write().expect("begin_write");
        {
            let mut table = txn
                .open_table(feature_tables::FEATURES)
                .expect("open_table");
            table.insert(("c1", "f", 1u32), bytes).expect("insert");
        }
        txn.commit().expect("commit");
    };
    let read = || s.features.read(&c1, std::slice::from_ref(&key));

    // Stored as JSON, as before the binary form.
    let json = serde_json::to_vec(&state).expect("json");
    put_raw(&store, &json);
    assert_eq!(read().await.expect("read"), vec![Some(state.clone())]);

    s.features
        .write(vec![(c1.clone(), key.clone(), state.clone())])
        .await
        .expect("write");
    let binary = raw(&store);
    assert_eq!(binary[0], feature_tables::BINARY_V1);
    assert!(
        binary.len() < json.len(),
        "{} bytes against {} as JSON",
        binary.len(),
        json.len()
    );
    assert_eq!(read().await.expect("read"), vec![Some(state.clone())]);

    put_raw(&store, &binary[..binary.len() - 1]);
    assert_corrupt("a state cut short", read().await);
    let mut longer = binary.clone();
    longer.push(0);
    put_raw(&store, &longer);
    assert_corrupt("a state with bytes after it", read().await);
}
