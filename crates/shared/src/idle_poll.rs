//! Idle polling: keeps the CPUs awake for a short while after the server was last busy, so
//! that the next wake-up does not pay for waking a sleeping CPU.
//!
//! On a virtual machine a CPU with nothing to run halts, and the hypervisor takes its
//! hardware away; the next wake-up of any thread on it (a packet, a reply from another
//! thread) first has to get it back. On the development VM that costs tens of µs per
//! wake-up, and a replicated write crosses threads and processes a dozen times. Seastar
//! (ScyllaDB, Redpanda) polls for 200 µs before sleeping for the same reason.
//!
//! [`IdlePoller::start`] runs one `idle-poll` thread per CPU the process may use, pinned
//! to that CPU and scheduled `SCHED_IDLE`: the kernel runs it only when that CPU has nothing
//! else to run (among the threads of its cgroup) and preempts it as soon as anything else
//! wakes there. It spins while the process was busy within the last `window` (the
//! runtime calls [`IdlePoller::activity`] each time a worker parks or unparks; busy means
//! [`BUSY_ACTIVITIES`] of those within 10 ms, so a quiet server's timers alone never start
//! a poller) and sleeps otherwise.
//!
//! What it costs: CPU time that would otherwise be idle, so `top` shows the pollers busy
//! while requests flow. Where CPU time is capped or billed (a container with a `cpu.max`
//! quota, burstable cloud instances) that time is not free: the pollers spend the quota of
//! the real work, and SCHED_IDLE only yields to threads of the same cgroup. Leave it off
//! there.
//!
//! # One poller per CPU per machine
//!
//! One spinning thread keeps a CPU awake; more only slow the real work down (with eight
//! `SCHED_IDLE` spinners on two CPUs instead of two, PUT-64 was ~15% slower: the woken
//! threads waited longer for a CPU). So when several walkv processes share a machine (the
//! quick-start cluster runs four), they take turns: a poller spins only while it holds its
//! CPU's lock file, `walkv-idle-poll-cpu<N>.lock` in the system's temp directory (`flock`,
//! released by the kernel when its process dies). A poller whose process is busy while
//! another process holds the lock waits for it, blocked in the kernel at no cost, and takes
//! over when that process goes quiet. A lock file that cannot be opened or locked leaves
//! that poller polling on its own, with a warning.
//!
//! Servers take turns only when they share the temp directory (the same `TMPDIR`, no
//! systemd `PrivateTmp`, the same container) and the lock files stay in place: a cleaner
//! that removes one splits the processes that opened it before from those that open it
//! after. Otherwise they poll each on its own, as without the files. A process stopped
//! (`SIGSTOP`) while it holds a lock keeps it until it resumes, and any local user who can
//! read a lock file can hold it: meanwhile nobody polls on that CPU, which costs speed,
//! never correctness.
//!
//! Linux only; elsewhere `start` starts no pollers and says so. The decisions are the pure
//! [`should_poll`], [`count_activity`] and [`is_busy`]; the threads only read clocks and
//! atomics, and take their CPU's lock when they start to spin.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Largest `idle_poll_us` accepted: polling longer than 100 ms after the last work only
/// burns CPU (a server that quiet is idle).
pub const MAX_WINDOW_US: u64 = 100_000;

/// Name of the polling threads (`top -H`, `/proc/PID/task/*/comm`).
pub const THREAD_NAME: &str = "idle-poll";

/// Longest a sleeping poller sleeps before it checks again (a safety net: `activity`
/// wakes it).
const MAX_SLEEP: Duration = Duration::from_secs(1);

/// Spins between two checks of the clock, ~1 µs on current x86.
const SPINS_PER_CHECK: u32 = 32;

/// Whether to keep polling at `now_ns` when the process was last active at `last_ns`
/// (both since the same origin).
pub fn should_poll(last_ns: u64, now_ns: u64, window: Duration) -> bool {
    u128::from(now_ns.saturating_sub(last_ns)) < window.as_nanos()
}

