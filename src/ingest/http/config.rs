//! The `[http]` section: the public HTTP listener and its limits.

use serde::{Deserialize, Serialize};

use crate::config::{check, ConfigError};

/// The public HTTP listener and its limits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of the public API, `/metrics` and the health checks.
    pub listen: String,
    /// Largest request body accepted; larger ones get 413.
    pub max_body_bytes: usize,
    /// A client must send its request headers within this, or the connection is closed.
    pub header_read_timeout_ms: u64,
    /// A request (body included) must complete within this, or it gets 408.
    pub request_timeout_ms: u64,
    /// Open connections at most; further ones are closed at once.
    pub max_connections: usize,
    /// `Retry-After` seconds sent with 503 when the server is overloaded.
    pub retry_after_seconds: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 4_096,
            header_read_timeout_ms: 5_000,
            request_timeout_ms: 10_000,
            max_connections: 10_000,
            retry_after_seconds: 1,
        }
    }
}

impl HttpConfig {
    /// Range checks that types alone cannot express; the first bad value is the error.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let h = self;
        check(
            "http.listen",
            &h.listen,
            h.listen.parse::<std::net::SocketAddr>().is_ok(),
            "an IP address and port such as 127.0.0.1:8080",
        )?;
        check(
            "http.max_body_bytes",
            h.max_body_bytes,
            (64..=1 << 20).contains(&h.max_body_bytes),
            "between 64 and 1048576",
        )?;
        check(
            "http.header_read_timeout_ms",
            h.header_read_timeout_ms,
            (1..=600_000).contains(&h.header_read_timeout_ms),
            "between 1 and 600000",
        )?;
        check(
            "http.request_timeout_ms",
            h.request_timeout_ms,
            (1..=600_000).contains(&h.request_timeout_ms),
            "between 1 and 600000",
        )?;
        check(
            "http.max_connections",
            h.max_connections,
            (1..=1_000_000).contains(&h.max_connections),
            "between 1 and 1000000",
        )?;
        Ok(())
    }
}
