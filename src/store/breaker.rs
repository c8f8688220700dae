//! A circuit breaker: stops sending requests to a store that keeps failing, and lets one
//! probe through now and then to notice when it is back.
//!
//! States:
//! - **closed**: every request goes through; `failure_threshold` consecutive failures open it.
//! - **open**: every request is refused at once, until `open_for` has passed since opening.
//! - **half-open**: exactly one request (the probe) goes through; the others *wait* for its
//!   outcome ([`CircuitBreaker::acquire`]). The probe's success closes the breaker and lets
//!   the waiters go; its failure opens it again for another `open_for` and refuses them.
//!
//! A request ends in one of three ways: success, failure, or **unknown** — its [`Ticket`]
//! was dropped without an outcome because the caller stopped waiting (a read past the
//! engine's budget, a flush batch that ended early). Unknown is not evidence against the
//! cluster (the caller's budget decided, not the cluster), so it changes nothing: a slow
//! read cannot open a breaker, and a cancelled request does not count toward the
//! threshold. A probe must not end unknown, or half-open would never decide: [`run`] sends a
//! probe in a task of its own, which the caller's cancellation does not cancel, so the
//! probe's outcome always lands. A probe ticket dropped anyway (a panic) releases the probe
//! slot — the next request becomes the probe — rather than counting as a failure.
//!
//! Time comes from an injected [`Clock`], so the state machine is tested without sleeping.
//! One mutex guards the state: it is held for a few instructions per request, never across
//! an `.await` (parking_lot, not tokio).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Notify;

/// Where the breaker reads the time.
pub type Clock = Arc<dyn Fn() -> Instant + Send + Sync>;

/// The breaker's state, as metrics show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    /// 0 closed, 1 open, 2 half-open (the `playhead_cassandra_breaker_state` gauge).
    pub fn as_gauge(self) -> u8 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }
}

#[derive(Debug)]
enum State {
    Closed { consecutive_failures: u32 },
    Open { until: Instant },
    HalfOpen { probe_in_flight: bool },
}

/// Why a request was refused without being sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("circuit breaker open (the cluster kept failing); next probe in {retry_in_ms} ms")]
    Open { retry_in_ms: u64 },
}

/// The answer of [`CircuitBreaker::admit`].
#[derive(Debug)]
pub enum Admission {
    /// Send the request and report its outcome on the ticket.
    Go(Ticket),
    /// Half-open with the probe in flight: wait for its outcome, then ask again.
    Wait,
    /// Do not send.
    Refused(Refused),
}

/// See the module documentation.
pub struct CircuitBreaker {
    failure_threshold: u32,
    open_for: Duration,
    clock: Clock,
    state: Mutex<State>,
    /// Woken whenever the breaker leaves half-open or the probe slot frees up, so waiters
    /// ask again.
    probe_resolved: Notify,
    /// Times the breaker went from closed or half-open to open.
    opened: AtomicU64,
    /// Probe tickets dropped without an outcome (should stay 0: [`run`] prevents it).
    probes_abandoned: AtomicU64,
}

impl std::fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("failure_threshold", &self.failure_threshold)
            .field("open_for", &self.open_for)
            .field("state", &*self.state.lock())
            .finish_non_exhaustive()
    }
}

/// Permission to send one request. Report its outcome with [`Ticket::success`] or
/// [`Ticket::failure`]; a ticket dropped without either ended **unknown** (see the module
/// documentation): it changes nothing, except that a dropped probe frees the probe slot.
#[must_use = "report the request's outcome on the ticket"]
#[derive(Debug)]
pub struct Ticket {
    breaker: Arc<CircuitBreaker>,
    probe: bool,
    done: bool,
}

impl Ticket {
    pub fn success(mut self) {
        self.done = true;
        self.breaker.on_success();
    }

    pub fn failure(mut self) {
        self.done = true;
        self.breaker.on_failure(self.probe);
    }

    /// True when this request is the half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.done && self.probe {
            self.breaker.on_probe_abandoned();
        }
    }
}

