//! The data model: what a heartbeat is, what we keep of it, and which of two values wins.
//!
//! Napkin math: a key is 24 bytes and a value 16, so one coalescer entry is 40 bytes plus the
//! hash table's control byte; that is what keeps the memtable near the 64-bytes-per-key target.

use std::time::{SystemTime, UNIX_EPOCH};

/// Identifies one resume position: a title as watched by one profile of one account.
///
/// Each profile of a household keeps its own positions, so the profile is part of the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub account_id: u64,
    pub profile_id: u64,
    pub title_id: u64,
}

impl Key {
    /// Size of [`Key::to_bytes`].
    pub const ENCODED_BYTES: usize = 24;

    pub const fn new(account_id: u64, profile_id: u64, title_id: u64) -> Self {
        Self {
            account_id,
            profile_id,
            title_id,
        }
    }

    /// Big-endian encoding: byte order equals key order, so one profile's titles are a
    /// contiguous prefix range in an ordered store.
    pub fn to_bytes(&self) -> [u8; Self::ENCODED_BYTES] {
        let mut out = [0u8; Self::ENCODED_BYTES];
        out[0..8].copy_from_slice(&self.account_id.to_be_bytes());
        out[8..16].copy_from_slice(&self.profile_id.to_be_bytes());
        out[16..24].copy_from_slice(&self.title_id.to_be_bytes());
        out
    }

    /// Inverse of [`Key::to_bytes`]; `None` when `bytes` has the wrong length.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; Self::ENCODED_BYTES] = bytes.try_into().ok()?;
        Some(Self {
            account_id: u64::from_be_bytes(bytes[0..8].try_into().ok()?),
            profile_id: u64::from_be_bytes(bytes[8..16].try_into().ok()?),
            title_id: u64::from_be_bytes(bytes[16..24].try_into().ok()?),
        })
    }

    /// The 16-byte prefix shared by every title of one profile.
    pub fn profile_prefix(account_id: u64, profile_id: u64) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[0..8].copy_from_slice(&account_id.to_be_bytes());
        out[8..16].copy_from_slice(&profile_id.to_be_bytes());
        out
    }
}

/// What we keep for a key: the newest position and who reported it when.
///
/// A deletion is stored as a value too (a *tombstone*, see [`Value::tombstone`]), so that
/// deletes and heartbeats resolve by the same last-write-wins rule everywhere: in the
/// coalescer, in the commit log, and in every store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Value {
    /// Milliseconds since the Unix epoch at which the heartbeat happened (server-stamped, or
    /// the client's clamped timestamp). The primary last-write-wins order.
    pub updated_at_ms: u64,
    /// Playback position. [`Value::TOMBSTONE_POSITION`] marks a deletion.
    pub position_seconds: u32,
    /// Which device reported it; breaks ties between equal timestamps.
    pub device_id: u32,
}

impl Value {
    /// Size of [`Value::to_bytes`].
    pub const ENCODED_BYTES: usize = 16;
    /// The position that marks a tombstone. No real title is 136 years long, and
    /// [`validate_position`] rejects it on ingest.
    pub const TOMBSTONE_POSITION: u32 = u32::MAX;
    /// The device a tombstone carries: the largest, so a delete wins a tie with a heartbeat
    /// of the same millisecond.
    pub const TOMBSTONE_DEVICE: u32 = u32::MAX;

    pub const fn new(position_seconds: u32, updated_at_ms: u64, device_id: u32) -> Self {
        Self {
            updated_at_ms,
            position_seconds,
            device_id,
        }
    }

    /// A deletion at `updated_at_ms`: hides every value up to that moment and loses to any
    /// later heartbeat.
    pub const fn tombstone(updated_at_ms: u64) -> Self {
        Self {
            updated_at_ms,
            position_seconds: Self::TOMBSTONE_POSITION,
            device_id: Self::TOMBSTONE_DEVICE,
        }
    }

    pub const fn is_tombstone(&self) -> bool {
        self.position_seconds == Self::TOMBSTONE_POSITION
    }

    /// The last-write-wins order: `(updated_at_ms, device_id)`, then `position_seconds` as a
    /// last tie-break, so that two *different* values can never be equal and the winner never
    /// depends on arrival order (two racing writers, log replay order, two ingest nodes).
    /// Equal versions are identical values. Arrival order never matters.
    pub const fn version(&self) -> (u64, u32, u32) {
        (self.updated_at_ms, self.device_id, self.position_seconds)
    }

    /// True when `self` must replace `current`. Equal versions are a no-op, so a duplicate
    /// or retried heartbeat changes nothing.
    pub fn supersedes(&self, current: &Value) -> bool {
        self.version() > current.version()
    }

    pub fn to_bytes(&self) -> [u8; Self::ENCODED_BYTES] {
        let mut out = [0u8; Self::ENCODED_BYTES];
        out[0..8].copy_from_slice(&self.updated_at_ms.to_le_bytes());
        out[8..12].copy_from_slice(&self.position_seconds.to_le_bytes());
        out[12..16].copy_from_slice(&self.device_id.to_le_bytes());
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; Self::ENCODED_BYTES] = bytes.try_into().ok()?;
        Some(Self {
            updated_at_ms: u64::from_le_bytes(bytes[0..8].try_into().ok()?),
            position_seconds: u32::from_le_bytes(bytes[8..12].try_into().ok()?),
            device_id: u32::from_le_bytes(bytes[12..16].try_into().ok()?),
        })
    }
}

/// One accepted heartbeat (or deletion): the unit of the commit log, the coalescer and the
/// store batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Record {
    pub key: Key,
    pub value: Value,
}

