//! The consistent-hash ring that gives every account one Playhead node.
//!
//! A deployment routes each account to one node (DESIGN.md decision 12): devices reach it
//! over HTTP through HAProxy (`deploy/haproxy.cfg`), edge gateways over the binary protocol
//! through [`super::ClusterClient`]. Both paths must pick the *same* node for an account,
//! or a TV's heartbeats sent by a gateway would land on one node while the phone's resume
//! read, through HAProxy, asks another that has not seen them. So this ring is not a ring
//! of our own design: it computes HAProxy 2.6's `hash-type consistent sdbm avalanche` over
//! the key that `balance hash http_auth_bearer,jwt_payload_query('$.account_id','int')`
//! hashes, point for point. `tests/cluster.rs` checks it against a running HAProxy.
//!
//! The mapping, as HAProxy 2.6 builds it (`lb_chash.c`, `backend.c`):
//! - **Points** (ketama-style virtual nodes): a server with id `id` and weight `w` owns
//!   `16 × w` points, point `j` at `full_hash(id × 4096 + j)` on a 32-bit circle.
//!   `full_hash` is a bijection of `u32` (Bob Jenkins' full-avalanche integer hash, then a
//!   multiplication by an odd constant), so distinct `(id, j)` never collide while
//!   `id × 4096 + j` fits 32 bits (ids below 2²⁰).
//! - **Key**: the claim as JSON's exact integer becomes a signed 64-bit sample, cast to 8
//!   big-endian bytes; hashed by sdbm, then `full_hash` (the avalanche modifier).
//! - **Lookup**: of the nearest point at or after the key (wrapping) and the nearest point
//!   before it, the closer one wins, a tie going to the one before. A server marked down
//!   has no points, so its keys go to whichever live points are now nearest — the rest do
//!   not move.
//!
//! What follows from HAProxy's side: `account_id` claims above 2⁵³ − 1 (past JSON's exact
//! integers) make `jwt_payload_query(…,'int')` fail, and HAProxy then balances that
//! account round-robin; this ring still hashes them, so keep account ids below 2⁵³.
//! Server ids and weights must be the same here and in the HAProxy config, and HAProxy
//! must not change weights on its own (`slowstart`, `hash-balance-factor`, agent checks).
//!
//! Cost: one 8-byte sdbm, one `full_hash` and a binary search over the points (4 096 per
//! node at the default weight, 12 288 for three nodes: 14 steps) — ~50 ns a record.

/// Points per unit of weight (HAProxy's `BE_WEIGHT_SCALE`).
const POINTS_PER_WEIGHT: u32 = 16;
/// Point index space of one server id (HAProxy's `SRV_EWGHT_RANGE`: 256 × 16).
const POINT_RANGE_PER_ID: u32 = 4096;
/// Largest server weight HAProxy accepts.
pub const MAX_WEIGHT: u32 = 256;
/// The weight `deploy/haproxy.cfg` gives every server: the most points HAProxy allows
/// (4 096 per server), for the smoothest split.
pub const DEFAULT_WEIGHT: u32 = MAX_WEIGHT;
/// Largest server id whose points do not overflow 32 bits.
pub const MAX_ID: u32 = u32::MAX / POINT_RANGE_PER_ID;
/// Largest account id HAProxy's `jwt_payload_query(…,'int')` reads (JSON's exact
/// integers, 2⁵³ − 1); past it HAProxy balances the account round-robin.
pub const MAX_HAPROXY_ACCOUNT_ID: u64 = (1 << 53) - 1;

/// One node as the ring knows it: HAProxy's `id` and `weight` of its server line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingNode {
    pub id: u32,
    pub weight: u32,
}

/// A node list the ring cannot be built from.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RingError {
    #[error("a ring needs at least one node")]
    Empty,
    #[error("node id {0} is outside 1..={MAX_ID}")]
    Id(u32),
    #[error("node id {0} appears twice (HAProxy server ids are unique)")]
    DuplicateId(u32),
    #[error("node weight {0} is outside 1..={MAX_WEIGHT}")]
    Weight(u32),
}

/// The ring: every node's points, sorted. Immutable once built; which nodes are up is
/// the caller's, passed to each lookup.
#[derive(Clone, Debug)]
pub struct Ring {
    /// `(point, index of its node in the list the ring was built from)`, by point.
    points: Vec<(u32, u32)>,
    nodes: usize,
}

