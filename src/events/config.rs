//! The `[events]` section: the change stream that analytics and recommendations consume
//! (docs/events.md). Off by default.

use serde::{Deserialize, Serialize};

use crate::config::{check, ConfigError};

/// Where flushed rows are published as events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventsKind {
    /// No change stream: flush cycles publish nothing.
    #[default]
    None,
    /// NATS JetStream ([`crate::events::nats`]).
    Nats,
}

/// The change stream: one event per row a flush cycle writes, published after the store
/// synced the row and before the commit log may drop it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    pub kind: EventsKind,
    /// The NATS server(s) to publish to: `nats://host:port`, several separated by commas.
    pub url: String,
    /// The JetStream stream that takes the events; it captures `<subject_prefix>.>`.
    pub stream: String,
    /// Events are published on `<subject_prefix>.<partition>`; dot-separated tokens, no
    /// wildcards.
    pub subject_prefix: String,
    /// Subjects the events are spread over, by `account_id % partitions`: one account's
    /// events are always on one subject (in flush order), and a consumer group can split
    /// the stream by subject. Not one subject per account: JetStream keeps state per
    /// subject, and 30 M accounts would be 30 M subjects.
    pub partitions: u32,
    /// Create the stream at the first publish when it does not exist (with
    /// `max_age_seconds`, `max_bytes`, `duplicate_window_ms`). When false, the stream
    /// must have been created by an operator; publishes fail (and are retried) until it is.
    pub create_stream: bool,
    /// A created stream keeps events this long (JetStream `max_age`).
    pub max_age_seconds: u64,
    /// A created stream keeps at most this many bytes, dropping the oldest events past it
    /// (JetStream `max_bytes`, discard old).
    pub max_bytes: u64,
    /// A created stream drops a message whose id (`Nats-Msg-Id`: the event's key and
    /// version) it saw within this window: a publish retried after a lost acknowledgement
    /// is stored once. The server keeps every id of the window in memory.
    pub duplicate_window_ms: u64,
    /// Events published before waiting for their acknowledgements: the bounded buffer
    /// between a flush cycle and the stream (each encoded event is about 200 bytes). A
    /// cycle publishes its rows in rounds of this many; a round that is not acknowledged
    /// in time is published again after a backoff (`flush.retry_*`).
    pub max_in_flight: usize,
    /// A round of publishes not acknowledged within this fails (and is retried).
    pub ack_timeout_ms: u64,
    /// Limit on opening a connection to the NATS server. The server starts whether or not
    /// NATS answers: the client keeps reconnecting in the background.
    pub connect_timeout_ms: u64,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            kind: EventsKind::None,
            url: "nats://127.0.0.1:4222".into(),
            stream: "PLAYHEAD_EVENTS".into(),
            subject_prefix: "playhead.events".into(),
            partitions: 16,
            create_stream: true,
            max_age_seconds: 7 * 86_400,
            max_bytes: 16 << 30,
            duplicate_window_ms: 120_000,
            max_in_flight: 4_096,
            ack_timeout_ms: 5_000,
            connect_timeout_ms: 2_000,
        }
    }
}

impl EventsConfig {
    /// True when flush cycles publish events.
    pub fn enabled(&self) -> bool {
        self.kind != EventsKind::None
    }

