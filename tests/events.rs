//! The change stream against a real nats-server with JetStream (docs/events.md): the real
//! `playhead serve` publishes every flushed row; a NATS outage blocks neither ingest nor
//! reads and loses no event; a crash with unpublished events publishes them after the
//! restart; SIGTERM publishes the final flush; a NATS that is down at start does not stop
//! the server. Each test starts its own nats-server on a free loopback port (skipped, with
//! the reason printed, when nats-server is not installed; scripts/test installs it).

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::nats::Nats;
use common::process::{metric, Process};
use playhead::events::{Event, EventKind};
use playhead::resume::catalog::title_id_of;
use playhead::resume::DeviceNames;

const STREAM: &str = "PLAYHEAD_EVENTS";
const PROGRESS: &str = "/api/v1/stream/progress";

fn o(key: &str, value: impl ToString) -> (&str, String) {
    (key, value.to_string())
}

/// Events on, a flush every 100 ms writing every key written before it, short timeouts
/// and backoffs so outages are seen and left quickly.
fn events_on(nats: &Nats) -> Vec<(&'static str, String)> {
    vec![
        o("EVENTS__KIND", "nats"),
        o("EVENTS__URL", nats.url()),
        o("EVENTS__ACK_TIMEOUT_MS", 1_000),
        o("EVENTS__CONNECT_TIMEOUT_MS", 500),
        // nats-server refuses a stream larger than its JetStream store may grow (by default
        // 75 % of the free disk), so the default 16 GiB stream fails on a fuller disk.
        o("EVENTS__MAX_BYTES", 256 << 20),
        o("FLUSH__INTERVAL_MS", 100),
        o("FLUSH__IDLE_MS", 0),
        o("FLUSH__RETRY_INITIAL_MS", 20),
        o("FLUSH__RETRY_MAX_MS", 300),
    ]
}

fn token(account_id: u64) -> String {
    playhead::ingest::auth::mint_hs256(playhead::ingest::auth::DEV_SECRET, account_id, 1, 600)
        .unwrap()
}

fn now_ms() -> u64 {
    playhead::model::now_ms()
}

/// POSTs one heartbeat stamped `at_ms` and expects 204.
fn post(p: &Process, account: u64, movie: &str, position: u32, at_ms: u64) {
    let body = format!(
        r#"{{"movie_id":"{movie}","position_seconds":{position},"device_id":"tv","timestamp_ms":{at_ms}}}"#
    );
    let a = p.http("POST", PROGRESS, Some(&token(account)), Some(&body));
    assert_eq!(a.status, 204, "{a:?}");
}

/// The resume position of `movie` for `account`, asserting the read answered.
fn resume_position(p: &Process, account: u64, movie: &str) -> u64 {
    let path = format!("/api/v1/stream?movie_id={movie}");
    let a = p.http("GET", &path, Some(&token(account)), None);
    assert_eq!(a.status, 200, "{a:?}");
    a.json()["resume_position_seconds"].as_u64().unwrap()
}

fn readyz(p: &Process) -> serde_json::Value {
    let a = p.http("GET", "/readyz", None, None);
    assert_eq!(a.status, 200, "{a:?}");
    a.json()
}

/// Waits until `check` holds for the metrics page.
/// Waits (up to 60 s) until every key is stored and every row the flushes wrote is
/// published, none pending.
fn wait_all_published(p: &Process) {
    wait_metrics(
        p,
        "every flushed row published",
        Duration::from_secs(60),
        |m| {
            metric(m, "playhead_events_pending") == 0.0
                && metric(m, "playhead_events_published_total")
                    == metric(m, "playhead_flush_rows_total")
                && metric(m, "playhead_coalescer_keys{state=\"dirty\"}") == 0.0
        },
    );
}

