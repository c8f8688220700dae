//! The product's rules on top of the engine's reads (design decision 9): a title watched to
//! at least `api.completed_ratio` of its duration is completed and resumes at 0 — or, for a
//! series episode, the answer is the next episode at its own saved position; the
//! continue-watching list is newest first, one item per series. The rules live here, not in
//! a listener and never in the store, as plain functions over values and the [`catalog`]:
//! the reads they need are handed in, so they are tested without sockets (or an engine).

pub mod alternative;
pub mod catalog;
pub mod config;
pub mod devices;

use std::collections::{HashMap, HashSet};
use std::future::Future;

use crate::engine::{ProfileTitles, ReadResult, ReadSource};
use crate::model::{Key, Value};
use catalog::{Catalog, Title};
pub use devices::DeviceNames;

/// Titles of a profile the first continue-watching listing reads, per item wanted:
/// completed films, deletions and older episodes of a series are dropped, so more than
/// `limit` are read.
const FIRST_LISTING_PER_ITEM: usize = 8;
/// How much larger each further listing is, when one left the list short.
const LISTING_GROWTH: usize = 4;

/// True when `position_seconds` is at or past the completion threshold of `title`.
pub fn is_completed(position_seconds: u32, title: &Title, completed_ratio: f64) -> bool {
    f64::from(position_seconds) >= completed_ratio * f64::from(title.duration_seconds)
}

/// Where `title` resumes given its newest value: the saved position, or 0 when nothing is
/// saved or the title was completed.
pub fn resume_position(value: Option<Value>, title: &Title, completed_ratio: f64) -> u32 {
    match value {
        Some(v) if !is_completed(v.position_seconds, title, completed_ratio) => v.position_seconds,
        _ => 0,
    }
}

/// What a resume of one title answers.
#[derive(Clone, Debug, PartialEq)]
pub struct Resume<'a> {
    /// The title to play: the one asked for, or the episode after it ([`Self::next_episode_of`]).
    pub title: &'a Title,
    /// Where to start `title`.
    pub position_seconds: u32,
    /// `title`'s newest value, if any (its time and device are reported with the answer).
    pub value: Option<Value>,
    /// Where the read of `title` was answered from.
    pub source: ReadSource,
    /// The title asked for was completed.
    pub completed: bool,
    /// Set when the title asked for was a completed episode and `title` is the next one.
    pub next_episode_of: Option<&'a Title>,
    /// `value`'s alternative ([`alternative`]), unless it is past `title`'s completion
    /// threshold (a device that finished the film offers nothing to resume); whether the
    /// answer offers it is [`alternative::offer`]'s call.
    pub alternative: Option<Value>,
}

/// `read`'s alternative, unless it was watched to completion.
fn unfinished_alternative(read: &ReadResult, title: &Title, completed_ratio: f64) -> Option<Value> {
    read.alternative
        .filter(|a| !is_completed(a.position_seconds, title, completed_ratio))
}

/// Resumes `requested` for one profile: its saved position, 0 when it was completed or
/// nothing is saved — or, when it was a completed episode with a successor, that next
/// episode at its own position. `read` answers the newest value of a key (the engine's
/// read, which never fails); it is called once, or twice for a next episode.
pub async fn resume<'a, R, F>(
    catalog: &'a Catalog,
    completed_ratio: f64,
    account_id: u64,
    profile_id: u64,
    requested: &'a Title,
    mut read: R,
) -> Resume<'a>
where
    R: FnMut(Key) -> F,
    F: Future<Output = ReadResult>,
{
    let key = Key::new(account_id, profile_id, requested.title_id);
    let first = read(key).await;
    let completed = first
        .value
        .is_some_and(|v| is_completed(v.position_seconds, requested, completed_ratio));
    if completed {
        if let Some(next) = catalog.next_episode(requested) {
            let next_read = read(Key::new(account_id, profile_id, next.title_id)).await;
            return Resume {
                title: next,
                position_seconds: resume_position(next_read.value, next, completed_ratio),
                value: next_read.value,
                source: next_read.source,
                completed: true,
                next_episode_of: Some(requested),
                alternative: unfinished_alternative(&next_read, next, completed_ratio),
            };
        }
    }
    Resume {
        title: requested,
        position_seconds: resume_position(first.value, requested, completed_ratio),
        value: first.value,
        source: first.source,
        completed,
        next_episode_of: None,
        alternative: unfinished_alternative(&first, requested, completed_ratio),
    }
}

/// One continue-watching item.
#[derive(Clone, Debug, PartialEq)]
pub struct ContinueItem<'a> {
    /// The title watched; its series is the item's series.
    pub watched: &'a Title,
    /// The title offered: `watched`, or the episode after it when `watched` was completed.
    pub shown: &'a Title,
    /// `watched`'s newest value: the item's time and device.
    pub value: Value,
    /// Where to start `shown`.
    pub position_seconds: u32,
}

