//! How a walkv process takes memory from the OS: in 4 KiB pages, without transparent huge
//! pages (THP).
//!
//! Every binary allocates through mimalloc (each `main` makes it the global allocator).
//! mimalloc asks the kernel for huge pages on its arenas and hands freed memory back 64 KiB
//! at a time a second after it was freed; memory it touches again can then come back as a
//! fresh 2 MiB page, which the kernel zeroes whole before the allocation goes on. In a 5 s
//! PUT-64 run that was 85 huge-page faults and ~2% of all CPU samples, most of them on the
//! WAL writer's thread between two fsyncs; with THP off, none. What that gained, and how
//! it moves with the machine, is in docs/PERFORMANCE.md ("Memory in 4 KiB pages").
//!
//! [`disable_transparent_huge_pages`] turns THP off for this process, all its threads, and
//! any child it would start (`prctl(PR_SET_THP_DISABLE)`; fork and exec inherit it); the
//! machine-wide setting is not touched. mimalloc's own
//! switch, `MIMALLOC_ALLOW_THP=0`, does the same but is read from the environment before
//! `main` runs, so it cannot be a default of ours.

/// Makes every later page fault of this process map a 4 KiB page, whatever the machine's
/// THP setting or mimalloc's `MADV_HUGEPAGE`. Call it first thing in `main`, after the
/// tracing subscriber: memory already mapped in huge pages stays so. If the kernel refuses,
/// it logs a warning and the process runs on with THP as the machine has it (only slower).
/// On other systems than Linux it does nothing.
pub fn disable_transparent_huge_pages() {
    if let Err(e) = sys::disable_thp() {
        tracing::warn!(error = %e, "cannot turn transparent huge pages off; running with them");
    }
}

#[cfg(target_os = "linux")]
mod sys {
    pub fn disable_thp() -> std::io::Result<()> {
        // rustix documents this as "for the calling thread", but the kernel keeps the flag
        // on the memory map that all threads share: one call covers the whole process.
        Ok(rustix::thread::disable_transparent_huge_pages(true)?)
    }
}

#[cfg(not(target_os = "linux"))]
mod sys {
    pub fn disable_thp() -> std::io::Result<()> {
        Ok(())
    }
}