impl Ring {
    /// Builds the ring of `nodes`; a lookup answers indexes into this slice.
    pub fn new(nodes: &[RingNode]) -> Result<Self, RingError> {
        if nodes.is_empty() {
            return Err(RingError::Empty);
        }
        let mut points = Vec::new();
        for (index, node) in nodes.iter().enumerate() {
            if node.id == 0 || node.id > MAX_ID {
                return Err(RingError::Id(node.id));
            }
            if node.weight == 0 || node.weight > MAX_WEIGHT {
                return Err(RingError::Weight(node.weight));
            }
            if nodes[..index].iter().any(|n| n.id == node.id) {
                return Err(RingError::DuplicateId(node.id));
            }
            let base = node.id * POINT_RANGE_PER_ID;
            for j in 0..node.weight * POINTS_PER_WEIGHT {
                points.push((full_hash(base + j), index as u32));
            }
        }
        points.sort_unstable();
        // full_hash is a bijection and every (id, j) is distinct: no two points coincide,
        // so the order HAProxy's tree gives equal keys never matters.
        debug_assert!(points.windows(2).all(|w| w[0].0 < w[1].0));
        Ok(Self {
            points,
            nodes: nodes.len(),
        })
    }

    /// Nodes the ring was built from.
    pub fn len(&self) -> usize {
        self.nodes
    }

    /// Always false: a ring has at least one node.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The node of `account_id` among those for which `up(index)` holds; `None` when none
    /// does.
    pub fn node_of(&self, account_id: u64, up: impl Fn(usize) -> bool) -> Option<usize> {
        self.node_of_hash(account_hash(account_id), up)
    }

    /// The node of a key hash (see [`account_hash`]).
    pub fn node_of_hash(&self, hash: u32, up: impl Fn(usize) -> bool) -> Option<usize> {
        let live = |&(_, node): &(u32, u32)| up(node as usize);
        let at = self.points.partition_point(|&(point, _)| point < hash);
        // The first live point at or after the hash, wrapping; then the last one before.
        let (before, after) = self.points.split_at(at);
        let next = *after.iter().chain(before).find(|p| live(p))?;
        let prev = *before
            .iter()
            .rev()
            .chain(after.iter().rev())
            .find(|p| live(p))?;
        if next.1 == prev.1 {
            return Some(next.1 as usize);
        }
        let to_prev = hash.wrapping_sub(prev.0);
        let to_next = next.0.wrapping_sub(hash);
        Some(if to_prev <= to_next { prev.1 } else { next.1 } as usize)
    }
}

/// The 32-bit hash HAProxy computes for an account: its claim as an 8-byte big-endian
/// integer, sdbm, then the avalanche (`full_hash`).
pub fn account_hash(account_id: u64) -> u32 {
    full_hash(sdbm(&account_id.to_be_bytes()))
}

/// The sdbm string hash (`hash = c + (hash << 6) + (hash << 16) - hash` per byte).
fn sdbm(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0u32, |hash, &c| {
        u32::from(c)
            .wrapping_add(hash << 6)
            .wrapping_add(hash << 16)
            .wrapping_sub(hash)
    })
}

