//! Metrics: cheap counters and fixed-bucket histograms that components keep, and the
//! `prometheus-client` registry they register into. Names and labels are a contract,
//! documented in docs/metrics.md (and checked against `/metrics` by tests/metrics_doc.rs).
//!
//! Hot paths bump relaxed atomics once per request or batch — never per record, never a
//! lock; per-shard counters of the coalescer are summed only when scraped. So every
//! component exposes its counters through the registry's [`Collector`] interface (read at
//! scrape time), not through the crate's own metric types: each component has an
//! `encode_metrics` that describes its families, registers it once at start
//! ([`register`]), and `/metrics` only encodes the registry ([`encode`]), in the
//! Prometheus text format 0.0.4 (escaping of help texts and label values by the crate).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use prometheus_client::collector::Collector;
pub use prometheus_client::encoding::DescriptorEncoder;
pub use prometheus_client::registry::Registry;

use prometheus_client::encoding::prometheus_text;
use prometheus_client::encoding::{
    EncodeCounterValue, EncodeGaugeValue, EncodeLabelSet, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::MetricType;

/// The `Content-Type` of what [`encode`] writes.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// What a component's `encode_metrics` returns: only a failing writer fails it.
pub type Encoded = Result<(), std::fmt::Error>;

/// Upper bounds of histogram buckets, in seconds: 50 µs to 10 s, roughly ×2.5 apart.
pub const BUCKETS_SECONDS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
    10.0,
];

/// A latency histogram: one relaxed atomic add per bucket hit, plus sum and count.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS_SECONDS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        if let Some(i) = BUCKETS_SECONDS.iter().position(|&b| seconds <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanos
            .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Encodes this histogram's `_bucket`, `_sum` and `_count` samples (the encoder makes
    /// the buckets cumulative and adds `+Inf`, the count).
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Encoded {
        let buckets: [(f64, u64); BUCKETS_SECONDS.len()] =
            std::array::from_fn(|i| (BUCKETS_SECONDS[i], load(&self.buckets[i])));
        let sum = load(&self.sum_nanos) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, self.count(), &buckets, None)
    }
}

/// Registers a component's `encode_metrics`, called at every scrape. `name` says whose
/// it is in the registry's debug output.
pub fn register<F>(registry: &mut Registry, name: &'static str, encode_metrics: F)
where
    F: Fn(&mut DescriptorEncoder<'_>) -> Encoded + Send + Sync + 'static,
{
    registry.register_collector(Box::new(FnCollector {
        name,
        encode: encode_metrics,
    }));
}

struct FnCollector<F> {
    name: &'static str,
    encode: F,
}

impl<F> std::fmt::Debug for FnCollector<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FnCollector")
            .field("name", &self.name)
            .finish()
    }
}

impl<F> Collector for FnCollector<F>
where
    F: Fn(&mut DescriptorEncoder<'_>) -> Encoded + Send + Sync + 'static,
{
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Encoded {
        (self.encode)(&mut encoder)
    }
}

/// Every registered metric in the Prometheus text format 0.0.4.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::with_capacity(16 * 1024);
    prometheus_text::encode(&mut out, registry).expect("writing to a String cannot fail");
    out
}

/// The family name the encoder takes for a counter: it appends `_total` itself. Code names
/// counters in full, as docs/metrics.md and every query do.
fn counter_family(name: &str) -> &str {
    let family = name.strip_suffix("_total");
    debug_assert!(family.is_some(), "counter {name} must end in _total");
    family.unwrap_or(name)
}

/// One unlabelled counter (`name` ends in `_total`).
pub fn counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: impl EncodeCounterValue,
) -> Encoded {
    encoder
        .encode_descriptor(counter_family(name), help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, _, u64>(&value, None)
}

/// One counter family: a sample per label set.
pub fn counters<L, V>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, V)>,
) -> Encoded
where
    L: EncodeLabelSet,
    V: EncodeCounterValue,
{
    let mut family =
        encoder.encode_descriptor(counter_family(name), help, None, MetricType::Counter)?;
    for (labels, value) in samples {
        family
            .encode_family(&labels)?
            .encode_counter::<NoLabelSet, _, u64>(&value, None)?;
    }
    Ok(())
}

/// One unlabelled gauge.
pub fn gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: impl EncodeGaugeValue,
) -> Encoded {
    encoder
        .encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&value)
}

/// One gauge family: a sample per label set.
pub fn gauges<L, V>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, V)>,
) -> Encoded
where
    L: EncodeLabelSet,
    V: EncodeGaugeValue,
{
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in samples {
        family.encode_family(&labels)?.encode_gauge(&value)?;
    }
    Ok(())
}

/// One unlabelled histogram.
pub fn histogram(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    histogram: &Histogram,
) -> Encoded {
    histogram.encode(encoder.encode_descriptor(name, help, None, MetricType::Histogram)?)
}

/// One histogram family: a histogram per label set.
pub fn histograms<'h, L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, &'h Histogram)>,
) -> Encoded {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, h) in samples {
        h.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

pub fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(
        f: impl Fn(&mut DescriptorEncoder<'_>) -> Encoded + Send + Sync + 'static,
    ) -> String {
        let mut registry = Registry::default();
        register(&mut registry, "test", f);
        encode(&registry)
    }

    #[test]
    fn histogram_encodes_cumulative_buckets() {
        let h = std::sync::Arc::new(Histogram::default());
        h.observe(Duration::from_micros(30));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let out = encoded(move |e| histograms(e, "x_seconds", "X.", [([("route", "a")], &*h)]));
        assert!(out.contains("# TYPE x_seconds histogram\n"), "{out}");
        assert!(
            out.contains("x_seconds_bucket{route=\"a\",le=\"5e-05\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{route=\"a\",le=\"0.005\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{route=\"a\",le=\"10\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{route=\"a\",le=\"+Inf\"} 3\n"),
            "{out}"
        );
        assert!(out.contains("x_seconds_count{route=\"a\"} 3\n"), "{out}");
    }

    #[test]
    fn counters_keep_their_total_name_and_label_values_are_escaped() {
        let out = encoded(|e| {
            counter(e, "x_done_total", "Done.", 3_u64)?;
            counters(e, "x_by_total", "By.", [([("why", "a\"b")], 1_u64)])
        });
        assert!(out.contains("# HELP x_done_total Done.\n"), "{out}");
        assert!(
            out.contains("# TYPE x_done_total counter\nx_done_total 3\n"),
            "{out}"
        );
        assert!(out.contains("x_by_total{why=\"a\\\"b\"} 1\n"), "{out}");
    }
}