/// Where an item's position comes from, before the reads [`continue_items`] cannot do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ItemPosition {
    Known(u32),
    /// `shown` is the next episode and is not in the listing, which was cut short: it is
    /// older than every listed title. Read it, then [`next_episode_position`].
    ReadNext,
}

/// The continue-watching items `recent` yields, at most `limit`: newest first, one per
/// series (its most recent episode), completed films left out, a completed episode replaced
/// by the next one at that one's own saved position. Each item depends only on the titles
/// before it, so the first `limit` items of an exact prefix of the profile's titles by
/// recency are the first `limit` of the whole.
pub fn continue_items<'a>(
    catalog: &'a Catalog,
    completed_ratio: f64,
    recent: &ProfileTitles,
    limit: usize,
) -> Vec<(ContinueItem<'a>, ItemPosition)> {
    let by_title: HashMap<u64, Value> = recent
        .titles
        .iter()
        .map(|e| (e.title_id, e.value))
        .collect();
    let mut seen_series: HashSet<&str> = HashSet::new();
    let mut items = Vec::new();
    for entry in &recent.titles {
        if items.len() == limit {
            break;
        }
        let Some(title) = catalog.by_title_id(entry.title_id) else {
            continue;
        };
        let value = entry.value;
        if let Some((series, _)) = &title.series {
            if !seen_series.insert(series.as_str()) {
                continue;
            }
        }
        let (shown, position) = if is_completed(value.position_seconds, title, completed_ratio) {
            // A finished episode: offer the next one, at its own saved position.
            let Some(next) = catalog.next_episode(title) else {
                continue;
            };
            // Listed: its exact value. Not listed in a complete listing: nothing saved.
            // Otherwise it is older than the listed part: it must be read on its own.
            let position = match by_title.get(&next.title_id) {
                Some(v) => {
                    ItemPosition::Known(next_episode_position(Some(*v), next, completed_ratio))
                }
                None if recent.complete => ItemPosition::Known(0),
                None => ItemPosition::ReadNext,
            };
            (next, position)
        } else {
            (title, ItemPosition::Known(value.position_seconds))
        };
        let item = ContinueItem {
            watched: title,
            shown,
            value,
            position_seconds: 0,
        };
        items.push((item, position));
    }
    items
}

/// The position a next episode is offered at: its own saved position, 0 when nothing is
/// saved or it was completed too.
pub fn next_episode_position(saved: Option<Value>, next: &Title, completed_ratio: f64) -> u32 {
    saved
        .map(|v| v.position_seconds)
        .filter(|&p| !is_completed(p, next, completed_ratio))
        .unwrap_or(0)
}

/// The continue-watching list of one profile, at most `limit` items, and where its listing
/// came from ([`ReadSource::Degraded`]: the store did not answer, memory alone was listed).
///
/// The list is what sorting *all* of the profile's titles by recency and filtering them
/// gives. It is computed from the profile's most recent titles (`list(count)`, the engine's
/// exact recency prefix, [`crate::engine::Engine::recent_titles`]): first `8 × limit` of
/// them; when those leave fewer than `limit` items and the profile has more titles, from 4
/// times as many, until the list is full or the profile exhausted. `read` answers a next
/// episode older than the listed part.
pub async fn continue_watching<'a, L, LF, R, RF>(
    catalog: &'a Catalog,
    completed_ratio: f64,
    account_id: u64,
    profile_id: u64,
    limit: usize,
    mut list: L,
    mut read: R,
) -> (Vec<ContinueItem<'a>>, ReadSource)
where
    L: FnMut(usize) -> LF,
    LF: Future<Output = ProfileTitles>,
    R: FnMut(Key) -> RF,
    RF: Future<Output = ReadResult>,
{
    let mut count = limit.saturating_mul(FIRST_LISTING_PER_ITEM);
    loop {
        let recent = list(count).await;
        let pending = continue_items(catalog, completed_ratio, &recent, limit);
        if pending.len() == limit || recent.complete {
            let mut items = Vec::with_capacity(pending.len());
            for (mut item, position) in pending {
                item.position_seconds = match position {
                    ItemPosition::Known(p) => p,
                    ItemPosition::ReadNext => {
                        let key = Key::new(account_id, profile_id, item.shown.title_id);
                        next_episode_position(read(key).await.value, item.shown, completed_ratio)
                    }
                };
                items.push(item);
            }
            return (items, recent.source);
        }
        count = count.saturating_mul(LISTING_GROWTH);
    }
}

#[cfg(test)]
mod tests;
