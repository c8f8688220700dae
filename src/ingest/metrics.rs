//! What both listeners count: heartbeats accepted and refused, by protocol and reason, and
//! each listener's connections. Relaxed atomics bumped once per request or batch; refusals,
//! the rare path, go through a small map. Registered with the metrics registry by
//! [`crate::ingest::Ingest::register_metrics`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::ingest::binary::codec::ErrorCode;
use crate::telemetry::metrics::{counter, counters, gauge, load, DescriptorEncoder, Encoded};

/// The `protocol` label values, in index order of [`IngestMetrics::accepted`].
pub const PROTOCOLS: [&str; 2] = ["http", "binary"];

/// One listener's connections: open now, and refused at its connection cap.
#[derive(Debug, Default)]
pub struct ConnectionCounters {
    pub open: AtomicU64,
    pub refused: AtomicU64,
}

/// Heartbeat outcomes and connections of both listeners.
#[derive(Debug, Default)]
pub struct IngestMetrics {
    pub(crate) accepted: [AtomicU64; PROTOCOLS.len()],
    /// (protocol, reason) → heartbeats refused. Refusals are the rare path; a map is fine.
    pub(crate) rejected: Mutex<HashMap<(&'static str, &'static str), u64>>,
    pub http_connections: Arc<ConnectionCounters>,
    pub binary_connections: Arc<ConnectionCounters>,
    /// Binary connections closed for a protocol error, by error code (1..=14; index 0
    /// unused).
    pub(crate) binary_protocol_errors: [AtomicU64; 16],
}

impl IngestMetrics {
    pub fn accepted(&self, protocol: &str, records: u64) {
        let i = PROTOCOLS.iter().position(|p| *p == protocol).unwrap_or(0);
        self.accepted[i].fetch_add(records, Ordering::Relaxed);
    }

    pub fn rejected(&self, protocol: &'static str, reason: &'static str, records: u64) {
        *self.rejected.lock().entry((protocol, reason)).or_default() += records;
    }

    pub fn binary_protocol_error(&self, code: ErrorCode) {
        let i = (code as usize).min(self.binary_protocol_errors.len() - 1);
        self.binary_protocol_errors[i].fetch_add(1, Ordering::Relaxed);
    }
}

impl IngestMetrics {
    /// The `playhead_heartbeats_*`, `playhead_http_connections*`, `playhead_binary_*`
    /// families (docs/metrics.md).
    pub fn encode_metrics(&self, e: &mut DescriptorEncoder<'_>) -> Encoded {
        counters(
            e,
            "playhead_heartbeats_accepted_total",
            "Heartbeats (and deletes) acknowledged, by protocol.",
            PROTOCOLS
                .iter()
                .zip(&self.accepted)
                .map(|(p, n)| ([("protocol", *p)], load(n))),
        )?;
        let mut rejected: Vec<_> = self.rejected.lock().iter().map(|(k, v)| (*k, *v)).collect();
        rejected.sort();
        counters(
            e,
            "playhead_heartbeats_rejected_total",
            "Heartbeats refused, by protocol and reason.",
            rejected
                .into_iter()
                .map(|((p, reason), n)| ([("protocol", p), ("reason", reason)], n)),
        )?;
        gauge(
            e,
            "playhead_http_connections",
            "Open HTTP connections.",
            load(&self.http_connections.open),
        )?;
        counter(
            e,
            "playhead_http_connections_refused_total",
            "Connections closed at once because http.max_connections were open.",
            load(&self.http_connections.refused),
        )?;
        gauge(
            e,
            "playhead_binary_connections",
            "Open binary-protocol connections.",
            load(&self.binary_connections.open),
        )?;
        counter(
            e,
            "playhead_binary_connections_refused_total",
            "Binary connections refused because binary.max_connections were open.",
            load(&self.binary_connections.refused),
        )?;
        counters(
            e,
            "playhead_binary_protocol_errors_total",
            "Binary connections closed after a protocol error, by error code name.",
            (1..self.binary_protocol_errors.len() as u16).filter_map(|code| {
                let name = ErrorCode::from_u16(code)?.name();
                Some((
                    [("code", name)],
                    load(&self.binary_protocol_errors[code as usize]),
                ))
            }),
        )
    }
}
