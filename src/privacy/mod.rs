//! Privacy: PII encrypted at rest field by field, the keys behind it, and the blind
//! index.
//!
//! Map:
//! - [`keys`]: master keys (`MasterKey`, never printed) and the `KeyRing` of the current
//!   and older ones, loaded from a file or an environment variable (or generated for the
//!   embedded demo);
//! - [`seal`]: the cryptography — AES-256-GCM sealing of one field with the customer id
//!   and field name as associated data, wrapping of per-customer data keys under a
//!   master key, and the keyed hashes (HMAC-SHA256) of the blind index and erasure tags;
//! - [`profiles`]: `Profiles`, what the rest of the engine reads and writes customers
//!   through: it seals on the way in and opens on the way out, so stores only ever see
//!   ciphertext, and it owns erasure's key destruction, its markers and key rotation;
//! - [`stream`]: `StreamSeal`, the events topic's records sealed per customer under a
//!   data key erasure destroys, keyed by an opaque tag instead of the customer id.
//!
//! Everything here is pure but for the two storage traits it uses (`ProfileStore`,
//! `DataKeyStore`) and reading key files.

pub mod keys;
pub mod profiles;
pub mod seal;
pub mod stream;

pub use keys::{KeyRing, MasterKey};
pub use profiles::{Profiles, RewrapReport};