    /// Range checks that types alone cannot express; the first bad value is the error.
    /// Checked whatever the kind, so a bad setting shows before it is switched on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let c = self;
        check(
            "events.url",
            &c.url,
            !c.url.trim().is_empty() && !c.url.contains(char::is_whitespace),
            "one or more NATS URLs such as nats://127.0.0.1:4222, comma-separated",
        )?;
        check(
            "events.stream",
            &c.stream,
            !c.stream.is_empty()
                && c.stream.len() <= 64
                && c.stream
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
            "1 to 64 letters, digits, '_' or '-' (a JetStream stream name)",
        )?;
        check(
            "events.subject_prefix",
            &c.subject_prefix,
            c.subject_prefix.len() <= 200
                && c.subject_prefix.split('.').all(|token| {
                    !token.is_empty()
                        && token
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                }),
            "dot-separated tokens of letters, digits, '_' or '-' (no wildcards), at most 200 bytes",
        )?;
        check(
            "events.partitions",
            c.partitions,
            (1..=4_096).contains(&c.partitions),
            "between 1 and 4096",
        )?;
        check(
            "events.max_age_seconds",
            c.max_age_seconds,
            c.max_age_seconds >= 60,
            "at least 60",
        )?;
        check(
            "events.max_bytes",
            c.max_bytes,
            (1 << 20..=i64::MAX as u64).contains(&c.max_bytes),
            "at least 1048576",
        )?;
        check(
            "events.duplicate_window_ms",
            c.duplicate_window_ms,
            (1_000..=c.max_age_seconds.saturating_mul(1_000)).contains(&c.duplicate_window_ms),
            "between 1000 and events.max_age_seconds x 1000",
        )?;
        check(
            "events.max_in_flight",
            c.max_in_flight,
            (1..=65_536).contains(&c.max_in_flight),
            "between 1 and 65536",
        )?;
        check(
            "events.ack_timeout_ms",
            c.ack_timeout_ms,
            (1..=600_000).contains(&c.ack_timeout_ms),
            "between 1 and 600000",
        )?;
        check(
            "events.connect_timeout_ms",
            c.connect_timeout_ms,
            (1..=600_000).contains(&c.connect_timeout_ms),
            "between 1 and 600000",
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::env;
    use crate::config::Config;

    #[test]
    fn events_are_off_by_default_and_load_from_the_environment() {
        let c = Config::load(None, env(&[])).unwrap();
        assert_eq!(c.events.kind, EventsKind::None);
        assert!(!c.events.enabled());
        let c = Config::load(
            None,
            env(&[
                ("PLAYHEAD_EVENTS__KIND", "nats"),
                ("PLAYHEAD_EVENTS__URL", "nats://10.0.0.5:4222"),
                ("PLAYHEAD_EVENTS__PARTITIONS", "64"),
            ]),
        )
        .unwrap();
        assert_eq!(c.events.kind, EventsKind::Nats);
        assert_eq!(c.events.url, "nats://10.0.0.5:4222");
        assert_eq!(c.events.partitions, 64);
    }

    #[test]
    fn bad_events_settings_name_the_key() {
        let bad = |k: &str, v: &str| {
            Config::load(None, env(&[(k, v)]))
                .expect_err("must fail")
                .to_string()
        };
        let err = bad("PLAYHEAD_EVENTS__KIND", "kafka");
        assert!(
            err.contains("events.kind") && err.contains("kafka"),
            "{err}"
        );
        let err = bad("PLAYHEAD_EVENTS__STREAM", "playhead.events");
        assert!(err.contains("events.stream"), "{err}");
        let err = bad("PLAYHEAD_EVENTS__SUBJECT_PREFIX", "playhead.>");
        assert!(err.contains("events.subject_prefix"), "{err}");
        let err = bad("PLAYHEAD_EVENTS__SUBJECT_PREFIX", "playhead..events");
        assert!(err.contains("events.subject_prefix"), "{err}");
        let err = bad("PLAYHEAD_EVENTS__PARTITIONS", "0");
        assert!(err.contains("events.partitions"), "{err}");
        let err = bad("PLAYHEAD_EVENTS__MAX_IN_FLIGHT", "0");
        assert!(err.contains("events.max_in_flight"), "{err}");
        let err = bad("PLAYHEAD_EVENTS__DUPLICATE_WINDOW_MS", "999999999999");
        assert!(err.contains("events.duplicate_window_ms"), "{err}");
        let err = bad("PLAYHEAD_EVENTS__URL", "");
        assert!(err.contains("events.url"), "{err}");
    }
}
