//! `GET /api/v1/continue-watching` for profiles with many more titles than the list shows:
//! the answer must equal what sorting *all* of the profile's titles by recency gives —
//! titles in the store and titles only in memory, completed films, deleted titles, older
//! episodes of a series and the episode after a finished one — whichever part of the
//! profile happens to be in memory or in the store.
//!
//! Real sockets and the real engine and fjall store ([`common::TestServer`]), with a
//! generated catalog large enough for profiles of hundreds of titles.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};

use common::TestServer;
use playhead::model::{Key, Record, Value};
use playhead::resume::catalog::{title_id_of, Catalog};

const MOVIES: usize = 700;
const SERIES: usize = 40;
const EPISODES: usize = 8;
const DURATION_S: u32 = 1_000;
/// Below 95 % of the duration: in progress; at or above: completed.
const IN_PROGRESS_MAX_S: u32 = 940;
const COMPLETED_MIN_S: u32 = 950;

fn movie(i: usize) -> String {
    format!("film-{i:04}")
}

fn episode(s: usize, e: usize) -> String {
    format!("show{s:02}-e{e:02}")
}

/// Writes a catalog of [`MOVIES`] films and [`SERIES`] series of [`EPISODES`] episodes.
fn write_catalog(dir: &Path) -> PathBuf {
    let mut text = String::new();
    for i in 0..MOVIES {
        let id = movie(i);
        text.push_str(&format!(
            "[[title]]\nid = \"{id}\"\nduration_seconds = {DURATION_S}\nstream_url = \"https://cdn.example.com/{id}.m3u8\"\n\n"
        ));
    }
    for s in 0..SERIES {
        for e in 0..EPISODES {
            let id = episode(s, e);
            text.push_str(&format!(
                "[[title]]\nid = \"{id}\"\nduration_seconds = {DURATION_S}\nstream_url = \"https://cdn.example.com/{id}.m3u8\"\nseries = \"show{s:02}\"\nepisode = {}\n\n",
                e + 1
            ));
        }
    }
    let path = dir.join("catalog.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn all_ids() -> Vec<String> {
    let mut ids: Vec<String> = (0..MOVIES).map(movie).collect();
    for s in 0..SERIES {
        ids.extend((0..EPISODES).map(|e| episode(s, e)));
    }
    ids
}

/// What the profile's writes leave per title: the newest value by last-write-wins.
#[derive(Default)]
struct Model {
    newest: HashMap<u64, Value>,
}

impl Model {
    fn apply(&mut self, title_id: u64, value: Value) {
        let e = self.newest.entry(title_id).or_insert(value);
        if value.supersedes(e) {
            *e = value;
        }
    }

    /// The continue-watching list computed from every title at once: sorted newest first
    /// (ties by title id), one entry per series, completed films left out, a completed
    /// episode replaced by the next one at its own saved position.
    fn expected(&self, catalog: &Catalog, limit: usize) -> Vec<(String, u32, u64)> {
        let mut rows: Vec<(u64, Value)> = self
            .newest
            .iter()
            .filter(|(_, v)| !v.is_tombstone())
            .map(|(t, v)| (*t, *v))
            .collect();
        rows.sort_by_key(|(t, v)| (std::cmp::Reverse(v.version()), *t));
        let completed = |v: &Value| v.position_seconds >= COMPLETED_MIN_S;
        let mut seen = HashSet::new();
        let mut items = Vec::new();
        for (t, v) in rows {
            let Some(title) = catalog.by_title_id(t) else {
                continue;
            };
            if let Some((series, _)) = &title.series {
                if !seen.insert(series.clone()) {
                    continue;
                }
            }
            if completed(&v) {
                let Some(next) = catalog.next_episode(title) else {
                    continue;
                };
                let saved = self
                    .newest
                    .get(&next.title_id)
                    .filter(|n| !n.is_tombstone() && !completed(n))
                    .map_or(0, |n| n.position_seconds);
                items.push((next.id.clone(), saved, v.updated_at_ms));
            } else {
                items.push((title.id.clone(), v.position_seconds, v.updated_at_ms));
            }
            if items.len() == limit {
                break;
            }
        }
        items
    }
}

async fn continue_watching(s: &TestServer, token: &str) -> (Vec<(String, u32, u64)>, String) {
    let r = s
        .request("GET", "/api/v1/continue-watching", Some(token), None)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let body = r.json();
    let items = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["movie_id"].as_str().unwrap().to_string(),
                i["resume_position_seconds"].as_u64().unwrap() as u32,
                i["updated_at_ms"].as_u64().unwrap(),
            )
        })
        .collect();
    (items, body["source"].as_str().unwrap().to_string())
}

/// Writes `records` and flushes them to the store, a few at a time: a profile keeps only
/// so many titles in memory at once (`coalescer.max_titles_per_profile`).
async fn store_all(s: &TestServer, records: &[Record]) {
    for chunk in records.chunks(40) {
        s.engine.write(chunk).await.unwrap();
        s.engine.flush().await.unwrap();
    }
    assert_eq!(s.engine.keys_in_memory(), 0, "all in the store");
}

fn position(rng: &mut impl Rng) -> u32 {
    if rng.random_bool(0.5) {
        rng.random_range(COMPLETED_MIN_S..DURATION_S)
    } else {
        rng.random_range(1..IN_PROGRESS_MAX_S)
    }
}

