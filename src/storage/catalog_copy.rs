//! This process's copy of a shared catalog (`backends.definitions` on a scaled-out
//! backend): the content items and the definitions (features, segments, rules,
//! experiments, …) it has read there.
//!
//! - [`CopiedDefinitions`] and [`CopiedContent`] wrap the shared stores: every read that
//!   succeeds updates the copy; a read that fails with [`StorageError::Unavailable`] is
//!   answered from the copy instead. Writes go to the shared store only (they fail while
//!   it is away).
//! - [`CatalogCopy::save`] writes the copy to the local embedded store when it changed
//!   (the engine calls it after its reloads, every second, and at shutdown);
//!   [`CatalogCopy::open`] reads it back, so a process that starts while the shared store
//!   is unreachable serves the catalog it last saw rather than nothing.
//!
//! The copy is what this process read, not a replica of the shared store: it holds every
//! name the reloads list, with the versions and active pointers they read, and the
//! content list the decision path reads. While it is served, changes made elsewhere are
//! not seen; once the shared store answers, the next reads replace it.
//!
//! On disk it is one [`DefinitionKind::CatalogCopy`] definition in the local store, under
//! one of two names written in turn (`a`, `b`, each replaced by a delete and a put), so a
//! crash during a save leaves the previous copy whole; the one with the higher `seq` wins.
//! It names the shared store it was read from (its address without credentials): a
//! process pointed at another deployment does not serve the old one's catalog.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::content::ContentItem;
use crate::storage::{
    ContentStore, Definition, DefinitionKind, DefinitionStore, StorageError, StorageResult,
};

/// The two local names the copy is saved under, in turn.
const SLOTS: [&str; 2] = ["a", "b"];

/// What one (kind, name) looked like when last read.
#[derive(Debug, Clone, Default, PartialEq)]
struct Named {
    versions: BTreeMap<u32, Definition>,
    active: Option<u32>,
}

#[derive(Debug, Clone, Default)]
struct Kept {
    definitions: HashMap<(DefinitionKind, String), Named>,
    content: BTreeMap<String, ContentItem>,
}

/// The copy as saved.
#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    /// Higher is newer.
    seq: u64,
    saved_at: DateTime<Utc>,
    definitions: Vec<Definition>,
    /// (kind, name, active version).
    active: Vec<(DefinitionKind, String, u32)>,
    content: Vec<ContentItem>,
    /// The shared store the copy was read from ([`source_of`]); `None` in copies saved
    /// before it was recorded.
    #[serde(default)]
    source: Option<String>,
}

impl Saved {
    fn into_kept(self) -> Kept {
        let mut kept = Kept::default();
        for d in self.definitions {
            kept.definitions
                .entry((d.kind, d.name.clone()))
                .or_default()
                .versions
                .insert(d.version, d);
        }
        for (kind, name, version) in self.active {
            kept.definitions.entry((kind, name)).or_default().active = Some(version);
        }
        kept.content = self
            .content
            .into_iter()
            .map(|item| (item.id.clone(), item))
            .collect();
        kept
    }
}

