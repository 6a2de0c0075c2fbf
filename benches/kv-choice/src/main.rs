//! kv-choice: redb 4.x vs fjall 3.x for Tailor's write pattern.
//!
//! For each store, on a fresh temporary directory, this measures:
//!   1. durable single writes  (N/10 writes, one fsync'd commit each)
//!   2. durable group commit   (N events, B events per fsync'd commit)
//!   3. point reads            (100k random reads of existing keys), both inside one
//!                             long-lived snapshot and with a fresh snapshot per read
//!   4. reads under writes     (1 reader thread doing fresh-snapshot point reads while the
//!                             writer group-commits another N events) -- the MVCC case
//!   5. on-disk size after close, and the time to reopen (recover) the store
//!
//! Usage: kv-choice [--events N] [--batch B] [--reads R] [--dir PATH] [--cache-mib M]
//!   --cache-mib M  give both stores an M MiB cache (default: each library's own default)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const VALUE_LEN: usize = 200;

/// Cache size for both stores in MiB; 0 = each library's default
/// (redb 4.6: 1 GiB page cache, fjall 3.1: 32 MiB block cache).
static CACHE_MIB: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

// ---------------------------------------------------------------------------
// Small helpers: PRNG, keys, values, stats
// ---------------------------------------------------------------------------

/// xorshift64* -- deterministic, no dependency.
struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }
    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// 16-byte big-endian sequence number.
fn key(seq: u64) -> [u8; 16] {
    (seq as u128).to_be_bytes()
}

/// A ~200-byte event value that looks like a compact JSON event: a compressible
/// envelope plus a random hex payload (so LZ4 in fjall does not get a free ride
/// on all-zero values).
fn event_value(seq: u64, rng: &mut Rng) -> Vec<u8> {
    let kinds = ["impression", "click", "decision", "feature_update"];
    let kind = kinds[(seq % kinds.len() as u64) as usize];
    let mut s = format!(
        "{{\"seq\":{seq},\"ts\":{},\"user\":\"u{:08}\",\"kind\":\"{kind}\",\"payload\":\"",
        1_795_000_000_000u64 + seq,
        rng.below(1_000_000)
    );
    while s.len() < VALUE_LEN - 2 {
        s.push_str(&format!("{:016x}", rng.next_u64()));
    }
    s.truncate(VALUE_LEN - 2);
    s.push_str("\"}");
    debug_assert_eq!(s.len(), VALUE_LEN);
    s.into_bytes()
}

#[derive(Clone, Copy, Default)]
struct Pct {
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

/// Percentiles of a set of durations, in nanoseconds.
fn pct_ns(mut v: Vec<u64>) -> Pct {
    if v.is_empty() {
        return Pct::default();
    }
    v.sort_unstable();
    let at = |q: f64| -> f64 {
        let idx = ((v.len() as f64 - 1.0) * q).round() as usize;
        v[idx.min(v.len() - 1)] as f64
    };
    Pct {
        p50: at(0.50),
        p99: at(0.99),
        p999: at(0.999),
        max: *v.last().unwrap() as f64,
    }
}

fn dir_size(p: &Path) -> (u64, u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut apparent = 0u64;
    let mut allocated = 0u64;
    let mut files = 0u64;
    let mut stack = vec![p.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(md) = e.metadata() else { continue };
            if md.is_dir() {
                stack.push(e.path());
            } else {
                apparent += md.len();
                allocated += md.blocks() * 512;
                files += 1;
            }
        }
    }
    (apparent, allocated, files)
}

/// Filesystem type of the mount that holds `p` (from /proc/mounts), for the report.
fn fs_type(p: &Path) -> String {
    let p = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut best: Option<(usize, String)> = None;
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        let mp = Path::new(f[1]);
        if p.starts_with(mp) {
            let l = f[1].len();
            if best.as_ref().map_or(true, |(bl, _)| l > *bl) {
                best = Some((l, f[2].to_string()));
            }
        }
    }
    best.map(|b| b.1).unwrap_or_else(|| "unknown".into())
}

// ---------------------------------------------------------------------------
// The store abstraction
// ---------------------------------------------------------------------------

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

