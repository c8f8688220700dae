//! Faults the server must survive, against the real `playhead` binary on 127.0.0.1, each
//! test bounded to well under 30 s. The list with the last measured numbers is in
//! docs/reliability.md; run `cargo test --test reliability -- --nocapture` to see them
//! (lines starting with `RESULT`). One more test kills and restarts a real Cassandra node;
//! it is `#[ignore]`d and needs `PLAYHEAD_TEST_CASSANDRA*` (docs/cassandra.md, How to run).
//!
//! The workload (see [`Workload`]) makes "the newest acknowledged value of every key" known
//! exactly: connection `c` owns its keys; every record of its batch `j` carries timestamp
//! `base_ts + j` and position `j % 7000`, so a stored value is checked both for being at
//! least as new as the newest acknowledged one and for being one that was really sent.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::process::{metric, parse_answer, Process};
use playhead::ingest::binary::client::{Client, Reply};
use playhead::ingest::binary::codec::WireRecord;
use playhead::model::Key;
use playhead::store::{EmbeddedStore, Store};
use rand::Rng;
use tokio::sync::{watch, Semaphore};

const MOVIE: &str = "inception";
/// Positions stay below 95 % of inception's 7800 s, so no read turns into "completed".
const POSITION_MODULO: u64 = 7_000;

fn o(key: &str, value: impl ToString) -> (&str, String) {
    (key, value.to_string())
}

fn now_ms() -> u64 {
    playhead::model::now_ms()
}

fn token(account_id: u64) -> String {
    playhead::ingest::auth::mint_hs256(playhead::ingest::auth::DEV_SECRET, account_id, 1, 600)
        .unwrap()
}

/// Who writes what. Key `k` of connection `c` is (`base_account + c * keys_per_conn + k`, 1,
/// inception); batch `j` of a connection covers `batch` consecutive keys (wrapping) starting
/// at `j * batch`.
#[derive(Clone, Debug)]
struct Workload {
    conns: usize,
    keys_per_conn: u64,
    batch: u64,
    base_account: u64,
    /// Below now by far more than the batches a test sends, so no timestamp is clamped.
    base_ts: u64,
    in_flight: usize,
    /// Pause between batches of one connection (a stated, bounded load), if any.
    pace: Option<Duration>,
}

impl Workload {
    fn new(conns: usize, keys_per_conn: u64, batch: u64, base_account: u64) -> Self {
        Self {
            conns,
            keys_per_conn,
            batch,
            base_account,
            base_ts: now_ms() - 3_600_000,
            in_flight: 16,
            pace: None,
        }
    }

    fn account(&self, conn: usize, k: u64) -> u64 {
        self.base_account + conn as u64 * self.keys_per_conn + k
    }

    fn key(&self, conn: usize, k: u64) -> Key {
        Key::new(
            self.account(conn, k),
            1,
            playhead::resume::catalog::title_id_of(MOVIE),
        )
    }

    fn keys_of(&self, j: u64) -> impl Iterator<Item = u64> + '_ {
        let first = j * self.batch;
        (0..self.batch.min(self.keys_per_conn)).map(move |i| (first + i) % self.keys_per_conn)
    }

    fn ts(&self, j: u64) -> u64 {
        self.base_ts + j
    }

    fn records(&self, conn: usize, j: u64) -> Vec<WireRecord> {
        self.keys_of(j)
            .map(|k| WireRecord {
                account_id: self.account(conn, k),
                profile_id: 1,
                title_id: playhead::resume::catalog::title_id_of(MOVIE),
                position_seconds: (j % POSITION_MODULO) as u32,
                device_id: 1,
                timestamp_ms: self.ts(j),
            })
            .collect()
    }

    fn fresh_states(&self) -> Vec<ConnState> {
        (0..self.conns)
            .map(|_| ConnState {
                next_batch: 1,
                acked: vec![0; self.keys_per_conn as usize],
                ack_times: Vec::new(),
                sent_times: Vec::new(),
                busy: 0,
                acked_records: 0,
            })
            .collect()
    }
}

/// What one connection sent and had acknowledged, carried across server restarts.
#[derive(Clone, Debug)]
struct ConnState {
    /// The next batch number: above every batch ever sent, so later values are newer.
    next_batch: u64,
    /// Per key: the newest acknowledged timestamp (0: none).
    acked: Vec<u64>,
    /// (batch, when its ACK arrived) for the current round.
    ack_times: Vec<(u64, Instant)>,
    /// (batch, when it was sent) for the current round.
    sent_times: Vec<(u64, Instant)>,
    busy: u64,
    acked_records: u64,
}

