//! `KeyMap`: the coalescer's per-shard table, an open-addressing hash map from [`Key`] to
//! [`Held`] (the newest value and its flush state) built for exactly what the coalescer
//! does — look up, update in place, insert, remove the keys a flush has stored, scan.
//!
//! Why not hashbrown: an entry is 44 bytes, and hashbrown's power-of-two growth runs
//! between 44 % and 87.5 % full, i.e. 50–100 bytes per key (86 measured at 1 M keys for
//! 40-byte entries); a lookup also touches two cache lines (control bytes, then the entry).
//! Here:
//! - entries live inline in one array, found by linear probing from a home slot known from
//!   the hash alone (see below), so a lookup reads a few consecutive cache lines, which
//!   batch upserts prefetch before they take the lock ([`Location`]);
//! - capacity is any size, grown by 1.25× at 85 % full, so the table runs between 68 % and
//!   85 % full: 52–65 bytes per key, plus one occupancy bit per slot;
//! - a slot is 44 bytes, not 48: it is packed to 4-byte alignment (the 24-byte key, the
//!   16-byte value and a 4-byte [`Meta`]), which x86 reads unaligned at no measurable cost.
//!
//! Removal is backward-shift deletion, so linear probing still needs no tombstones: a probe
//! stops at the first free slot.
//!
//! **A profile's titles live together.** A key's home slot is chosen by its profile
//! `(account_id, profile_id)` plus a small offset from its title, below
//! [`PROFILE_WINDOW`]: so every title of a profile lies between its profile's base slot and
//! the first free slot at least `PROFILE_WINDOW` slots after it, and
//! [`KeyMap::for_each_in_profile`] finds them all by reading that stretch — about
//! `PROFILE_WINDOW` plus one probe's worth of slots (~90 slots, ~4 KB at 85 % full) —
//! instead of the whole table. For the usual profile (a title or a few in memory) the homes
//! are as spread as a hash of the whole key would make them. A profile with many titles in
//! memory crowds its window, and its surplus forms a run that every key near it must probe
//! through: the coalescer bounds that ([`KeyMap::crowded`]).

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
/// 2.9–4.4 slots of 44 bytes. Between 68 % and 85 % full a linear probe runs 2–4 slots for
/// a key it finds and 5–23 for one it does not, so one line was not enough. `max` on the
/// server (1 M keys, 15 s runs alternated, BENCHMARKS.md, 40-byte slots then): one line
/// 7.9–8.2 M heartbeats/s, two 9.1–10.4 M, three 10.3–10.8 M, four 9.7–10.9 M.
const PREFETCH_LINES: usize = 3;
/// Slots over which one profile's titles have their homes (a power of two). Wide enough
/// that a profile's few titles hardly ever share a home, narrow enough that listing a
/// profile reads a few KB.
pub const PROFILE_WINDOW: usize = 64;
const WINDOW_MASK: u64 = PROFILE_WINDOW as u64 - 1;
/// A probe longer than this ends in a run far longer than chance makes at 85 % load (the
/// mean probe for an absent key is ~23 slots there): [`KeyMap::crowded`].
pub const CROWDED_PROBE: usize = 2 * PROFILE_WINDOW;

/// A key's flush state, 4 bytes: the flush epoch in which its value was written, and
/// whether the store still lacks that value (dirty). See [`crate::engine::coalescer`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Meta(u32);

impl Meta {
    const DIRTY: u32 = 1 << 31;
    /// Epochs are below this (31 bits: 68 years of one-second flush cycles).
    pub const MAX_EPOCH: u32 = Self::DIRTY - 1;

    /// Written in `epoch`, not yet in the store.
    pub const fn dirty(epoch: u32) -> Self {
        assert!(epoch <= Self::MAX_EPOCH, "epoch out of range");
        Self(epoch | Self::DIRTY)
    }

    /// Written in `epoch`, and the store holds it.
    pub const fn clean(epoch: u32) -> Self {
        assert!(epoch <= Self::MAX_EPOCH, "epoch out of range");
        Self(epoch)
    }

