//! `KeyMap`: the coalescer's per-shard table, an open-addressing hash map from [`Key`] to
//! [`Value`] built for exactly what the coalescer does — look up, update in place, insert,
//! iterate, drop whole maps — and nothing else (no removal of single keys).
//!
//! Why not hashbrown: an entry is 40 bytes, and hashbrown's power-of-two growth runs
//! between 44 % and 87.5 % full, i.e. 47–94 bytes per key (86 measured at 1 M keys); a
//! lookup also touches two cache lines (control bytes, then the entry). Here:
//! - entries live inline in one array, found by linear probing from `fastrange(hash)`, so a
//!   lookup reads a few consecutive cache lines, known from the hash alone, which batch
//!   upserts prefetch before they take the lock ([`Location`]);
//! - capacity is any size, grown by 1.25× at 85 % full, so the table runs between 68 % and
//!   85 % full: 47–59 bytes per key, plus one occupancy bit per slot.
//!
//! Without single-key removal, linear probing needs no tombstones: a probe stops at the
//! first free slot.

use std::hash::BuildHasher;

use crate::model::{Key, Value};

/// Grow when more than `MAX_LOAD_NUM / MAX_LOAD_DEN` of the slots are used.
const MAX_LOAD_NUM: usize = 85;
const MAX_LOAD_DEN: usize = 100;
/// Growth factor `GROW_NUM / GROW_DEN` (1.25).
const GROW_NUM: usize = 5;
const GROW_DEN: usize = 4;
const MIN_CAPACITY: usize = 16;
/// Cache lines prefetched from a lookup's home slot on: 129–192 bytes past its start,
/// 3.2–4.8 slots of 40 bytes. Between 68 % and 85 % full a linear probe runs 2–4 slots for a key it finds and 5–23
/// for one it does not (every key's first write after a flush), so one line was not
/// enough. `max` on the server (1 M keys, 15 s runs alternated, BENCHMARKS.md): one line
/// 7.9–8.2 M heartbeats/s, two 9.1–10.4 M, three 10.3–10.8 M, four 9.7–10.9 M.
const PREFETCH_LINES: usize = 3;

#[derive(Clone, Copy)]
struct Slot {
    key: Key,
    value: Value,
}

const EMPTY: Slot = Slot {
    key: Key::new(0, 0, 0),
    value: Value::new(0, 0, 0),
};

/// An open-addressing map from [`Key`] to [`Value`] (see the module documentation).
#[derive(Clone)]
pub struct KeyMap<S> {
    slots: Vec<Slot>,
    /// One bit per slot: occupied.
    used: Vec<u64>,
    len: usize,
    hasher: S,
}

impl<S: BuildHasher + Clone> KeyMap<S> {
    pub fn with_hasher(hasher: S) -> Self {
        Self {
            slots: Vec::new(),
            used: Vec::new(),
            len: 0,
            hasher,
        }
    }

    /// A map that holds `keys` keys without growing.
    pub fn with_capacity_and_hasher(keys: usize, hasher: S) -> Self {
        let mut map = Self::with_hasher(hasher);
        if keys > 0 {
            map.resize(slots_for(keys));
        }
        map
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Slots allocated.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Empties the map but keeps its tables, so it can be filled again without allocating
    /// (and without the page faults of fresh memory). O(capacity / 64).
    pub fn clear(&mut self) {
        self.used.fill(0);
        self.len = 0;
    }

    /// True when the map holds `keys` keys without growing and is at most twice the size
    /// [`KeyMap::with_capacity_and_hasher`] would allocate for them: a table worth reusing
    /// for that many keys rather than one to free, so reuse never pins a past peak.
    pub fn suits(&self, keys: usize) -> bool {
        let wanted = slots_for(keys);
        (wanted..=2 * wanted).contains(&self.capacity())
    }

    /// Bytes the table has allocated.
    pub fn allocated_bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<Slot>() + self.used.capacity() * 8
    }

    pub fn hasher(&self) -> &S {
        &self.hasher
    }