/// Drives `addr` with every connection until `stop` flips or the server goes away; returns
/// the updated states. `acks` counts acknowledged records as they arrive.
async fn drive(
    w: Arc<Workload>,
    addr: std::net::SocketAddr,
    states: Vec<ConnState>,
    acks: Arc<AtomicU64>,
    stop: watch::Receiver<bool>,
) -> Vec<ConnState> {
    let tasks: Vec<_> = states
        .into_iter()
        .enumerate()
        .map(|(c, st)| {
            tokio::spawn(run_conn(
                Arc::clone(&w),
                c,
                st,
                addr,
                Arc::clone(&acks),
                stop.clone(),
            ))
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

async fn run_conn(
    w: Arc<Workload>,
    c: usize,
    mut st: ConnState,
    addr: std::net::SocketAddr,
    acks: Arc<AtomicU64>,
    stop: watch::Receiver<bool>,
) -> ConnState {
    st.ack_times.clear();
    st.sent_times.clear();
    let secret = playhead::config::BINARY_DEV_SECRET.as_bytes();
    let Ok(client) = Client::connect(addr, secret).await else {
        return st;
    };
    let (mut tx, mut rx, _) = client.into_split();
    let (pending_tx, mut pending_rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let permits = Arc::new(Semaphore::new(w.in_flight));
    let outstanding = Arc::new(AtomicU64::new(0));
    let sender = {
        let (w, permits, outstanding) = (
            Arc::clone(&w),
            Arc::clone(&permits),
            Arc::clone(&outstanding),
        );
        let mut j = st.next_batch;
        tokio::spawn(async move {
            let mut sent_times = Vec::new();
            while !*stop.borrow() {
                let Ok(permit) = permits.acquire().await else {
                    break;
                };
                permit.forget();
                let records = w.records(c, j);
                outstanding.fetch_add(1, Ordering::SeqCst);
                if tx.send_batch(&records).await.is_err() {
                    break;
                }
                let _ = pending_tx.send(j);
                sent_times.push((j, Instant::now()));
                j += 1;
                if let Some(pace) = w.pace {
                    tokio::time::sleep(pace).await;
                }
            }
            (j + 1, sent_times)
        })
    };
    loop {
        let reply = match tokio::time::timeout(Duration::from_millis(50), rx.recv()).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => break, // the server went away (or said goodbye)
            Err(_) => {
                if sender.is_finished() && outstanding.load(Ordering::SeqCst) == 0 {
                    break;
                }
                continue;
            }
        };
        let j = pending_rx
            .recv()
            .await
            .expect("a reply matches a sent batch");
        outstanding.fetch_sub(1, Ordering::SeqCst);
        permits.add_permits(1);
        match reply {
            Reply::Ack {
                accepted,
                rejections,
                ..
            } => {
                assert!(
                    rejections.is_empty(),
                    "valid records refused: {rejections:?}"
                );
                let ts = w.ts(j);
                for k in w.keys_of(j) {
                    let slot = &mut st.acked[k as usize];
                    *slot = (*slot).max(ts);
                }
                st.ack_times.push((j, Instant::now()));
                st.acked_records += u64::from(accepted);
                acks.fetch_add(u64::from(accepted), Ordering::SeqCst);
            }
            Reply::Busy { .. } => st.busy += 1,
        }
    }
    permits.close();
    if let Ok((next, sent_times)) = sender.await {
        st.next_batch = st.next_batch.max(next);
        st.sent_times = sent_times;
    }
    st
}

/// Per connection and key: the timestamp of the stored value (0: none), after checking that
/// every stored value is one the workload really sent.
fn stored_versions(dir: &Path, w: &Workload) -> Vec<Vec<u64>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let store = EmbeddedStore::open(&dir.join("store"), 8 << 20).unwrap();
    stored_versions_in(&rt, &store, w)
}

/// [`stored_versions`] of any store, read on `rt`.
fn stored_versions_in(
    rt: &tokio::runtime::Runtime,
    store: &dyn Store,
    w: &Workload,
) -> Vec<Vec<u64>> {
    (0..w.conns)
        .map(|c| {
            (0..w.keys_per_conn)
                .map(|k| match rt.block_on(store.get(w.key(c, k))).unwrap() {
                    None => 0,
                    Some(v) => {
                        let j = v.updated_at_ms - w.base_ts;
                        assert_eq!(
                            u64::from(v.position_seconds),
                            j % POSITION_MODULO,
                            "key {c}/{k} holds a value never sent: {v:?}"
                        );
                        v.updated_at_ms
                    }
                })
                .collect()
        })
        .collect()
}

/// Acknowledged newest values missing from `stored`: (checked keys, lost keys).
fn acked_losses(states: &[ConnState], stored: &[Vec<u64>]) -> (u64, u64) {
    let (mut checked, mut lost) = (0, 0);
    for (st, stored) in states.iter().zip(stored) {
        for (acked, stored) in st.acked.iter().zip(stored) {
            if *acked > 0 {
                checked += 1;
                if stored < acked {
                    lost += 1;
                }
            }
        }
    }
    (checked, lost)
}

/// A few acknowledged keys read back over HTTP from a running server: each answer is at
/// least as new as the newest acknowledged value and consistent with it.
fn spot_check_over_http(p: &Process, w: &Workload, states: &[ConnState], samples: usize) {
    let mut rng = rand::rng();
    for _ in 0..samples {
        let c = rng.random_range(0..w.conns);
        let k = rng.random_range(0..w.keys_per_conn);
        let acked = states[c].acked[k as usize];
        let a = p.http(
            "GET",
            &format!("/api/v1/stream?movie_id={MOVIE}"),
            Some(&token(w.account(c, k))),
            None,
        );
        assert_eq!(a.status, 200, "{}", a.body);
        let v = a.json();
        if acked == 0 {
            continue;
        }
        let at = v["updated_at_ms"]
            .as_u64()
            .unwrap_or_else(|| panic!("key {c}/{k}: acknowledged {acked}, read {v}"));
        assert!(
            at >= acked,
            "key {c}/{k}: read {at} < acknowledged {acked}: {v}"
        );
        assert_eq!(
            v["resume_position_seconds"].as_u64().unwrap(),
            (at - w.base_ts) % POSITION_MODULO
        );
    }
}

/// When a kill round pulls the trigger.
enum Trigger {
    /// Once this many more records are acknowledged.
    AfterAcks(u64),
    /// As soon as a snapshot is being written (its `.tmp` file exists), else after the acks.
    MidSnapshot(u64),
}

struct KillOutcome {
    states: Vec<ConnState>,
    killed_at: Instant,
    /// A `snapshot-*.tmp` was on disk after the kill: it landed inside a snapshot.
    mid_snapshot: bool,
    busy: u64,
}

/// Starts the server on `dir`, drives it, SIGKILLs it at the trigger while the load runs.
fn kill_round(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    overrides: &[(&str, String)],
    w: &Arc<Workload>,
    states: Vec<ConnState>,
    trigger: Trigger,
) -> KillOutcome {
    let mut p = Process::start(dir, overrides);
    let acks = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let driver = rt.spawn(drive(
        Arc::clone(w),
        p.binary,
        states,
        Arc::clone(&acks),
        stop_rx,
    ));
    let wal = dir.join("wal");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let n = acks.load(Ordering::SeqCst);
        let fire = match trigger {
            Trigger::AfterAcks(target) => n >= target,
            Trigger::MidSnapshot(fallback) => n >= fallback && snapshot_in_progress(&wal),
        };
        if fire || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    let killed_at = Instant::now();
    p.kill9();
    let mid_snapshot = snapshot_in_progress(&wal);
    let _ = stop_tx.send(true);
    let states = rt.block_on(driver).unwrap();
    let busy = states.iter().map(|s| s.busy).sum();
    KillOutcome {
        states,
        killed_at,
        mid_snapshot,
        busy,
    }
}

fn snapshot_in_progress(wal: &Path) -> bool {
    std::fs::read_dir(wal).is_ok_and(|d| {
        d.filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
    })
}

/// Restarts on `dir` (replaying the log), spot-checks reads, stops cleanly (final flush),
/// and returns the stored versions.
fn restart_and_collect(
    dir: &Path,
    overrides: &[(&str, String)],
    w: &Workload,
    states: &[ConnState],
) -> Vec<Vec<u64>> {
    // A generous read budget: these reads check what survived the kill. Under the default
    // 70 ms budget a store read slowed by a loaded machine is answered from memory, which
    // can hold an older value than the store (the documented slow-store fallback). One
    // loaded full `cargo test` run read 23 ms older than acknowledged here; that this
    // fallback was the cause is likely but not shown (docs/reliability.md, Known limits).
    let mut overrides = overrides.to_vec();
    overrides.push(o("STORE__READ_TIMEOUT_MS", 10_000));
    let mut p = Process::start(dir, &overrides);
    spot_check_over_http(&p, w, states, 20);
    p.stop_clean();
    stored_versions(dir, w)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Several SIGKILLs under pipelined load in `group` mode; after each, every acknowledged
/// newest value must be there. With `fault_file` (the store held down, so the log guard
/// writes snapshots), every kill must also have landed inside a snapshot.
fn kills_lose_nothing(
    name: &str,
    overrides: &[(&str, String)],
    w: Workload,
    kills: usize,
    fault_file: Option<&Path>,
) {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let w = Arc::new(w);
    let mut states = w.fresh_states();
    let (mut checked_total, mut acked_total, mut busy_total, mut mid_snapshot) = (0, 0, 0, 0);
    let mut rng = rand::rng();
    for round in 0..kills {
        if let Some(f) = fault_file {
            std::fs::write(f, b"store down").unwrap();
        }
        let trigger = if fault_file.is_some() {
            Trigger::MidSnapshot(rng.random_range(5_000..20_000))
        } else {
            Trigger::AfterAcks(rng.random_range(10_000..40_000))
        };
        let before: u64 = states.iter().map(|s| s.acked_records).sum();
        let out = kill_round(&rt, dir.path(), overrides, &w, states, trigger);
        states = out.states;
        mid_snapshot += u64::from(out.mid_snapshot);
        busy_total += out.busy;
        acked_total += states.iter().map(|s| s.acked_records).sum::<u64>() - before;
        if let Some(f) = fault_file {
            std::fs::remove_file(f).unwrap();
        }
        let stored = restart_and_collect(dir.path(), overrides, &w, &states);
        let (checked, lost) = acked_losses(&states, &stored);
        assert_eq!(
            lost, 0,
            "{name}: round {round}: {lost} of {checked} acknowledged newest values lost"
        );
        checked_total += checked;
    }
    println!(
        "RESULT {name}: kills={kills} lost_acknowledged=0 acked_records={acked_total} newest_values_checked={checked_total} busy_batches={busy_total} kills_inside_a_snapshot={mid_snapshot}"
    );
    if fault_file.is_some() {
        // The point of the store-down rounds: each kill must land while a snapshot is
        // being written (its `.tmp` still on disk after the kill), or the test has not
        // shown what it claims.
        assert_eq!(
            mid_snapshot, kills as u64,
            "{name}: only {mid_snapshot} of {kills} kills landed inside a snapshot"
        );
    }
}

#[test]
fn kill9_in_group_mode_loses_no_acknowledged_heartbeat() {
    kills_lose_nothing(
        "kill9_group",
        &[o("WAL__SYNC_MODE", "group")],
        Workload::new(4, 2_000, 256, 1_000_000),
        3,
        None,
    );
}

/// Flushes every 5 ms and 64 KiB segments: kills land in the middle of flush cycles, of
/// segment rotations and deletions, and of fsyncs.
#[test]
fn kill9_mid_flush_loses_no_acknowledged_heartbeat() {
    kills_lose_nothing(
        "kill9_group_mid_flush",
        &[
            o("WAL__SYNC_MODE", "group"),
            o("FLUSH__INTERVAL_MS", 5),
            o("WAL__SEGMENT_BYTES", 65_536),
            o("WAL__SNAPSHOT_AFTER_BYTES", 131_072),
        ],
        Workload::new(4, 2_000, 256, 2_000_000),
        3,
        None,
    );
}

/// The store is down and the log is capped at 128 KiB, so a snapshot of 16 000 keys is
/// written every half second; each kill fires as soon as a snapshot's `.tmp` file appears.
#[test]
fn kill9_mid_snapshot_loses_no_acknowledged_heartbeat() {
    let faults = tempfile::tempdir().unwrap();
    let fault_file = faults.path().join("store-down");
    kills_lose_nothing(
        "kill9_group_mid_snapshot",
        &[
            o("WAL__SYNC_MODE", "group"),
            o("WAL__SEGMENT_BYTES", 65_536),
            o("WAL__SNAPSHOT_AFTER_BYTES", 131_072),
            o("FLUSH__RETRY_MAX_MS", 200),
            o("FAULTS__STORE_WRITE_FAULT_FILE", fault_file.display()),
        ],
        Workload::new(4, 4_000, 500, 3_000_000),
        3,
        Some(&fault_file),
    );
}

/// `periodic` mode acknowledges before the fsync: a crash may lose the last moments of
/// acknowledged heartbeats. Measure that window: how long before the kill the oldest lost
/// acknowledgement arrived. A SIGKILL keeps the page cache, so what is lost is what the
/// writer had not yet handed to write(2) (it drains every 2 ms); `sync_interval_ms` bounds
/// the loss on a power cut, which no test here can cause.
///
/// 64 KiB segments make the log rotate every few batches, so a kill often lands while a
/// new segment's directory entry is being fsynced: that fsync must not stop the writer
/// (when it ran on the writer's thread, appends kept being acknowledged into the buffer
/// for as long as it took, tens of ms on this VM's disk).
#[test]
fn periodic_mode_loss_window_is_bounded() {
    const SYNC_INTERVAL_MS: u64 = 10;
    const KILLS: usize = 6;
    /// The interval, the 2 ms write cadence, and room for scheduling noise on a shared
    /// 2-core machine (a debug build; the writer thread was seen waiting up to ~25 ms on
    /// the run queue). With the directory fsync on the writer's thread the worst kill of a
    /// run lost 59–263 ms of acknowledgements; without it, 0–16 ms.
    const BOUND_MS: u64 = SYNC_INTERVAL_MS + 15;
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let overrides = [
        o("WAL__SYNC_MODE", "periodic"),
        o("WAL__SYNC_INTERVAL_MS", SYNC_INTERVAL_MS),
        o("WAL__SEGMENT_BYTES", 65_536),
    ];
    let w = Arc::new(Workload::new(4, 2_000, 256, 4_000_000));
    let mut states = w.fresh_states();
    let mut rng = rand::rng();
    let (mut windows_ms, mut lost_records, mut acked) = (Vec::new(), 0u64, 0u64);
    for _ in 0..KILLS {
        let before: u64 = states.iter().map(|s| s.acked_records).sum();
        let out = kill_round(
            &rt,
            dir.path(),
            &overrides,
            &w,
            states,
            Trigger::AfterAcks(rng.random_range(20_000..80_000)),
        );
        states = out.states;
        acked += states.iter().map(|s| s.acked_records).sum::<u64>() - before;
        let mut p = Process::start(dir.path(), &overrides);
        p.stop_clean();
        let stored = stored_versions(dir.path(), &w);
        // A lost acknowledgement: a batch some of whose keys hold an older value.
        let mut oldest_lost: Option<Instant> = None;
        for (st, stored) in states.iter().zip(&stored) {
            for &(j, at) in &st.ack_times {
                let lost = w
                    .keys_of(j)
                    .filter(|&k| stored[k as usize] < w.ts(j))
                    .count();
                if lost > 0 {
                    lost_records += lost as u64;
                    oldest_lost = Some(oldest_lost.map_or(at, |o| o.min(at)));
                }
            }
        }
        // The window: from the oldest lost acknowledgement to the newest acknowledgement
        // received (some arrive between the decision to kill and the kill itself).
        let newest_ack = states
            .iter()
            .flat_map(|st| st.ack_times.iter().map(|(_, at)| *at))
            .max()
            .unwrap_or(out.killed_at);
        let window = oldest_lost.map_or(Duration::ZERO, |at| {
            newest_ack.saturating_duration_since(at)
        });
        windows_ms.push(window.as_secs_f64() * 1e3);
    }
    println!(
        "RESULT periodic_loss_window: sync_interval_ms={SYNC_INTERVAL_MS} segment_bytes=65536 kills={KILLS} acked_records={acked} lost_acked_records={lost_records} loss_window_ms={windows_ms:.1?} bound_ms={BOUND_MS}"
    );
    let worst = windows_ms.iter().cloned().fold(0.0, f64::max);
    assert!(
        worst <= BOUND_MS as f64,
        "acknowledged heartbeats lost over up to {worst:.1} ms of acknowledgements (bound {BOUND_MS} ms): {windows_ms:.1?}"
    );
}

/// Builds a log of `segments` full segments through the real commit log, each frame
/// `FRAME_RECORDS` records with distinct keys, and returns every record in order.
fn write_log(wal_dir: &Path, frames: u64) -> Vec<playhead::model::Record> {
    use playhead::model::{Record, Value};
    let (wal, _) = playhead::engine::wal::Wal::open(
        playhead::engine::wal::WalOptions {
            dir: wal_dir.to_path_buf(),
            sync_mode: playhead::config::SyncMode::Periodic,
            sync_interval_ms: 10,
            segment_bytes: 65_536,
            max_buffer_bytes: 64 << 20,
        },
        |_| {},
    )
    .unwrap();
    let title = playhead::resume::catalog::title_id_of(MOVIE);
    let ts = now_ms() - 60_000;
    let mut all = Vec::new();
    for f in 0..frames {
        let frame: Vec<Record> = (0..FRAME_RECORDS)
            .map(|i| {
                let n = f * FRAME_RECORDS + i;
                Record::new(
                    Key::new(5_000_000 + n, 1, title),
                    Value::new((n % 7_000) as u32, ts, 1),
                )
            })
            .collect();
        wal.append(&frame).unwrap();
        all.extend(frame);
    }
    wal.close();
    all
}

const FRAME_RECORDS: u64 = 10;
/// Bytes of one frame of [`FRAME_RECORDS`] records: 12-byte header + 40 bytes a record.
const FRAME_BYTES: u64 = 12 + 40 * FRAME_RECORDS;
const FILE_HEADER: u64 = 16;

fn segment_files(wal: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(wal)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    v.sort();
    v
}

/// The `records=` count of the start-up "commit log replayed" line.
fn replayed_records(line: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("records="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no records= in {line}"))
}

/// A damage to apply to a copy of the log directory: (what, how, frames left intact,
/// whether start-up reports a problem).
type DamageCase = (String, Box<dyn Fn(&Path)>, Vec<u64>, bool);

/// Truncations at random offsets of the last segment and bit flips in the middle of an
/// earlier one: the real server starts, reports each damaged region, replays exactly the
/// intact frames, and serves their records.
#[test]
fn torn_and_corrupt_commit_log_recovers_every_intact_frame() {
    let pristine = tempfile::tempdir().unwrap();
    let all = write_log(&pristine.path().join("wal"), 400);
    let files = segment_files(&pristine.path().join("wal"));
    assert!(files.len() >= 3, "{files:?}");
    let frames_in = |f: &Path| (std::fs::metadata(f).unwrap().len() - FILE_HEADER) / FRAME_BYTES;
    let frames_per_file: Vec<u64> = files.iter().map(|f| frames_in(f)).collect();
    let first_frame_of = |file: usize| frames_per_file[..file].iter().sum::<u64>();
    let total_frames: u64 = frames_per_file.iter().sum();
    assert_eq!(total_frames, 400);

    let mut rng = rand::rng();
    let mut cases: Vec<DamageCase> = Vec::new();
    // Truncations of the last segment at random offsets (inside the header, on and off
    // frame boundaries).
    let last = files.len() - 1;
    let last_len = std::fs::metadata(&files[last]).unwrap().len();
    for cut in [
        rng.random_range(FILE_HEADER + 1..last_len),
        rng.random_range(FILE_HEADER + 1..last_len),
        FILE_HEADER + 3 * FRAME_BYTES,
        rng.random_range(1..FILE_HEADER),
    ] {
        let name = files[last].file_name().unwrap().to_owned();
        let intact_in_last = if cut < FILE_HEADER {
            0
        } else {
            (cut - FILE_HEADER) / FRAME_BYTES
        };
        let kept: Vec<u64> = (0..first_frame_of(last) + intact_in_last).collect();
        let reported = cut < FILE_HEADER || !(cut - FILE_HEADER).is_multiple_of(FRAME_BYTES);
        cases.push((
            format!("truncate the last segment at byte {cut}"),
            Box::new(move |wal: &Path| {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(wal.join(&name))
                    .unwrap();
                f.set_len(cut).unwrap();
            }),
            kept,
            reported,
        ));
    }
    // Bit flips inside frames of the first segment: in a payload, a CRC, a length, a magic.
    for (what, at_in_frame) in [
        ("payload", 12 + 40 * 3 + 7),
        ("crc", 9),
        ("length", 5),
        ("magic", 1),
    ] {
        let frame = rng.random_range(1..frames_per_file[0] - 1);
        let name = files[0].file_name().unwrap().to_owned();
        let offset = FILE_HEADER + frame * FRAME_BYTES + at_in_frame;
        let bit = 1u8 << rng.random_range(0..8);
        cases.push((
            format!("flip a bit of the {what} of frame {frame} of the first segment"),
            Box::new(move |wal: &Path| {
                let path = wal.join(&name);
                let mut bytes = std::fs::read(&path).unwrap();
                bytes[offset as usize] ^= bit;
                std::fs::write(&path, bytes).unwrap();
            }),
            (0..total_frames).filter(|&f| f != frame).collect(),
            true,
        ));
    }

    let title = playhead::resume::catalog::title_id_of(MOVIE);
    for (name, damage, kept, reported) in cases {
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join("wal");
        std::fs::create_dir(&wal).unwrap();
        for f in &files {
            std::fs::copy(f, wal.join(f.file_name().unwrap())).unwrap();
        }
        damage(&wal);
        let mut p = Process::start(dir.path(), &[]);
        let replayed = p.wait_for_line("commit log replayed", Duration::from_secs(5));
        assert_eq!(
            replayed_records(&replayed),
            kept.len() as u64 * FRAME_RECORDS,
            "{name}: {replayed}"
        );
        let problems: Vec<String> = p
            .log()
            .lines()
            .filter(|l| l.contains("commit-log replay:"))
            .map(str::to_string)
            .collect();
        assert_eq!(
            problems.len(),
            usize::from(reported),
            "{name}: {problems:?}"
        );
        // Intact records read back; the damaged frames' records are simply absent.
        let dropped: Vec<u64> = (0..total_frames).filter(|f| !kept.contains(f)).collect();
        for f in [kept[0], kept[kept.len() / 2], *kept.last().unwrap()]
            .into_iter()
            .map(|f| (f, true))
            .chain(dropped.first().map(|&f| (f, false)))
        {
            let (frame, present) = f;
            let r = all[(frame * FRAME_RECORDS + 4) as usize];
            assert_eq!(r.key.title_id, title);
            let a = p.http(
                "GET",
                &format!("/api/v1/stream?movie_id={MOVIE}"),
                Some(
                    &playhead::ingest::auth::mint_hs256(
                        playhead::ingest::auth::DEV_SECRET,
                        r.key.account_id,
                        1,
                        600,
                    )
                    .unwrap(),
                ),
                None,
            );
            let got = a.json()["resume_position_seconds"].as_u64().unwrap();
            let want = if present {
                u64::from(r.value.position_seconds)
            } else {
                0
            };
            assert_eq!(got, want, "{name}: frame {frame} (present: {present})");
        }
        p.kill9();
        println!(
            "RESULT torn_log: {name}: replayed {} of {total_frames} frames; problems reported: {}",
            kept.len(),
            problems.len()
        );
    }
}

/// Many more damages, in-process through `Wal::open`: random truncations and random bit
/// flips never panic and replay exactly the frames left intact.
#[test]
fn random_log_damage_replays_exactly_the_intact_frames() {
    let pristine = tempfile::tempdir().unwrap();
    let all = write_log(pristine.path(), 200);
    let files = segment_files(pristine.path());
    let mut rng = rand::rng();
    let cases = 150;
    for case in 0..cases {
        let dir = tempfile::tempdir().unwrap();
        for f in &files {
            std::fs::copy(f, dir.path().join(f.file_name().unwrap())).unwrap();
        }
        let file = rng.random_range(0..files.len());
        let path = dir.path().join(files[file].file_name().unwrap());
        let mut bytes = std::fs::read(&path).unwrap();
        let frames_before: u64 = files[..file]
            .iter()
            .map(|f| (std::fs::metadata(f).unwrap().len() - FILE_HEADER) / FRAME_BYTES)
            .sum();
        let frames_here = (bytes.len() as u64 - FILE_HEADER) / FRAME_BYTES;
        let mut expected: Vec<u64> = (0..all.len() as u64 / FRAME_RECORDS).collect();
        if case % 2 == 0 || file + 1 == files.len() && case % 3 == 0 {
            // Truncate this file (a torn tail is only possible in the last one, but replay
            // must cope anywhere).
            let cut = rng.random_range(FILE_HEADER..bytes.len() as u64);
            bytes.truncate(cut as usize);
            let intact = (cut - FILE_HEADER) / FRAME_BYTES;
            expected.retain(|&f| f < frames_before + intact || f >= frames_before + frames_here);
        } else {
            let offset = rng.random_range(FILE_HEADER..bytes.len() as u64);
            bytes[offset as usize] ^= 1 << rng.random_range(0..8);
            let frame = frames_before + (offset - FILE_HEADER) / FRAME_BYTES;
            expected.retain(|&f| f != frame);
        }
        std::fs::write(&path, &bytes).unwrap();
        let mut seen = Vec::new();
        let opts = playhead::engine::wal::WalOptions {
            dir: dir.path().to_path_buf(),
            sync_mode: playhead::config::SyncMode::Periodic,
            sync_interval_ms: 10,
            segment_bytes: 65_536,
            max_buffer_bytes: 1 << 20,
        };
        let (wal, report) =
            playhead::engine::wal::Wal::open(opts, |r| seen.extend_from_slice(r)).unwrap();
        wal.close();
        let want: Vec<_> = expected
            .iter()
            .flat_map(|&f| {
                all[(f * FRAME_RECORDS) as usize..((f + 1) * FRAME_RECORDS) as usize]
                    .iter()
                    .copied()
            })
            .collect();
        assert_eq!(seen.len(), want.len(), "case {case}: {:?}", report.problems);
        assert_eq!(seen, want, "case {case}");
    }
    println!("RESULT random_log_damage: {cases} damaged logs replayed exactly");
}

/// Samples of the server's state during an outage.
#[derive(Debug, Default)]
struct HighWater {
    rss_kib: u64,
    wal_segment_bytes: f64,
    wal_snapshot_bytes: f64,
    dirty_keys: f64,
    flushing_keys: f64,
}

/// The store fails for a long stretch under a steady load: ingest keeps acknowledging,
/// memory stays bounded by the live keys, the log by snapshots, reads answer memory's newest
/// value; once the store is back every dirty key reaches it.
#[test]
fn store_outage_under_load_keeps_acknowledging_and_catches_up() {
    const OUTAGE: Duration = Duration::from_secs(12);
    const SNAPSHOT_AFTER: u64 = 512 * 1024;
    const SEGMENT: u64 = 65_536;
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let fault_file = dir.path().join("store-down");
    std::fs::write(&fault_file, b"down").unwrap();
    let overrides = [
        o("WAL__SYNC_MODE", "periodic"),
        o("WAL__SEGMENT_BYTES", SEGMENT),
        o("WAL__SNAPSHOT_AFTER_BYTES", SNAPSHOT_AFTER),
        o("FLUSH__INTERVAL_MS", 200),
        // Keys go idle (and are written) soon after the load stops, so catching up
        // measures the store's return, not the idle bound.
        o("FLUSH__IDLE_MS", 200),
        o("FLUSH__RETRY_MAX_MS", 300),
        o("FAULTS__STORE_WRITE_FAULT_FILE", fault_file.display()),
    ];
    let mut p = Process::start(dir.path(), &overrides);
    p.wait_for_line(
        "store write fault injection changed",
        Duration::from_secs(5),
    );
    // A stated load: 2 connections × 500 records every 25 ms = 40 000 heartbeats/s over
    // 20 000 live keys (1.6 MB/s of log).
    let mut w = Workload::new(2, 10_000, 500, 6_000_000);
    w.pace = Some(Duration::from_millis(25));
    w.in_flight = 4;
    let live_keys = (w.conns as u64 * w.keys_per_conn) as f64;
    let w = Arc::new(w);
    let acks = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let driver = rt.spawn(drive(
        Arc::clone(&w),
        p.binary,
        w.fresh_states(),
        Arc::clone(&acks),
        stop_rx,
    ));
    let started = Instant::now();
    let mut hw = HighWater::default();
    let mut samples = 0;
    while started.elapsed() < OUTAGE {
        std::thread::sleep(Duration::from_millis(250));
        let m = p.metrics();
        samples += 1;
        hw.rss_kib = hw.rss_kib.max(p.rss_kib());
        hw.wal_segment_bytes = hw
            .wal_segment_bytes
            .max(metric(&m, "playhead_wal_segment_bytes"));
        hw.wal_snapshot_bytes = hw
            .wal_snapshot_bytes
            .max(metric(&m, "playhead_wal_snapshot_bytes"));
        hw.dirty_keys = hw
            .dirty_keys
            .max(metric(&m, "playhead_coalescer_keys{state=\"dirty\"}"));
        hw.flushing_keys = hw
            .flushing_keys
            .max(metric(&m, "playhead_coalescer_keys{state=\"flushing\"}"));
    }
    // Reads during the outage answer memory's newest value.
    let _ = stop_tx.send(true);
    let states = rt.block_on(driver).unwrap();
    let m = p.metrics();
    let acked: u64 = states.iter().map(|s| s.acked_records).sum();
    let busy: u64 = states.iter().map(|s| s.busy).sum();
    for k in [0, 4_999, 9_999] {
        let a = p.http(
            "GET",
            &format!("/api/v1/stream?movie_id={MOVIE}"),
            Some(&token(w.account(1, k))),
            None,
        );
        let v = a.json();
        assert_eq!(v["source"], "memory", "{v}");
        assert_eq!(
            v["updated_at_ms"].as_u64().unwrap(),
            states[1].acked[k as usize],
            "{v}"
        );
    }
    assert_eq!(
        busy, 0,
        "ingest must keep acknowledging during a store outage"
    );
    assert!(
        acked as f64 >= 0.5 * 40_000.0 * OUTAGE.as_secs_f64(),
        "only {acked} acknowledged"
    );
    let flush_errors = metric(&m, "playhead_flush_errors_total");
    assert!(flush_errors > 0.0, "the outage shows in /metrics");
    assert_eq!(metric(&m, "playhead_flush_rows_total"), 0.0);
    assert!(metric(&m, "playhead_wal_snapshots_total") >= 1.0);
    assert!(
        hw.dirty_keys <= live_keys && hw.flushing_keys <= live_keys,
        "{hw:?}"
    );
    // The log guard looks every 500 ms: the log may outgrow its limit by what arrives in
    // that time (plus the open segment) before the snapshot replaces it.
    // The guard snapshots only once the log is four times the snapshot (40 bytes per dirty
    // key): the bound is the larger of the configured limit and that.
    let snapshot_at = (SNAPSHOT_AFTER as f64).max(4.0 * 40.0 * live_keys);
    let log_bound = snapshot_at + (2 * SEGMENT) as f64 + 1.6e6 * 0.6;
    assert!(hw.wal_segment_bytes <= log_bound, "{hw:?} > {log_bound}");
    assert!(
        hw.wal_snapshot_bytes <= live_keys * 2.0 * 40.0 + 4096.0,
        "{hw:?}"
    );
    assert!(hw.rss_kib < 256 * 1024, "{hw:?}");

    // Recovery: every dirty key reaches the store.
    std::fs::remove_file(&fault_file).unwrap();
    let recovered = Instant::now();
    loop {
        let m = p.metrics();
        let in_memory = metric(&m, "playhead_coalescer_keys{state=\"dirty\"}")
            + metric(&m, "playhead_coalescer_keys{state=\"flushing\"}");
        if in_memory == 0.0 && metric(&m, "playhead_flush_rows_total") >= live_keys {
            break;
        }
        assert!(
            recovered.elapsed() < Duration::from_secs(15),
            "not caught up: {in_memory} keys in memory"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let catch_up = recovered.elapsed();
    for k in [1, 5_000, 9_998] {
        let a = p.http(
            "GET",
            &format!("/api/v1/stream?movie_id={MOVIE}"),
            Some(&token(w.account(0, k))),
            None,
        );
        let v = a.json();
        assert_eq!(v["source"], "store", "{v}");
        assert_eq!(
            v["updated_at_ms"].as_u64().unwrap(),
            states[0].acked[k as usize],
            "{v}"
        );
    }
    p.stop_clean();
    let stored = stored_versions(dir.path(), &w);
    let (checked, lost) = acked_losses(&states, &stored);
    assert_eq!(lost, 0);
    println!(
        "RESULT store_outage: outage_s={} load=40000_heartbeats_per_s live_keys={live_keys} acked={acked} busy=0 flush_errors={flush_errors} samples={samples} rss_high_water_mib={:.1} wal_segment_bytes_high_water={} (limit {SNAPSHOT_AFTER}) snapshot_bytes_high_water={} coalescer_keys_high_water=dirty:{}/flushing:{} catch_up_ms={} checked={checked} lost=0",
        OUTAGE.as_secs(),
        hw.rss_kib as f64 / 1024.0,
        hw.wal_segment_bytes,
        hw.wal_snapshot_bytes,
        hw.dirty_keys,
        hw.flushing_keys,
        catch_up.as_millis()
    );
}

/// Makes a directory refuse new entries: `chattr +i` as root (where permissions do not
/// stop writes), `chmod 500` otherwise. `None` with the reason when neither works here.
fn freeze_dir(dir: &Path) -> Result<(), String> {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if root {
        let out = std::process::Command::new("chattr")
            .arg("+i")
            .arg(dir)
            .output()
            .map_err(|e| format!("running as root and chattr is unavailable: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "running as root and `chattr +i` failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    } else {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o500))
            .map_err(|e| e.to_string())?;
    }
    // Prove it: creating a file must fail now.
    match std::fs::File::create(dir.join("probe")) {
        Ok(_) => {
            let _ = std::fs::remove_file(dir.join("probe"));
            thaw_dir(dir);
            Err("the directory still accepts new files".into())
        }
        Err(_) => Ok(()),
    }
}

fn thaw_dir(dir: &Path) {
    let _ = std::process::Command::new("chattr")
        .arg("-i")
        .arg(dir)
        .output();
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
}

/// The commit log's directory stops taking new files (read-only): once the open segment is
/// sealed, writes get BUSY / 503 and are not acknowledged; when the directory is writable
/// again the server recovers by itself, and nothing acknowledged is lost.
#[test]
fn unwritable_log_refuses_writes_then_recovers_by_itself() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let overrides = [
        o("WAL__SYNC_MODE", "group"),
        o("WAL__SEGMENT_BYTES", 65_536),
        o("FLUSH__INTERVAL_MS", 100),
    ];
    let mut p = Process::start(dir.path(), &overrides);
    let wal = dir.path().join("wal");
    if let Err(why) = freeze_dir(&wal) {
        println!(
            "RESULT disk_trouble: SKIPPED: cannot make the log directory unwritable here: {why}"
        );
        return;
    }
    thaw_dir(&wal);
    let mut w = Workload::new(1, 2_000, 200, 7_000_000);
    w.pace = Some(Duration::from_millis(5));
    w.in_flight = 4;
    let w = Arc::new(w);
    let acks = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let driver = rt.spawn(drive(
        Arc::clone(&w),
        p.binary,
        w.fresh_states(),
        Arc::clone(&acks),
        stop_rx,
    ));
    std::thread::sleep(Duration::from_millis(500));
    assert!(acks.load(Ordering::SeqCst) > 0);

    freeze_dir(&wal).unwrap();
    let frozen_at = Instant::now();
    // Wait for the server to notice (the next segment cannot be created).
    let post = |p: &Process, pos: u32| {
        let body = format!(r#"{{"movie_id":"{MOVIE}","position_seconds":{pos}}}"#);
        p.http(
            "POST",
            "/api/v1/stream/progress",
            Some(&token(42)),
            Some(&body),
        )
    };
    let refused = loop {
        let a = post(&p, 1);
        if a.status == 503 {
            break a;
        }
        assert!(
            frozen_at.elapsed() < Duration::from_secs(10),
            "writes still accepted with the log unwritable"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let noticed = frozen_at.elapsed();
    assert_eq!(
        refused.header("retry-after").as_deref(),
        Some("1"),
        "{}",
        refused.head
    );
    assert!(refused.body.contains("overloaded"), "{}", refused.body);
    let ready = p.http("GET", "/readyz", None, None);
    assert_eq!(ready.status, 503, "{}", ready.body);
    let refused_at = Instant::now();
    // While it lasts, nothing new is acknowledged (checked below, once the driver's record
    // of sends and acks is back): writes keep getting 503.
    std::thread::sleep(Duration::from_millis(1_000));
    assert_eq!(post(&p, 2).status, 503);
    let m = p.metrics();
    assert!(metric(&m, "playhead_wal_write_errors_total") > 0.0);

    thaw_dir(&wal);
    let thawed_at = Instant::now();
    loop {
        if post(&p, 3).status == 204 {
            break;
        }
        assert!(
            thawed_at.elapsed() < Duration::from_secs(10),
            "did not recover by itself"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let recovered_in = thawed_at.elapsed();
    let acks_thawed = acks.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        acks.load(Ordering::SeqCst) > acks_thawed,
        "binary ingest resumed"
    );
    assert_eq!(p.http("GET", "/readyz", None, None).status, 200);
    let _ = stop_tx.send(true);
    let states = rt.block_on(driver).unwrap();
    let busy: u64 = states.iter().map(|s| s.busy).sum();
    // No batch sent once the failure showed (appends refused from then on) was
    // acknowledged before the directory was writable again.
    let st = &states[0];
    let sent_after_refusal: std::collections::HashSet<u64> = st
        .sent_times
        .iter()
        .filter(|(_, at)| *at > refused_at)
        .map(|(j, _)| *j)
        .collect();
    let acked_while_unwritable = st
        .ack_times
        .iter()
        .filter(|(j, at)| sent_after_refusal.contains(j) && *at < thawed_at)
        .count();
    assert_eq!(
        acked_while_unwritable, 0,
        "acknowledged while the log could not be written"
    );
    let refused_batches = sent_after_refusal
        .iter()
        .filter(|j| {
            !st.ack_times
                .iter()
                .any(|(a, at)| a == *j && *at < thawed_at)
        })
        .count();
    p.stop_clean();
    let (checked, lost) = acked_losses(&states, &stored_versions(dir.path(), &w));
    assert_eq!(lost, 0);
    println!(
        "RESULT disk_trouble: refused_after_ms={} busy_batches={busy} batches_sent_while_unwritable={refused_batches} acked_while_unwritable=0 recovered_after_ms={} checked={checked} lost=0",
        noticed.as_millis(),
        recovered_in.as_millis()
    );
}

/// A tmpfs of a fixed size mounted on `at` (created if missing), unmounted on drop: a real
/// small filesystem to fill up. Mounting needs root; `Err` says why it cannot be done here.
struct SmallFs {
    at: PathBuf,
}

impl SmallFs {
    fn mount(at: &Path, size_mib: u64) -> Result<Self, String> {
        std::fs::create_dir_all(at).map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size_mib}m,mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "`mount -t tmpfs` failed (needs root): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Self {
            at: at.to_path_buf(),
        })
    }

    /// Writes `name` until the filesystem is full; returns its path.
    fn fill(&self, name: &str) -> PathBuf {
        use std::io::Write;
        let path = self.at.join(name);
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0xA5u8; 64 << 10];
        while file.write_all(&chunk).is_ok() {}
        while file.write_all(&chunk[..4096]).is_ok() {}
        path
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.at)
            .output();
    }
}

/// Polls `/readyz` until `done` accepts its JSON body, for at most `limit`.
fn wait_for_readyz(
    p: &Process,
    limit: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let a = p.http("GET", "/readyz", None, None);
        let body = a.json();
        if done(&body) {
            return body;
        }
        assert!(
            started.elapsed() < limit,
            "/readyz never changed as expected within {limit:?}; last: {} {body}\n{}",
            a.status,
            p.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The embedded store on a real 64 MiB filesystem (tmpfs) that fills up while heartbeats
/// flow (the commit log is on another filesystem and keeps acknowledging): fjall poisons its
/// database, `/readyz` reports the store failing and `playhead_store_healthy` is 0; once
/// space is freed the store reopens itself, flush cycles complete again, `/readyz` is ready,
/// SIGTERM leaves nothing in the log, and every acknowledged newest value is in the store.
#[test]
fn a_full_store_disk_recovers_without_a_restart() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let fs = match SmallFs::mount(&dir.path().join("store"), 64) {
        Ok(fs) => fs,
        Err(why) => {
            println!(
                "RESULT store_disk_full: SKIPPED: cannot mount a small filesystem here: {why}"
            );
            return;
        }
    };
    let overrides = [
        o("WAL__SYNC_MODE", "group"),
        o("FLUSH__INTERVAL_MS", 100),
        o("FLUSH__RETRY_MAX_MS", 400),
    ];
    let mut p = Process::start(dir.path(), &overrides);
    let mut w = Workload::new(2, 2_000, 200, 9_000_000);
    w.pace = Some(Duration::from_millis(5));
    w.in_flight = 4;
    let w = Arc::new(w);
    let acks = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let driver = rt.spawn(drive(
        Arc::clone(&w),
        p.binary,
        w.fresh_states(),
        Arc::clone(&acks),
        stop_rx,
    ));
    std::thread::sleep(Duration::from_millis(500));
    assert!(acks.load(Ordering::SeqCst) > 0);
    assert_eq!(
        p.http("GET", "/readyz", None, None).json()["status"],
        "ready"
    );

    let filled_at = Instant::now();
    let filler = fs.fill("filler.bin");
    let failing = wait_for_readyz(&p, Duration::from_secs(20), |b| {
        b["store"]
            .as_str()
            .is_some_and(|s| s.starts_with("failing"))
    });
    let noticed = filled_at.elapsed();
    assert_eq!(failing["status"], "degraded", "{failing}");
    let m = p.metrics();
    assert_eq!(metric(&m, "playhead_store_healthy"), 0.0, "{m}");
    assert!(metric(&m, "playhead_store_consecutive_failures") >= 3.0);
    // While it lasts, heartbeats are still acknowledged (into the log) and flushes stall.
    let cycles_full = metric(&m, "playhead_flush_cycles_total");
    let acks_full = acks.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(1_000));
    assert!(acks.load(Ordering::SeqCst) > acks_full, "ingest stopped");
    let m = p.metrics();
    assert_eq!(
        metric(&m, "playhead_flush_cycles_total"),
        cycles_full,
        "a flush completed on a full disk"
    );

    std::fs::remove_file(&filler).unwrap();
    let freed_at = Instant::now();
    let ready = wait_for_readyz(&p, Duration::from_secs(20), |b| b["status"] == "ready");
    let recovered = freed_at.elapsed();
    assert_eq!(ready["store"], "reachable");
    // Flush cycles complete again. `/readyz` turns ready once the store answers; the next
    // cycle may still be running on a loaded machine (seen once in a full `cargo test`),
    // so wait for it, within a bound.
    let mut m = p.metrics();
    while metric(&m, "playhead_flush_cycles_total") <= cycles_full {
        assert!(
            freed_at.elapsed() < Duration::from_secs(30),
            "no flush cycle completed within 30 s after space was freed"
        );
        std::thread::sleep(Duration::from_millis(50));
        m = p.metrics();
    }
    let cycles_back = metric(&m, "playhead_flush_cycles_total");
    assert_eq!(metric(&m, "playhead_store_healthy"), 1.0);
    let reopens = metric(&m, "playhead_embedded_reopens_total{outcome=\"ok\"}");
    assert!(reopens >= 1.0, "{m}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(metric(&p.metrics(), "playhead_flush_cycles_total") > cycles_back);

    let _ = stop_tx.send(true);
    let states = rt.block_on(driver).unwrap();
    let acked: u64 = states.iter().map(|s| s.acked_records).sum();
    // SIGTERM: the final flush lands everything (left_in_log=0), exit 0.
    p.stop_clean();
    let stored = stored_versions(dir.path(), &w);
    let (checked, lost) = acked_losses(&states, &stored);
    assert_eq!(lost, 0);
    // A restart on the same directories serves them, ready at once (a generous read
    // budget: this checks what is stored, not how fast a loaded machine reads it).
    let mut restart = overrides.to_vec();
    restart.push(o("STORE__READ_TIMEOUT_MS", 2_000));
    let p = Process::start(dir.path(), &restart);
    spot_check_over_http(&p, &w, &states, 50);
    assert_eq!(
        p.http("GET", "/readyz", None, None).json()["status"],
        "ready"
    );
    drop(p);
    println!(
        "RESULT store_disk_full: fs=tmpfs_64MiB noticed_after_ms={} recovered_after_ms={} reopens_ok={reopens} acked={acked} checked={checked} lost=0",
        noticed.as_millis(),
        recovered.as_millis()
    );
    drop(fs);
}

/// More load than the server may take (a coalescer capped at 2 000 keys and never flushed
/// during the test; a 64 KiB log buffer): new keys get BUSY / 503 + Retry-After, updates of
/// keys already held are still accepted quickly, memory stays bounded.
#[test]
fn overload_refuses_with_busy_and_503_and_stays_bounded() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let overrides = [
        o("COALESCER__SHARDS", 1),
        o("COALESCER__MAX_KEYS", 2_000),
        o("FLUSH__INTERVAL_MS", 3_600_000),
        o("WAL__MAX_BUFFER_BYTES", 65_536),
    ];
    let p = Process::start(dir.path(), &overrides);
    let rss_start = p.rss_kib();
    // Fill the coalescer with keys of 2 000 accounts (one HTTP token covers account 9_000_000).
    let mut fill = Workload::new(1, 2_000, 500, 9_000_000);
    fill.in_flight = 1;
    let fill = Arc::new(fill);
    let acks = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let filler = rt.spawn(drive(
        Arc::clone(&fill),
        p.binary,
        fill.fresh_states(),
        Arc::clone(&acks),
        stop_rx,
    ));
    while acks.load(Ordering::SeqCst) < 2_000 {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = stop_tx.send(true);
    let fill_states = rt.block_on(filler).unwrap();
    // Overload: 4 connections of new keys, pipelined, as fast as they go.
    let flood = Arc::new(Workload::new(4, 5_000, 1_000, 8_000_000));
    let acks = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let flooder = rt.spawn(drive(
        Arc::clone(&flood),
        p.binary,
        flood.fresh_states(),
        Arc::clone(&acks),
        stop_rx,
    ));
    // Meanwhile: HTTP heartbeats for a new key (refused) and for a held key (accepted).
    let held = fill.account(0, 7);
    let (mut latencies, mut refused, mut rss_max) = (Vec::new(), 0, 0);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        let body = format!(
            r#"{{"movie_id":"{MOVIE}","position_seconds":{}}}"#,
            latencies.len() % 7_000
        );
        let a = p.http(
            "POST",
            "/api/v1/stream/progress",
            Some(&token(8_999_999)),
            Some(&body),
        );
        assert_eq!(a.status, 503, "{}", a.body);
        assert_eq!(a.header("retry-after").as_deref(), Some("1"));
        refused += 1;
        let t = Instant::now();
        let a = p.http(
            "POST",
            "/api/v1/stream/progress",
            Some(&token(held)),
            Some(&body),
        );
        latencies.push(t.elapsed());
        assert_eq!(a.status, 204, "{}", a.body);
        rss_max = rss_max.max(p.rss_kib());
    }
    let _ = stop_tx.send(true);
    let flood_states = rt.block_on(flooder).unwrap();
    let busy: u64 = flood_states.iter().map(|s| s.busy).sum();
    let acked: u64 = flood_states.iter().map(|s| s.acked_records).sum();
    assert!(busy > 0, "the flood must be refused");
    assert_eq!(acked, 0, "no new key fits");
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100];
    assert!(
        p99 < Duration::from_millis(500),
        "accepted requests p99 {p99:?}"
    );
    assert!(rss_max < 256 * 1024, "RSS {rss_max} KiB");
    let m = p.metrics();
    let keys = metric(&m, "playhead_coalescer_keys{state=\"dirty\"}");
    assert!(keys <= 2_000.0);
    drop(fill_states);
    println!(
        "RESULT overload: busy_batches={busy} http_503={refused} accepted_http={} accepted_p50_ms={:.1} accepted_p99_ms={:.1} rss_start_mib={:.1} rss_max_mib={:.1} coalescer_keys={keys}",
        latencies.len(),
        latencies[latencies.len() / 2].as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        rss_start as f64 / 1024.0,
        rss_max as f64 / 1024.0
    );
}

/// A full log buffer (64 KiB, periodic mode) refuses batches with BUSY instead of queueing,
/// and memory stays bounded while 4 connections flood it.
#[test]
fn a_full_log_buffer_answers_busy_and_memory_stays_bounded() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let overrides = [
        o("WAL__MAX_BUFFER_BYTES", 65_536),
        o("WAL__SYNC_MODE", "periodic"),
    ];
    let p = Process::start(dir.path(), &overrides);
    // Batches of 1 600 records are 64 KB: two in the buffer at once do not fit.
    let mut flood = Workload::new(4, 1_600, 1_600, 10_000_000);
    flood.in_flight = 8;
    let flood = Arc::new(flood);
    let acks = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let flooder = rt.spawn(drive(
        Arc::clone(&flood),
        p.binary,
        flood.fresh_states(),
        Arc::clone(&acks),
        stop_rx,
    ));
    let mut rss_max = 0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        rss_max = rss_max.max(p.rss_kib());
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = stop_tx.send(true);
    let states = rt.block_on(flooder).unwrap();
    let busy: u64 = states.iter().map(|s| s.busy).sum();
    let acked: u64 = states.iter().map(|s| s.acked_records).sum();
    let m = p.metrics();
    let refused = metric(&m, "playhead_wal_refused_appends_total");
    assert!(
        refused > 0.0 && busy > 0,
        "busy {busy}, refused appends {refused}"
    );
    assert!(acked > 0, "some batches still get through");
    assert!(rss_max < 256 * 1024, "RSS {rss_max} KiB");
    println!(
        "RESULT log_buffer_overload: acked_records={acked} busy_batches={busy} refused_appends={refused} rss_max_mib={:.1}",
        rss_max as f64 / 1024.0
    );
}

/// SIGTERM with binary clients pipelining, HTTP clients posting, and one HTTP request
/// half-sent: that request still completes, every acknowledged write is flushed, the log is
/// left with nothing newer than the store, and the process exits 0 in bounded time.
#[test]
fn graceful_shutdown_finishes_in_flight_work_and_exits_zero() {
    use std::io::{Read, Write};
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let overrides = [o("WAL__SYNC_MODE", "group")];
    let mut p = Process::start(dir.path(), &overrides);
    let w = Arc::new(Workload::new(3, 2_000, 256, 11_000_000));
    let acks = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let driver = rt.spawn(drive(
        Arc::clone(&w),
        p.binary,
        w.fresh_states(),
        Arc::clone(&acks),
        stop_rx,
    ));
    // HTTP posters: each remembers its newest 204.
    let http = p.http;
    let posters: Vec<_> = (0..2u64)
        .map(|i| {
            std::thread::spawn(move || {
                let mut newest = 0;
                for n in 1..7_000u32 {
                    let body = format!(r#"{{"movie_id":"{MOVIE}","position_seconds":{n},"timestamp_ms":{}}}"#, now_ms() - 3_600_000 + u64::from(n));
                    let Ok(mut s) = std::net::TcpStream::connect(http) else { break };
                    let req = format!(
                        "POST /api/v1/stream/progress HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                        token(12_000_000 + i),
                        body.len()
                    );
                    if s.write_all(req.as_bytes()).is_err() {
                        break;
                    }
                    let mut raw = Vec::new();
                    let _ = s.read_to_end(&mut raw);
                    match parse_answer(&raw).status {
                        204 => newest = n,
                        _ => break,
                    }
                }
                newest
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(800));
    // A request whose body is still on its way when SIGTERM arrives.
    let body = format!(r#"{{"movie_id":"{MOVIE}","position_seconds":4321}}"#);
    let mut slow = std::net::TcpStream::connect(p.http).unwrap();
    write!(
        slow,
        "POST /api/v1/stream/progress HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
        token(12_500_000),
        body.len(),
        &body[..10]
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let term_at = Instant::now();
    std::process::Command::new("kill")
        .args(["-TERM", &p.pid().to_string()])
        .status()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    slow.write_all(&body.as_bytes()[10..]).unwrap();
    let mut raw = Vec::new();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = slow.read_to_end(&mut raw);
    let slow_status = parse_answer(&raw).status;
    let (status, _) = p.terminate(Duration::from_secs(30));
    let took = term_at.elapsed();
    assert_eq!(
        slow_status,
        204,
        "the in-flight request completes: {}",
        String::from_utf8_lossy(&raw)
    );
    assert!(status.success(), "exit {status}:\n{}", p.log());
    assert!(took < Duration::from_secs(15), "shutdown took {took:?}");
    let done = p.wait_for_line("shutdown complete", Duration::from_secs(1));
    assert!(done.contains("left_in_log=0"), "{done}");
    let _ = stop_tx.send(true);
    let states = rt.block_on(driver).unwrap();
    let newest_http: Vec<u32> = posters.into_iter().map(|t| t.join().unwrap()).collect();

    let (checked, lost) = acked_losses(&states, &stored_versions(dir.path(), &w));
    assert_eq!(lost, 0);
    let store = EmbeddedStore::open(&dir.path().join("store"), 8 << 20).unwrap();
    let rt1 = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let title = playhead::resume::catalog::title_id_of(MOVIE);
    for (i, newest) in newest_http.iter().enumerate() {
        let v = rt1
            .block_on(store.get(Key::new(12_000_000 + i as u64, 1, title)))
            .unwrap();
        assert!(
            v.is_some_and(|v| v.position_seconds >= *newest),
            "HTTP poster {i}: {v:?} < {newest}"
        );
    }
    let v = rt1
        .block_on(store.get(Key::new(12_500_000, 1, title)))
        .unwrap();
    assert_eq!(v.map(|v| v.position_seconds), Some(4321));
    // The log holds nothing the store lacks.
    let mut left = Vec::new();
    let (wal, _) = playhead::engine::wal::Wal::open(
        playhead::engine::wal::WalOptions {
            dir: dir.path().join("wal"),
            sync_mode: playhead::config::SyncMode::Group,
            sync_interval_ms: 10,
            segment_bytes: 64 << 20,
            max_buffer_bytes: 1 << 20,
        },
        |r| left.extend_from_slice(r),
    )
    .unwrap();
    wal.close();
    for r in &left {
        let stored = rt1.block_on(store.get(r.key)).unwrap().expect("flushed");
        assert!(
            !r.value.supersedes(&stored),
            "{r:?} newer than the store's {stored:?}"
        );
    }
    println!(
        "RESULT graceful_shutdown: exit=0 took_ms={} binary_acks_checked={checked} http_posters_newest={newest_http:?} in_flight_request=204 records_left_in_log={} (none newer than the store) lost=0",
        took.as_millis(),
        left.len()
    );
}

/// A tmpfs of `size_kib` mounted on a fresh temp dir (owner-only), unmounted on drop.
struct SmallTmpfs {
    dir: tempfile::TempDir,
}

impl SmallTmpfs {
    /// `Err` with the reason where mounting is not allowed (not root, no CAP_SYS_ADMIN).
    fn mount(size_kib: u64) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size_kib}k,mode=0700"))
            .arg("tmpfs")
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Self { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .output();
    }
}

/// Names in `dir` and how many of them are empty.
fn files_in(dir: &Path) -> (Vec<String>, usize) {
    let mut names = Vec::new();
    let mut empty = 0;
    for e in std::fs::read_dir(dir).unwrap().map(Result::unwrap) {
        if e.metadata().map(|m| m.len() == 0).unwrap_or(false) {
            empty += 1;
        }
        names.push(e.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    (names, empty)
}

/// The commit log on a real, small filesystem (a 1 MiB tmpfs; needs root, skipped with the
/// reason elsewhere) that fills up while appends run: appends are refused while it is full,
/// the writer retries every 200 ms without leaving a file per try, it recovers by itself once
/// space is freed, nothing accepted is lost, and the next start finds nothing to set aside.
#[test]
fn a_full_log_disk_leaves_no_file_per_retry_and_nothing_set_aside() {
    use playhead::engine::wal::{Wal, WalError, WalOptions};
    use playhead::model::{Record, Value};
    let fs = match SmallTmpfs::mount(1024) {
        Ok(fs) => fs,
        Err(why) => {
            println!("RESULT full_log_disk: SKIPPED: cannot mount a small tmpfs here: {why}");
            return;
        }
    };
    let wal_dir = fs.path().join("wal");
    let filler = fs.path().join("filler");
    std::fs::write(&filler, vec![7u8; 256 << 10]).unwrap();
    let opts = || WalOptions {
        dir: wal_dir.clone(),
        sync_mode: playhead::config::SyncMode::Periodic,
        sync_interval_ms: 10,
        segment_bytes: 65_536,
        max_buffer_bytes: 256 << 10,
    };
    let (wal, _) = Wal::open(opts(), |_| {}).unwrap();
    let title = playhead::resume::catalog::title_id_of(MOVIE);
    let ts = now_ms() - 60_000;
    let batch = |n: u64| -> Vec<Record> {
        (0..100)
            .map(|i| {
                let k = n * 100 + i;
                Record::new(
                    Key::new(8_000_000 + k, 1, title),
                    Value::new((k % 7_000) as u32, ts, 1),
                )
            })
            .collect()
    };
    let mut accepted = Vec::new();
    let mut n = 0;
    let append = |wal: &Wal, n: &mut u64, accepted: &mut Vec<Record>| {
        let records = batch(*n);
        *n += 1;
        match wal.append(&records) {
            Ok(_) => {
                accepted.extend(records);
                true
            }
            Err(WalError::BufferFull(_)) => {
                std::thread::sleep(Duration::from_millis(5));
                true
            }
            Err(WalError::Unavailable(_)) => false,
            Err(e) => panic!("{e}"),
        }
    };
    // Fill the disk: appends are refused once the writer fails.
    let started = Instant::now();
    while append(&wal, &mut n, &mut accepted) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the log never filled the 1 MiB disk"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let (at_failure, _) = files_in(&wal_dir);
    // Ten retries while the disk stays full.
    let spell = Instant::now();
    let mut most_files = at_failure.len();
    let mut empty_seen = 0;
    while spell.elapsed() < Duration::from_secs(2) {
        assert!(!append(&wal, &mut n, &mut accepted), "accepted while full");
        let (names, empty) = files_in(&wal_dir);
        most_files = most_files.max(names.len());
        empty_seen = empty_seen.max(empty);
        std::thread::sleep(Duration::from_millis(50));
    }
    let (after_spell, empty_after) = files_in(&wal_dir);
    assert!(
        after_spell.len() <= at_failure.len() + 1 && empty_after <= 1,
        "files piled up during the full spell: {} at the failure, {} after 2 s ({empty_after} empty): {after_spell:?}",
        at_failure.len(),
        after_spell.len()
    );
    let errors_during_spell = wal
        .stats()
        .write_errors
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(errors_during_spell >= 5, "the writer kept retrying");
    // Space comes back: the log recovers by itself.
    std::fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    while !append(&wal, &mut n, &mut accepted) {
        assert!(freed.elapsed() < Duration::from_secs(5), "did not recover");
        std::thread::sleep(Duration::from_millis(20));
    }
    let recovered_in = freed.elapsed();
    for _ in 0..10 {
        append(&wal, &mut n, &mut accepted);
    }
    wal.close();
    // The next start replays every accepted record and has nothing to set aside.
    let mut seen = std::collections::HashSet::new();
    let (wal, report) = Wal::open(opts(), |rs| seen.extend(rs.iter().map(|r| r.key))).unwrap();
    wal.close();
    let missing = accepted.iter().filter(|r| !seen.contains(&r.key)).count();
    assert_eq!(missing, 0, "accepted records not replayed");
    let (final_names, _) = files_in(&wal_dir);
    let aside: Vec<_> = final_names
        .iter()
        .filter(|n| n.ends_with(".corrupt"))
        .collect();
    assert!(
        aside.is_empty() && report.problems.iter().all(|p| !p.contains("header")),
        "set aside: {aside:?}; problems: {:?}",
        report.problems
    );
    println!(
        "RESULT full_log_disk: files at the failure {} / most during a 2 s full spell {most_files} (empty seen {empty_seen}); write errors {errors_during_spell}; recovered {} ms after space was freed; {} accepted records all replayed; files after restart {}, set aside 0; replay problems {:?}",
        at_failure.len(),
        recovered_in.as_millis(),
        accepted.len(),
        final_names.len(),
        report.problems
    );
}

/// The Cassandra node the fault test may kill: its address and the shell commands that stop
/// and start it. Asked for with `--ignored` but without them, the test fails naming them.
struct CassandraNode {
    addr: String,
    stop: String,
    start: String,
    keyspace: String,
    datacenter: String,
}

impl CassandraNode {
    fn from_env() -> Self {
        let need = |name: &str| {
            std::env::var(name)
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| {
                    panic!(
                        "the Cassandra fault test needs PLAYHEAD_TEST_CASSANDRA=host:port and the \
                         shell commands PLAYHEAD_TEST_CASSANDRA_STOP / PLAYHEAD_TEST_CASSANDRA_START \
                         that kill and restart that node; {name} is not set (docs/cassandra.md)"
                    )
                })
        };
        let env_or = |name: &str, default: &str| std::env::var(name).unwrap_or(default.into());
        Self {
            addr: need("PLAYHEAD_TEST_CASSANDRA"),
            stop: need("PLAYHEAD_TEST_CASSANDRA_STOP"),
            start: need("PLAYHEAD_TEST_CASSANDRA_START"),
            keyspace: env_or("PLAYHEAD_TEST_CASSANDRA_KEYSPACE", "playhead_test"),
            datacenter: env_or("PLAYHEAD_TEST_CASSANDRA_DC", "datacenter1"),
        }
    }

    fn sh(command: &str) -> std::process::Child {
        std::process::Command::new("sh")
            .args(["-c", command])
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run `{command}`: {e}"))
    }

    /// True when the CQL port accepts a connection.
    fn answers(&self) -> bool {
        use std::net::ToSocketAddrs;
        self.addr.to_socket_addrs().is_ok_and(|mut a| {
            a.any(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_millis(200)).is_ok())
        })
    }

    /// The server's store settings for this node (keyspace created if missing, SimpleStrategy 1).
    fn overrides(&self) -> Vec<(&'static str, String)> {
        vec![
            o("STORE__KIND", "cassandra"),
            o(
                "STORE__CASSANDRA__CONTACT_POINTS",
                format!("[\"{}\"]", self.addr),
            ),
            o("STORE__CASSANDRA__KEYSPACE", &self.keyspace),
            o("STORE__CASSANDRA__LOCAL_DATACENTER", &self.datacenter),
            o("STORE__CASSANDRA__REPLICATION", "SimpleStrategy"),
            o("STORE__CASSANDRA__REPLICATION_FACTOR", 1),
            o("STORE__CASSANDRA__CREATE_SCHEMA", true),
        ]
    }

    /// The store, as a second client of the same keyspace, to check what reached the node.
    async fn store(&self) -> playhead::store::CassandraStore {
        use playhead::config::{Config, ReplicationStrategy, StoreKind};
        let mut config = Config::default();
        config.store.kind = StoreKind::Cassandra;
        let c = &mut config.store.cassandra;
        c.contact_points = vec![self.addr.clone()];
        c.keyspace = self.keyspace.clone();
        c.local_datacenter = self.datacenter.clone();
        c.replication = ReplicationStrategy::SimpleStrategy;
        c.replication_factor = 1;
        c.request_timeout_ms = 20_000;
        config.validate().unwrap();
        playhead::store::CassandraStore::connect(&config)
            .await
            .unwrap_or_else(|e| panic!("connecting to {} after the restart: {e}", self.addr))
    }
}

/// Issue 17 item 5, end to end: the Cassandra node is killed (`PLAYHEAD_TEST_CASSANDRA_STOP`,
/// e.g. `kill -9`) under a heartbeat load spanning 1 000 profiles, so every flush batch
/// holds many partitions; ingest keeps acknowledging from the commit log; the node is
/// restarted (`PLAYHEAD_TEST_CASSANDRA_START`). The outage must open the write breaker (or its
/// recovery is not tested). Once the node's CQL port answers, rows must reach it again while
/// the load still runs, and the whole backlog must land, within 30 s; the breaker must never
/// have opened without a failed write (the old one re-opened whenever a batch dropped its
/// half-open probe, and stayed open against the healthy node). Then reads come from the
/// store, SIGTERM leaves nothing in the log, and every acknowledged newest value is in
/// Cassandra. Takes about a minute, most of it the node's restart.
#[test]
#[ignore = "kills and restarts a Cassandra node: needs PLAYHEAD_TEST_CASSANDRA, \
            PLAYHEAD_TEST_CASSANDRA_STOP and PLAYHEAD_TEST_CASSANDRA_START (docs/cassandra.md)"]
fn cassandra_node_killed_under_load_gets_the_backlog_once_back() {
    const OUTAGE: Duration = Duration::from_secs(10);
    const BACKLOG_LANDS_WITHIN: Duration = Duration::from_secs(30);
    const LOAD_AFTER_ROWS: Duration = Duration::from_secs(2);
    let node = CassandraNode::from_env();
    assert!(node.answers(), "no Cassandra answers at {}", node.addr);
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let mut overrides = node.overrides();
    overrides.extend([
        // Every dirty key in every cycle: the flusher always has the whole live set to write.
        o("FLUSH__CHECKPOINT_MS", 0),
        // Keys go idle (written, then forgotten) soon after the load stops, so the drain
        // measures the node's return; reads of forgotten keys go to Cassandra.
        o("FLUSH__IDLE_MS", 1_000),
        // The checks below read through the engine: a slow loaded node must not degrade them.
        o("STORE__READ_TIMEOUT_MS", 2_000),
        // A failed flush fails about one request (the rest of its batch does not start), so
        // the write breaker (20 consecutive failures, the default) opens only after 20
        // retries: at most 1 s apart, the outage reaches them in well under a minute.
        o("FLUSH__RETRY_MAX_MS", 1_000),
    ]);
    let mut p = Process::start(dir.path(), &overrides);
    // 4 connections × 50 records every 50 ms = 4 000 heartbeats/s over 1 000 keys, one
    // profile (partition) each. The breaker has its default settings.
    let mut w = Workload::new(4, 250, 50, rand::random::<u64>() >> 2);
    w.pace = Some(Duration::from_millis(50));
    w.in_flight = 4;
    let live_keys = (w.conns as u64 * w.keys_per_conn) as f64;
    let w = Arc::new(w);
    let acks = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let driver = rt.spawn(drive(
        Arc::clone(&w),
        p.binary,
        w.fresh_states(),
        Arc::clone(&acks),
        stop_rx,
    ));
    let rows = |p: &Process| metric(&p.metrics(), "playhead_cassandra_rows_written_total");
    let warm = Instant::now();
    while rows(&p) < live_keys {
        assert!(
            warm.elapsed() < Duration::from_secs(30),
            "the node took under 1 000 rows in 30 s before any fault:\n{}",
            p.metrics()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The outage.
    let status = CassandraNode::sh(&node.stop).wait().unwrap();
    assert!(status.success(), "`{}` failed: {status}", node.stop);
    let killed = Instant::now();
    let acks_at_kill = acks.load(Ordering::SeqCst);
    std::thread::sleep(OUTAGE);
    let acked_in_outage = acks.load(Ordering::SeqCst) - acks_at_kill;
    let m = p.metrics();
    assert!(
        metric(&m, "playhead_flush_errors_total") > 0.0,
        "the outage shows in /metrics"
    );
    let rows_before_return = metric(&m, "playhead_cassandra_rows_written_total");
    let write_errors = |m: &str| metric(m, "playhead_cassandra_errors_total{op=\"write\"}");
    let mut start = CassandraNode::sh(&node.start);
    while !node.answers() {
        assert!(
            killed.elapsed() < Duration::from_secs(300),
            "the node does not answer 300 s after the kill"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let answered = Instant::now();
    let down_for = answered - killed;
    let acked_while_down = acks.load(Ordering::SeqCst) - acks_at_kill;
    let m = p.metrics();
    let opened_at_return = metric(
        &m,
        "playhead_cassandra_breaker_opened_total{breaker=\"write\"}",
    );
    let write_errors_at_return = write_errors(&m);
    assert!(
        opened_at_return >= 1.0,
        "the write breaker never opened in the {down_for:?} outage, so its recovery is not tested"
    );

    // The return: rows must flow again while the load still runs, then the backlog drains.
    let unlanded = |m: &str| {
        format!(
            "{} keys still in memory, rows written since the return: {}, write breaker opened \
             {} times (at the return: {opened_at_return})",
            metric(m, "playhead_coalescer_keys{state=\"dirty\"}")
                + metric(m, "playhead_coalescer_keys{state=\"flushing\"}"),
            metric(m, "playhead_cassandra_rows_written_total") - rows_before_return,
            metric(
                m,
                "playhead_cassandra_breaker_opened_total{breaker=\"write\"}"
            ),
        )
    };
    loop {
        let m = p.metrics();
        if metric(&m, "playhead_cassandra_rows_written_total") > rows_before_return {
            break;
        }
        assert!(
            answered.elapsed() < BACKLOG_LANDS_WITHIN,
            "no row written under load in the {BACKLOG_LANDS_WITHIN:?} after the node answered \
             again: {}",
            unlanded(&m)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let first_rows = answered.elapsed();
    let failed_after_return = write_errors(&p.metrics()) - write_errors_at_return;
    std::thread::sleep(LOAD_AFTER_ROWS);
    let _ = stop_tx.send(true);
    loop {
        let m = p.metrics();
        let in_memory = metric(&m, "playhead_coalescer_keys{state=\"dirty\"}")
            + metric(&m, "playhead_coalescer_keys{state=\"flushing\"}");
        if in_memory == 0.0 {
            break;
        }
        assert!(
            answered.elapsed() < BACKLOG_LANDS_WITHIN,
            "the backlog has not landed {BACKLOG_LANDS_WITHIN:?} after the node answered again: \
             {}",
            unlanded(&m)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let landed = answered.elapsed();
    // Every opening is a failure's doing: the failed probe, or the threshold of consecutive
    // failed writes, each counted in the errors. The old breaker also re-opened when a batch
    // dropped its probe, which no error counter saw.
    let m = p.metrics();
    let (opened, failed) = (
        metric(
            &m,
            "playhead_cassandra_breaker_opened_total{breaker=\"write\"}",
        ),
        write_errors(&m),
    );
    assert!(
        opened <= failed,
        "the write breaker opened {opened} times on {failed} failed writes: some opening was \
         no failure's doing"
    );
    let states = rt.block_on(driver).unwrap();
    let busy: u64 = states.iter().map(|s| s.busy).sum();
    assert_eq!(busy, 0, "ingest must keep acknowledging through the outage");
    assert!(
        acked_in_outage as f64 >= 0.5 * 4_000.0 * OUTAGE.as_secs_f64(),
        "only {acked_in_outage} acknowledged in the {OUTAGE:?} after the kill"
    );
    // Every key was written and forgotten: reads come from Cassandra, not degraded.
    let mut rng = rand::rng();
    for _ in 0..20 {
        let (c, k) = (
            rng.random_range(0..w.conns),
            rng.random_range(0..w.keys_per_conn),
        );
        let a = p.http(
            "GET",
            &format!("/api/v1/stream?movie_id={MOVIE}"),
            Some(&token(w.account(c, k))),
            None,
        );
        let v = a.json();
        assert_eq!(v["source"], "store", "key {c}/{k}: {v}");
        assert_eq!(
            v["updated_at_ms"].as_u64().unwrap(),
            states[c].acked[k as usize],
            "key {c}/{k}: {v}"
        );
    }
    let m = p.metrics();
    p.stop_clean();
    let start_status = start.wait().unwrap();
    assert!(
        start_status.success(),
        "`{}` failed: {start_status}",
        node.start
    );

    // What Cassandra holds, read by a second client.
    let store = rt.block_on(node.store());
    let stored = stored_versions_in(&rt, &store, &w);
    let (checked, lost) = acked_losses(&states, &stored);
    assert_eq!(checked, live_keys as u64);
    assert_eq!(lost, 0, "acknowledged newest values missing from Cassandra");
    let acked: u64 = states.iter().map(|s| s.acked_records).sum();
    println!(
        "RESULT cassandra_node_outage: load=4000_heartbeats_per_s profiles={live_keys} acked={acked} busy=0 \
         down_s={:.1} acked_in_first_{}s_of_outage={acked_in_outage} acked_while_down={acked_while_down} \
         first_rows_after_answer_ms={} (failed writes before them: {failed_after_return}) \
         backlog_landed_after_answer_ms={} (bound {}) \
         write_breaker_opened={opened} failed_writes={failed} read_breaker_opened={} flush_errors={} \
         checked={checked} lost=0",
        down_for.as_secs_f64(),
        OUTAGE.as_secs(),
        first_rows.as_millis(),
        landed.as_millis(),
        BACKLOG_LANDS_WITHIN.as_millis(),
        metric(
            &m,
            "playhead_cassandra_breaker_opened_total{breaker=\"read\"}"
        ),
        metric(&m, "playhead_flush_errors_total"),
    );
}
