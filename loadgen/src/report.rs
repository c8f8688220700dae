//! Counting, latency histograms, and the final report (table, JSON, SVG curve).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::Args;

/// Timer slack tolerated before a send counts as late: tokio's timers have 1 ms
/// resolution, so a send up to this much after its intended time is the generator's own
/// wake-up delay, not the server's.
pub const TIMER_SLACK: Duration = Duration::from_millis(2);

/// Where a latency sample starts (coordinated-omission correction): at the intended send
/// time when the generator fell behind its schedule (the server was slow to answer the
/// earlier requests), else at the actual send.
pub fn latency_start(intended: Instant, sent: Instant) -> Instant {
    if sent.saturating_duration_since(intended) > TIMER_SLACK {
        intended
    } else {
        sent
    }
}

/// Counters shared by every connection task, read by the progress bar.
#[derive(Default)]
pub struct Live {
    /// Records (heartbeats) or requests acknowledged since start, warm-up included.
    pub acked: AtomicU64,
    pub busy: AtomicU64,
    pub errors: AtomicU64,
}

/// The measurement window: warm-up first, then the measured stretch.
#[derive(Clone, Copy)]
pub struct Window {
    pub start: Instant,
    pub measure_from: Instant,
    pub end: Instant,
}

impl Window {
    pub fn new(warmup: Duration, duration: Duration) -> Self {
        let start = timeline_origin().0;
        Self {
            start,
            measure_from: start + warmup,
            end: start + warmup + duration,
        }
    }

    pub fn measuring(&self, at: Instant) -> bool {
        at >= self.measure_from && at < self.end
    }
}

/// What one connection task measured inside the window.
pub struct TaskStats {
    /// Latency in microseconds, per batch (binary) or request (HTTP).
    pub latency_us: Histogram<u64>,
    /// Records or requests acknowledged inside the window.
    pub acked: u64,
    /// `fleet`: heartbeats scheduled inside the window (paused viewers send none), whether
    /// or not the generator got to send them.
    pub due: u64,
    /// `fleet`: of those, how many were acknowledged (whenever the answer came).
    pub due_acked: u64,
    pub busy: u64,
    pub rejected: u64,
    pub errors: u64,
    pub reads: u64,
    /// The worst latency (µs) of each second, by whole seconds since [`timeline_origin`]:
    /// where in a run the tail came from, to set against the server's log.
    pub worst_us_per_sec: Vec<u64>,
    /// The same for how late the generator sent against its schedule (`fleet`): the part
    /// of a latency sample that is the generator's own.
    pub late_us_per_sec: Vec<u64>,
}

/// Seconds a latency timeline covers at most (an hour): its memory stays bounded.
const TIMELINE_SECS: usize = 3600;

/// The instant latency timelines count from, and the wall-clock time then (Unix ms).
pub fn timeline_origin() -> (Instant, u64) {
    static ORIGIN: std::sync::OnceLock<(Instant, u64)> = std::sync::OnceLock::new();
    *ORIGIN.get_or_init(|| {
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        (Instant::now(), unix_ms)
    })
}

impl TaskStats {
    pub fn new() -> Self {
        Self {
            latency_us: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
            acked: 0,
            due: 0,
            due_acked: 0,
            busy: 0,
            rejected: 0,
            errors: 0,
            reads: 0,
            worst_us_per_sec: Vec::new(),
            late_us_per_sec: Vec::new(),
        }
    }

    pub fn record_latency(&mut self, elapsed: Duration) {
        let us = (elapsed.as_micros() as u64).clamp(1, 60_000_000);
        let _ = self.latency_us.record(us);
        worst_this_second(&mut self.worst_us_per_sec, us);
    }

    /// A send `late` after its scheduled time.
    pub fn record_lateness(&mut self, late: Duration) {
        worst_this_second(&mut self.late_us_per_sec, late.as_micros() as u64);
    }

    pub fn merge(&mut self, other: &TaskStats) {
        let _ = self.latency_us.add(&other.latency_us);
        self.acked += other.acked;
        self.due += other.due;
        self.due_acked += other.due_acked;
        self.busy += other.busy;
        self.rejected += other.rejected;
        self.errors += other.errors;
        self.reads += other.reads;
        max_each(&mut self.worst_us_per_sec, &other.worst_us_per_sec);
        max_each(&mut self.late_us_per_sec, &other.late_us_per_sec);
    }
}

/// Keeps `us` in `timeline`'s slot for the current second if it is the worst there.
fn worst_this_second(timeline: &mut Vec<u64>, us: u64) {
    let second = timeline_origin().0.elapsed().as_secs() as usize;
    if second < TIMELINE_SECS {
        if timeline.len() <= second {
            timeline.resize(second + 1, 0);
        }
        timeline[second] = timeline[second].max(us);
    }
}