    pub const fn epoch(self) -> u32 {
        self.0 & !Self::DIRTY
    }

    pub const fn is_dirty(self) -> bool {
        self.0 & Self::DIRTY != 0
    }
}

/// What the map holds for a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    pub value: Value,
    pub meta: Meta,
}

impl Held {
    pub const fn new(value: Value, meta: Meta) -> Self {
        Self { value, meta }
    }
}

/// One slot, packed to 44 bytes (see the module documentation). Fields of a packed struct
/// are only ever copied out, never borrowed (a reference could be misaligned).
#[derive(Clone, Copy)]
#[repr(C, packed(4))]
struct Slot {
    key: Key,
    value: Value,
    meta: Meta,
}

impl Slot {
    #[inline]
    fn key(&self) -> Key {
        self.key
    }

    #[inline]
    fn held(&self) -> Held {
        Held::new(self.value, self.meta)
    }
}

const _: () = assert!(std::mem::size_of::<Slot>() == 44);

const EMPTY: Slot = Slot {
    key: Key::new(0, 0, 0),
    value: Value::new(0, 0, 0),
    meta: Meta(0),
};

/// An open-addressing map from [`Key`] to [`Held`] (see the module documentation).
#[derive(Clone)]
pub struct KeyMap<S> {
    slots: Vec<Slot>,
    /// One bit per slot: occupied.
    used: Vec<u64>,
    len: usize,
    /// Bumped by every reallocation, which moves every entry: a scan done in pieces
    /// ([`KeyMap::for_each_in`]) must start again when it changes.
    generation: u64,
    hasher: S,
}

impl<S: BuildHasher + Clone> KeyMap<S> {
    pub fn with_hasher(hasher: S) -> Self {
        Self {
            slots: Vec::new(),
            used: Vec::new(),
            len: 0,
            generation: 0,
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

    /// Changes whenever the table is reallocated (grown or shrunk). Between two reads of
    /// the same generation, entries move only by [`KeyMap::remove`].
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Bytes the table has allocated.
    pub fn allocated_bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<Slot>() + self.used.capacity() * 8
    }

    pub fn hasher(&self) -> &S {
        &self.hasher
    }

    /// The hash every lookup of `key` starts from ([`placement_hash`]); the `*_hashed`
    /// methods take it precomputed so a caller can prefetch first (see [`Location`]).
    #[inline]
    pub fn hash(&self, key: &Key) -> u64 {
        placement_hash(&self.hasher, key)
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
            if self.slots[i].key() == *key {
                return (i, true);
            }
            i += 1;
            if i == cap {
                i = 0;
            }
        }
    }

    /// Where the arrays are now; changes when the map grows or shrinks.
    pub fn location(&self) -> Location {
        Location {
            slots: self.slots.as_ptr() as usize,
            used: self.used.as_ptr() as usize,
            capacity: self.slots.len(),
        }
    }

    pub fn get(&self, key: &Key) -> Option<Held> {
        self.get_hashed(self.hash(key), key)
    }

    /// [`KeyMap::get`] with `hash` = [`KeyMap::hash`]`(key)`.
    #[inline]
    pub fn get_hashed(&self, hash: u64, key: &Key) -> Option<Held> {
        if self.len == 0 {
            return None;
        }
        match self.probe(hash, key) {
            (i, true) => Some(self.slots[i].held()),
            _ => None,
        }
    }

    pub fn contains_key(&self, key: &Key) -> bool {
        self.get(key).is_some()
    }

