//! The store conformance suite: one set of cases every [`Store`] must pass.
//!
//! A store plugs in through [`conformance_suite!`], which expands to one `#[tokio::test]` per
//! case. Cases never assume an empty store: each one draws a fresh random account id, so the
//! suite can share one long-lived external store (a Cassandra node) across cases and runs.

use std::sync::Arc;

use playhead::config::Config;
use playhead::engine::Engine;
use playhead::model::{Key, Record, Value};
use playhead::resume::alternative::{self, OfferRule};
use playhead::store::{RecentTitles, Store, StoredRow, TitleEntry};

/// A store under test and what it promises.
pub struct Subject {
    pub store: Arc<dyn Store>,
    /// True when `purge_older_than` removes rows itself; false for stores that expire rows
    /// by a native TTL (the case then only checks that purging never removes recent rows).
    pub purges_rows: bool,
    /// Keeps whatever the store needs alive (a temporary directory, a session).
    pub _guard: Box<dyn std::any::Any + Send + Sync>,
}

/// A realistic "now" for the cases: 2025-10-09, so timestamps survive any store's
/// microsecond conversion and TTL arithmetic.
pub const BASE_MS: u64 = 1_760_000_000_000;

/// A fresh account id no other case or earlier run uses.
pub fn fresh_account() -> u64 {
    rand::random::<u64>() >> 1
}

fn rec(key: Key, position: u32, at_ms: u64, device: u32) -> Record {
    Record::new(key, Value::new(position, at_ms, device))
}

/// Every order of arrival of four versions of one key ends in the newest one, whether each
/// arrives in its own batch or the writes are spread over two keys per batch.
pub async fn lww_every_arrival_order(s: Subject) {
    let account = fresh_account();
    // Ordered oldest → newest: by timestamp, then device on a tie, then position.
    let versions = [
        Value::new(100, BASE_MS, 7),
        Value::new(50, BASE_MS + 1, 1),
        Value::new(40, BASE_MS + 1, 2),
        Value::new(41, BASE_MS + 1, 2),
    ];
    let mut orders = Vec::new();
    permutations(&mut (0..versions.len()).collect::<Vec<_>>(), 0, &mut orders);
    assert_eq!(orders.len(), 24);
    for (n, order) in orders.iter().enumerate() {
        let key = Key::new(account, 1, n as u64);
        for &i in order {
            s.store
                .write_batch(&[Record::new(key, versions[i])])
                .await
                .unwrap();
        }
        assert_eq!(
            s.store.get(key).await.unwrap(),
            Some(versions[3]),
            "arrival order {order:?}"
        );
    }
}

/// Alternatives (docs/architecture.md, "Alternatives"): a row written with one reads back
/// with it, and keeps it through later writes of the winner's device that carry none; a
/// plain row has none; after a deletion nothing from before it is offered, even once a
/// heartbeat follows. (How a store merges a row that carries none with the value it holds
/// differs: exactly in the embedded store, not at all in Cassandra — not asserted here.)
pub async fn alternatives_round_trip(s: Subject) {
    let account = fresh_account();
    let key = Key::new(account, 1, 1);
    let (phone, tv) = (1, 2);
    let at_phone = Value::new(2_843, BASE_MS, phone);
    let row = |value, alternative| StoredRow {
        key,
        value,
        alternative,
    };
    let tv_8 = Value::new(8, BASE_MS + 10_000, tv);
    s.store
        .write_rows(&[row(tv_8, Some(at_phone))])
        .await
        .unwrap();
    assert_eq!(
        s.store.get_row(key).await.unwrap(),
        Some(row(tv_8, Some(at_phone)))
    );
    assert_eq!(s.store.get(key).await.unwrap(), Some(tv_8));
    let tv_12 = Value::new(12, BASE_MS + 14_000, tv);
    s.store.write_rows(&[row(tv_12, None)]).await.unwrap();
    assert_eq!(
        s.store.get_row(key).await.unwrap(),
        Some(row(tv_12, Some(at_phone))),
        "the TV's own heartbeat keeps the phone's position"
    );
    // A plain row, written by `write_batch`, has none.
    let plain = Key::new(account, 1, 2);
    s.store
        .write_batch(&[rec(plain, 5, BASE_MS, tv)])
        .await
        .unwrap();
    let read = s.store.get_row(plain).await.unwrap().unwrap();
    assert_eq!(
        (read.value, read.alternative),
        (Value::new(5, BASE_MS, tv), None)
    );
    // Deleted, then watched again on the TV: the phone's position is not offered.
    s.store.delete(key, BASE_MS + 20_000).await.unwrap();
    let deleted = s.store.get_row(key).await.unwrap().unwrap();
    assert!(deleted.value.is_tombstone());
    assert_eq!(deleted.alternative, None);
    let tv_after = Value::new(30, BASE_MS + 30_000, tv);
    s.store.write_rows(&[row(tv_after, None)]).await.unwrap();
    let after = s.store.get_row(key).await.unwrap().unwrap();
    assert_eq!(after.value, tv_after);
    let rule = OfferRule {
        window_ms: u64::MAX,
        min_distance_seconds: 0,
    };
    assert_eq!(
        alternative::offer(&after.summary(), BASE_MS + 30_000, rule),
        None,
        "{after:?}"
    );
    // A stale row never changes the value, whatever it carries.
    let stale = Value::new(1, BASE_MS + 25_000, phone);
    s.store
        .write_rows(&[row(stale, Some(Value::new(2, BASE_MS + 24_000, tv)))])
        .await
        .unwrap();
    assert_eq!(s.store.get(key).await.unwrap(), Some(tv_after));
}

