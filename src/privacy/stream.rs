//! `StreamSeal`: the events topic's records sealed per customer ([`RecordSeal`]).
//!
//! A record is keyed by the customer's stream tag (a keyed hash of the id, so the broker
//! never sees the id) and sealed under the data key of the owner `t:<tag>`, created on the
//! customer's first record. Erasure destroys that key ([`StreamSeal::forget`]): every
//! record of the customer still on the broker, or in a copy of its log, is then
//! unreadable, whatever the topic's retention.
//!
//! Keys are read in one exchange per batch and kept unwrapped in memory for
//! [`KEY_TTL`], so a key destroyed by another process stops opening records here within
//! that time. Records of a customer erased meanwhile are still left out everywhere they
//! are read: ingestion, the workers and the replays check the erasure markers.
//!
//! Sealing never sends a customer's events readable after their erasure. A key found
//! (in memory or in the store) is one erasure has not destroyed yet, or has destroyed
//! since, and then the records sealed under it do not open. Only a key that is missing
//! may be missing because of an erasure, so for the keys this call creates the erasure
//! markers are read after the creation: a customer found erased has their events left
//! out and the new key destroyed again, and an erasure that lands after that read
//! destroys the key the records were sealed under. Steady traffic therefore reads no
//! markers here: the workers' admission reads them anyway.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::Utc;
use futures::future::try_join_all;

use super::keys::KeyRing;
use super::profiles::sealing_error;
use super::seal::{self, BlindIndex, DataKey};
use crate::customers::CustomerId;
use crate::events::Event;
use crate::storage::{
    DataKeyStore, KeyOwner, Opened, RecordSeal, SealedRecord, StorageError, StorageResult,
};

/// How long an unwrapped key is used without reading the store again.
pub const KEY_TTL: Duration = Duration::from_secs(60);
/// Most keys kept unwrapped.
const CACHED_KEYS: usize = 100_000;
/// Keys created at a time.
const CREATES_IN_FLIGHT: usize = 64;

#[derive(Clone)]
struct Cached {
    key: Arc<DataKey>,
    read_at: Instant,
}

/// Seals and opens the events topic's records (see the module documentation).
pub struct StreamSeal {
    keys: Arc<dyn DataKeyStore>,
    ring: KeyRing,
    index: Arc<BlindIndex>,
    cache: quick_cache::sync::Cache<String, Cached>,
}

impl std::fmt::Debug for StreamSeal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSeal")
            .field("cached_keys", &self.cache.len())
            .finish_non_exhaustive()
    }
}

/// The keys of a batch's tags, and which of them this call created.
struct Keys {
    by_tag: BTreeMap<String, Arc<DataKey>>,
    created: BTreeSet<String>,
}

impl StreamSeal {
    pub fn new(keys: Arc<dyn DataKeyStore>, ring: KeyRing, index: Arc<BlindIndex>) -> StreamSeal {
        StreamSeal {
            keys,
            ring,
            index,
            cache: quick_cache::sync::Cache::new(CACHED_KEYS),
        }
    }

    /// The tag `customer`'s records are keyed by.
    pub fn tag(&self, customer: &CustomerId) -> String {
        self.index.stream_tag(customer)
    }

    /// Destroys the key of `customer`'s records (erasure): those on the topic no longer
    /// open. Safe to repeat.
    pub async fn forget(&self, customer: &CustomerId) -> StorageResult<()> {
        let tag = self.tag(customer);
        self.cache.remove(&tag);
        self.keys.destroy(&KeyOwner::Stream(tag.clone())).await?;
        // A seal that read the key just before it was destroyed may have cached it again.
        self.cache.remove(&tag);
        Ok(())
    }

    fn unwrap(
        &self,
        owner: &KeyOwner,
        wrapped: &crate::storage::WrappedKey,
    ) -> StorageResult<DataKey> {
        seal::unwrap(&self.ring, owner, wrapped)
            .map_err(|e| sealing_error(format!("data key of {}", owner.encode()), e))
    }