trait Store: Send + Sync {
    /// One event, committed with full durability (fsync) before returning.
    fn put_durable(&self, k: &[u8; 16], v: &[u8]) -> Res<()>;
    /// Many events, one atomic commit, one fsync.
    fn put_batch_durable(&self, items: &[([u8; 16], Vec<u8>)]) -> Res<()>;
    /// Point read with a fresh snapshot / read transaction (what a request handler does).
    fn get_fresh(&self, k: &[u8; 16]) -> Res<bool>;
    /// Many point reads inside one snapshot; returns per-read latency in ns.
    fn gets_one_snapshot(&self, keys: &[[u8; 16]]) -> Res<Vec<u64>>;
}

// ----- redb 4.x -----

mod redb_store {
    use super::{Res, Store};
    use redb::{Database, ReadableDatabase, TableDefinition};
    use std::path::Path;
    use std::time::Instant;

    const EVENTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("events");

    pub struct RedbStore {
        db: Database,
    }

    impl RedbStore {
        pub fn open(dir: &Path) -> Res<Self> {
            // Database::create opens the file if it exists, creates it otherwise.
            let mib = super::CACHE_MIB.load(std::sync::atomic::Ordering::Relaxed);
            let db = if mib == 0 {
                Database::create(dir.join("tailor.redb"))?
            } else {
                Database::builder()
                    .set_cache_size((mib * 1024 * 1024) as usize)
                    .create(dir.join("tailor.redb"))?
            };
            // Make sure the table exists so readers never see TableDoesNotExist.
            let tx = db.begin_write()?;
            tx.open_table(EVENTS)?;
            tx.commit()?;
            Ok(RedbStore { db })
        }
    }

    impl Store for RedbStore {
        fn put_durable(&self, k: &[u8; 16], v: &[u8]) -> Res<()> {
            // Default durability of a redb write transaction is Durability::Immediate:
            // commit() returns only after the data and the commit slot are fsync'd.
            let tx = self.db.begin_write()?;
            {
                let mut t = tx.open_table(EVENTS)?;
                t.insert(k.as_slice(), v)?;
            }
            tx.commit()?;
            Ok(())
        }

        fn put_batch_durable(&self, items: &[([u8; 16], Vec<u8>)]) -> Res<()> {
            let tx = self.db.begin_write()?;
            {
                let mut t = tx.open_table(EVENTS)?;
                for (k, v) in items {
                    t.insert(k.as_slice(), v.as_slice())?;
                }
            }
            tx.commit()?;
            Ok(())
        }

        fn get_fresh(&self, k: &[u8; 16]) -> Res<bool> {
            let rtx = self.db.begin_read()?;
            let t = rtx.open_table(EVENTS)?;
            Ok(t.get(k.as_slice())?.is_some())
        }

        fn gets_one_snapshot(&self, keys: &[[u8; 16]]) -> Res<Vec<u64>> {
            let rtx = self.db.begin_read()?;
            let t = rtx.open_table(EVENTS)?;
            let mut lat = Vec::with_capacity(keys.len());
            for k in keys {
                let s = Instant::now();
                let found = t.get(k.as_slice())?.is_some();
                lat.push(s.elapsed().as_nanos() as u64);
                assert!(found, "redb: key missing");
            }
            Ok(lat)
        }
    }
}

// ----- fjall 3.x -----