    /// `key`'s entry to update, or the free slot where `key` goes: one probe for a lookup
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
            (i, true) => Entry::Occupied(Occupied {
                slot: &mut self.slots[i],
            }),
            (i, false) => Entry::Vacant(Vacant {
                map: self,
                hash,
                index: Some(i),
            }),
        }
    }

    /// Inserts `key`, which must not be present (checked in debug builds).
    pub fn insert_new(&mut self, key: Key, held: Held) {
        self.insert_new_hashed(self.hash(&key), key, held);
    }

    /// [`KeyMap::insert_new`] with `hash` = [`KeyMap::hash`]`(&key)`. Returns whether the
    /// map grew, i.e. its [`Location`] changed.
    #[inline]
    pub fn insert_new_hashed(&mut self, hash: u64, key: Key, held: Held) -> bool {
        let grow = self.must_grow();
        if grow {
            let grown = (self.slots.len() * GROW_NUM / GROW_DEN).max(MIN_CAPACITY);
            self.resize(grown.max(slots_for(self.len + 1)));
        }
        self.place(hash, Slot::new(key, held));
        grow
    }

    /// Removes `key` and returns what it held. Backward-shift deletion: the entries after
    /// the hole that may live there (their probe from home passes it) move back, so every
    /// probe still ends at its key or at the first free slot. O(length of the cluster).
    pub fn remove(&mut self, key: &Key) -> Option<Held> {
        self.remove_if(key, |_| true)
    }

    /// Removes `key` if it is present and `keep` says no to what it holds: one probe.
    pub fn remove_unless(&mut self, key: &Key, keep: impl FnOnce(Held) -> bool) -> bool {
        self.remove_if(key, |held| !keep(held)).is_some()
    }

    /// [`KeyMap::remove`] of an entry `take` agrees to, found by the same probe.
    fn remove_if(&mut self, key: &Key, take: impl FnOnce(Held) -> bool) -> Option<Held> {
        if self.len == 0 {
            return None;
        }
        let (mut hole, found) = self.probe(self.hash(key), key);
        if !found {
            return None;
        }
        let removed = self.slots[hole].held();
        if !take(removed) {
            return None;
        }
        let cap = self.slots.len();
        let mut j = hole;
        loop {
            j = if j + 1 == cap { 0 } else { j + 1 };
            if !self.is_used(j) {
                break;
            }
            let h = home(self.hash(&self.slots[j].key()), cap);
            // May the entry at `j` live at `hole`: is `hole` cyclically within [h, j)?
            let movable = if hole <= j {
                h <= hole || h > j
            } else {
                h <= hole && h > j
            };
            if movable {
                self.slots[hole] = self.slots[j];
                hole = j;
            }
        }
        self.used[hole / 64] &= !(1 << (hole % 64));
        self.len -= 1;
        Some(removed)
    }

    /// Reallocates a map that has become mostly empty (under a quarter full) to fit what it
    /// holds, so a shard's table follows its load down as well as up. Returns whether it
    /// moved ([`Location`] changed).
    pub fn shrink_if_sparse(&mut self) -> bool {
        if self.slots.len() <= MIN_CAPACITY || self.len * 4 >= self.slots.len() {
            return false;
        }
        let target = slots_for(self.len) * GROW_NUM / GROW_DEN;
        if target >= self.slots.len() {
            return false;
        }
        self.resize(target);
        true
    }

    /// Whether one more key would take the map past its maximum load.
    #[inline]
    fn must_grow(&self) -> bool {
        (self.len + 1) * MAX_LOAD_DEN > self.slots.len() * MAX_LOAD_NUM
    }

    /// Puts `slot` in the free slot its probe ends at; its key must be absent and the table
    /// must have room.
    fn place(&mut self, hash: u64, slot: Slot) {
        let (i, found) = self.probe(hash, &slot.key());
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

    /// Calls `f` with every key of the profile `(account_id, profile_id)` and what it
    /// holds. Reads from the profile's base slot to the first free slot at least
    /// [`PROFILE_WINDOW`] slots on (see the module documentation): every title of the
    /// profile has its home in that window and lies, with every slot between, in one run
    /// from its home, which the free slot ends. Returns the slots it read.
    pub fn for_each_in_profile(
        &self,
        account_id: u64,
        profile_id: u64,
        mut f: impl FnMut(Key, Held),
    ) -> usize {
        let cap = self.slots.len();
        if self.len == 0 {
            return 0;
        }
        let mut i = base(self.hash(&Key::new(account_id, profile_id, 0)), cap);
        for step in 0..cap {
            if self.is_used(i) {
                let slot = &self.slots[i];
                let key = slot.key();
                if key.account_id == account_id && key.profile_id == profile_id {
                    f(key, slot.held());
                }
            } else if step >= PROFILE_WINDOW {
                return step + 1;
            }
            i += 1;
            if i == cap {
                i = 0;
            }
        }
        cap
    }

    /// Whether the profile holds at least `n` keys; stops reading once it has seen `n`.
    pub fn profile_holds_at_least(&self, account_id: u64, profile_id: u64, n: usize) -> bool {
        if n == 0 {
            return true;
        }
        let cap = self.slots.len();
        if self.len < n {
            return false;
        }
        let (mut i, mut seen) = (
            base(self.hash(&Key::new(account_id, profile_id, 0)), cap),
            0,
        );
        for step in 0..cap {
            if self.is_used(i) {
                let key = self.slots[i].key();
                if key.account_id == account_id && key.profile_id == profile_id {
                    seen += 1;
                    if seen == n {
                        return true;
                    }
                }
            } else if step >= PROFILE_WINDOW {
                return false;
            }
            i += 1;
            if i == cap {
                i = 0;
            }
        }
        false
    }

    /// Slots a lookup of `key` reads from its home: 1 when it is at home (or would go
    /// there). For tests and measurements of probe lengths.
    pub fn probe_slots(&self, key: &Key) -> usize {
        if self.slots.is_empty() {
            return 0;
        }
        let cap = self.slots.len();
        let hash = self.hash(key);
        let (i, _) = self.probe(hash, key);
        (i + cap - home(hash, cap)) % cap + 1
    }

    /// Every (key, held) pair, in table order.
    pub fn iter(&self) -> impl Iterator<Item = (Key, Held)> + '_ {
        self.used_slots()
            .map(|i| (self.slots[i].key(), self.slots[i].held()))
    }

    /// Calls `f` with every key and what it holds, in table order: a scan of the occupancy
    /// words, one bit-scan per occupied slot, for passes over millions of keys.
    #[inline]
    pub fn for_each(&self, mut f: impl FnMut(Key, Held)) {
        for (w, &word) in self.used.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let i = w * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let slot = &self.slots[i];
                f(slot.key(), slot.held());
            }
        }
    }

    /// [`KeyMap::for_each`] over the slots `slots.start..slots.end` only (clipped to the
    /// capacity; both ends rounded down to a multiple of 64). Successive ranges that cover
    /// `0..capacity()` at one [`KeyMap::generation`], with no removal between them, see
    /// every entry that was present throughout, exactly once.
    #[inline]
    pub fn for_each_in(&self, slots: std::ops::Range<usize>, mut f: impl FnMut(Key, Held)) {
        let words = self.used.len();
        let (from, to) = ((slots.start / 64).min(words), (slots.end / 64).min(words));
        let to = if slots.end >= self.slots.len() {
            words
        } else {
            to
        };
        for (w, &word) in self.used[from..to].iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let i = (from + w) * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let slot = &self.slots[i];
                f(slot.key(), slot.held());
            }
        }
    }

    fn used_slots(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.slots.len()).filter(|&i| self.is_used(i))
    }

    fn resize(&mut self, slots: usize) {
        let mut table = Vec::with_capacity(slots);
        advise_huge_pages(&table);
        table.resize(slots, EMPTY);
        let old_slots = std::mem::replace(&mut self.slots, table);
        let old_used = std::mem::replace(&mut self.used, vec![0; slots.div_ceil(64)]);
        self.len = 0;
        self.generation += 1;
        for (i, slot) in old_slots.iter().enumerate() {
            if old_used[i / 64] & (1 << (i % 64)) != 0 {
                self.place(self.hash(&slot.key()), *slot);
            }
        }
    }
}

