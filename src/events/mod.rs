//! The change stream: every row a flush cycle writes becomes one [`Event`] on a message
//! system (NATS JetStream, [`nats`]), for analytics and the ranking of "continue watching"
//! (docs/events.md).
//!
//! Publishing every heartbeat would be 7.5 M messages/s at the real peak; the coalescer
//! already holds the deduplicated truth, so the stream carries what the flush writes: at
//! the default cadence about one event per 75 heartbeats of a viewer who keeps playing,
//! plus one when they stop (100 k to 500 k events/s at 30 M viewers).
//!
//! Delivery is at least once, tied to the flush: a cycle publishes its rows after the
//! store synced them and before it marks them stored, which is what lets the commit log
//! drop their segments ([`crate::engine::flusher`]). A crash before every event was
//! acknowledged leaves the rows dirty in the log; the next start replays them and the next
//! flush writes and publishes them again. A duplicate carries the same version
//! (`updated_at_ms`, `device_id`, `position_seconds`) and the same message id, so a
//! last-write-wins consumer is unaffected, and JetStream drops it within its duplicate
//! window.
//!
//! Back-pressure never reaches ingest or reads: a cycle publishes in rounds of at most
//! `events.max_in_flight` events, and a round the stream does not acknowledge within
//! `events.ack_timeout_ms` is published again after a backoff, for as long as it takes
//! (until shutdown; the final flush gives up at its deadline). Meanwhile the cycle's keys
//! stay dirty: heartbeats keep coalescing in memory, the log guard keeps the log bounded
//! with snapshots, and only past `coalescer.max_keys` do new keys get "overloaded" — the
//! rules of a store outage.

pub mod config;
pub mod nats;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::model::Record;
use crate::resume::catalog::Catalog;
use crate::resume::is_completed;
use crate::telemetry::metrics::{
    self, counter, gauge, histogram, load, DescriptorEncoder, Encoded, Histogram, Registry,
};
pub use config::{EventsConfig, EventsKind};

/// The version of the message schema ([`Event::v`]); a consumer ignores what it does not know.
pub const EVENT_VERSION: u8 = 1;

/// What a flushed row says about a viewer's title.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// A position short of the completion threshold.
    Progress,
    /// A position at or past `api.completed_ratio` of the title's duration: the title
    /// resumes at 0, or a series at its next episode (the rule of [`crate::resume`]).
    Completed,
    /// The position was deleted (a tombstone).
    Deleted,
}

/// One event: a row the store took, as published (JSON, docs/events.md).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// [`EVENT_VERSION`].
    pub v: u8,
    pub kind: EventKind,
    pub account_id: u64,
    pub profile_id: u64,
    /// The compact title id the engine and the stores use (FNV-1a of `catalog_id`).
    pub title_id: u64,
    /// The catalog's string id (`movie_id` of the API); `None` for a title the catalog
    /// does not list (a gateway may send any compact id).
    pub catalog_id: Option<String>,
    /// `None` for a deletion.
    pub position_seconds: Option<u32>,
    /// When the heartbeat (or the deletion) happened: the row's last-write-wins version.
    pub updated_at_ms: u64,
    /// The compact device id (`DeviceNames::id_of` of the name a device sent); `None` for
    /// a deletion.
    pub device_id: Option<u32>,
}

impl Event {
    /// The event of one flushed row, classified by the catalog's durations.
    pub fn of(record: &Record, catalog: &Catalog, completed_ratio: f64) -> Self {
        let value = record.value;
        let title = catalog.by_title_id(record.key.title_id);
        let kind = if value.is_tombstone() {
            EventKind::Deleted
        } else if title.is_some_and(|t| is_completed(value.position_seconds, t, completed_ratio)) {
            EventKind::Completed
        } else {
            EventKind::Progress
        };
        let deleted = kind == EventKind::Deleted;
        Self {
            v: EVENT_VERSION,
            kind,
            account_id: record.key.account_id,
            profile_id: record.key.profile_id,
            title_id: record.key.title_id,
            catalog_id: title.map(|t| t.id.clone()),
            position_seconds: (!deleted).then_some(value.position_seconds),
            updated_at_ms: value.updated_at_ms,
            device_id: (!deleted).then_some(value.device_id),
        }
    }
}

