//! Master keys: 256-bit secrets with ids, and the ring of the current and older ones.
//!
//! A master key never encrypts data: it wraps the per-customer data keys, so rotating it
//! re-wraps those (small, one per customer) and never re-encrypts the data.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use base64::Engine as _;
use rand::RngCore as _;
use zeroize::Zeroizing;

use crate::config::{valid_key_id, EncryptionSettings};

/// Length of every key here: AES-256 and HMAC-SHA256 keys.
pub const KEY_LEN: usize = 32;

/// Where generated master keys live inside the data directory.
pub const GENERATED_DIR: &str = "master-keys";

/// A master key: its id and 32 secret bytes, wiped from memory on drop. `Debug` shows the
/// id only.
#[derive(Clone)]
pub struct MasterKey {
    id: String,
    secret: Zeroizing<[u8; KEY_LEN]>,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl MasterKey {
    /// A fresh random key.
    pub fn generate(id: &str) -> MasterKey {
        let mut secret = Zeroizing::new([0u8; KEY_LEN]);
        rand::rng().fill_bytes(secret.as_mut());
        MasterKey {
            id: id.to_owned(),
            secret,
        }
    }

    /// Reads key material: 32 bytes as standard base64 or as 64 hex digits, surrounding
    /// whitespace ignored. The error never contains the text.
    pub fn parse(id: &str, text: &str) -> Result<MasterKey, String> {
        let text = Zeroizing::new(text.trim().to_owned());
        let bytes = Zeroizing::new(if text.len() == 2 * KEY_LEN {
            decode_hex(&text).ok_or("not 64 hex digits")?
        } else {
            base64::engine::general_purpose::STANDARD
                .decode(text.as_bytes())
                .map_err(|_| "neither base64 nor 64 hex digits")?
        });
        let secret: [u8; KEY_LEN] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| format!("{} bytes of key material, expected {KEY_LEN}", bytes.len()))?;
        Ok(MasterKey {
            id: id.to_owned(),
            secret: Zeroizing::new(secret),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub(super) fn secret(&self) -> &[u8; KEY_LEN] {
        &self.secret
    }

    /// The key as base64, for writing a generated key file.
    fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(self.secret.as_ref()))
    }
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    let digits = text.as_bytes();
    digits
        .chunks(2)
        .map(|pair| {
            let s = std::str::from_utf8(pair).ok()?;
            u8::from_str_radix(s, 16).ok()
        })
        .collect()
}

/// The current master key and the older ones that still unwrap data keys.
#[derive(Debug, Clone)]
pub struct KeyRing {
    current: String,
    keys: BTreeMap<String, MasterKey>,
}

impl KeyRing {
    /// `current` wraps new data keys; `previous` only unwrap. Ids must differ.
    pub fn new(current: MasterKey, previous: Vec<MasterKey>) -> anyhow::Result<KeyRing> {
        let mut keys = BTreeMap::new();
        let id = current.id.clone();
        for key in std::iter::once(current).chain(previous) {
            let key_id = key.id.clone();
            if keys.insert(key_id.clone(), key).is_some() {
                anyhow::bail!("master key id '{key_id}' is given twice");
            }
        }
        Ok(KeyRing { current: id, keys })
    }

    pub fn current(&self) -> &MasterKey {
        &self.keys[&self.current]
    }

    /// The key with this id, current or older.
    pub fn get(&self, id: &str) -> Option<&MasterKey> {
        self.keys.get(id)
    }

    /// Ids of every key in the ring, ascending.
    pub fn ids(&self) -> Vec<&str> {
        self.keys.keys().map(String::as_str).collect()
    }

    /// Loads the keys `[encryption]` names (see [`EncryptionSettings`]): the current one
    /// from the `key_env` variable, else `key_file`, else the generated file
    /// `<data_dir>/master-keys/<key_id>.key` (created on first start, owner-only, with a
    /// warning that names its path, never the key); then the previous ones, and — when
    /// the current key is the generated kind — every other `*.key` in that directory.
    pub fn load(settings: &EncryptionSettings, data_dir: &Path) -> anyhow::Result<KeyRing> {
        let from_env = key_from_env(settings);
        let mut previous = Vec::new();
        let current = if let Some(text) = from_env {
            MasterKey::parse(&settings.key_id, &text)
                .map_err(|e| anyhow::anyhow!("encryption.key_env ({}): {e}", settings.key_env))?
        } else if !settings.key_file.is_empty() {
            read_key_file(
                &settings.key_id,
                Path::new(&settings.key_file),
                "encryption.key_file",
            )?
        } else {
            let dir = data_dir.join(GENERATED_DIR);
            let current = generated(&dir, &settings.key_id)?;
            for (id, path) in key_files(&dir)? {
                let named = settings.previous_keys.iter().any(|p| p.id == id);
                if id != settings.key_id && !named {
                    previous.push(read_key_file(&id, &path, "master-keys")?);
                }
            }
            current
        };
        for (i, p) in settings.previous_keys.iter().enumerate() {
            let field = format!("encryption.previous_keys[{i}]");
            let key = if !p.key_env.is_empty() {
                let text = Zeroizing::new(std::env::var(&p.key_env).map_err(|_| {
                    anyhow::anyhow!("{field}.key_env: the variable {} is not set", p.key_env)
                })?);
                MasterKey::parse(&p.id, &text)
                    .map_err(|e| anyhow::anyhow!("{field}.key_env ({}): {e}", p.key_env))?
            } else {
                read_key_file(&p.id, Path::new(&p.key_file), &format!("{field}.key_file"))?
            };
            previous.push(key);
        }
        KeyRing::new(current, previous).context("encryption.previous_keys")
    }
}

/// The current master key's text from `key_env`, when that variable is set and not empty.
fn key_from_env(settings: &EncryptionSettings) -> Option<Zeroizing<String>> {
    (!settings.key_env.is_empty())
        .then(|| std::env::var(&settings.key_env).ok())
        .flatten()
        .filter(|v| !v.trim().is_empty())
        .map(Zeroizing::new)
}

/// Whether [`KeyRing::load`] would use the generated key of the data directory (neither
/// `key_env` nor `key_file` gives one): a key no other process has.
pub fn uses_generated_key(settings: &EncryptionSettings) -> bool {
    settings.key_file.is_empty() && key_from_env(settings).is_none()
}

fn read_key_file(id: &str, path: &Path, field: &str) -> anyhow::Result<MasterKey> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .with_context(|| format!("{field}: cannot read {}", path.display()))?,
    );
    MasterKey::parse(id, &text).map_err(|e| anyhow::anyhow!("{field}: {}: {e}", path.display()))
}

