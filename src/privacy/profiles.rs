//! `Profiles`: customers in the clear for the engine, sealed for the stores.
//!
//! Every read and write of a customer profile goes through here. On the way in, the PII
//! fields (`email`, `phone`, `name`) and the traits named in
//! `encryption.sensitive_traits` are sealed under the customer's data key (created on
//! the first sealed write, wrapped under the current master key) and the email gets its
//! blind-index entry; on the way out they are opened again. A profile without sealed
//! fields needs no data key.
//!
//! Erasure's part lives here too: [`Profiles::forget`] marks the customer erased (under
//! a keyed hash of the id), deletes the profile and destroys the data keys, so any copy
//! of the sealed fields — in a backup, in free pages of the data file — and of the
//! customer's sealed records on the events topic is unreadable.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::keys::KeyRing;
use super::seal::{self, BlindIndex, DataKey, SealError};
use super::stream::StreamSeal;
use crate::customers::{Consent, Customer, CustomerId, Pii};
use crate::storage::{
    DataKeyStore, KeyOwner, ProfileStore, StorageError, StorageResult, StoredProfile, Stores,
};

/// The system owner of the blind-index key.
const BLIND_INDEX_OWNER: &str = "blind-index";

/// Prefix of a sensitive trait's sealed field name.
const TRAIT_FIELD: &str = "traits.";

/// What a master-key rotation did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RewrapReport {
    /// Data keys re-wrapped under the current master key.
    pub rewrapped: u64,
    /// Data keys that were already under it.
    pub current: u64,
}

/// Customer profiles with PII sealed at rest (see the module documentation).
pub struct Profiles {
    store: Arc<dyn ProfileStore>,
    keys: Arc<dyn DataKeyStore>,
    ring: KeyRing,
    index: Arc<BlindIndex>,
    sensitive: BTreeSet<String>,
    /// The keys of the customers' records on the events topic.
    stream: Arc<StreamSeal>,
}

impl std::fmt::Debug for Profiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Profiles")
            .field("ring", &self.ring)
            .field("sensitive", &self.sensitive)
            .finish_non_exhaustive()
    }
}

/// What a failure to open or unwrap `what` is, as a storage error.
pub(super) fn sealing_error(what: impl std::fmt::Display, e: SealError) -> StorageError {
    match e {
        SealError::UnknownMasterKey(id) => StorageError::Backend(format!(
            "{what}: wrapped under master key '{id}', which is not configured \
             (encryption.previous_keys)"
        )),
        other => StorageError::Corrupt(format!("{what}: {other}")),
    }
}

impl Profiles {
    /// Profiles over `stores`, sealing with `ring`. Loads the blind-index key, creating it
    /// on first use.
    pub async fn open(
        stores: &Stores,
        ring: KeyRing,
        sensitive_traits: &[String],
    ) -> StorageResult<Profiles> {
        let owner = KeyOwner::System(BLIND_INDEX_OWNER.into());
        let key = data_key(stores.data_keys.as_ref(), &ring, &owner, true)
            .await?
            .ok_or_else(|| StorageError::Backend("blind-index key not created".into()))?;
        let index = Arc::new(BlindIndex::new(key));
        let stream = Arc::new(StreamSeal::new(
            stores.data_keys.clone(),
            ring.clone(),
            index.clone(),
        ));
        Ok(Profiles {
            store: stores.profiles.clone(),
            keys: stores.data_keys.clone(),
            ring,
            index,
            sensitive: sensitive_traits.iter().cloned().collect(),
            stream,
        })
    }

    /// The master keys in use.
    pub fn ring(&self) -> &KeyRing {
        &self.ring
    }

    /// What seals the customers' records on the events topic, under keys that
    /// [`Profiles::forget`] destroys.
    pub fn stream_seal(&self) -> Arc<StreamSeal> {
        self.stream.clone()
    }

    /// `None`: no customer with this id.
    pub async fn get(&self, id: &CustomerId) -> StorageResult<Option<Customer>> {
        match self.store.get(id).await? {
            Some(stored) => self.open_profile(stored).await.map(Some),
            None => Ok(None),
        }
    }

    /// The profile without its PII (`pii` left empty, its sealed fields not opened):
    /// what decisions, rules and segments read, none of which use PII. Only sensitive
    /// traits are opened, so a customer without any needs no data key unwrapped.
    /// Never `put` what this returns: that would drop the PII. `None`: no such customer.
    pub async fn get_without_pii(&self, id: &CustomerId) -> StorageResult<Option<Customer>> {
        match self.store.get(id).await? {
            Some(stored) => self.open_without_pii(stored).await.map(Some),
            None => Ok(None),
        }
    }

