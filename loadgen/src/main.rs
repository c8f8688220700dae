//! `playhead-loadgen`: drives a Playhead server with heartbeats and reads, measures what it
//! acknowledges and how fast, and checks afterwards that the server kept the newest
//! acknowledged value of every key it wrote (`--verify`).
//!
//! Workloads: `max` (closed loop, or open loop with `--rate`, over `--keys` distinct keys),
//! `fleet` (simulated viewers, one heartbeat per viewer every 4 s, with pauses, seeks,
//! device switches and two devices on one profile), `read` (resume reads, optionally mixed
//! with writes). Protocols: `binary` (docs/protocol.md) and `http` (JWTs minted with the
//! server's HS256 secret).
//!
//! It must not be the bottleneck: binary batches are encoded once into reused buffers (the
//! `max` workload only patches positions in pre-encoded frames), nothing allocates per
//! record, and latency is recorded per batch (binary) or request (HTTP).

mod binary;
mod fleet;
mod http;
mod redis;
mod report;
mod workload;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use mimalloc::MiMalloc;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// As many heartbeats as the server takes (closed loop), or `--rate` of them.
    Max,
    /// Simulated viewers: a heartbeat every 4 s of playback each.
    Fleet,
    /// Resume reads over HTTP, alone or mixed with writes (`--write-ratio`).
    Read,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Binary,
    Http,
    /// Redis peer: last-write-wins upsert by a Lua script (EVALSHA); reads are GET.
    RedisLww,
    /// Redis peer: plain SET, no last-write-wins (the ceiling); reads are GET.
    RedisSet,
}

/// Load generator for Playhead.
#[derive(Clone, Debug, Parser, serde::Serialize)]
#[command(version, about)]
pub struct Args {
    /// What to run.
    #[arg(value_enum)]
    pub workload: Workload,
    #[arg(long, value_enum, default_value = "binary")]
    pub protocol: Protocol,
    /// The server's binary listener.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub binary_addr: SocketAddr,
    /// `fleet` over the binary protocol to a cluster: the nodes' binary listeners, in the
    /// order of deploy/haproxy.cfg's servers (ids 1, 2, …). Each record goes to its
    /// account's node through `playhead::ingest::binary::client::ClusterClient`; one call per tick and
    /// connection, answered before the next. `--verify` reads through `--http-addr`: point
    /// it at HAProxy in front of the same nodes, which routes each account to the same node.
    #[arg(long, value_delimiter = ',')]
    pub servers: Vec<SocketAddr>,
    /// The server's HTTP listener (HTTP workloads, reads, `--verify`).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,
    /// The Redis server of the `redis-*` protocols (comparison runs).
    #[arg(long, default_value = "127.0.0.1:6379")]
    pub redis_addr: SocketAddr,
    /// The binary protocol's shared secret.
    #[arg(long, env = "PLAYHEAD_BINARY__SECRET", default_value = playhead::config::BINARY_DEV_SECRET)]
    pub secret: String,
    /// The server's HS256 secret, to mint tokens.
    #[arg(long, env = "PLAYHEAD_AUTH__HS256_SECRET", default_value = playhead::ingest::auth::DEV_SECRET)]
    pub hs256_secret: String,
    /// The catalog the server uses (titles and durations).
    #[arg(long, default_value = "config/catalog.toml")]
    pub catalog: PathBuf,
    /// Worker threads of the load generator's runtime.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Connections to the server.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Measured run length, after the warm-up.
    #[arg(long, default_value_t = 10.0)]
    pub duration_secs: f64,
    /// Load before measuring starts (not counted).
    #[arg(long, default_value_t = 2.0)]
    pub warmup_secs: f64,
    /// Target rate, heartbeats (or requests) per second, open loop with latency measured
    /// from the intended send time (corrected for coordinated omission). 0 = closed loop.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// `max`: distinct keys written (account, profile 1, a catalog title).
    #[arg(long, default_value_t = 1_000_000)]
    pub keys: u64,
    /// Records per binary batch (`max`); `fleet` batches whatever is due per tick.
    #[arg(long, default_value_t = 1024)]
    pub batch: usize,
    /// Batches in flight per binary connection.
    #[arg(long, default_value_t = 16)]
    pub in_flight: usize,
    /// HTTP `max` and `read`: requests in flight per connection (HTTP/1.1 pipelining).
    /// 1, the default, sends a request only after the previous answer, as a player does.
    /// More lets the open loop keep its schedule while answers are slow, and requests due
    /// together leave in one write: cheaper for the generator, and for the server too, so
    /// figures taken with it are not what one-request-per-connection clients would see.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub pipeline: u16,
    /// `fleet`: simulated viewers.
    #[arg(long, default_value_t = 100_000)]
    pub viewers: u64,
    /// `fleet`: profiles per household (account).
    #[arg(long, default_value_t = 3)]
    pub profiles_per_household: u64,
    /// `fleet`: seconds of playback between a viewer's heartbeats.
    #[arg(long, default_value_t = 4.0)]
    pub heartbeat_secs: f64,
    /// `read`: fraction of requests that are writes (POST progress).
    #[arg(long, default_value_t = 0.0)]
    pub write_ratio: f64,
    /// First account id used, so runs can use disjoint keys.
    #[arg(long, default_value_t = 1_000_000_000)]
    pub account_base: u64,
    /// After the run, compare the server's resume answers with the newest acknowledged
    /// heartbeat of every key written (or `--verify-sample` of them); fail on a mismatch.
    #[arg(long)]
    pub verify: bool,
    /// Keys checked by `--verify` (0 = all).
    #[arg(long, default_value_t = 20_000)]
    pub verify_sample: usize,
    /// Seconds `--verify` waits after the run before reading back: longer than the server's
    /// `flush.idle_ms` + `flush.interval_ms`, the keys have left its memory and the answers
    /// come from the store (e.g. Cassandra under another generator's load).
    #[arg(long, default_value_t = 0.0)]
    pub verify_after_secs: f64,
    /// Write the whole report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Draw the latency percentile curve as SVG here.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl Args {
    pub fn warmup(&self) -> Duration {
        Duration::from_secs_f64(self.warmup_secs.max(0.0))
    }

    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.duration_secs.max(0.1))
    }

    pub fn verify_after(&self) -> Duration {
        Duration::from_secs_f64(self.verify_after_secs)
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("playhead-loadgen: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(workload::run(args)) {
        Ok(report) => {
            if report.failed() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("playhead-loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}
