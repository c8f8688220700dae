//! A consumer of Playhead's change stream (docs/events.md): a durable JetStream pull
//! consumer that prints every event and keeps, last write wins, the newest position of
//! each (account, profile, title) — which is what makes at-least-once delivery harmless:
//! a duplicate or a replayed event carries a version the consumer already has.
//!
//! ```text
//! cargo run --example events_consumer -- [nats://127.0.0.1:4222] [consumer-name] [subject-filter]
//! ```
//! e.g. `... nats://127.0.0.1:4222 analytics playhead.events.3` reads partition 3 only.
//! Stops with Ctrl-C; started again with the same name it goes on where it stopped.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use playhead::events::{Event, EventKind};

/// (account, profile, title).
type Key = (u64, u64, u64);
/// The last-write-wins order of one key's events: (updated_at_ms, device_id).
type Version = (u64, Option<u32>);

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "nats://127.0.0.1:4222".into());
    let name = args.next().unwrap_or_else(|| "events-consumer".into());
    let filter = args.next().unwrap_or_default();
    let client = async_nats::connect(&url).await?;
    let js = jetstream::new(client);
    let stream = js.get_stream("PLAYHEAD_EVENTS").await?;
    let consumer = stream
        .get_or_create_consumer(
            &name,
            pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: filter,
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                ..Default::default()
            },
        )
        .await?;
    eprintln!("reading PLAYHEAD_EVENTS on {url} as `{name}`; Ctrl-C stops");
    let mut newest: HashMap<Key, (Version, Event)> = HashMap::new();
    let mut messages = consumer.messages().await?;
    loop {
        let message = tokio::select! {
            m = messages.next() => match m {
                Some(m) => m?,
                None => break,
            },
            _ = tokio::signal::ctrl_c() => break,
        };
        let event: Event = serde_json::from_slice(&message.payload)?;
        let key = (event.account_id, event.profile_id, event.title_id);
        let version = (event.updated_at_ms, event.device_id);
        let fresh = newest.get(&key).is_none_or(|(held, _)| version > *held);
        let what = match event.kind {
            EventKind::Progress => format!("at {} s", event.position_seconds.unwrap_or(0)),
            EventKind::Completed => "completed".into(),
            EventKind::Deleted => "deleted".into(),
        };
        println!(
            "{} account {} profile {} {} {what}{}",
            message.subject,
            event.account_id,
            event.profile_id,
            event
                .catalog_id
                .as_deref()
                .unwrap_or("(not in the catalog)"),
            if fresh {
                ""
            } else {
                " (older than held: ignored)"
            }
        );
        if fresh {
            newest.insert(key, (version, event));
        }
        message.ack().await?;
    }
    eprintln!("{} keys seen", newest.len());
    Ok(())
}
