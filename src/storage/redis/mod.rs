//! The Redis backend (cargo feature `redis`): [`ProfileStore`] with its
//! [`DataKeyStore`], [`FeatureStore`], [`SegmentStore`], [`BanditStore`], the shared side
//! of [`DecisionStore`], and the catalog every replica must agree on (content,
//! definitions, experiment totals, API keys) on one Redis server or a Redis Cluster.
//!
//! - `config.rs`: the `redis://` / `redis+cluster://` values of `backends.*`;
//! - `breaker.rs`: the circuit breaker every call goes through;
//! - `profiles.rs`, `features.rs` (with `claims.rs`, the event ids workers read),
//!   `segments.rs`, `bandit.rs`, `decisions.rs`, `catalog.rs`: one capability each, with
//!   its key layout;
//! - `tests.rs`: the conformance suites against real servers.
//!
//! Keys carry a hash tag (`{...}`) so that everything one write must change atomically
//! lives in one cluster slot: a customer's features and segment list, one segment's
//! members, one (placement, arm)'s statistics. Writes that must be atomic are one Lua
//! script or one `MULTI` on that slot.
//!
//! Every call runs under the configured deadline ([`RedisConfig::timeout`]); past it the
//! call fails with [`StorageError::Unavailable`] and the command may still take effect
//! (the storage contract allows that for a dropped write). Every call goes through the
//! connection's circuit breaker ([`breaker`]): after repeated failures calls fail at once
//! with `Unavailable` until a probe reaches the server again. The connection itself is
//! made by the first call that needs it ([`RedisStore::open`] does not wait for one), so
//! a server that is down when Tailor starts fails calls, not the start.
//!
//! Durability is the server's: `Ok` means Redis acknowledged the write; it survives a
//! restart only as far as the server's persistence (`appendonly yes`, `appendfsync`) and
//! replication are configured to keep it.

mod bandit;
mod breaker;
mod catalog;
mod claims;
pub mod config;
mod decisions;
mod features;
mod profiles;
mod segments;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisError, RedisFuture, Value};

pub use self::bandit::RedisBandit;
use self::breaker::{Admission, Breaker};
pub use self::catalog::{
    RedisContent, RedisDefinitions, RedisExperiments, RedisJournal, RedisKeys,
};
pub use self::claims::RedisClaims;
pub use self::config::RedisConfig;
pub use self::decisions::{RedisDecisions, SHARED_DECISION_DAYS};
pub use self::features::RedisFeatures;
pub use self::profiles::{RedisDataKeys, RedisProfiles};
pub use self::segments::RedisSegments;
use crate::storage::health::BreakerStats;
use crate::storage::{DataKeyStore, DecisionStore, StorageError, StorageResult};

/// One connection to a server or a cluster, shared by the capabilities that use it.
///
/// Both kinds multiplex concurrent calls over their sockets and reconnect on their own,
/// so a clone per call is cheap and calls never queue behind each other.
#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(cmd, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

/// A Redis backend; [`RedisStore::features`] and friends give its capabilities.
pub struct RedisStore {
    link: Arc<Link>,
    prefix: String,
    timeout: Duration,
    breaker: Arc<Breaker>,
}

/// The connection, made by the first call that needs it: a server that is down when the
/// store opens fails that call (and the breaker counts it), not the store.
struct Link {
    config: RedisConfig,
    /// Set once connected; both kinds reconnect on their own after that.
    connection: tokio::sync::OnceCell<Connection>,
}

impl Link {
    /// The connection, connecting first if no call has yet (concurrent callers wait for
    /// one attempt; the next caller tries again after a failed one).
    async fn get(&self) -> Result<Connection, RedisError> {
        self.connection
            .get_or_try_init(|| self.connect())
            .await
            .cloned()
    }

    async fn connect(&self) -> Result<Connection, RedisError> {
        let config = &self.config;
        if config.cluster {
            let client = redis::cluster::ClusterClientBuilder::new(config.nodes.clone())
                .connection_timeout(config.timeout)
                .response_timeout(config.timeout)
                .build()?;
            Ok(Connection::Cluster(client.get_async_connection().await?))
        } else {
            let client = redis::Client::open(config.nodes[0].as_str())?;
            // No retry inside the manager: its first retry waits a second (more than a
            // call's deadline), so a refused connection would cost every call its whole
            // deadline; the next call (or the breaker's probe) tries again instead.
            let manager = ConnectionManagerConfig::new()
                .set_connection_timeout(config.timeout)
                .set_response_timeout(config.timeout)
                .set_number_of_retries(0);
            Ok(Connection::Single(
                ConnectionManager::new_with_config(client, manager).await?,
            ))
        }
    }
}

impl RedisStore {
    /// Connects (within the configured deadline) and checks that the server answers:
    /// for callers that cannot do without the server (the `tailor keys` commands).
    pub async fn connect(config: &RedisConfig) -> StorageResult<Arc<RedisStore>> {
        let store = Self::new(config);
        store.ping().await?;
        Ok(store)
    }

    /// The store, whether or not the server answers now: what a serving engine opens,
    /// so that it starts during an outage (its calls then fail fast through the
    /// breaker). A server that answers with an error (a wrong password, say) is still
    /// an error here.
    pub async fn open(config: &RedisConfig) -> StorageResult<Arc<RedisStore>> {
        let store = Self::new(config);
        match store.ping().await {
            Ok(()) => {}
            Err(StorageError::Unavailable(e)) => {
                tracing::warn!(error = %e, "Redis is unreachable; starting without it, calls fail fast until it answers");
            }
            Err(e) => return Err(e),
        }
        Ok(store)
    }