    /// The hash every lookup of `key` starts from; the `*_hashed` methods take it
    /// precomputed so a caller can prefetch first (see [`Location`]).
    #[inline]
    pub fn hash(&self, key: &Key) -> u64 {
        self.hasher.hash_one(key)
    }

    #[inline]
    fn is_used(&self, i: usize) -> bool {
        self.used[i / 64] & (1 << (i % 64)) != 0
    }

    /// The slot holding `key`, or the free slot where it would go.
    #[inline]
    fn probe(&self, hash: u64, key: &Key) -> (usize, bool) {
        debug_assert!(self.len < self.slots.len(), "a full table has no free slot");
        debug_assert_eq!(hash, self.hash(key), "hash from another hasher");
        let cap = self.slots.len();
        let mut i = home(hash, cap);
        loop {
            if !self.is_used(i) {
                return (i, false);
            }
            if self.slots[i].key == *key {
                return (i, true);
            }
            i += 1;
            if i == cap {
                i = 0;
            }
        }
    }

    /// Where the arrays are now; changes when the map grows.
    pub fn location(&self) -> Location {
        Location {
            slots: self.slots.as_ptr() as usize,
            used: self.used.as_ptr() as usize,
            capacity: self.slots.len(),
        }
    }

    pub fn get(&self, key: &Key) -> Option<&Value> {
        self.get_hashed(self.hash(key), key)
    }

    /// [`KeyMap::get`] with `hash` = [`KeyMap::hash`]`(key)`.
    #[inline]
    pub fn get_hashed(&self, hash: u64, key: &Key) -> Option<&Value> {
        if self.len == 0 {
            return None;
        }
        match self.probe(hash, key) {
            (i, true) => Some(&self.slots[i].value),
            _ => None,
        }
    }

    pub fn contains_key(&self, key: &Key) -> bool {
        self.get(key).is_some()
    }

    pub fn get_mut(&mut self, key: &Key) -> Option<&mut Value> {
        match self.entry_hashed(self.hash(key), key) {
            Entry::Occupied(value) => Some(value),
            Entry::Vacant(_) => None,
        }
    }

    /// `key`'s value to update, or the free slot where `key` goes: one probe for a lookup
    /// followed by an insert.
    #[inline]
    pub fn entry_hashed(&mut self, hash: u64, key: &Key) -> Entry<'_, S> {
        if self.slots.is_empty() {
            return Entry::Vacant(Vacant {
                map: self,
                hash,
                index: None,
            });
        }
        match self.probe(hash, key) {
            (i, true) => Entry::Occupied(&mut self.slots[i].value),
            (i, false) => Entry::Vacant(Vacant {
                map: self,
                hash,
                index: Some(i),
            }),
        }
    }

    /// Inserts `key`, which must not be present (checked in debug builds).
    pub fn insert_new(&mut self, key: Key, value: Value) {
        self.insert_new_hashed(self.hash(&key), key, value);
    }

    /// [`KeyMap::insert_new`] with `hash` = [`KeyMap::hash`]`(&key)`. Returns whether the
    /// map grew, i.e. its [`Location`] changed.
    #[inline]
    pub fn insert_new_hashed(&mut self, hash: u64, key: Key, value: Value) -> bool {
        let grow = self.must_grow();
        if grow {
            let grown = (self.slots.len() * GROW_NUM / GROW_DEN).max(MIN_CAPACITY);
            self.resize(grown.max(slots_for(self.len + 1)));
        }
        self.place(hash, Slot { key, value });
        grow
    }

    /// Whether one more key would take the map past its maximum load.
    #[inline]
    fn must_grow(&self) -> bool {
        (self.len + 1) * MAX_LOAD_DEN > self.slots.len() * MAX_LOAD_NUM
    }

    /// Puts `slot` in the free slot its probe ends at; its key must be absent and the table
    /// must have room.
    fn place(&mut self, hash: u64, slot: Slot) {
        let (i, found) = self.probe(hash, &slot.key);
        debug_assert!(!found, "insert_new of a key already present");
        self.fill(i, slot);
    }

    /// Puts `slot` in the free slot `i`.
    #[inline]
    fn fill(&mut self, i: usize, slot: Slot) {
        self.slots[i] = slot;
        self.used[i / 64] |= 1 << (i % 64);
        self.len += 1;
    }

    /// Every (key, value) pair, in table order.
    pub fn iter(&self) -> impl Iterator<Item = (&Key, &Value)> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(i, _)| self.is_used(*i))
            .map(|(_, s)| (&s.key, &s.value))
    }

    fn resize(&mut self, slots: usize) {
        let old_slots = std::mem::replace(&mut self.slots, vec![EMPTY; slots]);
        let old_used = std::mem::replace(&mut self.used, vec![0; slots.div_ceil(64)]);
        self.len = 0;
        for (i, slot) in old_slots.iter().enumerate() {
            if old_used[i / 64] & (1 << (i % 64)) != 0 {
                self.place(self.hash(&slot.key), *slot);
            }
        }
    }
}