impl Record {
    /// Size of [`Record::encode_into`]'s output: 24-byte key + 16-byte value.
    pub const ENCODED_BYTES: usize = Key::ENCODED_BYTES + Value::ENCODED_BYTES;

    pub const fn new(key: Key, value: Value) -> Self {
        Self { key, value }
    }

    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.key.to_bytes());
        out.extend_from_slice(&self.value.to_bytes());
    }

    /// Decodes one record from exactly [`Record::ENCODED_BYTES`] bytes.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != Self::ENCODED_BYTES {
            return None;
        }
        Some(Self {
            key: Key::from_bytes(&bytes[..Key::ENCODED_BYTES])?,
            value: Value::from_bytes(&bytes[Key::ENCODED_BYTES..])?,
        })
    }
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Where the server reads wall-clock time from: heartbeat stamps and the skew clamp
/// ([`crate::engine::Engine::now_ms`]), token expiry ([`crate::ingest::auth::Verifier`]). The
/// system clock in the server; tests that need time to pass (a token expiring, the skew
/// allowance running out) move a [`Clock::manual`] clock instead of sleeping, as the
/// circuit breaker's tests do with theirs ([`crate::store::breaker::Clock`]).
#[derive(Clone, Debug, Default)]
pub enum Clock {
    #[default]
    System,
    /// Milliseconds since the Unix epoch, set by hand.
    Manual(std::sync::Arc<std::sync::atomic::AtomicU64>),
}

impl Clock {
    /// A clock standing at `start_ms` until [`Clock::advance_ms`] moves it.
    pub fn manual(start_ms: u64) -> Self {
        Self::Manual(std::sync::Arc::new(start_ms.into()))
    }

    #[inline]
    pub fn now_ms(&self) -> u64 {
        match self {
            Clock::System => now_ms(),
            Clock::Manual(at) => at.load(std::sync::atomic::Ordering::SeqCst),
        }
    }

    /// Moves a manual clock `ms` forward. The system clock cannot be moved: panics.
    pub fn advance_ms(&self, ms: u64) {
        match self {
            Clock::System => panic!("the system clock cannot be advanced"),
            Clock::Manual(at) => {
                at.fetch_add(ms, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }
}

/// The timestamp a heartbeat is stored with: the server's arrival time, or the client's own
/// timestamp clamped to no later than `now_ms + max_skew_ms`, so a device with a fast clock
/// cannot pin a key forever.
pub fn stamp(client_ms: Option<u64>, now_ms: u64, max_skew_ms: u64) -> u64 {
    match client_ms {
        Some(client) => client.min(now_ms.saturating_add(max_skew_ms)),
        None => now_ms,
    }
}

/// Why a heartbeat's position is refused before it reaches the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PositionError {
    #[error("position_seconds {0} is reserved (it marks deletions)")]
    Reserved(u32),
}

/// Rejects the one position value that is reserved for tombstones.
pub fn validate_position(position_seconds: u32) -> Result<u32, PositionError> {
    if position_seconds == Value::TOMBSTONE_POSITION {
        Err(PositionError::Reserved(position_seconds))
    } else {
        Ok(position_seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_timestamp_wins_whatever_the_device() {
        let old = Value::new(10, 1_000, 9);
        let new = Value::new(4, 1_001, 1);
        assert!(new.supersedes(&old));
        assert!(!old.supersedes(&new));
    }

    #[test]
    fn equal_timestamp_breaks_tie_by_device_and_equal_is_noop() {
        let a = Value::new(10, 1_000, 1);
        let b = Value::new(20, 1_000, 2);
        assert!(b.supersedes(&a));
        assert!(!a.supersedes(&b));
        assert!(!a.supersedes(&a));
    }

    #[test]
    fn same_millisecond_and_device_is_decided_by_position_not_arrival() {
        let a = Value::new(10, 1_000, 1);
        let b = Value::new(20, 1_000, 1);
        assert!(b.supersedes(&a) && !a.supersedes(&b));
    }

    #[test]
    fn tombstone_wins_a_tie_and_loses_to_later_heartbeat() {
        let t = Value::tombstone(5_000);
        assert!(t.is_tombstone());
        assert!(t.supersedes(&Value::new(1, 5_000, 7)));
        assert!(Value::new(1, 5_001, 0).supersedes(&t));
    }

    #[test]
    fn encodings_round_trip_and_keys_sort_by_bytes() {
        let r = Record::new(Key::new(1, 2, 3), Value::new(4, 5, 6));
        let mut buf = Vec::new();
        r.encode_into(&mut buf);
        assert_eq!(buf.len(), Record::ENCODED_BYTES);
        assert_eq!(Record::decode(&buf), Some(r));
        assert_eq!(Record::decode(&buf[1..]), None);
        let (a, b) = (Key::new(1, 2, u64::MAX), Key::new(1, 3, 0));
        assert!(a < b && a.to_bytes() < b.to_bytes());
        assert!(a.to_bytes().starts_with(&Key::profile_prefix(1, 2)));
    }

    #[test]
    fn client_timestamp_is_clamped_to_skew() {
        assert_eq!(stamp(None, 100, 5), 100);
        assert_eq!(stamp(Some(90), 100, 5), 90);
        assert_eq!(stamp(Some(1_000), 100, 5), 105);
        assert_eq!(stamp(Some(u64::MAX), u64::MAX - 1, 5), u64::MAX);
    }

    #[test]
    fn reserved_position_is_rejected() {
        assert!(validate_position(7_800).is_ok());
        assert!(validate_position(u32::MAX).is_err());
    }
}
