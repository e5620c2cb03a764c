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
//! else to run and preempts it as soon as anything else wakes there, so it never takes
//! time from real work. It spins while the process was active within the last `window`
//! ([`IdlePoller::activity`], called by the runtime each time its threads park or unpark)
//! and sleeps otherwise, so an idle server costs nothing.
//!
//! The decision is [`should_poll`]; the threads only read clocks and atomics.

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

/// What the polling threads and the runtime hooks share.
#[derive(Debug)]
struct Shared {
    origin: Instant,
    window: Duration,
    /// Nanoseconds since `origin` of the last park or unpark of a runtime thread.
    last_active: AtomicU64,
    /// Set by a poller before it sleeps; [`IdlePoller::activity`] clears it and wakes them.
    asleep: AtomicBool,
    stop: AtomicBool,
    /// Polling threads that are in `SCHED_IDLE` and polling or sleeping (for tests).
    running: AtomicU64,
    /// How many times a poller went to sleep (for tests).
    sleeps: AtomicU64,
    /// How many times a poller started polling after not polling (for tests).
    rounds: AtomicU64,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    fn poll(&self) {
        let mut spins: u64 = 0;
        let mut polling = false;
        while !self.stop.load(SeqCst) {
            if should_poll(self.last_active.load(SeqCst), self.now_ns(), self.window) {
                if !polling {
                    polling = true;
                    self.rounds.fetch_add(1, SeqCst);
                }
                for _ in 0..SPINS_PER_CHECK {
                    std::hint::spin_loop();
                }
                spins += 1;
                continue;
            }
            polling = false;
            // Announce the sleep, then look again: an `activity` that stored its time
            // before the announcement is seen here, one after it sees `asleep` and wakes
            // us (both sides use SeqCst).
            self.asleep.store(true, SeqCst);
            if should_poll(self.last_active.load(SeqCst), self.now_ns(), self.window) {
                continue;
            }
            self.sleeps.fetch_add(1, SeqCst);
            thread::park_timeout(MAX_SLEEP);
        }
        tracing::debug!(spins, "idle poller stopped");
    }
}

/// The polling threads of one process; stops them when dropped.
#[derive(Debug)]
pub struct IdlePoller {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl IdlePoller {
    /// Starts one polling thread per CPU this process may run on, each polling for
    /// `window` after the last [`IdlePoller::activity`]. A thread that cannot be pinned
    /// and made `SCHED_IDLE` exits at once (a poller at normal priority would take CPU
    /// from real work), with a warning.
    pub fn start(window: Duration) -> std::io::Result<Arc<IdlePoller>> {
        let shared = Arc::new(Shared {
            origin: Instant::now(),
            window,
            last_active: AtomicU64::new(0),
            asleep: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            running: AtomicU64::new(0),
            sleeps: AtomicU64::new(0),
            rounds: AtomicU64::new(0),
        });
        let cpus = sys::allowed_cpus()?;
        let mut threads = Vec::with_capacity(cpus.len());
        for cpu in &cpus {
            let cpu = *cpu;
            let shared = shared.clone();
            let handle = thread::Builder::new()
                .name(THREAD_NAME.into())
                .spawn(move || match sys::pin_and_idle(cpu) {
                    Ok(()) => {
                        shared.running.fetch_add(1, SeqCst);
                        shared.poll();
                        shared.running.fetch_sub(1, SeqCst);
                    }
                    Err(e) => {
                        warn!(cpu, error = %e, "idle polling off on this CPU: cannot pin the poller or make it SCHED_IDLE");
                    }
                })?;
            threads.push(handle);
        }
        info!(
            cpus = cpus.len(),
            window_us = window.as_micros() as u64,
            "idle polling: CPUs kept awake after each burst of work (SCHED_IDLE threads `{THREAD_NAME}`)"
        );
        Ok(Arc::new(IdlePoller { shared, threads }))
    }

