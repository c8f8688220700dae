//! The `[ingest]` section: rules every heartbeat meets, whichever listener took it.

use serde::{Deserialize, Serialize};

/// Rules applied to every heartbeat before it is accepted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// A client-supplied timestamp is clamped to at most server-now plus this.
    pub max_clock_skew_ms: u64,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            max_clock_skew_ms: 2_000,
        }
    }
}