mod fjall_store {
    use super::{Res, Store};
    use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable};
    use std::path::Path;
    use std::time::Instant;

    pub struct FjallStore {
        db: Database,
        events: Keyspace,
    }

    impl FjallStore {
        pub fn open(dir: &Path) -> Res<Self> {
            let mib = super::CACHE_MIB.load(std::sync::atomic::Ordering::Relaxed);
            let mut b = Database::builder(dir.join("tailor.fjall"));
            if mib != 0 {
                b = b.cache_size(mib * 1024 * 1024);
            }
            let db = b.open()?;
            let events = db.keyspace("events", KeyspaceCreateOptions::default)?;
            Ok(FjallStore { db, events })
        }
    }

    impl Store for FjallStore {
        fn put_durable(&self, k: &[u8; 16], v: &[u8]) -> Res<()> {
            // insert() writes the journal entry to OS buffers; persist(SyncAll) fsyncs the
            // journal. Only after that is the write acknowledged.
            self.events.insert(k.as_slice(), v)?;
            self.db.persist(PersistMode::SyncAll)?;
            Ok(())
        }

        fn put_batch_durable(&self, items: &[([u8; 16], Vec<u8>)]) -> Res<()> {
            let mut b = self.db.batch();
            for (k, v) in items {
                b.insert(&self.events, k.as_slice(), v.as_slice());
            }
            b.commit()?; // atomic: one journal batch record
            self.db.persist(PersistMode::SyncAll)?; // one fsync per batch
            Ok(())
        }

        fn get_fresh(&self, k: &[u8; 16]) -> Res<bool> {
            // Explicit MVCC snapshot per read (what a handler reading several features
            // consistently would do); a bare keyspace.get() is the same path minus the
            // snapshot registration.
            let snap = self.db.snapshot();
            Ok(snap.get(&self.events, k)?.is_some())
        }

        fn gets_one_snapshot(&self, keys: &[[u8; 16]]) -> Res<Vec<u64>> {
            let snap = self.db.snapshot();
            let mut lat = Vec::with_capacity(keys.len());
            for k in keys {
                let s = Instant::now();
                let found = snap.get(&self.events, k)?.is_some();
                lat.push(s.elapsed().as_nanos() as u64);
                assert!(found, "fjall: key missing");
            }
            Ok(lat)
        }
    }
}

// ---------------------------------------------------------------------------
// The benchmark
// ---------------------------------------------------------------------------

struct Config {
    events: u64,
    batch: u64,
    reads: u64,
    base_dir: Option<PathBuf>,
}

#[derive(Default)]
struct Results {
    store: &'static str,
    version: &'static str,
    single_n: u64,
    single_us: Pct,
    single_wps: f64,
    group_n: u64,
    group_eps: f64,
    group_commit_us: Pct,
    read_fresh_ns: Pct,
    read_snap_ns: Pct,
    mixed_reads: u64,
    mixed_read_ns: Pct,
    mixed_write_eps: f64,
    disk_apparent: u64,
    disk_allocated: u64,
    disk_files: u64,
    reopen_ms: f64,
    total_keys: u64,
}

