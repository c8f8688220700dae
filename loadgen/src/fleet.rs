//! The `fleet` simulation: viewers in households, each sending a heartbeat every
//! `--heartbeat-secs` of playback, with pauses, seeks, device switches, and some profiles
//! watched on two devices at once.
//!
//! Viewers are spread over ticks of [`TICK`]: viewer `v` reports in tick `v % ticks_per_beat`
//! of every heartbeat period, so the load is smooth (viewers/heartbeat_secs per second).
//!
//! Cost: the generator must cost far less than the server at millions of heartbeats per
//! second, so the viewers of one tick are stored contiguously (a tick walks one slice of
//! memory), and `--verify` bookkeeping lives in the viewer itself (the newest acknowledged
//! and unacknowledged version of its current key) instead of a hash map updated on every
//! acknowledgement. Only a viewer that changed title while a heartbeat of its old title
//! was in flight leaves an entry in a side list. Keys shared by two viewers (twins) and
//! by a viewer coming back to a title are merged once, at the end.

use std::time::Duration;

use playhead::ingest::binary::codec::WireRecord;
use playhead::model::Value;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::report::Window;
use crate::workload::{Expected, LoadTitle};

/// A value's place in the last-write-wins order: (timestamp, device, position).
type Version = (u64, u32, u32);
/// No version yet (every real version is greater).
const NONE: Version = (0, 0, 0);

pub const TICK: Duration = Duration::from_millis(10);

/// Chance per heartbeat that a playing viewer pauses (for 1–15 heartbeats), seeks, or
/// switches device.
const PAUSE: f64 = 0.01;
const SEEK: f64 = 0.02;
const SWITCH_DEVICE: f64 = 0.005;
/// One viewer in ten shares its profile (and title) with the viewer before it: two
/// devices on one profile at once, racing on the same key.
const TWIN_EVERY: u64 = 10;

#[derive(Clone, Copy)]
struct Viewer {
    account_id: u64,
    profile_id: u64,
    title: u32,
    position_seconds: u32,
    device_id: u32,
    paused_beats: u16,
    /// Newest version of the current key the server acknowledged.
    acked: Version,
    /// Newest version of the current key sent but never acknowledged (BUSY, or no reply):
    /// the server may show it, so the key is verifiable only if a newer one was acked.
    unknown: Version,
}

/// One heartbeat sent: who sent it, for which title, and what.
#[derive(Clone, Copy, Debug)]
pub struct Sent {
    viewer: u32,
    /// Index into the titles.
    pub title: u32,
    pub record: WireRecord,
}

/// The viewers of one connection.
pub struct Fleet {
    /// Grouped by tick slot: slot `s` owns `viewers[slots[s]..slots[s + 1]]`.
    viewers: Vec<Viewer>,
    slots: Vec<usize>,
    rng: SmallRng,
    step_seconds: u32,
    titles_len: u32,
    max_positions: Vec<u32>,
    /// Versions of keys a viewer had left (changed title) when their answer came:
    /// (key, version, acknowledged).
    retired: Vec<((u64, u64, u32), Version, bool)>,
}

impl Fleet {
    /// [`Fleet::new`] with the command line's fleet shape (`--viewers`,
    /// `--profiles-per-household`, `--heartbeat-secs`, `--account-base`).
    pub fn for_connection(
        args: &crate::Args,
        connection: u64,
        connections: u64,
        titles: &[LoadTitle],
    ) -> Self {
        Self::new(
            connection,
            connections,
            args.viewers,
            args.profiles_per_household,
            Duration::from_secs_f64(args.heartbeat_secs),
            args.account_base,
            titles,
        )
    }

