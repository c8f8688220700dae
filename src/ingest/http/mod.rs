//! The HTTP listener: the public API (`/api/v1`), `/metrics`, `/healthz`, `/readyz`.
//!
//! hyper's HTTP/1.1 connections, served by our own accept loop so every limit is ours: at
//! most `http.max_connections` connections (more are closed at once), request headers
//! within `http.header_read_timeout_ms` (slowloris), whole requests within
//! `http.request_timeout_ms` (408), bodies up to `http.max_body_bytes` (413). Routing is a
//! `match` on the exact path ([`route_of`]) and handlers take the request by reference: no
//! router, no extractors, no boxed bodies, one allocation per request for the handler's
//! future (BENCHMARKS.md, issue 3). The deadlines: `conn`.

pub mod api;
pub mod config;
mod conn;
pub mod error;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;
use crate::ingest::auth::Verifier;
use crate::ingest::listener::{next_connection, ConnectionLimit};
use crate::ingest::metrics::PROTOCOLS;
use crate::ingest::Ingest;
use crate::resume::DeviceNames;
use crate::store::WriteHealth;
use crate::telemetry::metrics::{self, Histogram};
use error::ApiError;

/// Every answer: a whole body in one buffer (the largest is `/metrics`, ~16 KiB), so hyper
/// writes head and body with one `writev` and nothing is boxed.
pub type Response = hyper::Response<Full<Bytes>>;

/// Everything a handler needs; shared by all connections.
pub struct AppState {
    /// The engine, catalog, heartbeat rules and ingest counters, shared with the binary
    /// listener.
    pub ingest: Arc<Ingest>,
    pub verifier: Verifier,
    pub config: Config,
    /// Device names for `last_device_id` (only HTTP heartbeats carry names).
    pub devices: DeviceNames,
    pub metrics: HttpMetrics,
}

impl AppState {
    pub fn new(ingest: Arc<Ingest>, verifier: Verifier) -> Self {
        let config = ingest.engine().config().clone();
        Self {
            devices: DeviceNames::new(config.api.max_device_names),
            metrics: HttpMetrics::default(),
            ingest,
            verifier,
            config,
        }
    }
}

/// Serves `listener` until `shutdown` flips; then stops accepting, lets in-flight requests
/// finish (bounded by `http.request_timeout_ms`) and returns.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let http = state.config.http.clone();
    let limit = ConnectionLimit::new(http.max_connections);
    let counters = Arc::clone(&state.ingest.metrics().http_connections);
    let graceful = GracefulShutdown::new();
    while let Some(stream) = next_connection(&listener, &mut shutdown, "HTTP").await {
        let Some(admitted) = limit.admit(&counters) else {
            drop(stream);
            continue;
        };
        // Answers are one small write each: send them at once (no Nagle delay).
        let _ = stream.set_nodelay(true);
        let conn = conn::serve(stream, Arc::clone(&state), &graceful);
        tokio::spawn(async move {
            conn.await;
            drop(admitted);
        });
    }
    drop(listener);
    let grace = Duration::from_millis(http.request_timeout_ms);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "some HTTP connections were still busy after {} ms; closed",
            grace.as_millis()
        );
    }
}

/// Answers one request: routes it, answers 408 when the connection's watchdog says its
/// time is up, counts it by route and status, and counts refused heartbeats by reason.
async fn handle(
    state: &AppState,
    watch: &conn::Watch,
    request: Request<Incoming>,
    started: Instant,
) -> Response {
    let route = route_of(request.method(), request.uri().path());
    let outcome = conn::until_expired(watch, route_request(state, route, request))
        .await
        .unwrap_or_else(|| {
            Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the request did not complete within {} ms",
                    state.config.http.request_timeout_ms
                ),
            ))
        });
    let response = match outcome {
        Ok(response) => response,
        Err(error) => {
            if matches!(route, Route::PostProgress) {
                state.ingest.metrics().rejected("http", error.code, 1);
            }
            error.into_response()
        }
    };
    let finished = Instant::now();
    watch.end(finished);
    state
        .metrics
        .observe(route as usize, response.status(), finished - started);
    response
}

