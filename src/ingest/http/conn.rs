//! One HTTP connection: hyper's HTTP/1.1 state machine around our [`Api`] service, and a
//! watchdog that enforces both deadlines with **one timer per connection**.
//!
//! Why not hyper's `header_read_timeout` and a `tokio::time::timeout` around each request:
//! both arm a timer per request (hyper boxes a `Sleep` each time it waits for a request
//! head; the request timeout registers one whenever a handler waits for its body), and at
//! ~50 k requests/s on one core each insert and removal in tokio's timer wheel is a
//! measurable share of the per-request budget. Instead every request stamps its start and
//! end into [`Watch`] (two relaxed stores of a time already read for the metrics), and the
//! connection task sleeps until the deadline those stamps give, or for the shorter of the
//! two timeouts if that comes first (a request that begins or ends meanwhile cannot have an
//! earlier deadline); when it wakes early because requests kept coming, it re-arms. With
//! the defaults that is one timer wake per connection every 5 s instead of two timer-wheel
//! operations per request. The deadlines are the same as before:
//! - idle (between requests, or before the first): the next request's head must be
//!   complete within `http.header_read_timeout_ms` of the previous answer (of the accept),
//!   else the connection is closed without an answer (slowloris);
//! - busy (head read, not yet answered): the answer must be ready within
//!   `http.request_timeout_ms` of the head, else it is a 408.

use std::convert::Infallible;
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::Request;

use super::{AppState, Response};

/// Request start/end stamps of one connection, shared by its service and its watchdog
/// (both run in the connection's task; atomics only because the task may move threads).
pub(super) struct Watch {
    /// When the connection was accepted; stamps are microseconds since then.
    base: Instant,
    /// Microseconds since `base` of the last request start (with [`BUSY`] set) or end.
    stamp: AtomicU64,
    /// Set by the watchdog when the busy request passed `http.request_timeout_ms`: the
    /// service answers 408 the next time it is polled.
    expired: AtomicBool,
}

/// Flag in [`Watch::stamp`]: a request is being handled.
const BUSY: u64 = 1 << 63;

impl Watch {
    fn new(base: Instant) -> Self {
        Self {
            base,
            stamp: AtomicU64::new(0),
            expired: AtomicBool::new(false),
        }
    }

    fn micros(&self, at: Instant) -> u64 {
        let micros = at.saturating_duration_since(self.base).as_micros();
        debug_assert!(micros < u128::from(BUSY));
        micros as u64
    }

    fn begin(&self, at: Instant) {
        self.expired.store(false, Ordering::Relaxed);
        self.stamp.store(BUSY | self.micros(at), Ordering::Relaxed);
    }

    pub(super) fn end(&self, at: Instant) {
        self.stamp.store(self.micros(at), Ordering::Relaxed);
    }

    pub(super) fn expired(&self) -> bool {
        self.expired.load(Ordering::Relaxed)
    }
}

/// The per-connection service hyper calls once per request.
#[derive(Clone)]
struct Api {
    state: Arc<AppState>,
    watch: Arc<Watch>,
}

impl hyper::service::Service<Request<Incoming>> for Api {
    type Response = Response;
    type Error = Infallible;
    /// One allocation per request (the handler's state machine).
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let started = Instant::now();
        self.watch.begin(started);
        let state = Arc::clone(&self.state);
        let watch = Arc::clone(&self.watch);
        Box::pin(async move { Ok(super::handle(&state, &watch, request, started).await) })
    }
}

/// Serves one accepted connection until it closes, is closed for a deadline, or
/// `graceful` asks it to finish.
pub(super) fn serve(
    stream: tokio::net::TcpStream,
    state: Arc<AppState>,
    graceful: &hyper_util::server::graceful::GracefulShutdown,
) -> impl Future<Output = ()> + Send + 'static {
    let http = &state.config.http;
    let header_timeout = Duration::from_millis(http.header_read_timeout_ms);
    let request_timeout = Duration::from_millis(http.request_timeout_ms);
    let watch = Arc::new(Watch::new(Instant::now()));
    let mut builder = hyper::server::conn::http1::Builder::new();
    // No hyper timer: the watchdog below keeps both deadlines (see the module docs).
    builder.header_read_timeout(None).max_buf_size(64 * 1024);
    let service = Api {
        state: Arc::clone(&state),
        watch: Arc::clone(&watch),
    };
    let conn =
        graceful.watch(builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service));
    async move {
        let mut conn = pin!(conn);
        // A request that begins or ends while the watchdog sleeps moves the deadline to at
        // least `shortest` from then, so waking at least every `shortest` never misses one.
        let shortest = header_timeout.min(request_timeout);
        let mut sleep = pin!(tokio::time::sleep(shortest));
        loop {
            tokio::select! {
                biased;
                _ = &mut conn => return,
                () = &mut sleep => {}
            }
            let now = Instant::now();
            let stamp = watch.stamp.load(Ordering::Relaxed);
            let since = watch.base + Duration::from_micros(stamp & !BUSY);
            let deadline = if stamp & BUSY != 0 {
                since + request_timeout
            } else {
                since + header_timeout
            };
            if now < deadline {
                sleep.as_mut().reset(deadline.min(now + shortest).into());
            } else if stamp & BUSY != 0 {
                // The handler answers 408 when polled next (the loop polls `conn` again);
                // if even that does not finish the request, the idle deadline follows.
                watch.expired.store(true, Ordering::Relaxed);
                sleep.as_mut().reset((now + shortest).into());
            } else {
                // No complete request head in time: close without an answer, like hyper's
                // own header timeout.
                return;
            }
        }
    }
}

/// Runs `handler` until it finishes or the watchdog marks the request expired.
pub(super) async fn until_expired<F: Future>(watch: &Watch, handler: F) -> Option<F::Output> {
    let mut handler = pin!(handler);
    std::future::poll_fn(|cx| match handler.as_mut().poll(cx) {
        Poll::Ready(output) => Poll::Ready(Some(output)),
        Poll::Pending if watch.expired() => Poll::Ready(None),
        Poll::Pending => Poll::Pending,
    })
    .await
}
