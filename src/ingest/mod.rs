//! Sources: the listeners that take heartbeats in ([`http`] for devices, [`binary`] for
//! gateways and the load generator) and what they share — [`Ingest`], which checks and
//! stamps every heartbeat by the same rules whichever listener took it, the accept loop and
//! connection limit ([`listener`]), and their counters ([`metrics`]). Neither listener
//! reaches into the other's module; both reach the engine only through [`Ingest::engine`].

pub mod auth;
pub mod binary;
pub mod config;
pub mod http;
pub mod listener;
pub mod metrics;

use crate::engine::Engine;
use crate::model::{self, Key, Record, Value};
use crate::resume::catalog::{Catalog, Title};
use std::sync::Arc;

use crate::telemetry::metrics::{self as telemetry, Registry};
use metrics::IngestMetrics;

/// Why [`Ingest::record`] refuses a heartbeat. Each listener answers it in its own words
/// (an HTTP error code, a binary reject code), as it does the catalog and range checks it
/// makes first; nothing refused is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    #[error("position_seconds is reserved")]
    ReservedPosition,
    #[error("timestamp is older than the retention period")]
    TooOld,
}

/// What both listeners share: the engine, the catalog heartbeats are checked against, the
/// rules they are stamped by, and the ingest counters. One per process, behind an `Arc`.
pub struct Ingest {
    engine: Engine,
    catalog: Catalog,
    metrics: IngestMetrics,
    /// `api.position_allowance_seconds`: how far past a title's end a position may be.
    position_allowance_seconds: u32,
    /// `ingest.max_clock_skew_ms`: how far ahead of server time a client's stamp may be.
    max_clock_skew_ms: u64,
    /// `store.retention_days` in ms: older heartbeats are refused (a purged delete must not
    /// be undone by one).
    retention_ms: u64,
}

impl Ingest {
    pub fn new(engine: Engine, catalog: Catalog) -> Self {
        let config = engine.config();
        Self {
            position_allowance_seconds: config.api.position_allowance_seconds,
            max_clock_skew_ms: config.ingest.max_clock_skew_ms,
            retention_ms: config.retention_ms(),
            metrics: IngestMetrics::default(),
            engine,
            catalog,
        }
    }

    /// The engine every accepted heartbeat goes to.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub fn metrics(&self) -> &IngestMetrics {
        &self.metrics
    }

    /// Registers the ingest counters and, through the engine, every engine component's
    /// metrics.
    pub fn register_metrics(self: &Arc<Self>, registry: &mut Registry) {
        let ingest = Arc::clone(self);
        telemetry::register(registry, "ingest", move |e| {
            ingest.metrics.encode_metrics(e)
        });
        self.engine.register_metrics(registry);
    }

    /// The largest position accepted for `title`: its duration plus the allowance (credits,
    /// rounding).
    pub fn position_limit(&self, title: &Title) -> u32 {
        title
            .duration_seconds
            .saturating_add(self.position_allowance_seconds)
    }

    /// Builds the record of one heartbeat at `now_ms` (server time): stamps it with the
    /// client's time clamped to the allowed skew, or with `now_ms` when the client gave none,
    /// and checks what every protocol shares — the position is not the reserved tombstone
    /// position and the stamp is within retention. The caller has checked the position
    /// against [`Ingest::position_limit`].
    pub fn record(
        &self,
        key: Key,
        position_seconds: u32,
        device_id: u32,
        client_timestamp_ms: Option<u64>,
        now_ms: u64,
    ) -> Result<Record, RejectReason> {
        let at = model::stamp(client_timestamp_ms, now_ms, self.max_clock_skew_ms);
        model::validate_position(position_seconds).map_err(|_| RejectReason::ReservedPosition)?;
        if at < now_ms.saturating_sub(self.retention_ms) {
            return Err(RejectReason::TooOld);
        }
        // The tombstone's device is reserved so that a heartbeat never ties with a delete.
        let device_id = device_id.min(Value::TOMBSTONE_DEVICE - 1);
        Ok(Record::new(
            key,
            Value::new(position_seconds, at, device_id),
        ))
    }
}
