//! The tokio runtime every server `main` builds, sized by its `worker_threads` setting.
//!
//! `0` means tokio's default, one worker per core: right for a process that has a machine to
//! itself. When several walkv servers share a few cores (the quick-start cluster runs a
//! frontend and three storage nodes on one host), fewer workers per process means fewer
//! cross-thread wake-ups per request, which on a 2-core machine measured faster (README,
//! "Performance").

/// Builds a multi-threaded runtime with `worker_threads` workers (0 = one per core).
pub fn build(worker_threads: u32) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if worker_threads > 0 {
        builder.worker_threads(worker_threads as usize);
    }
    builder.build()
}