/// Random profiles of ~600 titles in the store and up to 50 more writes in memory (new
/// titles, newer and older values of stored titles, deletes), timestamps interleaved, so
/// the most recent titles are spread over title-id order and over memory and store.
#[tokio::test]
async fn the_list_equals_a_full_sort_of_every_title_in_memory_and_store() {
    let catalog_dir = tempfile::tempdir().unwrap();
    let catalog_path = write_catalog(catalog_dir.path());
    let s = TestServer::start_with(|c| c.api.catalog_path = catalog_path.clone()).await;
    let catalog = Catalog::load(&catalog_path).unwrap();
    let limit = s.config.api.continue_watching_limit;
    let ids = all_ids();
    let base = playhead::model::now_ms() - 3_600_000;
    for seed in 0..4u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (account, profile) = (1_000 + seed, 1 + seed % 2);
        let key = |id: &str| Key::new(account, profile, title_id_of(id));
        let mut model = Model::default();
        // In the store: most titles, about one in ten of them deleted afterwards.
        let stored: Vec<&String> = ids.iter().filter(|_| rng.random_bool(0.6)).collect();
        let mut batch = Vec::new();
        for id in &stored {
            let v = Value::new(position(&mut rng), base + rng.random_range(0..1_000_000), 1);
            batch.push(Record::new(key(id), v));
            model.apply(title_id_of(id), v);
        }
        let deleted: Vec<&String> = stored
            .iter()
            .copied()
            .filter(|_| rng.random_bool(0.1))
            .collect();
        for id in deleted {
            let v = Value::tombstone(base + rng.random_range(0..1_000_000));
            batch.push(Record::new(key(id), v));
            model.apply(title_id_of(id), v);
        }
        store_all(&s, &batch).await;
        assert_eq!(s.engine.keys_in_memory(), 0, "all in the store");
        // In memory only: titles the store never saw, newer and late (older) values of
        // stored titles, deletes; each written on its own, as heartbeats arrive.
        for _ in 0..50 {
            let id = &ids[rng.random_range(0..ids.len())];
            let at = base + rng.random_range(0..1_000_000);
            let v = if rng.random_bool(0.1) {
                Value::tombstone(at)
            } else {
                Value::new(position(&mut rng), at, 2)
            };
            s.engine.write(&[Record::new(key(id), v)]).await.unwrap();
            model.apply(title_id_of(id), v);
        }
        let token = s.token(account, profile);
        let (items, source) = continue_watching(&s, &token).await;
        let want = model.expected(&catalog, limit);
        assert_eq!(want.len(), limit, "seed {seed}: the profile fills the list");
        assert_eq!(items, want, "seed {seed}");
        assert_eq!(source, "store");
    }
    s.stop().await;
}

/// The most recent rows are all completed films or deleted titles — hundreds more than the
/// list is long — and the titles still in progress come after them: the list must reach
/// past them, however many there are.
#[tokio::test]
async fn in_progress_titles_behind_many_finished_ones_are_found() {
    let catalog_dir = tempfile::tempdir().unwrap();
    let catalog_path = write_catalog(catalog_dir.path());
    let s = TestServer::start_with(|c| c.api.catalog_path = catalog_path.clone()).await;
    let catalog = Catalog::load(&catalog_path).unwrap();
    let limit = s.config.api.continue_watching_limit;
    let (account, profile) = (2_000, 3);
    let key = |id: &str| Key::new(account, profile, title_id_of(id));
    let base = playhead::model::now_ms() - 3_600_000;
    let mut model = Model::default();
    let mut batch = Vec::new();
    for i in 0..MOVIES {
        // Films 0..600 newest (completed or deleted); 600.. older and in progress.
        let at = base + 10_000 + (MOVIES - i) as u64 * 10;
        let v = match i {
            ..600 if i % 3 == 0 => Value::tombstone(at),
            ..600 => Value::new(COMPLETED_MIN_S + 10, at, 1),
            _ => Value::new(100 + i as u32 % 500, at - 100_000, 1),
        };
        batch.push(Record::new(key(&movie(i)), v));
        model.apply(title_id_of(&movie(i)), v);
    }
    // Series: each one's newest episode completed, the next one saved long ago; five of
    // them among the finished films, the rest older than everything.
    for sr in 0..SERIES {
        let at = if sr < 5 { base + 5_000 } else { base - 200_000 } + sr as u64;
        let watched = Value::new(COMPLETED_MIN_S, at, 1);
        let next = Value::new(300 + sr as u32, base - 300_000 + sr as u64, 1);
        for (id, v) in [(episode(sr, 2), watched), (episode(sr, 3), next)] {
            batch.push(Record::new(key(&id), v));
            model.apply(title_id_of(&id), v);
        }
    }
    store_all(&s, &batch).await;
    // And a few in memory: two in-progress films among the newest, one late heartbeat
    // older than a stored delete (it must stay deleted).
    let newest = base + 20_000;
    for (id, v) in [
        (movie(1), Value::new(42, newest, 2)),
        (movie(650), Value::new(43, newest + 1, 2)),
        (movie(3), Value::new(44, base, 2)),
    ] {
        s.engine.write(&[Record::new(key(&id), v)]).await.unwrap();
        model.apply(title_id_of(&id), v);
    }
    let (items, source) = continue_watching(&s, &s.token(account, profile)).await;
    let want = model.expected(&catalog, limit);
    assert_eq!(want.len(), limit);
    assert_eq!(items, want);
    assert_eq!(source, "store");
    s.stop().await;
}
