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
//! wakes there. It spins while the process was active within the last `window` (the
//! runtime calls [`IdlePoller::activity`] each time a worker parks or unparks) and sleeps
//! otherwise.
//!
//! What it costs: CPU time that would otherwise be idle, so `top` shows the pollers busy
//! while requests flow, and a quiet server still polls for `window` after each heartbeat.
//! Where CPU time is capped or billed (a container with a `cpu.max` quota, burstable
//! cloud instances) that time is not free: the pollers spend the quota of the real work,
//! and SCHED_IDLE only yields to threads of the same cgroup. Leave it off there.
//!
//! Linux only; elsewhere `start` starts no pollers and says so. The decision is
//! [`should_poll`]; the threads only read clocks and atomics.

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
    /// How many times a sleeping poller was woken before its timeout (for tests).
    wakes: AtomicU64,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    fn poll(&self) {
        let mut spins: u64 = 0;
        while !self.stop.load(SeqCst) {
            if should_poll(self.last_active.load(SeqCst), self.now_ns(), self.window) {
                for _ in 0..SPINS_PER_CHECK {
                    std::hint::spin_loop();
                }
                spins += 1;
                continue;
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
        // Built first, so that a spawn failing part-way drops it and stops the pollers
        // already started.
        let mut poller = IdlePoller {
            shared: Arc::new(Shared {
                origin: Instant::now(),
                window,
                last_active: AtomicU64::new(0),
                asleep: AtomicBool::new(false),
                stop: AtomicBool::new(false),
                running: AtomicU64::new(0),
                sleeps: AtomicU64::new(0),
                wakes: AtomicU64::new(0),
            }),
            threads: Vec::new(),
        };
        let cpus = sys::allowed_cpus()?;
        for cpu in &cpus {
            let cpu = *cpu;
            let shared = poller.shared.clone();
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

    /// Records that the process is active now and wakes sleeping pollers: a clock read and
    /// two atomics, plus, only on the first call after a quiet `window`, one futex wake
    /// per CPU. Waking them when a worker unparks (not only when it parks) has them
    /// spinning while the work runs, before its threads wait on each other or the disk:
    /// waking only at park was slower at PUT-64 in 9 of 10 alternated rounds (medians 3–4%
    /// lower), for a few µs saved on the first request after a quiet spell.
    pub fn activity(&self) {
        self.shared.last_active.store(self.shared.now_ns(), SeqCst);
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

    #[test]
    fn pollers_are_sched_idle_sleep_when_quiet_and_wake_on_activity() {
        let poller = IdlePoller::start(Duration::from_millis(200)).unwrap();
        let cpus = sys::allowed_cpus().unwrap().len() as u64;
        eventually("every poller runs", || poller.running() == cpus);
        // A poller at any other policy would compete with real work.
        let policies = poller_policies();
        assert_eq!(policies.len() as u64, cpus, "one poller per CPU");
        assert!(policies.iter().all(|&p| p == SCHED_IDLE), "{policies:?}");

        // Nothing has been active: every poller goes to sleep.
        eventually("the pollers sleep", || poller.sleeps() >= cpus);
        let (wakes, sleeps) = (poller.wakes(), poller.sleeps());
        // Activity wakes them before their own timeout.
        poller.activity();
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
}
