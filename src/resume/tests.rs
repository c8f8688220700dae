//! The business rules as plain functions: values and listings in, answers out. The reads
//! they are handed are closures over a map, so nothing here needs a socket or an engine.

use std::collections::HashMap;
use std::sync::Mutex;

use super::*;
use crate::store::TitleEntry;

const RATIO: f64 = 0.95;
const ACCOUNT: u64 = 7;
const PROFILE: u64 = 1;

/// Two films of 1000 s and a series `s` of three 100 s episodes.
fn catalog() -> Catalog {
    let mut text = String::new();
    for film in ["film-a", "film-b"] {
        text += &format!(
            "[[title]]\nid = \"{film}\"\nduration_seconds = 1000\nstream_url = \"u/{film}\"\n"
        );
    }
    for episode in 1..=3 {
        text += &format!(
            "[[title]]\nid = \"s-e{episode}\"\nduration_seconds = 100\nstream_url = \"u/s-e{episode}\"\nseries = \"s\"\nepisode = {episode}\n"
        );
    }
    Catalog::parse(&text).unwrap()
}

fn title<'a>(catalog: &'a Catalog, id: &str) -> &'a Title {
    catalog.get(id).unwrap()
}

/// `position` seconds of `id`, reported at `at` (ms) from device 3.
fn saved(catalog: &Catalog, id: &str, position: u32, at: u64) -> TitleEntry {
    TitleEntry {
        title_id: title(catalog, id).title_id,
        value: Value::new(position, at, 3),
    }
}

/// A read over `entries`: the value of each listed title, nothing for the rest. Counts the
/// reads it answers.
fn reader(entries: &[TitleEntry]) -> (HashMap<u64, Value>, Mutex<Vec<u64>>) {
    let values = entries.iter().map(|e| (e.title_id, e.value)).collect();
    (values, Mutex::new(Vec::new()))
}

fn answer(values: &HashMap<u64, Value>, reads: &Mutex<Vec<u64>>, key: Key) -> ReadResult {
    assert_eq!((key.account_id, key.profile_id), (ACCOUNT, PROFILE));
    reads.lock().unwrap().push(key.title_id);
    ReadResult {
        value: values.get(&key.title_id).copied(),
        source: ReadSource::Memory,
        alternative: None,
    }
}

async fn resume_of<'a>(catalog: &'a Catalog, id: &str, entries: &[TitleEntry]) -> Resume<'a> {
    let (values, reads) = reader(entries);
    let requested = title(catalog, id);
    resume(catalog, RATIO, ACCOUNT, PROFILE, requested, |key| {
        std::future::ready(answer(&values, &reads, key))
    })
    .await
}

#[test]
fn completion_starts_at_the_threshold() {
    let c = catalog();
    let film = title(&c, "film-a");
    assert!(!is_completed(949, film, RATIO));
    assert!(is_completed(950, film, RATIO));
    assert!(
        is_completed(1_060, film, RATIO),
        "past the end (the allowance)"
    );
    assert_eq!(resume_position(None, film, RATIO), 0);
    assert_eq!(
        resume_position(Some(Value::new(949, 1, 1)), film, RATIO),
        949
    );
    assert_eq!(resume_position(Some(Value::new(950, 1, 1)), film, RATIO), 0);
}

#[tokio::test]
async fn a_film_resumes_where_it_stopped_and_at_zero_once_completed() {
    let c = catalog();
    let r = resume_of(&c, "film-a", &[saved(&c, "film-a", 300, 10)]).await;
    assert_eq!((r.title.id.as_str(), r.position_seconds), ("film-a", 300));
    assert!(!r.completed && r.next_episode_of.is_none());
    assert_eq!(r.value, Some(Value::new(300, 10, 3)));

    let r = resume_of(&c, "film-a", &[saved(&c, "film-a", 990, 10)]).await;
    assert_eq!((r.title.id.as_str(), r.position_seconds), ("film-a", 0));
    assert!(r.completed && r.next_episode_of.is_none());

    let r = resume_of(&c, "film-b", &[]).await;
    assert_eq!((r.position_seconds, r.completed, r.value), (0, false, None));
}