    /// [`Profiles::get_without_pii`] of each id, in order, read together where the store
    /// can (one snapshot of the embedded store).
    pub async fn get_many_without_pii(
        &self,
        ids: &[CustomerId],
    ) -> StorageResult<Vec<Option<Customer>>> {
        let stored = self.store.get_many(ids).await?;
        let mut out = Vec::with_capacity(stored.len());
        for profile in stored {
            out.push(match profile {
                Some(profile) => Some(self.open_without_pii(profile).await?),
                None => None,
            });
        }
        Ok(out)
    }

    async fn open_without_pii(&self, mut stored: StoredProfile) -> StorageResult<Customer> {
        stored
            .sealed
            .retain(|field, _| field.starts_with(TRAIT_FIELD));
        self.open_profile(stored).await
    }

    /// What admitting each id's events needs, in order: whether the customer was erased
    /// (and has not consented since), and their consent as stored (`None`: no profile;
    /// nothing is decrypted). The consents are read in one read where the store can.
    pub async fn admission(
        &self,
        ids: &[CustomerId],
    ) -> StorageResult<Vec<(bool, Option<Consent>)>> {
        let consents = self.store.consents(ids).await?;
        let tags: Vec<String> = ids.iter().map(|id| self.index.erasure_tag(id)).collect();
        let erased = self.keys.erased_many(&tags).await?;
        Ok(erased
            .into_iter()
            .zip(consents)
            .map(|(erased, consent)| (erased.is_some(), consent))
            .collect())
    }

    /// Seals and stores the whole profile (merging is the caller's job).
    pub async fn put(&self, customer: &Customer) -> StorageResult<()> {
        let stored = self.seal_profile(customer).await?;
        self.store.put(&stored).await
    }

    /// `false`: there was nothing to delete.
    pub async fn delete(&self, id: &CustomerId) -> StorageResult<bool> {
        self.store.delete(id).await
    }

    /// Profiles in ascending id order, strictly after `after`, at most `limit`.
    pub async fn list(
        &self,
        after: Option<&CustomerId>,
        limit: usize,
    ) -> StorageResult<Vec<Customer>> {
        let stored = self.store.list(after, limit).await?;
        let mut out = Vec::with_capacity(stored.len());
        for profile in stored {
            out.push(self.open_profile(profile).await?);
        }
        Ok(out)
    }

    pub async fn count(&self) -> StorageResult<u64> {
        self.store.count().await
    }

    /// The customers with this email (case and surrounding spaces ignored), looked up by
    /// its keyed hash: the store never sees the email.
    pub async fn find_by_email(&self, email: &str) -> StorageResult<Vec<CustomerId>> {
        self.store.find_by_email(&self.index.email(email)).await
    }

    /// When the customer was erased; `None` when they were not, or consented again since.
    pub async fn erased_at(&self, id: &CustomerId) -> StorageResult<Option<DateTime<Utc>>> {
        self.keys.erased_at(&self.index.erasure_tag(id)).await
    }

    /// Forgets the erasure marker: the customer consented again.
    pub async fn clear_erased(&self, id: &CustomerId) -> StorageResult<bool> {
        self.keys.clear_erased(&self.index.erasure_tag(id)).await
    }

    /// Erasure's part here, in this order: the marker (so ingestion refuses the id from
    /// now on), the profile and its index entry, then the data keys of the profile and of
    /// the customer's records on the events topic (crypto-shredding: what was sealed
    /// under them is unreadable everywhere). Returns whether a profile was deleted. Safe
    /// to repeat after a failure.
    pub async fn forget(&self, id: &CustomerId, at: DateTime<Utc>) -> StorageResult<bool> {
        self.keys
            .mark_erased(&self.index.erasure_tag(id), at)
            .await?;
        let deleted = self.store.delete(id).await?;
        self.keys.destroy(&KeyOwner::Customer(id.clone())).await?;
        self.stream.forget(id).await?;
        Ok(deleted)
    }

    /// Re-wraps every data key not under the current master key under it (the data is
    /// not re-encrypted). Afterwards the older master keys are no longer needed.
    pub async fn rewrap_all(&self) -> StorageResult<RewrapReport> {
        const PAGE: usize = 500;
        let current = self.ring.current();
        let mut report = RewrapReport::default();
        let mut after: Option<KeyOwner> = None;
        loop {
            let page = self.keys.list(after.as_ref(), PAGE).await?;
            let Some((last, _)) = page.last() else {
                break;
            };
            after = Some(last.clone());
            for (owner, wrapped) in page {
                if wrapped.master_key_id == current.id() {
                    report.current += 1;
                    continue;
                }
                let key = seal::unwrap(&self.ring, &owner, &wrapped)
                    .map_err(|e| sealing_error(format!("data key of {}", owner.encode()), e))?;
                let new = seal::wrap(current, &owner, &key, wrapped.created_at);
                // A key destroyed (erasure) or replaced meanwhile is left as it is now.
                if self.keys.replace(&owner, &wrapped, &new).await? {
                    report.rewrapped += 1;
                }
            }
        }
        Ok(report)
    }