fn parse_args() -> Config {
    let mut c = Config {
        events: 20_000,
        batch: 256,
        reads: 100_000,
        base_dir: None,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    let usage = "usage: kv-choice [--events N] [--batch B] [--reads R] [--dir PATH] [--cache-mib M]";
    while i < args.len() {
        let val = |i: usize| -> &str {
            args.get(i + 1).map(|s| s.as_str()).unwrap_or_else(|| {
                eprintln!("{usage}");
                std::process::exit(2)
            })
        };
        let num = |s: &str| -> u64 {
            s.replace('_', "").parse().unwrap_or_else(|_| {
                eprintln!("not a number: {s}\n{usage}");
                std::process::exit(2)
            })
        };
        match args[i].as_str() {
            "--events" | "-n" => c.events = num(val(i)),
            "--batch" | "-b" => c.batch = num(val(i)),
            "--reads" => c.reads = num(val(i)),
            "--cache-mib" => CACHE_MIB.store(num(val(i)), Ordering::Relaxed),
            "--dir" => c.base_dir = Some(PathBuf::from(val(i))),
            "-h" | "--help" => {
                println!("{usage}");
                std::process::exit(0)
            }
            other => {
                eprintln!("unknown argument: {other}\n{usage}");
                std::process::exit(2)
            }
        }
        i += 2;
    }
    c.events = c.events.max(10);
    c.batch = c.batch.max(1);
    c.reads = c.reads.max(1);
    c
}

fn run_one(
    name: &'static str,
    version: &'static str,
    cfg: &Config,
    open: fn(&Path) -> Res<Box<dyn Store>>,
) -> Res<Results> {
    let tmp = match &cfg.base_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            tempfile::Builder::new().prefix("kv-choice-").tempdir_in(d)?
        }
        None => tempfile::Builder::new().prefix("kv-choice-").tempdir()?,
    };
    let dir = tmp.path().to_path_buf();
    let mut r = Results {
        store: name,
        version,
        ..Default::default()
    };
    let mut rng = Rng::new(0x7A11_0123_4567_89AB);
    let store: Arc<dyn Store> = Arc::from(open(&dir)?);
    let mut seq: u64 = 0;

    // 1. Durable single writes.
    eprintln!("[{name}] 1/4 durable single writes ...");
    let single_n = cfg.events / 10;
    let mut lat = Vec::with_capacity(single_n as usize);
    let t0 = Instant::now();
    for _ in 0..single_n {
        let v = event_value(seq, &mut rng);
        let k = key(seq);
        let s = Instant::now();
        store.put_durable(&k, &v)?;
        lat.push(s.elapsed().as_nanos() as u64);
        seq += 1;
    }
    let el = t0.elapsed();
    r.single_n = single_n;
    let p = pct_ns(lat);
    r.single_us = Pct {
        p50: p.p50 / 1e3,
        p99: p.p99 / 1e3,
        p999: p.p999 / 1e3,
        max: p.max / 1e3,
    };
    r.single_wps = single_n as f64 / el.as_secs_f64();

    // 2. Durable group commit.
    eprintln!("[{name}] 2/4 durable group commit ...");
    let (eps, commit_lat) = group_commit(&*store, &mut seq, cfg.events, cfg.batch, &mut rng)?;
    r.group_n = cfg.events;
    r.group_eps = eps;
    r.group_commit_us = commit_lat;

    // 3. Point reads of existing keys.
    eprintln!("[{name}] 3/4 point reads ...");
    let existing = seq;
    let mut krng = Rng::new(0xBEEF);
    let keys: Vec<[u8; 16]> = (0..cfg.reads).map(|_| key(krng.below(existing))).collect();
    // warm-up pass (both stores' caches hold the whole data set at this size)
    for k in keys.iter().take(10_000) {
        assert!(store.get_fresh(k)?);
    }
    let mut lat = Vec::with_capacity(keys.len());
    for k in &keys {
        let s = Instant::now();
        let found = store.get_fresh(k)?;
        lat.push(s.elapsed().as_nanos() as u64);
        assert!(found, "{name}: key missing");
    }
    r.read_fresh_ns = pct_ns(lat);
    r.read_snap_ns = pct_ns(store.gets_one_snapshot(&keys)?);

    // 4. Reads while the single writer group-commits (MVCC readers vs writer).
    eprintln!("[{name}] 4/4 reads under concurrent group commit ...");
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let store = Arc::clone(&store);
        let stop = Arc::clone(&stop);
        thread::spawn(move || -> Res<Vec<u64>> {
            let mut rng = Rng::new(0xC0FFEE);
            let mut lat = Vec::with_capacity(1 << 20);
            while !stop.load(Ordering::Relaxed) {
                let k = key(rng.below(existing));
                let s = Instant::now();
                let found = store.get_fresh(&k)?;
                lat.push(s.elapsed().as_nanos() as u64);
                assert!(found);
                if lat.len() >= 4_000_000 {
                    break;
                }
            }
            Ok(lat)
        })
    };
    thread::sleep(Duration::from_millis(20));
    let (eps, _) = group_commit(&*store, &mut seq, cfg.events, cfg.batch, &mut rng)?;
    stop.store(true, Ordering::Relaxed);
    let lat = reader.join().expect("reader thread panicked")?;
    r.mixed_reads = lat.len() as u64;
    r.mixed_read_ns = pct_ns(lat);
    r.mixed_write_eps = eps;
    r.total_keys = seq;

    // 5. Close, measure disk, reopen (recovery) and verify the last acknowledged key.
    drop(store);
    let (a, b, f) = dir_size(&dir);
    r.disk_apparent = a;
    r.disk_allocated = b;
    r.disk_files = f;
    let s = Instant::now();
    let store = open(&dir)?;
    r.reopen_ms = s.elapsed().as_secs_f64() * 1e3;
    assert!(store.get_fresh(&key(seq - 1))?, "{name}: last key missing after reopen");
    assert!(store.get_fresh(&key(0))?, "{name}: first key missing after reopen");
    drop(store);
    Ok(r)
}