fn wait_metrics(p: &Process, what: &str, limit: Duration, check: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + limit;
    loop {
        let page = p.metrics();
        if check(&page) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} not seen within {limit:?}:\n{page}\n{}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The newest event (by version) of each (account, title), as an LWW consumer keeps them.
fn newest(events: &[(String, Event)]) -> BTreeMap<(u64, u64), Event> {
    let mut out: BTreeMap<(u64, u64), Event> = BTreeMap::new();
    for (_, e) in events {
        let version = |e: &Event| (e.updated_at_ms, e.device_id);
        let held = out.entry((e.account_id, e.title_id)).or_insert(e.clone());
        if version(e) > version(held) {
            *held = e.clone();
        }
    }
    out
}

/// `accounts` × inception at `position` stamped `at_ms`.
fn post_round(p: &Process, accounts: std::ops::RangeInclusive<u64>, position: u32, at_ms: u64) {
    for account in accounts {
        post(p, account, "inception", position, at_ms);
    }
}

/// Every account of `accounts` has inception's newest event at `position` stamped `at_ms`.
fn assert_newest(
    events: &[(String, Event)],
    accounts: std::ops::RangeInclusive<u64>,
    position: u32,
    at_ms: u64,
) {
    let newest = newest(events);
    for account in accounts {
        let e = newest
            .get(&(account, title_id_of("inception")))
            .unwrap_or_else(|| panic!("no event of account {account}"));
        assert_eq!(
            (e.position_seconds, e.updated_at_ms),
            (Some(position), at_ms),
            "account {account}"
        );
    }
}

#[test]
fn flushed_rows_arrive_as_progress_completed_and_deleted_events() {
    let Some(nats) = Nats::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut p = Process::start(dir.path(), &events_on(&nats));
    let at = now_ms() - 10_000;
    post(&p, 5, "inception", 100, at);
    // interstellar is 10140 s long: 10000 s is past 95 %.
    post(&p, 5, "interstellar", 10_000, at + 1);
    post(&p, 21, "arrival", 50, at + 2);
    let deleted = p.http(
        "DELETE",
        "/api/v1/stream/progress?movie_id=arrival",
        Some(&token(21)),
        None,
    );
    assert_eq!(deleted.status, 204, "{deleted:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let events = loop {
        let events = nats.events(STREAM, 3, Duration::from_secs(60));
        let arrival = newest(&events).get(&(21, title_id_of("arrival"))).cloned();
        if arrival.is_some_and(|e| e.kind == EventKind::Deleted) || Instant::now() > deadline {
            break events;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let newest = newest(&events);
    let inception = &newest[&(5, title_id_of("inception"))];
    assert_eq!(
        inception,
        &Event {
            v: 1,
            kind: EventKind::Progress,
            account_id: 5,
            profile_id: 1,
            title_id: title_id_of("inception"),
            catalog_id: Some("inception".into()),
            position_seconds: Some(100),
            updated_at_ms: at,
            device_id: Some(DeviceNames::id_of("tv")),
        }
    );
    let interstellar = &newest[&(5, title_id_of("interstellar"))];
    assert_eq!(interstellar.kind, EventKind::Completed);
    assert_eq!(interstellar.position_seconds, Some(10_000));
    assert_eq!(interstellar.updated_at_ms, at + 1);
    let arrival = &newest[&(21, title_id_of("arrival"))];
    assert_eq!(arrival.kind, EventKind::Deleted, "{events:?}");
    assert_eq!((arrival.position_seconds, arrival.device_id), (None, None));
    assert!(arrival.updated_at_ms > at + 2, "a deletion is stamped now");
    // Subjects: <prefix>.<account % partitions>, 16 partitions by default.
    for (subject, e) in &events {
        assert_eq!(subject, &format!("playhead.events.{}", e.account_id % 16));
    }
    // One event per flushed row (arrival's heartbeat and deletion may have been flushed
    // apart), each once: nothing failed, nothing was published twice.
    assert!((3..=4).contains(&events.len()), "{events:?}");
    wait_metrics(
        &p,
        "published = flushed rows",
        Duration::from_secs(10),
        |m| {
            metric(m, "playhead_events_published_total") == events.len() as f64
                && metric(m, "playhead_flush_rows_total") == events.len() as f64
        },
    );
    let page = p.metrics();
    assert_documented(&page);
    assert_eq!(metric(&page, "playhead_events_failed_total"), 0.0);
    assert_eq!(metric(&page, "playhead_events_pending"), 0.0);
    assert_eq!(metric(&page, "playhead_events_connected"), 1.0);
    let ready = readyz(&p);
    assert_eq!(
        (ready["status"].as_str(), ready["events"].as_str()),
        (Some("ready"), Some("ok")),
        "{ready}"
    );
    p.stop_clean();
}

/// The `playhead_events_*` families served are those docs/metrics.md lists, with their
/// types (tests/metrics_doc.rs checks the rest of the page; its server has events off).
fn assert_documented(page: &str) {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md")).unwrap();
    let documented: BTreeMap<String, String> = doc
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            name.starts_with("playhead_events_")
                .then(|| (name.to_string(), cells[2].to_string()))
        })
        .collect();
    let served: BTreeMap<String, String> = page
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE playhead_events_"))
        .map(|l| {
            let (name, kind) = l.split_once(' ').unwrap();
            // Counters are written with their full name (`_total`), as code names them.
            (format!("playhead_events_{name}"), kind.to_string())
        })
        .collect();
    assert_eq!(served, documented);
}

/// NATS goes away mid-run: every heartbeat is still acknowledged and every read answered
/// (from memory); flushes wait; once NATS is back every flushed row is published and the
/// stream's newest event of every key is its last heartbeat.
#[test]
fn a_nats_outage_blocks_neither_ingest_nor_reads_and_loses_no_event() {
    let Some(mut nats) = Nats::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut p = Process::start(dir.path(), &events_on(&nats));
    let accounts = 1..=30_u64;
    let base = now_ms() - 60_000;
    for round in 1..=2 {
        post_round(&p, accounts.clone(), round * 10, base + u64::from(round));
    }
    wait_metrics(
        &p,
        "the first rows published",
        Duration::from_secs(60),
        |m| metric(m, "playhead_events_published_total") >= 30.0,
    );
    nats.kill();
    // Every write is acknowledged (204) and every read answers the newest position while
    // the stream is away (timing is left to the benchmarks).
    for round in 3..=8 {
        post_round(&p, accounts.clone(), round * 10, base + u64::from(round));
        for account in accounts.clone() {
            assert_eq!(
                resume_position(&p, account, "inception"),
                u64::from(round) * 10
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    wait_metrics(
        &p,
        "failing rounds, rows pending",
        Duration::from_secs(60),
        |m| {
            metric(m, "playhead_events_failed_total") > 0.0
                && metric(m, "playhead_events_pending") > 0.0
                && metric(m, "playhead_events_lag_seconds") > 0.0
                && metric(m, "playhead_events_connected") == 0.0
        },
    );
    let ready = readyz(&p);
    assert_eq!(ready["status"], "degraded", "{ready}");
    assert!(
        ready["events"].as_str().is_some_and(|e| e != "ok"),
        "{ready}"
    );
    nats.restart();
    post_round(&p, accounts.clone(), 90, base + 9);
    wait_all_published(&p);
    let ready = readyz(&p);
    assert_eq!(ready["events"], "ok", "{ready}");
    p.stop_clean();
    let events = nats.events(STREAM, 90, Duration::from_secs(60));
    assert_newest(&events, accounts, 90, base + 9);
}

/// Rows the store synced but the stream never acknowledged, when the process dies
/// (SIGKILL): after the restart the log replays them and the next flush publishes them.
#[test]
fn a_crash_with_unpublished_events_publishes_them_after_the_restart() {
    let Some(mut nats) = Nats::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut p = Process::start(dir.path(), &events_on(&nats));
    let at = now_ms() - 30_000;
    // The stream exists (created by the first publish) before the outage.
    post(&p, 100, "inception", 1, at);
    wait_metrics(&p, "the first event", Duration::from_secs(60), |m| {
        metric(m, "playhead_events_published_total") >= 1.0
    });
    nats.kill();
    let accounts = 1..=20_u64;
    post_round(&p, accounts.clone(), 77, at + 1);
    // A cycle synced some of them to the store and waits for the stream; the rest wait
    // dirty behind it.
    wait_metrics(&p, "rows pending", Duration::from_secs(60), |m| {
        metric(m, "playhead_events_pending") >= 1.0
    });
    // Traffic goes on, so the log moves to new segments: a flush that let the log drop
    // the rows before their events were acknowledged would have lost them by now.
    for round in 0..5 {
        post_round(&p, 500..=510, 5 + round, at + 2 + u64::from(round));
        std::thread::sleep(Duration::from_millis(200));
    }
    p.kill9();
    nats.restart();
    let before = nats.events(STREAM, 1, Duration::from_secs(60));
    assert_eq!(before.len(), 1, "only the first event: {before:?}");
    let mut p = Process::start(dir.path(), &events_on(&nats));
    let events = nats.events(STREAM, 32, Duration::from_secs(60));
    assert_newest(&events, accounts, 77, at + 1);
    assert_newest(&events, 500..=510, 9, at + 6);
    p.stop_clean();
}

/// SIGTERM with rows no cycle wrote yet: the final flush writes and publishes them.
#[test]
fn sigterm_publishes_the_final_flush() {
    let Some(nats) = Nats::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut config = events_on(&nats);
    config.push(o("FLUSH__INTERVAL_MS", 3_600_000));
    let mut p = Process::start(dir.path(), &config);
    let at = now_ms() - 5_000;
    let accounts = 1..=25_u64;
    post_round(&p, accounts.clone(), 33, at);
    let page = p.metrics();
    assert_eq!(metric(&page, "playhead_events_published_total"), 0.0);
    p.stop_clean();
    let events = nats.events(STREAM, 25, Duration::from_secs(60));
    assert_eq!(events.len(), 25, "{events:?}");
    assert_newest(&events, accounts, 33, at);
}

/// NATS down when Playhead starts: it starts and serves; /readyz says `degraded` with why
/// the stream takes no events; once NATS is up the waiting rows are published.
#[test]
fn nats_down_at_start_does_not_stop_the_server() {
    let Some(mut nats) = Nats::not_started() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut p = Process::start(dir.path(), &events_on(&nats));
    let ready = readyz(&p);
    assert_eq!(ready["status"], "degraded", "{ready}");
    assert_eq!(ready["events"], "nats client not connected", "{ready}");
    let at = now_ms() - 5_000;
    post(&p, 8, "inception", 42, at);
    assert_eq!(resume_position(&p, 8, "inception"), 42);
    wait_metrics(&p, "a failing round", Duration::from_secs(60), |m| {
        metric(m, "playhead_events_failed_total") > 0.0
    });
    let ready = readyz(&p);
    assert!(
        ready["events"]
            .as_str()
            .is_some_and(|e| e.starts_with("failing: ")),
        "{ready}"
    );
    nats.restart();
    let events = nats.events(STREAM, 1, Duration::from_secs(60));
    assert_newest(&events, 8..=8, 42, at);
    wait_metrics(
        &p,
        "the stream taking events",
        Duration::from_secs(60),
        |m| {
            metric(m, "playhead_events_pending") == 0.0
                && metric(m, "playhead_events_connected") == 1.0
        },
    );
    let ready = readyz(&p);
    assert_eq!(
        (ready["status"].as_str(), ready["events"].as_str()),
        (Some("ready"), Some("ok")),
        "{ready}"
    );
    p.stop_clean();
}

/// A stream away for long meets the rules of a store outage: the cycle's keys stay dirty,
/// a snapshot keeps the commit log bounded, and past `coalescer.max_keys` a new key gets
/// 503 `overloaded` — and once NATS is back every key's newest value is published.
#[test]
fn a_long_outage_meets_the_overload_rules_and_loses_nothing() {
    use playhead::ingest::binary::client::{Client, Reply};
    use playhead::ingest::binary::codec::WireRecord;
    let Some(mut nats) = Nats::not_started() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut config = events_on(&nats);
    config.extend([
        o("COALESCER__SHARDS", 1),
        o("COALESCER__MAX_KEYS", 40),
        o("WAL__SEGMENT_BYTES", 64 << 10),
        o("WAL__SNAPSHOT_AFTER_BYTES", 128 << 10),
    ]);
    let mut p = Process::start(dir.path(), &config);
    let base = now_ms() - 60_000;
    // Rounds of the 40 keys go on until the log has been snapshotted, for the log grows
    // only once a cycle is stuck publishing: before, each cycle that completes (one that
    // picked nothing, every key rewritten since its epoch began) drops the log behind it,
    // and a fixed 600 rounds could all land before the first cycle got stuck (seen in CI:
    // 98 KB of log left, under the 128 KiB limit, and no snapshot). 7 800 rounds at most:
    // positions stay within the title, timestamps before now.
    let most_rounds = 7_800_u32;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let rounds = rt.block_on(async {
        let secret = playhead::config::BINARY_DEV_SECRET.as_bytes();
        let mut client = Client::connect(p.binary, secret).await.unwrap();
        for j in 0..most_rounds {
            let batch: Vec<WireRecord> = (1..=40)
                .map(|account_id| WireRecord {
                    account_id,
                    profile_id: 1,
                    title_id: title_id_of("inception"),
                    position_seconds: j + 1,
                    device_id: 3,
                    timestamp_ms: base + u64::from(j),
                })
                .collect();
            match client.write_batch(&batch).await.unwrap() {
                Reply::Ack { accepted, .. } => assert_eq!(accepted, 40),
                other => panic!("expected an ACK, got {other:?}"),
            }
            if j >= 600 && j % 20 == 0 {
                if metric(&p.metrics(), "playhead_wal_snapshots_total") >= 1.0 {
                    return j + 1;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        panic!("no snapshot after {most_rounds} rounds:\n{}", p.metrics());
    });
    wait_metrics(
        &p,
        "a snapshot bounding the log",
        Duration::from_secs(60),
        |m| {
            metric(m, "playhead_wal_snapshots_total") >= 1.0
                && metric(m, "playhead_wal_segment_bytes")
                    < metric(m, "playhead_wal_appended_bytes_total") / 2.0
                && metric(m, "playhead_events_failed_total") > 0.0
        },
    );
    let refused = p.http(
        "POST",
        PROGRESS,
        Some(&token(41)),
        Some(r#"{"movie_id":"inception","position_seconds":5,"device_id":"tv"}"#),
    );
    assert_eq!(refused.status, 503, "{refused:?}");
    assert!(refused.body.contains("overloaded"), "{}", refused.body);
    assert!(refused.header("retry-after").is_some(), "{}", refused.head);
    nats.restart();
    wait_all_published(&p);
    post(&p, 41, "inception", 5, base + 1_000);
    p.stop_clean();
    let events = nats.events(STREAM, 41, Duration::from_secs(60));
    assert_newest(&events, 1..=40, rounds, base + u64::from(rounds - 1));
    assert_newest(&events, 41..=41, 5, base + 1_000);
}

/// SIGTERM while NATS is away: the final flush gives up at `flush.shutdown_timeout_ms`, the
/// process exits with the rows in the log, and the next start publishes them.
#[test]
fn sigterm_with_nats_down_exits_at_its_deadline_and_publishes_after_the_restart() {
    let Some(mut nats) = Nats::not_started() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut config = events_on(&nats);
    config.push(o("FLUSH__SHUTDOWN_TIMEOUT_MS", 2_000));
    let mut p = Process::start(dir.path(), &config);
    let at = now_ms() - 5_000;
    post_round(&p, 1..=12, 21, at);
    let (status, took) = p.terminate(Duration::from_secs(30));
    assert!(status.success(), "exit status {status}:\n{}", p.log());
    assert!(took < Duration::from_secs(15), "shutdown took {took:?}");
    let done = p.wait_for_line("shutdown complete", Duration::from_secs(5));
    assert!(done.contains("left_in_log=12"), "{done}");
    nats.restart();
    let mut p = Process::start(dir.path(), &config);
    let events = nats.events(STREAM, 12, Duration::from_secs(60));
    assert_newest(&events, 1..=12, 21, at);
    p.stop_clean();
}