fn permutations(items: &mut Vec<usize>, k: usize, out: &mut Vec<Vec<usize>>) {
    if k == items.len() {
        out.push(items.clone());
        return;
    }
    for i in k..items.len() {
        items.swap(k, i);
        permutations(items, k + 1, out);
        items.swap(k, i);
    }
}

/// Writing the same version twice changes nothing; an older version after a newer one is
/// ignored even in a batch together with fresh keys.
pub async fn stale_and_duplicate_writes(s: Subject) {
    let account = fresh_account();
    let a = Key::new(account, 1, 1);
    let b = Key::new(account, 1, 2);
    s.store
        .write_batch(&[rec(a, 500, BASE_MS + 10, 1)])
        .await
        .unwrap();
    s.store
        .write_batch(&[rec(a, 500, BASE_MS + 10, 1)])
        .await
        .unwrap();
    s.store
        .write_batch(&[rec(a, 900, BASE_MS + 9, 9), rec(b, 1, BASE_MS, 1)])
        .await
        .unwrap();
    assert_eq!(
        s.store.get(a).await.unwrap(),
        Some(Value::new(500, BASE_MS + 10, 1))
    );
    assert_eq!(
        s.store.get(b).await.unwrap(),
        Some(Value::new(1, BASE_MS, 1))
    );
}

/// A delete hides older values whenever they arrive, and a later heartbeat revives the
/// title. The store returns the tombstone itself so callers can merge it with memory.
pub async fn deletes_versus_late_writes(s: Subject) {
    let account = fresh_account();
    let key = Key::new(account, 3, 42);
    s.store
        .write_batch(&[rec(key, 100, BASE_MS + 100, 1)])
        .await
        .unwrap();
    s.store.delete(key, BASE_MS + 200).await.unwrap();
    // A heartbeat that was in flight before the delete.
    s.store
        .write_batch(&[rec(key, 150, BASE_MS + 150, 1)])
        .await
        .unwrap();
    assert_eq!(
        s.store.get(key).await.unwrap(),
        Some(Value::tombstone(BASE_MS + 200))
    );
    // Same millisecond as the delete: the delete wins the tie.
    s.store
        .write_batch(&[rec(key, 160, BASE_MS + 200, 5)])
        .await
        .unwrap();
    assert_eq!(
        s.store.get(key).await.unwrap(),
        Some(Value::tombstone(BASE_MS + 200))
    );
    // The viewer watches again later.
    s.store
        .write_batch(&[rec(key, 10, BASE_MS + 300, 2)])
        .await
        .unwrap();
    assert_eq!(
        s.store.get(key).await.unwrap(),
        Some(Value::new(10, BASE_MS + 300, 2))
    );

    // A delete that reaches the store before the older heartbeat it must hide.
    let other = Key::new(account, 3, 43);
    s.store.delete(other, BASE_MS + 500).await.unwrap();
    s.store
        .write_batch(&[rec(other, 70, BASE_MS + 400, 1)])
        .await
        .unwrap();
    assert_eq!(
        s.store.get(other).await.unwrap(),
        Some(Value::tombstone(BASE_MS + 500))
    );
    let listed = s.store.recent_titles(account, 3, 10).await.unwrap();
    assert_eq!(listed.total, 2);
    // The delete is the profile's most recent row.
    assert_eq!(
        listed.titles.iter().map(|e| e.title_id).collect::<Vec<_>>(),
        vec![43, 42]
    );
    assert!(listed.titles[0].value.is_tombstone());
}

