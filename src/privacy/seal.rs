//! The cryptography, in one place.
//!
//! - A field is sealed with AES-256-GCM under its customer's 256-bit data key, a fresh
//!   random 96-bit nonce per sealing, and associated data
//!   `tailor:field:v1 \0 <customer id> \0 <field name>`: a ciphertext copied to another
//!   customer or another field fails authentication instead of decrypting.
//! - A data key is wrapped with AES-256-GCM under a master key, associated data
//!   `tailor:data-key:v1 \0 <owner> \0 <master key id>`, so a wrapped key moved to another
//!   owner, or relabelled with another master key's id, does not unwrap.
//! - Blind index and erasure tags are HMAC-SHA256 under the blind-index key (itself a
//!   random data key of the system owner `blind-index`), with a domain label per use, as
//!   hex. Emails are normalised first (trimmed, lowercased).
//!
//! Random bytes come from the thread CSPRNG (`rand::rng`, reseeded from the OS).

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use rand::RngCore as _;
use sha2::Sha256;
use zeroize::Zeroizing;

use super::keys::{KeyRing, MasterKey, KEY_LEN};
use crate::customers::CustomerId;
use crate::storage::{KeyOwner, SealedField, WrappedKey, SEALED_RECORD};

const NONCE_LEN: usize = 12;

/// Why something did not open. Deliberately without detail: AES-GCM says only that
/// authentication failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// Wrong key, wrong associated data (another customer or field), or altered bytes.
    #[error("does not authenticate (wrong key, owner or field, or altered)")]
    Authentication,
    /// The wrapped key names a master key that is not in the ring.
    #[error("wrapped under master key '{0}', which is not configured")]
    UnknownMasterKey(String),
    /// A nonce or key of the wrong length.
    #[error("malformed: {0}")]
    Malformed(&'static str),
}

/// A data key in the clear: only ever in memory, wiped on drop, never printed.
pub struct DataKey(Zeroizing<[u8; KEY_LEN]>);

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

impl DataKey {
    pub fn generate() -> DataKey {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        rand::rng().fill_bytes(key.as_mut());
        DataKey(key)
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(self.0.as_ref()))
    }
}

fn field_aad(customer: &CustomerId, field: &str) -> Vec<u8> {
    [
        b"tailor:field:v1\0".as_slice(),
        customer.as_str().as_bytes(),
        b"\0",
        field.as_bytes(),
    ]
    .concat()
}

fn wrap_aad(owner: &KeyOwner, master_key_id: &str) -> Vec<u8> {
    [
        b"tailor:data-key:v1\0".as_slice(),
        owner.encode().as_bytes(),
        b"\0",
        master_key_id.as_bytes(),
    ]
    .concat()
}

fn nonce() -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    rand::rng().fill_bytes(&mut n);
    n
}

fn encrypt(cipher: &Aes256Gcm, aad: &[u8], plaintext: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let n = nonce();
    let ciphertext = cipher
        .encrypt(
            Nonce::from_slice(&n),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .expect("AES-GCM encrypts any input under 64 GiB; ours are bounded by the body limit");
    (n.to_vec(), ciphertext)
}

fn decrypt(
    cipher: &Aes256Gcm,
    aad: &[u8],
    nonce: &[u8],
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>, SealError> {
    if nonce.len() != NONCE_LEN {
        return Err(SealError::Malformed("nonce length"));
    }
    cipher
        .decrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: ciphertext,
                aad,
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| SealError::Authentication)
}

fn record_aad(tag: &str) -> Vec<u8> {
    [b"tailor:record:v1\0".as_slice(), tag.as_bytes()].concat()
}

/// The version byte after [`SEALED_RECORD`] in a sealed record.
const RECORD_V1: u8 = 1;

/// Seals one record of the events topic keyed by `tag`: [`SEALED_RECORD`], the version
/// byte, the nonce, then the ciphertext, with the tag bound as associated data.
pub fn seal_record(key: &DataKey, tag: &str, plaintext: &[u8]) -> Vec<u8> {
    let (nonce, ciphertext) = encrypt(&key.cipher(), &record_aad(tag), plaintext);
    let mut out = Vec::with_capacity(2 + nonce.len() + ciphertext.len());
    out.extend_from_slice(&[SEALED_RECORD, RECORD_V1]);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ciphertext);
    out
}

/// Opens what [`seal_record`] sealed for the same tag.
pub fn open_record(
    key: &DataKey,
    tag: &str,
    value: &[u8],
) -> Result<Zeroizing<Vec<u8>>, SealError> {
    let rest = match value {
        [SEALED_RECORD, RECORD_V1, rest @ ..] => rest,
        [SEALED_RECORD, ..] => return Err(SealError::Malformed("record version")),
        _ => return Err(SealError::Malformed("not a sealed record")),
    };
    if rest.len() < NONCE_LEN {
        return Err(SealError::Malformed("nonce length"));
    }
    let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
    decrypt(&key.cipher(), &record_aad(tag), nonce, ciphertext)
}

