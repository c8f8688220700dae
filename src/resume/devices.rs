//! The device-name registry: which device reported a position, by name, for the answers'
//! `last_device_id`.

use std::collections::{HashMap, VecDeque};

use parking_lot::Mutex;

use crate::model::Value;
use crate::resume::catalog::title_id_of;

/// Device names seen in heartbeats, so a resume answer can say "watched on tv-living-room".
/// Inside, a device is a `u32` (hash of its name); this maps it back, per account, for the
/// `max_device_names` most recently first-seen devices (in memory only: after a restart a
/// name reappears with its device's next heartbeat).
pub struct DeviceNames {
    shards: Vec<Mutex<DeviceShard>>,
    per_shard: usize,
}

#[derive(Default)]
struct DeviceShard {
    names: HashMap<(u64, u32), Box<str>>,
    order: VecDeque<(u64, u32)>,
}

impl DeviceNames {
    const SHARDS: usize = 16;

    pub fn new(capacity: usize) -> Self {
        Self {
            shards: (0..Self::SHARDS).map(|_| Mutex::default()).collect(),
            per_shard: capacity.div_ceil(Self::SHARDS).max(1),
        }
    }

    /// The compact id of a device name: never 0 (no device) nor the tombstone's device.
    pub fn id_of(name: &str) -> u32 {
        let id = title_id_of(name) as u32;
        id.clamp(1, Value::TOMBSTONE_DEVICE - 1)
    }

    /// Returns the compact id of `name`, remembering the name for `account_id`.
    pub fn remember(&self, account_id: u64, name: &str) -> u32 {
        let id = Self::id_of(name);
        let key = (account_id, id);
        let mut shard = self.shards[Self::shard(key)].lock();
        if !shard.names.contains_key(&key) {
            if shard.order.len() >= self.per_shard {
                if let Some(old) = shard.order.pop_front() {
                    shard.names.remove(&old);
                }
            }
            shard.names.insert(key, name.into());
            shard.order.push_back(key);
        }
        id
    }

    pub fn name(&self, account_id: u64, device_id: u32) -> Option<String> {
        let key = (account_id, device_id);
        self.shards[Self::shard(key)]
            .lock()
            .names
            .get(&key)
            .map(|n| n.to_string())
    }

    fn shard(key: (u64, u32)) -> usize {
        ((key.0 ^ u64::from(key.1)).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 60) as usize
            % Self::SHARDS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_are_remembered_per_account_oldest_forgotten_first() {
        let devices = DeviceNames::new(16);
        let tv = devices.remember(1, "tv-living-room");
        assert_eq!(tv, DeviceNames::id_of("tv-living-room"));
        assert_eq!(devices.name(1, tv).as_deref(), Some("tv-living-room"));
        assert_eq!(devices.name(2, tv), None, "names are per account");
        for id in ["", "a", "tv-living-room"] {
            let id = DeviceNames::id_of(id);
            assert!(id != 0 && id != Value::TOMBSTONE_DEVICE);
        }
        // One shard holds capacity / 16 = 1 name: the next first-seen name in it evicts it.
        let (account, first) = (3, "phone-0");
        let first_id = devices.remember(account, first);
        let shard = DeviceNames::shard((account, first_id));
        let other = (1..)
            .map(|i| format!("phone-{i}"))
            .find(|n| DeviceNames::shard((account, DeviceNames::id_of(n))) == shard)
            .unwrap();
        devices.remember(account, &other);
        assert_eq!(devices.name(account, first_id), None);
        assert_eq!(
            devices.name(account, DeviceNames::id_of(&other)).as_deref(),
            Some(other.as_str())
        );
    }
}