/// Writes `n` events in commits of `batch`; returns events/s and per-commit latency (us).
fn group_commit(
    store: &dyn Store,
    seq: &mut u64,
    n: u64,
    batch: u64,
    rng: &mut Rng,
) -> Res<(f64, Pct)> {
    // Build values up front so only the store is timed.
    let all: Vec<([u8; 16], Vec<u8>)> = (0..n)
        .map(|i| (key(*seq + i), event_value(*seq + i, rng)))
        .collect();
    let mut lat = Vec::new();
    let t0 = Instant::now();
    for chunk in all.chunks(batch as usize) {
        let s = Instant::now();
        store.put_batch_durable(chunk)?;
        lat.push(s.elapsed().as_nanos() as u64);
    }
    let el = t0.elapsed();
    *seq += n;
    let p = pct_ns(lat);
    Ok((
        n as f64 / el.as_secs_f64(),
        Pct {
            p50: p.p50 / 1e3,
            p99: p.p99 / 1e3,
            p999: p.p999 / 1e3,
            max: p.max / 1e3,
        },
    ))
}

fn open_redb(p: &Path) -> Res<Box<dyn Store>> {
    Ok(Box::new(redb_store::RedbStore::open(p)?))
}
fn open_fjall(p: &Path) -> Res<Box<dyn Store>> {
    Ok(Box::new(fjall_store::FjallStore::open(p)?))
}

fn mib(b: u64) -> String {
    format!("{:.2} MiB", b as f64 / (1024.0 * 1024.0))
}

fn print_table(cfg: &Config, rs: &[Results]) {
    let mut rows: BTreeMap<usize, (String, Vec<String>)> = BTreeMap::new();
    let mut add = |i: usize, label: String, f: &dyn Fn(&Results) -> String| {
        rows.insert(i, (label, rs.iter().map(f).collect()));
    };
    add(0, "crate version".into(), &|r| r.version.to_string());
    add(1, format!("1. durable single write: p50 (us)  [{} writes]", cfg.events / 10), &|r| {
        format!("{:.0}", r.single_us.p50)
    });
    add(2, "   durable single write: p99 (us)".into(), &|r| format!("{:.0}", r.single_us.p99));
    add(3, "   durable single writes/s".into(), &|r| format!("{:.0}", r.single_wps));
    add(4, format!("2. group commit events/s  [{} events, batch {}]", cfg.events, cfg.batch), &|r| {
        format!("{:.0}", r.group_eps)
    });
    add(5, "   group commit: p50 / p99 per commit (us)".into(), &|r| {
        format!("{:.0} / {:.0}", r.group_commit_us.p50, r.group_commit_us.p99)
    });
    add(6, format!("3. point read, fresh snapshot: p50 (ns)  [{} reads]", cfg.reads), &|r| {
        format!("{:.0}", r.read_fresh_ns.p50)
    });
    add(7, "   point read, fresh snapshot: p99 (ns)".into(), &|r| format!("{:.0}", r.read_fresh_ns.p99));
    add(8, "   point read, one snapshot: p50 / p99 (ns)".into(), &|r| {
        format!("{:.0} / {:.0}", r.read_snap_ns.p50, r.read_snap_ns.p99)
    });
    add(9, "4. reads during group commit: p50 / p99 (ns)".into(), &|r| {
        format!("{:.0} / {:.0}", r.mixed_read_ns.p50, r.mixed_read_ns.p99)
    });
    add(10, "   reads during group commit: p99.9 / max (us)".into(), &|r| {
        format!("{:.0} / {:.0}", r.mixed_read_ns.p999 / 1e3, r.mixed_read_ns.max / 1e3)
    });
    add(11, "   reads done / writer events/s meanwhile".into(), &|r| {
        format!("{} / {:.0}", r.mixed_reads, r.mixed_write_eps)
    });
    add(12, "5. on-disk size after close (apparent)".into(), &|r| mib(r.disk_apparent));
    add(13, "   on-disk size after close (allocated)".into(), &|r| mib(r.disk_allocated));
    add(14, "   files in the store directory".into(), &|r| r.disk_files.to_string());
    add(15, "   logical data written (keys x (16+200 B))".into(), &|r| {
        mib(r.total_keys * (16 + VALUE_LEN as u64))
    });
    add(16, "   reopen (recovery) time (ms)".into(), &|r| format!("{:.1}", r.reopen_ms));

    let w0 = rows.values().map(|(l, _)| l.len()).max().unwrap_or(10);
    let wc: Vec<usize> = (0..rs.len())
        .map(|i| {
            rows.values()
                .map(|(_, c)| c[i].len())
                .chain(std::iter::once(rs[i].store.len()))
                .max()
                .unwrap()
        })
        .collect();
    let mut hdr = format!("| {:<w0$} |", "metric");
    let mut sep = format!("|{}|", "-".repeat(w0 + 2));
    for (i, r) in rs.iter().enumerate() {
        hdr += &format!(" {:>w$} |", r.store, w = wc[i]);
        sep += &format!("{}:|", "-".repeat(wc[i] + 1));
    }
    println!("{hdr}\n{sep}");
    for (label, cells) in rows.values() {
        let mut line = format!("| {:<w0$} |", label);
        for (i, c) in cells.iter().enumerate() {
            line += &format!(" {:>w$} |", c, w = wc[i]);
        }
        println!("{line}");
    }
}