/// The handler of `route`; 404/405 for what matches none.
async fn route_request(
    state: &AppState,
    route: Route,
    request: Request<Incoming>,
) -> Result<Response, ApiError> {
    // HEAD is answered like GET (hyper sends the head only), as a GET route must; it keeps
    // the `other` label in the metrics.
    let method = request.method();
    let get = method == Method::GET || method == Method::HEAD;
    let path = request.uri().path();
    let route = if method == Method::HEAD {
        route_of(&Method::GET, path)
    } else {
        route
    };
    match route {
        Route::PostProgress => api::post_progress(state, request).await,
        Route::DeleteProgress => api::delete_progress(state, &request).await,
        Route::GetStream if get => api::get_stream(state, &request).await,
        Route::ContinueWatching if get => api::continue_watching(state, &request).await,
        Route::Metrics if get => Ok(metrics_endpoint(state)),
        Route::Healthz if get => Ok(healthz()),
        Route::Readyz if get => Ok(readyz(state).await),
        _ => match path {
            PROGRESS_PATH => Err(api::method_not_allowed("POST,DELETE")),
            STREAM_PATH | CONTINUE_WATCHING_PATH | METRICS_PATH | HEALTHZ_PATH | READYZ_PATH => {
                Err(api::method_not_allowed("GET,HEAD"))
            }
            _ => Err(api::not_found()),
        },
    }
}

/// Routes as metric labels (a fixed set, so counters are plain arrays).
const ROUTES: [&str; 8] = [
    "post_progress",
    "delete_progress",
    "get_stream",
    "continue_watching",
    "metrics",
    "healthz",
    "readyz",
    "other",
];
const CLASSES: [&str; 3] = ["2xx", "4xx", "5xx"];
const STATUSES: [u16; 14] = [
    200, 204, 400, 401, 404, 405, 408, 413, 415, 422, 429, 500, 503, 0,
];

/// The paths served; [`route_of`] and the 405 answers of [`route_request`] share them.
const PROGRESS_PATH: &str = "/api/v1/stream/progress";
const STREAM_PATH: &str = "/api/v1/stream";
const CONTINUE_WATCHING_PATH: &str = "/api/v1/continue-watching";
const METRICS_PATH: &str = "/metrics";
const HEALTHZ_PATH: &str = "/healthz";
const READYZ_PATH: &str = "/readyz";

/// A request's route; as `usize`, its index in [`ROUTES`].
#[derive(Clone, Copy)]
enum Route {
    PostProgress,
    DeleteProgress,
    GetStream,
    ContinueWatching,
    Metrics,
    Healthz,
    Readyz,
    Other,
}

/// The metric label of a request (and, but for the method check of GET routes, its
/// handler): a match on the exact path, no router.
fn route_of(method: &Method, path: &str) -> Route {
    match (path, method) {
        (PROGRESS_PATH, &Method::POST) => Route::PostProgress,
        (PROGRESS_PATH, &Method::DELETE) => Route::DeleteProgress,
        (STREAM_PATH, &Method::GET) => Route::GetStream,
        (CONTINUE_WATCHING_PATH, &Method::GET) => Route::ContinueWatching,
        (METRICS_PATH, _) => Route::Metrics,
        (HEALTHZ_PATH, _) => Route::Healthz,
        (READYZ_PATH, _) => Route::Readyz,
        _ => Route::Other,
    }
}

/// The HTTP listener's own counters and histograms (its connections and the heartbeats it
/// took are counted with the binary listener's, in [`crate::ingest::metrics`]).
#[derive(Default)]
pub struct HttpMetrics {
    requests: [[AtomicU64; STATUSES.len()]; ROUTES.len()],
    latency: [[Histogram; CLASSES.len()]; ROUTES.len()],
    pub resume_read_seconds: Histogram,
}

impl HttpMetrics {
    fn observe(&self, route: usize, status: StatusCode, elapsed: Duration) {
        let code = status.as_u16();
        let s = STATUSES
            .iter()
            .position(|&c| c == code)
            .unwrap_or(STATUSES.len() - 1);
        self.requests[route][s].fetch_add(1, Ordering::Relaxed);
        let class = match code {
            500.. => 2,
            400..500 => 1,
            _ => 0,
        };
        self.latency[route][class].observe(elapsed);
    }
}

fn healthz() -> Response {
    json_response(StatusCode::OK, serde_json::json!({"status": "alive"}))
}