    /// Records that the process is active now and wakes sleeping pollers. Cheap enough
    /// for every park and unpark of a runtime thread: a clock read and two atomics, and a
    /// wake-up only after a quiet `window`.
    pub fn activity(&self) {
        self.shared.last_active.store(self.shared.now_ns(), SeqCst);
        if self.shared.asleep.swap(false, SeqCst) {
            for t in &self.threads {
                t.thread().unpark();
            }
        }
    }

    /// Polling threads running (pinned, `SCHED_IDLE`), for tests and the startup log.
    pub fn running(&self) -> u64 {
        self.shared.running.load(SeqCst)
    }

    /// How many times a poller has gone to sleep so far, for tests.
    pub fn sleeps(&self) -> u64 {
        self.shared.sleeps.load(SeqCst)
    }

    /// How many times a poller has started polling after a pause, for tests.
    pub fn rounds(&self) -> u64 {
        self.shared.rounds.load(SeqCst)
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

mod sys {
    use thread_priority::{
        set_thread_priority_and_policy, thread_native_id, NormalThreadSchedulePolicy,
        ThreadPriority, ThreadSchedulePolicy,
    };

    /// The CPUs in this process's affinity mask.
    pub fn allowed_cpus() -> std::io::Result<Vec<usize>> {
        core_affinity::get_core_ids()
            .map(|ids| ids.into_iter().map(|c| c.id).collect())
            .ok_or_else(|| std::io::Error::other("cannot read the CPU affinity mask"))
    }

    /// Pins the calling thread to `cpu` and gives it the `SCHED_IDLE` policy.
    pub fn pin_and_idle(cpu: usize) -> std::io::Result<()> {
        if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
            return Err(std::io::Error::other(format!("cannot pin to CPU {cpu}")));
        }
        set_thread_priority_and_policy(
            thread_native_id(),
            ThreadPriority::Min,
            ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle),
        )
        .map_err(|e| std::io::Error::other(format!("cannot set SCHED_IDLE: {e:?}")))
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

    /// Waits (bounded) for `cond`, checking every millisecond.
    fn eventually(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// `SCHED_IDLE` in `sched(7)`.
    const SCHED_IDLE: u32 = 5;

    /// Policy (field 41 of `/proc/self/task/TID/stat`) of every thread named `idle-poll`.
    fn poller_policies() -> Vec<u32> {
        let mut out = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap() {
            let dir = task.unwrap().path();
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            if comm.trim() != THREAD_NAME {
                continue;
            }
            let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
            // Fields after the parenthesised comm start at field 3.
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            let policy = rest.split(' ').nth(41 - 3).unwrap().parse().unwrap();
            out.push(policy);
        }
        out
    }

    #[test]
    fn pollers_are_sched_idle_sleep_when_quiet_and_wake_on_activity() {
        let poller = IdlePoller::start(Duration::from_millis(20)).unwrap();
        let cpus = sys::allowed_cpus().unwrap().len() as u64;
        eventually("every poller runs", || poller.running() == cpus);
        // A poller at any other policy would compete with real work.
        let policies = poller_policies();
        assert_eq!(policies.len() as u64, cpus, "one poller per CPU");
        assert!(policies.iter().all(|&p| p == SCHED_IDLE), "{policies:?}");

        // Nothing has been active: every poller goes to sleep.
        eventually("the pollers sleep", || poller.sleeps() >= cpus);
        let (rounds, sleeps) = (poller.rounds(), poller.sleeps());
        // Activity wakes them at once: their own timed wake-ups (every second) would find
        // the 20 ms window over and go back to sleep without polling.
        poller.activity();
        eventually("the pollers poll again", || {
            poller.rounds() >= rounds + cpus
        });
        eventually("the pollers sleep again after the window", || {
            poller.sleeps() >= sleeps + cpus
        });

        drop(poller);
        eventually("the pollers exit when dropped", || {
            poller_policies().is_empty()
        });
    }
}