/// Activity is counted in buckets of this many ns (10 ms).
const BUCKET_NS: u64 = 10_000_000;

/// Parks and unparks in one bucket from which the process counts as busy: a request
/// stream of ~200 per second and more, not the few timer wake-ups (heartbeats) of a
/// quiet server, which alone would have the pollers spin a window after each of them.
pub const BUSY_ACTIVITIES: u64 = 8;

/// The activity counter as one word: bucket number, whether the bucket before it was
/// busy, and the count so far in this bucket.
const COUNT_BITS: u32 = 15;
const COUNT_MAX: u64 = (1 << COUNT_BITS) - 1;
const PREV_BUSY: u64 = 1 << COUNT_BITS;

/// The counter after one more activity in bucket `bucket` (pure).
pub fn count_activity(state: u64, bucket: u64) -> u64 {
    let (was, count) = (state >> (COUNT_BITS + 1), state & COUNT_MAX);
    if was == bucket {
        (state & !COUNT_MAX) | (count + 1).min(COUNT_MAX)
    } else {
        let prev_busy = was + 1 == bucket && count >= BUSY_ACTIVITIES;
        (bucket << (COUNT_BITS + 1)) | if prev_busy { PREV_BUSY } else { 0 } | 1
    }
}

/// Whether the counter says busy: this bucket or the one before it had
/// [`BUSY_ACTIVITIES`] (pure).
pub fn is_busy(state: u64) -> bool {
    state & PREV_BUSY != 0 || state & COUNT_MAX >= BUSY_ACTIVITIES
}

/// What the polling threads and the runtime hooks share.
#[derive(Debug)]
struct Shared {
    origin: Instant,
    window: Duration,
    /// Nanoseconds since `origin` of the last park or unpark of a runtime thread while the
    /// process was busy.
    last_active: AtomicU64,
    /// Parks and unparks in the current bucket ([`count_activity`]).
    activities: AtomicU64,
    /// Set by a poller before it sleeps; [`IdlePoller::activity`] clears it and wakes them.
    asleep: AtomicBool,
    stop: AtomicBool,
    /// Polling threads that are in `SCHED_IDLE` and polling or sleeping (for tests).
    running: AtomicU64,
    /// How many times a poller went to sleep (for tests).
    sleeps: AtomicU64,
    /// How many times a sleeping poller was woken before its timeout (for tests).
    wakes: AtomicU64,
    /// Pollers allowed to spin: holding their CPU's lock (or about to look at the window
    /// again after taking it), or polling without one (for tests).
    holding: AtomicU64,
    /// Pollers waiting for another process to give up their CPU's lock (for tests).
    waiting: AtomicU64,
}

/// The lock file that says which process keeps `cpu` awake.
fn lock_path(dir: &Path, cpu: usize) -> std::path::PathBuf {
    dir.join(format!("walkv-idle-poll-cpu{cpu}.lock"))
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    /// The poller's loop. With `lock` (its CPU's lock file) it spins only while holding
    /// the lock; without, it spins whenever its process is busy.
    fn poll(&self, cpu: usize, mut lock: Option<File>) {
        let mut spins: u64 = 0;
        let mut holding = false;
        while !self.stop.load(SeqCst) {
            if should_poll(self.last_active.load(SeqCst), self.now_ns(), self.window) {
                if holding {
                    for _ in 0..SPINS_PER_CHECK {
                        std::hint::spin_loop();
                    }
                    spins += 1;
                    continue;
                }
                if let Some(file) = &lock {
                    // Another walkv process may be keeping this CPU awake already: wait,
                    // blocked, until it stops, then look at the window again.
                    self.waiting.fetch_add(1, SeqCst);
                    let locked = lock_waiting(file);
                    self.waiting.fetch_sub(1, SeqCst);
                    if let Err(e) = locked {
                        warn!(cpu, error = %e, "cannot lock the idle-poll lock file: this CPU's poller polls without taking turns with other walkv processes");
                        lock = None;
                    }
                }
                holding = true;
                self.holding.fetch_add(1, SeqCst);
                continue;
            }
            if holding {
                holding = false;
                if let Some(Err(e)) = lock.as_ref().map(File::unlock) {
                    // Closing the file releases the lock for sure.
                    warn!(cpu, error = %e, "cannot unlock the idle-poll lock file: this CPU's poller polls without taking turns with other walkv processes");
                    lock = None;
                }
                self.holding.fetch_sub(1, SeqCst);
            }
            // Announce the sleep, then look again: an `activity` that stored its time
            // before the announcement is seen here, one after it sees `asleep` and wakes
            // us (both sides use SeqCst).
            self.asleep.store(true, SeqCst);
            if should_poll(self.last_active.load(SeqCst), self.now_ns(), self.window) {
                continue;
            }
            self.sleeps.fetch_add(1, SeqCst);
            let slept = Instant::now();
            thread::park_timeout(MAX_SLEEP);
            if slept.elapsed() < MAX_SLEEP {
                self.wakes.fetch_add(1, SeqCst);
            }
        }
        if holding {
            self.holding.fetch_sub(1, SeqCst);
        }
        // Dropping `lock` closes the file, which releases the lock.
        tracing::debug!(spins, "idle poller stopped");
    }
}