    fn new(config: &RedisConfig) -> Arc<RedisStore> {
        Arc::new(RedisStore {
            link: Arc::new(Link {
                config: config.clone(),
                connection: tokio::sync::OnceCell::new(),
            }),
            prefix: config.prefix.clone(),
            timeout: config.timeout,
            breaker: Arc::new(Breaker::new(&config.breaker)),
        })
    }

    async fn ping(&self) -> StorageResult<()> {
        self.call("PING", |mut c| async move {
            redis::cmd("PING").query_async::<()>(&mut c).await
        })
        .await
    }

    pub fn profiles(self: &Arc<Self>) -> RedisProfiles {
        RedisProfiles::new(self.clone())
    }

    /// Data keys and erasure markers shared by every process; this process's position
    /// in the privacy journal stays in `local`.
    pub fn data_keys(self: &Arc<Self>, local: Arc<dyn DataKeyStore>) -> RedisDataKeys {
        RedisDataKeys::new(self.clone(), local)
    }

    pub fn features(self: &Arc<Self>) -> RedisFeatures {
        RedisFeatures::new(self.clone())
    }

    /// The event ids the workers read, beside the features.
    pub fn claims(self: &Arc<Self>) -> RedisClaims {
        RedisClaims::new(self.clone())
    }

    pub fn segments(self: &Arc<Self>) -> RedisSegments {
        RedisSegments::new(self.clone())
    }

    pub fn bandit(self: &Arc<Self>) -> RedisBandit {
        RedisBandit::new(self.clone())
    }

    pub fn content(self: &Arc<Self>) -> RedisContent {
        RedisContent::new(self.clone())
    }

    pub fn definitions(self: &Arc<Self>) -> RedisDefinitions {
        RedisDefinitions::new(self.clone())
    }

    pub fn experiments(self: &Arc<Self>) -> RedisExperiments {
        RedisExperiments::new(self.clone())
    }

    pub fn keys(self: &Arc<Self>) -> RedisKeys {
        RedisKeys::new(self.clone())
    }

    pub fn journal(self: &Arc<Self>) -> RedisJournal {
        RedisJournal::new(self.clone())
    }

    /// Decisions shared between replicas, each also kept in `local` (the replica's own
    /// decision log).
    pub fn decisions(self: &Arc<Self>, local: Arc<dyn DecisionStore>) -> RedisDecisions {
        RedisDecisions::new(self.clone(), local)
    }

    /// What this connection's circuit breaker has seen (for metrics).
    pub fn breaker_stats(&self) -> Arc<BreakerStats> {
        self.breaker.stats()
    }

    fn is_cluster(&self) -> bool {
        self.link.config.cluster
    }

    /// `<prefix><kind>:{<tag>}`: the braces make `tag` alone choose the cluster slot.
    fn key(&self, kind: &str, tag: &str) -> String {
        format!("{}{kind}:{{{tag}}}", self.prefix)
    }

    /// Runs one exchange with the server under the deadline, unless the circuit breaker
    /// is open: then it fails at once without touching the network.
    async fn call<T, F, Fut>(&self, what: &str, exchange: F) -> StorageResult<T>
    where
        F: FnOnce(Connection) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        match self.breaker.admit() {
            Admission::Call => {}
            admission => {
                if admission == Admission::RefuseAndProbe {
                    self.probe();
                }
                return Err(StorageError::Unavailable(format!(
                    "Redis {what}: not called, the circuit breaker is open after repeated failures"
                )));
            }
        }
        let reached = async {
            let connection = self.link.get().await?;
            exchange(connection).await
        };
        let result = match tokio::time::timeout(self.timeout, reached).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(redis_err(what, e)),
            Err(_) => Err(StorageError::Unavailable(format!(
                "Redis {what}: no answer within {:?}",
                self.timeout
            ))),
        };
        match &result {
            Err(StorageError::Unavailable(_)) => self.breaker.failed(),
            _ => self.breaker.succeeded(),
        }
        result
    }

    /// Starts the breaker's probe: one `PING` under the call deadline, on its own task.
    fn probe(&self) {
        let breaker = self.breaker.clone();
        let link = self.link.clone();
        let timeout = self.timeout;
        let ping = async move {
            let answer = tokio::time::timeout(timeout, async {
                let mut connection = link.get().await?;
                redis::cmd("PING").query_async::<()>(&mut connection).await
            })
            .await;
            breaker.probed(matches!(answer, Ok(Ok(()))));
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(ping);
            }
            // Calls run on the runtime; without one, the probe counts as failed and the
            // next call after the cool-down tries again.
            Err(_) => self.breaker.probed(false),
        }
    }
}

/// Connection trouble, and a server still loading its data after a restart, is
/// `Unavailable` (callers may degrade); anything else, such as a script error, is
/// `Backend`.
fn redis_err(what: &str, e: RedisError) -> StorageError {
    if e.is_io_error()
        || e.kind() == redis::ErrorKind::BusyLoadingError
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_cluster_error()
    {
        StorageError::Unavailable(format!("Redis {what}: {e}"))
    } else {
        StorageError::Backend(format!("Redis {what}: {e}"))
    }
}

/// Parses a number that Redis stored as text (`HINCRBYFLOAT` results).
fn stored_f64(what: &str, raw: &str) -> StorageResult<f64> {
    raw.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
        .ok_or_else(|| StorageError::Corrupt(format!("{what}: {raw:?} is not a finite number")))
}
