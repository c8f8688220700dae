//! "Resume from 47:23 on Phone, or 0:08 on TV?": the conflict a resume answer carries
//! (docs/api.md, `alternative`; docs/architecture.md, "Alternatives").
//!
//! Last write wins stays the rule: the answer's position is always the newest value. Next
//! to it a key keeps its *alternative*: the newest value written before the winner by a
//! **different device** — the position the other device had when this one took over. A
//! device that only seeks within its own playback (a seek backward) never makes one.
//!
//! The alternative is a function of the key's history alone, so it merges like the value
//! does: whoever saw part of the history (memory, the store, another ingest node) keeps
//! a [`Summary`], and [`merge`] of two summaries is the summary of both histories. A
//! tombstone is a value of its own device ([`Value::TOMBSTONE_DEVICE`]), so a deletion
//! followed by a heartbeat leaves the tombstone as the alternative, which [`offer`] never
//! offers and which hides every value before the deletion.
//!
//! Whether an answer *offers* the alternative is a second, plain rule ([`offer`]): it must
//! be recent (`api.alternative_window_ms`) and far enough from the winner
//! (`api.alternative_min_distance_seconds`), measured to the interval the other device
//! could be at by the time the winner was written.

use crate::model::Value;

/// What one part of a key's history says: its newest value, and the newest value before
/// it from another device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Summary {
    pub value: Value,
    pub alternative: Option<Value>,
}

impl Summary {
    /// A history of one value.
    pub const fn single(value: Value) -> Self {
        Self {
            value,
            alternative: None,
        }
    }
}

/// Whether `candidate` may be `winner`'s alternative: older than it and from another device.
fn qualifies(candidate: &Value, winner: &Value) -> bool {
    winner.supersedes(candidate) && candidate.device_id != winner.device_id
}

/// The summary of both histories: the newer value wins, and its alternative is the newest
/// of the four values known that is older and from another device. Exact: the newest value
/// of a device other than the winner's in either history is that history's value or, when
/// that one is the winner's device, that history's alternative. A tombstone winner has no
/// alternative (nothing is offered for a deleted title, and the tombstone itself hides
/// what came before it in any later merge).
pub fn merge(a: Summary, b: Summary) -> Summary {
    let value = if b.value.supersedes(&a.value) {
        b.value
    } else {
        a.value
    };
    if value.is_tombstone() {
        return Summary::single(value);
    }
    let alternative = [Some(a.value), a.alternative, Some(b.value), b.alternative]
        .into_iter()
        .flatten()
        .filter(|c| qualifies(c, &value))
        .reduce(|x, y| if y.supersedes(&x) { y } else { x });
    Summary { value, alternative }
}

/// The thresholds of [`offer`] (`api.alternative_window_ms`,
/// `api.alternative_min_distance_seconds`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OfferRule {
    pub window_ms: u64,
    pub min_distance_seconds: u32,
}

/// How far `winner`'s position is from where the other device could be when `winner` was
/// written: anywhere in `[alternative, alternative + seconds elapsed between the two
/// writes]` — stopped where it last reported, or played on since. A device handed over
/// (the phone paused at 47:23, the TV resumed there and played on) is at distance 0.
pub fn distance_seconds(alternative: &Value, winner: &Value) -> u64 {
    let low = u64::from(alternative.position_seconds);
    let elapsed_seconds = winner
        .updated_at_ms
        .saturating_sub(alternative.updated_at_ms)
        / 1_000;
    let high = low.saturating_add(elapsed_seconds);
    let at = u64::from(winner.position_seconds);
    if at < low {
        low - at
    } else {
        at.saturating_sub(high)
    }
}