    /// The viewers of households `h` with `h % connections == connection`.
    pub fn new(
        connection: u64,
        connections: u64,
        viewers: u64,
        profiles_per_household: u64,
        heartbeat: Duration,
        account_base: u64,
        titles: &[LoadTitle],
    ) -> Self {
        let mut rng = SmallRng::seed_from_u64(0x5eed ^ connection);
        let per_household = profiles_per_household.max(1);
        let ticks_per_beat = (heartbeat.as_millis() / TICK.as_millis()).max(1) as usize;
        let mut by_slot: Vec<Vec<Viewer>> = vec![Vec::new(); ticks_per_beat];
        let mut last: Option<Viewer> = None;
        for v in 0..viewers {
            let household = v / per_household;
            if household % connections != connection {
                continue;
            }
            let viewer = match last {
                Some(partner) if v % TWIN_EVERY == TWIN_EVERY - 1 => Viewer {
                    device_id: rng.random_range(1..1 << 30),
                    ..partner
                },
                _ => {
                    let title = rng.random_range(0..titles.len() as u32);
                    Viewer {
                        account_id: account_base + household,
                        profile_id: v % per_household,
                        title,
                        position_seconds: rng
                            .random_range(0..titles[title as usize].max_position.max(1)),
                        device_id: rng.random_range(1..1 << 30),
                        paused_beats: 0,
                        acked: NONE,
                        unknown: NONE,
                    }
                }
            };
            by_slot[v as usize % ticks_per_beat].push(viewer);
            last = Some(viewer);
        }
        let mut slots = Vec::with_capacity(ticks_per_beat + 1);
        let mut list = Vec::with_capacity(by_slot.iter().map(Vec::len).sum());
        for slot in by_slot {
            slots.push(list.len());
            list.extend(slot);
        }
        slots.push(list.len());
        Self {
            viewers: list,
            slots,
            rng,
            step_seconds: heartbeat.as_secs().max(1) as u32,
            titles_len: titles.len() as u32,
            max_positions: titles.iter().map(|t| t.max_position.max(1)).collect(),
            retired: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.viewers.len()
    }

    fn slot_range(&self, tick: u64) -> std::ops::Range<usize> {
        let slot = (tick % (self.slots.len() - 1) as u64) as usize;
        self.slots[slot]..self.slots[slot + 1]
    }

    /// Heartbeats due in `tick` (viewers not paused), without advancing anyone: what a
    /// generator that fell behind owes for a tick it never reached.
    fn due_count(&self, tick: u64) -> u64 {
        self.viewers[self.slot_range(tick)]
            .iter()
            .filter(|v| v.paused_beats == 0)
            .count() as u64
    }

    /// Heartbeats due in the measured window from `tick` on: what a generator that fell
    /// behind its schedule never sent.
    pub fn owed_from(&self, mut tick: u64, window: Window) -> u64 {
        let mut owed = 0;
        loop {
            let intended = window.start + TICK * tick as u32;
            if intended >= window.end {
                return owed;
            }
            if window.measuring(intended) {
                owed += self.due_count(tick);
            }
            tick += 1;
        }
    }

    /// Advances the viewers due in `tick` and emits their heartbeats stamped `now_ms`.
    pub fn due(
        &mut self,
        tick: u64,
        now_ms: u64,
        titles: &[LoadTitle],
        mut emit: impl FnMut(Sent),
    ) {
        for index in self.slot_range(tick) {
            let v = &mut self.viewers[index];
            if v.paused_beats > 0 {
                v.paused_beats -= 1;
                continue;
            }
            let roll: f64 = self.rng.random();
            if roll < PAUSE {
                v.paused_beats = self.rng.random_range(1..16);
            } else if roll < PAUSE + SEEK {
                v.position_seconds = self
                    .rng
                    .random_range(0..self.max_positions[v.title as usize]);
            } else if roll < PAUSE + SEEK + SWITCH_DEVICE {
                v.device_id = self.rng.random_range(1..1 << 30);
            }
            v.position_seconds += self.step_seconds;
            if v.position_seconds >= self.max_positions[v.title as usize] {
                // Finished (for our purposes): start another title. What was known of the
                // old key is kept for verification.
                let old = (v.account_id, v.profile_id, v.title);
                if v.acked != NONE || v.unknown != NONE {
                    self.retired.push((old, v.acked, true));
                    self.retired.push((old, v.unknown, false));
                }
                (v.acked, v.unknown) = (NONE, NONE);
                v.title = self.rng.random_range(0..self.titles_len);
                v.position_seconds = 0;
            }
            emit(Sent {
                viewer: index as u32,
                title: v.title,
                record: WireRecord {
                    account_id: v.account_id,
                    profile_id: v.profile_id,
                    title_id: titles[v.title as usize].title_id,
                    position_seconds: v.position_seconds,
                    device_id: v.device_id,
                    timestamp_ms: now_ms,
                },
            });
        }
    }

    /// Records that the server acknowledged `sent`.
    pub fn acknowledged(&mut self, sent: &Sent) {
        self.answered(sent, true);
    }

    /// Records that `sent` was sent but not acknowledged.
    pub fn unacknowledged(&mut self, sent: &Sent) {
        self.answered(sent, false);
    }

    fn answered(&mut self, sent: &Sent, acked: bool) {
        let r = &sent.record;
        let version = Value::new(r.position_seconds, r.timestamp_ms, r.device_id).version();
        let v = &mut self.viewers[sent.viewer as usize];
        if v.title != sent.title {
            // The viewer moved on (or came back to this title since: merged at the end).
            self.retired
                .push(((r.account_id, r.profile_id, sent.title), version, acked));
            return;
        }
        let slot = if acked { &mut v.acked } else { &mut v.unknown };
        *slot = (*slot).max(version);
    }

    /// The keys whose newest acknowledged value the server must show, and how many keys
    /// cannot be checked (a newer unacknowledged heartbeat may have landed).
    pub fn expected(&self) -> (Vec<Expected>, u64) {
        // (key, newest acknowledged, newest unacknowledged), merged per key.
        let mut all: Vec<((u64, u64, u32), Version, Version)> = self
            .viewers
            .iter()
            .filter(|v| v.acked != NONE || v.unknown != NONE)
            .map(|v| ((v.account_id, v.profile_id, v.title), v.acked, v.unknown))
            .collect();
        all.extend(self.retired.iter().map(|&(key, version, acked)| {
            if acked {
                (key, version, NONE)
            } else {
                (key, NONE, version)
            }
        }));
        all.sort_unstable_by_key(|e| e.0);
        let mut expected = Vec::new();
        let mut unverifiable = 0;
        for group in all.chunk_by(|a, b| a.0 == b.0) {
            let acked = group.iter().map(|e| e.1).max().unwrap_or(NONE);
            let unknown = group.iter().map(|e| e.2).max().unwrap_or(NONE);
            if acked == NONE {
                continue;
            }
            if unknown > acked {
                unverifiable += 1;
                continue;
            }
            let key = group[0].0;
            expected.push(Expected {
                account_id: key.0,
                profile_id: key.1,
                title: key.2,
                position_seconds: acked.2,
            });
        }
        (expected, unverifiable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn titles() -> Vec<LoadTitle> {
        (0..3)
            .map(|i| LoadTitle {
                movie_id: format!("t{i}"),
                title_id: 100 + i,
                max_position: 40,
            })
            .collect()
    }

    /// Over many heartbeat periods (title changes included), the bookkeeping expects for
    /// every key exactly the newest acknowledged position, computed here the slow way.
    #[test]
    fn expected_is_the_newest_acknowledged_version_per_key() {
        use std::collections::HashMap;
        let titles = titles();
        let mut fleet = Fleet::new(0, 1, 200, 2, Duration::from_millis(40), 1, &titles);
        let mut newest: HashMap<(u64, u64, u32), Version> = HashMap::new();
        let mut unknown: HashMap<(u64, u64, u32), Version> = HashMap::new();
        let mut in_flight: Vec<Sent> = Vec::new();
        for tick in 0..400u64 {
            fleet.due(tick, 1_000 + tick, &titles, |s| in_flight.push(s));
            // Answer the older half now: acknowledgements lag behind, some are refused.
            let answered: Vec<Sent> = in_flight.drain(..in_flight.len() / 2).collect();
            for (i, s) in answered.iter().enumerate() {
                let r = &s.record;
                let version = Value::new(r.position_seconds, r.timestamp_ms, r.device_id).version();
                let key = (r.account_id, r.profile_id, s.title);
                if i % 7 == 0 {
                    fleet.unacknowledged(s);
                    let e = unknown.entry(key).or_insert(version);
                    *e = (*e).max(version);
                } else {
                    fleet.acknowledged(s);
                    let e = newest.entry(key).or_insert(version);
                    *e = (*e).max(version);
                }
            }
        }
        let (expected, unverifiable) = fleet.expected();
        let mut want: Vec<(u64, u64, u32, u32)> = newest
            .iter()
            .filter(|(k, v)| unknown.get(*k).is_none_or(|u| u <= *v))
            .map(|(k, v)| (k.0, k.1, k.2, v.2))
            .collect();
        want.sort_unstable();
        let mut got: Vec<(u64, u64, u32, u32)> = expected
            .iter()
            .map(|e| (e.account_id, e.profile_id, e.title, e.position_seconds))
            .collect();
        got.sort_unstable();
        assert!(!want.is_empty());
        assert_eq!(got, want);
        let want_unverifiable = newest
            .iter()
            .filter(|(k, v)| unknown.get(*k).is_some_and(|u| u > *v))
            .count() as u64;
        assert_eq!(unverifiable, want_unverifiable);
    }
}