/// Listing returns exactly one profile's titles, most recent first, with tombstones, the
/// most recent `limit` of them and how many there are, never a neighbour's, including at
/// the edges of the id space.
pub async fn listing_is_one_profile(s: Subject) {
    let account = fresh_account();
    let mut batch = Vec::new();
    for title in [5u64, 1, 9, 3, u64::MAX] {
        batch.push(rec(
            Key::new(account, 7, title),
            title as u32 % 1000,
            BASE_MS + title % 1000,
            1,
        ));
    }
    // Neighbours that a sloppy key layout would mix in.
    batch.push(rec(Key::new(account, 6, 2), 1, BASE_MS, 1));
    batch.push(rec(Key::new(account, 8, 2), 1, BASE_MS, 1));
    batch.push(rec(Key::new(account + 1, 7, 2), 1, BASE_MS, 1));
    batch.push(rec(Key::new(account, u64::MAX, 4), 1, BASE_MS, 1));
    batch.push(rec(Key::new(account + 1, 0, 4), 1, BASE_MS, 1));
    s.store.write_batch(&batch).await.unwrap();
    s.store
        .delete(Key::new(account, 7, 9), BASE_MS + 5000)
        .await
        .unwrap();

    let titles =
        |listed: &RecentTitles| -> Vec<u64> { listed.titles.iter().map(|e| e.title_id).collect() };
    // Timestamps BASE_MS + title % 1000 (u64::MAX % 1000 = 615); title 9 deleted last.
    let listed = s.store.recent_titles(account, 7, 100).await.unwrap();
    assert_eq!(titles(&listed), vec![9, u64::MAX, 5, 3, 1]);
    assert_eq!(listed.total, 5);
    assert!(listed.is_complete());
    assert_eq!(listed.titles[0].value, Value::tombstone(BASE_MS + 5000));
    assert_eq!(listed.titles[4].value, Value::new(1, BASE_MS + 1, 1));

    let limited = s.store.recent_titles(account, 7, 2).await.unwrap();
    assert_eq!(titles(&limited), vec![9, u64::MAX]);
    assert_eq!(limited.total, 5);
    assert!(!limited.is_complete());

    let edge = s.store.recent_titles(account, u64::MAX, 100).await.unwrap();
    assert_eq!(titles(&edge), vec![4]);
    let next = s.store.recent_titles(account + 1, 0, 100).await.unwrap();
    assert_eq!(titles(&next), vec![4]);
    let none = s.store.recent_titles(account, 99, 100).await.unwrap();
    assert_eq!((none.titles.len(), none.total), (0, 0));
}

/// A profile of thousands of titles (more than one page of any store that pages): the
/// listing holds exactly the `limit` most recent — by version, then the lower title id
/// among equal versions — wherever they are in title order, and counts every row.
pub async fn listing_keeps_the_most_recent_of_a_large_profile(s: Subject) {
    use rand::{Rng, SeedableRng};
    let account = fresh_account();
    let mut rng = rand::rngs::StdRng::seed_from_u64(account);
    const TITLES: u64 = 2_500;
    let rows: Vec<Record> = (0..TITLES)
        .map(|_| {
            let title = rng.random::<u64>();
            // A narrow time window: many equal timestamps, some fully equal versions.
            let at = BASE_MS + rng.random_range(0..400);
            let value = if rng.random_bool(0.05) {
                Value::tombstone(at)
            } else {
                Value::new(rng.random_range(0..3), at, rng.random_range(0..2))
            };
            Record::new(Key::new(account, 1, title), value)
        })
        .collect();
    let mut newest: std::collections::HashMap<u64, Value> = Default::default();
    for chunk in rows.chunks(500) {
        let mut distinct: std::collections::HashMap<Key, Value> = Default::default();
        for r in chunk {
            distinct.insert(r.key, r.value);
        }
        let batch: Vec<Record> = distinct.iter().map(|(k, v)| Record::new(*k, *v)).collect();
        s.store.write_batch(&batch).await.unwrap();
        for r in batch {
            let e = newest.entry(r.key.title_id).or_insert(r.value);
            if r.value.supersedes(e) {
                *e = r.value;
            }
        }
    }
    let mut want: Vec<TitleEntry> = newest
        .iter()
        .map(|(&title_id, &value)| TitleEntry { title_id, value })
        .collect();
    want.sort_by_key(|e| std::cmp::Reverse(e.recency()));
    for limit in [1, 37, 1_200, usize::MAX] {
        let listed = s.store.recent_titles(account, 1, limit).await.unwrap();
        assert_eq!(listed.total, want.len(), "limit {limit}");
        assert_eq!(
            listed.titles,
            want[..limit.min(want.len())],
            "limit {limit}"
        );
    }
    let none = s.store.recent_titles(account, 1, 0).await.unwrap();
    assert_eq!((none.titles.len(), none.total), (0, want.len()));
}

