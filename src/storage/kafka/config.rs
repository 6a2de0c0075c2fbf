//! Where the Kafka backend connects: parsed from `backends.events`.
//!
//! `kafka://host:port[,host2:port2...][?topic_prefix=tailor.&group=tailor-workers&partitions=3&replication=1&retention_hours=168&dedup_window_secs=3600]`
//!
//! - `topic_prefix` (default `tailor.`): the topics are `<prefix>events`,
//!   `<prefix>decisions` and `<prefix>outcomes`;
//! - `group` (default `tailor-workers`): the consumer group of the workers;
//! - `partitions`, `replication` (default 3 and 1): used only to create a topic that does
//!   not exist yet; existing topics are left as they are;
//! - `retention_hours` (default 168, a week): the `retention.ms` of the topics Tailor
//!   creates. It bounds how long an erased customer's records stay on the broker (it
//!   cannot delete single records), and it must outlast the longest time the workers may
//!   be stopped: an event the broker drops before a worker read it is lost. A topic that
//!   already exists keeps its own; a process warns when that is longer, or forever;
//! - `dedup_window_secs` (default 3600; 0 turns it off): how long the workers remember,
//!   for one another, the event ids they read (on the Redis of `backends.features`), so
//!   that a second copy of an event is dropped by whichever worker it reaches. Each key
//!   costs Redis about 100 bytes for the window: at 1,000 events/s, an hour is ~360 MB.

use std::fmt;

/// Default topic prefix.
pub const DEFAULT_TOPIC_PREFIX: &str = "tailor.";
/// Default consumer group of the workers.
pub const DEFAULT_GROUP: &str = "tailor-workers";
/// Default of `dedup_window_secs`: an hour.
pub const DEFAULT_DEDUP_WINDOW_SECS: u64 = 3600;
/// Default of `retention_hours`: a week (Kafka's own default).
pub const DEFAULT_RETENTION_HOURS: u64 = 168;

const SCHEME: &str = "kafka://";

/// A parsed Kafka backend location.
#[derive(Clone, PartialEq, Eq)]
pub struct KafkaConfig {
    /// `host:port` of each bootstrap broker.
    pub brokers: Vec<String>,
    pub topic_prefix: String,
    pub group: String,
    pub partitions: i32,
    pub replication: i32,
    /// The retention of the topics this process creates, in hours.
    pub retention_hours: u64,
    /// How long workers remember an event id for one another; 0: not at all.
    pub dedup_window_secs: u64,
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("topic_prefix", &self.topic_prefix)
            .field("group", &self.group)
            .field("partitions", &self.partitions)
            .field("replication", &self.replication)
            .field("retention_hours", &self.retention_hours)
            .field("dedup_window_secs", &self.dedup_window_secs)
            .finish()
    }
}

/// Whether `value` names a Kafka backend (whether or not it is well formed).
pub fn is_kafka_url(value: &str) -> bool {
    value.starts_with(SCHEME)
}

