//! What a scaled-out backend reports about its own health, for metrics: its circuit
//! breaker's state and how many calls reached the network or were refused without it.
//!
//! The backend updates a [`BreakerStats`]; telemetry reads it when metrics are scraped
//! (`tailor_backend_breaker_open`, `tailor_backend_calls_total`,
//! `tailor_backend_short_circuited_total`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Counters of one backend connection's circuit breaker. Relaxed atomics: each value is
/// read on its own, and a scrape may see one a call ahead of another.
#[derive(Debug, Default)]
pub struct BreakerStats {
    open: AtomicBool,
    /// Whether the last call (or probe) that tried the backend reached it; false until
    /// one has.
    reachable: AtomicBool,
    calls_ok: AtomicU64,
    calls_failed: AtomicU64,
    short_circuited: AtomicU64,
}

impl BreakerStats {
    /// Whether calls are refused without reaching the backend (open or probing).
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Relaxed)
    }

    /// Whether the last call (or probe) that tried the backend reached it: what
    /// `/readyz` reports. False before any call has.
    pub fn is_reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    /// Calls that reached the backend and got an answer (a server error is an answer).
    pub fn calls_ok(&self) -> u64 {
        self.calls_ok.load(Ordering::Relaxed)
    }

    /// Calls (probes included) that tried the backend and could not reach it in time.
    pub fn calls_failed(&self) -> u64 {
        self.calls_failed.load(Ordering::Relaxed)
    }

    /// Calls refused at once because the breaker was open.
    pub fn short_circuited(&self) -> u64 {
        self.short_circuited.load(Ordering::Relaxed)
    }

    // Updates, by the backend that owns the breaker.

    pub fn set_open(&self, open: bool) {
        self.open.store(open, Ordering::Relaxed);
    }

    pub fn count_ok(&self) {
        self.reachable.store(true, Ordering::Relaxed);
        self.calls_ok.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_failed(&self) {
        self.reachable.store(false, Ordering::Relaxed);
        self.calls_failed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_short_circuit(&self) {
        self.short_circuited.fetch_add(1, Ordering::Relaxed);
    }
}

/// One connected scaled-out backend, as metrics label it.
#[derive(Debug, Clone)]
pub struct BackendHealth {
    /// The kind of backend (`redis`): a fixed name.
    pub backend: &'static str,
    /// The capabilities it serves, comma-separated in a fixed order
    /// (`features,segments,bandit`): a bounded label value.
    pub serves: String,
    pub breaker: Arc<BreakerStats>,
}