/// Asks the kernel to back a large table with 2 MiB pages (transparent huge pages, which
/// Linux grants on `madvise` by default), before its pages are first touched. At 30 M keys
/// the tables hold 1.3 GB probed at random: with 4 KiB pages nearly every probe also misses
/// the TLB and walks the page tables, a second memory access the prefetch cannot always
/// hide. Advice only: where the kernel declines, the table works the same on small pages.
fn advise_huge_pages<T>(table: &Vec<T>) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = table.as_ptr() as usize;
        let end = start + table.capacity() * std::mem::size_of::<T>();
        let (from, to) = (start.next_multiple_of(HUGE), end / HUGE * HUGE);
        if to > from {
            // SAFETY: the range lies inside `table`'s own allocation; MADV_HUGEPAGE changes
            // how the kernel backs those pages, never their contents or mapping.
            unsafe { libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = table;
}

impl Slot {
    const fn new(key: Key, held: Held) -> Self {
        Self {
            key,
            value: held.value,
            meta: held.meta,
        }
    }
}

/// What [`KeyMap::entry_hashed`] found.
pub enum Entry<'a, S> {
    Occupied(Occupied<'a>),
    Vacant(Vacant<'a, S>),
}

/// A present key's slot.
pub struct Occupied<'a> {
    slot: &'a mut Slot,
}

impl Occupied<'_> {
    #[inline]
    pub fn get(&self) -> Held {
        self.slot.held()
    }

    #[inline]
    pub fn set(&mut self, held: Held) {
        self.slot.value = held.value;
        self.slot.meta = held.meta;
    }
}