impl KafkaConfig {
    /// Parses a backend value; the error says which part is wrong.
    pub fn parse(value: &str) -> Result<KafkaConfig, String> {
        let rest = value
            .strip_prefix(SCHEME)
            .ok_or_else(|| "a Kafka URL starts with kafka://".to_string())?;
        let (hosts, query) = match rest.split_once('?') {
            Some((hosts, query)) => (hosts, Some(query)),
            None => (rest, None),
        };
        let mut brokers = Vec::new();
        for host in hosts.split(',').map(str::trim) {
            if host.is_empty() {
                continue;
            }
            let valid = host.rsplit_once(':').is_some_and(|(name, port)| {
                !name.is_empty()
                    && !name.contains(['/', '@'])
                    && port.parse::<u16>().is_ok_and(|p| p > 0)
            });
            if !valid {
                return Err(format!("'{host}' is not a host:port"));
            }
            brokers.push(host.to_owned());
        }
        if brokers.is_empty() {
            return Err("a Kafka URL needs at least one host:port".into());
        }
        let mut config = KafkaConfig {
            brokers,
            topic_prefix: DEFAULT_TOPIC_PREFIX.into(),
            group: DEFAULT_GROUP.into(),
            partitions: 3,
            replication: 1,
            retention_hours: DEFAULT_RETENTION_HOURS,
            dedup_window_secs: DEFAULT_DEDUP_WINDOW_SECS,
        };
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let Some((key, value)) = pair.split_once('=') else {
                return Err(format!("parameter '{pair}' has no value"));
            };
            match key {
                "topic_prefix" => {
                    if !value.chars().all(topic_char) {
                        return Err(
                            "topic_prefix: must be characters of [A-Za-z0-9._-] only".into()
                        );
                    }
                    config.topic_prefix = value.to_owned();
                }
                "group" => {
                    if value.is_empty() {
                        return Err("group: must not be empty".into());
                    }
                    config.group = value.to_owned();
                }
                "partitions" => config.partitions = positive(key, value)?,
                "replication" => config.replication = positive(key, value)?,
                "retention_hours" => {
                    config.retention_hours = match value.parse::<u64>() {
                        // Kafka keeps `retention.ms` in an i64.
                        Ok(h) if h > 0 && h <= i64::MAX as u64 / 3_600_000 => h,
                        _ => return Err(format!("{key}: must be a whole number of hours above 0")),
                    }
                }
                "dedup_window_secs" => {
                    config.dedup_window_secs = value.parse::<u64>().map_err(|_| {
                        format!("{key}: must be a whole number of seconds (0 turns it off)")
                    })?
                }
                _ => {
                    return Err(format!(
                        "unknown parameter '{key}' (topic_prefix, group, partitions, \
                         replication, retention_hours, dedup_window_secs)"
                    ))
                }
            }
        }
        // Kafka's limit on topic names, with the longest suffix.
        if config.topic_prefix.len() + "decisions".len() > 249 {
            return Err("topic_prefix: too long (topic names are at most 249 characters)".into());
        }
        Ok(config)
    }

    /// The bootstrap list as librdkafka takes it.
    pub fn bootstrap(&self) -> String {
        self.brokers.join(",")
    }

    pub fn topic(&self, stream: &str) -> String {
        format!("{}{stream}", self.topic_prefix)
    }

    /// `retention_hours` as Kafka's `retention.ms`.
    pub fn retention_ms(&self) -> i64 {
        i64::try_from(self.retention_hours.saturating_mul(3_600_000)).unwrap_or(i64::MAX)
    }
}

fn topic_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

fn positive(key: &str, value: &str) -> Result<i32, String> {
    match value.parse::<i32>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{key}: must be a whole number above 0")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_brokers_and_parameters() {
        let c = KafkaConfig::parse("kafka://127.0.0.1:9092").unwrap();
        assert_eq!(c.brokers, ["127.0.0.1:9092"]);
        assert_eq!(c.topic("events"), "tailor.events");
        assert_eq!(c.group, "tailor-workers");
        assert_eq!((c.partitions, c.replication), (3, 1));
        assert_eq!(c.dedup_window_secs, 3600);
        assert_eq!(c.retention_hours, 168);
        assert_eq!(c.retention_ms(), 604_800_000);

        let c = KafkaConfig::parse(
            "kafka://a:1, b:2?topic_prefix=prod-&group=g1&partitions=12&replication=3&dedup_window_secs=0&retention_hours=48",
        )
        .unwrap();
        assert_eq!(c.bootstrap(), "a:1,b:2");
        assert_eq!(c.topic("outcomes"), "prod-outcomes");
        assert_eq!(c.group, "g1");
        assert_eq!((c.partitions, c.replication), (12, 3));
        assert_eq!(c.dedup_window_secs, 0);
        assert_eq!(c.retention_ms(), 172_800_000);
    }

    #[test]
    fn bad_values_say_what_is_wrong() {
        let cases = [
            ("redis://a:1", "a Kafka URL starts with kafka://"),
            ("kafka://", "a Kafka URL needs at least one host:port"),
            ("kafka://a", "'a' is not a host:port"),
            ("kafka://a:0", "'a:0' is not a host:port"),
            ("kafka://a:x", "'a:x' is not a host:port"),
            (
                "kafka://a:1?prefix=x",
                "unknown parameter 'prefix' (topic_prefix, group, partitions, replication, \
                 retention_hours, dedup_window_secs)",
            ),
            ("kafka://a:1?group", "parameter 'group' has no value"),
            ("kafka://a:1?group=", "group: must not be empty"),
            (
                "kafka://a:1?topic_prefix=a/b",
                "topic_prefix: must be characters of [A-Za-z0-9._-] only",
            ),
            (
                "kafka://a:1?partitions=0",
                "partitions: must be a whole number above 0",
            ),
            (
                "kafka://a:1?retention_hours=0",
                "retention_hours: must be a whole number of hours above 0",
            ),
            (
                "kafka://a:1?retention_hours=99999999999999999",
                "retention_hours: must be a whole number of hours above 0",
            ),
            (
                "kafka://a:1?dedup_window_secs=-1",
                "dedup_window_secs: must be a whole number of seconds (0 turns it off)",
            ),
        ];
        for (value, expected) in cases {
            assert_eq!(KafkaConfig::parse(value).unwrap_err(), expected, "{value}");
        }
    }
}