/// Bob Jenkins' 6-shift full-avalanche integer hash, times 3 221 225 473 (odd, ≈ ¾ of
/// 2³²), as HAProxy spreads its tree. Every step is invertible, so this is a bijection.
fn full_hash(mut a: u32) -> u32 {
    a = a.wrapping_add(0x7ed5_5d16).wrapping_add(a << 12);
    a = (a ^ 0xc761_c23c) ^ (a >> 19);
    a = a.wrapping_add(0x1656_67b1).wrapping_add(a << 5);
    a = a.wrapping_add(0xd3a2_646c) ^ (a << 9);
    a = a.wrapping_add(0xfd70_46c5).wrapping_add(a << 3);
    a = (a ^ 0xb55a_4f09) ^ (a >> 16);
    a.wrapping_mul(3_221_225_473)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(ids: &[u32]) -> Vec<RingNode> {
        ids.iter()
            .map(|&id| RingNode {
                id,
                weight: DEFAULT_WEIGHT,
            })
            .collect()
    }

    fn all(_: usize) -> bool {
        true
    }

    /// Accounts per node of `ring` for accounts `1..=accounts`.
    fn spread(ring: &Ring, accounts: u64, up: impl Fn(usize) -> bool + Copy) -> Vec<u64> {
        let mut counts = vec![0u64; ring.len()];
        for account in 1..=accounts {
            counts[ring.node_of(account, up).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn bad_node_lists_are_refused_with_their_reason() {
        assert_eq!(Ring::new(&[]).unwrap_err(), RingError::Empty);
        let node = |id, weight| RingNode { id, weight };
        assert_eq!(Ring::new(&[node(0, 1)]).unwrap_err(), RingError::Id(0));
        assert_eq!(
            Ring::new(&[node(MAX_ID + 1, 1)]).unwrap_err(),
            RingError::Id(MAX_ID + 1)
        );
        assert_eq!(Ring::new(&[node(1, 0)]).unwrap_err(), RingError::Weight(0));
        assert_eq!(
            Ring::new(&[node(1, 257)]).unwrap_err(),
            RingError::Weight(257)
        );
        assert_eq!(
            Ring::new(&[node(1, 1), node(1, 2)]).unwrap_err(),
            RingError::DuplicateId(1)
        );
        let ring = Ring::new(&[node(MAX_ID, MAX_WEIGHT), node(1, 1)]).unwrap();
        assert_eq!(ring.points.len(), 4096 + 16);
    }

    #[test]
    fn the_hashes_are_haproxys() {
        // Values worked by hand from the definitions (sdbm of the 8 big-endian bytes of 1
        // is 1: seven zero bytes, then the byte 1), so a change of either function shows.
        assert_eq!(sdbm(&1u64.to_be_bytes()), 1);
        assert_eq!(sdbm(b"ab"), 97u32.wrapping_mul(65_599).wrapping_add(98));
        assert_eq!(account_hash(1), full_hash(1));
        // full_hash is a bijection: no two of a range of inputs collide.
        let mut seen: Vec<u32> = (0..200_000u32).map(full_hash).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 200_000);
    }

    #[test]
    fn accounts_spread_evenly_over_the_nodes() {
        for ids in [&[1, 2, 3][..], &[1, 2, 3, 4, 5, 6, 7, 8]] {
            let ring = Ring::new(&nodes(ids)).unwrap();
            let accounts = 200_000;
            let fair = accounts as f64 / ids.len() as f64;
            for (node, &count) in spread(&ring, accounts, all).iter().enumerate() {
                let off = (count as f64 - fair).abs() / fair;
                // Measured within 2 % at 256 × 16 points a node (±12 % at weight 1).
                assert!(off < 0.05, "node {node}: {count} accounts, fair {fair}");
            }
        }
    }

    #[test]
    fn a_node_that_goes_down_moves_only_its_own_accounts() {
        let ring = Ring::new(&nodes(&[1, 2, 3, 4])).unwrap();
        let accounts = 100_000u64;
        let down = 2usize;
        let mut moved = 0;
        let mut to = [0u64; 4];
        for account in 1..=accounts {
            let before = ring.node_of(account, all).unwrap();
            let after = ring.node_of(account, |n| n != down).unwrap();
            assert_ne!(after, down);
            if before == down {
                moved += 1;
                to[after] += 1;
            } else {
                assert_eq!(before, after, "account {account} moved off a live node");
            }
        }
        // Its accounts go to all the others, not to one neighbour.
        let fair = moved as f64 / 3.0;
        for node in [0, 1, 3] {
            assert!((to[node] as f64 - fair).abs() / fair < 0.25, "{to:?}");
        }
    }

    #[test]
    fn adding_a_node_moves_about_its_share_and_only_onto_it() {
        let three = Ring::new(&nodes(&[1, 2, 3])).unwrap();
        let four = Ring::new(&nodes(&[1, 2, 3, 4])).unwrap();
        let accounts = 100_000u64;
        let mut moved = 0u64;
        for account in 1..=accounts {
            let before = three.node_of(account, all).unwrap();
            let after = four.node_of(account, all).unwrap();
            if before != after {
                assert_eq!(after, 3, "account {account} moved between old nodes");
                moved += 1;
            }
        }
        // A quarter should move; map-based hashing would move three quarters.
        let share = moved as f64 / accounts as f64;
        assert!((0.20..0.30).contains(&share), "{share}");
        // Removing it again is the same as a four-node ring with node 4 down.
        for account in 1..=accounts {
            assert_eq!(
                three.node_of(account, all),
                four.node_of(account, |n| n != 3)
            );
        }
    }

    #[test]
    fn with_every_node_down_there_is_no_node() {
        let ring = Ring::new(&nodes(&[1, 2])).unwrap();
        assert_eq!(ring.node_of(7, |_| false), None);
        assert_eq!(ring.node_of(7, |n| n == 1), Some(1));
        let one = Ring::new(&nodes(&[5])).unwrap();
        assert!((0..1000).all(|a| one.node_of(a, all) == Some(0)));
    }

    #[test]
    fn the_closer_point_wins_and_a_tie_goes_before() {
        // Two nodes, a key exactly between two of their points, and keys on the points.
        let ring = Ring::new(&nodes(&[1, 2])).unwrap();
        let i = ring
            .points
            .windows(2)
            .position(|w| w[0].1 != w[1].1 && (w[1].0 - w[0].0) % 2 == 0)
            .unwrap();
        let (a, b) = (ring.points[i], ring.points[i + 1]);
        let mid = a.0 + (b.0 - a.0) / 2;
        assert_eq!(
            ring.node_of_hash(mid, all),
            Some(a.1 as usize),
            "tie: before"
        );
        assert_eq!(ring.node_of_hash(mid + 1, all), Some(b.1 as usize));
        assert_eq!(ring.node_of_hash(a.0, all), Some(a.1 as usize));
        assert_eq!(ring.node_of_hash(b.0, all), Some(b.1 as usize));
        // Past the last point the circle wraps to the first.
        let last = *ring.points.last().unwrap();
        let first = ring.points[0];
        let beyond = last.0.wrapping_add(1);
        let expect = if beyond.wrapping_sub(last.0) <= first.0.wrapping_sub(beyond) {
            last.1
        } else {
            first.1
        };
        assert_eq!(ring.node_of_hash(beyond, all), Some(expect as usize));
    }
}
