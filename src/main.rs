//! The `playhead` binary: `playhead serve` runs the server; `playhead config` prints the
//! effective configuration; `playhead token` mints a development JWT; `playhead schema`
//! prints the Cassandra/ScyllaDB schema for a DBA.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mimalloc::MiMalloc;

use playhead::config::{Config, StoreKind};
use playhead::engine::Engine;
use playhead::events::Publisher;
use playhead::ingest::auth::{self, Verifier};
use playhead::ingest::http::{self, AppState};
use playhead::ingest::{binary, Ingest};
use playhead::model::Clock;
use playhead::resume::catalog::Catalog;
use playhead::store::{cassandra, CassandraStore, EmbeddedStore, FaultyStore, Store};

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// How long mimalloc keeps memory freed before it gives it back to the OS. Its v3 default
/// is 1 s, and a flush cycle frees and allocates tens of MB every second (its pick, the
/// store's batches), so at 10 M viewers ~70 MiB freed but not yet purged counted in RSS:
/// 792–811 MiB against 735–739 MiB with 10 ms, for the same CPU (60 s runs, alternated;
/// BENCHMARKS.md). 10 ms was mimalloc v2's default; 0 saved as much but cost ~8 % more
/// server CPU.
const ALLOCATOR_PURGE_DELAY_MS: std::ffi::c_long = 10;
/// `mi_option_purge_delay` in mimalloc v3's `mi_option_e` (mimalloc.h), which
/// libmimalloc-sys does not name; `the_purge_delay_is_set` checks it by its default.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Sets mimalloc's purge delay ([`ALLOCATOR_PURGE_DELAY_MS`]) unless the operator chose
/// one with mimalloc's own `MIMALLOC_PURGE_DELAY`.
fn tune_allocator() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: mi_option_set stores an option mimalloc reads whenever it purges; it has
        // no precondition and may be called at any time.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, ALLOCATOR_PURGE_DELAY_MS) };
    }
}

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
    /// Print the effective configuration (file + environment) as TOML and exit; secrets
    /// print as "<redacted>".
    Config {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print the CQL that creates the Cassandra/ScyllaDB keyspace and table for the
    /// configured `[store.cassandra]` settings (keyspace, replication), for a DBA to apply.
    Schema {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print an HS256 bearer token for one profile, signed with the configured
    /// `auth.hs256_secret` (for development and load tests).
    Token {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        account_id: u64,
        #[arg(long)]
        profile_id: u64,
        /// How long the token stays valid.
        #[arg(long, default_value_t = 3600)]
        ttl_seconds: u64,
    },
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    let (Command::Serve { config }
    | Command::Config { config }
    | Command::Schema { config }
    | Command::Token { config, .. }) = &cli.command;
    let config = match Config::load_from_process(config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("playhead: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::Config { .. } => match toml::to_string_pretty(&config.redacted()) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("playhead: cannot print the configuration: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Schema { .. } => {
            print!("{}", cassandra::schema_cql(&config.store.cassandra));
            ExitCode::SUCCESS
        }
        Command::Token {
            account_id,
            profile_id,
            ttl_seconds,
            ..
        } => {
            if config.auth.hs256_secret.is_empty() {
                eprintln!("playhead: auth.hs256_secret is empty, so HS256 tokens are not accepted; set it to mint one");
                return ExitCode::from(2);
            }
            match auth::mint_hs256(
                &config.auth.hs256_secret,
                account_id,
                profile_id,
                ttl_seconds,
            ) {
                Ok(token) => {
                    println!("{token}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("playhead: cannot mint a token: {e}");
                    ExitCode::FAILURE
                }
            }
        }
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
    playhead::engine::wal::create_private_dir(&config.server.data_dir).with_context(|| {
        format!(
            "creating the data directory {}",
            config.server.data_dir.display()
        )
    })?;
    let store: Arc<dyn Store> = match config.store.kind {
        StoreKind::Embedded => {
            let dir = config.embedded_store_dir();
            let store = EmbeddedStore::open(&dir, config.store.embedded.cache_bytes)
                .with_context(|| format!("opening the embedded store in {}", dir.display()))?;
            // Memtable flushes and compaction only have to keep up on average: let ingest
            // and reads preempt them (playhead::telemetry::priority), also after a reopen.
            store.lower_worker_priority(config.server.background_nice);
            Arc::new(store)
        }
        StoreKind::Cassandra => Arc::new(
            CassandraStore::connect(&config)
                .await
                .context("connecting to the Cassandra/ScyllaDB cluster (store.cassandra)")?,
        ),
    };
    let store = with_fault_injection(store, &config);
    let catalog = Catalog::load(&config.api.catalog_path)
        .with_context(|| format!("loading the catalog {}", config.api.catalog_path.display()))?;
    let verifier = Verifier::from_config(&config.auth).context("loading the auth keys")?;
    let listener = tokio::net::TcpListener::bind(config.http.listen.as_str())
        .await
        .with_context(|| format!("binding the HTTP listener {}", config.http.listen))?;
    let http_addr = listener.local_addr().context("reading the HTTP address")?;
    warn_if_exposed(&config, &verifier, http_addr);
    let binary_listener = if config.binary.enabled {
        let listener = binary::bind(&config.binary)
            .with_context(|| format!("binding the binary listener {}", config.binary.listen))?;
        let addr = listener
            .local_addr()
            .context("reading the binary address")?;
        if !addr.ip().is_loopback() && config.binary.secret == playhead::config::BINARY_DEV_SECRET {
            tracing::warn!(%addr, "the binary listener is exposed beyond this machine with the public development secret: set PLAYHEAD_BINARY__SECRET");
        }
        Some((listener, addr))
    } else {
        None
    };

    let (events, _events_client) = Publisher::from_config(
        &config.events,
        catalog.clone(),
        config.api.completed_ratio,
        config.server.background_nice,
    )
    .await
    .context("starting the change stream (events)")?
    .unzip();
    if let Some(events) = &events {
        tracing::info!(
            sink = events.sink_name(),
            url = %config.events.url,
            stream = %config.events.stream,
            "change stream on: every flushed row is published"
        );
    }
    let (engine, _) = Engine::open_with(config.clone(), store, Clock::System, events)
        .with_context(|| format!("opening the commit log in {}", config.wal_dir().display()))?;
    let background = engine
        .spawn_background()
        .context("starting the background runtime")?;
    let ingest = Arc::new(Ingest::new(engine.clone(), catalog));
    let state = Arc::new(AppState::new(Arc::clone(&ingest), verifier));
    let (stop_listeners, listeners_stopped) = tokio::sync::watch::channel(false);
    let http_server = tokio::spawn(http::serve(
        listener,
        Arc::clone(&state),
        listeners_stopped.clone(),
    ));
    let binary_addr = binary_listener
        .as_ref()
        .map_or_else(|| "disabled".to_string(), |(_, addr)| addr.to_string());
    let binary_server = binary_listener
        .map(|(listener, _)| tokio::spawn(binary::serve(listener, ingest, listeners_stopped)));
    let stop = stop_signal()?;
    let flush_on_usr1 = flush_on_sigusr1(engine.clone())?;
    tracing::info!(
        http = %http_addr,
        binary = %binary_addr,
        data_dir = %config.server.data_dir.display(),
        sync_mode = ?config.wal.sync_mode,
        flush_interval_ms = config.flush.interval_ms,
        "playhead running; SIGTERM or SIGINT stops it, SIGUSR1 flushes every dirty key"
    );
    stop.await;
    flush_on_usr1.abort();
    tracing::info!(
        "shutting down: finishing requests, flushing the coalescer, syncing the commit log"
    );
    let _ = stop_listeners.send(true);
    if let Err(e) = http_server.await {
        tracing::error!("the HTTP server task failed: {e}");
    }
    if let Some(binary_server) = binary_server {
        if let Err(e) = binary_server.await {
            tracing::error!("the binary server task failed: {e}");
        }
    }
    let report = engine.shutdown(Some(background)).await;
    tracing::info!(
        flushed_rows = report.flushed_rows,
        left_in_log = report.left_in_log,
        "shutdown complete"
    );
    Ok(())
}

/// Wraps the store in a [`FaultyStore`] driven by `faults.store_write_fault_file`, when set
/// (reliability tests only).
fn with_fault_injection(store: Arc<dyn Store>, config: &Config) -> Arc<dyn Store> {
    let path = &config.faults.store_write_fault_file;
    if path.as_os_str().is_empty() {
        return store;
    }
    tracing::warn!(path = %path.display(), "store fault injection is on: store writes fail while this file exists");
    let faulty = FaultyStore::new(store);
    playhead::store::faulty::watch_fault_file(faulty.switch(), path.clone());
    Arc::new(faulty)
}

/// Warns when a listener is reachable from other machines while anyone who read our
/// default config could mint tokens (the development secret), or no key is configured.
fn warn_if_exposed(config: &Config, verifier: &Verifier, addr: std::net::SocketAddr) {
    if addr.ip().is_loopback() {
        return;
    }
    if config.auth.hs256_secret == auth::DEV_SECRET {
        tracing::warn!(%addr, "the HTTP listener is exposed beyond this machine and auth.hs256_secret is the public development secret: anyone can mint tokens; set PLAYHEAD_AUTH__HS256_SECRET");
    }
    if verifier.has_no_keys() {
        tracing::warn!(%addr, "the HTTP listener is exposed and no auth key is configured: every API request will be refused");
    }
}

/// Installs the SIGTERM and SIGINT handlers and returns a future that ends at the first
/// of them. Installed before the server says it is running: a signal that arrives between
/// that line and the handlers would otherwise kill the process without its shutdown.
fn stop_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// Installs the SIGUSR1 handler: each signal asks for a full flush, run by the background
/// flush loop ([`Engine::request_flush`]; the handover procedure of docs/deploy.md). It needs
/// no authentication because only the node's operator can signal the process. Installed
/// before the server says it runs, since SIGUSR1's default action ends the process.
fn flush_on_sigusr1(engine: Engine) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut usr1 = signal(SignalKind::user_defined1()).context("installing the SIGUSR1 handler")?;
    Ok(tokio::spawn(async move {
        while usr1.recv().await.is_some() {
            engine.request_flush();
        }
    }))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_purge_delay_is_set() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            eprintln!("skipped: MIMALLOC_PURGE_DELAY is set");
            return;
        }
        // SAFETY: mi_option_get only reads an option.
        let get = || unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(
            get(),
            1000,
            "mimalloc v3's default purge delay: the option is the one meant"
        );
        tune_allocator();
        assert_eq!(get(), ALLOCATOR_PURGE_DELAY_MS);
    }
}
