//! CPU priority of background work.
//!
//! The request path (ingest, reads, the commit-log writer) runs at the process's priority;
//! work that only has to keep up on average — flush cycles, the retention purge, log
//! snapshots, the embedded store's compaction — runs `server.background_nice` lower
//! ([`DEFAULT_BACKGROUND_NICE`] unless configured; 0 leaves it alone). On a busy
//! machine the kernel then lets the request path preempt it, which cuts the tail latency
//! of acknowledgements, and a flush that gets less CPU simply takes longer and writes each
//! key once for more heartbeats (it never drops anything: data stays in memory and in the
//! log until the store takes it). BENCHMARKS.md has the measurements.
//!
//! Linux only (elsewhere these are no-ops): a thread's nice value is per thread there.
//! Lowering one's own priority needs no privilege.

/// How much lower background threads run by default, added to the process's nice value
/// (capped at 19): from nice 0 to 10, a tenth of the CPU weight of a request thread wanting
/// the same core.
pub const DEFAULT_BACKGROUND_NICE: i32 = 10;

/// Lowers the calling thread by `by` nice levels (0 does nothing). Best effort: a failure
/// leaves the thread at its priority and is logged at debug level.
pub fn lower_current_thread(by: i32) {
    #[cfg(target_os = "linux")]
    if by > 0 {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        lower(tid, by);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = by;
}

/// Lowers every thread of this process whose name starts with `prefix` (threads a library
/// starts and gives no hook for, such as fjall's workers) by `by` nice levels; returns how
/// many it lowered (none when `by` is 0).
pub fn lower_threads_named(prefix: &str, by: i32) -> usize {
    #[cfg(target_os = "linux")]
    {
        if by <= 0 {
            return 0;
        }
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return 0;
        };
        let mut lowered = 0;
        for task in tasks.flatten() {
            let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
                continue;
            };
            let named = std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|comm| comm.trim_end().starts_with(prefix));
            if named && lower(tid, by) {
                lowered += 1;
            }
        }
        lowered
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (prefix, by);
        0
    }
}

#[cfg(target_os = "linux")]
fn lower(tid: libc::pid_t, by: i32) -> bool {
    // Relative to the main thread's nice value (the process's), not the thread's own: a
    // thread inherits its creator's value, so a thread started by a background thread is
    // already lowered, and lowering must not compound.
    // SAFETY: errno is this thread's; getpid, getpriority and setpriority only read their
    // arguments (on Linux, PRIO_PROCESS with a thread id means that one thread, and the
    // process id is the main thread's id).
    let result = unsafe {
        *libc::__errno_location() = 0;
        let base = libc::getpriority(libc::PRIO_PROCESS, libc::getpid() as libc::id_t);
        if base == -1 && *libc::__errno_location() != 0 {
            -1
        } else {
            let nice = (base + by).min(19);
            libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice)
        }
    };
    if result != 0 {
        tracing::debug!(
            tid,
            error = %std::io::Error::last_os_error(),
            "could not lower a background thread's priority"
        );
    }
    result == 0
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn nice_of_current_thread() -> i32 {
        nice_in("/proc/thread-self/stat")
    }

    fn nice_in(stat_file: &str) -> i32 {
        let stat = std::fs::read_to_string(stat_file).unwrap();
        // Field 19 (nice), counted after the parenthesised command name.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        after.split_whitespace().nth(16).unwrap().parse().unwrap()
    }

    #[test]
    fn lowers_only_the_threads_it_is_asked_to() {
        // The main thread's (the process's) value: lowering is relative to it.
        let base = nice_in("/proc/self/stat");
        let expected = (base + DEFAULT_BACKGROUND_NICE).min(19);
        let lowered = std::thread::spawn(|| {
            lower_current_thread(DEFAULT_BACKGROUND_NICE);
            // Again, as a thread started by a lowered thread would: no compounding.
            lower_current_thread(DEFAULT_BACKGROUND_NICE);
            nice_of_current_thread()
        })
        .join()
        .unwrap();
        assert_eq!(lowered, expected);
        // `server.background_nice = 0`: left at the process's priority.
        let untouched = std::thread::spawn(|| {
            lower_current_thread(0);
            nice_of_current_thread()
        })
        .join()
        .unwrap();
        assert_eq!(untouched, base);

        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let named = std::thread::Builder::new()
            .name("ph-prio-test".into())
            .spawn(move || {
                ready_tx.send(()).unwrap();
                done_rx.recv().unwrap();
                nice_of_current_thread()
            })
            .unwrap();
        ready_rx.recv().unwrap();
        assert_eq!(lower_threads_named("ph-prio-test", 0), 0);
        assert_eq!(
            lower_threads_named("ph-prio-test", DEFAULT_BACKGROUND_NICE),
            1
        );
        done_tx.send(()).unwrap();
        assert_eq!(named.join().unwrap(), expected);
        // The test's own thread was not touched.
        assert_eq!(nice_of_current_thread(), base);
        assert_eq!(nice_in("/proc/self/stat"), base);
    }
}
