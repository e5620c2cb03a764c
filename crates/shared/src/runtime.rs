//! The tokio runtime every server `main` builds, sized by its `worker_threads` setting.
//!
//! `0` means tokio's default, one worker per core: right for a process that has a machine to
//! itself. When several walkv servers share a few cores (the quick-start cluster runs a
//! frontend and three storage nodes on one host), fewer workers per process means fewer
//! cross-thread wake-ups per request, which on a 2-core machine measured faster
//! (docs/PERFORMANCE.md, "Few threads, little allocation").
//!
//! One worker is built as tokio's current-thread scheduler on the calling thread rather than
//! a one-worker multi-threaded pool: the same single thread of execution, without the work-
//! stealing machinery (shared run queues, atomics on every wake) that one worker cannot use.
//!
//! With `idle_poll_us` > 0 the runtime also starts an [`IdlePoller`] and tells it each time
//! a worker parks or unparks, so the CPUs stay awake for that long after the last work
//! (sleeping pollers are woken by either, so they are spinning before the work ends).

use crate::idle_poll::IdlePoller;
use std::time::Duration;

/// Builds the runtime: `1` = the current-thread scheduler, otherwise a multi-threaded one
/// with `worker_threads` workers (0 = one per core); `idle_poll_us` > 0 starts idle polling
/// for that many µs after each park or unpark of a worker.
pub fn build(worker_threads: u32, idle_poll_us: u64) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if worker_threads > 0 {
            b.worker_threads(worker_threads as usize);
        }
        b
    };
    builder.enable_all();
    if idle_poll_us > 0 {
        let poller = IdlePoller::start(Duration::from_micros(idle_poll_us))?;
        let on_unpark = poller.clone();
        builder
            .on_thread_park(move || poller.activity())
            .on_thread_unpark(move || on_unpark.activity());
    }
    builder.build()
}

/// Checks an `idle_poll_us` setting (at most [`crate::idle_poll::MAX_WINDOW_US`]); the
/// error says what was expected.
pub fn check_idle_poll_us(value: u64) -> Result<(), String> {
    let max = crate::idle_poll::MAX_WINDOW_US;
    if value > max {
        return Err(format!("0 (off) up to {max} µs, got {value}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use tokio::runtime::RuntimeFlavor;

    #[test]
    fn one_worker_is_the_current_thread_scheduler() {
        let flavor = |n| super::build(n, 0).unwrap().handle().runtime_flavor();
        assert_eq!(flavor(1), RuntimeFlavor::CurrentThread);
        assert_eq!(flavor(2), RuntimeFlavor::MultiThread);
        assert_eq!(flavor(0), RuntimeFlavor::MultiThread);
    }

    #[test]
    fn a_current_thread_runtime_runs_spawned_tasks_and_blocking_work() {
        // The servers spawn tasks, wait on work handed to other threads (spawn_blocking,
        // the WAL writer's channel) and use timers; all of it must work on one thread.
        let rt = super::build(1, 0).unwrap();
        let got = rt.block_on(async {
            let (tx, rx) = tokio::sync::oneshot::channel();
            std::thread::spawn(move || tx.send(7u32).unwrap());
            let spawned = tokio::spawn(async { 5u32 });
            let blocking = tokio::task::spawn_blocking(|| 3u32);
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            rx.await.unwrap() + spawned.await.unwrap() + blocking.await.unwrap()
        });
        assert_eq!(got, 15);
    }
}