/// Takes `file`'s lock, waiting (blocked) while another process holds it; a signal that
/// interrupts the wait does not end it.
fn lock_waiting(file: &File) -> std::io::Result<()> {
    loop {
        match file.lock() {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            locked => return locked,
        }
    }
}

/// The polling threads of one process; stops them when dropped (a poller waiting for
/// another process's lock stops once it gets it).
#[derive(Debug)]
pub struct IdlePoller {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl IdlePoller {
    /// Starts one polling thread per CPU this process may run on, each polling for
    /// `window` after the last [`IdlePoller::activity`] and taking turns per CPU with the
    /// other walkv processes of the machine (lock files in the system's temp directory). A
    /// thread that cannot be pinned and made `SCHED_IDLE` exits at once (a poller at
    /// normal priority would take CPU from real work), with a warning.
    pub fn start(window: Duration) -> std::io::Result<Arc<IdlePoller>> {
        IdlePoller::start_in(window, &std::env::temp_dir())
    }

    /// [`IdlePoller::start`] with the per-CPU lock files in `lock_dir`: pollers that use the
    /// same directory take turns.
    pub fn start_in(window: Duration, lock_dir: &Path) -> std::io::Result<Arc<IdlePoller>> {
        // Built first, so that a spawn failing part-way drops it and stops the pollers
        // already started.
        let mut poller = IdlePoller {
            shared: Arc::new(Shared {
                origin: Instant::now(),
                window,
                last_active: AtomicU64::new(0),
                activities: AtomicU64::new(0),
                asleep: AtomicBool::new(false),
                stop: AtomicBool::new(false),
                running: AtomicU64::new(0),
                sleeps: AtomicU64::new(0),
                wakes: AtomicU64::new(0),
                holding: AtomicU64::new(0),
                waiting: AtomicU64::new(0),
            }),
            threads: Vec::new(),
        };
        let cpus = sys::allowed_cpus()?;
        for cpu in &cpus {
            let cpu = *cpu;
            let shared = poller.shared.clone();
            let lock_dir = lock_dir.to_path_buf();
            let handle = thread::Builder::new()
                .name(THREAD_NAME.into())
                .spawn(move || match sys::pin_and_idle(cpu) {
                    Ok(()) => {
                        let path = lock_path(&lock_dir, cpu);
                        let lock = sys::open_cpu_lock(&path)
                            .inspect_err(|e| {
                                warn!(cpu, path = %path.display(), error = %e, "cannot open the idle-poll lock file: this CPU's poller polls without taking turns with other walkv processes");
                            })
                            .ok();
                        shared.running.fetch_add(1, SeqCst);
                        shared.poll(cpu, lock);
                        shared.running.fetch_sub(1, SeqCst);
                    }
                    Err(e) => {
                        warn!(cpu, error = %e, "idle polling off on this CPU: cannot pin the poller or make it SCHED_IDLE");
                    }
                })?;
            poller.threads.push(handle);
        }
        if cpus.is_empty() {
            warn!("idle polling is off: it needs Linux (SCHED_IDLE and CPU affinity)");
        } else {
            info!(
                cpus = cpus.len(),
                window_us = window.as_micros() as u64,
                "idle polling: CPUs kept awake after each burst of work (SCHED_IDLE threads `{THREAD_NAME}`)"
            );
        }
        Ok(Arc::new(poller))
    }