/// The `*.key` files of the generated-keys directory, by key id.
fn key_files(dir: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        let Some(id) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".key"))
        else {
            continue;
        };
        if valid_key_id(id) {
            out.push((id.to_owned(), path.clone()));
        }
    }
    out.sort();
    Ok(out)
}

/// The generated key `id` in `dir`, created (directory 0700, file 0600) if missing.
fn generated(dir: &Path, id: &str) -> anyhow::Result<MasterKey> {
    let path = dir.join(format!("{id}.key"));
    if path.exists() {
        return read_key_file(id, &path, "master-keys");
    }
    create_private_dir(dir)?;
    let key = MasterKey::generate(id);
    write_private(&path, key.to_base64().as_bytes())
        .with_context(|| format!("cannot create the master key file {}", path.display()))?;
    tracing::warn!(
        key_id = id,
        path = %path.display(),
        "Generated a master key for encrypting PII at rest, because encryption.key_file and \
         the encryption.key_env variable give none. Keep this file out of backups of the \
         data directory (a backup holding its key is readable), or configure a key."
    );
    Ok(key)
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot restrict {}", dir.display()))?;
    }
    Ok(())
}

/// Writes a new file readable by its owner only; refuses to replace an existing one.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PreviousMasterKey;

    #[test]
    fn key_material_is_base64_or_hex_and_never_printed() {
        let hex = "00".repeat(31) + "ff";
        let key = MasterKey::parse("k1", &format!("  {hex}\n")).unwrap();
        assert_eq!(key.secret()[31], 0xff);
        let b64 = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        assert_eq!(MasterKey::parse("k1", &b64).unwrap().secret(), &[7u8; 32]);
        let err = MasterKey::parse("k1", "c2hvcnQ=").unwrap_err();
        assert_eq!(err, "5 bytes of key material, expected 32");
        assert!(MasterKey::parse("k1", "not a key!").is_err());
        let printed = format!("{:?}", MasterKey::parse("k1", &b64).unwrap());
        assert!(
            !printed.contains(&b64) && !printed.contains("7, 7"),
            "{printed}"
        );
        assert!(printed.contains("k1"));
    }

    #[test]
    fn a_generated_key_is_owner_only_and_reused_and_older_files_stay_readable() {
        let dir = tempfile::tempdir().unwrap();
        let settings = EncryptionSettings {
            key_env: String::new(),
            ..EncryptionSettings::default()
        };
        let first = KeyRing::load(&settings, dir.path()).unwrap();
        let path = dir.path().join(GENERATED_DIR).join("k1.key");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let again = KeyRing::load(&settings, dir.path()).unwrap();
        assert_eq!(first.current().secret(), again.current().secret());

        let rotated = EncryptionSettings {
            key_id: "k2".into(),
            ..settings
        };
        let ring = KeyRing::load(&rotated, dir.path()).unwrap();
        assert_eq!(ring.current().id(), "k2");
        assert_eq!(ring.ids(), vec!["k1", "k2"]);
        assert_eq!(ring.get("k1").unwrap().secret(), first.current().secret());
    }

    #[test]
    fn keys_from_files_and_variables_name_their_setting_when_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("current.key");
        std::fs::write(&file, "11".repeat(32)).unwrap();
        let old = dir.path().join("old.key");
        std::fs::write(&old, "22".repeat(32)).unwrap();
        let settings = EncryptionSettings {
            key_id: "k2".into(),
            key_file: file.display().to_string(),
            key_env: String::new(),
            previous_keys: vec![PreviousMasterKey {
                id: "k1".into(),
                key_file: old.display().to_string(),
                key_env: String::new(),
            }],
            sensitive_traits: Vec::new(),
        };
        let ring = KeyRing::load(&settings, dir.path()).unwrap();
        assert_eq!(ring.current().secret(), &[0x11; 32]);
        assert_eq!(ring.get("k1").unwrap().secret(), &[0x22; 32]);
        assert!(
            !dir.path().join(GENERATED_DIR).exists(),
            "nothing generated"
        );

        std::fs::write(&old, "short").unwrap();
        let err = format!("{:#}", KeyRing::load(&settings, dir.path()).unwrap_err());
        assert!(
            err.starts_with("encryption.previous_keys[0].key_file:"),
            "{err}"
        );
        assert!(!err.contains("short"), "{err}");
    }
}
