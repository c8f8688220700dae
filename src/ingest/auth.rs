//! Bearer-JWT authentication for the public API.
//!
//! A token names one profile (`account_id`, `profile_id`, unsigned integers) and must carry
//! `exp`. Accepted algorithms: HS256 with the configured secret, and RS256 / EdDSA with the
//! configured public keys. The algorithm in the token's header picks the key *family*, and
//! each family has its own keys, so an RSA public key can never be used as an HMAC secret
//! (algorithm confusion), and `alg: none` does not parse. Tokens are never logged.

use std::path::PathBuf;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::{check, ConfigError};

/// Longest `Authorization` header value we look at.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// The development secret shipped in `config/default.toml`. The server warns at start when
/// it is in use on a non-loopback listener.
pub const DEV_SECRET: &str = "playhead-development-secret-change-me";

/// Who a request acts for: exactly one profile of one account.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Principal {
    pub account_id: u64,
    pub profile_id: u64,
}

/// The claims Playhead reads and writes.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub account_id: u64,
    pub profile_id: u64,
    /// Expiry, seconds since the Unix epoch. Required.
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
}

/// Why a request is unauthenticated (always HTTP 401). Messages never echo the token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing `Authorization: Bearer <token>` header")]
    Missing,
    #[error("the Authorization header is not `Bearer <token>`")]
    NotBearer,
    #[error("the token is longer than {MAX_TOKEN_BYTES} bytes")]
    TooLong,
    #[error("the token is malformed")]
    Malformed,
    #[error("the token's algorithm is not accepted here (accepted: {0})")]
    Algorithm(String),
    #[error("the token's signature is invalid")]
    Signature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token lacks a valid `{0}` claim")]
    Claim(String),
}

/// Key material and rules, from the `[auth]` config section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// HS256 secret; empty disables HS256.
    pub hs256_secret: String,
    /// PEM files of RSA public keys accepted for RS256.
    pub rs256_public_key_files: Vec<PathBuf>,
    /// PEM files of Ed25519 public keys accepted for EdDSA.
    pub eddsa_public_key_files: Vec<PathBuf>,
    /// Tolerated clock difference for `exp` and `nbf`.
    pub leeway_seconds: u64,
    /// Verified tokens remembered (0: verify every request in full). Size it to the
    /// devices one node serves over HTTP: each sends its token every 4 s.
    pub verified_token_cache: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            hs256_secret: DEV_SECRET.into(),
            rs256_public_key_files: Vec::new(),
            eddsa_public_key_files: Vec::new(),
            leeway_seconds: 30,
            verified_token_cache: DEFAULT_VERIFIED_TOKENS,
        }
    }
}

impl AuthConfig {
    /// Range checks that types alone cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check(
            "auth.leeway_seconds",
            self.leeway_seconds,
            self.leeway_seconds <= 3_600,
            "at most 3600",
        )?;
        check(
            "auth.verified_token_cache",
            self.verified_token_cache,
            self.verified_token_cache <= 16 << 20,
            "at most 16777216 (0 disables it)",
        )?;
        Ok(())
    }
}

/// A key that failed to load at start.
#[derive(Debug, thiserror::Error)]
#[error("auth key {path}: {detail}")]
pub struct KeyError {
    pub path: String,
    pub detail: String,
}

/// Default of `auth.verified_token_cache`: tokens remembered after a successful
/// verification, split over [`CACHE_SHARDS`] shards (a full shard is emptied). Only tokens
/// up to [`MAX_CACHED_TOKEN_BYTES`] are remembered. Napkin math: a typical HS256 token of
/// ~200 bytes plus ~60 bytes of map entry and allocation is ~260 bytes, so 256 Ki tokens
/// take ~65 MiB (256 MiB if every token were 1 KiB); only tokens that verified are kept,
/// so a client cannot fill it with garbage.
pub const DEFAULT_VERIFIED_TOKENS: usize = 256 * 1024;
const CACHE_SHARDS: usize = 16;
const MAX_CACHED_TOKEN_BYTES: usize = 1024;

/// Verified tokens and (principal, `exp`).
type TokenCache = hashbrown::HashMap<Box<str>, (Principal, u64), foldhash::fast::RandomState>;

/// Verifies bearer tokens. Built once at start; cheap to share.
///
/// A device sends the same token with every heartbeat (every 4 s), so verified tokens are
/// remembered with their expiry: a repeat costs one hash lookup and a full-string compare
/// instead of base64 + JSON + HMAC (measured in BENCHMARKS.md). Expiry is re-checked on
/// every hit; only exact, previously verified token strings hit, so the cache can never
/// accept a token that verification would refuse, except by the time elapsed (`exp`).
pub struct Verifier {
    cache: Vec<parking_lot::Mutex<TokenCache>>,
    /// Tokens one cache shard holds at most; 0 disables the cache.
    tokens_per_shard: usize,
    hs256: Option<DecodingKey>,
    rs256: Vec<DecodingKey>,
    eddsa: Vec<DecodingKey>,
    leeway_seconds: u64,
    accepted: String,
    /// The time `exp` and `nbf` are checked against (cached and uncached tokens alike).
    clock: crate::model::Clock,
}

