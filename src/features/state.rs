//! Per-customer feature state: what the online store keeps for one (feature, version).

use serde::{Deserialize, Serialize};

use crate::events::StreamPosition;

/// Identifies one version of one feature definition.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FeatureKey {
    pub name: String,
    pub version: u32,
}

impl FeatureKey {
    pub fn new(name: impl Into<String>, version: u32) -> Self {
        FeatureKey {
            name: name.into(),
            version,
        }
    }
}

impl std::fmt::Display for FeatureKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@v{}", self.name, self.version)
    }
}

/// One minute of matching events: how many, and the sum of the summed property.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    /// Minutes since the Unix epoch.
    pub minute: i64,
    pub count: u32,
    pub sum: f64,
}

/// The state of one feature version for one customer.
///
/// Windowed aggregates keep one bucket per minute that had a matching event, pruned to
/// the window on every write, and are evaluated at read time against the clock, so a
/// window slides without any new event (resolution: one minute).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FeatureState {
    /// Highest event sequence number folded in, of the events without a stream position.
    /// The event processor applies the log in sequence order, so a replay after a crash
    /// skips what is already counted.
    pub applied_seq: u64,
    /// The stream position of the newest event folded in that had one (a worker's). Every
    /// worker agrees on it, unlike on its own log's sequence numbers: an event at or
    /// before it in the same partition was counted, by whichever worker held the
    /// partition then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_position: Option<StreamPosition>,
    /// Ascending by minute.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub buckets: Vec<Bucket>,
    /// Newest matching event, milliseconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen_ms: Option<i64>,
}