    /// Records that the process is active now and, when it is busy ([`is_busy`]), has the
    /// pollers poll for the next `window`, waking them if they sleep: a clock read and three
    /// atomics, plus, only on the first busy call after a quiet `window`, one futex wake per
    /// CPU. Waking them when a worker unparks (not only when it parks) has them
    /// spinning while the work runs, before its threads wait on each other or the disk:
    /// waking only at park was slower at PUT-64 in 9 of 10 alternated rounds (medians 3–4%
    /// lower), for a few µs saved on the first request after a quiet spell.
    pub fn activity(&self) {
        let now = self.shared.now_ns();
        let bucket = now / BUCKET_NS;
        let count = |s| Some(count_activity(s, bucket));
        let before = match self.shared.activities.fetch_update(SeqCst, SeqCst, count) {
            Ok(s) | Err(s) => s,
        };
        if !is_busy(count_activity(before, bucket)) {
            return;
        }
        self.shared.last_active.store(now, SeqCst);
        if self.shared.asleep.load(SeqCst) && self.shared.asleep.swap(false, SeqCst) {
            for t in &self.threads {
                t.thread().unpark();
            }
        }
    }

    /// Polling threads running (pinned, `SCHED_IDLE`), for tests.
    pub fn running(&self) -> u64 {
        self.shared.running.load(SeqCst)
    }

    /// How many times a poller has gone to sleep so far, for tests.
    pub fn sleeps(&self) -> u64 {
        self.shared.sleeps.load(SeqCst)
    }

    /// How many times a sleeping poller was woken before its timeout, for tests.
    pub fn wakes(&self) -> u64 {
        self.shared.wakes.load(SeqCst)
    }

    /// Pollers allowed to spin (holding their CPU's lock, or polling without one), for
    /// tests.
    pub fn holding(&self) -> u64 {
        self.shared.holding.load(SeqCst)
    }

    /// Pollers waiting for another process to stop spinning on their CPU, for tests.
    pub fn waiting(&self) -> u64 {
        self.shared.waiting.load(SeqCst)
    }
}

impl Drop for IdlePoller {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        for t in &self.threads {
            t.thread().unpark();
        }
    }
}

/// `SCHED_IDLE` in `sched(7)`, as `/proc/PID/task/TID/stat` reports it.
pub const SCHED_IDLE: u32 = 5;

/// The scheduling policy (field 41 of `/proc/PID/task/TID/stat`) of every `idle-poll`
/// thread of process `pid` (a number, or `self`), to check from outside that pollers run
/// and are `SCHED_IDLE` (tests, diagnostics). A thread that exits meanwhile is skipped.
pub fn policies_of_pollers(pid: &str) -> std::io::Result<Vec<u32>> {
    let mut policies = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
        let dir = task.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() != THREAD_NAME {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
        // The fields after the parenthesised comm start at field 3.
        let policy = stat
            .rfind(')')
            .and_then(|i| stat.get(i + 2..))
            .and_then(|rest| rest.split(' ').nth(41 - 3))
            .and_then(|p| p.parse::<u32>().ok());
        policies.extend(policy);
    }
    Ok(policies)
}

#[cfg(target_os = "linux")]
mod sys {
    use std::fs::{File, OpenOptions};
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    use std::path::Path;
    use thread_priority::unix::thread_schedule_policy;
    use thread_priority::{
        set_thread_priority_and_policy, thread_native_id, NormalThreadSchedulePolicy,
        ThreadPriority, ThreadSchedulePolicy,
    };