impl Verifier {
    pub fn from_config(config: &AuthConfig) -> Result<Self, KeyError> {
        Self::with_clock(config, crate::model::Clock::System)
    }

    /// [`Verifier::from_config`] checking `exp` and `nbf` against `clock`.
    pub fn with_clock(config: &AuthConfig, clock: crate::model::Clock) -> Result<Self, KeyError> {
        let load =
            |path: &PathBuf, parse: fn(&[u8]) -> jsonwebtoken::errors::Result<DecodingKey>| {
                let pem = std::fs::read(path).map_err(|e| KeyError {
                    path: path.display().to_string(),
                    detail: e.to_string(),
                })?;
                parse(&pem).map_err(|e| KeyError {
                    path: path.display().to_string(),
                    detail: format!("not a usable public key: {e}"),
                })
            };
        let rs256 = config
            .rs256_public_key_files
            .iter()
            .map(|p| load(p, DecodingKey::from_rsa_pem))
            .collect::<Result<Vec<_>, _>>()?;
        let eddsa = config
            .eddsa_public_key_files
            .iter()
            .map(|p| load(p, DecodingKey::from_ed_pem))
            .collect::<Result<Vec<_>, _>>()?;
        let hs256 = (!config.hs256_secret.is_empty())
            .then(|| DecodingKey::from_secret(config.hs256_secret.as_bytes()));
        let mut accepted = Vec::new();
        if hs256.is_some() {
            accepted.push("HS256");
        }
        if !rs256.is_empty() {
            accepted.push("RS256");
        }
        if !eddsa.is_empty() {
            accepted.push("EdDSA");
        }
        Ok(Self {
            cache: (0..CACHE_SHARDS).map(|_| Default::default()).collect(),
            tokens_per_shard: config.verified_token_cache.div_ceil(CACHE_SHARDS),
            hs256,
            rs256,
            eddsa,
            leeway_seconds: config.leeway_seconds,
            accepted: if accepted.is_empty() {
                "none configured".into()
            } else {
                accepted.join(", ")
            },
            clock,
        })
    }

    /// True when no key at all is configured: every request will be refused.
    pub fn has_no_keys(&self) -> bool {
        self.hs256.is_none() && self.rs256.is_empty() && self.eddsa.is_empty()
    }

    /// Checks an `Authorization` header value.
    pub fn verify_header(&self, header: Option<&str>) -> Result<Principal, AuthError> {
        let value = header.ok_or(AuthError::Missing)?;
        if value.len() > MAX_TOKEN_BYTES + 7 {
            return Err(AuthError::TooLong);
        }
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or(AuthError::NotBearer)?
            .trim();
        self.verify(token)
    }