/// The alternative an answer offers for `summary` at `now_ms`, if any: one from another
/// device (never a tombstone, never for a tombstone), written within `window_ms` of now,
/// at least `min_distance_seconds` from the winner ([`distance_seconds`]).
pub fn offer(summary: &Summary, now_ms: u64, rule: OfferRule) -> Option<Value> {
    let (winner, alternative) = (summary.value, summary.alternative?);
    let offered = !winner.is_tombstone()
        && !alternative.is_tombstone()
        && qualifies(&alternative, &winner)
        && now_ms.saturating_sub(alternative.updated_at_ms) <= rule.window_ms
        && distance_seconds(&alternative, &winner) >= u64::from(rule.min_distance_seconds);
    offered.then_some(alternative)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PHONE: u32 = 1;
    const TV: u32 = 2;
    const LAPTOP: u32 = 3;
    const DAY_MS: u64 = 86_400_000;
    const RULE: OfferRule = OfferRule {
        window_ms: DAY_MS,
        min_distance_seconds: 60,
    };

    /// The summary a sequence of writes leaves, applied one by one as the coalescer does.
    fn history(values: &[Value]) -> Summary {
        values
            .iter()
            .map(|v| Summary::single(*v))
            .reduce(merge)
            .expect("at least one value")
    }

    /// The seed's case: the phone at 47:23, the TV restarted the film two seconds later.
    #[test]
    fn the_phone_tv_conflict_offers_the_phone() {
        let t = 1_000_000;
        let s = history(&[
            Value::new(2_843, t, PHONE),
            Value::new(0, t + 2_000, TV),
            Value::new(4, t + 6_000, TV),
            Value::new(8, t + 10_000, TV),
        ]);
        assert_eq!(s.value, Value::new(8, t + 10_000, TV));
        assert_eq!(s.alternative, Some(Value::new(2_843, t, PHONE)));
        assert_eq!(
            offer(&s, t + 10_000, RULE),
            Some(Value::new(2_843, t, PHONE))
        );
    }

    #[test]
    fn a_seek_backward_on_one_device_makes_no_alternative() {
        let s = history(&[Value::new(2_843, 1_000, PHONE), Value::new(8, 5_000, PHONE)]);
        assert_eq!(s.alternative, None);
        assert_eq!(offer(&s, 5_000, RULE), None);
    }

    #[test]
    fn the_window_and_the_distance_decide_the_offer() {
        let s = history(&[Value::new(2_843, 0, PHONE), Value::new(8, 2_000, TV)]);
        assert!(offer(&s, DAY_MS, RULE).is_some());
        assert_eq!(offer(&s, DAY_MS + 1, RULE), None, "past the window");
        // Within a minute of the phone's position: no conflict worth a question.
        let close = history(&[Value::new(2_843, 0, PHONE), Value::new(2_800, 2_000, TV)]);
        assert_eq!(
            distance_seconds(&close.alternative.unwrap(), &close.value),
            43
        );
        assert_eq!(offer(&close, 2_000, RULE), None);
    }

    /// A hand-over: the TV resumed where the phone stopped and played on for ten minutes.
    /// The phone, had it played on too, would be there: distance 0, nothing offered.
    #[test]
    fn distance_counts_the_time_the_other_device_could_have_played() {
        let phone = Value::new(2_843, 0, PHONE);
        let tv = Value::new(2_843 + 600, 600_000, TV);
        assert_eq!(distance_seconds(&phone, &tv), 0);
        assert_eq!(offer(&history(&[phone, tv]), 600_000, RULE), None);
        // Further than it could have played, or behind where it was: measured to the interval.
        assert_eq!(
            distance_seconds(&phone, &Value::new(2_843 + 700, 600_000, TV)),
            100
        );
        assert_eq!(
            distance_seconds(&phone, &Value::new(2_000, 600_000, TV)),
            843
        );
    }

    /// Devices alternating: the alternative is always the last value of the device before.
    #[test]
    fn the_alternative_is_the_newest_value_of_another_device() {
        let s = history(&[
            Value::new(100, 10, PHONE),
            Value::new(5, 20, TV),
            Value::new(200, 30, LAPTOP),
            Value::new(9, 40, TV),
        ]);
        assert_eq!(s.alternative, Some(Value::new(200, 30, LAPTOP)));
        // A stale write (older than the winner) is a candidate too, wherever it arrives.
        let late = merge(s, Summary::single(Value::new(300, 35, PHONE)));
        assert_eq!(late.value, s.value);
        assert_eq!(late.alternative, Some(Value::new(300, 35, PHONE)));
    }

    /// Merging summaries of any split of a history, in any order, gives the summary of the
    /// whole (what the store's merge and the read's merge rely on).
    #[test]
    fn merge_of_any_split_equals_the_whole_history() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(20);
        for _ in 0..2_000 {
            let n = rng.random_range(1..8);
            let values: Vec<Value> = (0..n)
                .map(|_| {
                    let at = rng.random_range(0..20);
                    if rng.random_range(0..10) == 0 {
                        Value::tombstone(at)
                    } else {
                        Value::new(rng.random_range(0..5), at, rng.random_range(1..4))
                    }
                })
                .collect();
            let mut sorted = values.clone();
            sorted.sort_by_key(|v| v.version());
            let whole = history(&sorted);
            let cut = rng.random_range(0..=n);
            let (a, b) = values.split_at(cut);
            let merged = match (a.is_empty(), b.is_empty()) {
                (true, _) => history(b),
                (_, true) => history(a),
                _ => merge(history(b), history(a)),
            };
            assert_eq!(merged, whole, "{values:?} cut at {cut}");
        }
    }

    #[test]
    fn tombstones_are_never_offered_and_hide_what_came_before() {
        let deleted = history(&[Value::new(2_843, 0, PHONE), Value::tombstone(1_000)]);
        assert_eq!(deleted.alternative, None);
        let replayed = history(&[
            Value::new(2_843, 0, PHONE),
            Value::tombstone(1_000),
            Value::new(8, 2_000, TV),
        ]);
        assert_eq!(replayed.alternative, Some(Value::tombstone(1_000)));
        assert_eq!(offer(&replayed, 2_000, RULE), None);
        // Merged with a part that still has the phone's value: the deletion still hides it.
        let stale = merge(replayed, Summary::single(Value::new(2_843, 0, PHONE)));
        assert_eq!(offer(&stale, 2_000, RULE), None);
    }
}
