//! The rule lifecycle: rules and plugins loaded from their directories at start and
//! hot-reloaded when a file changes, rules managed through `putRule`/`deleteRule`/
//! `activateRuleVersion`, every version stored, and one active [`RuleSet`] swapped
//! atomically.
//!
//! A rule that does not compile is refused with its line and column and the version
//! before it stays active, whether it came from the API or from a file. The store is the
//! source of truth: the reload tick also picks up rules changed by another replica.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::runtime::{ActiveRule, RuleSet};
use super::{compile, engine_with, Natives, Plugins, RuleError};
use crate::error::{Error, Result};
use crate::storage::{Definition, DefinitionKind, DefinitionStore, StorageError};
use crate::telemetry::Metrics;

/// Where rules come from and how they run.
#[derive(Debug, Clone)]
pub struct RuleSettings {
    /// `rules/`: loaded at start and watched; `None` or missing: API-managed rules only.
    pub dir: Option<PathBuf>,
    /// `plugins/`: loaded at start and watched.
    pub plugins_dir: Option<PathBuf>,
    /// Wall-clock budget of one rule's evaluation in one decision (or one event).
    pub budget: Duration,
}

/// A stored version's body.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Body {
    source: String,
    /// `api`, or `file:NAME.rhai` for a rule loaded from the rules directory.
    origin: String,
}

/// One version of a rule, as listed.
#[derive(Debug, Clone)]
pub struct RuleVersion {
    pub version: u32,
    pub source: String,
    pub origin: String,
    pub created_at: DateTime<Utc>,
}

/// A rule as the API shows it: its active version, compiled.
#[derive(Debug, Clone)]
pub struct RuleInfo {
    pub active: Arc<ActiveRule>,
    pub origin: String,
    pub updated_at: DateTime<Utc>,
}

struct State {
    set: Arc<RuleSet>,
    plugins: Plugins,
    /// Origin and time of each active rule, by name.
    origins: BTreeMap<String, (String, DateTime<Utc>)>,
}

/// Content hashes of the files last loaded, to tell which changed.
#[derive(Default)]
struct Seen {
    rules: HashMap<PathBuf, u64>,
    plugins: HashMap<PathBuf, u64>,
}

pub struct RuleService {
    definitions: Arc<dyn DefinitionStore>,
    settings: RuleSettings,
    natives: Natives,
    metrics: Arc<Metrics>,
    state: RwLock<State>,
    /// Serialises changes (API, reload) so versions and the active set agree.
    changes: tokio::sync::Mutex<Seen>,
}