    async fn customer_key(&self, id: &CustomerId, create: bool) -> StorageResult<Option<DataKey>> {
        data_key(
            self.keys.as_ref(),
            &self.ring,
            &KeyOwner::Customer(id.clone()),
            create,
        )
        .await
    }

    async fn seal_profile(&self, customer: &Customer) -> StorageResult<StoredProfile> {
        let id = &customer.id;
        let mut plain: Vec<(String, Vec<u8>)> = Vec::new();
        for (field, value) in [
            ("email", &customer.pii.email),
            ("phone", &customer.pii.phone),
            ("name", &customer.pii.name),
        ] {
            if let Some(value) = value {
                plain.push((field.to_owned(), value.as_bytes().to_vec()));
            }
        }
        let mut traits = serde_json::Map::new();
        for (name, value) in &customer.traits {
            if self.sensitive.contains(name) {
                let bytes = serde_json::to_vec(value).map_err(|e| {
                    StorageError::Backend(format!("cannot serialize trait {name}: {e}"))
                })?;
                plain.push((format!("{TRAIT_FIELD}{name}"), bytes));
            } else {
                traits.insert(name.clone(), value.clone());
            }
        }
        let mut sealed = BTreeMap::new();
        if !plain.is_empty() {
            let key = self
                .customer_key(id, true)
                .await?
                .ok_or_else(|| StorageError::Backend(format!("data key of {id} not created")))?;
            for (field, mut bytes) in plain {
                sealed.insert(field.clone(), seal::seal(&key, id, &field, &bytes));
                zeroize::Zeroize::zeroize(&mut bytes);
            }
        }
        Ok(StoredProfile {
            id: id.clone(),
            traits,
            sealed,
            email_index: customer.pii.email.as_deref().map(|e| self.index.email(e)),
            consent: customer.consent.clone(),
            created_at: customer.created_at,
            updated_at: customer.updated_at,
        })
    }

    async fn open_profile(&self, stored: StoredProfile) -> StorageResult<Customer> {
        let id = stored.id;
        let mut customer = Customer {
            id: id.clone(),
            traits: stored.traits,
            pii: Pii::default(),
            consent: stored.consent,
            created_at: stored.created_at,
            updated_at: stored.updated_at,
        };
        if stored.sealed.is_empty() {
            return Ok(customer);
        }
        let key = self.customer_key(&id, false).await?.ok_or_else(|| {
            StorageError::Corrupt(format!(
                "profile {id}: sealed fields but no data key (destroyed by an erasure?)"
            ))
        })?;
        for (field, sealed) in &stored.sealed {
            let bytes = seal::open(&key, &id, field, sealed)
                .map_err(|e| sealing_error(format!("profile {id}, field {field}"), e))?;
            let text = || {
                String::from_utf8(bytes.to_vec()).map_err(|_| {
                    StorageError::Corrupt(format!("profile {id}, field {field}: not UTF-8"))
                })
            };
            match field.as_str() {
                "email" => customer.pii.email = Some(text()?),
                "phone" => customer.pii.phone = Some(text()?),
                "name" => customer.pii.name = Some(text()?),
                other => {
                    let Some(name) = other.strip_prefix(TRAIT_FIELD) else {
                        return Err(StorageError::Corrupt(format!(
                            "profile {id}: unknown sealed field {other}"
                        )));
                    };
                    let value: Value = serde_json::from_slice(&bytes).map_err(|_| {
                        StorageError::Corrupt(format!("profile {id}, field {field}: not JSON"))
                    })?;
                    customer.traits.insert(name.to_owned(), value);
                }
            }
        }
        Ok(customer)
    }
}