/// What [`KeyMap::entry_hashed`] found.
pub enum Entry<'a, S> {
    Occupied(&'a mut Value),
    Vacant(Vacant<'a, S>),
}

/// The free slot a probe for an absent key ended at.
pub struct Vacant<'a, S> {
    map: &'a mut KeyMap<S>,
    hash: u64,
    /// `None` when the map has no slots yet.
    index: Option<usize>,
}

impl<S: BuildHasher + Clone> Vacant<'_, S> {
    /// Inserts the key the probe was for (a different key breaks the map). Returns whether
    /// the map grew, i.e. its [`Location`] changed: then the key goes where a new probe
    /// in the grown table ends.
    #[inline]
    pub fn insert(self, key: Key, value: Value) -> bool {
        debug_assert_eq!(self.hash, self.map.hash(&key), "not the probed key");
        let map = self.map;
        match self.index {
            Some(i) if !map.must_grow() => {
                map.fill(i, Slot { key, value });
                false
            }
            _ => map.insert_new_hashed(self.hash, key, value),
        }
    }
}

/// The slot a probe for `hash` starts at, in a table of `capacity` slots (fastrange).
#[inline]
fn home(hash: u64, capacity: usize) -> usize {
    ((u128::from(hash) * capacity as u128) >> 64) as usize
}

/// Where a map's arrays were when it was last asked: enough to prefetch the cache lines a
/// lookup of a hash reads (its occupancy word, and [`PREFETCH_LINES`] lines of slots from
/// its home slot on) from a thread that does not hold the map. Only ever used as a
/// prefetch address — a stale location (the map grew or was dropped since) prefetches the
/// wrong lines, which costs nothing but the hint: a prefetch never faults and never reads
/// data into the program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Location {
    pub slots: usize,
    pub used: usize,
    pub capacity: usize,
}

impl Location {
    #[inline]
    pub fn prefetch(&self, hash: u64) {
        if self.capacity == 0 {
            return;
        }
        let i = home(hash, self.capacity);
        let home_slot = self.slots.wrapping_add(i * std::mem::size_of::<Slot>());
        for line in 0..PREFETCH_LINES {
            prefetch(home_slot.wrapping_add(line * 64));
        }
        prefetch(self.used.wrapping_add(i / 64 * 8));
    }
}

#[inline]
fn prefetch(address: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it does not access memory architecturally and never
    // faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(address as *const i8);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = address;
}

