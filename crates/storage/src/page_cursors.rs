//! Snapshot transfers in progress: the open snapshot file each one reads and where its last
//! page stopped.
//!
//! A catch-up copies a source's snapshot page by page (`snapshot_page`), and a large one
//! takes seconds. Meanwhile the source may write a newer snapshot and remove the one being
//! copied; a transfer that reopened the file by name for each page then failed ("snapshot
//! is gone") and the catch-up started over, and under a steady write load a large store
//! could never finish. So a transfer keeps the file it started open: on Linux an unlinked
//! file's data stays readable while it is open, and it is freed on the last close.
//!
//! Promises:
//! - a page of the transfer that ended at `after` resumes at the byte the last page stopped
//!   at, in the same open file;
//! - a new transfer of a snapshot another transfer has open shares that file;
//! - at most [`MAX_OPEN`] cursors are kept and one idle for [`IDLE`] is dropped at the next
//!   call, so an abandoned transfer pins a removed snapshot's disk space only that long.
//!   A finished transfer keeps nothing.
//!
//! Pure bookkeeping: opening and reading the files is the caller's.

use crate::snapshot::Resume;
use std::fs::File;
use std::sync::Arc;
use std::time::{Duration, Instant};
use walkv_shared::Seq;

/// Most transfers tracked at once (a source rarely serves more than one or two catch-ups).
pub const MAX_OPEN: usize = 4;

/// A cursor unused this long belongs to a transfer that was abandoned.
pub const IDLE: Duration = Duration::from_secs(60);

/// Where one transfer stands.
#[derive(Debug)]
struct Cursor {
    seq: Seq,
    file: Arc<File>,
    /// The last key the transfer was sent.
    after: String,
    /// Where its next page starts.
    resume: Resume,
    used: Instant,
}

/// The cursors of the transfers in progress.
#[derive(Debug, Default)]
pub struct PageCursors {
    open: Vec<Cursor>,
}

impl PageCursors {
    /// For a page of snapshot `seq` after `after`: the file the transfer has open and the
    /// offset to resume at, taken out of the set (put the new position back with
    /// [`PageCursors::remember`]); else another transfer's open file of the same snapshot,
    /// to read from the start; else `None` (open the file by name).
    pub fn take(
        &mut self,
        seq: Seq,
        after: Option<&str>,
        now: Instant,
    ) -> Option<(Arc<File>, Option<Resume>)> {
        self.open.retain(|c| now.duration_since(c.used) < IDLE);
        let exact = after.and_then(|a| self.open.iter().position(|c| c.seq == seq && c.after == a));
        if let Some(i) = exact {
            let c = self.open.swap_remove(i);
            return Some((c.file, Some(c.resume)));
        }
        self.open
            .iter()
            .find(|c| c.seq == seq)
            .map(|c| (c.file.clone(), None))
    }

    /// Records that a transfer of snapshot `seq` was sent up to `after`, and that its next
    /// page starts at `resume` in `file`. The least recently used cursor beyond
    /// [`MAX_OPEN`] is dropped.
    pub fn remember(
        &mut self,
        seq: Seq,
        file: Arc<File>,
        after: String,
        resume: Resume,
        now: Instant,
    ) {
        self.open.push(Cursor {
            seq,
            file,
            after,
            resume,
            used: now,
        });
        if self.open.len() > MAX_OPEN {
            if let Some(oldest) = (0..self.open.len()).min_by_key(|&i| self.open[i].used) {
                self.open.swap_remove(oldest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl PageCursors {
        fn len(&self) -> usize {
            self.open.len()
        }

        fn is_empty(&self) -> bool {
            self.open.is_empty()
        }
    }

    fn file() -> Arc<File> {
        Arc::new(tempfile::tempfile().unwrap())
    }

    fn at(offset: u64) -> Resume {
        Resume {
            pos: walkv_shared::types::LogPosition::default(),
            offset,
        }
    }

    #[test]
    fn a_transfer_resumes_where_its_last_page_stopped_in_the_file_it_started() {
        let (mut cursors, t0) = (PageCursors::default(), Instant::now());
        assert!(cursors.take(Seq(10), None, t0).is_none());
        let f = file();
        cursors.remember(Seq(10), f.clone(), "k5".into(), at(500), t0);
        let (got, resume) = cursors.take(Seq(10), Some("k5"), t0).unwrap();
        assert!(Arc::ptr_eq(&got, &f));
        assert_eq!(resume, Some(at(500)));
        // Taken out: the transfer puts its next position back, or finished and keeps nothing.
        assert!(cursors.is_empty());
    }

    #[test]
    fn another_transfer_of_the_same_snapshot_shares_the_open_file_from_the_start() {
        let (mut cursors, t0) = (PageCursors::default(), Instant::now());
        let f = file();
        cursors.remember(Seq(10), f.clone(), "k5".into(), at(500), t0);
        for after in [None, Some("k9")] {
            let (got, resume) = cursors.take(Seq(10), after, t0).unwrap();
            assert!(Arc::ptr_eq(&got, &f));
            assert_eq!(resume, None, "another transfer's offset is not this one's");
        }
        assert!(cursors.take(Seq(11), Some("k5"), t0).is_none());
        assert_eq!(cursors.len(), 1, "the first transfer's cursor stays");
    }

    #[test]
    fn idle_and_surplus_cursors_are_dropped() {
        let (mut cursors, t0) = (PageCursors::default(), Instant::now());
        for i in 0..=MAX_OPEN as u64 {
            let when = t0 + Duration::from_secs(i);
            cursors.remember(Seq(i), file(), "k".into(), at(i), when);
        }
        assert_eq!(cursors.len(), MAX_OPEN);
        let late = t0 + Duration::from_secs(1);
        assert!(
            cursors.take(Seq(0), Some("k"), late).is_none(),
            "the oldest was dropped"
        );
        let last = t0 + Duration::from_secs(MAX_OPEN as u64);
        assert!(cursors
            .take(Seq(1), None, last + IDLE - Duration::from_secs(1))
            .is_none());
        assert_eq!(cursors.len(), 1, "only the newest was used within IDLE");
        assert!(cursors
            .take(Seq(MAX_OPEN as u64), None, last + IDLE)
            .is_none());
        assert!(cursors.is_empty());
    }
}
