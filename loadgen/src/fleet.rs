//! The `fleet` simulation: viewers in households, each sending a heartbeat every
//! `--heartbeat-secs` of playback, with pauses, seeks, device switches, and some profiles
//! watched on two devices at once.
//!
//! Viewers are spread over ticks of [`TICK`]: viewer `v` reports in tick `v % ticks_per_beat`
//! of every heartbeat period, so the load is smooth (viewers/heartbeat_secs per second).

use std::collections::HashMap;
use std::time::Duration;

use playhead::model::Value;
use playhead::protocol::WireRecord;

/// A value's place in the last-write-wins order: (timestamp, device, position).
type Version = (u64, u32, u32);
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::workload::{Expected, LoadTitle};

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
}

/// The viewers of one connection.
pub struct Fleet {
    viewers: Vec<Viewer>,
    /// Viewer indices per tick slot.
    slots: Vec<Vec<u32>>,
    rng: SmallRng,
    step_seconds: u32,
    titles_len: u32,
    max_positions: Vec<u32>,
    /// Newest acknowledged value per key: (timestamp, device, position), the server's
    /// last-write-wins order.
    newest: HashMap<(u64, u64, u32), Version>,
    /// Newest version per key that was sent but never acknowledged (BUSY, or no reply):
    /// the server may show it, so such a key is verifiable only if a newer one was acked.
    unknown: HashMap<(u64, u64, u32), Version>,
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
        let mut list: Vec<Viewer> = Vec::new();
        let mut slots = vec![Vec::new(); ticks_per_beat];
        for v in 0..viewers {
            let household = v / per_household;
            if household % connections != connection {
                continue;
            }
            let twin = v % TWIN_EVERY == TWIN_EVERY - 1 && !list.is_empty();
            let viewer = if twin {
                let partner = *list.last().expect("checked");
                Viewer {
                    device_id: rng.random_range(1..1 << 30),
                    ..partner
                }
            } else {
                let title = rng.random_range(0..titles.len() as u32);
                Viewer {
                    account_id: account_base + household,
                    profile_id: v % per_household,
                    title,
                    position_seconds: rng
                        .random_range(0..titles[title as usize].max_position.max(1)),
                    device_id: rng.random_range(1..1 << 30),
                    paused_beats: 0,
                }
            };
            slots[v as usize % ticks_per_beat].push(list.len() as u32);
            list.push(viewer);
        }
        Self {
            viewers: list,
            slots,
            rng,
            step_seconds: heartbeat.as_secs().max(1) as u32,
            titles_len: titles.len() as u32,
            max_positions: titles.iter().map(|t| t.max_position.max(1)).collect(),
            newest: HashMap::new(),
            unknown: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.viewers.len()
    }

    /// Advances the viewers due in `tick` and emits their heartbeats stamped `now_ms`.
    pub fn due(
        &mut self,
        tick: u64,
        now_ms: u64,
        titles: &[LoadTitle],
        mut emit: impl FnMut(WireRecord),
    ) {
        let slot = (tick % self.slots.len() as u64) as usize;
        for i in 0..self.slots[slot].len() {
            let index = self.slots[slot][i] as usize;
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
                // Finished (for our purposes): start another title.
                v.title = self.rng.random_range(0..self.titles_len);
                v.position_seconds = 0;
            }
            emit(WireRecord {
                account_id: v.account_id,
                profile_id: v.profile_id,
                title_id: titles[v.title as usize].title_id,
                position_seconds: v.position_seconds,
                device_id: v.device_id,
                timestamp_ms: now_ms,
            });
        }
    }

    /// Records that the server acknowledged `record` (with the title's index).
    pub fn acknowledged(&mut self, record: &WireRecord, title: u32) {
        keep_newest(&mut self.newest, record, title);
    }

    /// Records that `record` was sent but not acknowledged.
    pub fn unacknowledged(&mut self, record: &WireRecord, title: u32) {
        keep_newest(&mut self.unknown, record, title);
    }

    /// The keys whose newest acknowledged value the server must show, and how many keys
    /// cannot be checked (a newer unacknowledged heartbeat may have landed).
    pub fn expected(&self) -> (Vec<Expected>, u64) {
        let mut unverifiable = 0;
        let mut expected = Vec::with_capacity(self.newest.len());
        for (&key, &version) in &self.newest {
            if self.unknown.get(&key).is_some_and(|u| *u > version) {
                unverifiable += 1;
                continue;
            }
            expected.push(Expected {
                account_id: key.0,
                profile_id: key.1,
                title: key.2,
                position_seconds: version.2,
            });
        }
        (expected, unverifiable)
    }
}

/// Keeps the newer of `record` and what `versions` holds for its key, by the server's own
/// last-write-wins order ([`Value::version`]).
fn keep_newest(versions: &mut HashMap<(u64, u64, u32), Version>, record: &WireRecord, title: u32) {
    let version = Value::new(
        record.position_seconds,
        record.timestamp_ms,
        record.device_id,
    )
    .version();
    let entry = versions
        .entry((record.account_id, record.profile_id, title))
        .or_insert(version);
    if version > *entry {
        *entry = version;
    }
}
