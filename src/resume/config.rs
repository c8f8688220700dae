//! The `[api]` section: the product's rules (completion, continue-watching, device names)
//! and the catalog they read.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::{check, ConfigError};

/// Longest `api.alternative_window_ms`: alternatives are a recent conflict, and memory
/// keeps them that long.
pub const MAX_ALTERNATIVE_WINDOW_MS: u64 = 30 * 86_400_000;

/// Business rules of the public API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// The catalog of titles (docs/catalog.md).
    pub catalog_path: PathBuf,
    /// A title watched to at least this fraction of its duration counts as completed.
    pub completed_ratio: f64,
    /// A position may exceed the title's duration by this much (credits, rounding).
    pub position_allowance_seconds: u32,
    /// Longest continue-watching list returned.
    pub continue_watching_limit: usize,
    /// Longest `device_id` accepted.
    pub max_device_id_bytes: usize,
    /// Device names remembered for `last_device_id` answers (oldest forgotten first).
    pub max_device_names: usize,
    /// A resume answer offers an alternative (docs/api.md) written at most this long ago;
    /// memory keeps alternatives this long too.
    pub alternative_window_ms: u64,
    /// ... and at least this far from the answer's position
    /// ([`crate::resume::alternative::distance_seconds`]).
    pub alternative_min_distance_seconds: u32,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            catalog_path: PathBuf::from("config/catalog.toml"),
            completed_ratio: 0.95,
            position_allowance_seconds: 60,
            continue_watching_limit: 20,
            max_device_id_bytes: 64,
            max_device_names: 1_000_000,
            alternative_window_ms: crate::engine::coalescer::DEFAULT_ALTERNATIVE_WINDOW_MS,
            alternative_min_distance_seconds: 60,
        }
    }
}

impl ApiConfig {
    /// Range checks that types alone cannot express; the first bad value is the error.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let a = self;
        check(
            "api.completed_ratio",
            a.completed_ratio,
            a.completed_ratio > 0.0 && a.completed_ratio <= 1.0,
            "a fraction in (0, 1]",
        )?;
        check(
            "api.continue_watching_limit",
            a.continue_watching_limit,
            (1..=1_000).contains(&a.continue_watching_limit),
            "between 1 and 1000",
        )?;
        check(
            "api.max_device_id_bytes",
            a.max_device_id_bytes,
            (1..=256).contains(&a.max_device_id_bytes),
            "between 1 and 256",
        )?;
        check(
            "api.alternative_window_ms",
            a.alternative_window_ms,
            (1..=MAX_ALTERNATIVE_WINDOW_MS).contains(&a.alternative_window_ms),
            "between 1 and 2592000000 (30 days)",
        )?;
        Ok(())
    }

    /// The thresholds of [`crate::resume::alternative::offer`].
    pub fn alternative_rule(&self) -> crate::resume::alternative::OfferRule {
        crate::resume::alternative::OfferRule {
            window_ms: self.alternative_window_ms,
            min_distance_seconds: self.alternative_min_distance_seconds,
        }
    }
}