/// The free slot a probe for an absent key ended at.
pub struct Vacant<'a, S> {
    map: &'a mut KeyMap<S>,
    hash: u64,
    /// `None` when the map has no slots yet.
    index: Option<usize>,
}

impl<S: BuildHasher + Clone> Vacant<'_, S> {
    /// Whether the probe for this absent key ran longer than [`CROWDED_PROBE`] slots: it
    /// would land at the end of an unusually long run. Free to ask (the probe is done).
    #[inline]
    pub fn crowded(&self) -> bool {
        self.index.is_some_and(|i| {
            let cap = self.map.slots.len();
            (i + cap - home(self.hash, cap)) % cap > CROWDED_PROBE
        })
    }

    /// The map the probe ran in (to look around it before inserting).
    pub fn map(&self) -> &KeyMap<S> {
        self.map
    }

    /// Inserts the key the probe was for (a different key breaks the map). Returns whether
    /// the map grew, i.e. its [`Location`] changed: then the key goes where a new probe
    /// in the grown table ends.
    #[inline]
    pub fn insert(self, key: Key, held: Held) -> bool {
        debug_assert_eq!(self.hash, self.map.hash(&key), "not the probed key");
        let map = self.map;
        match self.index {
            Some(i) if !map.must_grow() => {
                map.fill(i, Slot::new(key, held));
                false
            }
            _ => map.insert_new_hashed(self.hash, key, held),
        }
    }
}

/// The hash that places `key`: its profile's hash in the high bits (where [`base`] looks),
/// and in the low `log2(PROFILE_WINDOW)` bits an offset mixed from the title and the
/// profile's hash (so which titles share an offset is not predictable without the seed).
#[inline]
pub fn placement_hash<S: BuildHasher>(hasher: &S, key: &Key) -> u64 {
    let profile = hasher.hash_one((key.account_id, key.profile_id));
    let offset = (key.title_id ^ profile).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58;
    const _: () = assert!(PROFILE_WINDOW == 1 << (64 - 58));
    (profile & !WINDOW_MASK) | offset
}

/// Where a profile's window starts, in a table of `capacity` slots: fastrange of the
/// profile's part of the hash.
#[inline]
fn base(hash: u64, capacity: usize) -> usize {
    ((u128::from(hash & !WINDOW_MASK) * capacity as u128) >> 64) as usize
}