    /// The keys of `tags`, from memory or in one read of the store; those the store does
    /// not have are created when `create` (else left out).
    async fn keys(&self, tags: BTreeSet<&str>, create: bool) -> StorageResult<Keys> {
        let mut keys = Keys {
            by_tag: BTreeMap::new(),
            created: BTreeSet::new(),
        };
        let mut missing = Vec::new();
        for tag in tags {
            match self.cache.get(tag) {
                Some(c) if c.read_at.elapsed() < KEY_TTL => {
                    keys.by_tag.insert(tag.to_owned(), c.key);
                }
                _ => missing.push(KeyOwner::Stream(tag.to_owned())),
            }
        }
        if missing.is_empty() {
            return Ok(keys);
        }
        let read_at = Instant::now();
        let stored = self.keys.get_many(&missing).await?;
        let mut absent = Vec::new();
        for (owner, wrapped) in missing.into_iter().zip(stored) {
            match wrapped {
                Some(wrapped) => {
                    let key = Arc::new(self.unwrap(&owner, &wrapped)?);
                    self.remember(owner, key, read_at, &mut keys);
                }
                None if create => absent.push(owner),
                None => {}
            }
        }
        for chunk in absent.chunks(CREATES_IN_FLIGHT) {
            let created = try_join_all(chunk.iter().map(|owner| async move {
                let fresh = DataKey::generate();
                let wrapped = seal::wrap(self.ring.current(), owner, &fresh, Utc::now());
                let kept = self.keys.insert(owner, &wrapped).await?;
                // Another process may have created it first: use the one stored.
                let key = if kept == wrapped {
                    fresh
                } else {
                    self.unwrap(owner, &kept)?
                };
                Ok::<_, StorageError>((owner.clone(), Arc::new(key), kept == wrapped))
            }))
            .await?;
            for (owner, key, new) in created {
                if new {
                    if let KeyOwner::Stream(tag) = &owner {
                        keys.created.insert(tag.clone());
                    }
                }
                self.remember(owner, key, read_at, &mut keys);
            }
        }
        Ok(keys)
    }

    fn remember(&self, owner: KeyOwner, key: Arc<DataKey>, read_at: Instant, keys: &mut Keys) {
        if let KeyOwner::Stream(tag) = owner {
            self.cache.insert(
                tag.clone(),
                Cached {
                    key: key.clone(),
                    read_at,
                },
            );
            keys.by_tag.insert(tag, key);
        }
    }
}

#[async_trait]
impl RecordSeal for StreamSeal {
    async fn seal(&self, events: &[&Event]) -> StorageResult<Vec<Option<SealedRecord>>> {
        let customers: BTreeMap<&CustomerId, String> = events
            .iter()
            .map(|e| (&e.customer_id, self.tag(&e.customer_id)))
            .collect();
        let keys = self
            .keys(customers.values().map(String::as_str).collect(), true)
            .await?;
        // Only a key created now may belong to a customer already erased (see the module
        // documentation): their markers are read after the keys.
        let created: Vec<&CustomerId> = customers
            .iter()
            .filter(|(_, tag)| keys.created.contains(*tag))
            .map(|(c, _)| *c)
            .collect();
        let markers: Vec<String> = created.iter().map(|c| self.index.erasure_tag(c)).collect();
        let mut erased = BTreeSet::new();
        if !markers.is_empty() {
            for (customer, at) in created.iter().zip(self.keys.erased_many(&markers).await?) {
                if at.is_some() {
                    erased.insert(*customer);
                }
            }
        }
        for customer in &erased {
            let tag = &customers[customer];
            self.cache.remove(tag);
            self.keys.destroy(&KeyOwner::Stream(tag.clone())).await?;
        }
        events
            .iter()
            .map(|event| {
                if erased.contains(&event.customer_id) {
                    return Ok(None);
                }
                let tag = &customers[&event.customer_id];
                let key = keys.by_tag.get(tag).ok_or_else(|| {
                    StorageError::Backend(format!("no data key for the records of {tag}"))
                })?;
                let plain = zeroize::Zeroizing::new(
                    serde_json::to_vec(event)
                        .map_err(|e| StorageError::Backend(format!("encoding an event: {e}")))?,
                );
                Ok(Some(SealedRecord {
                    key: tag.clone(),
                    value: seal::seal_record(key, tag, &plain),
                }))
            })
            .collect()
    }

