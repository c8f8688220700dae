//! The public HTTP API end to end: real sockets on 127.0.0.1, the real engine and fjall
//! store, the shipped sample catalog (`config/catalog.toml`).

mod common;

use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use common::TestServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn progress(movie: &str, position: u32, device: &str, at_ms: u64) -> String {
    format!(
        r#"{{"movie_id":"{movie}","position_seconds":{position},"device_id":"{device}","timestamp_ms":{at_ms}}}"#
    )
}

fn now_ms() -> u64 {
    playhead::model::now_ms()
}

#[tokio::test]
async fn newest_heartbeat_wins_across_devices() {
    let s = TestServer::start().await;
    let t = s.token(10, 1);
    let base = now_ms() - 60_000;
    assert_eq!(
        s.post_progress(&t, &progress("inception", 2000, "tv-living-room", base))
            .await
            .status,
        204
    );
    // The phone reports later with an earlier position (the viewer seeked back).
    assert_eq!(
        s.post_progress(&t, &progress("inception", 1500, "phone", base + 4_000))
            .await
            .status,
        204
    );
    // A delayed heartbeat from the TV, older than the phone's.
    assert_eq!(
        s.post_progress(
            &t,
            &progress("inception", 2004, "tv-living-room", base + 2_000)
        )
        .await
        .status,
        204
    );

    let r = s.resume(&t, "inception").await;
    assert_eq!(r["movie_id"], "inception");
    assert_eq!(r["resume_position_seconds"], 1500);
    assert_eq!(r["last_device_id"], "phone");
    assert_eq!(r["updated_at_ms"], base + 4_000);
    assert_eq!(r["duration_seconds"], 7800);
    assert!(r["stream_url"].as_str().unwrap().starts_with("https://"));

    // Same answer once everything is flushed to the store and memory is empty.
    s.engine.flush().await.unwrap();
    let r = s.resume(&t, "inception").await;
    assert_eq!(r["resume_position_seconds"], 1500);
    assert_eq!(r["source"], "store");
    s.stop().await;
}

#[tokio::test]
async fn escaped_json_strings_mean_the_same_as_plain_ones() {
    // JSON escapes in the body's strings are decoded before the catalog lookup and the
    // device name are taken: `incep\u0074ion` is `inception`.
    let s = TestServer::start().await;
    let t = s.token(12, 1);
    let at = now_ms() - 60_000;
    let escaped = format!(
        r#"{{"movie_id":"incep\u0074ion","position_seconds":1200,"device_id":"tv\u002dkitchen \"2\"","timestamp_ms":{at}}}"#
    );
    assert_eq!(s.post_progress(&t, &escaped).await.status, 204);
    let r = s.resume(&t, "inception").await;
    assert_eq!(r["resume_position_seconds"], 1200);
    assert_eq!(r["last_device_id"], "tv-kitchen \"2\"");
    // A plain body for the same title updates the same key.
    let plain = format!(
        r#"{{"movie_id":"inception","position_seconds":1300,"device_id":"phone","timestamp_ms":{}}}"#,
        at + 4_000
    );
    assert_eq!(s.post_progress(&t, &plain).await.status, 204);
    let r = s.resume(&t, "inception").await;
    assert_eq!(r["resume_position_seconds"], 1300);
    assert_eq!(r["last_device_id"], "phone");
    s.stop().await;
}

#[tokio::test]
async fn future_client_timestamps_are_clamped() {
    let clock = playhead::model::Clock::manual(now_ms());
    let s = TestServer::start_with_clock(clock.clone(), |_| {}).await;
    let t = s.token(11, 1);
    // A device with a clock a day ahead cannot pin its value above later heartbeats forever.
    let far = clock.now_ms() + 86_400_000;
    assert_eq!(
        s.post_progress(&t, &progress("inception", 100, "skewed", far))
            .await
            .status,
        204
    );
    let r = s.resume(&t, "inception").await;
    assert_eq!(
        r["updated_at_ms"].as_u64(),
        Some(clock.now_ms() + s.config.ingest.max_clock_skew_ms),
        "clamped to the server's time plus the allowance"
    );
    // Once the allowance has passed, a heartbeat stamped by the server wins.
    clock.advance_ms(s.config.ingest.max_clock_skew_ms + 50);
    assert_eq!(
        s.post_progress(
            &t,
            r#"{"movie_id":"inception","position_seconds":200,"device_id":"honest"}"#
        )
        .await
        .status,
        204
    );
    let r = s.resume(&t, "inception").await;
    assert_eq!(r["resume_position_seconds"], 200);
    assert_eq!(r["updated_at_ms"].as_u64(), Some(clock.now_ms()));
    s.stop().await;
}

