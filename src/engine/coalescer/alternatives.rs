//! One shard's side table of *alternatives* ([`crate::resume::alternative`]): for a key whose
//! newest value superseded a value of another device, that superseded value.
//!
//! A side table, not a field of the hot slot: the slot stays 44 bytes ([`super::keymap`]),
//! and only keys where two devices met pay for an entry. A heartbeat that supersedes a
//! value of its own device — the 4-second heartbeat of every viewer — never touches it.
//!
//! Invariants (asserted in debug builds by the coalescer's tests):
//! - every key here is in the shard's map: an entry leaves with its key (evicted once
//!   stored, [`Alternatives::remove`]) and is written with the key's row when it flushes;
//! - entries are kept while they can still be offered: the flush drops those written
//!   before `api.alternative_window_ms` ([`Alternatives::expire_before`]);
//! - at most `max_entries` (`coalescer.max_alternatives / shards`): past it the oldest
//!   (by the alternative's own time) are evicted, an eighth of the table at a time, so
//!   the eviction's O(entries) pass is paid once per `max_entries / 8` insertions.
//!
//! Napkin math: a 24-byte key and a 16-byte value in a `hashbrown` table (one control byte
//! per bucket, 50–87.5 % full): ~47–80 bytes per entry, measured in
//! `bytes_per_entry_is_measured` and BENCHMARKS.md.

use hashbrown::HashMap;

use crate::model::{Key, Value};

type Hasher = foldhash::fast::RandomState;

/// One shard's alternatives; lives under the shard's lock.
pub struct Alternatives {
    by_key: HashMap<Key, Value, Hasher>,
    max_entries: usize,
    /// Entries evicted at the bound since start.
    pub evicted: u64,
    /// Entries dropped because their window passed.
    pub expired: u64,
}

impl Alternatives {
    pub fn new(max_entries: usize) -> Self {
        assert!(max_entries >= 1, "max_entries must be at least 1");
        Self {
            by_key: HashMap::with_hasher(Hasher::default()),
            max_entries,
            evicted: 0,
            expired: 0,
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// The alternative kept for `key`.
    #[inline]
    pub fn get(&self, key: &Key) -> Option<Value> {
        if self.by_key.is_empty() {
            return None;
        }
        self.by_key.get(key).copied()
    }

    /// Keeps `superseded` as `key`'s alternative (a value of another device was just
    /// superseded), evicting the oldest entries first when the table is full.
    pub fn set(&mut self, key: Key, superseded: Value) {
        if self.by_key.len() >= self.max_entries && !self.by_key.contains_key(&key) {
            self.evict_oldest();
        }
        self.by_key.insert(key, superseded);
        debug_assert!(self.by_key.len() <= self.max_entries);
    }

    /// Forgets `key`'s alternative (the key left memory, or a deletion superseded it).
    #[inline]
    pub fn remove(&mut self, key: &Key) {
        if !self.by_key.is_empty() {
            self.by_key.remove(key);
        }
    }

    /// Drops every alternative written before `cutoff_ms`: no answer can offer it any more.
    pub fn expire_before(&mut self, cutoff_ms: u64) {
        let before = self.by_key.len();
        self.by_key.retain(|_, v| v.updated_at_ms >= cutoff_ms);
        self.expired += (before - self.by_key.len()) as u64;
    }

    /// Evicts the oldest eighth of the table (at least one entry) by the alternatives' own
    /// time: a pass to find the cutoff, one to remove.
    #[cold]
    fn evict_oldest(&mut self) {
        let mut times: Vec<u64> = self.by_key.values().map(|v| v.updated_at_ms).collect();
        let nth = (times.len() / 8).min(times.len() - 1);
        let (_, cutoff, _) = times.select_nth_unstable(nth);
        let cutoff = *cutoff;
        let before = self.by_key.len();
        self.by_key.retain(|_, v| v.updated_at_ms > cutoff);
        self.evicted += (before - self.by_key.len()) as u64;
    }

    /// Bytes the table has allocated.
    pub fn allocated_bytes(&self) -> usize {
        self.by_key.allocation_size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(a: u64) -> Key {
        Key::new(a, 1, 7)
    }

    #[test]
    fn the_bound_evicts_the_oldest_first() {
        let mut t = Alternatives::new(80);
        for a in 0..80u64 {
            t.set(key(a), Value::new(1, 1_000 + a, 1));
        }
        assert_eq!(t.len(), 80);
        t.set(key(1_000), Value::new(1, 5_000, 1));
        assert!(t.len() <= 80);
        assert_eq!(t.evicted, 11, "the oldest eighth (and the cutoff itself)");
        assert_eq!(t.get(&key(0)), None);
        assert_eq!(t.get(&key(10)), None);
        assert_eq!(t.get(&key(11)), Some(Value::new(1, 1_011, 1)));
        assert_eq!(t.get(&key(1_000)), Some(Value::new(1, 5_000, 1)));
        // Replacing a key's entry at the bound evicts nothing.
        let len = t.len();
        t.set(key(50), Value::new(2, 6_000, 2));
        assert_eq!((t.len(), t.evicted), (len, 11));
    }

    #[test]
    fn expiry_drops_what_the_window_left() {
        let mut t = Alternatives::new(100);
        for a in 0..10u64 {
            t.set(key(a), Value::new(1, a * 100, 1));
        }
        t.expire_before(500);
        assert_eq!((t.len(), t.expired), (5, 5));
        assert_eq!(t.get(&key(4)), None);
        assert!(t.get(&key(5)).is_some());
        t.remove(&key(5));
        assert_eq!(t.get(&key(5)), None);
    }

    /// Bytes per entry at sizes across a growth cycle (printed; BENCHMARKS.md).
    #[test]
    fn bytes_per_entry_is_measured() {
        let mut total = (0usize, 0usize);
        for n in [10_000u64, 14_000, 20_000, 28_000, 40_000, 57_000] {
            let mut t = Alternatives::new(1 << 20);
            for a in 0..n {
                t.set(key(a), Value::new(1, a, 1));
            }
            let per = t.allocated_bytes() as f64 / n as f64;
            assert!(
                (40.0..100.0).contains(&per),
                "{per:.1} bytes per entry at {n}"
            );
            println!("{n} entries: {per:.1} bytes per entry");
            total = (total.0 + t.allocated_bytes(), total.1 + n as usize);
        }
        println!(
            "mean over sizes: {:.1} bytes per entry",
            total.0 as f64 / total.1 as f64
        );
    }
}