/// One encoded event, ready for a sink.
#[derive(Clone, Debug)]
pub struct Message {
    /// `<subject_prefix>.<account_id % partitions>`.
    pub subject: String,
    /// The same for every publish of one version of one key: `account.profile.title.
    /// updated_at_ms.device_id.position` (the raw value, a tombstone's included).
    pub id: String,
    /// The JSON of the [`Event`].
    pub payload: Bytes,
}

/// Why a round of events was not acknowledged. Nothing is lost: the cycle publishes the
/// round again, and until then its rows stay dirty in memory and in the commit log.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("the event stream did not acknowledge {events} events within {ms} ms")]
    Timeout { events: usize, ms: u64 },
    #[error("publishing to the event stream failed: {0}")]
    Publish(String),
    #[error("the event stream `{stream}` is not available: {reason}")]
    Stream { stream: String, reason: String },
}

/// A message system that takes events: one file implementing this per system.
#[async_trait::async_trait]
pub trait EventSink: Send + Sync + 'static {
    /// `nats`, as logs and `/readyz` say it.
    fn name(&self) -> &'static str;

    /// Publishes `messages` and resolves once the system acknowledged (persisted) every
    /// one. `Err` when any was not: the caller publishes the whole round again, so a
    /// message may be stored twice (the sink passes [`Message::id`] on for the system to
    /// drop the duplicate).
    async fn publish(&self, messages: Vec<Message>) -> Result<(), EventError>;

    /// Whether the client is connected right now.
    fn connected(&self) -> bool;
}

/// The counters behind the `playhead_events_*` families (docs/metrics.md). Relaxed atomics
/// bumped once per round of publishes.
#[derive(Debug, Default)]
pub struct EventStats {
    pub published: AtomicU64,
    /// Events of rounds that failed (each round is published again).
    pub failed: AtomicU64,
    /// Events whose rows the store synced and the stream has not acknowledged yet.
    pub pending: AtomicU64,
    /// When the oldest pending events were synced to the store, in ms since the
    /// publisher's origin plus one (0: none pending).
    pending_since: AtomicU64,
    pub publish_seconds: Histogram,
}

/// Publishes flushed rows: encodes them, publishes them through the sink in bounded
/// rounds, and keeps the counters and the health `/readyz` reports. One per process, held
/// by the engine; the flusher drives it ([`crate::engine::flusher`]).
pub struct Publisher {
    sink: Arc<dyn EventSink>,
    catalog: Catalog,
    completed_ratio: f64,
    subject_prefix: String,
    partitions: u32,
    /// `events.max_in_flight`: the largest round, so at most this many encoded events are
    /// held at once.
    max_in_flight: usize,
    ack_timeout: Duration,
    stats: EventStats,
    origin: Instant,
    /// The latest round's error while rounds fail (cleared by the next success).
    failing: parking_lot::Mutex<Option<String>>,
}

/// The thread a sink's client runs its tasks on: a current-thread runtime that lives until
/// this is dropped.
pub struct ClientThread {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ClientThread {
    /// Runs `connect` on a new thread's runtime and keeps that runtime (and so every task
    /// the client spawned on it) running after it returns.
    async fn start<T, F>(nice: i32, connect: F) -> Result<(T, Self), EventError>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, EventError>> + Send + 'static,
    {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (done, connected) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("playhead-events".into())
            .spawn(move || {
                crate::telemetry::priority::lower_current_thread(nice);
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = done.send(Err(EventError::Publish(format!(
                            "starting the event client's runtime: {e}"
                        ))));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let _ = done.send(connect.await);
                    // Dropped or sent: either way the client's tasks end with the runtime.
                    let _ = stopped.await;
                });
            })
            .map_err(|e| EventError::Publish(format!("starting the event client's thread: {e}")))?;
        let thread = Self {
            stop: Some(stop),
            thread: Some(thread),
        };
        let sink = connected
            .await
            .map_err(|_| EventError::Publish("the event client's thread ended".into()))??;
        Ok((sink, thread))
    }
}

impl Drop for ClientThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Publisher {
    pub fn new(
        sink: Arc<dyn EventSink>,
        config: &EventsConfig,
        catalog: Catalog,
        completed_ratio: f64,
    ) -> Self {
        Self {
            sink,
            catalog,
            completed_ratio,
            subject_prefix: config.subject_prefix.clone(),
            partitions: config.partitions,
            max_in_flight: config.max_in_flight,
            ack_timeout: Duration::from_millis(config.ack_timeout_ms),
            stats: EventStats::default(),
            origin: Instant::now(),
            failing: parking_lot::Mutex::new(None),
        }
    }