/// Ready when the log was replayed (it was, or we would not be serving) and writable, and
/// says whether the store answers (`ready`) or reads are degraded (`degraded`, still 200:
/// the service keeps serving from memory and answers position 0 otherwise). Flushing that
/// fails (the latest cycle failed: a flush task panicked) is `degraded` too, with
/// `"flush": "failing: …"`: heartbeats are still acknowledged into the log, but nothing
/// reaches the store.
async fn readyz(state: &AppState) -> Response {
    let engine = state.ingest.engine();
    if let Some(reason) = engine.log_failing() {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "unavailable", "wal": format!("failing: {reason}"), "store": "unknown"}),
        );
    }
    let flush_failing = engine.stats().flush_health.failing();
    let flush = match &flush_failing {
        Some((cycles, error)) => format!("failing: {error} ({cycles} cycles in a row)"),
        None => "ok".to_string(),
    };
    if let Some(error) = engine.store_write_health().and_then(WriteHealth::failing) {
        // Still serving (from memory, acknowledging into the log), but nothing reaches
        // the store: `degraded`, as for a store that cannot be read.
        return json_response(
            StatusCode::OK,
            serde_json::json!({"status": "degraded", "wal": "replayed", "store": format!("failing: {error}"), "flush": flush, "store_kind": engine.store_name()}),
        );
    }
    let (status, store) = match engine.probe_store().await {
        Ok(()) => ("ready", "reachable".to_string()),
        Err(why) => ("degraded", why),
    };
    let status = if flush_failing.is_some() {
        "degraded"
    } else {
        status
    };
    json_response(
        StatusCode::OK,
        serde_json::json!({"status": status, "wal": "replayed", "store": store, "flush": flush, "store_kind": engine.store_name()}),
    )
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response {
    respond(status, "application/json", body.to_string().into())
}