/// Missing keys and profiles read as nothing, not as an error.
pub async fn missing_reads_are_empty(s: Subject) {
    let account = fresh_account();
    assert_eq!(s.store.get(Key::new(account, 1, 1)).await.unwrap(), None);
    let listed = s.store.recent_titles(account, 1, 10).await.unwrap();
    assert_eq!(listed, RecentTitles::default());
}

/// Retention removes values and tombstones last updated before the cutoff and nothing
/// newer. Stores with native TTL expiry only have to leave recent rows alone.
pub async fn retention_purges_only_old_rows(s: Subject) {
    let account = fresh_account();
    let old = Key::new(account, 1, 1);
    let old_tombstone = Key::new(account, 1, 2);
    let recent = Key::new(account, 1, 3);
    let cutoff = BASE_MS;
    s.store
        .write_batch(&[
            rec(old, 10, cutoff - 1, 1),
            Record::new(old_tombstone, Value::tombstone(cutoff - 1000)),
            rec(recent, 30, cutoff, 1),
        ])
        .await
        .unwrap();
    let removed = s.store.purge_older_than(cutoff).await.unwrap();
    assert_eq!(
        s.store.get(recent).await.unwrap(),
        Some(Value::new(30, cutoff, 1))
    );
    if s.purges_rows {
        assert!(removed >= 2, "removed {removed}");
        assert_eq!(s.store.get(old).await.unwrap(), None);
        assert_eq!(s.store.get(old_tombstone).await.unwrap(), None);
        let listed = s.store.recent_titles(account, 1, 10).await.unwrap();
        assert_eq!(listed.total, 1);
    }
}

/// Batches of 0, 1 and 50 000 rows; the large one spans many profiles.
pub async fn batch_sizes(s: Subject) {
    let account = fresh_account();
    s.store.write_batch(&[]).await.unwrap();

    let single = Key::new(account, 0, 0);
    s.store
        .write_batch(&[rec(single, 1, BASE_MS, 1)])
        .await
        .unwrap();
    assert_eq!(
        s.store.get(single).await.unwrap(),
        Some(Value::new(1, BASE_MS, 1))
    );

    let large: Vec<Record> = (0..50_000u64)
        .map(|i| {
            rec(
                Key::new(account, 1 + i / 100, i % 100),
                i as u32,
                BASE_MS + i,
                3,
            )
        })
        .collect();
    s.store.write_batch(&large).await.unwrap();
    for i in (0..50_000u64).step_by(997) {
        let key = Key::new(account, 1 + i / 100, i % 100);
        assert_eq!(
            s.store.get(key).await.unwrap(),
            Some(Value::new(i as u32, BASE_MS + i, 3))
        );
    }
    let profile = s.store.recent_titles(account, 250, 1000).await.unwrap();
    assert_eq!((profile.titles.len(), profile.total), (100, 100));
    assert_eq!(
        profile.titles[0].value,
        Value::new(24_999, BASE_MS + 24_999, 3)
    );
}

/// Two writers (two ingest nodes, or a retried batch racing a new one) send versions of the
/// same keys concurrently in opposite orders; the newest version of every key wins.
pub async fn concurrent_writers_converge(s: Subject) {
    let account = fresh_account();
    const KEYS: u64 = 200;
    const ROUNDS: u64 = 20;
    let write = |reverse: bool, parity: u64| {
        let store = Arc::clone(&s.store);
        tokio::spawn(async move {
            let mut rounds: Vec<u64> = (0..ROUNDS).filter(|r| r % 2 == parity).collect();
            if reverse {
                rounds.reverse();
            }
            for round in rounds {
                let batch: Vec<Record> = (0..KEYS)
                    .map(|t| rec(Key::new(account, 1, t), round as u32, BASE_MS + round, 1))
                    .collect();
                store.write_batch(&batch).await.unwrap();
            }
        })
    };
    let (a, b) = (write(false, 0), write(true, 1));
    a.await.unwrap();
    b.await.unwrap();
    for t in 0..KEYS {
        assert_eq!(
            s.store.get(Key::new(account, 1, t)).await.unwrap(),
            Some(Value::new(ROUNDS as u32 - 1, BASE_MS + ROUNDS - 1, 1))
        );
    }
}

