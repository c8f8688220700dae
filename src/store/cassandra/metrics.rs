//! The Cassandra store's own metrics, `playhead_cassandra_*` (docs/cassandra.md): request
//! counters and latency by operation, the in-flight gauge, the driver's retries and the two
//! circuit breakers. Relaxed atomics bumped once per request; encoded at scrape time.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use scylla::errors::{RequestAttemptError, RequestError};
use scylla::observability::history::{AttemptId, HistoryListener, RequestId, SpeculativeId};
use scylla::policies::retry::RetryDecision;

use crate::store::breaker::CircuitBreaker;
use crate::telemetry::metrics::{
    counter, counters, gauge, gauges, histograms, load, DescriptorEncoder, Encoded, Histogram,
};

/// Request kinds, the `op` label of the metrics.
pub(super) const OPS: [&str; 3] = ["write", "get", "list"];

#[derive(Clone, Copy)]
pub(super) enum Op {
    Write = 0,
    Get = 1,
    List = 2,
}

/// Counters of the store, rendered at `/metrics` as `playhead_cassandra_*`.
#[derive(Debug, Default)]
pub(super) struct CassandraMetrics {
    pub(super) requests: [AtomicU64; 3],
    pub(super) errors: [AtomicU64; 3],
    pub(super) timeouts: [AtomicU64; 3],
    pub(super) rows_written: AtomicU64,
    /// Requests whose caller stopped waiting before the answer (a read past the engine's
    /// budget, the rest of a flush batch after a failure); neither success nor failure.
    pub(super) cancelled: [AtomicU64; 3],
    /// Requests refused by an open breaker without being sent, by breaker.
    pub(super) breaker_refused: [AtomicU64; 2],
    pub(super) in_flight: AtomicI64,
    pub(super) latency: [Histogram; 3],
    /// Attempts the driver retried (its retry policy), counted by the history listener.
    pub(super) driver_retries: Arc<AtomicU64>,
}

/// The two breakers: writes (flushes) and reads (resume, continue-watching) are judged
/// apart. The `breaker` label of the metrics.
pub(super) const BREAKERS: [&str; 2] = ["write", "read"];

impl Op {
    /// Index into [`BREAKERS`].
    pub(super) fn breaker(self) -> usize {
        match self {
            Op::Write => 0,
            Op::Get | Op::List => 1,
        }
    }
}

/// Counts one request as cancelled unless disarmed: dropped with the caller's future.
pub(super) struct CancelGuard<'a>(pub(super) Option<&'a AtomicU64>);

