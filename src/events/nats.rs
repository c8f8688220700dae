//! The NATS JetStream sink: each event is a JetStream publish on
//! `<events.subject_prefix>.<account_id % events.partitions>` into the stream
//! `events.stream`, with the event's key and version as its `Nats-Msg-Id`; a round of
//! publishes resolves once the server acknowledged (stored) every one (docs/events.md).
//!
//! The client is async-nats. It connects in the background: a NATS server that is down at
//! start, or goes away, is retried for ever, and the publishes meanwhile time out and are
//! retried by the flusher.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::{self, context::Context, message::PublishMessage, stream};

use crate::events::{EventError, EventSink, EventsConfig, Message};

/// Publishes events to a JetStream stream.
pub struct NatsSink {
    client: async_nats::Client,
    jetstream: Context,
    /// What the stream is created with when it is missing (`events.create_stream`).
    stream: stream::Config,
    create_stream: bool,
    /// Set once the stream was found or created; until then every round looks first, so
    /// a stream an operator creates later is picked up.
    stream_ready: AtomicBool,
}

/// The stream configuration Playhead creates when `events.create_stream` is on: file
/// storage, one replica, the limits of the `[events]` section, the oldest events dropped
/// past `max_bytes`.
pub fn stream_config(config: &EventsConfig) -> stream::Config {
    stream::Config {
        name: config.stream.clone(),
        subjects: vec![format!("{}.>", config.subject_prefix)],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::Old,
        max_age: Duration::from_secs(config.max_age_seconds),
        max_bytes: config.max_bytes as i64,
        duplicate_window: Duration::from_millis(config.duplicate_window_ms),
        num_replicas: 1,
        ..Default::default()
    }
}

impl NatsSink {
    /// Starts the client; returns at once, connected or not (the client keeps trying).
    pub async fn connect(config: &EventsConfig) -> Result<Self, EventError> {
        let url = config.url.clone();
        let client = async_nats::ConnectOptions::new()
            .name("playhead")
            .connection_timeout(Duration::from_millis(config.connect_timeout_ms))
            .retry_on_initial_connect()
            .event_callback(move |event| {
                let url = url.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            tracing::info!(url, "event stream: connected to NATS")
                        }
                        async_nats::Event::Disconnected => tracing::warn!(
                            url,
                            "event stream: disconnected from NATS; reconnecting (flushes wait)"
                        ),
                        other => tracing::warn!(url, "event stream: NATS {other}"),
                    }
                }
            })
            .connect(config.url.as_str())
            .await
            .map_err(|e| EventError::Publish(format!("NATS client for {}: {e}", config.url)))?;
        let jetstream = jetstream::ContextBuilder::new()
            .timeout(Duration::from_millis(config.ack_timeout_ms))
            // A round is at most max_in_flight publishes; they wait for permits rather
            // than fail should acks of an abandoned round still hold some.
            .max_ack_inflight(config.max_in_flight)
            .backpressure_on_inflight(true)
            .build(client.clone());
        Ok(Self {
            client,
            jetstream,
            stream: stream_config(config),
            create_stream: config.create_stream,
            stream_ready: AtomicBool::new(false),
        })
    }

    async fn ensure_stream(&self) -> Result<(), EventError> {
        if self.stream_ready.load(Ordering::Relaxed) {
            return Ok(());
        }
        let name = self.stream.name.clone();
        let found = if self.create_stream {
            self.jetstream
                .get_or_create_stream(self.stream.clone())
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        } else {
            self.jetstream
                .get_stream(&name)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        };
        found.map_err(|reason| EventError::Stream {
            stream: name.clone(),
            reason,
        })?;
        tracing::info!(stream = name, "event stream: JetStream stream ready");
        self.stream_ready.store(true, Ordering::Relaxed);
        Ok(())
    }
}

#[async_trait::async_trait]
impl EventSink for NatsSink {
    fn name(&self) -> &'static str {
        "nats"
    }

    async fn publish(&self, messages: Vec<Message>) -> Result<(), EventError> {
        self.ensure_stream().await?;
        let failed = |e: &dyn std::fmt::Display| EventError::Publish(e.to_string());
        // Send the whole round, then collect the acknowledgements: one round trip per
        // round, not per event.
        let mut acks = Vec::with_capacity(messages.len());
        for m in messages {
            let publish = PublishMessage::build().payload(m.payload).message_id(m.id);
            let ack = self
                .jetstream
                .send_publish(m.subject, publish)
                .await
                .map_err(|e| failed(&e))?;
            acks.push(ack);
        }
        for ack in acks {
            let ack = ack.await.map_err(|e| failed(&e))?;
            if ack.stream != self.stream.name {
                // Another stream captured the subject: these events are not where the
                // consumers read them.
                return Err(EventError::Stream {
                    stream: self.stream.name.clone(),
                    reason: format!("the subjects are captured by stream `{}`", ack.stream),
                });
            }
        }
        Ok(())
    }

    fn connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }
}
