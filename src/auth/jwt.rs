//! Bearer JWTs from a single sign-on, accepted besides API keys (`[auth.jwt]`).
//!
//! A token verifies only when it is signed with the one configured algorithm (the
//! token's own `alg` header is never trusted to choose it, so neither `none` nor an
//! HMAC-with-the-public-key confusion gets through), names the configured issuer (`iss`)
//! and audience (`aud`), is unexpired (`exp` required, `nbf` checked), has a subject
//! (`sub`), and carries a role name in the configured claim (`tailor_role` by default).
//!
//! The caller's id is `jwt:` and 16 hex digits of SHA-256 over issuer and subject: per
//! subject for rate limits, without the subject itself (often an email address) ever
//! reaching a log line.

use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::{Principal, Role};
use crate::config::JwtSettings;

/// Reads an algorithm name, refusing unknown ones with the field named.
pub fn algorithm(field: &str, raw: &str) -> anyhow::Result<Algorithm> {
    raw.parse::<Algorithm>().map_err(|_| {
        anyhow::anyhow!(
            "{field}: unknown algorithm '{raw}'; one of RS256, RS384, RS512, PS256, PS384, \
             PS512, ES256, ES384, EdDSA, HS256, HS384, HS512"
        )
    })
}

/// Verifies bearer JWTs against the settings it was loaded from.
pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
    issuer: String,
    role_claim: String,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key (an HMAC secret, possibly) never prints.
        f.debug_struct("JwtVerifier")
            .field("algorithms", &self.validation.algorithms)
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

impl JwtVerifier {
    /// The verifier of `settings`, `None` while JWTs are switched off. A key that cannot
    /// be read or parsed is an error naming `auth.jwt.key_file`.
    pub fn load(settings: &JwtSettings) -> anyhow::Result<Option<JwtVerifier>> {
        if !settings.enabled {
            return Ok(None);
        }
        let alg = algorithm("auth.jwt.algorithm", &settings.algorithm)?;
        let path = Path::new(&settings.key_file);
        let bytes = std::fs::read(path).map_err(|e| {
            anyhow::anyhow!("auth.jwt.key_file: cannot read {}: {e}", path.display())
        })?;
        let key = decoding_key(alg, &bytes)
            .map_err(|e| anyhow::anyhow!("auth.jwt.key_file: not a {alg:?} key: {e}"))?;
        Ok(Some(JwtVerifier::new(alg, key, settings)))
    }

    /// A verifier with a key already in hand.
    pub fn new(alg: Algorithm, key: DecodingKey, settings: &JwtSettings) -> JwtVerifier {
        let mut validation = Validation::new(alg);
        validation.set_issuer(&[&settings.issuer]);
        validation.set_audience(&[&settings.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = settings.leeway_secs;
        JwtVerifier {
            key,
            validation,
            issuer: settings.issuer.clone(),
            role_claim: settings.role_claim.clone(),
        }
    }

    /// The principal of a token, or why it does not verify (fit to send: it names the
    /// check that failed, never the token's content).
    pub fn verify(&self, token: &str) -> Result<Principal, &'static str> {
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &self.key, &self.validation)
            .map_err(|e| reason(e.kind()))?;
        let claims = data.claims;
        let role = match claims.get(&self.role_claim) {
            Some(Value::String(name)) => Role::parse("role", name).ok(),
            Some(Value::Array(names)) => names
                .iter()
                .filter_map(Value::as_str)
                .find_map(|name| Role::parse("role", name).ok()),
            _ => None,
        }
        .ok_or("JWT carries no known role in its role claim")?;
        let subject = claims
            .get("sub")
            .and_then(Value::as_str)
            .ok_or("JWT has no subject")?;
        let digest = Sha256::new()
            .chain_update(self.issuer.as_bytes())
            .chain_update([0])
            .chain_update(subject.as_bytes())
            .finalize();
        let id: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        Ok(Principal {
            key_id: format!("jwt:{id}"),
            role,
        })
    }
}

fn decoding_key(alg: Algorithm, bytes: &[u8]) -> jsonwebtoken::errors::Result<DecodingKey> {
    use jsonwebtoken::AlgorithmFamily;
    match alg.family() {
        AlgorithmFamily::Hmac => DecodingKey::from_secret(trim_newline(bytes)),
        AlgorithmFamily::Rsa => DecodingKey::from_rsa_pem(bytes),
        AlgorithmFamily::Ec => DecodingKey::from_ec_pem(bytes),
        AlgorithmFamily::Ed => DecodingKey::from_ed_pem(bytes),
    }
}

/// A secret file written by an editor ends with a newline that is not part of it.
fn trim_newline(bytes: &[u8]) -> &[u8] {
    let end = bytes
        .iter()
        .rposition(|b| !matches!(b, b'\n' | b'\r'))
        .map_or(0, |i| i + 1);
    &bytes[..end]
}