impl CancelGuard<'_> {
    pub(super) fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CancelGuard<'_> {
    fn drop(&mut self) {
        if let Some(counter) = self.0 {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One request counted in the in-flight gauge for as long as it lives.
pub(super) struct InFlight<'a>(&'a AtomicI64);

impl<'a> InFlight<'a> {
    pub(super) fn enter(gauge: &'a AtomicI64) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        Self(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts the driver's retry decisions. The ids it hands out only need to be unique.
#[derive(Debug)]
pub(super) struct RetryCounter {
    pub(super) retries: Arc<AtomicU64>,
    pub(super) next_id: AtomicU64,
}

impl RetryCounter {
    fn id(&self) -> usize {
        self.next_id.fetch_add(1, Ordering::Relaxed) as usize
    }
}

impl HistoryListener for RetryCounter {
    fn log_request_start(&self) -> RequestId {
        RequestId(self.id())
    }
    fn log_request_success(&self, _: RequestId) {}
    fn log_request_error(&self, _: RequestId, _: &RequestError) {}
    fn log_new_speculative_fiber(&self, _: RequestId) -> SpeculativeId {
        SpeculativeId(self.id())
    }
    fn log_attempt_start(
        &self,
        _: RequestId,
        _: Option<SpeculativeId>,
        _: std::net::SocketAddr,
    ) -> AttemptId {
        AttemptId(self.id())
    }
    fn log_attempt_success(&self, _: AttemptId) {}
    fn log_attempt_error(&self, _: AttemptId, _: &RequestAttemptError, decision: &RetryDecision) {
        if matches!(
            decision,
            RetryDecision::RetrySameTarget(_) | RetryDecision::RetryNextTarget(_)
        ) {
            self.retries.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl CassandraMetrics {
    /// The `playhead_cassandra_*` families (docs/cassandra.md); `breakers` are the store's
    /// write and read breakers, in [`BREAKERS`] order.
    pub(super) fn encode(
        &self,
        breakers: &[Arc<CircuitBreaker>; 2],
        e: &mut DescriptorEncoder<'_>,
    ) -> Encoded {
        for (name, help, per_op) in [
            (
                "playhead_cassandra_requests_total",
                "Requests sent to the cluster, by operation.",
                &self.requests,
            ),
            (
                "playhead_cassandra_errors_total",
                "Requests that failed (driver or server error, timeouts included), by operation.",
                &self.errors,
            ),
            (
                "playhead_cassandra_timeouts_total",
                "Requests that hit store.cassandra.request_timeout_ms, by operation.",
                &self.timeouts,
            ),
            (
                "playhead_cassandra_cancelled_total",
                "Requests whose caller stopped waiting before the answer (not failures), by operation.",
                &self.cancelled,
            ),
        ] {
            let samples = OPS.iter().zip(per_op).map(|(op, n)| ([("op", *op)], load(n)));
            counters(e, name, help, samples)?;
        }
        counter(
            e,
            "playhead_cassandra_driver_retries_total",
            "Attempts the driver's retry policy sent again.",
            load(&self.driver_retries),
        )?;
        counter(
            e,
            "playhead_cassandra_rows_written_total",
            "Rows acknowledged by the cluster.",
            load(&self.rows_written),
        )?;
        gauge(
            e,
            "playhead_cassandra_in_flight_requests",
            "Requests outstanding now.",
            self.in_flight.load(Ordering::Relaxed).max(0),
        )?;
        let per_breaker = |value: &dyn Fn(usize) -> u64| {
            BREAKERS
                .iter()
                .enumerate()
                .map(|(i, which)| ([("breaker", *which)], value(i)))
                .collect::<Vec<_>>()
        };
        gauges(
            e,
            "playhead_cassandra_breaker_state",
            "Circuit breaker of writes / of reads: 0 closed, 1 open, 2 half-open.",
            per_breaker(&|i| u64::from(breakers[i].state().as_gauge())),
        )?;
        counters(
            e,
            "playhead_cassandra_breaker_opened_total",
            "Times the circuit breaker opened.",
            per_breaker(&|i| breakers[i].times_opened()),
        )?;
        counters(
            e,
            "playhead_cassandra_breaker_refused_total",
            "Requests refused by the open breaker without being sent.",
            per_breaker(&|i| load(&self.breaker_refused[i])),
        )?;
        counters(
            e,
            "playhead_cassandra_breaker_probes_abandoned_total",
            "Half-open probes dropped without an outcome (0 unless a probe task panicked).",
            per_breaker(&|i| breakers[i].probes_abandoned()),
        )?;
        histograms(
            e,
            "playhead_cassandra_request_duration_seconds",
            "Latency of requests to the cluster, by operation.",
            OPS.iter()
                .zip(&self.latency)
                .map(|(op, h)| ([("op", *op)], h)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::breaker;
    use std::time::Duration;

    #[test]
    fn metrics_encode_every_family_with_op_labels() {
        let m = CassandraMetrics::default();
        m.requests[Op::Get as usize].fetch_add(3, Ordering::Relaxed);
        m.latency[Op::Write as usize].observe(Duration::from_millis(2));
        {
            let _one = InFlight::enter(&m.in_flight);
            assert_eq!(m.in_flight.load(Ordering::Relaxed), 1);
        }
        m.cancelled[Op::Get as usize].fetch_add(2, Ordering::Relaxed);
        let breakers = [(); 2].map(|()| CircuitBreaker::new(1, Duration::from_secs(1)));
        match breakers[1].admit() {
            breaker::Admission::Go(ticket) => ticket.failure(),
            other => panic!("a closed breaker admits, got {other:?}"),
        }
        let mut registry = crate::telemetry::metrics::Registry::default();
        crate::telemetry::metrics::register(&mut registry, "cassandra", move |e| {
            m.encode(&breakers, e)
        });
        let out = crate::telemetry::metrics::encode(&registry);
        for line in [
            "playhead_cassandra_requests_total{op=\"get\"} 3\n",
            "playhead_cassandra_errors_total{op=\"list\"} 0\n",
            "playhead_cassandra_in_flight_requests 0\n",
            "playhead_cassandra_cancelled_total{op=\"get\"} 2\n",
            "playhead_cassandra_breaker_state{breaker=\"write\"} 0\n",
            "playhead_cassandra_breaker_state{breaker=\"read\"} 1\n",
            "playhead_cassandra_breaker_opened_total{breaker=\"read\"} 1\n",
            "playhead_cassandra_breaker_refused_total{breaker=\"write\"} 0\n",
            "playhead_cassandra_breaker_probes_abandoned_total{breaker=\"read\"} 0\n",
            "playhead_cassandra_request_duration_seconds_count{op=\"write\"} 1\n",
            "# TYPE playhead_cassandra_driver_retries_total counter\n",
        ] {
            assert!(out.contains(line), "missing {line:?} in\n{out}");
        }
    }
}
