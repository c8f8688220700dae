//! Authentication attacks tests/http_api.rs does not already make: RS256 with a real RSA
//! key configured and the HS/RS algorithm confusion against it, header tricks, tampered
//! claims; writes that try to reach another profile; and no token or secret in the log of
//! the real binary at debug level. Test-only keys: tests/fixtures/jwt/.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use common::process::Process;
use common::TestServer;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/jwt")
        .join(name)
}

fn pem(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap()
}

fn claims(account_id: u64) -> serde_json::Value {
    let exp = playhead::model::now_ms() / 1000 + 600;
    serde_json::json!({"account_id": account_id, "profile_id": 1, "exp": exp})
}

fn b64(v: &serde_json::Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

/// `header.claims` signed as `alg` with `key`, whatever the header says.
fn sign(
    header: serde_json::Value,
    claims: &serde_json::Value,
    alg: Algorithm,
    key: &EncodingKey,
) -> String {
    let input = format!("{}.{}", b64(&header), b64(claims));
    let sig = jsonwebtoken::crypto::sign(input.as_bytes(), key, alg).unwrap();
    format!("{input}.{sig}")
}

fn rsa_key(name: &str) -> EncodingKey {
    EncodingKey::from_rsa_pem(&pem(name)).unwrap()
}

fn rs256(claims: &serde_json::Value, key: &str) -> String {
    jsonwebtoken::encode(&Header::new(Algorithm::RS256), claims, &rsa_key(key)).unwrap()
}

async fn status(s: &TestServer, token: &str) -> u16 {
    s.request(
        "GET",
        "/api/v1/stream?movie_id=inception",
        Some(token),
        None,
    )
    .await
    .status
}

#[tokio::test]
async fn rs256_works_with_its_key_and_the_public_key_is_never_an_hmac_secret() {
    let public = fixture("rs256-public.pem");
    let s = TestServer::start_with(|c| c.auth.rs256_public_key_files = vec![public.clone()]).await;
    let c = claims(51);
    let good = rs256(&c, "rs256-private.pem");
    assert_eq!(
        status(&s, &good).await,
        200,
        "the control token is accepted"
    );

    let public_pem = pem("rs256-public.pem");
    let hmac_with = |key: &[u8], alg: &str| {
        sign(
            serde_json::json!({"alg": alg, "typ": "JWT"}),
            &c,
            Algorithm::HS256,
            &EncodingKey::from_secret(key),
        )
    };
    let real = rsa_key("rs256-private.pem");
    let trimmed = String::from_utf8(public_pem.clone())
        .unwrap()
        .trim()
        .to_string();
    let mut tampered = good.split('.').map(str::to_string).collect::<Vec<_>>();
    tampered[1] = b64(&claims(52));
    let cases: Vec<(&str, String)> = vec![
        (
            "RS256 signed by another key",
            rs256(&c, "attacker-private.pem"),
        ),
        (
            "HS256 keyed with the RSA public key PEM",
            hmac_with(&public_pem, "HS256"),
        ),
        (
            "HS256 keyed with the trimmed PEM",
            hmac_with(trimmed.as_bytes(), "HS256"),
        ),
        (
            "RS256 header over an HMAC keyed with the PEM",
            hmac_with(&public_pem, "RS256"),
        ),
        (
            "PS256 header, RS256 signature",
            sign(
                serde_json::json!({"alg": "PS256"}),
                &c,
                Algorithm::RS256,
                &real,
            ),
        ),
        (
            "RS512 header, RS256 signature",
            sign(
                serde_json::json!({"alg": "RS512"}),
                &c,
                Algorithm::RS256,
                &real,
            ),
        ),
        (
            "RS512 header and signature",
            sign(
                serde_json::json!({"alg": "RS512"}),
                &c,
                Algorithm::RS512,
                &real,
            ),
        ),
        (
            "lower-case alg",
            sign(
                serde_json::json!({"alg": "rs256"}),
                &c,
                Algorithm::RS256,
                &real,
            ),
        ),
        (
            "alg None",
            format!("{}.{}.", b64(&serde_json::json!({"alg": "None"})), b64(&c)),
        ),
        (
            "alg NONE",
            format!("{}.{}.", b64(&serde_json::json!({"alg": "NONE"})), b64(&c)),
        ),
        (
            "signature stripped",
            format!("{}.{}.", b64(&serde_json::json!({"alg": "RS256"})), b64(&c)),
        ),
        ("claims swapped under a valid signature", tampered.join(".")),
        (
            "jku/kid pointing at the attacker's key",
            sign(
                serde_json::json!({"alg": "RS256", "kid": "attacker", "jku": "http://127.0.0.1:1/jwks.json"}),
                &c,
                Algorithm::RS256,
                &rsa_key("attacker-private.pem"),
            ),
        ),
        (
            "embedded jwk of the attacker",
            sign(
                serde_json::json!({"alg": "RS256", "jwk": {"kty": "RSA", "n": "AQAB", "e": "AQAB"}}),
                &c,
                Algorithm::RS256,
                &rsa_key("attacker-private.pem"),
            ),
        ),
    ];
    for (name, token) in &cases {
        let r = s
            .request(
                "GET",
                "/api/v1/stream?movie_id=inception",
                Some(token),
                None,
            )
            .await;
        assert_eq!(r.status, 401, "{name}: {}", r.body);
        assert_eq!(r.error_code(), "unauthorized", "{name}");
        assert!(
            !r.body.contains(token.as_str()),
            "{name}: the answer echoes the token"
        );
    }
    // Extra header fields do not matter when the real key signed.
    let with_kid = sign(
        serde_json::json!({"alg": "RS256", "kid": "whatever"}),
        &c,
        Algorithm::RS256,
        &real,
    );
    assert_eq!(status(&s, &with_kid).await, 200);
    s.stop().await;

    // Only an RSA key configured (HS256 off): an HMAC keyed with its public key, or with
    // the development secret, is refused.
    let s = TestServer::start_with(|c| {
        c.auth.hs256_secret = String::new();
        c.auth.rs256_public_key_files = vec![public.clone()];
    })
    .await;
    assert_eq!(status(&s, &good).await, 200);
    assert_eq!(status(&s, &hmac_with(&public_pem, "HS256")).await, 401);
    let dev =
        playhead::ingest::auth::mint_hs256(playhead::ingest::auth::DEV_SECRET, 51, 1, 600).unwrap();
    assert_eq!(status(&s, &dev).await, 401);
    s.stop().await;
}

#[tokio::test]
async fn writes_reach_only_the_token_s_own_profile() {
    let s = TestServer::start().await;
    let owner = s.token(53, 1);
    let sibling = s.token(53, 2);
    assert_eq!(
        s.post_progress(&owner, r#"{"movie_id":"inception","position_seconds":500}"#)
            .await
            .status,
        204
    );
    assert_eq!(
        s.post_progress(
            &sibling,
            r#"{"movie_id":"inception","position_seconds":900}"#
        )
        .await
        .status,
        204
    );
    // The body cannot name another profile: unknown fields are refused.
    for field in ["account_id", "profile_id"] {
        let body = format!(r#"{{"movie_id":"inception","position_seconds":1,"{field}":1}}"#);
        let r = s.post_progress(&sibling, &body).await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (422, "invalid_field"),
            "{field}"
        );
    }
    // Query parameters naming a profile are ignored.
    let r = s
        .request(
            "GET",
            "/api/v1/stream?movie_id=inception&account_id=53&profile_id=1",
            Some(&sibling),
            None,
        )
        .await;
    assert_eq!(r.json()["resume_position_seconds"], 900);
    let r = s
        .request(
            "DELETE",
            "/api/v1/stream/progress?movie_id=inception&profile_id=1",
            Some(&sibling),
            None,
        )
        .await;
    assert!(matches!(r.status, 204 | 400), "{}", r.body);
    assert_eq!(
        s.resume(&owner, "inception").await["resume_position_seconds"],
        500
    );
    s.stop().await;
}

/// Tokens and secrets never reach the log, even at debug level, whatever the outcome.
#[test]
fn tokens_and_secrets_are_never_logged() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Process::start_with_log(dir.path(), &[], "debug");
    let valid =
        playhead::ingest::auth::mint_hs256(playhead::ingest::auth::DEV_SECRET, 54, 1, 600).unwrap();
    let expired = sign(
        serde_json::json!({"alg": "HS256"}),
        &serde_json::json!({"account_id": 54, "profile_id": 1, "exp": 1_000_000}),
        Algorithm::HS256,
        &EncodingKey::from_secret(playhead::ingest::auth::DEV_SECRET.as_bytes()),
    );
    let wrong_key = playhead::ingest::auth::mint_hs256("not-the-secret-zzzz", 54, 1, 600).unwrap();
    let garbage = "eyJtarker-garbage-token.QUJDREVGR0g.c2lnbmF0dXJlLW1hcmtlcg".to_string();
    let tokens = [valid.clone(), expired, wrong_key, garbage];
    for t in &tokens {
        p.http("GET", "/api/v1/stream?movie_id=inception", Some(t), None);
        p.http(
            "POST",
            "/api/v1/stream/progress",
            Some(t),
            Some(r#"{"movie_id":"inception","position_seconds":7}"#),
        );
        p.http("GET", "/api/v1/continue-watching", Some(t), None);
        p.http(
            "DELETE",
            "/api/v1/stream/progress?movie_id=inception",
            Some(t),
            None,
        );
    }
    // A wrong binary secret, and a right one.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let wrong_secret = "binary-secret-guess-marker";
    let _ = rt.block_on(playhead::ingest::binary::client::Client::connect(
        p.binary,
        wrong_secret.as_bytes(),
    ));
    let _ = rt.block_on(playhead::ingest::binary::client::Client::connect(
        p.binary,
        playhead::config::BINARY_DEV_SECRET.as_bytes(),
    ));
    p.stop_clean();
    std::thread::sleep(Duration::from_millis(100));
    let log = p.log();
    assert!(log.lines().count() > 5, "debug logging is on:\n{log}");
    for t in &tokens {
        let signature = t.rsplit('.').next().unwrap();
        assert!(!log.contains(t.as_str()), "a token is in the log:\n{log}");
        assert!(
            signature.len() < 8 || !log.contains(signature),
            "a token signature is in the log"
        );
    }
    for secret in [
        playhead::ingest::auth::DEV_SECRET,
        playhead::config::BINARY_DEV_SECRET,
        wrong_secret,
    ] {
        assert!(!log.contains(secret), "secret {secret:?} is in the log");
    }
    println!(
        "RESULT tokens_not_logged: {} debug log lines checked for {} tokens and 3 secrets",
        log.lines().count(),
        tokens.len()
    );
}