fn reason(kind: &jsonwebtoken::errors::ErrorKind) -> &'static str {
    use jsonwebtoken::errors::ErrorKind as K;
    match kind {
        K::ExpiredSignature => "expired JWT",
        K::ImmatureSignature => "JWT not valid yet (nbf)",
        K::InvalidIssuer => "JWT from another issuer",
        K::InvalidAudience => "JWT for another audience",
        K::InvalidAlgorithm => "JWT signed with another algorithm",
        K::MissingRequiredClaim(_) => "JWT lacks a required claim (exp, iss, aud, sub)",
        K::InvalidSignature => "invalid JWT signature",
        _ => "malformed JWT",
    }
}

/// Whether a bearer value has the shape of a JWT (three base64url parts).
pub fn looks_like_jwt(raw: &str) -> bool {
    raw.split('.').count() == 3
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'='))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &[u8] = b"a shared secret of the sso, 32 bytes+";

    fn settings() -> JwtSettings {
        JwtSettings {
            enabled: true,
            algorithm: "HS256".into(),
            issuer: "https://sso.example.com".into(),
            audience: "tailor".into(),
            ..JwtSettings::default()
        }
    }

    fn verifier() -> JwtVerifier {
        let key = DecodingKey::from_secret(SECRET).unwrap();
        JwtVerifier::new(Algorithm::HS256, key, &settings())
    }

    fn token(alg: Algorithm, claims: Value) -> String {
        let key = EncodingKey::from_secret(SECRET).unwrap();
        encode(&Header::new(alg), &claims, &key).unwrap()
    }

    fn claims(extra: Value) -> Value {
        let mut c = json!({
            "iss": "https://sso.example.com", "aud": "tailor", "sub": "someone@example.com",
            "exp": jsonwebtoken::get_current_timestamp() + 600, "tailor_role": "marketer",
        });
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    }

    #[test]
    fn a_valid_token_gives_its_role_and_a_subject_hash() {
        let p = verifier()
            .verify(&token(Algorithm::HS256, claims(json!({}))))
            .unwrap();
        assert_eq!(p.role, Role::Marketer);
        assert!(
            p.key_id.starts_with("jwt:") && p.key_id.len() == 20,
            "{p:?}"
        );
        assert!(!p.key_id.contains("someone"));
        let p = verifier()
            .verify(&token(
                Algorithm::HS256,
                claims(json!({"tailor_role": ["viewer", "admin"]})),
            ))
            .unwrap();
        assert_eq!(p.role, Role::Admin);
    }

    #[test]
    fn every_failed_check_is_refused_with_its_reason() {
        let now = jsonwebtoken::get_current_timestamp();
        let cases = [
            (
                token(Algorithm::HS384, claims(json!({}))),
                "JWT signed with another algorithm",
            ),
            (
                token(Algorithm::HS256, claims(json!({"iss": "https://evil"}))),
                "JWT from another issuer",
            ),
            (
                token(Algorithm::HS256, claims(json!({"aud": "other"}))),
                "JWT for another audience",
            ),
            (
                token(Algorithm::HS256, claims(json!({"exp": now - 3600}))),
                "expired JWT",
            ),
            (
                token(Algorithm::HS256, claims(json!({"exp": null}))),
                "JWT lacks a required claim (exp, iss, aud, sub)",
            ),
            (
                token(Algorithm::HS256, claims(json!({"nbf": now + 3600}))),
                "JWT not valid yet (nbf)",
            ),
            (
                token(Algorithm::HS256, claims(json!({"tailor_role": "root"}))),
                "JWT carries no known role in its role claim",
            ),
            ("a.b.c".to_owned(), "malformed JWT"),
        ];
        for (token, why) in cases {
            assert_eq!(verifier().verify(&token), Err(why), "{token}");
        }
        // `alg: none` with no signature.
        let unsigned = {
            use base64::Engine as _;
            let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
            format!(
                "{}.{}.",
                b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
                b64.encode(claims(json!({})).to_string())
            )
        };
        assert!(verifier().verify(&unsigned).is_err());
        // Signed with another secret.
        let other = encode(
            &Header::new(Algorithm::HS256),
            &claims(json!({})),
            &EncodingKey::from_secret(b"another secret entirely, 32 bytes").unwrap(),
        )
        .unwrap();
        assert_eq!(verifier().verify(&other), Err("invalid JWT signature"));
    }

    #[test]
    fn settings_errors_name_the_key() {
        let mut s = settings();
        s.key_file = "/nonexistent/tailor-jwt.key".into();
        let e = JwtVerifier::load(&s).unwrap_err().to_string();
        assert!(e.starts_with("auth.jwt.key_file: cannot read"), "{e}");
        s.algorithm = "none".into();
        let e = JwtVerifier::load(&s).unwrap_err().to_string();
        assert!(
            e.starts_with("auth.jwt.algorithm: unknown algorithm 'none'"),
            "{e}"
        );
        s.enabled = false;
        assert!(JwtVerifier::load(&s).unwrap().is_none());
    }

    #[test]
    fn jwt_shape() {
        assert!(looks_like_jwt("eyJh.eyJz.sig-_"));
        assert!(!looks_like_jwt("tk_0123_abcd"));
        assert!(!looks_like_jwt("a.b"));
    }
}