/// Seals one field of one customer.
pub fn seal(key: &DataKey, customer: &CustomerId, field: &str, plaintext: &[u8]) -> SealedField {
    let (nonce, ciphertext) = encrypt(&key.cipher(), &field_aad(customer, field), plaintext);
    SealedField { nonce, ciphertext }
}

/// Opens what [`seal`] sealed for the same customer and field.
pub fn open(
    key: &DataKey,
    customer: &CustomerId,
    field: &str,
    sealed: &SealedField,
) -> Result<Zeroizing<Vec<u8>>, SealError> {
    decrypt(
        &key.cipher(),
        &field_aad(customer, field),
        &sealed.nonce,
        &sealed.ciphertext,
    )
}

fn master_cipher(master: &MasterKey) -> Aes256Gcm {
    Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(master.secret()))
}

/// Wraps `key` for `owner` under `master`.
pub fn wrap(master: &MasterKey, owner: &KeyOwner, key: &DataKey, at: DateTime<Utc>) -> WrappedKey {
    let (nonce, ciphertext) = encrypt(
        &master_cipher(master),
        &wrap_aad(owner, master.id()),
        key.0.as_ref(),
    );
    WrappedKey {
        master_key_id: master.id().to_owned(),
        nonce,
        ciphertext,
        created_at: at,
    }
}

/// Unwraps `owner`'s key with the ring's key of the id it names.
pub fn unwrap(
    ring: &KeyRing,
    owner: &KeyOwner,
    wrapped: &WrappedKey,
) -> Result<DataKey, SealError> {
    let master = ring
        .get(&wrapped.master_key_id)
        .ok_or_else(|| SealError::UnknownMasterKey(wrapped.master_key_id.clone()))?;
    let plain = decrypt(
        &master_cipher(master),
        &wrap_aad(owner, master.id()),
        &wrapped.nonce,
        &wrapped.ciphertext,
    )?;
    let key: [u8; KEY_LEN] = plain
        .as_slice()
        .try_into()
        .map_err(|_| SealError::Malformed("data key length"))?;
    Ok(DataKey(Zeroizing::new(key)))
}

/// Keyed hashes under the blind-index key.
pub struct BlindIndex {
    /// The HMAC keyed once: each hash clones it instead of deriving the key's inner and
    /// outer states again (two of the four SHA-256 blocks a short value costs). It holds
    /// the same secret as the key, in memory as long as the key.
    keyed: Hmac<Sha256>,
}

impl BlindIndex {
    pub fn new(key: DataKey) -> BlindIndex {
        BlindIndex {
            keyed: <Hmac<Sha256> as Mac>::new_from_slice(key.0.as_ref())
                .expect("HMAC takes keys of any length"),
        }
    }

    fn hash(&self, label: &[u8], value: &[u8]) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut mac = self.keyed.clone();
        mac.update(label);
        mac.update(b"\0");
        mac.update(value);
        let digest = mac.finalize().into_bytes();
        let mut out = String::with_capacity(2 * digest.len());
        for b in digest {
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        out
    }

    /// The index entry of an email: trimmed and lowercased first, so lookups ignore case.
    pub fn email(&self, email: &str) -> String {
        let normal = Zeroizing::new(email.trim().to_lowercase());
        self.hash(b"tailor:email:v1", normal.as_bytes())
    }

    /// The tag under which a customer's erasure is remembered.
    pub fn erasure_tag(&self, customer: &CustomerId) -> String {
        self.hash(b"tailor:erased:v1", customer.as_str().as_bytes())
    }

