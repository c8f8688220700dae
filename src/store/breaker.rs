//! A circuit breaker: stops sending requests to a store that keeps failing, and lets one
//! probe through now and then to notice when it is back.
//!
//! States:
//! - **closed**: every request goes through; `failure_threshold` consecutive failures open it.
//! - **open**: every request is refused at once, until `open_for` has passed since opening.
//! - **half-open**: exactly one request (the probe) goes through, the others are refused.
//!   The probe's success closes the breaker; its failure (or its being abandoned, e.g. a
//!   read cancelled by the caller's timeout) opens it again for another `open_for`.
//!
//! Time is passed in, never read inside, so the state machine is tested without sleeping.
//! One mutex guards the state: it is held for a few instructions per request, never across
//! an `.await` (parking_lot, not tokio).

use std::time::{Duration, Instant};

use parking_lot::Mutex;

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
    #[error("circuit breaker half-open: a probe request is checking whether the cluster is back")]
    Probing,
}

/// See the module documentation.
#[derive(Debug)]
pub struct CircuitBreaker {
    failure_threshold: u32,
    open_for: Duration,
    state: Mutex<State>,
    /// Times the breaker went from closed or half-open to open.
    opened: std::sync::atomic::AtomicU64,
}

/// Permission to send one request. Report its outcome with [`Ticket::success`] or
/// [`Ticket::failure`]; a ticket dropped without either (the request future was cancelled)
/// counts as a failure, because a request nobody waited out is one the store did not answer
/// in time — and a probe must never be left "in flight" forever.
#[must_use = "report the request's outcome on the ticket"]
pub struct Ticket<'a> {
    breaker: &'a CircuitBreaker,
    probe: bool,
    done: bool,
}

impl Ticket<'_> {
    pub fn success(mut self) {
        self.done = true;
        self.breaker.on_success(self.probe);
    }

    pub fn failure(mut self, now: Instant) {
        self.done = true;
        self.breaker.on_failure(self.probe, now);
    }

    /// True when this request is the half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.breaker.on_failure(self.probe, Instant::now());
        }
    }
}

impl CircuitBreaker {
    pub fn new(failure_threshold: u32, open_for: Duration) -> Self {
        assert!(
            failure_threshold >= 1,
            "a breaker needs a threshold of at least 1"
        );
        Self {
            failure_threshold,
            open_for,
            state: Mutex::new(State::Closed {
                consecutive_failures: 0,
            }),
            opened: Default::default(),
        }
    }

    /// Asks to send one request at `now`.
    pub fn admit(&self, now: Instant) -> Result<Ticket<'_>, Refused> {
        let mut state = self.state.lock();
        let probe = match &mut *state {
            State::Closed { .. } => false,
            State::Open { until } if now < *until => {
                return Err(Refused::Open {
                    retry_in_ms: (*until - now).as_millis() as u64,
                })
            }
            State::Open { .. } => {
                *state = State::HalfOpen {
                    probe_in_flight: true,
                };
                true
            }
            State::HalfOpen { probe_in_flight } if *probe_in_flight => {
                return Err(Refused::Probing)
            }
            State::HalfOpen { probe_in_flight } => {
                *probe_in_flight = true;
                true
            }
        };
        Ok(Ticket {
            breaker: self,
            probe,
            done: false,
        })
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
        self.opened.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn on_success(&self, _probe: bool) {
        // Any success proves the cluster answers: a late success of a request admitted
        // before the breaker opened closes it as well as the probe's does.
        *self.state.lock() = State::Closed {
            consecutive_failures: 0,
        };
    }

    fn on_failure(&self, probe: bool, now: Instant) {
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
        if open {
            *state = State::Open {
                until: now + self.open_for,
            };
            self.opened
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN_FOR: Duration = Duration::from_millis(100);

    #[test]
    fn opens_after_threshold_consecutive_failures_only() {
        let b = CircuitBreaker::new(3, OPEN_FOR);
        let t0 = Instant::now();
        b.admit(t0).unwrap().failure(t0);
        b.admit(t0).unwrap().failure(t0);
        // A success in between resets the count.
        b.admit(t0).unwrap().success();
        b.admit(t0).unwrap().failure(t0);
        b.admit(t0).unwrap().failure(t0);
        assert_eq!(b.state(), BreakerState::Closed);
        b.admit(t0).unwrap().failure(t0);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.times_opened(), 1);
        assert_eq!(
            b.admit(t0 + Duration::from_millis(40)).err(),
            Some(Refused::Open { retry_in_ms: 60 })
        );
    }

    #[test]
    fn half_open_lets_exactly_one_probe_and_its_success_closes() {
        let b = CircuitBreaker::new(1, OPEN_FOR);
        let t0 = Instant::now();
        b.admit(t0).unwrap().failure(t0);
        let later = t0 + OPEN_FOR;
        let probe = b.admit(later).unwrap();
        assert!(probe.is_probe());
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.admit(later).err(), Some(Refused::Probing));
        probe.success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(!b.admit(later).unwrap().is_probe());
    }

    #[test]
    fn failed_probe_reopens_for_another_period() {
        let b = CircuitBreaker::new(1, OPEN_FOR);
        let t0 = Instant::now();
        b.admit(t0).unwrap().failure(t0);
        let t1 = t0 + OPEN_FOR;
        b.admit(t1).unwrap().failure(t1);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.times_opened(), 2);
        assert!(b.admit(t1 + OPEN_FOR / 2).is_err());
        assert!(b.admit(t1 + OPEN_FOR).unwrap().is_probe());
    }

    #[test]
    fn abandoned_probe_counts_as_failure() {
        let b = CircuitBreaker::new(1, OPEN_FOR);
        let t0 = Instant::now();
        b.admit(t0).unwrap().failure(t0);
        let probe = b.admit(t0 + OPEN_FOR).unwrap();
        drop(probe);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn straggler_failure_in_half_open_does_not_reopen() {
        let b = CircuitBreaker::new(2, OPEN_FOR);
        let t0 = Instant::now();
        let straggler = b.admit(t0).unwrap();
        b.admit(t0).unwrap().failure(t0);
        b.admit(t0).unwrap().failure(t0);
        let probe = b.admit(t0 + OPEN_FOR).unwrap();
        straggler.failure(t0 + OPEN_FOR);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        probe.success();
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
