//! What both listeners count: heartbeats accepted and refused, by protocol and reason, and
//! each listener's connections. Relaxed atomics bumped once per request or batch; refusals,
//! the rare path, go through a small map. Rendered by the `/metrics` endpoint.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::ingest::binary::codec::ErrorCode;

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
