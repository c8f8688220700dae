//! The `playhead` binary: `playhead serve` runs the server; `playhead config` prints the
//! effective configuration.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mimalloc::MiMalloc;

use playhead::config::{Config, StoreKind};
use playhead::engine::Engine;
use playhead::store::{EmbeddedStore, Store};

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// Playhead keeps every viewer's resume position.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server until SIGTERM or SIGINT.
    Serve {
        /// Configuration file (default: config/default.toml when present, else built-in
        /// defaults). PLAYHEAD_<SECTION>__<KEY> variables override it.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print the effective configuration (file + environment) as TOML and exit.
    Config {
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (Command::Serve { config } | Command::Config { config }) = &cli.command;
    let config = match Config::load_from_process(config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("playhead: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::Config { .. } => match toml::to_string_pretty(&config) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("playhead: cannot print the configuration: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Serve { .. } => match serve(config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("playhead: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    init_tracing(&config.server.log_level);
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all().thread_name("playhead-worker");
    if config.server.worker_threads > 0 {
        runtime.worker_threads(config.server.worker_threads);
    }
    let runtime = runtime.build().context("starting the async runtime")?;
    runtime.block_on(run(config))
}

async fn run(config: Config) -> anyhow::Result<()> {
    playhead::wal::create_private_dir(&config.server.data_dir).with_context(|| {
        format!(
            "creating the data directory {}",
            config.server.data_dir.display()
        )
    })?;
    let store: Arc<dyn Store> = match config.store.kind {
        StoreKind::Embedded => {
            let dir = config.embedded_store_dir();
            Arc::new(
                EmbeddedStore::open(&dir, config.store.embedded.cache_bytes)
                    .with_context(|| format!("opening the embedded store in {}", dir.display()))?,
            )
        }
    };
    let (engine, _) = Engine::open(config.clone(), store)
        .with_context(|| format!("opening the commit log in {}", config.wal_dir().display()))?;
    let background = engine.spawn_background();
    tracing::info!(
        data_dir = %config.server.data_dir.display(),
        sync_mode = ?config.wal.sync_mode,
        flush_interval_ms = config.flush.interval_ms,
        "playhead running; SIGTERM or SIGINT stops it"
    );
    wait_for_signal().await?;
    tracing::info!("shutting down: flushing the coalescer and syncing the commit log");
    let report = engine.shutdown(Some(background)).await;
    tracing::info!(
        flushed_rows = report.flushed_rows,
        left_in_log = report.left_in_log,
        "shutdown complete"
    );
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

fn init_tracing(level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
