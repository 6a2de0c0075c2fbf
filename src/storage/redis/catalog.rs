//! What every replica must agree on (`backends.definitions`): content items
//! ([`ContentStore`]), versioned definitions ([`DefinitionStore`]: segments, features,
//! experiments, rules), experiment totals ([`ExperimentStore`]) and API keys
//! ([`KeyStore`]).
//!
//! All of it is small and read through each process's caches, so every key carries the
//! one hash tag `{catalog}`: on a cluster it lives on one node, and every write that must
//! be atomic (a definition's version counter with its versions, a batch of experiment
//! totals, a revocation) is one Lua script. Keys (`<len>` is the length in bytes of what
//! follows it, so that no kind/name pair can spell another's key):
//! - `content:{catalog}`: a hash, item id → item JSON;
//! - `definition_seq:{catalog}`: a hash, `<kind>\n<name>` → the last version number
//!   handed out (never reset, so versions are not reused after a delete);
//! - `definition:{catalog}:<kind>:<len>:<name>`: a hash, version → `{body, created_at}`;
//! - `definition_latest:{catalog}:<kind>`: a hash, name → `<version>\n{body, created_at}`
//!   (what `list` and `get` of the latest read in one call);
//! - `definition_active:{catalog}`: a hash, `<kind>\n<name>` → the active version;
//! - `experiment_totals:{catalog}:<len>:<experiment>`: a hash, `<variant>\n<total>` → a
//!   number as 17 significant digits, added to by one script per batch;
//!   `experiment_totals_by_process:{catalog}:<len>:<experiment>`: a hash,
//!   `<process>\n<variant>\n<total>` → the process's whole total ([`PublishedTotals`]);
//!   the experiment's totals are the sum of both;
//! - `api_keys:{catalog}`: a hash, key id → the record without `revoked_at`;
//!   `api_keys_revoked:{catalog}`: a hash, key id → the first revocation time;
//! - `privacy_journal:{catalog}`: a stream, one entry per erasure or renewed consent
//!   ([`PrivacyJournal`]), its one field `entry` the JSON of a [`PrivacyEntry`]. It is
//!   never trimmed: a process started later must still learn every erased id, to refuse
//!   their events (as each process's markers are kept).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redis::Script;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{stored_f64, RedisStore};
use crate::auth::keys::KeyRecord;
use crate::content::ContentItem;
use crate::experiments::VariantTotals;
use crate::storage::{
    ContentStore, Definition, DefinitionKind, DefinitionStore, ExperimentStore, KeyStore,
    PrivacyEntry, PrivacyJournal, PublishedTotals, StorageError, StorageResult,
};

const TAG: &str = "catalog";

fn encode<T: Serialize>(what: &str, value: &T) -> StorageResult<String> {
    serde_json::to_string(value).map_err(|e| StorageError::Backend(format!("encoding {what}: {e}")))
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, raw: &str) -> StorageResult<T> {
    serde_json::from_str(raw).map_err(|e| StorageError::Corrupt(format!("{what}: {e}")))
}

// ---------------------------------------------------------------------------------------
// Content
// ---------------------------------------------------------------------------------------

/// [`ContentStore`] on Redis.
pub struct RedisContent {
    store: Arc<RedisStore>,
}

impl RedisContent {
    pub fn new(store: Arc<RedisStore>) -> Self {
        RedisContent { store }
    }

    fn key(&self) -> String {
        self.store.key("content", TAG)
    }
}

#[async_trait]
impl ContentStore for RedisContent {
    async fn upsert(&self, item: &ContentItem) -> StorageResult<()> {
        let (key, id, value) = (self.key(), item.id.clone(), encode("content item", item)?);
        self.store
            .call("store a content item", |mut c| async move {
                redis::cmd("HSET")
                    .arg(key)
                    .arg(id)
                    .arg(value)
                    .query_async::<()>(&mut c)
                    .await
            })
            .await
    }