impl RuleService {
    /// Loads the plugins, the stored rules, then the rules directory (a file whose
    /// source differs from its rule's active version becomes a new version).
    pub async fn open(
        definitions: Arc<dyn DefinitionStore>,
        settings: RuleSettings,
        natives: Natives,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>> {
        let engine = Arc::new(engine_with(&natives, Some(&Plugins::default())));
        let service = Arc::new(RuleService {
            definitions,
            state: RwLock::new(State {
                set: Arc::new(RuleSet::new(engine, Vec::new(), settings.budget)),
                plugins: Plugins::default(),
                origins: BTreeMap::new(),
            }),
            settings,
            natives,
            metrics,
            changes: tokio::sync::Mutex::new(Seen::default()),
        });
        service.reload().await?;
        Ok(service)
    }

    /// The active rules; a decision holds this one set from start to end.
    pub fn current(&self) -> Arc<RuleSet> {
        self.state.read().set.clone()
    }

    pub fn plugins(&self) -> Plugins {
        self.state.read().plugins.clone()
    }

    /// Every active rule, in the order they run.
    pub fn list(&self) -> Vec<RuleInfo> {
        let state = self.state.read();
        state
            .set
            .rules()
            .iter()
            .map(|active| info(&state, active))
            .collect()
    }

    pub fn get(&self, name: &str) -> Option<RuleInfo> {
        let state = self.state.read();
        state.set.get(name).map(|active| info(&state, active))
    }

    /// Every stored version of a rule, oldest first.
    pub async fn versions(&self, name: &str) -> Result<Vec<RuleVersion>> {
        let stored = self
            .definitions
            .versions(DefinitionKind::Rule, name)
            .await?;
        Ok(stored.into_iter().filter_map(version_of).collect())
    }

    /// Compiles `source` and, if it compiles, stores it as the rule's next version and
    /// activates it. The name is `name`, else the script's `NAME`.
    pub async fn put(&self, name: Option<&str>, source: &str) -> Result<RuleInfo> {
        let _changes = self.changes.lock().await;
        let rule_name = self.put_locked(name, source, "api").await?;
        self.get(&rule_name)
            .ok_or_else(|| Error::Internal(anyhow::anyhow!("rule '{rule_name}' vanished")))
    }

    async fn put_locked(&self, name: Option<&str>, source: &str, origin: &str) -> Result<String> {
        if source.len() > MAX_SOURCE {
            return Err(Error::invalid(
                "source",
                format!("at most {MAX_SOURCE} bytes"),
            ));
        }
        let engine = self.current().engine().clone();
        let default = name.unwrap_or("");
        let rule = compile(&engine, default, source).map_err(script_error)?;
        if let Some(name) = name {
            if rule.meta.name != name {
                return Err(Error::invalid(
                    "name",
                    format!(
                        "'{name}' differs from the NAME '{}' the script declares",
                        rule.meta.name
                    ),
                ));
            }
        }
        let rule_name = rule.meta.name.clone();
        let body = json!(Body {
            source: source.to_owned(),
            origin: origin.to_owned(),
        });
        let version = self
            .definitions
            .put(DefinitionKind::Rule, &rule_name, body)
            .await?;
        self.definitions
            .set_active(DefinitionKind::Rule, &rule_name, version)
            .await?;
        let active = Arc::new(ActiveRule {
            rule,
            version,
            source: source.to_owned(),
        });
        self.install(active, origin.to_owned(), Utc::now());
        tracing::info!(rule = %rule_name, version, origin, "Rule activated");
        Ok(rule_name)
    }

    /// Deletes a rule and every version of it. `false` if there was none.
    pub async fn delete(&self, name: &str) -> Result<bool> {
        let _changes = self.changes.lock().await;
        let existed = self.definitions.delete(DefinitionKind::Rule, name).await?;
        let removed = self.remove(name);
        if existed || removed {
            tracing::info!(rule = %name, "Rule deleted");
        }
        Ok(existed || removed)
    }

    /// Makes an earlier (or later) stored version active again: a rollback.
    pub async fn activate(&self, name: &str, version: u32) -> Result<RuleInfo> {
        let _changes = self.changes.lock().await;
        let stored = self
            .definitions
            .get(DefinitionKind::Rule, name, Some(version))
            .await?
            .ok_or_else(|| {
                Error::not_found("version", "rule version", format!("{name}@{version}"))
            })?;
        let v = version_of(stored).ok_or_else(|| {
            Error::invalid(
                "version",
                format!("version {version} of '{name}' is unreadable"),
            )
        })?;
        let engine = self.current().engine().clone();
        let rule = compile(&engine, name, &v.source).map_err(script_error)?;
        self.definitions
            .set_active(DefinitionKind::Rule, name, version)
            .await?;
        let active = Arc::new(ActiveRule {
            rule,
            version,
            source: v.source,
        });
        self.install(active, v.origin, v.created_at);
        tracing::info!(rule = %name, version, "Rule version activated");
        self.get(name)
            .ok_or_else(|| Error::Internal(anyhow::anyhow!("rule '{name}' vanished")))
    }

    /// Picks up changed plugin files, rule files, and rules changed in the store by
    /// another replica. Errors in a file are logged and counted, never fatal: the
    /// version before stays active.
    pub async fn reload(&self) -> Result<()> {
        let mut seen = self.changes.lock().await;
        self.reload_plugins(&mut seen).await?;
        self.sync_store().await?;
        self.reload_rule_files(&mut seen).await;
        Ok(())
    }

    /// Rebuilds the engine when a plugin file changed, recompiling every active rule
    /// against it; if any rule no longer compiles the new plugins are refused.
    async fn reload_plugins(&self, seen: &mut Seen) -> Result<()> {
        let Some(dir) = self.settings.plugins_dir.as_deref() else {
            return Ok(());
        };
        let hashes = hash_dir(dir);
        if hashes == seen.plugins {
            return Ok(());
        }
        let bare = engine_with(&self.natives, None);
        let (plugins, errors) = Plugins::load_dir(&bare, dir);
        for (path, error) in &errors {
            tracing::error!(plugin = %path.display(), %error, "Plugin does not compile; keeping the previous version");
            self.metrics
                .rule_error(&format!("plugin:{}", super::stem(path)));
        }
        let mut plugins_used = self.plugins();
        for plugin in plugins.iter() {
            plugins_used.insert(plugin.clone());
        }
        // A plugin file that was removed is dropped.
        let present: Vec<String> = hashes.keys().map(|p| super::stem(p)).collect();
        let mut kept = Plugins::default();
        for plugin in plugins_used.iter() {
            if present.contains(&plugin.name) {
                kept.insert(plugin.clone());
            }
        }
        let engine = Arc::new(engine_with(&self.natives, Some(&kept)));
        let current = self.current();
        let mut recompiled = Vec::new();
        for active in current.rules() {
            match compile(&engine, &active.rule.meta.name, &active.source) {
                Ok(rule) => recompiled.push(Arc::new(ActiveRule {
                    rule,
                    version: active.version,
                    source: active.source.clone(),
                })),
                Err(error) => {
                    tracing::error!(rule = %active.rule.meta.name, %error, "Plugins changed and a rule no longer compiles; keeping the previous plugins");
                    self.metrics.rule_error(&active.rule.meta.name);
                    seen.plugins = hashes;
                    return Ok(());
                }
            }
        }
        {
            let mut state = self.state.write();
            state.set = Arc::new(RuleSet::new(engine, recompiled, self.settings.budget));
            state.plugins = kept;
        }
        tracing::info!(plugins = hashes.len(), "Plugins loaded");
        seen.plugins = hashes;
        Ok(())
    }

    /// Makes the active set match the store's active versions.
    async fn sync_store(&self) -> Result<()> {
        let stored = self.definitions.list(DefinitionKind::Rule).await?;
        let current = self.current();
        let mut live = Vec::new();
        for latest in stored {
            let name = latest.name.clone();
            let Some(version) = self.definitions.active(DefinitionKind::Rule, &name).await? else {
                continue;
            };
            live.push(name.clone());
            if current.get(&name).is_some_and(|r| r.version == version) {
                continue;
            }
            let Some(v) = self
                .definitions
                .get(DefinitionKind::Rule, &name, Some(version))
                .await?
                .and_then(version_of)
            else {
                continue;
            };
            match compile(current.engine(), &name, &v.source) {
                Ok(rule) => self.install(
                    Arc::new(ActiveRule {
                        rule,
                        version,
                        source: v.source,
                    }),
                    v.origin,
                    v.created_at,
                ),
                Err(error) => {
                    tracing::error!(rule = %name, version, %error, "Stored rule does not compile; skipped");
                    self.metrics.rule_error(&name);
                }
            }
        }
        for active in current.rules() {
            if !live.contains(&active.rule.meta.name) {
                self.remove(&active.rule.meta.name);
            }
        }
        Ok(())
    }

    /// Stores a new version for each rule file that changed; removes the rule of a file
    /// that was deleted.
    async fn reload_rule_files(&self, seen: &mut Seen) {
        let Some(dir) = self.settings.dir.as_deref() else {
            return;
        };
        let mut hashes = hash_dir(dir);
        let mut retry = Vec::new();
        for (path, hash) in &hashes {
            if seen.rules.get(path) == Some(hash) {
                continue;
            }
            let origin = format!("file:{}", file_name(path));
            let source = match std::fs::read_to_string(path) {
                Ok(source) => source,
                Err(e) => {
                    tracing::error!(rule = %path.display(), error = %e, "Cannot read rule file");
                    continue;
                }
            };
            let current = self.current();
            // The file's rule name (its NAME, else the file name); a file that does not
            // compile goes to `put_locked` under its file name to be refused and counted.
            let name = compile(current.engine(), &super::stem(path), &source)
                .map_or_else(|_| super::stem(path), |rule| rule.meta.name);
            // Unchanged against the active version (a restart): nothing to store.
            if current.get(&name).is_none_or(|a| a.source != source) {
                match self.put_locked(Some(&name), &source, &origin).await {
                    Ok(_) => {}
                    // Not stored: tried again at the next reload.
                    Err(Error::Storage(StorageError::Unavailable(error))) => {
                        tracing::warn!(rule = %path.display(), %error, "Cannot store the rule file's version now (the definition store is unreachable); retrying");
                        retry.push(path.clone());
                    }
                    Err(error) => {
                        tracing::error!(rule = %path.display(), %error, "Rule file does not compile; the previous version stays active");
                        self.metrics.rule_error(&name);
                    }
                }
            }
        }
        for path in seen.rules.keys() {
            if hashes.contains_key(path) {
                continue;
            }
            let origin = format!("file:{}", file_name(path));
            let gone: Vec<String> = {
                let state = self.state.read();
                state
                    .origins
                    .iter()
                    .filter(|(_, (o, _))| *o == origin)
                    .map(|(name, _)| name.clone())
                    .collect()
            };
            for name in gone {
                match self.definitions.delete(DefinitionKind::Rule, &name).await {
                    Ok(_) => {
                        self.remove(&name);
                        tracing::info!(rule = %name, "Rule file removed; rule deleted");
                    }
                    Err(e) => tracing::error!(rule = %name, error = %e, "Failed to delete rule"),
                }
            }
        }
        for path in retry {
            hashes.remove(&path);
        }
        seen.rules = hashes;
    }

    /// Replaces (or adds) one rule in the active set.
    fn install(&self, active: Arc<ActiveRule>, origin: String, at: DateTime<Utc>) {
        let name = active.rule.meta.name.clone();
        let mut state = self.state.write();
        swap_rule(&mut state, &name, Some(active), self.settings.budget);
        state.origins.insert(name, (origin, at));
    }

    /// Removes one rule from the active set; `false` if it was not there.
    fn remove(&self, name: &str) -> bool {
        let mut state = self.state.write();
        if state.set.get(name).is_none() {
            return false;
        }
        swap_rule(&mut state, name, None, self.settings.budget);
        state.origins.remove(name);
        true
    }
}

/// Swaps in a new set: the current rules without `name`, plus `with` if given.
fn swap_rule(state: &mut State, name: &str, with: Option<Arc<ActiveRule>>, budget: Duration) {
    let rules = state
        .set
        .rules()
        .iter()
        .filter(|r| r.rule.meta.name != name)
        .cloned()
        .chain(with)
        .collect();
    state.set = Arc::new(RuleSet::new(state.set.engine().clone(), rules, budget));
}

/// Largest rule source accepted.
pub const MAX_SOURCE: usize = 64 * 1024;

fn info(state: &State, active: &Arc<ActiveRule>) -> RuleInfo {
    let (origin, updated_at) = state
        .origins
        .get(&active.rule.meta.name)
        .cloned()
        .unwrap_or_else(|| ("api".into(), Utc::now()));
    RuleInfo {
        active: active.clone(),
        origin,
        updated_at,
    }
}

fn version_of(stored: Definition) -> Option<RuleVersion> {
    let body: Body = serde_json::from_value(stored.body).ok()?;
    Some(RuleVersion {
        version: stored.version,
        source: body.source,
        origin: body.origin,
        created_at: stored.created_at,
    })
}

/// A compile error as the API reports it: on `source`, with line and column.
pub fn script_error(e: RuleError) -> Error {
    Error::Script {
        field: "source".into(),
        line: e.line,
        column: e.column,
        message: e.message,
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Content hash of every `*.rhai` file in `dir` (empty when the directory is missing).
fn hash_dir(dir: &Path) -> HashMap<PathBuf, u64> {
    use std::hash::{Hash, Hasher};
    let Ok(paths) = super::rhai_files(dir) else {
        return HashMap::new();
    };
    paths
        .into_iter()
        .filter_map(|path| {
            let bytes = std::fs::read(&path).ok()?;
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            bytes.hash(&mut hasher);
            Some((path, hasher.finish()))
        })
        .collect()
}