/// The resume answer as JSON. Which title and position it names is the business rules'
/// (completion, next episode: unit tests in src/resume); here, that each field of the
/// answer reaches the wire.
#[tokio::test]
async fn a_resume_answer_names_the_title_position_and_why() {
    let s = TestServer::start().await;
    let t = s.token(12, 1);
    let base = now_ms() - 60_000;
    // Episode 1 finished, episode 2 half-watched earlier: resume answers episode 2.
    s.post_progress(&t, &progress("dark-s01e02", 300, "phone", base + 2))
        .await;
    s.post_progress(&t, &progress("dark-s01e01", 2950, "tv", base + 3))
        .await;
    let r = s.resume(&t, "dark-s01e01").await;
    assert_eq!(r["movie_id"], "dark-s01e02");
    assert_eq!(r["resume_position_seconds"], 300);
    assert_eq!(r["next_episode_of"], "dark-s01e01");
    assert_eq!(r["completed"], true);
    assert_eq!(r["updated_at_ms"], base + 2);
    assert_eq!(r["last_device_id"], "phone");
    assert_eq!(r["source"], "memory");
    assert!(r["stream_url"].as_str().unwrap().contains("s01e02"));
    assert!(r["duration_seconds"].as_u64().unwrap() > 0);

    // Nothing saved: position 0, and no time, device or next episode at all.
    let r = s.resume(&t, "inception").await;
    assert_eq!(r["movie_id"], "inception");
    assert_eq!(r["resume_position_seconds"], 0);
    assert_eq!(r["completed"], false);
    for absent in ["updated_at_ms", "last_device_id", "next_episode_of"] {
        assert!(r.get(absent).is_none(), "{absent} in {r}");
    }
    s.stop().await;
}

