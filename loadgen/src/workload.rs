//! Runs a workload: the connection tasks, the progress bar, verification and the report.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use playhead::resume::catalog::Catalog;

use crate::report::{load, Live, Report, TaskStats, Verification, Window};
use crate::{binary, http, Args, Protocol, Workload};

/// A title the load may use: its ids and the highest position written to it (90 % of the
/// duration, so no heartbeat counts as completed and resume answers are the raw position).
#[derive(Clone, Debug)]
pub struct LoadTitle {
    pub movie_id: String,
    pub title_id: u64,
    pub max_position: u32,
}

/// The newest acknowledged position of one key, for `--verify`.
#[derive(Clone, Copy, Debug)]
pub struct Expected {
    pub account_id: u64,
    pub profile_id: u64,
    /// Index into the titles.
    pub title: u32,
    pub position_seconds: u32,
}

/// What a driver hands back.
pub struct Outcome {
    pub stats: TaskStats,
    pub latency_of: &'static str,
    /// The newest acknowledged value of every key written (for `--verify`).
    pub expected: Vec<Expected>,
    /// Keys whose last batch was never acknowledged (their state is unknown).
    pub unverifiable: u64,
}

/// What one connection task returns: its stats, the keys it can vouch for, and how many
/// keys it cannot.
pub type TaskResult = anyhow::Result<(TaskStats, Vec<Expected>, u64)>;

/// Waits for every connection task and merges what they measured.
pub async fn gather(
    mut tasks: tokio::task::JoinSet<TaskResult>,
    latency_of: &'static str,
) -> anyhow::Result<Outcome> {
    let mut outcome = Outcome::new(latency_of);
    while let Some(done) = tasks.join_next().await {
        let (stats, expected, unverifiable) = done??;
        outcome.add(&stats, expected, unverifiable);
    }
    Ok(outcome)
}

impl Outcome {
    pub fn new(latency_of: &'static str) -> Self {
        Outcome {
            stats: TaskStats::new(),
            latency_of,
            expected: Vec::new(),
            unverifiable: 0,
        }
    }

    /// Merges one connection's share.
    pub fn add(&mut self, stats: &TaskStats, expected: Vec<Expected>, unverifiable: u64) {
        self.stats.merge(stats);
        self.expected.extend(expected);
        self.unverifiable += unverifiable;
    }
}

pub fn titles(args: &Args) -> anyhow::Result<Arc<Vec<LoadTitle>>> {
    let catalog = Catalog::load(&args.catalog).with_context(|| {
        format!(
            "loading the catalog {} (see --catalog)",
            args.catalog.display()
        )
    })?;
    let titles: Vec<LoadTitle> = catalog
        .titles()
        .iter()
        .map(|t| LoadTitle {
            movie_id: t.id.clone(),
            title_id: t.title_id,
            max_position: (t.duration_seconds as f64 * 0.9) as u32,
        })
        .collect();
    if titles.is_empty() {
        bail!("the catalog has no titles");
    }
    Ok(Arc::new(titles))
}

pub async fn run(args: Args) -> anyhow::Result<Report> {
    let titles = titles(&args)?;
    let live = Arc::new(Live::default());
    let window = Window::new(args.warmup(), args.duration());
    let progress = progress_bar(&args, Arc::clone(&live), window);

    if !(0.0..=3600.0).contains(&args.verify_after_secs) {
        bail!(
            "--verify-after-secs must be between 0 and 3600, got {}",
            args.verify_after_secs
        );
    }
    if args.verify && matches!(args.protocol, Protocol::RedisLww | Protocol::RedisSet) {
        bail!("--verify reads back through Playhead's HTTP API; it does not apply to the redis protocols");
    }
    if !args.servers.is_empty()
        && (args.workload, args.protocol) != (Workload::Fleet, Protocol::Binary)
    {
        bail!("--servers applies to `fleet --protocol binary` only");
    }
    let outcome = match (args.workload, args.protocol) {
        (_, Protocol::RedisLww | Protocol::RedisSet) => {
            crate::redis::run(&args, &titles, &live, window).await?
        }
        (Workload::Max, Protocol::Binary) => binary::run_max(&args, &titles, &live, window).await?,
        (Workload::Fleet, Protocol::Binary) => {
            binary::run_fleet(&args, &titles, &live, window).await?
        }
        (Workload::Max | Workload::Fleet | Workload::Read, Protocol::Http)
        | (Workload::Read, Protocol::Binary) => http::run(&args, &titles, &live, window).await?,
    };
    if let Some((bar, ticker)) = progress {
        ticker.abort();
        bar.finish_and_clear();
    }
    let measured = window
        .end
        .min(Instant::now())
        .saturating_duration_since(window.measure_from);

    let verification = if args.verify {
        tokio::time::sleep(args.verify_after()).await;
        Some(verify(&args, &titles, &outcome).await?)
    } else {
        None
    };
    let report = Report::build(
        &args,
        &outcome.stats,
        measured,
        outcome.latency_of,
        verification,
    );
    report.print_table();
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, report.svg())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report)
}

fn progress_bar(
    args: &Args,
    live: Arc<Live>,
    window: Window,
) -> Option<(ProgressBar, tokio::task::JoinHandle<()>)> {
    if args.quiet {
        return None;
    }
    let total = (window.end - window.start).as_millis() as u64;
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{elapsed:>4} [{bar:30}] {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let ticker_bar = bar.clone();
    let ticker = tokio::spawn(async move {
        let mut last = (Instant::now(), 0u64);
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = Instant::now();
            let acked = load(&live.acked);
            let rate = (acked - last.1) as f64 / (now - last.0).as_secs_f64();
            last = (now, acked);
            let phase = if now < window.measure_from {
                "warm-up"
            } else {
                "measuring"
            };
            ticker_bar.set_position((now - window.start).as_millis() as u64);
            ticker_bar.set_message(format!(
                "{phase}: {rate:>12.0}/s  acked {acked}  busy {}  errors {}",
                load(&live.busy),
                load(&live.errors)
            ));
        }
    });
    Some((bar, ticker))
}

/// Asks the server (HTTP resume) for a sample of the keys written and compares.
async fn verify(
    args: &Args,
    titles: &Arc<Vec<LoadTitle>>,
    outcome: &Outcome,
) -> anyhow::Result<Verification> {
    let all = &outcome.expected;
    let sample: Vec<Expected> = if args.verify_sample == 0 || args.verify_sample >= all.len() {
        all.clone()
    } else {
        let stride = all.len() as f64 / args.verify_sample as f64;
        (0..args.verify_sample)
            .map(|i| all[(i as f64 * stride) as usize])
            .collect()
    };
    let mut result = http::verify(args, titles, &sample).await?;
    result.keys_written = all.len() as u64;
    result.unverifiable = outcome.unverifiable;
    Ok(result)
}