fn max_each(mine: &mut Vec<u64>, theirs: &[u64]) {
    if mine.len() < theirs.len() {
        mine.resize(theirs.len(), 0);
    }
    for (m, t) in mine.iter_mut().zip(theirs) {
        *m = (*m).max(*t);
    }
}

#[derive(Serialize)]
pub struct Latency {
    pub unit: &'static str,
    pub samples: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
    /// (percentile, milliseconds) points of the whole curve.
    pub curve: Vec<(f64, f64)>,
    /// The worst latency of each second (ms; 0 where nothing was answered), the first
    /// starting at `timeline_start_unix_ms`: warm-up included, to line up with server logs.
    pub worst_per_sec: Vec<f64>,
    /// The worst lateness of the generator's sends in each second (ms), same seconds.
    pub late_per_sec: Vec<f64>,
    pub timeline_start_unix_ms: u64,
}

#[derive(Serialize, Default)]
pub struct Verification {
    pub keys_written: u64,
    pub checked: u64,
    /// Keys answered wrong, or still degraded after every retry.
    pub mismatches: u64,
    /// Keys whose first answer was degraded (the server could not read its store within
    /// its read budget and said so) and whose retry answered right: no lost write, a slow
    /// store. Counted apart so a run shows both.
    pub degraded_then_right: u64,
    /// Requests sent again on a new connection because the one they were on failed (a
    /// balancer cutting a node's connections): not answers, so neither right nor wrong.
    pub connection_retries: u64,
    pub unverifiable: u64,
    pub examples: Vec<String>,
}

#[derive(Serialize)]
pub struct Report {
    pub tool: &'static str,
    pub date_unix_s: u64,
    pub machine_cores: usize,
    pub args: Args,
    pub measured_secs: f64,
    /// Heartbeats (or requests) acknowledged per second in the measured window.
    pub acked_per_sec: f64,
    pub acked: u64,
    /// `fleet`: heartbeats due in the window (scheduled, pauses excluded), how many of
    /// them were acknowledged, and the ratio (1.0 when the server kept up with the fleet).
    pub due: u64,
    pub due_acked: u64,
    pub due_acked_ratio: f64,
    pub reads: u64,
    pub busy: u64,
    pub rejected: u64,
    pub errors: u64,
    /// What a latency sample is: `batch` (binary) or `request` (HTTP).
    pub latency_of: &'static str,
    pub latency: Latency,
    pub verification: Option<Verification>,
}

impl Report {
    pub fn build(
        args: &Args,
        stats: &TaskStats,
        measured: Duration,
        latency_of: &'static str,
        verification: Option<Verification>,
    ) -> Self {
        let h = &stats.latency_us;
        let ms = |us: u64| us as f64 / 1000.0;
        let curve = [
            0.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 99.999, 100.0,
        ]
        .iter()
        .map(|&p| (p, ms(h.value_at_quantile(p / 100.0))))
        .collect();
        Self {
            tool: "playhead-loadgen",
            date_unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            machine_cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            args: args.clone(),
            measured_secs: measured.as_secs_f64(),
            acked_per_sec: stats.acked as f64 / measured.as_secs_f64().max(1e-9),
            acked: stats.acked,
            due: stats.due,
            due_acked: stats.due_acked,
            due_acked_ratio: if stats.due > 0 {
                stats.due_acked as f64 / stats.due as f64
            } else {
                0.0
            },
            reads: stats.reads,
            busy: stats.busy,
            rejected: stats.rejected,
            errors: stats.errors,
            latency_of,
            latency: Latency {
                unit: "ms",
                samples: h.len(),
                p50: ms(h.value_at_quantile(0.50)),
                p90: ms(h.value_at_quantile(0.90)),
                p99: ms(h.value_at_quantile(0.99)),
                p999: ms(h.value_at_quantile(0.999)),
                max: ms(h.max()),
                worst_per_sec: stats.worst_us_per_sec.iter().map(|&us| ms(us)).collect(),
                late_per_sec: stats.late_us_per_sec.iter().map(|&us| ms(us)).collect(),
                timeline_start_unix_ms: timeline_origin().1,
                mean: h.mean() / 1000.0,
                curve,
            },
            verification,
        }
    }

    /// A failed verification fails the run.
    pub fn failed(&self) -> bool {
        self.verification.as_ref().is_some_and(|v| v.mismatches > 0)
    }

