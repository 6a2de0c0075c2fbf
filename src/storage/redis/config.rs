//! Where the Redis backend connects: parsed from a `backends.*` value.
//!
//! - `redis://[user:password@]host:port[/db]` (or `rediss://` for TLS): one server;
//! - `redis+cluster://host1:port1,host2:port2,...`: a Redis Cluster, reached through any
//!   of the listed nodes (the others are discovered); cluster mode has database 0 only.
//!
//! Either form may end in `?prefix=NAME`: every key starts with `NAME`, so several
//! deployments (or test runs) can share one server. A prefix must not contain `{` or `}`
//! (they would change the hash slot of a key).

use std::fmt;
use std::time::Duration;

use crate::config::BreakerSettings;

/// A parsed Redis backend location.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// Connection URLs: one for a single server, one per seed node for a cluster.
    pub nodes: Vec<String>,
    pub cluster: bool,
    /// Prepended to every key.
    pub prefix: String,
    /// Deadline of every call (connecting included); past it the call fails with
    /// `StorageError::Unavailable`.
    pub timeout: Duration,
    /// When the circuit breaker opens and how long it stays open before it probes
    /// (`[breaker]`; the defaults unless set after parsing).
    pub breaker: BreakerSettings,
}

/// Shows the nodes without any password.
impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nodes: Vec<String> = self.nodes.iter().map(|n| redact(n)).collect();
        f.debug_struct("RedisConfig")
            .field("nodes", &nodes)
            .field("cluster", &self.cluster)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("breaker", &self.breaker)
            .finish()
    }
}

const CLUSTER_SCHEME: &str = "redis+cluster://";

/// Whether `value` names a Redis backend (whether or not it is well formed).
pub fn is_redis_url(value: &str) -> bool {
    value.starts_with("redis://")
        || value.starts_with("rediss://")
        || value.starts_with(CLUSTER_SCHEME)
}

impl RedisConfig {
    /// Parses a backend value; the error says what is wrong without echoing a password.
    pub fn parse(value: &str, timeout: Duration) -> Result<RedisConfig, String> {
        let (location, prefix) = match value.split_once('?') {
            Some((location, query)) => (location, parse_query(query)?),
            None => (value, String::new()),
        };
        if prefix.contains(['{', '}']) {
            return Err("the key prefix must not contain '{' or '}'".into());
        }
        if timeout.is_zero() {
            return Err("the backend timeout must be above 0".into());
        }
        let (nodes, cluster) = if let Some(hosts) = location.strip_prefix(CLUSTER_SCHEME) {
            let nodes: Vec<String> = hosts
                .split(',')
                .map(str::trim)
                .filter(|h| !h.is_empty())
                .map(|h| format!("redis://{h}"))
                .collect();
            if nodes.is_empty() {
                return Err("a cluster URL needs at least one host:port".into());
            }
            (nodes, true)
        } else if location.starts_with("redis://") || location.starts_with("rediss://") {
            (vec![location.to_owned()], false)
        } else {
            return Err("a Redis URL starts with redis://, rediss:// or redis+cluster://".into());
        };
        for node in &nodes {
            redis::IntoConnectionInfo::into_connection_info(node.as_str())
                .map_err(|_| format!("'{}' is not a valid Redis URL", redact(node)))?;
        }
        Ok(RedisConfig {
            nodes,
            cluster,
            prefix,
            timeout,
            breaker: BreakerSettings::default(),
        })
    }
}

fn parse_query(query: &str) -> Result<String, String> {
    let mut prefix = String::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("prefix", value)) => prefix = value.to_owned(),
            _ => return Err(format!("unknown parameter '{pair}' (only prefix=...)")),
        }
    }
    Ok(prefix)
}

/// The URL with any password replaced by `***`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((credentials, host)) => match credentials.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => format!("{scheme}://***@{host}"),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_millis(500);

    #[test]
    fn parses_single_and_cluster_urls() {
        let single = RedisConfig::parse("redis://127.0.0.1:6379/2", T).expect("single");
        assert_eq!(single.nodes, vec!["redis://127.0.0.1:6379/2"]);
        assert!(!single.cluster);
        assert_eq!(single.prefix, "");

        let cluster = RedisConfig::parse("redis+cluster://h1:7000, h2:7001?prefix=staging:", T)
            .expect("cluster");
        assert_eq!(cluster.nodes, vec!["redis://h1:7000", "redis://h2:7001"]);
        assert!(cluster.cluster);
        assert_eq!(cluster.prefix, "staging:");
    }

    #[test]
    fn refuses_bad_values_without_echoing_passwords() {
        for (value, expect) in [
            ("http://h:1", "starts with redis://"),
            ("redis+cluster://", "at least one host"),
            ("redis://h:1?prefix={x}", "must not contain"),
            ("redis://h:1?db=2", "unknown parameter"),
            ("redis://user:secret@:bad:port", "not a valid Redis URL"),
        ] {
            let err = RedisConfig::parse(value, T).expect_err(value);
            assert!(err.contains(expect), "{value}: {err}");
            assert!(!err.contains("secret"), "{value}: {err}");
        }
        let config = RedisConfig::parse("redis://user:secret@h:1", T).expect("password");
        assert!(!format!("{config:?}").contains("secret"));
    }
}
