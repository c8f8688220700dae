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
use crate::ingest::Ingest;
use crate::resume::DeviceNames;
use crate::store::WriteHealth;
use crate::telemetry::metrics::{
    self, counter, counters, histogram, histograms, load, DescriptorEncoder, Encoded, Histogram,
    Registry,
};
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
    pub metrics: Arc<HttpMetrics>,
    /// Every component's metrics, registered once here; `/metrics` only encodes it.
    registry: Registry,
}

impl AppState {
    pub fn new(ingest: Arc<Ingest>, verifier: Verifier) -> Self {
        let config = ingest.engine().config().clone();
        let metrics = Arc::new(HttpMetrics::default());
        let mut registry = Registry::default();
        ingest.register_metrics(&mut registry);
        let http = Arc::clone(&metrics);
        metrics::register(&mut registry, "http", move |e| http.encode_metrics(e));
        Self {
            devices: DeviceNames::new(config.api.max_device_names),
            metrics,
            registry,
            ingest,
            verifier,
            config,
        }
    }

    /// Every metric (docs/metrics.md) in the Prometheus text format.
    pub fn encode_metrics(&self) -> String {
        metrics::encode(&self.registry)
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
    /// Resume answers that carried an `alternative`.
    pub alternatives_offered: AtomicU64,
}

impl HttpMetrics {
    /// The `playhead_http_request*` and `playhead_resume_read_duration_seconds` families
    /// (docs/metrics.md). Routes and statuses never seen are left out.
    pub fn encode_metrics(&self, e: &mut DescriptorEncoder<'_>) -> Encoded {
        let status_label = |s: usize| match STATUSES[s] {
            0 => "other".to_string(),
            code => code.to_string(),
        };
        counters(
            e,
            "playhead_http_requests_total",
            "HTTP requests by route and status.",
            ROUTES.iter().enumerate().flat_map(|(r, route)| {
                (0..STATUSES.len()).filter_map(move |s| {
                    let n = load(&self.requests[r][s]);
                    (n > 0).then(|| {
                        (
                            [("route", route.to_string()), ("status", status_label(s))],
                            n,
                        )
                    })
                })
            }),
        )?;
        histograms(
            e,
            "playhead_http_request_duration_seconds",
            "HTTP request latency by route and status class.",
            ROUTES.iter().enumerate().flat_map(|(r, route)| {
                CLASSES.iter().enumerate().filter_map(move |(k, class)| {
                    let h = &self.latency[r][k];
                    (h.count() > 0).then_some(([("route", *route), ("class", *class)], h))
                })
            }),
        )?;
        histogram(
            e,
            "playhead_resume_read_duration_seconds",
            "Latency of resume reads (memory, then store within the budget).",
            &self.resume_read_seconds,
        )?;
        counter(
            e,
            "playhead_resume_alternatives_offered_total",
            "Resume answers (GET /api/v1/stream) that offered an alternative: another device's recent position, far from the answer's.",
            load(&self.alternatives_offered),
        )
    }

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
/// reaches the store. With the change stream on, `"events"` says `ok`, or why the stream
/// takes no events (`failing: …`, `nats client not connected`), which is `degraded` too:
/// flushes wait for the stream (docs/events.md).
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
    // The change stream, when on: while it takes no events, flushes wait for it (the
    // service goes on from memory and the log), so `degraded` too.
    let events = engine.events().map(|e| e.health());
    let status = if flush_failing.is_some() || matches!(events, Some(Err(_))) {
        "degraded"
    } else {
        status
    };
    let mut body = serde_json::json!({"status": status, "wal": "replayed", "store": store, "flush": flush, "store_kind": engine.store_name()});
    if let Some(events) = events {
        body["events"] = events.err().unwrap_or_else(|| "ok".into()).into();
    }
    json_response(StatusCode::OK, body)
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
        metrics::CONTENT_TYPE,
        state.encode_metrics().into(),
    )
}

/// Binds the API listener.
pub async fn bind(addr: &str) -> std::io::Result<TcpListener> {
    let addr: SocketAddr = addr.parse().map_err(|e| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{addr}: {e}"))
    })?;
    TcpListener::bind(addr).await
}
