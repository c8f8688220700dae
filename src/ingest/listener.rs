//! What both listeners' accept loops share: taking the next connection until shutdown, and
//! a connection cap whose slots are released by a guard's `Drop`, so a connection task that
//! panics or is cancelled cannot keep its slot (or the open-connections gauge) forever.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use super::metrics::ConnectionCounters;

/// The next accepted connection of `listener`, or `None` once `shutdown` flips. Accept
/// errors (out of file descriptors and the like) are logged and retried after a short
/// pause instead of spinning. `name` names the listener in the log.
pub async fn next_connection(
    listener: &TcpListener,
    shutdown: &mut watch::Receiver<bool>,
    name: &str,
) -> Option<TcpStream> {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => return None,
        };
        match accepted {
            Ok((stream, _)) => return Some(stream),
            Err(e) => {
                tracing::warn!("{name} accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// At most `max` connections open at once; more are refused (and counted) at once.
pub struct ConnectionLimit {
    slots: Arc<Semaphore>,
    max: usize,
}

/// An admitted connection's slot: counted open until dropped.
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
    counters: Arc<ConnectionCounters>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.counters.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ConnectionLimit {
    pub fn new(max: usize) -> Self {
        assert!(max >= 1, "a listener takes at least one connection");
        Self {
            slots: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// A slot for one more connection, or `None` (counted as refused) when `max` are open.
    pub fn admit(&self, counters: &Arc<ConnectionCounters>) -> Option<Admitted> {
        match Arc::clone(&self.slots).try_acquire_owned() {
            Ok(permit) => {
                counters.open.fetch_add(1, Ordering::Relaxed);
                Some(Admitted {
                    _permit: permit,
                    counters: Arc::clone(counters),
                })
            }
            Err(_) => {
                counters.refused.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Waits until every admitted connection has ended, for at most `grace`; false when
    /// some were still open then.
    pub async fn drain(&self, grace: Duration) -> bool {
        let all = u32::try_from(self.max).unwrap_or(u32::MAX);
        tokio::time::timeout(grace, self.slots.acquire_many(all))
            .await
            .is_ok()
    }
}