    async fn get(&self, id: &str) -> StorageResult<Option<ContentItem>> {
        Ok(self
            .get_many(&[id.to_owned()])
            .await?
            .into_iter()
            .next()
            .flatten())
    }

    async fn get_many(&self, ids: &[String]) -> StorageResult<Vec<Option<ContentItem>>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let key = self.key();
        let raw: Vec<Option<String>> = self
            .store
            .call("read content items", |mut c| async move {
                redis::cmd("HMGET")
                    .arg(key)
                    .arg(ids)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        raw.iter()
            .zip(ids)
            .map(|(raw, id)| {
                raw.as_deref()
                    .map(|r| decode(&format!("content item {id}"), r))
                    .transpose()
            })
            .collect()
    }

    async fn list(&self) -> StorageResult<Vec<ContentItem>> {
        let key = self.key();
        let all: BTreeMap<String, String> = self
            .store
            .call("list content items", |mut c| async move {
                redis::cmd("HGETALL").arg(key).query_async(&mut c).await
            })
            .await?;
        all.iter()
            .map(|(id, raw)| decode(&format!("content item {id}"), raw))
            .collect()
    }

    async fn delete(&self, id: &str) -> StorageResult<bool> {
        let (key, id) = (self.key(), id.to_owned());
        self.store
            .call("delete a content item", |mut c| async move {
                redis::cmd("HDEL")
                    .arg(key)
                    .arg(id)
                    .query_async::<i64>(&mut c)
                    .await
            })
            .await
            .map(|n| n > 0)
    }
}

// ---------------------------------------------------------------------------------------
// Definitions
// ---------------------------------------------------------------------------------------

/// KEYS: the counters, the name's versions, the kind's latest; ARGV: `<kind>\n<name>`,
/// the name, the entry, "1" to store only a first version. Returns the new version, or 0
/// (nothing stored) when only a first version was asked for and the name ever had one.
static PUT_DEFINITION: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if ARGV[4] == '1' and redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
local v = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('HSET', KEYS[2], v, ARGV[3])
redis.call('HSET', KEYS[3], ARGV[2], v .. '\n' .. ARGV[3])
return v
",
    )
});

/// KEYS: the name's versions, the kind's latest, the active pointers; ARGV:
/// `<kind>\n<name>`, the name. Returns how many keys it deleted (0: nothing stored).
static DELETE_DEFINITION: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local n = redis.call('DEL', KEYS[1])
redis.call('HDEL', KEYS[2], ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[1])
return n
",
    )
});

/// KEYS: the name's versions, the active pointers; ARGV: `<kind>\n<name>`, the version.
/// Returns 1 when the version exists (and is now active), else 0.
static SET_ACTIVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('HEXISTS', KEYS[1], ARGV[2]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
",
    )
});

/// A stored version, without what its key already says.
#[derive(Serialize, Deserialize)]
struct Entry {
    body: Value,
    created_at: DateTime<Utc>,
}

/// [`DefinitionStore`] on Redis.
pub struct RedisDefinitions {
    store: Arc<RedisStore>,
}

impl RedisDefinitions {
    pub fn new(store: Arc<RedisStore>) -> Self {
        RedisDefinitions { store }
    }

    fn field(kind: DefinitionKind, name: &str) -> String {
        format!("{}\n{name}", kind.as_str())
    }

    fn seq_key(&self) -> String {
        self.store.key("definition_seq", TAG)
    }

    fn versions_key(&self, kind: DefinitionKind, name: &str) -> String {
        format!(
            "{}:{}:{}:{name}",
            self.store.key("definition", TAG),
            kind.as_str(),
            name.len()
        )
    }

    fn latest_key(&self, kind: DefinitionKind) -> String {
        format!(
            "{}:{}",
            self.store.key("definition_latest", TAG),
            kind.as_str()
        )
    }

    fn active_key(&self) -> String {
        self.store.key("definition_active", TAG)
    }

