//! The model registry: versions on disk, the active and shadow pointers, and the history
//! that rollback walks back.
//!
//! Layout under `<data_dir>/models/`:
//! - `v<n>/model.safetensors`: the weights; `v<n>/manifest.json`: [`Manifest`] (schema,
//!   metrics, data range, parent version, training parameters);
//! - `registry.json`: [`RegistryState`]: `active`, `shadow`, `history` (the versions
//!   activated, oldest first; the last one is active) and an audit log of every change.
//!
//! A version directory is written under a temporary name and renamed into place, and
//! `registry.json` is replaced by rename, so a crash leaves either the old or the new
//! state. One process changes a data directory at a time (the embedded store's lock
//! guarantees it); within the process a mutex orders changes.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::Device;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::net::Net;
use super::schema::InputSchema;
use super::serving::LoadedModel;
use super::train::{TrainParams, TrainReport, Trained};
use super::{ModelError, ModelResult};

pub const FORMAT: u32 = 1;
const WEIGHTS: &str = "model.safetensors";
const MANIFEST: &str = "manifest.json";
const STATE: &str = "registry.json";

/// Everything about a version but its weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub version: String,
    pub created_at: DateTime<Utc>,
    /// The version that was active when this one was trained.
    pub parent: Option<String>,
    pub schema: InputSchema,
    pub report: TrainReport,
    pub params: TrainParams,
    pub training_seconds: f64,
}

/// One change of the pointers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistryEvent {
    pub at: DateTime<Utc>,
    /// `activate`, `shadow`, `unshadow` or `rollback`.
    pub action: String,
    pub version: Option<String>,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RegistryState {
    pub active: Option<String>,
    pub shadow: Option<String>,
    /// Versions activated, oldest first; the last is `active`. Rollback pops it.
    pub history: Vec<String>,
    pub events: Vec<RegistryEvent>,
}

impl RegistryState {
    /// The version the active one replaced: what a rollback returns to.
    pub fn predecessor(&self) -> Option<&str> {
        let n = self.history.len();
        (n >= 2).then(|| self.history[n - 2].as_str())
    }
}

pub struct Registry {
    dir: PathBuf,
    /// A std mutex: held for short file operations only, never across an await.
    lock: parking_lot::Mutex<()>,
}

fn io(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Io(format!("{}: {e}", path.display()))
}

/// `v<n>` → n; anything else is not a version name (and never a path).
fn number(version: &str) -> Option<u64> {
    let n = version.strip_prefix('v')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) || n.len() > 18 {
        return None;
    }
    n.parse().ok()
}

fn write_atomically(path: &Path, bytes: &[u8]) -> ModelResult<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| io(&tmp, e))?;
    f.sync_all().map_err(|e| io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| io(path, e))
}

/// Refuses a schema whose customer features are not all live feature definitions.
pub fn check_schema(manifest: &Manifest, live: &dyn Fn(&str) -> bool) -> ModelResult<()> {
    let missing: Vec<String> = manifest
        .schema
        .feature_names()
        .filter(|n| !live(n))
        .map(str::to_owned)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(ModelError::SchemaMismatch {
            version: manifest.version.clone(),
            missing,
        })
    }
}