/// A response with `status`, `Content-Type: content_type` and `body`.
pub(crate) fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Response {
    let mut r = hyper::Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn metrics_endpoint(state: &AppState) -> Response {
    respond(
        StatusCode::OK,
        "text/plain; version=0.0.4",
        render(state).into(),
    )
}

/// Renders every metric (docs/metrics.md) in the Prometheus text format.
pub fn render(state: &AppState) -> String {
    use metrics::{header as head, load, sample, single};
    let mut out = String::with_capacity(16 * 1024);
    let m = &state.metrics;
    let ingest = state.ingest.metrics();
    head(
        &mut out,
        "playhead_heartbeats_accepted_total",
        "counter",
        "Heartbeats (and deletes) acknowledged, by protocol.",
    );
    for (i, p) in PROTOCOLS.iter().enumerate() {
        sample(
            &mut out,
            "playhead_heartbeats_accepted_total",
            &format!("protocol=\"{p}\""),
            load(&ingest.accepted[i]),
        );
    }
    head(
        &mut out,
        "playhead_heartbeats_rejected_total",
        "counter",
        "Heartbeats refused, by protocol and reason.",
    );
    let mut rejected: Vec<_> = ingest
        .rejected
        .lock()
        .iter()
        .map(|(k, v)| (*k, *v))
        .collect();
    rejected.sort();
    for ((p, reason), n) in rejected {
        sample(
            &mut out,
            "playhead_heartbeats_rejected_total",
            &format!("protocol=\"{p}\",reason=\"{reason}\""),
            n,
        );
    }

    let engine = state.ingest.engine();
    let c = engine.coalescer_stats();
    head(&mut out, "playhead_coalescer_upserts_total", "counter", "Coalescer upserts by outcome: inserted (new key), superseded (newer value), stale (older or equal, no-op).");
    sample(
        &mut out,
        "playhead_coalescer_upserts_total",
        "outcome=\"inserted\"",
        c.inserted,
    );
    sample(
        &mut out,
        "playhead_coalescer_upserts_total",
        "outcome=\"superseded\"",
        c.superseded,
    );
    sample(
        &mut out,
        "playhead_coalescer_upserts_total",
        "outcome=\"stale\"",
        c.stale,
    );
    single(
        &mut out,
        "playhead_coalescer_overloaded_total",
        "counter",
        "New keys refused because the coalescer was full.",
        c.overloaded,
    );
    single(
        &mut out,
        "playhead_coalescer_profile_full_total",
        "counter",
        "New titles refused because their profile held coalescer.max_titles_per_profile in memory.",
        c.profile_full,
    );
    head(&mut out, "playhead_coalescer_keys", "gauge", "Keys in memory: dirty (the store lacks their newest value), flushing (of those, being written by the running cycle), clean (stored, kept while the viewer plays).");
    sample(
        &mut out,
        "playhead_coalescer_keys",
        "state=\"dirty\"",
        c.dirty_keys,
    );
    sample(
        &mut out,
        "playhead_coalescer_keys",
        "state=\"flushing\"",
        c.flushing_keys,
    );
    sample(
        &mut out,
        "playhead_coalescer_keys",
        "state=\"clean\"",
        c.clean_keys,
    );
    single(
        &mut out,
        "playhead_coalescer_evicted_total",
        "counter",
        "Clean keys evicted from memory (idle, or their shard near its bound).",
        c.evicted,
    );
    single(
        &mut out,
        "playhead_coalescer_max_keys",
        "gauge",
        "Configured bound on keys in memory.",
        engine.max_keys(),
    );

    let e = engine.stats();
    single(
        &mut out,
        "playhead_flush_cycles_total",
        "counter",
        "Completed flush cycles.",
        load(&e.flush_cycles),
    );
    single(
        &mut out,
        "playhead_flush_batches_total",
        "counter",
        "Store batches written by flushes.",
        load(&e.flush_batches),
    );
    single(
        &mut out,
        "playhead_flush_rows_total",
        "counter",
        "Rows written to the store (one per dirty key per cycle).",
        load(&e.flush_rows),
    );
    single(
        &mut out,
        "playhead_flush_errors_total",
        "counter",
        "Store batch writes that failed (each is retried).",
        load(&e.flush_errors),
    );
    single(
        &mut out,
        "playhead_flush_retries_total",
        "counter",
        "Store batch writes retried.",
        load(&e.flush_retries),
    );
    single(
        &mut out,
        "playhead_flush_panics_total",
        "counter",
        "Flush cycles failed by a panicking flush task (the keys stay dirty; the next cycle retries).",
        load(&e.flush_panics),
    );
    head(
        &mut out,
        "playhead_flush_requests_total",
        "counter",
        "Full flushes asked for by an operator (SIGUSR1) that ended, by outcome.",
    );
    sample(
        &mut out,
        "playhead_flush_requests_total",
        "outcome=\"done\"",
        load(&e.flush_requests_done),
    );
    sample(
        &mut out,
        "playhead_flush_requests_total",
        "outcome=\"failed\"",
        load(&e.flush_requests_failed),
    );
    head(
        &mut out,
        "playhead_flush_duration_seconds",
        "histogram",
        "Duration of flush cycles.",
    );
    e.flush_seconds
        .render(&mut out, "playhead_flush_duration_seconds", "");
    head(
        &mut out,
        "playhead_store_reads_total",
        "counter",
        "Point reads by where the answer came from.",
    );
    sample(
        &mut out,
        "playhead_store_reads_total",
        "source=\"memory\"",
        load(&e.reads_memory),
    );
    sample(
        &mut out,
        "playhead_store_reads_total",
        "source=\"store\"",
        load(&e.reads_store),
    );
    sample(
        &mut out,
        "playhead_store_reads_total",
        "source=\"degraded\"",
        load(&e.reads_degraded),
    );
    head(
        &mut out,
        "playhead_resume_read_duration_seconds",
        "histogram",
        "Latency of resume reads (memory, then store within the budget).",
    );
    m.resume_read_seconds
        .render(&mut out, "playhead_resume_read_duration_seconds", "");
    single(
        &mut out,
        "playhead_store_purged_rows_total",
        "counter",
        "Rows removed by the retention purge.",
        load(&e.purged_rows),
    );
    if let Some(health) = engine.store_write_health() {
        single(
            &mut out,
            "playhead_store_healthy",
            "gauge",
            "1 while the store takes writes and syncs, 0 once several failed in a row.",
            u8::from(health.failing().is_none()),
        );
        single(
            &mut out,
            "playhead_store_consecutive_failures",
            "gauge",
            "Store writes and syncs that failed since the last successful sync.",
            health.consecutive_failures(),
        );
    }
    engine.render_store_metrics(&mut out);

    let w = engine.wal_stats();
    single(
        &mut out,
        "playhead_wal_appended_bytes_total",
        "counter",
        "Bytes appended to the commit log.",
        load(&w.appended_bytes),
    );
    single(
        &mut out,
        "playhead_wal_appended_records_total",
        "counter",
        "Records appended to the commit log.",
        load(&w.appended_records),
    );
    single(
        &mut out,
        "playhead_wal_written_bytes_total",
        "counter",
        "Bytes written to segment files.",
        load(&w.written_bytes),
    );
    single(
        &mut out,
        "playhead_wal_fsyncs_total",
        "counter",
        "fsync calls on the commit log.",
        load(&w.fsyncs),
    );
    head(
        &mut out,
        "playhead_wal_fsync_seconds",
        "histogram",
        "Latency of commit-log fsyncs.",
    );
    w.fsync_seconds
        .render(&mut out, "playhead_wal_fsync_seconds", "");
    single(
        &mut out,
        "playhead_wal_fsync_max_seconds",
        "gauge",
        "Longest fsync since start.",
        load(&w.fsync_nanos_max) as f64 / 1e9,
    );
    single(
        &mut out,
        "playhead_wal_write_errors_total",
        "counter",
        "Failed writes or fsyncs of the commit log.",
        load(&w.write_errors),
    );
    single(
        &mut out,
        "playhead_wal_refused_appends_total",
        "counter",
        "Appends refused (buffer full or disk failing).",
        load(&w.refused_appends),
    );
    single(
        &mut out,
        "playhead_wal_segment_bytes",
        "gauge",
        "Bytes of segment files on disk.",
        load(&w.segment_bytes_on_disk),
    );
    single(
        &mut out,
        "playhead_wal_segments",
        "gauge",
        "Segment files on disk.",
        load(&w.segments_on_disk),
    );
    single(
        &mut out,
        "playhead_wal_snapshot_bytes",
        "gauge",
        "Bytes of snapshot files on disk.",
        load(&w.snapshot_bytes_on_disk),
    );
    single(
        &mut out,
        "playhead_wal_snapshots_total",
        "counter",
        "Snapshots written.",
        load(&w.snapshots_written),
    );

    head(
        &mut out,
        "playhead_http_requests_total",
        "counter",
        "HTTP requests by route and status.",
    );
    for (r, route) in ROUTES.iter().enumerate() {
        for (s, status) in STATUSES.iter().enumerate() {
            let n = load(&m.requests[r][s]);
            if n > 0 {
                let status = if *status == 0 {
                    "other".to_string()
                } else {
                    status.to_string()
                };
                sample(
                    &mut out,
                    "playhead_http_requests_total",
                    &format!("route=\"{route}\",status=\"{status}\""),
                    n,
                );
            }
        }
    }
    head(
        &mut out,
        "playhead_http_request_duration_seconds",
        "histogram",
        "HTTP request latency by route and status class.",
    );
    for (r, route) in ROUTES.iter().enumerate() {
        for (k, class) in CLASSES.iter().enumerate() {
            if m.latency[r][k].count() > 0 {
                m.latency[r][k].render(
                    &mut out,
                    "playhead_http_request_duration_seconds",
                    &format!("route=\"{route}\",class=\"{class}\""),
                );
            }
        }
    }
    single(
        &mut out,
        "playhead_http_connections",
        "gauge",
        "Open HTTP connections.",
        load(&ingest.http_connections.open),
    );
    single(
        &mut out,
        "playhead_http_connections_refused_total",
        "counter",
        "Connections closed at once because http.max_connections were open.",
        load(&ingest.http_connections.refused),
    );
    single(
        &mut out,
        "playhead_binary_connections",
        "gauge",
        "Open binary-protocol connections.",
        load(&ingest.binary_connections.open),
    );
    single(
        &mut out,
        "playhead_binary_connections_refused_total",
        "counter",
        "Binary connections refused because binary.max_connections were open.",
        load(&ingest.binary_connections.refused),
    );
    head(
        &mut out,
        "playhead_binary_protocol_errors_total",
        "counter",
        "Binary connections closed after a protocol error, by error code name.",
    );
    for code in 1..ingest.binary_protocol_errors.len() as u16 {
        if let Some(c) = crate::ingest::binary::codec::ErrorCode::from_u16(code) {
            sample(
                &mut out,
                "playhead_binary_protocol_errors_total",
                &format!("code=\"{}\"", c.name()),
                load(&ingest.binary_protocol_errors[code as usize]),
            );
        }
    }
    out
}

/// Binds the API listener.
pub async fn bind(addr: &str) -> std::io::Result<TcpListener> {
    let addr: SocketAddr = addr.parse().map_err(|e| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{addr}: {e}"))
    })?;
    TcpListener::bind(addr).await
}