    pub fn print_table(&self) {
        let a = &self.args;
        println!();
        println!(
            "playhead-loadgen {:?}/{:?}: {} connections, {} loadgen threads, {} cores, {:.1} s measured after {:.1} s warm-up{}",
            a.workload,
            a.protocol,
            a.connections,
            a.threads,
            self.machine_cores,
            self.measured_secs,
            a.warmup_secs,
            if a.workload == crate::Workload::Fleet {
                format!(", open loop: {} viewers every {} s", a.viewers, a.heartbeat_secs)
            } else if a.rate > 0.0 {
                format!(", open loop at {:.0}/s", a.rate)
            } else {
                ", closed loop".into()
            },
        );
        println!("  {:<28} {:>14}", "acknowledged", self.acked);
        println!(
            "  {:<28} {:>14.0}",
            "acknowledged per second", self.acked_per_sec
        );
        if self.due > 0 {
            println!("  {:<28} {:>14}", "due (scheduled, in window)", self.due);
            println!(
                "  {:<28} {:>14}   ratio {:.4}",
                "due and acknowledged", self.due_acked, self.due_acked_ratio
            );
        }
        if self.reads > 0 {
            println!("  {:<28} {:>14}", "reads", self.reads);
        }
        println!("  {:<28} {:>14}", "busy (retried)", self.busy);
        println!("  {:<28} {:>14}", "rejected records", self.rejected);
        println!("  {:<28} {:>14}", "errors", self.errors);
        let l = &self.latency;
        println!(
            "  latency per {} (ms)        p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  ({} samples)",
            self.latency_of, l.p50, l.p90, l.p99, l.p999, l.max, l.samples
        );
        if let Some(v) = &self.verification {
            println!(
                "  verify: {} keys written, {} checked, {} mismatches, {} unverifiable, {} degraded then right on a retry, {} requests sent again on a new connection{}",
                v.keys_written,
                v.checked,
                v.mismatches,
                v.unverifiable,
                v.degraded_then_right,
                v.connection_retries,
                if v.mismatches == 0 {
                    " — OK"
                } else {
                    " — FAILED"
                }
            );
            for e in &v.examples {
                println!("    {e}");
            }
        }
    }

    /// The latency percentile curve: x = percentile on a log scale of 1/(1-p), y = ms.
    pub fn svg(&self) -> String {
        let (w, h, pad) = (720.0, 420.0, 60.0);
        let points: Vec<(f64, f64)> = self
            .latency
            .curve
            .iter()
            .filter(|(p, _)| *p < 100.0)
            .map(|&(p, ms)| ((1.0 / (1.0 - p / 100.0)).log10(), ms))
            .collect();
        let x_max = points.iter().map(|p| p.0).fold(1.0_f64, f64::max);
        let y_max = points.iter().map(|p| p.1).fold(0.001_f64, f64::max) * 1.1;
        let sx = |x: f64| pad + x / x_max * (w - 2.0 * pad);
        let sy = |y: f64| h - pad - y / y_max * (h - 2.0 * pad);
        let line: Vec<String> = points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let mut svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"{pad}\" y=\"24\" font-size=\"14\">playhead-loadgen {:?}/{:?}: latency per {} by percentile ({:.0}/s acknowledged)</text>\n\
             <line x1=\"{pad}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
             <line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{}\" stroke=\"black\"/>\n\
             <polyline fill=\"none\" stroke=\"steelblue\" stroke-width=\"2\" points=\"{}\"/>\n",
            self.args.workload,
            self.args.protocol,
            self.latency_of,
            self.acked_per_sec,
            h - pad,
            w - pad,
            h - pad,
            h - pad,
            line.join(" ")
        );
        for (label, p) in [
            ("50%", 50.0),
            ("90%", 90.0),
            ("99%", 99.0),
            ("99.9%", 99.9),
            ("99.99%", 99.99),
            ("99.999%", 99.999),
        ] {
            let x = sx((1.0 / (1.0 - p / 100.0_f64)).log10());
            svg.push_str(&format!(
                "<text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{label}</text>\n",
                h - pad + 18.0
            ));
        }
        for i in 0..=4 {
            let y = y_max * f64::from(i) / 4.0;
            svg.push_str(&format!(
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{y:.2} ms</text>\n",
                pad - 6.0,
                sy(y) + 4.0
            ));
        }
        svg.push_str("</svg>\n");
        svg
    }
}

/// Reads a live counter.
pub fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Merged timelines keep each second's worst of every connection, whatever their
    /// lengths.
    #[test]
    fn merged_timelines_keep_each_seconds_worst() {
        let mut a = TaskStats::new();
        let mut b = TaskStats::new();
        a.worst_us_per_sec = vec![5, 1];
        b.worst_us_per_sec = vec![3, 7, 2];
        b.late_us_per_sec = vec![4];
        a.merge(&b);
        assert_eq!(a.worst_us_per_sec, vec![5, 7, 2]);
        assert_eq!(a.late_us_per_sec, vec![4]);
        a.record_latency(Duration::from_micros(9));
        let now = timeline_origin().0.elapsed().as_secs() as usize;
        assert!(a.worst_us_per_sec[now] >= 9);
    }
}
