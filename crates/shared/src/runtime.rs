//! The tokio runtime every server `main` builds, sized by its `worker_threads` setting.
//!
//! `0` means tokio's default, one worker per core: right for a process that has a machine to
//! itself. When several walkv servers share a few cores (the quick-start cluster runs a
//! frontend and three storage nodes on one host), fewer workers per process means fewer
//! cross-thread wake-ups per request, which on a 2-core machine measured faster (README,
//! "Performance").
//!
//! One worker is built as tokio's current-thread scheduler on the calling thread rather than
//! a one-worker multi-threaded pool: the same single thread of execution, without the work-
//! stealing machinery (shared run queues, atomics on every wake) that one worker cannot use.

/// Builds the runtime: `1` = the current-thread scheduler, otherwise a multi-threaded one
/// with `worker_threads` workers (0 = one per core).
pub fn build(worker_threads: u32) -> std::io::Result<tokio::runtime::Runtime> {
    if worker_threads == 1 {
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if worker_threads > 0 {
        builder.worker_threads(worker_threads as usize);
    }
    builder.build()
}

#[cfg(test)]
mod tests {
    use tokio::runtime::RuntimeFlavor;

    #[test]
    fn one_worker_is_the_current_thread_scheduler() {
        let flavor = |n| super::build(n).unwrap().handle().runtime_flavor();
        assert_eq!(flavor(1), RuntimeFlavor::CurrentThread);
        assert_eq!(flavor(2), RuntimeFlavor::MultiThread);
        assert_eq!(flavor(0), RuntimeFlavor::MultiThread);
    }

    #[test]
    fn a_current_thread_runtime_runs_spawned_tasks_and_blocking_work() {
        // The servers spawn tasks, wait on work handed to other threads (spawn_blocking,
        // the WAL writer's channel) and use timers; all of it must work on one thread.
        let rt = super::build(1).unwrap();
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