    const IDLE: ThreadSchedulePolicy =
        ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);

    /// The CPUs in this process's affinity mask.
    pub fn allowed_cpus() -> std::io::Result<Vec<usize>> {
        core_affinity::get_core_ids()
            .map(|ids| ids.into_iter().map(|c| c.id).collect())
            .ok_or_else(|| std::io::Error::other("cannot read the CPU affinity mask"))
    }

    /// Opens (creating it if needed) a CPU's lock file. An existing file is opened
    /// read-only, which is enough for `flock`: it may belong to another user. A file this
    /// creates is made readable by all, whatever the umask, so that other users' servers
    /// can take turns with this one. The lock files live in a world-writable directory,
    /// where another user could have put a symlink or a FIFO under that name: neither is
    /// followed nor waited on, and anything but a regular file is refused.
    pub fn open_cpu_lock(path: &Path) -> std::io::Result<File> {
        let flags = libc::O_NOFOLLOW | libc::O_NONBLOCK;
        let open_existing = || OpenOptions::new().read(true).custom_flags(flags).open(path);
        let file = match open_existing() {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                match OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(flags)
                    .open(path)
                {
                    Ok(created) => {
                        created.set_permissions(std::fs::Permissions::from_mode(0o644))?;
                        created
                    }
                    // Created by another process meanwhile.
                    Err(_) => open_existing()?,
                }
            }
            opened => opened?,
        };
        if !file.metadata()?.file_type().is_file() {
            return Err(std::io::Error::other("not a regular file"));
        }
        Ok(file)
    }

    /// Pins the calling thread to `cpu` and gives it the `SCHED_IDLE` policy.
    pub fn pin_and_idle(cpu: usize) -> std::io::Result<()> {
        if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
            return Err(std::io::Error::other(format!("cannot pin to CPU {cpu}")));
        }
        let set = set_thread_priority_and_policy(thread_native_id(), ThreadPriority::Min, IDLE);
        // After setting the policy the crate also resets the nice value, which an
        // unprivileged process started under `nice` may not do: the policy is what counts.
        match (set, thread_schedule_policy()) {
            (_, Ok(IDLE)) => Ok(()),
            (Err(e), _) => Err(std::io::Error::other(format!(
                "cannot set SCHED_IDLE: {e:?}"
            ))),
            (Ok(()), other) => Err(std::io::Error::other(format!(
                "SCHED_IDLE did not take: the policy is {other:?}"
            ))),
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod sys {
    pub fn allowed_cpus() -> std::io::Result<Vec<usize>> {
        Ok(Vec::new())
    }

    pub fn open_cpu_lock(_path: &std::path::Path) -> std::io::Result<std::fs::File> {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "idle polling needs Linux",
        ))
    }

    pub fn pin_and_idle(_cpu: usize) -> std::io::Result<()> {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "idle polling needs Linux",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_only_within_the_window_after_the_last_activity() {
        let w = Duration::from_micros(200);
        assert!(should_poll(1_000, 1_000, w));
        assert!(should_poll(1_000, 200_999, w));
        assert!(!should_poll(1_000, 201_000, w));
        // A clock read before a concurrent store of a later time counts as active.
        assert!(should_poll(5_000, 4_000, w));
        assert!(!should_poll(0, u64::MAX, w));
    }

    #[test]
    fn only_a_stream_of_activity_counts_as_busy() {
        let ms = |n: u64| n * 1_000_000;
        let run = |times: &[u64]| {
            let mut state = 0;
            times
                .iter()
                .map(|&t| {
                    state = count_activity(state, t / BUCKET_NS);
                    is_busy(state)
                })
                .collect::<Vec<_>>()
        };
        // A heartbeat exchange (four parks and unparks within a millisecond) every 200 ms.
        let heartbeats: Vec<u64> = (0..20u64)
            .flat_map(|i| (0..4).map(move |k| ms(200 * i) + k * 200_000))
            .collect();
        assert!(run(&heartbeats).iter().all(|busy| !busy));
        // A request every 500 µs, four activities each: busy from the 8th activity of the
        // first bucket on, without a gap at the bucket boundaries.
        let stream: Vec<u64> = (0..400u64).map(|i| i * 125_000).collect();
        let busy = run(&stream);
        assert!(!busy[..BUSY_ACTIVITIES as usize - 1].iter().any(|b| *b));
        assert!(busy[BUSY_ACTIVITIES as usize - 1..].iter().all(|b| *b));
        // After the stream, the next bucket is still busy (the one before it was); a
        // bucket later, a lone activity is not.
        let mut state = 0;
        for &t in &stream {
            state = count_activity(state, t / BUCKET_NS);
        }
        let last = stream[stream.len() - 1] / BUCKET_NS;
        assert!(is_busy(count_activity(state, last + 1)));
        assert!(!is_busy(count_activity(state, last + 2)));
        // The count saturates instead of spilling into the flag or the bucket.
        let mut state = 0;
        for _ in 0..2 * COUNT_MAX {
            state = count_activity(state, 7);
        }
        assert_eq!(state >> (COUNT_BITS + 1), 7);
        assert_eq!(state & COUNT_MAX, COUNT_MAX);
        assert_eq!(state & PREV_BUSY, 0);
    }

    /// Waits (bounded) for `cond`, checking every millisecond.
    fn eventually(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            thread::sleep(Duration::from_millis(1));
        }
    }

    fn poller_policies() -> Vec<u32> {
        policies_of_pollers("self").unwrap()
    }

    /// The tests that start pollers count this process's `idle-poll` threads: one at a time.
    static POLLER_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// Calls `activity` often enough to count as busy until dropped.
    struct Busy {
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    }

    impl Busy {
        fn start(poller: &Arc<IdlePoller>) -> Busy {
            let stop = Arc::new(AtomicBool::new(false));
            let (poller, stopped) = (poller.clone(), stop.clone());
            let thread = thread::spawn(move || {
                while !stopped.load(SeqCst) {
                    poller.activity();
                    thread::sleep(Duration::from_micros(200));
                }
            });
            Busy {
                stop,
                thread: Some(thread),
            }
        }
    }

    impl Drop for Busy {
        fn drop(&mut self) {
            self.stop.store(true, SeqCst);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    #[test]
    fn pollers_are_sched_idle_sleep_when_quiet_and_wake_on_activity() {
        let _one_at_a_time = POLLER_TESTS.lock().unwrap_or_else(|e| e.into_inner());
        let locks = tempfile::tempdir().unwrap();
        let poller = IdlePoller::start_in(Duration::from_millis(200), locks.path()).unwrap();
        let cpus = sys::allowed_cpus().unwrap().len() as u64;
        eventually("every poller runs", || poller.running() == cpus);
        // A poller at any other policy would compete with real work.
        let policies = poller_policies();
        assert_eq!(policies.len() as u64, cpus, "one poller per CPU");
        assert!(policies.iter().all(|&p| p == SCHED_IDLE), "{policies:?}");

        // Nothing has been active: every poller goes to sleep.
        eventually("the pollers sleep", || poller.sleeps() >= cpus);
        let (wakes, sleeps) = (poller.wakes(), poller.sleeps());
        // A burst of activity wakes them before their own timeout (twice the busy count: a
        // burst split by a bucket boundary is still busy in one of the two buckets).
        for _ in 0..2 * BUSY_ACTIVITIES {
            poller.activity();
        }
        eventually("activity wakes the pollers", || {
            poller.wakes() >= wakes + cpus
        });
        eventually("the pollers sleep again after the window", || {
            poller.sleeps() >= sleeps + cpus
        });

        drop(poller);
        eventually("the pollers exit when dropped", || {
            poller_policies().is_empty()
        });
    }

    #[test]
    fn processes_on_one_machine_take_turns_keeping_each_cpu_awake() {
        let _one_at_a_time = POLLER_TESTS.lock().unwrap_or_else(|e| e.into_inner());
        // Two pollers on one lock directory stand for two processes: `flock` locks belong
        // to the open file, so two opens in one process exclude each other like two
        // processes do.
        let locks = tempfile::tempdir().unwrap();
        let window = Duration::from_millis(50);
        let a = IdlePoller::start_in(window, locks.path()).unwrap();
        let b = IdlePoller::start_in(window, locks.path()).unwrap();
        let cpus = sys::allowed_cpus().unwrap().len() as u64;
        eventually("every poller runs", || {
            a.running() == cpus && b.running() == cpus
        });

        // Both busy: each CPU has one spinning poller, and the other one waits for it.
        let busy_a = Busy::start(&a);
        let busy_b = Busy::start(&b);
        eventually("one poller per CPU spins, the other waits", || {
            a.holding() + b.holding() == cpus && a.waiting() + b.waiting() == cpus
        });
        for _ in 0..200 {
            let spinning = a.holding() + b.holding();
            assert!(spinning <= cpus, "{spinning} pollers spin on {cpus} CPUs");
            thread::sleep(Duration::from_micros(500));
        }

        // A goes quiet: after its window, B keeps every CPU awake. (A poller of A that was
        // waiting stays blocked until B lets go, then finds A quiet and sleeps.)
        drop(busy_a);
        eventually("the busy process takes over every CPU", || {
            b.holding() == cpus && a.holding() == 0
        });

        // Both quiet: nobody spins, and the locks are free for a newcomer.
        drop(busy_b);
        eventually("nobody spins", || a.holding() + b.holding() == 0);
        for cpu in sys::allowed_cpus().unwrap() {
            let lock = sys::open_cpu_lock(&lock_path(locks.path(), cpu)).unwrap();
            // A waiting poller of A may hold it for a moment: it gets it, finds A quiet
            // and lets go.
            eventually("the lock is free", || lock.try_lock().is_ok());
        }
        drop((a, b));
        eventually("the pollers exit when dropped", || {
            poller_policies().is_empty()
        });
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn a_lock_file_is_never_a_symlink_or_a_fifo_someone_left_there() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, "precious").unwrap();
        let link = dir.path().join("link.lock");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(
            sys::open_cpu_lock(&link).is_err(),
            "a symlink is not followed"
        );
        let dangling = dir.path().join("dangling.lock");
        std::os::unix::fs::symlink(dir.path().join("created"), &dangling).unwrap();
        assert!(sys::open_cpu_lock(&dangling).is_err());
        assert!(
            !dir.path().join("created").exists(),
            "nothing is created through it"
        );
        let fifo = dir.path().join("fifo.lock");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        assert!(
            sys::open_cpu_lock(&fifo).is_err(),
            "a FIFO is refused, not waited on"
        );
        // A lock file this creates is readable by all, whatever the umask.
        use std::os::unix::fs::PermissionsExt;
        let created = dir.path().join("cpu0.lock");
        sys::open_cpu_lock(&created).unwrap();
        let mode = std::fs::metadata(&created).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
    }

    #[test]
    fn without_a_usable_lock_directory_each_poller_polls_on_its_own() {
        let _one_at_a_time = POLLER_TESTS.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("missing");
        let a = IdlePoller::start_in(Duration::from_millis(50), &gone).unwrap();
        let b = IdlePoller::start_in(Duration::from_millis(50), &gone).unwrap();
        let cpus = sys::allowed_cpus().unwrap().len() as u64;
        let busy = (Busy::start(&a), Busy::start(&b));
        eventually("both poll on every CPU", || {
            a.holding() == cpus && b.holding() == cpus
        });
        assert_eq!(a.waiting() + b.waiting(), 0);
        drop((busy, a, b));
        eventually("the pollers exit when dropped", || {
            poller_policies().is_empty()
        });
    }
}
