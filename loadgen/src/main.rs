//! `playhead-loadgen`: drives a Playhead server with heartbeat workloads.
//!
//! The workloads (`fleet`, `max`, `read`) arrive together with the binary ingest protocol;
//! until then this binary only says so, so the workspace layout is final from day one.

use mimalloc::MiMalloc;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

fn main() {
    eprintln!("playhead-loadgen: no workloads yet; they arrive with the binary ingest protocol");
    std::process::exit(2);
}