    async fn open(&self, records: &[(&[u8], &[u8])]) -> StorageResult<Vec<Opened>> {
        let tags: Vec<Option<&str>> = records
            .iter()
            .map(|(key, _)| std::str::from_utf8(key).ok())
            .collect();
        let keys = self
            .keys(tags.iter().flatten().copied().collect(), false)
            .await?;
        Ok(records
            .iter()
            .zip(tags)
            .map(|((_, value), tag)| {
                let Some(tag) = tag else {
                    return Opened::Malformed("a sealed record whose key is not a tag".into());
                };
                let Some(key) = keys.by_tag.get(tag) else {
                    return Opened::Shredded;
                };
                match seal::open_record(key, tag, value) {
                    Ok(plain) => match Event::from_stored_json(&plain) {
                        Ok(event) => Opened::Event(event),
                        Err(e) => Opened::Malformed(format!("a sealed record: {e}")),
                    },
                    Err(e) => Opened::Malformed(format!("a sealed record: {e}")),
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::privacy::MasterKey;
    use crate::storage::embedded::EmbeddedStore;
    use serde_json::json;

    fn event(id: &str, customer: &str) -> Event {
        Event::from_stored_json(
            json!({
                "event_id": id,
                "customer_id": customer,
                "type": "page_view",
                "timestamp": "2026-01-01T00:00:00Z",
                "properties": {"email": format!("{customer}@example.com")},
            })
            .to_string()
            .as_bytes(),
        )
        .expect("an event")
    }

    fn seal_over(
        keys: Arc<dyn DataKeyStore>,
        ring: &KeyRing,
        index: &Arc<BlindIndex>,
    ) -> StreamSeal {
        StreamSeal::new(keys, ring.clone(), index.clone())
    }

    async fn open(seal: &StreamSeal, records: &[SealedRecord]) -> Vec<Opened> {
        let raw: Vec<(&[u8], &[u8])> = records
            .iter()
            .map(|r| (r.key.as_bytes(), r.value.as_slice()))
            .collect();
        seal.open(&raw).await.expect("opened")
    }

    #[tokio::test]
    async fn records_open_until_their_customer_is_erased() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let keys = store.stores().data_keys;
        let ring = KeyRing::new(MasterKey::generate("k1"), Vec::new()).unwrap();
        let index = Arc::new(BlindIndex::new(DataKey::generate()));
        let writer = seal_over(keys.clone(), &ring, &index);
        // Another process over the same store, with its own memory of keys.
        let reader = seal_over(keys.clone(), &ring, &index);

        let events = [event("e1", "ada"), event("e2", "bob"), event("e3", "ada")];
        let sealed: Vec<SealedRecord> = writer
            .seal(&events.iter().collect::<Vec<_>>())
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.expect("sealed"))
            .collect();
        assert_eq!(sealed[0].key, sealed[2].key, "one key per customer");
        assert_ne!(sealed[0].key, sealed[1].key);
        for record in &sealed {
            for clear in ["ada", "bob", "example.com", "page_view"] {
                assert!(!record.key.contains(clear), "{clear} in a key");
                assert!(
                    !record
                        .value
                        .windows(clear.len())
                        .any(|w| w == clear.as_bytes()),
                    "{clear} in a value"
                );
            }
        }
        let opened = open(&reader, &sealed).await;
        let ids: Vec<&str> = opened
            .iter()
            .map(|o| match o {
                Opened::Event(e) => e.event_id.as_str(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(ids, ["e1", "e2", "e3"]);

        // A record moved under another customer's key does not open.
        let moved = SealedRecord {
            key: sealed[1].key.clone(),
            value: sealed[0].value.clone(),
        };
        assert!(matches!(
            &open(&reader, &[moved]).await[..],
            [Opened::Malformed(_)]
        ));

        // Erased: the key is gone; a fresh reader opens nothing of Ada's.
        let ada = CustomerId::parse("c", "ada").unwrap();
        writer.forget(&ada).await.unwrap();
        let fresh = seal_over(keys.clone(), &ring, &index);
        let opened = open(&fresh, &sealed).await;
        assert!(matches!(
            &opened[..],
            [Opened::Shredded, Opened::Event(_), Opened::Shredded]
        ));

        // An erased customer's events still waiting to be sent are not sealed, and no
        // key is left behind for them.
        keys.mark_erased(&index.erasure_tag(&ada), Utc::now())
            .await
            .unwrap();
        let again = writer
            .seal(&[&event("e4", "ada"), &event("e5", "bob")])
            .await
            .unwrap();
        assert!(again[0].is_none() && again[1].is_some());
        assert_eq!(
            keys.get(&KeyOwner::Stream(writer.tag(&ada))).await.unwrap(),
            None
        );

        // Erased through another process while this one still holds the key in memory:
        // what it seals meanwhile does not open, and no key is created again.
        let cy = CustomerId::parse("c", "cy").unwrap();
        writer.seal(&[&event("e6", "cy")]).await.unwrap();
        reader.forget(&cy).await.unwrap();
        keys.mark_erased(&index.erasure_tag(&cy), Utc::now())
            .await
            .unwrap();
        let late: Vec<SealedRecord> = writer
            .seal(&[&event("e7", "cy")])
            .await
            .unwrap()
            .into_iter()
            .flatten()
            .collect();
        assert!(matches!(
            &open(&seal_over(keys.clone(), &ring, &index), &late).await[..],
            [Opened::Shredded]
        ));
        assert_eq!(
            keys.get(&KeyOwner::Stream(writer.tag(&cy))).await.unwrap(),
            None
        );
        assert_eq!(
            KeyOwner::decode(&KeyOwner::Stream("ab".into()).encode()),
            Some(KeyOwner::Stream("ab".into()))
        );
    }
}