fn json_line(cfg: &Config, r: &Results) -> String {
    format!(
        concat!(
            "{{\"store\":\"{}\",\"version\":\"{}\",\"events\":{},\"batch\":{},",
            "\"single_writes\":{},\"single_write_p50_us\":{:.1},\"single_write_p99_us\":{:.1},",
            "\"single_writes_per_s\":{:.1},",
            "\"group_commit_events_per_s\":{:.1},\"group_commit_p50_us\":{:.1},\"group_commit_p99_us\":{:.1},",
            "\"reads\":{},\"read_fresh_p50_ns\":{:.0},\"read_fresh_p99_ns\":{:.0},",
            "\"read_snapshot_p50_ns\":{:.0},\"read_snapshot_p99_ns\":{:.0},",
            "\"mixed_reads\":{},\"mixed_read_p50_ns\":{:.0},\"mixed_read_p99_ns\":{:.0},",
            "\"mixed_read_p999_ns\":{:.0},\"mixed_read_max_ns\":{:.0},\"mixed_writer_events_per_s\":{:.1},",
            "\"total_keys\":{},\"disk_bytes\":{},\"disk_allocated_bytes\":{},\"disk_files\":{},\"reopen_ms\":{:.2}}}"
        ),
        r.store,
        r.version,
        cfg.events,
        cfg.batch,
        r.single_n,
        r.single_us.p50,
        r.single_us.p99,
        r.single_wps,
        r.group_eps,
        r.group_commit_us.p50,
        r.group_commit_us.p99,
        cfg.reads,
        r.read_fresh_ns.p50,
        r.read_fresh_ns.p99,
        r.read_snap_ns.p50,
        r.read_snap_ns.p99,
        r.mixed_reads,
        r.mixed_read_ns.p50,
        r.mixed_read_ns.p99,
        r.mixed_read_ns.p999,
        r.mixed_read_ns.max,
        r.mixed_write_eps,
        r.total_keys,
        r.disk_apparent,
        r.disk_allocated,
        r.disk_files,
        r.reopen_ms,
    )
}

fn main() {
    let cfg = parse_args();
    let probe = cfg.base_dir.clone().unwrap_or_else(std::env::temp_dir);
    println!(
        "kv-choice: events={} batch={} reads={} value={}B key=16B cache={} dir={} (fs: {}) cores={}",
        cfg.events,
        cfg.batch,
        cfg.reads,
        VALUE_LEN,
        match CACHE_MIB.load(Ordering::Relaxed) {
            0 => "library defaults (redb 1 GiB, fjall 32 MiB)".to_string(),
            m => format!("{m} MiB each"),
        },
        probe.display(),
        fs_type(&probe),
        thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    if fs_type(&probe) == "tmpfs" {
        eprintln!("WARNING: temp dir is on tmpfs; fsync is a no-op there. Use --dir on a real disk.");
    }

    let runs: [(&'static str, &'static str, fn(&Path) -> Res<Box<dyn Store>>); 2] = [
        ("redb", "4.6.0", open_redb),
        ("fjall", "3.1.13", open_fjall),
    ];
    let mut results = Vec::new();
    for (name, ver, open) in runs {
        match run_one(name, ver, &cfg, open) {
            Ok(r) => results.push(r),
            Err(e) => {
                eprintln!("{name}: benchmark failed: {e}");
                std::process::exit(1);
            }
        }
    }
    println!();
    print_table(&cfg, &results);
    println!();
    for r in &results {
        println!("{}", json_line(&cfg, r));
    }
}