/// `value` (a `backends.definitions` address) without credentials: what names the shared
/// store a copy was read from.
pub fn source_of(value: &str) -> String {
    let Some((scheme, rest)) = value.split_once("://") else {
        return value.to_owned();
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let hosts = authority
        .split(',')
        .map(|host| host.rsplit_once('@').map_or(host, |(_, host)| host))
        .collect::<Vec<_>>()
        .join(",");
    format!("{scheme}://{hosts}{tail}")
}

struct State {
    copy: Kept,
    /// Bumped by every change to `copy`.
    changes: u64,
    /// `changes` when the copy was last saved (or loaded).
    saved_changes: u64,
    /// The `seq` and slot of the newest saved copy, if any.
    saved: Option<(u64, usize)>,
    /// When the copy read at open was saved.
    loaded_from: Option<DateTime<Utc>>,
}

/// The copy, its persistence, and whether it is being served.
pub struct CatalogCopy {
    /// The local embedded store the copy is saved in.
    local: Arc<dyn DefinitionStore>,
    /// The shared store it copies ([`source_of`]).
    source: String,
    /// A std lock: held to read or update the maps, never across an await.
    state: parking_lot::Mutex<State>,
    /// Whether the last read of the shared store failed and was answered from the copy.
    serving: AtomicBool,
    /// Serialises saves (a tokio mutex: held across the local writes).
    saving: tokio::sync::Mutex<()>,
}

impl CatalogCopy {
    /// Reads the copy of `source` (the shared store's address) saved in `local` (the
    /// newer of its two names); an empty copy when none was saved, neither can be
    /// decoded, or the newest was read from another shared store (said in a warning).
    pub async fn open(
        local: Arc<dyn DefinitionStore>,
        source: &str,
    ) -> StorageResult<Arc<CatalogCopy>> {
        let source = source_of(source);
        let mut newest: Option<(Saved, usize)> = None;
        for (slot, name) in SLOTS.iter().enumerate() {
            let Some(stored) = local.get(DefinitionKind::CatalogCopy, name, None).await? else {
                continue;
            };
            match serde_json::from_value::<Saved>(stored.body) {
                Ok(saved) if newest.as_ref().is_none_or(|(n, _)| saved.seq > n.seq) => {
                    newest = Some((saved, slot));
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(slot = name, error = %e, "The local copy of the shared catalog cannot be read; ignored");
                }
            }
        }
        let mut state = State {
            copy: Kept::default(),
            changes: 0,
            saved_changes: 0,
            saved: None,
            loaded_from: None,
        };
        if let Some((saved, slot)) = newest {
            state.saved = Some((saved.seq, slot));
            if saved.source.as_ref().is_some_and(|s| *s != source) {
                tracing::warn!(
                    copied = saved.source.as_deref().unwrap_or_default(),
                    shared = source,
                    "The local copy of the shared catalog was read from another store; not served"
                );
            } else {
                state.loaded_from = Some(saved.saved_at);
                state.copy = saved.into_kept();
            }
        }
        Ok(Arc::new(CatalogCopy {
            local,
            source,
            state: parking_lot::Mutex::new(state),
            serving: AtomicBool::new(false),
            saving: tokio::sync::Mutex::new(()),
        }))
    }

    /// Whether the shared store could not be read the last time it was tried, so that
    /// the catalog is now served from this copy.
    pub fn is_serving(&self) -> bool {
        self.serving.load(Ordering::Relaxed)
    }

    /// When the copy loaded at open had been saved; `None` when there was none.
    pub fn loaded_from(&self) -> Option<DateTime<Utc>> {
        self.state.lock().loaded_from
    }

    /// Writes the copy to the local store if it changed since it was last saved or
    /// loaded. `true`: it was written.
    pub async fn save(&self) -> StorageResult<bool> {
        let _saving = self.saving.lock().await;
        let (saved, changes, slot) = {
            let state = self.state.lock();
            if state.changes == state.saved_changes {
                return Ok(false);
            }
            let (seq, slot) = match state.saved {
                Some((seq, slot)) => (seq + 1, 1 - slot),
                None => (1, 0),
            };
            let copy = &state.copy;
            let mut definitions = Vec::new();
            let mut active = Vec::new();
            for ((kind, name), named) in &copy.definitions {
                definitions.extend(named.versions.values().cloned());
                if let Some(version) = named.active {
                    active.push((*kind, name.clone(), version));
                }
            }
            let saved = Saved {
                seq,
                saved_at: Utc::now(),
                definitions,
                active,
                content: copy.content.values().cloned().collect(),
                source: Some(self.source.clone()),
            };
            (saved, state.changes, slot)
        };
        let (seq, name) = (saved.seq, SLOTS[slot]);
        let body = serde_json::to_value(&saved)
            .map_err(|e| StorageError::Backend(format!("encoding the catalog copy: {e}")))?;
        // The other slot keeps the previous copy until this one is whole.
        self.local.delete(DefinitionKind::CatalogCopy, name).await?;
        self.local
            .put(DefinitionKind::CatalogCopy, name, body)
            .await?;
        let mut state = self.state.lock();
        state.saved = Some((seq, slot));
        state.saved_changes = changes;
        Ok(true)
    }

    /// Notes whether a read of the shared store failed, saying so when that changes.
    fn note(&self, reached: bool, error: Option<&str>) {
        let was_serving = self.serving.swap(!reached, Ordering::Relaxed);
        if reached && was_serving {
            tracing::info!("The shared catalog answers again; the local copy is no longer served");
        } else if !reached && !was_serving {
            match self.loaded_from() {
                Some(at) if self.has_data() => tracing::warn!(
                    error = error.unwrap_or_default(),
                    saved_at = %at,
                    "The shared catalog cannot be read; serving this process's local copy until it answers"
                ),
                _ if self.has_data() => tracing::warn!(
                    error = error.unwrap_or_default(),
                    "The shared catalog cannot be read; serving what this process read before until it answers"
                ),
                _ => tracing::warn!(
                    error = error.unwrap_or_default(),
                    "The shared catalog cannot be read and there is no local copy yet: no content or definitions until it answers"
                ),
            }
        }
    }

    /// Whether the copy holds anything (read at open or since).
    pub fn has_data(&self) -> bool {
        let state = self.state.lock();
        !state.copy.definitions.is_empty() || !state.copy.content.is_empty()
    }

    /// Runs `change` on the copy and counts it when it changed something.
    fn update(&self, change: impl FnOnce(&mut Kept) -> bool) {
        let mut state = self.state.lock();
        if change(&mut state.copy) {
            state.changes += 1;
        }
    }

    fn read<T>(&self, read: impl FnOnce(&Kept) -> T) -> T {
        read(&self.state.lock().copy)
    }

    /// `result` from the shared store, kept by `keep` when it is an answer; or, when the
    /// store is unavailable, what `fallback` finds in the copy.
    fn answer<T>(
        &self,
        result: StorageResult<T>,
        keep: impl FnOnce(&mut Kept, &T) -> bool,
        fallback: impl FnOnce(&Kept) -> T,
    ) -> StorageResult<T> {
        match result {
            Ok(value) => {
                self.note(true, None);
                self.update(|copy| keep(copy, &value));
                Ok(value)
            }
            Err(StorageError::Unavailable(e)) => {
                self.note(false, Some(&e));
                Ok(self.read(fallback))
            }
            Err(e) => Err(e),
        }
    }
}

/// Sets `slot` to `value`; whether that changed it.
fn set<T: PartialEq>(slot: &mut T, value: T) -> bool {
    if *slot == value {
        return false;
    }
    *slot = value;
    true
}

impl Kept {
    fn named(&self, kind: DefinitionKind, name: &str) -> Option<&Named> {
        self.definitions.get(&(kind, name.to_owned()))
    }

    /// The latest version of every name of `kind` with a version, sorted by name.
    fn list(&self, kind: DefinitionKind) -> Vec<Definition> {
        let mut out: Vec<Definition> = self
            .definitions
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .filter_map(|(_, named)| named.versions.values().next_back().cloned())
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    fn keep_version(&mut self, d: &Definition) -> bool {
        let named = self
            .definitions
            .entry((d.kind, d.name.clone()))
            .or_default();
        match named.versions.get(&d.version) {
            Some(kept) if kept == d => false,
            _ => {
                named.versions.insert(d.version, d.clone());
                true
            }
        }
    }

    fn forget(&mut self, kind: DefinitionKind, name: &str) -> bool {
        self.definitions.remove(&(kind, name.to_owned())).is_some()
    }
}

/// A shared [`DefinitionStore`] whose reads are kept in a [`CatalogCopy`] and answered
/// from it while the shared store is unavailable.
pub struct CopiedDefinitions {
    shared: Arc<dyn DefinitionStore>,
    copy: Arc<CatalogCopy>,
}

impl CopiedDefinitions {
    pub fn new(shared: Arc<dyn DefinitionStore>, copy: Arc<CatalogCopy>) -> Self {
        CopiedDefinitions { shared, copy }
    }
}

#[async_trait]
impl DefinitionStore for CopiedDefinitions {
    async fn put(&self, kind: DefinitionKind, name: &str, body: Value) -> StorageResult<u32> {
        self.shared.put(kind, name, body).await
    }

    async fn put_first(
        &self,
        kind: DefinitionKind,
        name: &str,
        body: Value,
    ) -> StorageResult<bool> {
        self.shared.put_first(kind, name, body).await
    }

    async fn get(
        &self,
        kind: DefinitionKind,
        name: &str,
        version: Option<u32>,
    ) -> StorageResult<Option<Definition>> {
        let result = self.shared.get(kind, name, version).await;
        self.copy.answer(
            result,
            |copy, found| match (found, version) {
                (Some(d), _) => copy.keep_version(d),
                (None, None) => copy.forget(kind, name),
                (None, Some(version)) => copy
                    .definitions
                    .get_mut(&(kind, name.to_owned()))
                    .is_some_and(|named| named.versions.remove(&version).is_some()),
            },
            |copy| {
                let versions = &copy.named(kind, name)?.versions;
                match version {
                    Some(version) => versions.get(&version).cloned(),
                    None => versions.values().next_back().cloned(),
                }
            },
        )
    }

    async fn versions(&self, kind: DefinitionKind, name: &str) -> StorageResult<Vec<Definition>> {
        let result = self.shared.versions(kind, name).await;
        self.copy.answer(
            result,
            |copy, versions| {
                if versions.is_empty() {
                    return copy.forget(kind, name);
                }
                let named = copy.definitions.entry((kind, name.to_owned())).or_default();
                let read = versions.iter().map(|d| (d.version, d.clone())).collect();
                set(&mut named.versions, read)
            },
            |copy| {
                copy.named(kind, name)
                    .map(|named| named.versions.values().cloned().collect())
                    .unwrap_or_default()
            },
        )
    }

    async fn list(&self, kind: DefinitionKind) -> StorageResult<Vec<Definition>> {
        let result = self.shared.list(kind).await;
        self.copy.answer(
            result,
            |copy, latest| {
                let mut changed = false;
                for d in latest {
                    changed |= copy.keep_version(d);
                }
                // Names no longer listed were deleted.
                let before = copy.definitions.len();
                copy.definitions
                    .retain(|(k, name), _| *k != kind || latest.iter().any(|d| &d.name == name));
                changed || copy.definitions.len() != before
            },
            |copy| copy.list(kind),
        )
    }

    async fn delete(&self, kind: DefinitionKind, name: &str) -> StorageResult<bool> {
        self.shared.delete(kind, name).await
    }

    async fn set_active(
        &self,
        kind: DefinitionKind,
        name: &str,
        version: u32,
    ) -> StorageResult<bool> {
        self.shared.set_active(kind, name, version).await
    }

    async fn active(&self, kind: DefinitionKind, name: &str) -> StorageResult<Option<u32>> {
        let result = self.shared.active(kind, name).await;
        self.copy.answer(
            result,
            |copy, active| match copy.definitions.get_mut(&(kind, name.to_owned())) {
                Some(named) => set(&mut named.active, *active),
                None => false,
            },
            |copy| copy.named(kind, name).and_then(|named| named.active),
        )
    }
}

/// A shared [`ContentStore`] whose reads are kept in a [`CatalogCopy`] and answered from
/// it while the shared store is unavailable.
pub struct CopiedContent {
    shared: Arc<dyn ContentStore>,
    copy: Arc<CatalogCopy>,
}

impl CopiedContent {
    pub fn new(shared: Arc<dyn ContentStore>, copy: Arc<CatalogCopy>) -> Self {
        CopiedContent { shared, copy }
    }
}

/// Keeps what a read said of one item: its value, or that it does not exist.
fn keep_item(
    content: &mut BTreeMap<String, ContentItem>,
    id: &str,
    item: Option<&ContentItem>,
) -> bool {
    match item {
        Some(item) => match content.get(id) {
            Some(kept) if kept == item => false,
            _ => {
                content.insert(id.to_owned(), item.clone());
                true
            }
        },
        None => content.remove(id).is_some(),
    }
}

#[async_trait]
impl ContentStore for CopiedContent {
    async fn upsert(&self, item: &ContentItem) -> StorageResult<()> {
        self.shared.upsert(item).await
    }

    async fn get(&self, id: &str) -> StorageResult<Option<ContentItem>> {
        let result = self.shared.get(id).await;
        self.copy.answer(
            result,
            |copy, item| keep_item(&mut copy.content, id, item.as_ref()),
            |copy| copy.content.get(id).cloned(),
        )
    }

    async fn get_many(&self, ids: &[String]) -> StorageResult<Vec<Option<ContentItem>>> {
        let result = self.shared.get_many(ids).await;
        self.copy.answer(
            result,
            |copy, items| {
                let mut changed = false;
                for (id, item) in ids.iter().zip(items) {
                    changed |= keep_item(&mut copy.content, id, item.as_ref());
                }
                changed
            },
            |copy| ids.iter().map(|id| copy.content.get(id).cloned()).collect(),
        )
    }

    async fn list(&self) -> StorageResult<Vec<ContentItem>> {
        let result = self.shared.list().await;
        self.copy.answer(
            result,
            |copy, items| {
                let read: BTreeMap<String, ContentItem> = items
                    .iter()
                    .map(|item| (item.id.clone(), item.clone()))
                    .collect();
                set(&mut copy.content, read)
            },
            |copy| copy.content.values().cloned().collect(),
        )
    }

    async fn delete(&self, id: &str) -> StorageResult<bool> {
        self.shared.delete(id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::conformance::sample_content_item;
    use crate::storage::embedded::EmbeddedStore;
    use serde_json::json;

    /// The shared store the tests' copies are of.
    const SHARED: &str = "redis://user:pass@127.0.0.1:6379/0?prefix=p";

    /// What the copy would answer for `kind` and for the content list.
    fn served(copy: &CatalogCopy, kind: DefinitionKind) -> (Vec<Definition>, Vec<ContentItem>) {
        copy.read(|kept| (kept.list(kind), kept.content.values().cloned().collect()))
    }

    /// Reads through the wrappers are kept; a save writes them to the local store, a copy
    /// opened from it answers the same, and a save that lost its slot midway leaves the
    /// previous copy to be read.
    #[tokio::test]
    async fn keeps_what_was_read_and_reads_back_what_was_saved() {
        let (shared_dir, local_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let shared = EmbeddedStore::open(shared_dir.path()).unwrap().stores();
        let local = EmbeddedStore::open(local_dir.path()).unwrap().stores();
        let copy = CatalogCopy::open(local.definitions.clone(), SHARED)
            .await
            .unwrap();
        assert!(!copy.save().await.unwrap(), "nothing read, nothing to save");
        let definitions = CopiedDefinitions::new(shared.definitions.clone(), copy.clone());
        let content = CopiedContent::new(shared.content.clone(), copy.clone());

        let feature = DefinitionKind::Feature;
        definitions
            .put(feature, "a", json!({"v": 1}))
            .await
            .unwrap();
        definitions
            .put(feature, "a", json!({"v": 2}))
            .await
            .unwrap();
        definitions.set_active(feature, "a", 1).await.unwrap();
        definitions
            .put(feature, "b", json!({"v": 1}))
            .await
            .unwrap();
        content.upsert(&sample_content_item("i1", 1)).await.unwrap();
        for latest in definitions.list(feature).await.unwrap() {
            definitions.versions(feature, &latest.name).await.unwrap();
            definitions.active(feature, &latest.name).await.unwrap();
        }
        content.list().await.unwrap();
        let read = served(&copy, feature);
        assert_eq!(read.0, shared.definitions.list(feature).await.unwrap());
        assert_eq!(read.1, shared.content.list().await.unwrap());
        assert!(copy.save().await.unwrap());
        assert!(!copy.save().await.unwrap(), "unchanged since saved");

        let reopened = CatalogCopy::open(local.definitions.clone(), SHARED)
            .await
            .unwrap();
        assert_eq!(served(&reopened, feature), read);
        assert!(reopened.loaded_from().is_some());
        assert_eq!(
            reopened.read(|kept| kept.named(feature, "a").cloned()),
            copy.read(|kept| kept.named(feature, "a").cloned()),
            "every version read and the active pointer"
        );

        // A deletion seen by a later list is kept too, saved under the other name.
        definitions.delete(feature, "b").await.unwrap();
        definitions.list(feature).await.unwrap();
        assert!(copy.save().await.unwrap());
        assert_eq!(served(&copy, feature).0.len(), 1);
        let reopened = CatalogCopy::open(local.definitions.clone(), SHARED)
            .await
            .unwrap();
        assert_eq!(served(&reopened, feature), served(&copy, feature));

        // The newest save lost (a crash between its delete and its put): the one before.
        local
            .definitions
            .delete(DefinitionKind::CatalogCopy, SLOTS[1])
            .await
            .unwrap();
        let reopened = CatalogCopy::open(local.definitions.clone(), SHARED)
            .await
            .unwrap();
        assert_eq!(served(&reopened, feature), read);

        // The same store under other credentials is the same store; another one is not
        // served this copy, and its first save replaces it.
        let same = "redis://other:secret@127.0.0.1:6379/0?prefix=p";
        let reopened = CatalogCopy::open(local.definitions.clone(), same)
            .await
            .unwrap();
        assert_eq!(served(&reopened, feature), read);
        let other = CatalogCopy::open(
            local.definitions.clone(),
            "redis://10.0.0.9:6379/0?prefix=p",
        )
        .await
        .unwrap();
        assert!(!other.has_data(), "a copy of another store is not served");
        assert_eq!(other.loaded_from(), None);
        let content = CopiedContent::new(shared.content.clone(), other.clone());
        content.list().await.unwrap();
        assert!(other.save().await.unwrap());
        let reopened = CatalogCopy::open(local.definitions.clone(), SHARED)
            .await
            .unwrap();
        assert!(!reopened.has_data(), "the first store's copy was replaced");
    }

    #[test]
    fn a_source_is_its_address_without_credentials() {
        assert_eq!(source_of(SHARED), "redis://127.0.0.1:6379/0?prefix=p");
        assert_eq!(
            source_of("redis+cluster://a:b@h1:7000,:pw@h2:7001?prefix=x"),
            "redis+cluster://h1:7000,h2:7001?prefix=x"
        );
        assert_eq!(source_of("redis://h"), "redis://h");
    }
}