/// The slot a probe for `hash` starts at, in a table of `capacity` slots: the profile's
/// base plus the title's offset, wrapped.
#[inline]
fn home(hash: u64, capacity: usize) -> usize {
    let i = base(hash, capacity) + (hash & WINDOW_MASK) as usize;
    if i < capacity {
        i
    } else {
        i % capacity
    }
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

    fn held(value: Value) -> Held {
        Held::new(value, Meta::dirty(1))
    }

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
            let value = held(Value::new(step as u32, step, 1));
            match map.entry_hashed(map.hash(&key), &key) {
                Entry::Occupied(mut o) => o.set(value),
                Entry::Vacant(v) => {
                    v.insert(key, value);
                }
            }
            reference.insert(key, value);
            if step % 20_000 == 0 {
                assert_eq!(map.len(), reference.len());
            }
        }
        assert_eq!(map.len(), reference.len());
        for (k, v) in &reference {
            assert_eq!(map.get(k), Some(*v));
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
            let value = held(Value::new(step as u32, step, 1));
            let capacity = map.capacity();
            match map.entry_hashed(map.hash(&key), &key) {
                Entry::Occupied(mut o) => {
                    assert_eq!(reference.get(&key), Some(&o.get()));
                    o.set(value);
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
            assert_eq!(map.get(k), Some(*v));
        }
    }

    /// Inserts and removals in random order, through growth and shrinking, agree with a
    /// `HashMap`: backward-shift deletion leaves every remaining key findable, including
    /// clusters that wrap around the end of the table.
    #[test]
    fn removals_keep_every_other_key_findable() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut map = Map::with_hasher(Default::default());
        let mut reference: HashMap<Key, Held> = HashMap::new();
        for step in 0..300_000u64 {
            // Few distinct keys in a small table: long clusters, wrap-around included.
            let key = Key::new(rng.random_range(0..3_000), 0, 0);
            if rng.random_bool(0.45) {
                assert_eq!(map.remove(&key), reference.remove(&key), "step {step}");
            } else {
                let value = held(Value::new(step as u32, step, 2));
                match map.entry_hashed(map.hash(&key), &key) {
                    Entry::Occupied(mut o) => o.set(value),
                    Entry::Vacant(v) => {
                        v.insert(key, value);
                    }
                }
                reference.insert(key, value);
            }
            if step % 50_000 == 0 {
                map.shrink_if_sparse();
            }
        }
        assert_eq!(map.len(), reference.len());
        for k in (0..3_000).map(|a| Key::new(a, 0, 0)) {
            assert_eq!(map.get(&k), reference.get(&k).copied());
        }
        // Emptied, a map shrinks to almost nothing and still works.
        for k in reference.keys() {
            assert!(map.remove(k).is_some());
        }
        assert!(map.is_empty());
        assert!(map.shrink_if_sparse());
        assert!(map.capacity() <= 2 * MIN_CAPACITY);
        map.insert_new(Key::new(1, 2, 3), held(Value::new(1, 1, 1)));
        assert_eq!(
            map.get(&Key::new(1, 2, 3))
                .map(|h| h.value.position_seconds),
            Some(1)
        );
    }

    #[test]
    fn memory_per_key_stays_near_64_bytes() {
        for keys in [1_000usize, 10_000, 15_625, 100_000] {
            let mut map = Map::with_hasher(Default::default());
            for i in 0..keys as u64 {
                map.insert_new(Key::new(i, i % 3, i * 7), held(Value::new(1, 1, 1)));
            }
            let per_key = map.allocated_bytes() as f64 / keys as f64;
            // 44-byte slots between 68 % and 85 % full.
            assert!(per_key <= 66.0, "{keys} keys: {per_key} bytes/key");
        }
    }

    /// A profile's titles are found from its window alone, whatever the table went through
    /// (growth, removals, shrinking, tiny tables narrower than the window, profiles with
    /// many titles), and the window is a few dozen slots, not the table.
    #[test]
    fn every_title_of_a_profile_is_found_from_its_window() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(17);
        let mut map = Map::with_hasher(Default::default());
        let mut reference: HashMap<Key, Held> = HashMap::new();
        // 3 000 profiles of 1-3 titles, and 4 with up to 300 titles each.
        let key = |rng: &mut rand::rngs::StdRng| {
            if rng.random_bool(0.05) {
                Key::new(7, rng.random_range(0..4), rng.random_range(0..300))
            } else {
                Key::new(
                    rng.random_range(100..1_100),
                    rng.random_range(0..3),
                    rng.random_range(0..3),
                )
            }
        };
        let check = |map: &Map, reference: &HashMap<Key, Held>, profiles: &[(u64, u64)]| {
            let mut by_profile: HashMap<(u64, u64), Vec<(Key, Held)>> = HashMap::new();
            for (k, h) in reference {
                by_profile
                    .entry((k.account_id, k.profile_id))
                    .or_default()
                    .push((*k, *h));
            }
            for &(a, p) in profiles {
                let mut found = Vec::new();
                let read = map.for_each_in_profile(a, p, |k, h| found.push((k, h)));
                found.sort_by_key(|(k, _)| *k);
                let mut want = by_profile.remove(&(a, p)).unwrap_or_default();
                want.sort_by_key(|(k, _)| *k);
                assert_eq!(found, want, "profile {a}/{p} in {} slots", map.capacity());
                assert!(read <= map.capacity());
                for n in [1, want.len(), want.len() + 1] {
                    assert_eq!(map.profile_holds_at_least(a, p, n), want.len() >= n);
                }
            }
        };
        let profiles: Vec<(u64, u64)> = (0..4)
            .map(|p| (7, p))
            .chain((100..1_100).flat_map(|a| (0..3).map(move |p| (a, p))))
            .collect();
        for step in 0..60_000u32 {
            let k = key(&mut rng);
            if rng.random_bool(0.4) {
                assert_eq!(map.remove(&k), reference.remove(&k));
            } else {
                let v = held(Value::new(step, u64::from(step), 1));
                match map.entry_hashed(map.hash(&k), &k) {
                    Entry::Occupied(mut o) => o.set(v),
                    Entry::Vacant(vacant) => {
                        vacant.insert(k, v);
                    }
                }
                reference.insert(k, v);
            }
            if step % 7_919 == 0 {
                map.shrink_if_sparse();
                check(&map, &reference, &profiles);
            }
        }
        check(&map, &reference, &profiles);
        // A tiny table (fewer slots than the window) is read whole.
        let mut tiny = Map::with_hasher(Default::default());
        for t in 0..5 {
            tiny.insert_new(Key::new(1, 1, t), held(Value::new(1, 1, 1)));
        }
        tiny.insert_new(Key::new(2, 1, 0), held(Value::new(1, 1, 1)));
        let mut n = 0;
        assert_eq!(
            tiny.for_each_in_profile(1, 1, |_, _| n += 1),
            tiny.capacity()
        );
        assert_eq!(n, 5);
        // In a table of 200 000 one-title profiles, a profile's window is ~90 slots.
        let mut big = Map::with_hasher(Default::default());
        for a in 0..200_000u64 {
            big.insert_new(Key::new(a, 1, a * 31), held(Value::new(1, 1, 1)));
        }
        let read: usize = (0..1_000u64)
            .map(|a| big.for_each_in_profile(a, 1, |_, _| {}))
            .sum();
        let mean = read as f64 / 1_000.0;
        assert!(
            mean < 200.0 && big.capacity() > 200_000,
            "{mean} slots read on average of {}",
            big.capacity()
        );
    }

    #[test]
    fn meta_keeps_epoch_and_dirtiness_apart() {
        let m = Meta::dirty(Meta::MAX_EPOCH);
        assert!(m.is_dirty());
        assert_eq!(m.epoch(), Meta::MAX_EPOCH);
        let c = Meta::clean(7);
        assert!(!c.is_dirty());
        assert_eq!(c.epoch(), 7);
    }

    #[test]
    fn presized_maps_do_not_grow() {
        let mut map = Map::with_capacity_and_hasher(1_000, Default::default());
        let capacity = map.capacity();
        for i in 0..1_000u64 {
            map.insert_new(Key::new(i, 0, 0), held(Value::new(0, 0, 0)));
        }
        assert_eq!(map.capacity(), capacity);
        assert_eq!(
            map.get(&Key::new(0, 0, 0)).map(|h| h.value),
            Some(Value::new(0, 0, 0))
        );
    }
}
