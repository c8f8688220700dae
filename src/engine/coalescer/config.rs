//! The `[coalescer]` section: the sharded in-memory memtable.

use serde::{Deserialize, Serialize};

use crate::config::{check, ConfigError};

/// The sharded in-memory memtable.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoalescerConfig {
    /// Number of shards, a power of two; several per core keep lock contention low.
    pub shards: usize,
    /// Most keys held in memory at once (unflushed plus being flushed). Past it, writes
    /// are refused with "overloaded" instead of growing without bound.
    pub max_keys: usize,
    /// Titles one profile may hold in memory before a new one may be refused with
    /// "overloaded" (docs/architecture.md, "A profile's titles live together"): a viewer
    /// plays one title at a time, and a profile's titles stay in memory only until they go
    /// idle and are stored. Bounds what one profile writing thousands of titles costs the
    /// keys around it.
    pub max_titles_per_profile: usize,
    /// Most alternatives kept in memory ([`super::alternatives`]: the value another device
    /// had when it was superseded, for "resume from where?" answers), shared by the
    /// shards, each share rounded down to what a power-of-two table holds (the default
    /// holds 917 504). Past it the oldest are evicted; a key that has one pays ~50 bytes
    /// more.
    pub max_alternatives: usize,
}

impl Default for CoalescerConfig {
    fn default() -> Self {
        Self {
            shards: 64,
            max_keys: 48_000_000,
            max_titles_per_profile: 64,
            max_alternatives: super::DEFAULT_MAX_ALTERNATIVES,
        }
    }
}

impl CoalescerConfig {
    /// Range checks that types alone cannot express; the first bad value is the error.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let c = self;
        check(
            "coalescer.shards",
            c.shards,
            c.shards.is_power_of_two() && c.shards <= 65_536,
            "a power of two between 1 and 65536",
        )?;
        check(
            "coalescer.max_keys",
            c.max_keys,
            c.max_keys >= 1,
            "at least 1",
        )?;
        check(
            "coalescer.max_titles_per_profile",
            c.max_titles_per_profile,
            c.max_titles_per_profile >= 1,
            "at least 1",
        )?;
        check(
            "coalescer.max_alternatives",
            c.max_alternatives,
            c.max_alternatives >= 1,
            "at least 1",
        )?;
        Ok(())
    }
}