/// The owner's data key in the clear: unwrapped from the store, or — with `create` and
/// none stored — generated, wrapped under the current master key and stored (the first
/// of concurrent creators wins, and every one of them uses the winner).
async fn data_key(
    store: &dyn DataKeyStore,
    ring: &KeyRing,
    owner: &KeyOwner,
    create: bool,
) -> StorageResult<Option<DataKey>> {
    let wrapped = match store.get(owner).await? {
        Some(wrapped) => wrapped,
        None if create => {
            let fresh = seal::wrap(ring.current(), owner, &DataKey::generate(), Utc::now());
            store.insert(owner, &fresh).await?
        }
        None => return Ok(None),
    };
    seal::unwrap(ring, owner, &wrapped)
        .map(Some)
        .map_err(|e| sealing_error(format!("data key of {}", owner.encode()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::customers::Consent;
    use crate::privacy::MasterKey;
    use crate::storage::embedded::EmbeddedStore;
    use serde_json::json;

    fn id(raw: &str) -> CustomerId {
        CustomerId::parse("id", raw).unwrap()
    }

    fn customer(raw: &str, email: &str) -> Customer {
        let now = Utc::now();
        let mut traits = serde_json::Map::new();
        traits.insert("plan".into(), json!("pro"));
        traits.insert("birthday".into(), json!("1990-01-01"));
        Customer {
            id: id(raw),
            traits,
            pii: Pii {
                email: Some(email.into()),
                phone: Some("+33 1 23 45 67 89".into()),
                name: Some("Ada Lovelace".into()),
            },
            consent: Consent::default(),
            created_at: now,
            updated_at: now,
        }
    }

    async fn profiles(stores: &Stores, ring: KeyRing) -> Profiles {
        Profiles::open(stores, ring, &["birthday".to_string()])
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn profiles_round_trip_with_pii_and_sensitive_traits_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let stores = EmbeddedStore::open(dir.path()).unwrap().stores();
        let ring = KeyRing::new(MasterKey::generate("k1"), Vec::new()).unwrap();
        let p = profiles(&stores, ring).await;
        let c = customer("c1", "Ada@Example.com");
        p.put(&c).await.unwrap();
        assert_eq!(p.get(&c.id).await.unwrap(), Some(c.clone()));
        assert_eq!(p.list(None, 10).await.unwrap(), vec![c.clone()]);

        let stored = stores.profiles.get(&c.id).await.unwrap().unwrap();
        assert_eq!(
            stored.sealed.keys().collect::<Vec<_>>(),
            vec!["email", "name", "phone", "traits.birthday"]
        );
        assert_eq!(Value::Object(stored.traits.clone()), json!({"plan": "pro"}));
        let raw = serde_json::to_string(&stored).unwrap();
        for secret in ["Ada", "example.com", "1990", "+33"] {
            assert!(!raw.contains(secret), "{secret} in {raw}");
        }

        assert_eq!(
            p.find_by_email(" ada@example.COM").await.unwrap(),
            vec![c.id.clone()]
        );
        let mut moved = c.clone();
        moved.pii.email = Some("new@example.com".into());
        p.put(&moved).await.unwrap();
        assert!(p.find_by_email("ada@example.com").await.unwrap().is_empty());
        assert_eq!(
            p.find_by_email("new@example.com").await.unwrap(),
            vec![c.id.clone()]
        );
    }

    #[tokio::test]
    async fn a_ciphertext_swapped_between_customers_fails_to_decrypt() {
        let dir = tempfile::tempdir().unwrap();
        let stores = EmbeddedStore::open(dir.path()).unwrap().stores();
        let ring = KeyRing::new(MasterKey::generate("k1"), Vec::new()).unwrap();
        let p = profiles(&stores, ring).await;
        p.put(&customer("c1", "one@example.com")).await.unwrap();
        p.put(&customer("c2", "two@example.com")).await.unwrap();

        let one = stores.profiles.get(&id("c1")).await.unwrap().unwrap();
        let mut two = stores.profiles.get(&id("c2")).await.unwrap().unwrap();
        two.sealed
            .insert("email".into(), one.sealed["email"].clone());
        stores.profiles.put(&two).await.unwrap();
        let err = p.get(&id("c2")).await.unwrap_err();
        assert!(
            matches!(&err, StorageError::Corrupt(m) if m.contains("field email")),
            "{err}"
        );

        // Within one customer, a field moved to another field fails too.
        let mut one_moved = one.clone();
        one_moved
            .sealed
            .insert("name".into(), one.sealed["email"].clone());
        stores.profiles.put(&one_moved).await.unwrap();
        let err = p.get(&id("c1")).await.unwrap_err();
        assert!(
            matches!(&err, StorageError::Corrupt(m) if m.contains("field name")),
            "{err}"
        );

        // And a wrapped data key moved to another customer does not unwrap.
        let k1 = stores
            .data_keys
            .get(&KeyOwner::Customer(id("c1")))
            .await
            .unwrap()
            .unwrap();
        let k3 = KeyOwner::Customer(id("c3"));
        stores.data_keys.insert(&k3, &k1).await.unwrap();
        let mut three = one.clone();
        three.id = id("c3");
        three.email_index = None;
        stores.profiles.put(&three).await.unwrap();
        let err = p.get(&id("c3")).await.unwrap_err();
        assert!(
            matches!(&err, StorageError::Corrupt(m) if m.contains("data key")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn rotation_rewraps_data_keys_and_old_data_stays_readable() {
        let dir = tempfile::tempdir().unwrap();
        let stores = EmbeddedStore::open(dir.path()).unwrap().stores();
        let k1 = MasterKey::generate("k1");
        let old = profiles(&stores, KeyRing::new(k1.clone(), Vec::new()).unwrap()).await;
        let c = customer("c1", "ada@example.com");
        old.put(&c).await.unwrap();
        let sealed_before = stores.profiles.get(&c.id).await.unwrap().unwrap().sealed;

        // k2 current, k1 still in the ring: old data reads, new keys go under k2.
        let ring = KeyRing::new(MasterKey::generate("k2"), vec![k1.clone()]).unwrap();
        let rotated = profiles(&stores, ring).await;
        assert_eq!(rotated.get(&c.id).await.unwrap(), Some(c.clone()));
        assert_eq!(
            rotated.find_by_email("ada@example.com").await.unwrap(),
            vec![c.id.clone()]
        );
        rotated
            .put(&customer("c2", "bob@example.com"))
            .await
            .unwrap();
        let owner = |raw: &str| KeyOwner::Customer(id(raw));
        let under = |w: Option<crate::storage::WrappedKey>| w.unwrap().master_key_id;
        assert_eq!(
            under(stores.data_keys.get(&owner("c1")).await.unwrap()),
            "k1"
        );
        assert_eq!(
            under(stores.data_keys.get(&owner("c2")).await.unwrap()),
            "k2"
        );

        let report = rotated.rewrap_all().await.unwrap();
        assert_eq!(
            report,
            RewrapReport {
                rewrapped: 2,
                current: 1
            },
            "c1 and the index key"
        );
        assert_eq!(
            rotated.rewrap_all().await.unwrap().rewrapped,
            0,
            "idempotent"
        );
        assert_eq!(
            under(stores.data_keys.get(&owner("c1")).await.unwrap()),
            "k2"
        );
        let sealed_after = stores.profiles.get(&c.id).await.unwrap().unwrap().sealed;
        assert_eq!(sealed_before, sealed_after, "data is not re-encrypted");

        // Without k1 now: everything still reads, the blind index still finds.
        let k2 = rotated.ring().current().clone();
        let only_k2 = profiles(&stores, KeyRing::new(k2, Vec::new()).unwrap()).await;
        assert_eq!(only_k2.get(&c.id).await.unwrap(), Some(c.clone()));
        assert_eq!(
            only_k2.find_by_email("ada@example.com").await.unwrap(),
            vec![c.id.clone()]
        );

        // A ring that lacks a key in use says which one is missing.
        let k3 = KeyRing::new(MasterKey::generate("k3"), Vec::new()).unwrap();
        let err = Profiles::open(&stores, k3, &[]).await.unwrap_err();
        assert!(err.to_string().contains("master key 'k2'"), "{err}");
    }

    #[tokio::test]
    async fn forgetting_destroys_the_key_and_marks_the_id() {
        let dir = tempfile::tempdir().unwrap();
        let stores = EmbeddedStore::open(dir.path()).unwrap().stores();
        let ring = KeyRing::new(MasterKey::generate("k1"), Vec::new()).unwrap();
        let p = profiles(&stores, ring).await;
        let c = customer("c1", "ada@example.com");
        p.put(&c).await.unwrap();
        let sealed = stores.profiles.get(&c.id).await.unwrap().unwrap();
        assert_eq!(p.erased_at(&c.id).await.unwrap(), None);

        assert!(p.forget(&c.id, Utc::now()).await.unwrap());
        assert_eq!(p.get(&c.id).await.unwrap(), None);
        assert!(p.find_by_email("ada@example.com").await.unwrap().is_empty());
        assert!(p.erased_at(&c.id).await.unwrap().is_some());
        // A backup's copy of the sealed profile no longer opens.
        stores.profiles.put(&sealed).await.unwrap();
        assert!(p.get(&c.id).await.is_err());
        assert!(
            p.forget(&c.id, Utc::now()).await.unwrap(),
            "a restored copy goes again"
        );
        assert_eq!(p.get(&c.id).await.unwrap(), None);

        assert!(p.clear_erased(&c.id).await.unwrap());
        assert_eq!(p.erased_at(&c.id).await.unwrap(), None);
    }
}