impl CircuitBreaker {
    /// A breaker on the real clock.
    pub fn new(failure_threshold: u32, open_for: Duration) -> Arc<Self> {
        Self::with_clock(failure_threshold, open_for, Arc::new(Instant::now))
    }

    pub fn with_clock(failure_threshold: u32, open_for: Duration, clock: Clock) -> Arc<Self> {
        assert!(
            failure_threshold >= 1,
            "a breaker needs a threshold of at least 1"
        );
        Arc::new(Self {
            failure_threshold,
            open_for,
            clock,
            state: Mutex::new(State::Closed {
                consecutive_failures: 0,
            }),
            probe_resolved: Notify::new(),
            opened: AtomicU64::new(0),
            probes_abandoned: AtomicU64::new(0),
        })
    }

    /// Asks to send one request now, without waiting.
    pub fn admit(self: &Arc<Self>) -> Admission {
        let now = (self.clock)();
        let mut state = self.state.lock();
        let probe = match &mut *state {
            State::Closed { .. } => false,
            State::Open { until } if now < *until => {
                return Admission::Refused(Refused::Open {
                    retry_in_ms: (*until - now).as_millis() as u64,
                })
            }
            State::Open { .. } => {
                *state = State::HalfOpen {
                    probe_in_flight: true,
                };
                true
            }
            State::HalfOpen { probe_in_flight } if *probe_in_flight => return Admission::Wait,
            State::HalfOpen { probe_in_flight } => {
                *probe_in_flight = true;
                true
            }
        };
        Admission::Go(Ticket {
            breaker: Arc::clone(self),
            probe,
            done: false,
        })
    }

    /// Asks to send one request, waiting while a probe decides (half-open). Cancel-safe:
    /// a waiter holds nothing.
    pub async fn acquire(self: &Arc<Self>) -> Result<Ticket, Refused> {
        loop {
            // Registered before asking, so a probe resolving in between is not missed.
            let resolved = self.probe_resolved.notified();
            tokio::pin!(resolved);
            resolved.as_mut().enable();
            match self.admit() {
                Admission::Go(ticket) => return Ok(ticket),
                Admission::Refused(refused) => return Err(refused),
                Admission::Wait => resolved.await,
            }
        }
    }

