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
//! The request path's threads (the runtime workers and their blocking threads, the
//! commit-log writer) instead ask for a *short slice*, `server.request_slice_us`
//! ([`DEFAULT_REQUEST_SLICE_US`]; 0 keeps the kernel's). Linux's EEVDF scheduler (6.6+,
//! custom slices since 6.12) gives a waking thread with a shorter slice an earlier
//! deadline, so it preempts a thread that asked for the default (~1.4 ms here) sooner:
//! a heartbeat batch that arrives while both cores run other work waits for a fraction of
//! a slice instead of a whole one. It takes no CPU from anyone over time (the weight, set
//! by nice, decides that); older kernels accept the request and ignore it.
//!
//! Linux only (elsewhere these are no-ops): a thread's nice value and slice are per thread
//! there. Lowering one's own priority and asking for a slice need no privilege.

/// How much lower background threads run by default, added to the process's nice value
/// (capped at 19): from nice 0 to 10, a tenth of the CPU weight of a request thread wanting
/// the same core.
pub const DEFAULT_BACKGROUND_NICE: i32 = 10;

/// The slice the request path's threads ask for by default, in microseconds (the kernel
/// allows 100..=100 000). 10 M viewers, `bench/fleet.sh`, 60 s runs alternated in one
/// session: p99 35–54 ms (median 37) with 300 µs against 40–70 ms (median 47) without
/// (BENCHMARKS.md).
pub const DEFAULT_REQUEST_SLICE_US: u64 = 300;

/// Asks the kernel to run the calling thread in slices of `us` microseconds (0 does
/// nothing). Best effort: a failure leaves the thread's slice alone and is logged at debug
/// level.
pub fn request_slice_for_current_thread(us: u64) {
    #[cfg(target_os = "linux")]
    if us > 0 {
        set_slice(us);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = us;
}

/// `struct sched_attr` of `sched_setattr(2)` (the libc crate does not declare it).
#[cfg(target_os = "linux")]
#[repr(C)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    /// Under `SCHED_OTHER`, the requested slice in nanoseconds (Linux 6.12+).
    runtime: u64,
    deadline: u64,
    period: u64,
    util_min: u32,
    util_max: u32,
}

#[cfg(target_os = "linux")]
fn set_slice(us: u64) {
    // SAFETY: errno is this thread's; gettid has no preconditions, getpriority only reads
    // its arguments and sched_setattr reads the struct, which outlives the call. The
    // thread keeps its policy (SCHED_OTHER) and its nice value, read just before.
    let result = unsafe {
        *libc::__errno_location() = 0;
        let tid = libc::gettid();
        let nice = libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t);
        if nice == -1 && *libc::__errno_location() != 0 {
            -1
        } else {
            let attr = SchedAttr {
                size: std::mem::size_of::<SchedAttr>() as u32,
                policy: libc::SCHED_OTHER as u32,
                flags: 0,
                nice,
                priority: 0,
                runtime: us.saturating_mul(1_000),
                deadline: 0,
                period: 0,
                util_min: 0,
                util_max: 0,
            };
            libc::syscall(
                libc::SYS_sched_setattr,
                tid,
                &attr as *const SchedAttr,
                0u32,
            )
        }
    };
    if result != 0 {
        tracing::debug!(
            us,
            error = %std::io::Error::last_os_error(),
            "could not set a request thread's scheduler slice"
        );
    }
}

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

    /// The thread's slice in nanoseconds (`se.slice` in its sched file), where the kernel
    /// reports one.
    fn slice_of_current_thread() -> Option<u64> {
        let sched = std::fs::read_to_string("/proc/thread-self/sched").ok()?;
        let line = sched.lines().find(|l| l.starts_with("se.slice"))?;
        line.rsplit(':').next()?.trim().parse().ok()
    }

    #[test]
    fn a_request_thread_gets_the_slice_it_asks_for_and_keeps_its_nice_value() {
        let Some(default) = std::thread::spawn(slice_of_current_thread).join().unwrap() else {
            eprintln!("skipped: this kernel reports no per-thread slice (se.slice)");
            return;
        };
        let base = nice_in("/proc/self/stat");
        let (slice, nice) = std::thread::spawn(|| {
            request_slice_for_current_thread(DEFAULT_REQUEST_SLICE_US);
            (slice_of_current_thread(), nice_of_current_thread())
        })
        .join()
        .unwrap();
        assert_eq!(slice, Some(DEFAULT_REQUEST_SLICE_US * 1_000));
        assert_eq!(nice, base);
        // A lowered thread stays lowered.
        let (slice, nice) = std::thread::spawn(|| {
            lower_current_thread(DEFAULT_BACKGROUND_NICE);
            request_slice_for_current_thread(500);
            (slice_of_current_thread(), nice_of_current_thread())
        })
        .join()
        .unwrap();
        assert_eq!(slice, Some(500_000));
        assert_eq!(nice, (base + DEFAULT_BACKGROUND_NICE).min(19));
        // 0 leaves the kernel's slice.
        let untouched = std::thread::spawn(|| {
            request_slice_for_current_thread(0);
            slice_of_current_thread()
        })
        .join()
        .unwrap();
        assert_eq!(untouched, Some(default));
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