impl Registry {
    /// The registry of a data directory (nothing is created until a version is saved).
    pub fn new(data_dir: &Path) -> Self {
        Registry {
            dir: data_dir.join("models"),
            lock: parking_lot::Mutex::new(()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn state(&self) -> ModelResult<RegistryState> {
        let path = self.dir.join(STATE);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| io(&path, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RegistryState::default()),
            Err(e) => Err(io(&path, e)),
        }
    }

    fn put_state(&self, state: &RegistryState) -> ModelResult<()> {
        fs::create_dir_all(&self.dir).map_err(|e| io(&self.dir, e))?;
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| ModelError::Io(e.to_string()))?;
        write_atomically(&self.dir.join(STATE), &bytes)
    }

    fn versions(&self) -> ModelResult<Vec<u64>> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&self.dir, e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io(&self.dir, e))?;
            if let Some(n) = entry.file_name().to_str().and_then(number) {
                if entry.path().join(MANIFEST).is_file() {
                    out.push(n);
                }
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Stores a trained model as the next version; its parent is the active version.
    pub fn save(
        &self,
        trained: &Trained,
        params: &TrainParams,
        created_at: DateTime<Utc>,
        training_seconds: f64,
    ) -> ModelResult<Manifest> {
        let _guard = self.lock.lock();
        fs::create_dir_all(&self.dir).map_err(|e| io(&self.dir, e))?;
        let next = self.versions()?.last().map_or(1, |n| n + 1);
        let version = format!("v{next}");
        let manifest = Manifest {
            format: FORMAT,
            version: version.clone(),
            created_at,
            parent: self.state()?.active,
            schema: trained.schema.clone(),
            report: trained.report.clone(),
            params: params.clone(),
            training_seconds,
        };
        let tmp = self
            .dir
            .join(format!(".tmp-{version}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
        trained.net.save(&tmp.join(WEIGHTS))?;
        let bytes =
            serde_json::to_vec_pretty(&manifest).map_err(|e| ModelError::Io(e.to_string()))?;
        write_atomically(&tmp.join(MANIFEST), &bytes)?;
        let target = self.dir.join(&version);
        fs::rename(&tmp, &target).map_err(|e| io(&target, e))?;
        Ok(manifest)
    }

    fn version_dir(&self, version: &str) -> ModelResult<PathBuf> {
        if number(version).is_none() {
            return Err(ModelError::UnknownVersion(version.to_owned()));
        }
        let dir = self.dir.join(version);
        if !dir.join(MANIFEST).is_file() {
            return Err(ModelError::UnknownVersion(version.to_owned()));
        }
        Ok(dir)
    }

    pub fn manifest(&self, version: &str) -> ModelResult<Manifest> {
        let path = self.version_dir(version)?.join(MANIFEST);
        let bytes = fs::read(&path).map_err(|e| io(&path, e))?;
        serde_json::from_slice(&bytes).map_err(|e| io(&path, e))
    }

    /// Every version, oldest first.
    pub fn manifests(&self) -> ModelResult<Vec<Manifest>> {
        self.versions()?
            .into_iter()
            .map(|n| self.manifest(&format!("v{n}")))
            .collect()
    }

    /// A version's weights on `device`, ready to score.
    pub fn load(&self, version: &str, device: &Device) -> ModelResult<LoadedModel> {
        let manifest = self.manifest(version)?;
        let net = Net::load(
            &self.version_dir(version)?.join(WEIGHTS),
            &manifest.schema,
            device,
        )?;
        Ok(LoadedModel::new(manifest, net))
    }

    /// Makes `version` active (after checking its schema against `live`); the replaced
    /// version stays in the history for rollback. Activating the shadow version ends the
    /// shadow. Activating the active version changes nothing.
    pub fn activate(
        &self,
        version: &str,
        live: &dyn Fn(&str) -> bool,
        reason: &str,
    ) -> ModelResult<RegistryState> {
        let _guard = self.lock.lock();
        let manifest = self.manifest(version)?;
        check_schema(&manifest, live)?;
        let mut state = self.state()?;
        if state.active.as_deref() == Some(version) {
            return Ok(state);
        }
        if state.shadow.as_deref() == Some(version) {
            state.shadow = None;
        }
        state.history.push(version.to_owned());
        state.active = Some(version.to_owned());
        state.events.push(RegistryEvent {
            at: Utc::now(),
            action: "activate".into(),
            version: Some(version.to_owned()),
            reason: reason.to_owned(),
        });
        self.put_state(&state)?;
        Ok(state)
    }

    /// Runs `version` in shadow beside the active one (`None` ends the shadow).
    pub fn set_shadow(
        &self,
        version: Option<&str>,
        live: &dyn Fn(&str) -> bool,
        reason: &str,
    ) -> ModelResult<RegistryState> {
        let _guard = self.lock.lock();
        if let Some(v) = version {
            check_schema(&self.manifest(v)?, live)?;
        }
        let mut state = self.state()?;
        if version.is_some() && state.active.as_deref() == version {
            return Err(ModelError::invalid(
                "shadow",
                format!("{} is the active version", version.unwrap_or_default()),
            ));
        }
        state.shadow = version.map(str::to_owned);
        state.events.push(RegistryEvent {
            at: Utc::now(),
            action: if version.is_some() {
                "shadow"
            } else {
                "unshadow"
            }
            .into(),
            version: version.map(str::to_owned),
            reason: reason.to_owned(),
        });
        self.put_state(&state)?;
        Ok(state)
    }

    /// Returns to the version the active one replaced; returns the state after.
    pub fn rollback(&self, reason: &str) -> ModelResult<RegistryState> {
        let _guard = self.lock.lock();
        let mut state = self.state()?;
        let Some(previous) = state.predecessor().map(str::to_owned) else {
            return Err(ModelError::NothingToRollBack);
        };
        let from = state.history.pop();
        state.active = Some(previous.clone());
        if state.shadow.as_deref() == Some(previous.as_str()) {
            state.shadow = None;
        }
        state.events.push(RegistryEvent {
            at: Utc::now(),
            action: "rollback".into(),
            version: Some(previous),
            reason: format!("from {}: {reason}", from.unwrap_or_default()),
        });
        self.put_state(&state)?;
        Ok(state)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::train::tests::{small_params, synthetic};
    use crate::model::train::train;

    /// A registry holding `n` trained versions (not activated).
    pub(crate) fn registry_with(n: usize) -> (tempfile::TempDir, Registry) {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::new(dir.path());
        let data = synthetic(400, 3);
        for seed in 0..n as u64 {
            let params = small_params(seed);
            let trained = train(&data, &params, &Device::Cpu, &mut |_| {}).unwrap();
            registry.save(&trained, &params, Utc::now(), 0.1).unwrap();
        }
        (dir, registry)
    }

    fn live(name: &str) -> bool {
        name.starts_with("affinity_")
    }

    #[test]
    fn versions_activate_and_roll_back() {
        let (_dir, r) = registry_with(3);
        let versions: Vec<String> = r
            .manifests()
            .unwrap()
            .into_iter()
            .map(|m| m.version)
            .collect();
        assert_eq!(versions, ["v1", "v2", "v3"]);
        assert_eq!(r.state().unwrap(), RegistryState::default());
        assert_eq!(
            r.rollback("test").unwrap_err().to_string(),
            "version: no earlier model version to roll back to"
        );

        r.activate("v1", &live, "first").unwrap();
        r.activate("v3", &live, "better").unwrap();
        let s = r.activate("v3", &live, "again").unwrap();
        assert_eq!(
            (s.active.as_deref(), s.history.clone()),
            (Some("v3"), vec!["v1".to_string(), "v3".to_string()])
        );
        let s = r.set_shadow(Some("v2"), &live, "try").unwrap();
        assert_eq!(s.shadow.as_deref(), Some("v2"));

        let s = r.rollback("reward dropped").unwrap();
        assert_eq!(
            (s.active.as_deref(), s.shadow.as_deref()),
            (Some("v1"), Some("v2"))
        );
        assert_eq!(s.events.last().unwrap().reason, "from v3: reward dropped");
        assert!(r.rollback("again").is_err(), "v1 replaced nothing");
        // Activating the shadow ends it; parents record what was active at training time.
        let s = r.activate("v2", &live, "promote").unwrap();
        assert_eq!((s.active.as_deref(), s.shadow), (Some("v2"), None));
        assert_eq!(r.manifest("v2").unwrap().parent, None);

        let loaded = r.load("v2", &Device::Cpu).unwrap();
        assert_eq!(loaded.version(), "v2");
        // The state survives a new registry over the same directory.
        assert_eq!(
            Registry::new(_dir.path()).state().unwrap(),
            r.state().unwrap()
        );
    }

    #[test]
    fn activation_refuses_unknown_versions_and_missing_features() {
        let (_dir, r) = registry_with(1);
        for bad in ["v9", "../v1", "1", "", "v1/../v1"] {
            assert_eq!(
                r.activate(bad, &live, "x").unwrap_err().to_string(),
                format!("version: unknown model version '{bad}'")
            );
        }
        let only_travel = |n: &str| n == "affinity_travel";
        assert_eq!(
            r.activate("v1", &only_travel, "x").unwrap_err().to_string(),
            "version: model v1 reads features that are not live feature definitions: affinity_books, affinity_home"
        );
        assert_eq!(
            r.state().unwrap().active,
            None,
            "a refused activation changes nothing"
        );
    }
}