/// The continue-watching answer as JSON, merged from store and memory and bounded by
/// `api.continue_watching_limit`. Which items it lists is the business rules' (unit tests
/// in src/resume).
#[tokio::test]
async fn continue_watching_lists_items_from_store_and_memory_as_json() {
    let s = TestServer::start_with(|c| c.api.continue_watching_limit = 3).await;
    let t = s.token(13, 1);
    let base = now_ms() - 60_000;
    s.post_progress(&t, &progress("inception", 1000, "tv", base))
        .await;
    s.post_progress(&t, &progress("dark-s01e02", 200, "phone", base + 2_000))
        .await;
    // Flush part of it, so the list merges store and memory.
    s.engine.flush().await.unwrap();
    s.post_progress(&t, &progress("inception", 1100, "tv", base + 4_000))
        .await;

    let r = s
        .request("GET", "/api/v1/continue-watching", Some(&t), None)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let body = r.json();
    assert_eq!(body["source"], "store");
    let items = body["items"].as_array().unwrap().clone();
    let ids: Vec<&str> = items
        .iter()
        .map(|i| i["movie_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["inception", "dark-s01e02"]);
    assert_eq!(items[0]["resume_position_seconds"], 1100);
    assert_eq!(items[0]["updated_at_ms"], base + 4_000);
    assert!(items[0].get("series").is_none());
    assert!(items[0]["stream_url"]
        .as_str()
        .unwrap()
        .contains("inception"));
    assert_eq!(items[1]["series"], "dark");
    assert_eq!(items[1]["last_device_id"], "phone");
    assert!(items[1]["duration_seconds"].as_u64().unwrap() > 0);

    // Bounded length.
    let other = s.token(13, 2);
    for (i, movie) in [
        "inception",
        "interstellar",
        "dark-s01e01",
        "arrival",
        "heat",
    ]
    .iter()
    .enumerate()
    {
        s.post_progress(&other, &progress(movie, 10, "tv", base + i as u64))
            .await;
    }
    let r = s
        .request("GET", "/api/v1/continue-watching", Some(&other), None)
        .await;
    assert_eq!(r.json()["items"].as_array().unwrap().len(), 3);
    s.stop().await;
}

#[tokio::test]
async fn delete_survives_a_late_older_heartbeat() {
    let s = TestServer::start().await;
    let t = s.token(14, 1);
    let base = now_ms() - 60_000;
    s.post_progress(&t, &progress("inception", 3000, "tv", base))
        .await;
    let r = s
        .request(
            "DELETE",
            "/api/v1/stream/progress?movie_id=inception",
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    // A heartbeat sent before the delete arrives after it.
    s.post_progress(&t, &progress("inception", 3004, "tv", base + 4_000))
        .await;
    assert_eq!(
        s.resume(&t, "inception").await["resume_position_seconds"],
        0
    );
    let cw = s
        .request("GET", "/api/v1/continue-watching", Some(&t), None)
        .await
        .json();
    assert!(cw["items"].as_array().unwrap().is_empty(), "{cw}");

    // Still gone after the tombstone reaches the store, and a late heartbeat after that.
    s.engine.flush().await.unwrap();
    s.post_progress(&t, &progress("inception", 3008, "tv", base + 8_000))
        .await;
    s.engine.flush().await.unwrap();
    assert_eq!(
        s.resume(&t, "inception").await["resume_position_seconds"],
        0
    );

    // Watching again afterwards brings it back.
    s.post_progress(&t, r#"{"movie_id":"inception","position_seconds":60}"#)
        .await;
    assert_eq!(
        s.resume(&t, "inception").await["resume_position_seconds"],
        60
    );
    s.stop().await;
}

#[tokio::test]
async fn a_token_reaches_only_its_own_profile() {
    let s = TestServer::start().await;
    let owner = s.token(15, 1);
    let sibling = s.token(15, 2);
    let stranger = s.token(16, 1);
    s.post_progress(&owner, &progress("inception", 500, "tv", now_ms() - 1_000))
        .await;
    for (who, token) in [("sibling", &sibling), ("stranger", &stranger)] {
        let r = s.resume(token, "inception").await;
        assert_eq!(r["resume_position_seconds"], 0, "{who}");
        let cw = s
            .request("GET", "/api/v1/continue-watching", Some(token), None)
            .await
            .json();
        assert!(cw["items"].as_array().unwrap().is_empty(), "{who}: {cw}");
        let d = s
            .request(
                "DELETE",
                "/api/v1/stream/progress?movie_id=inception",
                Some(token),
                None,
            )
            .await;
        assert_eq!(d.status, 204);
    }
    assert_eq!(
        s.resume(&owner, "inception").await["resume_position_seconds"],
        500
    );
    s.stop().await;
}

fn b64(v: &serde_json::Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

fn hs256(header: serde_json::Value, claims: serde_json::Value, secret: &str) -> String {
    jsonwebtoken_free_sign(&format!("{}.{}", b64(&header), b64(&claims)), secret)
}

/// HMAC-SHA256 signing without a JWT library, so tests can sign headers a library would
/// refuse to produce (`alg: RS256` over an HMAC, missing claims).
fn jsonwebtoken_free_sign(signing_input: &str, secret: &str) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(signing_input.as_bytes());
    format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}

#[tokio::test]
async fn bad_tokens_get_401_with_a_json_error() {
    let s = TestServer::start().await;
    let secret = s.config.auth.hs256_secret.clone();
    let exp = now_ms() / 1000 + 600;
    let claims = serde_json::json!({"account_id": 1, "profile_id": 1, "exp": exp});
    let hs = serde_json::json!({"alg": "HS256", "typ": "JWT"});
    let cases: Vec<(&str, Option<String>)> = vec![
        ("missing header", None),
        ("not bearer", Some("Basic dXNlcjpwYXNz".into())),
        ("garbage", Some("Bearer not.a.jwt".into())),
        (
            "alg none",
            Some(format!(
                "Bearer {}.{}.",
                b64(&serde_json::json!({"alg": "none"})),
                b64(&claims)
            )),
        ),
        (
            "wrong secret",
            Some(format!(
                "Bearer {}",
                hs256(hs.clone(), claims.clone(), "another-secret")
            )),
        ),
        (
            "RS256 header over an HMAC (algorithm confusion)",
            Some(format!(
                "Bearer {}",
                hs256(serde_json::json!({"alg": "RS256"}), claims.clone(), &secret)
            )),
        ),
        (
            "expired",
            Some(format!(
                "Bearer {}",
                hs256(
                    hs.clone(),
                    serde_json::json!({"account_id": 1, "profile_id": 1, "exp": 1_000_000}),
                    &secret
                )
            )),
        ),
        (
            "not yet valid",
            Some(format!(
                "Bearer {}",
                hs256(
                    hs.clone(),
                    serde_json::json!({"account_id": 1, "profile_id": 1, "exp": exp, "nbf": exp}),
                    &secret
                )
            )),
        ),
        (
            "no exp",
            Some(format!(
                "Bearer {}",
                hs256(
                    hs.clone(),
                    serde_json::json!({"account_id": 1, "profile_id": 1}),
                    &secret
                )
            )),
        ),
        (
            "no profile_id",
            Some(format!(
                "Bearer {}",
                hs256(
                    hs.clone(),
                    serde_json::json!({"account_id": 1, "exp": exp}),
                    &secret
                )
            )),
        ),
        (
            "negative account_id",
            Some(format!(
                "Bearer {}",
                hs256(
                    hs.clone(),
                    serde_json::json!({"account_id": -1, "profile_id": 1, "exp": exp}),
                    &secret
                )
            )),
        ),
        (
            "string profile_id",
            Some(format!(
                "Bearer {}",
                hs256(
                    hs.clone(),
                    serde_json::json!({"account_id": 1, "profile_id": "1", "exp": exp}),
                    &secret
                )
            )),
        ),
    ];
    // The control: the same construction with the right secret is accepted.
    let good = hs256(hs.clone(), claims.clone(), &secret);
    assert_eq!(
        s.resume(&good, "inception").await["resume_position_seconds"],
        0
    );

    for (name, authorization) in cases {
        for (method, path, body) in [
            ("GET", "/api/v1/stream?movie_id=inception", None),
            ("GET", "/api/v1/continue-watching", None),
            ("DELETE", "/api/v1/stream/progress?movie_id=inception", None),
            (
                "POST",
                "/api/v1/stream/progress",
                Some(r#"{"movie_id":"inception","position_seconds":1}"#),
            ),
        ] {
            let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\n");
            if let Some(a) = &authorization {
                raw.push_str(&format!("Authorization: {a}\r\n"));
            }
            let body = body.unwrap_or("");
            raw.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
            let r = s.raw(raw.as_bytes()).await;
            assert_eq!(r.status, 401, "{name} on {method} {path}: {}", r.body);
            assert_eq!(r.error_code(), "unauthorized", "{name}");
        }
    }
    s.stop().await;
}

#[tokio::test]
async fn bad_input_gets_a_4xx_naming_the_problem() {
    let s = TestServer::start_with(|c| c.http.max_body_bytes = 512).await;
    let t = s.token(17, 1);
    let post = |body: String| {
        let t = t.clone();
        let s = &s;
        async move { s.post_progress(&t, &body).await }
    };
    let cases: Vec<(String, u16, &str)> = vec![
        ("{not json".into(), 400, "malformed_json"),
        (r#"{"movie_id":"inception"}"#.into(), 422, "invalid_field"),
        (r#"{"movie_id":"inception","position_seconds":"12"}"#.into(), 422, "invalid_field"),
        (r#"{"movie_id":7,"position_seconds":12}"#.into(), 422, "invalid_field"),
        (r#"{"movie_id":"inception","position_seconds":-5}"#.into(), 422, "invalid_position"),
        (r#"{"movie_id":"inception","position_seconds":1e999}"#.into(), 400, "malformed_json"),
        (r#"{"movie_id":"inception","position_seconds":7861}"#.into(), 422, "position_out_of_range"),
        (r#"{"movie_id":"no-such-film","position_seconds":1}"#.into(), 404, "unknown_movie"),
        (r#"{"movie_id":"","position_seconds":1}"#.into(), 400, "invalid_movie_id"),
        (r#"{"movie_id":"inception","position_seconds":1,"device_id":""}"#.into(), 422, "invalid_device_id"),
        (format!(r#"{{"movie_id":"inception","position_seconds":1,"device_id":"{}"}}"#, "d".repeat(65)), 422, "invalid_device_id"),
        (r#"{"movie_id":"inception","position_seconds":1,"extra":true}"#.into(), 422, "invalid_field"),
        (r#"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["#.into(), 422, "invalid_field"),
        (format!(r#"{{"movie_id":"inception","position_seconds":1,"device_id":{}{}}}"#, "[".repeat(200), "]".repeat(200)), 422, "invalid_field"),
        (format!(r#"{{"movie_id":"inception","position_seconds":1,"device_id":"{}"}}"#, "x".repeat(600)), 413, "body_too_large"),
    ];
    for (body, status, code) in cases {
        let r = post(body.clone()).await;
        assert_eq!(r.status, status, "{body}: {}", r.body);
        assert_eq!(r.error_code(), code, "{body}");
    }
    // Accepted at exactly duration + allowance (7800 + 60).
    assert_eq!(
        post(r#"{"movie_id":"inception","position_seconds":7860}"#.into())
            .await
            .status,
        204
    );

    // Wrong content type.
    let raw = format!("POST /api/v1/stream/progress HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: Bearer {t}\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n{{}}");
    let r = s.raw(raw.as_bytes()).await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (415, "unsupported_media_type")
    );
    // Invalid UTF-8 in the body.
    let body = b"{\"movie_id\":\"\xff\xfe\",\"position_seconds\":1}";
    let mut raw = format!("POST /api/v1/stream/progress HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: Bearer {t}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
    raw.extend_from_slice(body);
    let r = s.raw(&raw).await;
    assert_eq!((r.status, r.error_code().as_str()), (400, "malformed_json"));
    // Missing query parameter, unknown route, wrong method.
    let r = s.request("GET", "/api/v1/stream", Some(&t), None).await;
    assert_eq!((r.status, r.error_code().as_str()), (400, "invalid_query"));
    let r = s
        .request("GET", "/api/v1/stream?movie_id=nope", Some(&t), None)
        .await;
    assert_eq!((r.status, r.error_code().as_str()), (404, "unknown_movie"));
    let r = s.request("GET", "/api/v2/anything", Some(&t), None).await;
    assert_eq!((r.status, r.error_code().as_str()), (404, "not_found"));
    let r = s
        .request("PUT", "/api/v1/stream/progress", Some(&t), None)
        .await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (405, "method_not_allowed")
    );

    // Nothing bad was stored: the only accepted write is the 7860 one.
    assert_eq!(s.resume(&t, "inception").await["completed"], true);
    let metrics = s.request("GET", "/metrics", None, None).await.body;
    assert!(metrics.contains(r#"playhead_heartbeats_rejected_total{protocol="http",reason="position_out_of_range"} 1"#), "{metrics}");
    s.stop().await;
}

/// An embedded store whose reads block their thread (a disk that stalls, injected with
/// `std::thread::sleep` inside fjall's read path, not an async sleep) on a runtime with one
/// worker: a resume read of a flushed title still answers 0 within the read budget, a
/// title in memory answers from memory, continue-watching degrades, and requests that do not
/// read the store (a heartbeat, /healthz) are answered meanwhile: the blocked reads hold
/// blocking-pool threads, never the worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn embedded_reads_that_block_their_thread_still_answer_within_the_budget() {
    const STALL_MS: u64 = 3_000;
    let s = TestServer::start_with(|c| c.store.read_timeout_ms = 50).await;
    let t = s.token(19, 1);
    s.post_progress(&t, &progress("inception", 900, "tv", now_ms() - 10_000))
        .await;
    s.engine.flush().await.unwrap();
    s.post_progress(&t, &progress("interstellar", 400, "tv", now_ms() - 5_000))
        .await;

    let heartbeat = progress("arrival", 60, "tv", now_ms());
    s.embedded.set_read_stall_ms(STALL_MS);
    let started = Instant::now();
    let (flushed, in_memory, listed, posted, alive) = tokio::join!(
        s.resume(&t, "inception"),
        s.resume(&t, "interstellar"),
        s.request("GET", "/api/v1/continue-watching", Some(&t), None),
        s.post_progress(&t, &heartbeat),
        s.request("GET", "/healthz", None, None),
    );
    let elapsed = started.elapsed();
    s.embedded.set_read_stall_ms(0);
    // Well under the stall: nothing waited for a blocked read.
    assert!(
        elapsed < Duration::from_millis(STALL_MS / 2),
        "answered after {elapsed:?} with reads blocked for {STALL_MS} ms"
    );
    assert_eq!(
        (
            flushed["resume_position_seconds"].as_u64(),
            flushed["source"].as_str()
        ),
        (Some(0), Some("degraded"))
    );
    assert_eq!(
        (
            in_memory["resume_position_seconds"].as_u64(),
            in_memory["source"].as_str()
        ),
        (Some(400), Some("memory"))
    );
    assert_eq!(listed.status, 200);
    assert_eq!(listed.json()["source"], "degraded");
    assert_eq!(posted.status, 204, "{}", posted.body);
    assert_eq!(alive.status, 200);
    s.stop().await;
}

#[tokio::test]
async fn reads_degrade_to_zero_within_the_budget_when_the_store_fails() {
    let s = TestServer::start_with(|c| c.store.read_timeout_ms = 50).await;
    let t = s.token(18, 1);
    s.post_progress(&t, &progress("inception", 900, "tv", now_ms() - 10_000))
        .await;
    s.engine.flush().await.unwrap();
    s.post_progress(&t, &progress("interstellar", 400, "tv", now_ms() - 5_000))
        .await;

    // A store that hangs: the flushed title answers 0 within the budget; the one still in
    // memory answers from memory.
    s.faults.set_read_delay_ms(5_000);
    let started = Instant::now();
    let r = s.resume(&t, "inception").await;
    assert!(
        started.elapsed() < Duration::from_millis(1_000),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        (r["resume_position_seconds"].as_u64(), r["source"].as_str()),
        (Some(0), Some("degraded"))
    );
    let r = s.resume(&t, "interstellar").await;
    assert_eq!(
        (r["resume_position_seconds"].as_u64(), r["source"].as_str()),
        (Some(400), Some("memory"))
    );
    let ready = s.request("GET", "/readyz", None, None).await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["status"], "degraded");

    // A store that errors.
    s.faults.set_read_delay_ms(0);
    s.faults.set_failing(false, true);
    let r = s.resume(&t, "inception").await;
    assert_eq!(r["source"], "degraded");
    let cw = s
        .request("GET", "/api/v1/continue-watching", Some(&t), None)
        .await;
    assert_eq!(cw.status, 200);
    assert_eq!(cw.json()["source"], "degraded");

    // Recovered.
    s.faults.set_failing(false, false);
    assert_eq!(
        s.resume(&t, "inception").await["resume_position_seconds"],
        900
    );
    let metrics = s.request("GET", "/metrics", None, None).await.body;
    assert!(
        metrics.contains("playhead_store_reads_total{source=\"degraded\"} 3"),
        "{metrics}"
    );
    s.stop().await;
}

/// `/readyz` probes the store within its own bound, not the read budget: with a long
/// `store.read_timeout_ms` and a store that hangs, it still answers `degraded` (200) long
/// before a balancer's health check gives up (HAProxy's: 2 s in deploy/haproxy.cfg). Before,
/// the probe waited the whole read budget, so a slow store got the node marked down.
#[tokio::test]
async fn readyz_answers_degraded_within_its_probe_bound_whatever_the_read_budget() {
    let s = TestServer::start_with(|c| c.store.read_timeout_ms = 60_000).await;
    s.faults.set_read_delay_ms(600_000);
    let ready = tokio::time::timeout(
        Duration::from_secs(5),
        s.request("GET", "/readyz", None, None),
    )
    .await
    .expect("/readyz waited for the 60 s read budget");
    assert_eq!(ready.status, 200);
    let body = ready.json();
    assert_eq!(body["status"], "degraded", "{body}");
    assert_eq!(
        body["store"],
        format!(
            "no answer within {} ms",
            playhead::engine::PROBE_STORE_MAX_MS
        ),
        "{body}"
    );
    s.faults.set_read_delay_ms(0);
    s.stop().await;
}

#[tokio::test]
async fn a_full_coalescer_answers_503_with_retry_after() {
    let s = TestServer::start_with(|c| {
        c.coalescer.shards = 1;
        c.coalescer.max_keys = 2;
    })
    .await;
    let t = s.token(19, 1);
    assert_eq!(
        s.post_progress(&t, &progress("inception", 1, "tv", now_ms()))
            .await
            .status,
        204
    );
    assert_eq!(
        s.post_progress(&t, &progress("interstellar", 1, "tv", now_ms()))
            .await
            .status,
        204
    );
    let r = s
        .post_progress(&t, &progress("arrival", 1, "tv", now_ms()))
        .await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.error_code(), "overloaded");
    // Keys already in memory still update.
    assert_eq!(
        s.post_progress(&t, &progress("inception", 2, "tv", now_ms()))
            .await
            .status,
        204
    );
    // After a flush there is room again.
    s.engine.flush().await.unwrap();
    assert_eq!(
        s.post_progress(&t, &progress("arrival", 1, "tv", now_ms()))
            .await
            .status,
        204
    );
    s.stop().await;
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let s = TestServer::start().await;
    let t = s.token(20, 1);
    s.post_progress(&t, &progress("inception", 5, "tv", now_ms()))
        .await;
    s.engine.flush().await.unwrap();
    s.resume(&t, "inception").await;
    let h = s.request("GET", "/healthz", None, None).await;
    assert_eq!(
        (h.status, h.json()["status"].as_str()),
        (200, Some("alive"))
    );
    let r = s.request("GET", "/readyz", None, None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "ready");
    assert_eq!(r.json()["wal"], "replayed");
    let m = s.request("GET", "/metrics", None, None).await;
    assert_eq!(m.status, 200);
    assert!(m.header("content-type").unwrap().starts_with("text/plain"));
    for name in [
        "playhead_heartbeats_accepted_total{protocol=\"http\"} 1",
        "playhead_coalescer_upserts_total{outcome=\"inserted\"} 1",
        "playhead_flush_rows_total 1",
        "playhead_flush_duration_seconds_count",
        "playhead_store_reads_total{source=\"store\"} 1",
        "playhead_wal_appended_bytes_total",
        "playhead_wal_fsync_seconds_bucket",
        "playhead_http_requests_total{route=\"post_progress\",status=\"204\"} 1",
        "playhead_http_request_duration_seconds_bucket{route=\"get_stream\",class=\"2xx\"",
        "playhead_resume_read_duration_seconds_count 1",
    ] {
        assert!(m.body.contains(name), "missing `{name}` in\n{}", m.body);
    }
    // Every sample line is `name{labels} value` or `name value`.
    for line in m.body.lines().filter(|l| !l.starts_with('#')) {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "bad sample line `{line}`");
    }
    s.stop().await;
}

/// A flush task that panics fails its cycle: `/readyz` then answers `degraded` with the
/// flush failing (heartbeats are still taken), until a cycle stores the keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_flush_shows_in_readiness_until_a_cycle_succeeds() {
    let s = TestServer::start().await;
    let t = s.token(21, 1);
    s.post_progress(&t, &progress("inception", 5, "tv", now_ms()))
        .await;
    let ready = s.request("GET", "/readyz", None, None).await.json();
    assert_eq!(
        (ready["status"].as_str(), ready["flush"].as_str()),
        (Some("ready"), Some("ok"))
    );

    s.faults.panic_next_writes(1);
    assert!(s.engine.flush().await.is_err(), "the cycle fails");
    let r = s.request("GET", "/readyz", None, None).await;
    assert_eq!(r.status, 200);
    let body = r.json();
    assert_eq!(body["status"], "degraded", "{body}");
    let flush = body["flush"].as_str().unwrap();
    assert!(
        flush.starts_with("failing: a flush task panicked")
            && flush.ends_with("(1 cycles in a row)"),
        "{flush}"
    );
    assert_eq!(body["store"], "reachable", "the store itself answers");
    // Still taking heartbeats meanwhile.
    assert_eq!(
        s.post_progress(&t, &progress("interstellar", 6, "tv", now_ms()))
            .await
            .status,
        204
    );

    assert_eq!(s.engine.flush().await.unwrap().rows, 2);
    let ready = s.request("GET", "/readyz", None, None).await.json();
    assert_eq!(
        (ready["status"].as_str(), ready["flush"].as_str()),
        (Some("ready"), Some("ok"))
    );
    let metrics = s.request("GET", "/metrics", None, None).await.body;
    assert!(
        metrics.contains("playhead_flush_panics_total 1"),
        "{metrics}"
    );
    s.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_cap_are_closed_and_slow_headers_time_out() {
    let s = TestServer::start_with(|c| {
        c.http.max_connections = 2;
        c.http.header_read_timeout_ms = 300;
    })
    .await;
    // Two idle connections hold both slots.
    let a = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let b = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .ok();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "the third connection is closed without an answer");

    // Slowloris: a connection that never finishes its headers is closed after the timeout,
    // freeing its slot.
    let mut slow = a;
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buf))
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    drop(b);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(s.request("GET", "/healthz", None, None).await.status, 200);
    s.stop().await;
}
