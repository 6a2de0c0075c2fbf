//! The circuit breaker in front of every call to one Redis connection.
//!
//! - **closed**: calls go through. A call that cannot reach the server (refused,
//!   dropped, past its deadline, or a server still loading its data) is a failure,
//!   anything else (an answer, even an error reply) a success that resets the count. `failure_threshold` consecutive failures
//!   open the breaker.
//! - **open**: calls fail at once with `Unavailable`, without touching the network, so
//!   a dead or stalled server costs callers nothing and is not hammered.
//! - **probing** (half-open): once `cool_down` has passed, the next call starts one
//!   probe (a `PING` under the call deadline, on its own task) and still fails at once
//!   itself; every call fails at once while the probe runs. The probe's success closes
//!   the breaker, its failure opens it for another `cool_down`.
//!
//! The probe is the breaker's own `PING` rather than a caller's command, so no caller
//! waits on a server that may be dead, and a caller that stops waiting (a decision's
//! feature deadline is far shorter than the call deadline) cannot cancel the probe.
//!
//! A caller that stops waiting does not count either way: only the call deadline
//! (`timeouts.backend_ms`) decides that the server is too slow.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::BreakerSettings;
use crate::storage::health::BreakerStats;

/// What the breaker lets a call do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Admission {
    /// Go ahead.
    Call,
    /// Fail at once.
    Refuse,
    /// Fail at once, and start the probe (this caller is the first after the cool-down).
    RefuseAndProbe,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    Probing,
}

pub(super) struct Breaker {
    threshold: u32,
    cool_down: Duration,
    /// A std mutex: held for a few instructions, never across an await.
    state: std::sync::Mutex<State>,
    stats: Arc<BreakerStats>,
}

impl Breaker {
    pub(super) fn new(settings: &BreakerSettings) -> Self {
        Breaker {
            threshold: settings.failure_threshold.max(1),
            cool_down: settings.cool_down(),
            state: std::sync::Mutex::new(State::Closed { failures: 0 }),
            stats: Arc::new(BreakerStats::default()),
        }
    }

    pub(super) fn stats(&self) -> Arc<BreakerStats> {
        self.stats.clone()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is a plain value, valid whatever a panicking holder was doing.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a call may go to the server now.
    pub(super) fn admit(&self) -> Admission {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Admission {
        let mut state = self.state();
        let admission = match *state {
            State::Closed { .. } => Admission::Call,
            State::Open { until } if now >= until => {
                *state = State::Probing;
                Admission::RefuseAndProbe
            }
            State::Open { .. } | State::Probing => Admission::Refuse,
        };
        if admission != Admission::Call {
            self.stats.count_short_circuit();
        }
        admission
    }

    /// The server answered an admitted call.
    pub(super) fn succeeded(&self) {
        self.stats.count_ok();
        let mut state = self.state();
        if let State::Closed { failures } = &mut *state {
            *failures = 0;
        }
        // Open or probing: a late answer to a call admitted before the breaker opened
        // says little about now; the probe decides.
    }

    /// An admitted call could not reach the server in time.
    pub(super) fn failed(&self) {
        self.failed_at(Instant::now());
    }

    fn failed_at(&self, now: Instant) {
        self.stats.count_failed();
        let mut state = self.state();
        if let State::Closed { failures } = &mut *state {
            *failures += 1;
            if *failures >= self.threshold {
                *state = State::Open {
                    until: now + self.cool_down,
                };
                self.stats.set_open(true);
                tracing::warn!(
                    failures = self.threshold,
                    cool_down = ?self.cool_down,
                    "Redis circuit breaker opened: calls fail fast until a probe succeeds"
                );
            }
        }
    }

    /// The probe's result: closes the breaker, or opens it for another cool-down.
    pub(super) fn probed(&self, reached: bool) {
        self.probed_at(reached, Instant::now());
    }

    fn probed_at(&self, reached: bool, now: Instant) {
        if reached {
            self.stats.count_ok();
        } else {
            self.stats.count_failed();
        }
        let mut state = self.state();
        if *state != State::Probing {
            return;
        }
        if reached {
            *state = State::Closed { failures: 0 };
            self.stats.set_open(false);
            tracing::info!("Redis circuit breaker closed: the probe reached the server");
        } else {
            *state = State::Open {
                until: now + self.cool_down,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(threshold: u32, cool_down_ms: u64) -> Breaker {
        Breaker::new(&BreakerSettings {
            failure_threshold: threshold,
            cool_down_ms,
        })
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let b = breaker(3, 1_000);
        let now = Instant::now();
        b.failed_at(now);
        b.failed_at(now);
        b.succeeded();
        b.failed_at(now);
        b.failed_at(now);
        assert_eq!(
            b.admit_at(now),
            Admission::Call,
            "a success resets the count"
        );
        assert!(!b.stats().is_open());
        b.failed_at(now);
        assert!(b.stats().is_open());
        assert_eq!(b.admit_at(now), Admission::Refuse);
        assert_eq!(b.stats().short_circuited(), 1);
        assert_eq!((b.stats().calls_ok(), b.stats().calls_failed()), (1, 5));
    }

    #[test]
    fn probes_once_per_cool_down_and_closes_on_success() {
        let b = breaker(1, 1_000);
        let t0 = Instant::now();
        b.failed_at(t0);
        assert_eq!(
            b.admit_at(t0 + Duration::from_millis(999)),
            Admission::Refuse
        );
        let after = t0 + Duration::from_millis(1_000);
        assert_eq!(b.admit_at(after), Admission::RefuseAndProbe);
        assert_eq!(b.admit_at(after), Admission::Refuse, "one probe at a time");

        // A failed probe opens it for another cool-down from the probe's end.
        let probe_end = after + Duration::from_millis(50);
        b.probed_at(false, probe_end);
        assert!(b.stats().is_open());
        assert_eq!(
            b.admit_at(after + Duration::from_millis(1_000)),
            Admission::Refuse
        );
        assert_eq!(
            b.admit_at(probe_end + Duration::from_millis(1_000)),
            Admission::RefuseAndProbe
        );
        b.probed_at(true, probe_end + Duration::from_millis(1_001));
        assert!(!b.stats().is_open());
        assert_eq!(
            b.admit_at(probe_end + Duration::from_millis(1_002)),
            Admission::Call
        );
    }

    #[test]
    fn late_answers_do_not_close_an_open_breaker() {
        let b = breaker(1, 1_000);
        let now = Instant::now();
        b.failed_at(now);
        b.succeeded();
        assert_eq!(b.admit_at(now), Admission::Refuse);
        // Nor does a probe result arrive without a probe.
        b.probed_at(true, now);
        assert_eq!(b.admit_at(now), Admission::Refuse);
    }
}