#[tokio::test]
async fn a_completed_episode_answers_the_next_one_at_its_own_position() {
    let c = catalog();
    let e1_done = saved(&c, "s-e1", 96, 10);
    let r = resume_of(&c, "s-e1", &[e1_done, saved(&c, "s-e2", 40, 5)]).await;
    assert_eq!((r.title.id.as_str(), r.position_seconds), ("s-e2", 40));
    assert_eq!(r.next_episode_of.map(|t| t.id.as_str()), Some("s-e1"));
    assert!(r.completed);
    assert_eq!(
        r.value,
        Some(Value::new(40, 5, 3)),
        "the next episode's own value"
    );

    // The next episode never started, or completed too: from its beginning.
    let r = resume_of(&c, "s-e1", &[e1_done]).await;
    assert_eq!((r.title.id.as_str(), r.position_seconds), ("s-e2", 0));
    let r = resume_of(&c, "s-e1", &[e1_done, saved(&c, "s-e2", 99, 5)]).await;
    assert_eq!((r.title.id.as_str(), r.position_seconds), ("s-e2", 0));

    // The last episode has no successor: it resumes at 0 itself.
    let r = resume_of(&c, "s-e3", &[saved(&c, "s-e3", 100, 10)]).await;
    assert_eq!((r.title.id.as_str(), r.position_seconds), ("s-e3", 0));
    assert!(r.completed && r.next_episode_of.is_none());
}

fn listing(titles: Vec<TitleEntry>, complete: bool) -> ProfileTitles {
    let mut titles = titles;
    titles.sort_unstable_by_key(|e| std::cmp::Reverse(e.recency()));
    ProfileTitles {
        titles,
        complete,
        source: ReadSource::Store,
    }
}

fn ids<'a>(items: &[(ContinueItem<'a>, ItemPosition)]) -> Vec<(&'a str, ItemPosition)> {
    items
        .iter()
        .map(|(item, position)| (item.shown.id.as_str(), *position))
        .collect()
}

#[test]
fn continue_items_are_newest_first_one_per_series_without_finished_films() {
    let c = catalog();
    let recent = listing(
        vec![
            saved(&c, "film-a", 500, 60),
            saved(&c, "s-e2", 30, 50),
            saved(&c, "s-e1", 20, 40), // an older episode of the same series
            saved(&c, "film-b", 999, 30), // completed: left out
        ],
        true,
    );
    let items = continue_items(&c, RATIO, &recent, 10);
    assert_eq!(
        ids(&items),
        [
            ("film-a", ItemPosition::Known(500)),
            ("s-e2", ItemPosition::Known(30))
        ]
    );
    assert_eq!(items[1].0.watched.series.as_ref().unwrap().0, "s");
    assert_eq!(items[1].0.value, Value::new(30, 50, 3));
    assert_eq!(
        ids(&continue_items(&c, RATIO, &recent, 1)),
        [("film-a", ItemPosition::Known(500))]
    );
}

#[test]
fn a_finished_episode_is_replaced_by_the_next_at_its_known_position() {
    let c = catalog();
    let with_next = |complete| {
        listing(
            vec![saved(&c, "s-e1", 100, 60), saved(&c, "s-e2", 45, 10)],
            complete,
        )
    };
    // The next episode was listed (older than the finished one): its own position.
    let items = continue_items(&c, RATIO, &with_next(true), 10);
    assert_eq!(ids(&items), [("s-e2", ItemPosition::Known(45))]);
    assert_eq!(
        items[0].0.watched.id, "s-e1",
        "dated by the episode watched"
    );
    assert_eq!(items[0].0.value.updated_at_ms, 60);

    let only_e1 = |complete| listing(vec![saved(&c, "s-e1", 100, 60)], complete);
    // Not listed in a complete listing: never watched.
    assert_eq!(
        ids(&continue_items(&c, RATIO, &only_e1(true), 10)),
        [("s-e2", ItemPosition::Known(0))]
    );
    // Not listed in a cut listing: older than the listed part, read on its own.
    assert_eq!(
        ids(&continue_items(&c, RATIO, &only_e1(false), 10)),
        [("s-e2", ItemPosition::ReadNext)]
    );
    // The last episode finished: nothing to offer for the series.
    let last = listing(vec![saved(&c, "s-e3", 100, 60)], true);
    assert!(continue_items(&c, RATIO, &last, 10).is_empty());
}

