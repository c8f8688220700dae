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
//! - at most `max_entries` (`coalescer.max_alternatives / shards`, rounded down to what a
//!   table of a power-of-two bucket count holds, [`entries_before_growth`]): past it the
//!   oldest (by the alternative's own time) are evicted, an eighth of the table at a time,
//!   so the eviction's O(entries) pass is paid once per `max_entries / 8` insertions;
//! - the table never grows past the buckets `max_entries` needs. A `hashbrown` table does
//!   not reclaim the slots its removals leave (tombstones): once they use up its room, an
//!   insert doubles the table if it is more than half full, even when the entries fit. At
//!   the bound that doubled the side table's memory (82 MiB for 983 k entries at 10 M
//!   viewers, 2026-12-03). So once the table is at least half its bound and has no room
//!   left, it is rebuilt — with the oldest eighth evicted if it is near its bound — into a
//!   table sized for `max_entries`: one O(entries) pass per `max_entries / 8` insertions.
//!
//! Napkin math: a 24-byte key and a 16-byte value in a `hashbrown` table (one control byte
//! per bucket, 44–87.5 % full while growing, 77–87.5 % at the bound): ~47–93 bytes per
//! entry, 47–53 at the bound; measured in `bytes_per_entry_is_measured` and BENCHMARKS.md.

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

/// The most entries a `hashbrown` table of a power-of-two bucket count holds (7/8 of its
/// buckets, from 16 buckets on) that is at most `n`; `n` itself below 14.
pub fn entries_before_growth(n: usize) -> usize {
    if n < 14 {
        return n;
    }
    let mut buckets = 16usize;
    while (buckets * 2) / 8 * 7 <= n {
        buckets *= 2;
    }
    buckets / 8 * 7
}

impl Alternatives {
    /// A table of at most `max_entries` rounded down by [`entries_before_growth`].
    pub fn new(max_entries: usize) -> Self {
        assert!(max_entries >= 1, "max_entries must be at least 1");
        Self {
            by_key: HashMap::with_hasher(Hasher::default()),
            max_entries: entries_before_growth(max_entries),
            evicted: 0,
            expired: 0,
        }
    }

    /// The bound on entries.
    pub fn max_entries(&self) -> usize {
        self.max_entries
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
    /// superseded). A new key past the bound evicts the oldest entries first; one that
    /// would make the table grow past the bound's size rebuilds it (the module's notes).
    pub fn set(&mut self, key: Key, superseded: Value) {
        let len = self.by_key.len();
        let no_room = len == self.by_key.capacity() && len >= self.max_entries / 2;
        if (len >= self.max_entries || no_room) && !self.by_key.contains_key(&key) {
            self.rebuild(len >= self.max_entries - self.max_entries / 8);
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

    /// Moves the entries into a fresh table sized for `max_entries` (no tombstones), first
    /// evicting the oldest eighth (at least one entry) by the alternatives' own time when
    /// `evict` is set.
    #[cold]
    fn rebuild(&mut self, evict: bool) {
        let cutoff = if evict {
            let mut times: Vec<u64> = self.by_key.values().map(|v| v.updated_at_ms).collect();
            let nth = (times.len() / 8).min(times.len() - 1);
            let (_, cutoff, _) = times.select_nth_unstable(nth);
            Some(*cutoff)
        } else {
            None
        };
        let mut fresh = HashMap::with_capacity_and_hasher(self.max_entries, Hasher::default());
        let before = self.by_key.len();
        fresh.extend(
            self.by_key
                .drain()
                .filter(|(_, v)| cutoff.is_none_or(|c| v.updated_at_ms > c)),
        );
        self.evicted += (before - fresh.len()) as u64;
        self.by_key = fresh;
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
        let mut t = Alternatives::new(112);
        assert_eq!(t.max_entries(), 112, "7/8 of 128 buckets");
        for a in 0..112u64 {
            t.set(key(a), Value::new(1, 1_000 + a, 1));
        }
        assert_eq!(t.len(), 112);
        t.set(key(1_000), Value::new(1, 5_000, 1));
        assert!(t.len() <= 112);
        assert_eq!(t.evicted, 15, "the oldest eighth (and the cutoff itself)");
        assert_eq!(t.get(&key(0)), None);
        assert_eq!(t.get(&key(14)), None);
        assert_eq!(t.get(&key(15)), Some(Value::new(1, 1_015, 1)));
        assert_eq!(t.get(&key(1_000)), Some(Value::new(1, 5_000, 1)));
        // Replacing a key's entry at the bound evicts nothing.
        let len = t.len();
        t.set(key(50), Value::new(2, 6_000, 2));
        assert_eq!((t.len(), t.evicted), (len, 15));
    }

    #[test]
    fn the_bound_is_what_a_power_of_two_table_holds() {
        assert_eq!(entries_before_growth(1), 1);
        assert_eq!(entries_before_growth(13), 13);
        assert_eq!(entries_before_growth(14), 14);
        assert_eq!(entries_before_growth(27), 14);
        assert_eq!(entries_before_growth(28), 28);
        assert_eq!(entries_before_growth(16_384), 14_336);
        assert_eq!(entries_before_growth(14_336), 14_336);
        // The default, over 64 shards.
        assert_eq!(64 * entries_before_growth((1 << 20) / 64), 917_504);
        // hashbrown agrees: a table sized for the bound holds it without growing.
        for n in [14usize, 28, 112, 14_336] {
            let t: HashMap<Key, Value, Hasher> =
                HashMap::with_capacity_and_hasher(entries_before_growth(n), Hasher::default());
            assert_eq!(t.capacity(), entries_before_growth(n));
        }
    }

    /// Keys leave and arrive at the bound for a long time (as at 10 M viewers, where one in
    /// ten is a twin on a second device): the table stays the size its bound needs.
    #[test]
    fn churn_at_the_bound_does_not_grow_the_table() {
        let bound = 14_336;
        let mut t = Alternatives::new(bound);
        let sized: HashMap<Key, Value, Hasher> =
            HashMap::with_capacity_and_hasher(bound, Hasher::default());
        let most = sized.allocation_size();
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = 0u64;
        let mut live = Vec::new();
        for round in 0..400_000u64 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            if !live.is_empty() && rng % 5 < 2 {
                // A key left memory (stored and evicted): its alternative goes with it. (The
                // key may have been evicted from the table already.)
                let i = (rng >> 8) as usize % live.len();
                t.remove(&key(live.swap_remove(i)));
            } else {
                t.set(key(next), Value::new(1, round, 1));
                live.push(next);
                next += 1;
            }
            if round % 50_000 == 0 {
                t.expire_before(round.saturating_sub(100_000));
            }
            assert!(t.len() <= bound);
            assert!(
                t.allocated_bytes() <= most,
                "{} bytes for {} entries at round {round}, a table sized for {bound} has {most}",
                t.allocated_bytes(),
                t.len()
            );
        }
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