    /// Checks a bare token.
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::TooLong);
        }
        let cacheable = token.len() <= MAX_CACHED_TOKEN_BYTES && self.tokens_per_shard > 0;
        let shard = &self.cache[foldhash_shard(token)];
        if cacheable {
            let now_s = self.clock.now_ms() / 1_000;
            let mut cached = shard.lock();
            if let Some(&(principal, exp)) = cached.get(token) {
                if now_s <= exp.saturating_add(self.leeway_seconds) {
                    return Ok(principal);
                }
                cached.remove(token);
                return Err(AuthError::Expired);
            }
        }
        let (principal, exp) = self.verify_uncached(token)?;
        if cacheable {
            let mut cached = shard.lock();
            if cached.len() >= self.tokens_per_shard {
                cached.clear();
            }
            cached.insert(token.into(), (principal, exp));
        }
        Ok(principal)
    }

    fn verify_uncached(&self, token: &str) -> Result<(Principal, u64), AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        let keys: Vec<&DecodingKey> = match header.alg {
            Algorithm::HS256 => self.hs256.iter().collect(),
            Algorithm::RS256 => self.rs256.iter().collect(),
            Algorithm::EdDSA => self.eddsa.iter().collect(),
            _ => Vec::new(),
        };
        if keys.is_empty() {
            return Err(AuthError::Algorithm(self.accepted.clone()));
        }
        let mut validation = Validation::new(header.alg);
        // `exp` stays required; it and `nbf` are checked below against `self.clock`, by
        // the same rules jsonwebtoken applies (expired once `exp + leeway` is past).
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.set_required_spec_claims(&["exp"]);
        let mut last = AuthError::Signature;
        for key in keys {
            match jsonwebtoken::decode::<Claims>(token, key, &validation) {
                Ok(data) => {
                    self.check_times(&data.claims)?;
                    let principal = Principal {
                        account_id: data.claims.account_id,
                        profile_id: data.claims.profile_id,
                    };
                    return Ok((principal, data.claims.exp));
                }
                Err(e) => {
                    last = map_error(e.kind());
                    if last != AuthError::Signature {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }
}

impl Verifier {
    /// `exp` and `nbf` against the clock, with the configured leeway.
    fn check_times(&self, claims: &Claims) -> Result<(), AuthError> {
        let now_s = self.clock.now_ms() / 1_000;
        if claims.exp.saturating_add(self.leeway_seconds) < now_s {
            return Err(AuthError::Expired);
        }
        if claims
            .nbf
            .is_some_and(|nbf| nbf > now_s.saturating_add(self.leeway_seconds))
        {
            return Err(AuthError::NotYetValid);
        }
        Ok(())
    }
}

fn foldhash_shard(token: &str) -> usize {
    use std::hash::BuildHasher;
    static SEED: std::sync::OnceLock<foldhash::fast::RandomState> = std::sync::OnceLock::new();
    let hash = SEED.get_or_init(Default::default).hash_one(token);
    (hash as usize) % CACHE_SHARDS
}

fn map_error(kind: &ErrorKind) -> AuthError {
    match kind {
        ErrorKind::InvalidSignature => AuthError::Signature,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::MissingRequiredClaim(c) => AuthError::Claim(c.clone()),
        ErrorKind::InvalidClaimFormat(c) => AuthError::Claim(c.clone()),
        ErrorKind::Json(e) => AuthError::Claim(claim_in(&e.to_string())),
        ErrorKind::InvalidAlgorithm => AuthError::Algorithm("see configuration".into()),
        _ => AuthError::Malformed,
    }
}

/// Pulls the claim name out of a serde message such as "missing field `account_id`".
fn claim_in(message: &str) -> String {
    message
        .split('`')
        .nth(1)
        .unwrap_or("account_id/profile_id")
        .to_string()
}

/// Mints an HS256 token for one profile, valid for `ttl_seconds` (development and load
/// testing: `playhead token`).
pub fn mint_hs256(
    secret: &str,
    account_id: u64,
    profile_id: u64,
    ttl_seconds: u64,
) -> Result<String, jsonwebtoken::errors::Error> {
    let now = crate::model::now_ms() / 1_000;
    let claims = Claims {
        account_id,
        profile_id,
        exp: now + ttl_seconds,
        nbf: None,
        iat: Some(now),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier() -> Verifier {
        Verifier::from_config(&AuthConfig::default()).unwrap()
    }

    fn b64(bytes: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    fn hs256(claims: serde_json::Value, secret: &str) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn future() -> u64 {
        crate::model::now_ms() / 1_000 + 3_600
    }

    /// A verifier on a clock the test moves, standing at the real time now (tokens are
    /// minted against the real time).
    fn verifier_at_now(leeway_seconds: u64, cache: usize) -> (Verifier, crate::model::Clock) {
        let clock = crate::model::Clock::manual(crate::model::now_ms());
        let config = AuthConfig {
            leeway_seconds,
            verified_token_cache: cache,
            ..AuthConfig::default()
        };
        (Verifier::with_clock(&config, clock.clone()).unwrap(), clock)
    }

    #[test]
    fn a_remembered_token_still_expires() {
        let (v, clock) = verifier_at_now(0, DEFAULT_VERIFIED_TOKENS);
        let t = mint_hs256(DEV_SECRET, 1, 2, 1).unwrap();
        assert!(v.verify(&t).is_ok());
        assert!(v.verify(&t).is_ok(), "served from the cache");
        clock.advance_ms(2_100);
        assert_eq!(v.verify(&t), Err(AuthError::Expired), "the cached token");
        assert_eq!(
            v.verify(&t),
            Err(AuthError::Expired),
            "verified again in full"
        );
        // A forged token that differs in one byte is never a cache hit.
        let good = mint_hs256(DEV_SECRET, 1, 2, 60).unwrap();
        assert!(v.verify(&good).is_ok());
        let mut forged = good.clone().into_bytes();
        let last = forged.len() - 1;
        forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
        assert!(v.verify(std::str::from_utf8(&forged).unwrap()).is_err());
    }

    /// Without the cache, `exp` and `nbf` are checked against the verifier's clock too,
    /// with the leeway on both sides.
    #[test]
    fn expiry_and_not_before_follow_the_clock() {
        let (v, clock) = verifier_at_now(30, 0);
        let now_s = clock.now_ms() / 1_000;
        let t = mint_hs256(DEV_SECRET, 1, 2, 60).unwrap();
        assert!(v.verify(&t).is_ok());
        clock.advance_ms(89_000);
        assert!(v.verify(&t).is_ok(), "within exp + leeway");
        clock.advance_ms(5_000);
        assert_eq!(v.verify(&t), Err(AuthError::Expired));
        let (v, clock) = verifier_at_now(30, 0);
        let early = hs256(
            serde_json::json!({"account_id": 1, "profile_id": 1, "exp": now_s + 3_600, "nbf": now_s + 100}),
            DEV_SECRET,
        );
        assert_eq!(v.verify(&early), Err(AuthError::NotYetValid));
        clock.advance_ms(71_000);
        assert!(v.verify(&early).is_ok(), "nbf - leeway passed");
    }

    #[test]
    fn any_cache_size_gives_the_same_answers() {
        for entries in [0, 1, 100] {
            let v = Verifier::from_config(&AuthConfig {
                verified_token_cache: entries,
                ..AuthConfig::default()
            })
            .unwrap();
            // More tokens than the cache holds, each asked twice, interleaved.
            let tokens: Vec<String> = (0..300)
                .map(|i| mint_hs256(DEV_SECRET, i, 1, 60).unwrap())
                .collect();
            for round in 0..2 {
                for (i, t) in tokens.iter().enumerate() {
                    let p = v
                        .verify(t)
                        .unwrap_or_else(|e| panic!("{entries}/{round}: {e}"));
                    assert_eq!(p.account_id, i as u64);
                }
            }
            let held: usize = v.cache.iter().map(|shard| shard.lock().len()).sum();
            assert!(
                held <= entries.div_ceil(CACHE_SHARDS) * CACHE_SHARDS,
                "{held}"
            );
            assert!(v.verify(&format!("{}x", tokens[0])).is_err());
        }
    }

    #[test]
    fn minted_token_verifies_to_its_profile() {
        let t = mint_hs256(DEV_SECRET, 42, 7, 60).unwrap();
        let p = verifier()
            .verify_header(Some(&format!("Bearer {t}")))
            .unwrap();
        assert_eq!(
            p,
            Principal {
                account_id: 42,
                profile_id: 7
            }
        );
    }

    #[test]
    fn every_bad_token_is_refused_with_its_reason() {
        let v = verifier();
        let exp = future();
        assert_eq!(v.verify_header(None), Err(AuthError::Missing));
        assert_eq!(
            v.verify_header(Some("Basic abc")),
            Err(AuthError::NotBearer)
        );
        assert_eq!(v.verify("not.a.jwt"), Err(AuthError::Malformed));
        let none = format!(
            "{}.{}.",
            b64(br#"{"alg":"none","typ":"JWT"}"#),
            b64(format!(r#"{{"account_id":1,"profile_id":1,"exp":{exp}}}"#).as_bytes())
        );
        assert!(v.verify(&none).is_err(), "alg none must never pass");
        let wrong = hs256(
            serde_json::json!({"account_id": 1, "profile_id": 1, "exp": exp}),
            "other",
        );
        assert_eq!(v.verify(&wrong), Err(AuthError::Signature));
        let expired = hs256(
            serde_json::json!({"account_id": 1, "profile_id": 1, "exp": 1_000}),
            DEV_SECRET,
        );
        assert_eq!(v.verify(&expired), Err(AuthError::Expired));
        let early = hs256(
            serde_json::json!({"account_id": 1, "profile_id": 1, "exp": exp, "nbf": exp}),
            DEV_SECRET,
        );
        assert_eq!(v.verify(&early), Err(AuthError::NotYetValid));
        let no_exp = hs256(
            serde_json::json!({"account_id": 1, "profile_id": 1}),
            DEV_SECRET,
        );
        assert_eq!(v.verify(&no_exp), Err(AuthError::Claim("exp".into())));
        let no_profile = hs256(serde_json::json!({"account_id": 1, "exp": exp}), DEV_SECRET);
        assert_eq!(
            v.verify(&no_profile),
            Err(AuthError::Claim("profile_id".into()))
        );
        let negative = hs256(
            serde_json::json!({"account_id": -1, "profile_id": 1, "exp": exp}),
            DEV_SECRET,
        );
        assert!(matches!(v.verify(&negative), Err(AuthError::Claim(_))));
        let long = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert_eq!(v.verify(&long), Err(AuthError::TooLong));
    }

    #[test]
    fn rs256_is_refused_when_only_a_secret_is_configured() {
        // Algorithm confusion: a token claiming RS256 (or HS384) finds no key of its family.
        let exp = future();
        let forged = format!(
            "{}.{}.{}",
            b64(br#"{"alg":"RS256","typ":"JWT"}"#),
            b64(format!(r#"{{"account_id":1,"profile_id":1,"exp":{exp}}}"#).as_bytes()),
            b64(b"sig")
        );
        assert!(matches!(
            verifier().verify(&forged),
            Err(AuthError::Algorithm(_))
        ));
    }
}
