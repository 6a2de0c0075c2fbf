//! The group-commit writer: one std thread owns every write transaction of the store.
//!
//! Callers send an operation (a closure over `&WriteTransaction`) and a reply channel.
//! The thread takes one operation, drains whatever else is already queued (at most
//! [`MAX_BATCH`]), runs them all in one write transaction, commits it with
//! `Durability::Immediate` (fsync) and only then replies to each: one fsync covers the
//! whole batch, which is what makes tens of thousands of durable writes per second possible.
//!
//! Atomicity per operation: an operation that returns `Err` (or panics) may have written
//! part of its effect, so the transaction is aborted, that operation alone gets its error,
//! and the rest of the batch is run again in a fresh transaction. This is why operations are
//! `Fn`: they may run more than once and must depend only on what they captured and on the
//! transaction. If the commit itself fails, every operation of the batch gets the error.
//!
//! Relaxed operations ([`Writer::submit_relaxed`]: the decision log and the counters a
//! decision bumps, which no client handed us) may skip the fsync: a batch of relaxed
//! operations only is committed with `Durability::None`, so they are visible at once and
//! on disk with the next durable commit. The thread makes that commit itself once the
//! queue has been idle for [`RELAXED_FLUSH`] after a relaxed one, so a crash loses at
//! most that much of them. Any durable operation in a batch makes the whole batch durable.
//!
//! An operation whose caller went away (its future was dropped) still runs: once sent, it
//! is as good as written. When the [`Writer`] is dropped, the thread finishes every queued
//! operation, makes relaxed commits durable, and exits; the drop waits for it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::{Database, Durability, WriteTransaction};
use tokio::sync::{mpsc, oneshot};

use super::db_err;
use crate::storage::{StorageError, StorageResult};

/// Most operations in one write transaction.
pub(super) const MAX_BATCH: usize = 1024;

/// Operations queued beyond this make callers wait (backpressure) instead of piling up.
const QUEUE_CAPACITY: usize = 16 * 1024;

/// How long relaxed commits may stay off the disk while the queue is idle.
pub(super) const RELAXED_FLUSH: Duration = Duration::from_millis(100);

/// One queued operation, its result type erased.
trait PendingOp: Send {
    /// Runs the operation in `txn`, keeping its result. After `Err`, the transaction may
    /// hold part of the operation's writes and must not be committed.
    fn run(&mut self, txn: &WriteTransaction) -> StorageResult<()>;
    /// The transaction that ran the operation is committed: sends the kept result.
    fn succeed(self: Box<Self>);
    /// Sends `error` instead.
    fn fail(self: Box<Self>, error: StorageError);
    /// Whether the caller waits for an fsync.
    fn durable(&self) -> bool;
}

struct Op<T, F> {
    op: F,
    result: Option<T>,
    reply: oneshot::Sender<StorageResult<T>>,
    durable: bool,
}

impl<T, F> PendingOp for Op<T, F>
where
    T: Send,
    F: Fn(&WriteTransaction) -> StorageResult<T> + Send,
{
    fn run(&mut self, txn: &WriteTransaction) -> StorageResult<()> {
        self.result = None;
        let outcome = catch_unwind(AssertUnwindSafe(|| (self.op)(txn)))
            .map_err(|_| StorageError::Backend("write operation panicked".into()))?;
        self.result = Some(outcome?);
        Ok(())
    }

    fn succeed(self: Box<Self>) {
        let reply = self.result.ok_or_else(|| {
            StorageError::Backend("write operation committed without a result".into())
        });
        // The caller may have gone away; its write is committed all the same.
        let _ = self.reply.send(reply);
    }

    fn fail(self: Box<Self>, error: StorageError) {
        let _ = self.reply.send(Err(error));
    }

    fn durable(&self) -> bool {
        self.durable
    }
}

/// Handle on the writer thread; see the module documentation.
pub(super) struct Writer {
    queue: Option<mpsc::Sender<Box<dyn PendingOp>>>,
    thread: Option<JoinHandle<()>>,
    commits: Arc<AtomicU64>,
}

impl Writer {
    pub(super) fn start(db: Arc<Database>) -> std::io::Result<Writer> {
        let (queue, ops) = mpsc::channel(QUEUE_CAPACITY);
        let commits = Arc::new(AtomicU64::new(0));
        let thread_commits = commits.clone();
        let thread = std::thread::Builder::new()
            .name("tailor-redb-writer".into())
            .spawn(move || run(&db, ops, &thread_commits))?;
        Ok(Writer {
            queue: Some(queue),
            thread: Some(thread),
            commits,
        })
    }

    /// Queues `op` and waits until the transaction that ran it is durably committed.
    pub(super) async fn submit<T, F>(&self, op: F) -> StorageResult<T>
    where
        T: Send + 'static,
        F: Fn(&WriteTransaction) -> StorageResult<T> + Send + 'static,
    {
        self.queue_op(op, true).await
    }

    /// Queues `op` and waits until the transaction that ran it is committed, durably or
    /// not: on disk within [`RELAXED_FLUSH`] of an idle queue.
    pub(super) async fn submit_relaxed<T, F>(&self, op: F) -> StorageResult<T>
    where
        T: Send + 'static,
        F: Fn(&WriteTransaction) -> StorageResult<T> + Send + 'static,
    {
        self.queue_op(op, false).await
    }

