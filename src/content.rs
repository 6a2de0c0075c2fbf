//! The content catalog: items and offers that decisions choose between, and the
//! eligibility rules (placement, type, active window, segments) that make them candidates.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::customers::validate_id;
use crate::error::{Error, Result};
use crate::snapshot::Snapshot;
use crate::storage::{ContentStore, StorageResult};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContentItem {
    pub id: String,
    #[serde(rename = "type")]
    pub content_type: String,
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub placements: Vec<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Segments the item is eligible for; empty means everyone.
    #[serde(default)]
    pub segments: Vec<String>,
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub attributes: Map<String, Value>,
    #[serde(default)]
    pub active_from: Option<DateTime<Utc>>,
    #[serde(default)]
    pub active_until: Option<DateTime<Utc>>,
    /// Most impressions per customer per day; enforced by rules once they land.
    #[serde(default)]
    pub frequency_cap: Option<u32>,
}

impl ContentItem {
    pub fn validate(&self, field: &str) -> Result<()> {
        validate_id(&format!("{field}.id"), &self.id)?;
        if self.content_type.trim().is_empty() {
            return Err(Error::invalid(format!("{field}.type"), "must not be empty"));
        }
        if let (Some(from), Some(until)) = (self.active_from, self.active_until) {
            if until <= from {
                return Err(Error::invalid(
                    format!("{field}.activeUntil"),
                    "must be after activeFrom",
                ));
            }
        }
        Ok(())
    }

    pub fn is_active(&self, now: DateTime<Utc>) -> bool {
        self.active_from.is_none_or(|from| from <= now)
            && self.active_until.is_none_or(|until| now < until)
    }

    /// Segment eligibility: no segment list, or at least one of the customer's segments.
    pub fn eligible_for(&self, segments: &[String]) -> bool {
        self.segments.is_empty() || self.segments.iter().any(|s| segments.contains(s))
    }

    pub fn targets_segment(&self, segment: &str) -> bool {
        self.segments.is_empty() || self.segments.iter().any(|s| s == segment)
    }
}

/// What a catalog query asks for; every present field must match.
#[derive(Debug, Clone, Default)]
pub struct CandidateFilter<'a> {
    pub placement: Option<&'a str>,
    pub content_type: Option<&'a str>,
    pub now: Option<DateTime<Utc>>,
    /// The customer's segments; `None` skips segment eligibility.
    pub segments: Option<&'a [String]>,
}

impl CandidateFilter<'_> {
    pub fn matches(&self, item: &ContentItem) -> bool {
        self.placement
            .is_none_or(|p| item.placements.iter().any(|ip| ip == p))
            && self.content_type.is_none_or(|t| item.content_type == t)
            && self.now.is_none_or(|now| item.is_active(now))
            && self.segments.is_none_or(|s| item.eligible_for(s))
    }
}

/// The whole catalog in memory for the decision path, reloaded when this process
/// changes it or after `ttl` (so changes made by another replica show within `ttl`).
pub struct Catalog {
    store: Arc<dyn ContentStore>,
    items: Snapshot<Vec<Arc<ContentItem>>>,
}

impl Catalog {
    pub fn new(store: Arc<dyn ContentStore>, ttl: Duration) -> Self {
        Catalog {
            store,
            items: Snapshot::new(ttl),
        }
    }

    /// Every item, in ascending id order.
    pub async fn items(&self) -> StorageResult<Arc<Vec<Arc<ContentItem>>>> {
        self.items
            .get_or_load(|| async {
                Ok(self.store.list().await?.into_iter().map(Arc::new).collect())
            })
            .await
    }

    pub async fn upsert(&self, item: &ContentItem) -> StorageResult<()> {
        let result = self.store.upsert(item).await;
        self.invalidate();
        result
    }

    pub async fn delete(&self, id: &str) -> StorageResult<bool> {
        let result = self.store.delete(id).await;
        self.invalidate();
        result
    }

    fn invalidate(&self) {
        self.items.invalidate();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    fn item() -> ContentItem {
        ContentItem {
            id: "hero-1".into(),
            content_type: "banner".into(),
            title: None,
            placements: vec!["homepage_hero".into()],
            tags: vec![],
            segments: vec!["vip".into()],
            priority: 1,
            attributes: Map::new(),
            active_from: None,
            active_until: None,
            frequency_cap: None,
        }
    }

    #[test]
    fn filter_checks_placement_type_window_and_segments() {
        let now = Utc::now();
        let mut it = item();
        let vip = vec!["vip".to_string()];
        let f = CandidateFilter {
            placement: Some("homepage_hero"),
            content_type: Some("banner"),
            now: Some(now),
            segments: Some(&vip),
        };
        assert!(f.matches(&it));
        assert!(!CandidateFilter {
            placement: Some("sidebar"),
            ..f.clone()
        }
        .matches(&it));
        assert!(!CandidateFilter {
            segments: Some(&[]),
            ..f.clone()
        }
        .matches(&it));
        it.active_until = Some(now - Duration::seconds(1));
        assert!(!f.matches(&it));
    }

    #[test]
    fn validation_names_the_field() {
        let mut it = item();
        it.content_type = " ".into();
        assert_eq!(
            it.validate("input").unwrap_err().to_string(),
            "input.type: must not be empty"
        );
    }
}