    fn definition(
        kind: DefinitionKind,
        name: &str,
        version: u32,
        raw: &str,
    ) -> StorageResult<Definition> {
        let entry: Entry = decode(
            &format!("definition {}/{name} v{version}", kind.as_str()),
            raw,
        )?;
        Ok(Definition {
            kind,
            name: name.to_owned(),
            version,
            body: entry.body,
            created_at: entry.created_at,
        })
    }

    /// Stores `body` as the next version of (kind, name) and returns it; with
    /// `first_only`, only when the name never had a version (`None` otherwise).
    async fn store_next(
        &self,
        kind: DefinitionKind,
        name: &str,
        body: Value,
        first_only: bool,
    ) -> StorageResult<Option<u32>> {
        let entry = encode(
            "definition",
            &Entry {
                body,
                created_at: Utc::now(),
            },
        )?;
        let keys = [
            self.seq_key(),
            self.versions_key(kind, name),
            self.latest_key(kind),
        ];
        let args = [
            Self::field(kind, name),
            name.to_owned(),
            entry,
            if first_only { "1" } else { "0" }.to_owned(),
        ];
        let version: i64 = self
            .store
            .call("store a definition", |mut c| async move {
                PUT_DEFINITION
                    .key(&keys[..])
                    .arg(&args[..])
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        if version == 0 {
            return Ok(None);
        }
        u32::try_from(version).map(Some).map_err(|_| {
            StorageError::Backend(format!(
                "definition {}/{name}: version numbers exhausted",
                kind.as_str()
            ))
        })
    }

    /// A `<version>\n<entry>` value of the latest hash.
    fn latest(kind: DefinitionKind, name: &str, raw: &str) -> StorageResult<Definition> {
        let (version, entry) = raw
            .split_once('\n')
            .and_then(|(v, e)| Some((v.parse::<u32>().ok()?, e)))
            .ok_or_else(|| {
                StorageError::Corrupt(format!(
                    "definition {}/{name}: latest version is not `<version>\\n<entry>`",
                    kind.as_str()
                ))
            })?;
        Self::definition(kind, name, version, entry)
    }
}

#[async_trait]
impl DefinitionStore for RedisDefinitions {
    async fn put(&self, kind: DefinitionKind, name: &str, body: Value) -> StorageResult<u32> {
        let stored = self.store_next(kind, name, body, false).await?;
        stored.ok_or_else(|| StorageError::Backend("definition version not stored".into()))
    }

    async fn put_first(
        &self,
        kind: DefinitionKind,
        name: &str,
        body: Value,
    ) -> StorageResult<bool> {
        Ok(self.store_next(kind, name, body, true).await?.is_some())
    }

    async fn get(
        &self,
        kind: DefinitionKind,
        name: &str,
        version: Option<u32>,
    ) -> StorageResult<Option<Definition>> {
        let (key, field) = match version {
            Some(v) => (self.versions_key(kind, name), v.to_string()),
            None => (self.latest_key(kind), name.to_owned()),
        };
        let raw: Option<String> = self
            .store
            .call("read a definition", |mut c| async move {
                redis::cmd("HGET")
                    .arg(key)
                    .arg(field)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        raw.map(|raw| match version {
            Some(v) => Self::definition(kind, name, v, &raw),
            None => Self::latest(kind, name, &raw),
        })
        .transpose()
    }

    async fn versions(&self, kind: DefinitionKind, name: &str) -> StorageResult<Vec<Definition>> {
        let key = self.versions_key(kind, name);
        let all: HashMap<String, String> = self
            .store
            .call("read definition versions", |mut c| async move {
                redis::cmd("HGETALL").arg(key).query_async(&mut c).await
            })
            .await?;
        let mut out = all
            .iter()
            .map(|(version, raw)| {
                let version = version.parse::<u32>().map_err(|_| {
                    StorageError::Corrupt(format!(
                        "definition {}/{name}: version {version:?} is not a number",
                        kind.as_str()
                    ))
                })?;
                Self::definition(kind, name, version, raw)
            })
            .collect::<StorageResult<Vec<_>>>()?;
        out.sort_by_key(|d| d.version);
        Ok(out)
    }

    async fn list(&self, kind: DefinitionKind) -> StorageResult<Vec<Definition>> {
        let key = self.latest_key(kind);
        let all: BTreeMap<String, String> = self
            .store
            .call("list definitions", |mut c| async move {
                redis::cmd("HGETALL").arg(key).query_async(&mut c).await
            })
            .await?;
        all.iter()
            .map(|(name, raw)| Self::latest(kind, name, raw))
            .collect()
    }

    async fn delete(&self, kind: DefinitionKind, name: &str) -> StorageResult<bool> {
        let keys = [
            self.versions_key(kind, name),
            self.latest_key(kind),
            self.active_key(),
        ];
        let args = [Self::field(kind, name), name.to_owned()];
        let deleted: i64 = self
            .store
            .call("delete a definition", |mut c| async move {
                DELETE_DEFINITION
                    .key(&keys[..])
                    .arg(&args[..])
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(deleted > 0)
    }

    async fn set_active(
        &self,
        kind: DefinitionKind,
        name: &str,
        version: u32,
    ) -> StorageResult<bool> {
        let keys = [self.versions_key(kind, name), self.active_key()];
        let args = [Self::field(kind, name), version.to_string()];
        let set: i64 = self
            .store
            .call("activate a definition", |mut c| async move {
                SET_ACTIVE
                    .key(&keys[..])
                    .arg(&args[..])
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(set == 1)
    }

    async fn active(&self, kind: DefinitionKind, name: &str) -> StorageResult<Option<u32>> {
        let (key, field) = (self.active_key(), Self::field(kind, name));
        let raw: Option<String> = self
            .store
            .call("read an active version", |mut c| async move {
                redis::cmd("HGET")
                    .arg(key)
                    .arg(field)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        raw.map(|v| {
            v.parse::<u32>().map_err(|_| {
                StorageError::Corrupt(format!(
                    "definition {}/{name}: active version {v:?} is not a number",
                    kind.as_str()
                ))
            })
        })
        .transpose()
    }
}

// ---------------------------------------------------------------------------------------
// Experiment totals
// ---------------------------------------------------------------------------------------

/// ARGV: the delta count, then per delta six values: the index in KEYS of the
/// experiment's hash, the variant, and the four deltas. Adds every
/// delta (a pair named twice gets both) or, when a sum would not be finite, none. The
/// four totals are `exposures`, `conversions`, `value_sum`, `value_sum_sq`.
static ADD_TOTALS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local names = {'exposures', 'conversions', 'value_sum', 'value_sum_sq'}
local sums, order = {}, {}
for i = 0, tonumber(ARGV[1]) - 1 do
  local at = 2 + i * 6
  local key = KEYS[tonumber(ARGV[at])]
  for j = 1, 4 do
    local field = ARGV[at + 1] .. '\n' .. names[j]
    local id = key .. '\0' .. field
    if sums[id] == nil then
      sums[id] = tonumber(redis.call('HGET', key, field) or '0')
      order[#order + 1] = {key, field, id}
    end
    local sum = sums[id] + tonumber(ARGV[at + 1 + j])
    if sum ~= sum or sum == math.huge or sum == -math.huge then
      return redis.error_reply('refusing a sum that is not finite in field ' .. field)
    end
    sums[id] = sum
  end
end
for _, o in ipairs(order) do
  redis.call('HSET', o[1], o[2], string.format('%.17g', sums[o[3]]))
end
return 1
",
    )
});

/// [`ExperimentStore`] on Redis.
pub struct RedisExperiments {
    store: Arc<RedisStore>,
}

impl RedisExperiments {
    pub fn new(store: Arc<RedisStore>) -> Self {
        RedisExperiments { store }
    }

    fn key(&self, experiment: &str) -> String {
        self.key_of("experiment_totals", experiment)
    }

    fn by_process_key(&self, experiment: &str) -> String {
        self.key_of("experiment_totals_by_process", experiment)
    }

    fn key_of(&self, kind: &str, experiment: &str) -> String {
        format!(
            "{}:{}:{experiment}",
            self.store.key(kind, TAG),
            experiment.len()
        )
    }

    /// The added totals and every process's published ones of `experiment`, summed per
    /// variant, leaving out those published by `except`.
    async fn summed(
        &self,
        experiment: &str,
        except: Option<&str>,
    ) -> StorageResult<Vec<(String, VariantTotals)>> {
        let (added, by_process) = (self.key(experiment), self.by_process_key(experiment));
        let (added, published): (HashMap<String, String>, HashMap<String, String>) = self
            .store
            .call("read experiment totals", |mut c| async move {
                redis::pipe()
                    .cmd("HGETALL")
                    .arg(added)
                    .cmd("HGETALL")
                    .arg(by_process)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        let mut variants: BTreeMap<String, VariantTotals> = BTreeMap::new();
        for (field, raw) in &added {
            let what = format!("experiment {experiment} field {field:?}");
            let Some((variant, total)) = field.rsplit_once('\n') else {
                return Err(StorageError::Corrupt(format!("{what}: no variant")));
            };
            add_total(
                variants.entry(variant.to_owned()).or_default(),
                &what,
                total,
                raw,
            )?;
        }
        for (field, raw) in &published {
            let what = format!("experiment {experiment} published field {field:?}");
            let Some((process, rest)) = field.split_once('\n') else {
                return Err(StorageError::Corrupt(format!("{what}: no process")));
            };
            let Some((variant, total)) = rest.rsplit_once('\n') else {
                return Err(StorageError::Corrupt(format!("{what}: no variant")));
            };
            if except == Some(process) {
                continue;
            }
            add_total(
                variants.entry(variant.to_owned()).or_default(),
                &what,
                total,
                raw,
            )?;
        }
        Ok(variants.into_iter().collect())
    }
}

/// Adds the stored figure `raw` of the named `total` to `sum`.
fn add_total(sum: &mut VariantTotals, what: &str, total: &str, raw: &str) -> StorageResult<()> {
    let mut one = VariantTotals::default();
    match total {
        "exposures" => one.exposures = stored_count(what, raw)?,
        "conversions" => one.conversions = stored_count(what, raw)?,
        "value_sum" => one.value_sum = stored_f64(what, raw)?,
        "value_sum_sq" => one.value_sum_sq = stored_f64(what, raw)?,
        _ => return Err(StorageError::Corrupt(format!("{what}: unknown total"))),
    }
    sum.merge(one);
    Ok(())
}

/// A stored count: whole and not negative.
fn stored_count(what: &str, raw: &str) -> StorageResult<u64> {
    let value = stored_f64(what, raw)?;
    if value < 0.0 || value.fract() != 0.0 || value > 2f64.powi(53) {
        return Err(StorageError::Corrupt(format!(
            "{what}: {raw:?} is not a count"
        )));
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok(value as u64)
}

#[async_trait]
impl ExperimentStore for RedisExperiments {
    async fn add(&self, deltas: &[(String, String, VariantTotals)]) -> StorageResult<()> {
        VariantTotals::check_finite(deltas)?;
        if deltas.is_empty() {
            return Ok(());
        }
        let mut keys: Vec<String> = Vec::new();
        let mut args: Vec<String> = vec![deltas.len().to_string()];
        for (experiment, variant, d) in deltas {
            let key = self.key(experiment);
            let index = match keys.iter().position(|k| *k == key) {
                Some(i) => i + 1,
                None => {
                    keys.push(key);
                    keys.len()
                }
            };
            args.push(index.to_string());
            args.push(variant.clone());
            args.push(d.exposures.to_string());
            args.push(d.conversions.to_string());
            // Debug formatting of an f64 is the shortest text that parses back exactly.
            args.push(format!("{:?}", d.value_sum));
            args.push(format!("{:?}", d.value_sum_sq));
        }
        self.store
            .call("add experiment totals", |mut c| async move {
                ADD_TOTALS
                    .key(keys)
                    .arg(args)
                    .invoke_async::<()>(&mut c)
                    .await
            })
            .await
    }

    async fn totals(&self, experiment: &str) -> StorageResult<Vec<(String, VariantTotals)>> {
        self.summed(experiment, None).await
    }
}

#[async_trait]
impl PublishedTotals for RedisExperiments {
    async fn publish(
        &self,
        process: &str,
        totals: &[(String, String, VariantTotals)],
    ) -> StorageResult<()> {
        VariantTotals::check_finite(totals)?;
        if process.contains('\n') {
            return Err(StorageError::Backend(format!(
                "process id {process:?} holds a line break"
            )));
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        for (experiment, variant, t) in totals {
            let field = |total: &str| format!("{process}\n{variant}\n{total}");
            pipe.cmd("HSET")
                .arg(self.by_process_key(experiment))
                .arg(field("exposures"))
                .arg(t.exposures)
                .arg(field("conversions"))
                .arg(t.conversions)
                // Debug formatting of an f64 is the shortest text that parses back exactly.
                .arg(field("value_sum"))
                .arg(format!("{:?}", t.value_sum))
                .arg(field("value_sum_sq"))
                .arg(format!("{:?}", t.value_sum_sq))
                .ignore();
        }
        self.store
            .call("publish experiment totals", |mut c| async move {
                pipe.query_async::<()>(&mut c).await
            })
            .await
    }

    async fn totals_except(
        &self,
        experiment: &str,
        process: &str,
    ) -> StorageResult<Vec<(String, VariantTotals)>> {
        self.summed(experiment, Some(process)).await
    }
}

// ---------------------------------------------------------------------------------------
// API keys
// ---------------------------------------------------------------------------------------

/// KEYS: the records, the revocations; ARGV: the id, the time. Sets the revocation time
/// unless one is set; returns the record and the stored time, or nil for no such key.
static REVOKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local record = redis.call('HGET', KEYS[1], ARGV[1])
if not record then return nil end
redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2])
return {record, redis.call('HGET', KEYS[2], ARGV[1])}
",
    )
});

/// [`KeyStore`] on Redis.
pub struct RedisKeys {
    store: Arc<RedisStore>,
}

impl RedisKeys {
    pub fn new(store: Arc<RedisStore>) -> Self {
        RedisKeys { store }
    }

    fn records_key(&self) -> String {
        self.store.key("api_keys", TAG)
    }

    fn revoked_key(&self) -> String {
        self.store.key("api_keys_revoked", TAG)
    }

    fn record(id: &str, raw: &str, revoked: Option<&str>) -> StorageResult<KeyRecord> {
        let mut record: KeyRecord = decode(&format!("API key {id}"), raw)?;
        record.revoked_at = revoked
            .map(|at| {
                DateTime::parse_from_rfc3339(at)
                    .map(|at| at.with_timezone(&Utc))
                    .map_err(|e| StorageError::Corrupt(format!("API key {id} revocation: {e}")))
            })
            .transpose()?;
        Ok(record)
    }
}

#[async_trait]
impl KeyStore for RedisKeys {
    async fn insert(&self, key: &KeyRecord) -> StorageResult<bool> {
        let mut record = key.clone();
        let revoked = record.revoked_at.take();
        let value = encode("API key", &record)?;
        let (records, revocations, id) = (self.records_key(), self.revoked_key(), key.id.clone());
        let inserted: bool = self
            .store
            .call("store an API key", |mut c| async move {
                let mut pipe = redis::pipe();
                pipe.atomic()
                    .cmd("HSETNX")
                    .arg(&records)
                    .arg(&id)
                    .arg(value);
                if let Some(at) = revoked {
                    pipe.cmd("HSETNX")
                        .arg(&revocations)
                        .arg(&id)
                        .arg(at.to_rfc3339())
                        .ignore();
                }
                let (inserted,): (bool,) = pipe.query_async(&mut c).await?;
                Ok(inserted)
            })
            .await?;
        Ok(inserted)
    }

    async fn get(&self, id: &str) -> StorageResult<Option<KeyRecord>> {
        let (records, revocations, field) = (self.records_key(), self.revoked_key(), id.to_owned());
        let (raw, revoked): (Option<String>, Option<String>) = self
            .store
            .call("read an API key", |mut c| async move {
                redis::pipe()
                    .cmd("HGET")
                    .arg(records)
                    .arg(&field)
                    .cmd("HGET")
                    .arg(revocations)
                    .arg(&field)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        raw.map(|raw| Self::record(id, &raw, revoked.as_deref()))
            .transpose()
    }

    async fn list(&self) -> StorageResult<Vec<KeyRecord>> {
        let (records, revocations) = (self.records_key(), self.revoked_key());
        let (all, revoked): (BTreeMap<String, String>, BTreeMap<String, String>) = self
            .store
            .call("list API keys", |mut c| async move {
                redis::pipe()
                    .cmd("HGETALL")
                    .arg(records)
                    .cmd("HGETALL")
                    .arg(revocations)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        all.iter()
            .map(|(id, raw)| Self::record(id, raw, revoked.get(id).map(String::as_str)))
            .collect()
    }

    async fn revoke(&self, id: &str, at: DateTime<Utc>) -> StorageResult<Option<KeyRecord>> {
        let keys = [self.records_key(), self.revoked_key()];
        let args = [id.to_owned(), at.to_rfc3339()];
        let stored: Option<(String, String)> = self
            .store
            .call("revoke an API key", |mut c| async move {
                REVOKE
                    .key(&keys[..])
                    .arg(&args[..])
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        stored
            .map(|(raw, revoked)| Self::record(id, &raw, Some(&revoked)))
            .transpose()
    }
}

// ---------------------------------------------------------------------------------------
// Privacy journal
// ---------------------------------------------------------------------------------------

/// [`PrivacyJournal`] on Redis: a stream, whose entry ids are the positions.
pub struct RedisJournal {
    store: Arc<RedisStore>,
}

impl RedisJournal {
    pub fn new(store: Arc<RedisStore>) -> Self {
        RedisJournal { store }
    }

    fn key(&self) -> String {
        self.store.key("privacy_journal", TAG)
    }
}

#[async_trait]
impl PrivacyJournal for RedisJournal {
    async fn append(&self, entry: &PrivacyEntry) -> StorageResult<String> {
        let (key, value) = (self.key(), encode("privacy journal entry", entry)?);
        self.store
            .call("append to the privacy journal", |mut c| async move {
                redis::cmd("XADD")
                    .arg(key)
                    .arg("*")
                    .arg("entry")
                    .arg(value)
                    .query_async::<String>(&mut c)
                    .await
            })
            .await
    }

    async fn read_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> StorageResult<Vec<(String, PrivacyEntry)>> {
        let key = self.key();
        // `(id` is exclusive (Redis 6.2 and later).
        let start = after.map_or_else(|| "-".to_owned(), |after| format!("({after}"));
        let raw: Vec<(String, Vec<String>)> = self
            .store
            .call("read the privacy journal", |mut c| async move {
                redis::cmd("XRANGE")
                    .arg(key)
                    .arg(start)
                    .arg("+")
                    .arg("COUNT")
                    .arg(limit.clamp(1, i64::MAX as usize))
                    .query_async(&mut c)
                    .await
            })
            .await?;
        raw.into_iter()
            .map(|(position, fields)| {
                let value = fields
                    .chunks(2)
                    .find(|pair| pair[0] == "entry")
                    .and_then(|pair| pair.get(1))
                    .ok_or_else(|| {
                        StorageError::Corrupt(format!(
                            "privacy journal entry {position}: no field `entry`"
                        ))
                    })?;
                let entry = decode(&format!("privacy journal entry {position}"), value)?;
                Ok((position, entry))
            })
            .collect()
    }
}