    async fn queue_op<T, F>(&self, op: F, durable: bool) -> StorageResult<T>
    where
        T: Send + 'static,
        F: Fn(&WriteTransaction) -> StorageResult<T> + Send + 'static,
    {
        let stopped = || StorageError::Unavailable("the embedded store writer has stopped".into());
        let queue = self.queue.as_ref().ok_or_else(stopped)?;
        let (reply, result) = oneshot::channel();
        let pending: Box<dyn PendingOp> = Box::new(Op {
            op,
            result: None,
            reply,
            durable,
        });
        queue.send(pending).await.map_err(|_| stopped())?;
        result.await.map_err(|_| {
            StorageError::Backend("the embedded store writer stopped before replying".into())
        })?
    }

    /// Write transactions committed so far (tests and diagnostics).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(super) fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Closing the queue ends the thread's loop once everything queued is done.
        self.queue = None;
        if let Some(thread) = self.thread.take() {
            if thread.thread().id() != std::thread::current().id() && thread.join().is_err() {
                tracing::error!("the embedded store writer thread panicked");
            }
        }
    }
}

/// The writer thread: batches until the queue is closed and empty, then makes what is
/// relaxed durable.
fn run(db: &Database, mut ops: mpsc::Receiver<Box<dyn PendingOp>>, commits: &AtomicU64) {
    // Only to wait for the next operation with a deadline.
    let clock = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(clock) => Some(clock),
        Err(e) => {
            tracing::error!(error = %e, "the writer cannot wait with a deadline: every commit is durable");
            None
        }
    };
    let mut batch: Vec<Box<dyn PendingOp>> = Vec::with_capacity(MAX_BATCH);
    // When the oldest relaxed commit not yet on disk was made.
    let mut unflushed: Option<Instant> = None;
    loop {
        let first = match (unflushed, &clock) {
            (Some(since), Some(clock)) => {
                let left = RELAXED_FLUSH.saturating_sub(since.elapsed());
                match clock.block_on(async { tokio::time::timeout(left, ops.recv()).await }) {
                    Ok(next) => next,
                    Err(_) => {
                        if flush(db, commits) {
                            unflushed = None;
                        }
                        continue;
                    }
                }
            }
            _ => ops.blocking_recv(),
        };
        let Some(first) = first else { break };
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match ops.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        // Past the flush deadline under a steady stream of relaxed writes, this batch
        // is the durable commit.
        let overdue = unflushed.is_some_and(|since| since.elapsed() >= RELAXED_FLUSH);
        let durable = clock.is_none() || overdue || batch.iter().any(|op| op.durable());
        if commit_batch(db, &mut batch, commits, durable) {
            if durable {
                unflushed = None;
            } else {
                unflushed.get_or_insert_with(Instant::now);
            }
        }
    }
    if unflushed.is_some() {
        flush(db, commits);
    }
}

/// An empty durable commit: what relaxed commits before it wrote is on disk. `false`
/// (logged) when it failed.
fn flush(db: &Database, commits: &AtomicU64) -> bool {
    let flushed = begin(db, true).and_then(|txn| txn.commit().map_err(db_err));
    match flushed {
        Ok(()) => {
            commits.fetch_add(1, Ordering::Relaxed);
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, "Failed to make relaxed writes durable; trying again");
            false
        }
    }
}

/// Runs `batch` in one transaction and commits it (with an fsync when `durable`),
/// replying to every operation; leaves `batch` empty. `true` when something committed.
fn commit_batch(
    db: &Database,
    batch: &mut Vec<Box<dyn PendingOp>>,
    commits: &AtomicU64,
    durable: bool,
) -> bool {
    let mut committed = false;
    'attempt: while !batch.is_empty() {
        let txn = match begin(db, durable) {
            Ok(txn) => txn,
            Err(e) => {
                fail_all(batch, &e);
                return committed;
            }
        };
        for i in 0..batch.len() {
            if let Err(e) = batch[i].run(&txn) {
                // The failed operation may have written part of its effect: drop all of it
                // and run the others again without it.
                if let Err(abort) = txn.abort() {
                    tracing::warn!(error = %abort, "aborting a write transaction failed");
                }
                batch.remove(i).fail(e);
                continue 'attempt;
            }
        }
        match txn.commit() {
            Ok(()) => {
                commits.fetch_add(1, Ordering::Relaxed);
                committed = true;
                for op in batch.drain(..) {
                    op.succeed();
                }
            }
            Err(e) => fail_all(batch, &db_err(e)),
        }
    }
    committed
}

fn begin(db: &Database, durable: bool) -> StorageResult<WriteTransaction> {
    let mut txn = db.begin_write().map_err(db_err)?;
    // Immediate is the default, but the whole contract rests on it: `Ok` of a durable
    // operation means fsynced.
    txn.set_durability(if durable {
        Durability::Immediate
    } else {
        Durability::None
    })
    .map_err(db_err)?;
    Ok(txn)
}

/// Replies `error` to every operation of the batch.
fn fail_all(batch: &mut Vec<Box<dyn PendingOp>>, error: &StorageError) {
    for op in batch.drain(..) {
        op.fail(copy_error(error));
    }
}

fn copy_error(error: &StorageError) -> StorageError {
    match error {
        StorageError::Unavailable(m) => StorageError::Unavailable(m.clone()),
        StorageError::Corrupt(m) => StorageError::Corrupt(m.clone()),
        StorageError::Backend(m) => StorageError::Backend(m.clone()),
    }
}