/// An engine (one Playhead node: its own commit log and coalescer) on the shared store.
fn node(dir: &std::path::Path, store: Arc<dyn Store>) -> Engine {
    let mut config = Config::default();
    config.server.data_dir = dir.to_path_buf();
    config.coalescer.shards = 4;
    Engine::open(config, store).expect("opening an engine").0
}

/// Two Playhead nodes, each with its own commit log, flush the same keys to one store in
/// the "wrong" order: the node holding the newer value flushes first, the one holding the
/// older value (a slow node, a retried batch) flushes after it. The newest timestamp must
/// win in the store — and on a tie in the millisecond, the larger device — and both nodes
/// must read it.
pub async fn two_engines_flush_in_the_wrong_order(s: Subject) {
    let account = fresh_account();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = node(dir_a.path(), Arc::clone(&s.store));
    let b = node(dir_b.path(), Arc::clone(&s.store));

    let newer_later_ms = Key::new(account, 1, 1);
    let tie_same_ms = Key::new(account, 1, 2);
    let deleted = Key::new(account, 1, 3);
    let newest = [
        (newer_later_ms, Value::new(200, BASE_MS + 2_000, 2)),
        (tie_same_ms, Value::new(5, BASE_MS + 3_000, 9)),
        (deleted, Value::tombstone(BASE_MS + 5_000)),
    ];
    // Node B holds the newest versions, node A older ones of the same keys.
    b.write(&newest.map(|(k, v)| Record::new(k, v)))
        .await
        .unwrap();
    a.write(&[
        rec(newer_later_ms, 100, BASE_MS + 1_000, 1),
        rec(tie_same_ms, 300, BASE_MS + 3_000, 3),
        rec(deleted, 7, BASE_MS + 4_000, 1),
    ])
    .await
    .unwrap();
    assert_eq!(b.flush().await.unwrap().rows, 3);
    assert_eq!(a.flush().await.unwrap().rows, 3);

    for (key, value) in newest {
        assert_eq!(s.store.get(key).await.unwrap(), Some(value), "{key:?}");
        let shown = (!value.is_tombstone()).then_some(value);
        assert_eq!(a.get(key).await.value, shown, "node A reads {key:?}");
        assert_eq!(b.get(key).await.value, shown, "node B reads {key:?}");
    }
    let listed = s.store.recent_titles(account, 1, 10).await.unwrap();
    // Most recent first: the delete, then the tie, then the later heartbeat.
    assert_eq!(
        listed.titles.iter().map(|e| e.value).collect::<Vec<_>>(),
        newest.map(|(_, v)| v).into_iter().rev().collect::<Vec<_>>()
    );
    a.shutdown(None).await;
    b.shutdown(None).await;
}

/// Expands to one test per case, each with a fresh [`Subject`] from `$make` (an async
/// expression returning `Option<Subject>`; `None` skips, after the maker printed why).
/// Attributes after the maker go on every case: `#[ignore = "why"]` for a store that needs
/// an external service, so an unconfigured run reports the cases as ignored rather than ok.
#[macro_export]
macro_rules! conformance_suite {
    ($module:ident, $make:expr $(, #[$attr:meta])*) => {
        mod $module {
            use super::*;
            $crate::conformance_suite!(@cases $make; [$(#[$attr])*];
                lww_every_arrival_order,
                stale_and_duplicate_writes,
                deletes_versus_late_writes,
                listing_is_one_profile,
                listing_keeps_the_most_recent_of_a_large_profile,
                missing_reads_are_empty,
                retention_purges_only_old_rows,
                batch_sizes,
                concurrent_writers_converge,
                two_engines_flush_in_the_wrong_order,
                alternatives_round_trip);
        }
    };
    (@cases $make:expr; $attrs:tt; $($case:ident),*) => {
        $( $crate::conformance_suite!(@case $make; $attrs; $case); )*
    };
    (@case $make:expr; [$($attr:tt)*]; $case:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $($attr)*
        async fn $case() {
            if let Some(subject) = $make.await {
                conformance::$case(subject).await;
            }
        }
    };
}