    /// Connects the configured sink (without waiting for the server: a NATS that is down
    /// is retried in the background) and returns its publisher; `None` when events are off.
    ///
    /// The client's own tasks (its connection, reading acknowledgements, reconnecting) run
    /// on a thread of their own, `playhead-events`, at the background priority (`nice`
    /// levels lower, [`crate::telemetry::priority`]), not on the request path's runtime:
    /// the stream's work then never queues ahead of a heartbeat's acknowledgement. The
    /// thread ends when the returned [`ClientThread`] is dropped.
    pub async fn from_config(
        config: &EventsConfig,
        catalog: Catalog,
        completed_ratio: f64,
        nice: i32,
    ) -> Result<Option<(Self, ClientThread)>, EventError> {
        let (sink, thread): (Arc<dyn EventSink>, ClientThread) = match config.kind {
            EventsKind::None => return Ok(None),
            EventsKind::Nats => {
                let config = config.clone();
                let (sink, thread) =
                    ClientThread::start(
                        nice,
                        async move { nats::NatsSink::connect(&config).await },
                    )
                    .await?;
                (Arc::new(sink), thread)
            }
        };
        Ok(Some((
            Self::new(sink, config, catalog, completed_ratio),
            thread,
        )))
    }

    pub fn sink_name(&self) -> &'static str {
        self.sink.name()
    }

    /// The most events one round publishes.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    pub fn stats(&self) -> &EventStats {
        &self.stats
    }

    /// The message of one flushed row.
    pub fn message(&self, record: &Record) -> Message {
        let event = Event::of(record, &self.catalog, self.completed_ratio);
        let (k, v) = (record.key, record.value);
        Message {
            subject: format!(
                "{}.{}",
                self.subject_prefix,
                k.account_id % u64::from(self.partitions)
            ),
            id: format!(
                "{}.{}.{}.{}.{}.{}",
                k.account_id,
                k.profile_id,
                k.title_id,
                v.updated_at_ms,
                v.device_id,
                v.position_seconds
            ),
            payload: serde_json::to_vec(&event)
                .expect("an event always encodes")
                .into(),
        }
    }

    /// `rows` rows were synced to the store and await publishing.
    pub fn stored(&self, rows: usize) {
        self.stats.pending.fetch_add(rows as u64, Ordering::Relaxed);
        let now = self.origin.elapsed().as_millis() as u64 + 1;
        let _ =
            self.stats
                .pending_since
                .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// The cycle that reported [`Publisher::stored`] ended, published or not: its rows
    /// are no longer pending (unpublished ones are dirty again and come back with a
    /// later cycle).
    pub fn cycle_ended(&self) {
        self.stats.pending.store(0, Ordering::Relaxed);
        self.stats.pending_since.store(0, Ordering::Relaxed);
    }

    /// Publishes one round (at most [`Publisher::max_in_flight`] rows) and waits for its
    /// acknowledgements, at most `events.ack_timeout_ms` or `budget` if shorter.
    pub async fn publish_round(
        &self,
        rows: &[Record],
        budget: Option<Duration>,
    ) -> Result<(), EventError> {
        assert!(rows.len() <= self.max_in_flight, "a round is bounded");
        let messages: Vec<Message> = rows.iter().map(|r| self.message(r)).collect();
        let started = Instant::now();
        let limit = budget.map_or(self.ack_timeout, |b| b.min(self.ack_timeout));
        let outcome = match tokio::time::timeout(limit, self.sink.publish(messages)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(EventError::Timeout {
                events: rows.len(),
                ms: limit.as_millis() as u64,
            }),
        };
        let n = rows.len() as u64;
        match &outcome {
            Ok(()) => {
                self.stats.publish_seconds.observe(started.elapsed());
                self.stats.published.fetch_add(n, Ordering::Relaxed);
                let left = self.stats.pending.load(Ordering::Relaxed).saturating_sub(n);
                self.stats.pending.store(left, Ordering::Relaxed);
                *self.failing.lock() = None;
            }
            Err(e) => {
                self.stats.failed.fetch_add(n, Ordering::Relaxed);
                *self.failing.lock() = Some(e.to_string());
            }
        }
        outcome
    }

    /// How long the oldest pending events have waited since their store sync.
    pub fn lag(&self) -> Duration {
        match self.stats.pending_since.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            since => {
                let now = self.origin.elapsed().as_millis() as u64 + 1;
                Duration::from_millis(now.saturating_sub(since))
            }
        }
    }

    /// `Ok` while the stream takes events; otherwise why not (the latest round's error,
    /// or that the client is not connected), for `/readyz`.
    pub fn health(&self) -> Result<(), String> {
        if let Some(error) = self.failing.lock().clone() {
            return Err(format!("failing: {error}"));
        }
        if !self.sink.connected() {
            return Err(format!("{} client not connected", self.sink.name()));
        }
        Ok(())
    }

    /// The `playhead_events_*` families (docs/metrics.md).
    pub fn encode_metrics(&self, e: &mut DescriptorEncoder<'_>) -> Encoded {
        let s = &self.stats;
        counter(
            e,
            "playhead_events_published_total",
            "Events the stream acknowledged (one per flushed row; a row flushed again after a crash or a failed round counts again).",
            load(&s.published),
        )?;
        counter(
            e,
            "playhead_events_failed_total",
            "Events of publish rounds that failed or timed out (each round is published again).",
            load(&s.failed),
        )?;
        gauge(
            e,
            "playhead_events_pending",
            "Events whose rows the store synced and the stream has not acknowledged yet.",
            load(&s.pending),
        )?;
        gauge(
            e,
            "playhead_events_lag_seconds",
            "How long the oldest pending events have waited since their store sync (0: none pending).",
            self.lag().as_secs_f64(),
        )?;
        gauge(
            e,
            "playhead_events_connected",
            "1 while the client is connected to the event stream's server.",
            u32::from(self.sink.connected()),
        )?;
        histogram(
            e,
            "playhead_events_publish_duration_seconds",
            "Duration of acknowledged publish rounds (up to events.max_in_flight events each).",
            &s.publish_seconds,
        )
    }

    /// Registers [`Publisher::encode_metrics`].
    pub fn register_metrics(self: &Arc<Self>, registry: &mut Registry) {
        let publisher = Arc::clone(self);
        metrics::register(registry, "events", move |e| publisher.encode_metrics(e));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Key, Value};
    use crate::resume::catalog::title_id_of;

    fn catalog() -> Catalog {
        Catalog::parse(
            r#"
            [[title]]
            id = "inception"
            duration_seconds = 1000
            stream_url = "https://cdn.example.com/inception.m3u8"
            "#,
        )
        .unwrap()
    }

    #[test]
    fn rows_become_progress_completed_and_deleted_events() {
        let catalog = catalog();
        let title = title_id_of("inception");
        let event = |value| Event::of(&Record::new(Key::new(7, 2, title), value), &catalog, 0.95);
        let progress = event(Value::new(949, 1_000, 42));
        assert_eq!(progress.kind, EventKind::Progress);
        assert_eq!(progress.catalog_id.as_deref(), Some("inception"));
        assert_eq!(progress.position_seconds, Some(949));
        assert_eq!(progress.device_id, Some(42));
        assert_eq!(
            (progress.account_id, progress.profile_id, progress.title_id),
            (7, 2, title)
        );
        assert_eq!(event(Value::new(950, 1_000, 42)).kind, EventKind::Completed);
        let deleted = event(Value::tombstone(2_000));
        assert_eq!(deleted.kind, EventKind::Deleted);
        assert_eq!((deleted.position_seconds, deleted.device_id), (None, None));
        assert_eq!(deleted.updated_at_ms, 2_000);
        let unknown = Event::of(
            &Record::new(Key::new(7, 2, 99), Value::new(5_000, 1, 1)),
            &catalog,
            0.95,
        );
        assert_eq!(
            (unknown.kind, unknown.catalog_id),
            (EventKind::Progress, None)
        );
    }

    #[test]
    fn the_json_schema_is_the_documented_one() {
        let catalog = catalog();
        let record = Record::new(
            Key::new(7, 2, title_id_of("inception")),
            Value::new(120, 1_760_000_000_000, 42),
        );
        let json: serde_json::Value =
            serde_json::to_value(Event::of(&record, &catalog, 0.95)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "v": 1, "kind": "progress", "account_id": 7, "profile_id": 2,
                "title_id": title_id_of("inception"), "catalog_id": "inception",
                "position_seconds": 120, "updated_at_ms": 1_760_000_000_000_u64, "device_id": 42,
            })
        );
    }
}