/// Slots needed to hold `keys` at the maximum load.
fn slots_for(keys: usize) -> usize {
    (keys * MAX_LOAD_DEN)
        .div_ceil(MAX_LOAD_NUM)
        .max(MIN_CAPACITY)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    type Map = KeyMap<foldhash::fast::RandomState>;

    #[test]
    fn behaves_like_a_hash_map() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut map = Map::with_hasher(Default::default());
        let mut reference = HashMap::new();
        for step in 0..200_000u64 {
            let key = Key::new(
                rng.random_range(0..5_000),
                rng.random_range(0..3),
                rng.random_range(0..4),
            );
            let value = Value::new(step as u32, step, 1);
            match map.get_mut(&key) {
                Some(v) => *v = value,
                None => map.insert_new(key, value),
            }
            reference.insert(key, value);
            if step % 20_000 == 0 {
                assert_eq!(map.len(), reference.len());
            }
        }
        assert_eq!(map.len(), reference.len());
        for (k, v) in &reference {
            assert_eq!(map.get(k), Some(v));
        }
        assert_eq!(map.iter().count(), reference.len());
        assert!(!map.contains_key(&Key::new(9_999_999, 0, 0)));
        // Load stays within the promised band.
        let load = map.len() as f64 / map.capacity() as f64;
        assert!(load <= 0.85 && load > 0.5, "load {load}");
    }

    /// Lookups followed by inserts through one probe ([`KeyMap::entry_hashed`]) agree with a
    /// `HashMap`, from an empty map through many growths, and report each growth.
    #[test]
    fn entries_insert_where_their_probe_ended() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut map = Map::with_hasher(Default::default());
        let mut reference = HashMap::new();
        for step in 0..100_000u64 {
            let key = Key::new(rng.random_range(0..40_000), 1, rng.random_range(0..2));
            let value = Value::new(step as u32, step, 1);
            let capacity = map.capacity();
            match map.entry_hashed(map.hash(&key), &key) {
                Entry::Occupied(v) => {
                    assert_eq!(reference.get(&key), Some(&*v));
                    *v = value;
                }
                Entry::Vacant(vacant) => {
                    assert!(!reference.contains_key(&key));
                    let grew = vacant.insert(key, value);
                    assert_eq!(grew, map.capacity() != capacity);
                }
            }
            reference.insert(key, value);
        }
        assert_eq!(map.len(), reference.len());
        for (k, v) in &reference {
            assert_eq!(map.get(k), Some(v));
        }
    }

    #[test]
    fn memory_per_key_stays_under_64_bytes() {
        for keys in [1_000usize, 10_000, 15_625, 100_000] {
            let mut map = Map::with_hasher(Default::default());
            for i in 0..keys as u64 {
                map.insert_new(Key::new(i, i % 3, i * 7), Value::new(1, 1, 1));
            }
            let per_key = map.allocated_bytes() as f64 / keys as f64;
            assert!(per_key < 64.0, "{keys} keys: {per_key} bytes/key");
        }
    }

    #[test]
    fn a_cleared_map_forgets_every_key_and_keeps_its_tables() {
        let mut map = Map::with_capacity_and_hasher(1_000, Default::default());
        for i in 0..1_000u64 {
            map.insert_new(Key::new(i, 0, 0), Value::new(1, 1, 1));
        }
        let capacity = map.capacity();
        map.clear();
        assert!(map.is_empty());
        assert_eq!(map.capacity(), capacity);
        assert_eq!(map.iter().count(), 0);
        for i in 0..1_000u64 {
            assert_eq!(map.get(&Key::new(i, 0, 0)), None);
        }
        // Refilled with other keys, it finds only those.
        for i in 500..1_500u64 {
            map.insert_new(Key::new(i, 0, 0), Value::new(2, 2, 2));
        }
        assert_eq!(map.len(), 1_000);
        assert_eq!(map.get(&Key::new(0, 0, 0)), None);
        assert_eq!(map.get(&Key::new(700, 0, 0)), Some(&Value::new(2, 2, 2)));
        assert_eq!(map.get(&Key::new(1_400, 0, 0)), Some(&Value::new(2, 2, 2)));
    }

    #[test]
    fn suits_only_the_sizes_it_neither_outgrows_nor_dwarfs() {
        let map = Map::with_capacity_and_hasher(1_000, Default::default());
        assert!(map.suits(1_000));
        assert!(map.suits(600));
        assert!(!map.suits(1_001), "would grow");
        assert!(!map.suits(100), "ten times too big");
    }

    #[test]
    fn presized_maps_do_not_grow() {
        let mut map = Map::with_capacity_and_hasher(1_000, Default::default());
        let capacity = map.capacity();
        for i in 0..1_000u64 {
            map.insert_new(Key::new(i, 0, 0), Value::new(0, 0, 0));
        }
        assert_eq!(map.capacity(), capacity);
        assert_eq!(map.get(&Key::new(0, 0, 0)), Some(&Value::new(0, 0, 0)));
    }
}