    pub fn state(&self) -> BreakerState {
        match &*self.state.lock() {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Times the breaker has opened since start.
    pub fn times_opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// Probe tickets dropped without an outcome since start.
    pub fn probes_abandoned(&self) -> u64 {
        self.probes_abandoned.load(Ordering::Relaxed)
    }

    fn on_success(&self) {
        // Any success proves the cluster answers: a late success of a request admitted
        // before the breaker opened closes it as well as the probe's does.
        let mut state = self.state.lock();
        let was_half_open = matches!(*state, State::HalfOpen { .. });
        *state = State::Closed {
            consecutive_failures: 0,
        };
        drop(state);
        if was_half_open {
            self.probe_resolved.notify_waiters();
        }
    }

    fn on_failure(&self, probe: bool) {
        let now = (self.clock)();
        let mut state = self.state.lock();
        let open = match &mut *state {
            State::Closed {
                consecutive_failures,
            } => {
                *consecutive_failures += 1;
                *consecutive_failures >= self.failure_threshold
            }
            // Only the probe's failure re-opens; stragglers admitted while closed do not
            // extend the wait.
            State::HalfOpen { .. } => probe,
            State::Open { .. } => false,
        };
        if !open {
            return;
        }
        let was_half_open = matches!(*state, State::HalfOpen { .. });
        *state = State::Open {
            until: now + self.open_for,
        };
        drop(state);
        self.opened.fetch_add(1, Ordering::Relaxed);
        if was_half_open {
            self.probe_resolved.notify_waiters();
        }
    }

    fn on_probe_abandoned(&self) {
        self.probes_abandoned.fetch_add(1, Ordering::Relaxed);
        let mut state = self.state.lock();
        if let State::HalfOpen { probe_in_flight } = &mut *state {
            *probe_in_flight = false;
            drop(state);
            self.probe_resolved.notify_waiters();
        }
    }
}

/// Sends `request` under `ticket` and reports its outcome (`Err` is a failure). A probe
/// runs in a task of its own, so dropping this future (the caller's timeout) does not
/// cancel it and its outcome reaches the breaker; any other request runs in place and
/// ends unknown when dropped. `None` when the probe's task was cancelled (the runtime is
/// shutting down); a panic inside `request` resumes in the caller.
pub async fn run<T, E, F>(ticket: Ticket, request: F) -> Option<Result<T, E>>
where
    F: Future<Output = Result<T, E>> + Send + 'static,
    T: Send + 'static,
    E: Send + 'static,
{
    let probe = ticket.is_probe();
    let judged = async move {
        let result = request.await;
        match &result {
            Ok(_) => ticket.success(),
            Err(_) => ticket.failure(),
        }
        result
    };
    if !probe {
        return Some(judged.await);
    }
    match tokio::spawn(judged).await {
        Ok(result) => Some(result),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN_FOR: Duration = Duration::from_millis(100);

    /// A clock tests move by hand.
    #[derive(Clone)]
    struct ManualClock(Arc<Mutex<Instant>>);

    impl ManualClock {
        fn new() -> Self {
            Self(Arc::new(Mutex::new(Instant::now())))
        }
        fn advance(&self, by: Duration) {
            *self.0.lock() += by;
        }
        fn clock(&self) -> Clock {
            let me = self.clone();
            Arc::new(move || *me.0.lock())
        }
    }

    fn breaker(threshold: u32) -> (Arc<CircuitBreaker>, ManualClock) {
        let clock = ManualClock::new();
        (
            CircuitBreaker::with_clock(threshold, OPEN_FOR, clock.clock()),
            clock,
        )
    }

    fn go(b: &Arc<CircuitBreaker>) -> Ticket {
        match b.admit() {
            Admission::Go(t) => t,
            other => panic!("expected a ticket, got {other:?}"),
        }
    }

    /// Opens `b` (threshold 1) and moves past its open period.
    fn open_then_expire(b: &Arc<CircuitBreaker>, clock: &ManualClock) {
        go(b).failure();
        assert_eq!(b.state(), BreakerState::Open);
        clock.advance(OPEN_FOR);
    }

    #[test]
    fn opens_after_threshold_consecutive_failures_only() {
        let (b, clock) = breaker(3);
        go(&b).failure();
        go(&b).failure();
        // A success in between resets the count.
        go(&b).success();
        go(&b).failure();
        go(&b).failure();
        assert_eq!(b.state(), BreakerState::Closed);
        go(&b).failure();
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.times_opened(), 1);
        clock.advance(Duration::from_millis(40));
        assert!(matches!(
            b.admit(),
            Admission::Refused(Refused::Open { retry_in_ms: 60 })
        ));
    }

    #[test]
    fn half_open_lets_exactly_one_probe_and_the_others_wait() {
        let (b, clock) = breaker(1);
        open_then_expire(&b, &clock);
        let probe = go(&b);
        assert!(probe.is_probe());
        assert_eq!(b.state(), BreakerState::HalfOpen);
        // Neither refused nor sent: they wait for the probe.
        assert!(matches!(b.admit(), Admission::Wait));
        assert!(matches!(b.admit(), Admission::Wait));
        probe.success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(!go(&b).is_probe());
    }

    #[test]
    fn failed_probe_reopens_for_another_period() {
        let (b, clock) = breaker(1);
        open_then_expire(&b, &clock);
        go(&b).failure();
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.times_opened(), 2);
        clock.advance(OPEN_FOR / 2);
        assert!(matches!(b.admit(), Admission::Refused(_)));
        clock.advance(OPEN_FOR / 2);
        assert!(go(&b).is_probe());
    }

    /// The fault of issue 17 item 5: a flush batch dropped its in-flight probe when another
    /// request of the batch was refused, the drop counted as a failure and re-opened the
    /// breaker against a healthy cluster, every cycle.
    #[test]
    fn dropped_probe_frees_the_slot_and_does_not_reopen() {
        let (b, clock) = breaker(1);
        open_then_expire(&b, &clock);
        let probe = go(&b);
        drop(probe);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.times_opened(), 1);
        assert_eq!(b.probes_abandoned(), 1);
        // The next request becomes the probe, and its success closes.
        let next = go(&b);
        assert!(next.is_probe());
        next.success();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    /// A read the engine stopped waiting for (its budget) is not a failure of the cluster.
    #[test]
    fn cancelled_requests_do_not_count_toward_opening() {
        let (b, _clock) = breaker(2);
        for _ in 0..10 {
            drop(go(&b));
        }
        go(&b).failure();
        assert_eq!(b.state(), BreakerState::Closed);
        drop(go(&b));
        go(&b).failure();
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn straggler_failure_in_half_open_does_not_reopen() {
        let (b, clock) = breaker(2);
        let straggler = go(&b);
        go(&b).failure();
        go(&b).failure();
        clock.advance(OPEN_FOR);
        let probe = go(&b);
        straggler.failure();
        assert_eq!(b.state(), BreakerState::HalfOpen);
        probe.success();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn waiters_go_once_the_probe_succeeds_and_are_refused_once_it_fails() {
        let (b, clock) = breaker(1);
        open_then_expire(&b, &clock);
        let probe = b.acquire().await.unwrap();
        assert!(probe.is_probe());
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let b = Arc::clone(&b);
                tokio::spawn(async move { b.acquire().await.map(|t| t.is_probe()) })
            })
            .collect();
        tokio::task::yield_now().await;
        assert!(waiters.iter().all(|w| !w.is_finished()));
        probe.success();
        for w in waiters {
            assert_eq!(w.await.unwrap(), Ok(false));
        }

        // Again, and this time the probe fails: the waiters are refused, none is sent.
        go(&b).failure();
        clock.advance(OPEN_FOR);
        let probe = b.acquire().await.unwrap();
        let waiter = {
            let b = Arc::clone(&b);
            tokio::spawn(async move { b.acquire().await.map(|t| t.is_probe()) })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        probe.failure();
        assert_eq!(
            waiter.await.unwrap(),
            Err(Refused::Open {
                retry_in_ms: OPEN_FOR.as_millis() as u64
            })
        );
    }

    /// A probe whose caller gives up (its timeout) still finishes, and its outcome decides.
    #[tokio::test(flavor = "current_thread")]
    async fn a_probe_outlives_its_cancelled_caller() {
        let (b, clock) = breaker(1);
        open_then_expire(&b, &clock);
        let probe = b.acquire().await.unwrap();
        let (answer, answered) = tokio::sync::oneshot::channel::<()>();
        let caller = tokio::spawn(run(probe, async move {
            answered.await.map_err(|_| "no answer")
        }));
        tokio::task::yield_now().await;
        caller.abort();
        assert!(caller.await.unwrap_err().is_cancelled());
        // The caller is gone; the probe is still in flight and the others wait.
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(matches!(b.admit(), Admission::Wait));
        answer.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), async {
            while b.state() != BreakerState::Closed {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the probe's success closes the breaker");
        assert_eq!(b.probes_abandoned(), 0);
    }

    /// A request that is not the probe runs in place: cancelling it ends it, unknown.
    #[tokio::test(flavor = "current_thread")]
    async fn run_reports_success_and_failure() {
        let (b, _clock) = breaker(1);
        let ok: Option<Result<u8, &str>> = run(go(&b), async { Ok(1) }).await;
        assert_eq!(ok, Some(Ok(1)));
        assert_eq!(b.state(), BreakerState::Closed);
        let err: Option<Result<u8, &str>> = run(go(&b), async { Err("down") }).await;
        assert_eq!(err, Some(Err("down")));
        assert_eq!(b.state(), BreakerState::Open);
    }
}