#[test]
fn titles_missing_from_the_catalog_are_skipped() {
    let c = catalog();
    let gone = TitleEntry {
        title_id: 12_345,
        value: Value::new(1, 99, 1),
    };
    let recent = listing(vec![gone, saved(&c, "film-a", 5, 1)], true);
    assert_eq!(
        ids(&continue_items(&c, RATIO, &recent, 10)),
        [("film-a", ItemPosition::Known(5))]
    );
}

/// The listing grows (8 × limit, then × 4) until the list is full or the profile is
/// exhausted, and a next episode the final listing does not hold is read on its own.
#[tokio::test]
async fn continue_watching_widens_the_listing_until_the_list_is_full() {
    let c = catalog();
    // Newest first: a completed film and 40 titles the catalog no longer lists (neither
    // yields an item), more rows than 8 × 2; then the two items, the second a finished
    // episode whose successor is the oldest row of all.
    let mut all = vec![saved(&c, "film-b", 999, 1_000)];
    for i in 0..40u64 {
        all.push(TitleEntry {
            title_id: 1_000 + i,
            value: Value::new(1, 900 - i, 1),
        });
    }
    all.push(saved(&c, "film-a", 10, 500));
    all.push(saved(&c, "s-e1", 100, 400));
    all.push(saved(&c, "s-e2", 42, 1));
    let full = listing(all, true);
    let counts = Mutex::new(Vec::new());
    let (values, reads) = reader(&full.titles);
    let list = |count: usize| {
        counts.lock().unwrap().push(count);
        let complete = count >= full.titles.len();
        let mut titles = full.titles.clone();
        titles.truncate(count);
        std::future::ready(ProfileTitles {
            titles,
            complete,
            source: ReadSource::Store,
        })
    };
    let read = |key| std::future::ready(answer(&values, &reads, key));
    let (items, source) = continue_watching(&c, RATIO, ACCOUNT, PROFILE, 2, list, read).await;
    let shown: Vec<_> = items
        .iter()
        .map(|i| (i.shown.id.as_str(), i.position_seconds))
        .collect();
    assert_eq!(shown, [("film-a", 10), ("s-e2", 42)]);
    assert_eq!(
        *counts.lock().unwrap(),
        [16, 64],
        "8 × limit, then 4 times as many"
    );
    assert!(
        reads.lock().unwrap().is_empty(),
        "s-e2 was in the final listing"
    );
    assert_eq!(source, ReadSource::Store);

    // The same profile listed 43 at a time: s-e2 is past the cut and read on its own.
    let (values, reads) = reader(&full.titles);
    let list = |count: usize| {
        let mut titles = full.titles.clone();
        titles.truncate(count.min(43));
        std::future::ready(ProfileTitles {
            titles,
            complete: false,
            source: ReadSource::Degraded,
        })
    };
    let read = |key| std::future::ready(answer(&values, &reads, key));
    let (items, source) = continue_watching(&c, RATIO, ACCOUNT, PROFILE, 2, list, read).await;
    assert_eq!(items[1].shown.id, "s-e2");
    assert_eq!(items[1].position_seconds, 42);
    assert_eq!(*reads.lock().unwrap(), [title(&c, "s-e2").title_id]);
    assert_eq!(source, ReadSource::Degraded);
}