    /// The key of a customer's records on the events topic, and the owner of the data
    /// key they are sealed under.
    pub fn stream_tag(&self, customer: &CustomerId) -> String {
        self.hash(b"tailor:stream:v1", customer.as_str().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(raw: &str) -> CustomerId {
        CustomerId::parse("id", raw).unwrap()
    }

    #[test]
    fn a_sealed_field_opens_only_for_its_customer_and_field() {
        let key = DataKey::generate();
        let sealed = seal(&key, &id("c1"), "email", b"ada@example.com");
        assert!(
            !sealed.ciphertext.windows(3).any(|w| w == b"ada"),
            "ciphertext must not hold the plaintext"
        );
        assert_eq!(
            open(&key, &id("c1"), "email", &sealed).unwrap().as_slice(),
            b"ada@example.com"
        );
        for (customer, field) in [("c2", "email"), ("c1", "name")] {
            assert_eq!(
                open(&key, &id(customer), field, &sealed).unwrap_err(),
                SealError::Authentication,
                "{customer}/{field}"
            );
        }
        assert_eq!(
            open(&DataKey::generate(), &id("c1"), "email", &sealed).unwrap_err(),
            SealError::Authentication,
            "another customer's data key"
        );
        let mut altered = sealed.clone();
        altered.ciphertext[0] ^= 1;
        assert_eq!(
            open(&key, &id("c1"), "email", &altered).unwrap_err(),
            SealError::Authentication
        );
        let again = seal(&key, &id("c1"), "email", b"ada@example.com");
        assert_ne!(again.nonce, sealed.nonce, "a fresh nonce per sealing");
    }

    #[test]
    fn a_sealed_record_opens_only_under_its_tag() {
        let key = DataKey::generate();
        let value = seal_record(&key, "tag1", br#"{"customerId":"ada"}"#);
        assert_eq!(&value[..2], &[SEALED_RECORD, RECORD_V1]);
        assert!(!value.windows(3).any(|w| w == b"ada"));
        assert_eq!(
            open_record(&key, "tag1", &value).unwrap().as_slice(),
            br#"{"customerId":"ada"}"#
        );
        assert_eq!(
            open_record(&key, "tag2", &value).unwrap_err(),
            SealError::Authentication,
            "moved under another customer's tag"
        );
        assert_eq!(
            open_record(&DataKey::generate(), "tag1", &value).unwrap_err(),
            SealError::Authentication
        );
        assert_eq!(
            open_record(&key, "tag1", &value[..10]).unwrap_err(),
            SealError::Malformed("nonce length")
        );
        assert_eq!(
            open_record(&key, "tag1", b"{}").unwrap_err(),
            SealError::Malformed("not a sealed record")
        );
        let mut later = value.clone();
        later[1] = 2;
        assert_eq!(
            open_record(&key, "tag1", &later).unwrap_err(),
            SealError::Malformed("record version")
        );
    }

    #[test]
    fn a_wrapped_key_unwraps_only_for_its_owner_under_its_master_key() {
        let k1 = MasterKey::generate("k1");
        let ring = KeyRing::new(k1.clone(), Vec::new()).unwrap();
        let owner = KeyOwner::Customer(id("c1"));
        let key = DataKey::generate();
        let wrapped = wrap(&k1, &owner, &key, Utc::now());
        let unwrapped = unwrap(&ring, &owner, &wrapped).unwrap();
        assert_eq!(unwrapped.0.as_ref(), key.0.as_ref());
        assert_eq!(
            unwrap(&ring, &KeyOwner::Customer(id("c2")), &wrapped).unwrap_err(),
            SealError::Authentication
        );
        let relabelled = WrappedKey {
            master_key_id: "k0".into(),
            ..wrapped.clone()
        };
        assert_eq!(
            unwrap(&ring, &owner, &relabelled).unwrap_err(),
            SealError::UnknownMasterKey("k0".into())
        );
        let other = KeyRing::new(MasterKey::generate("k1"), Vec::new()).unwrap();
        assert_eq!(
            unwrap(&other, &owner, &wrapped).unwrap_err(),
            SealError::Authentication,
            "the same id on another key"
        );
    }

    /// Stored email indexes, erasure markers and record keys are these hashes: their
    /// values never change (HMAC-SHA256 as hex, from an independent implementation).
    #[test]
    fn the_keyed_hashes_keep_their_values() {
        let index = BlindIndex::new(DataKey(Zeroizing::new([7u8; KEY_LEN])));
        assert_eq!(
            index.erasure_tag(&id("c1")),
            "cc0e6f418f39d182c41332541d04a04cc8ca31f615d034c0fb8c222f32d43a4d"
        );
        assert_eq!(
            index.email(" Ada@Example.com"),
            "a1560ccb1ebeec432c30ea456392078b1ab81cddfcca2495dba7a42211c6fca5"
        );
        assert_eq!(
            index.stream_tag(&id("c1")),
            "e78a9da606f2d984134f8e05660687ce6a47bc629003785697128cbfd6f1774c"
        );
    }

    #[test]
    fn the_blind_index_ignores_case_and_depends_on_its_key() {
        let index = BlindIndex::new(DataKey::generate());
        assert_eq!(
            index.email(" Ada@Example.com "),
            index.email("ada@example.com")
        );
        assert_ne!(
            index.email("ada@example.com"),
            index.email("bob@example.com")
        );
        assert_ne!(
            index.email("c1"),
            index.erasure_tag(&id("c1")),
            "labels separate uses"
        );
        let other = BlindIndex::new(DataKey::generate());
        assert_ne!(
            index.email("ada@example.com"),
            other.email("ada@example.com")
        );
        assert_eq!(index.email("a").len(), 64);
    }
}
