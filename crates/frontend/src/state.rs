//! The frontend's durable state: `state.json` in the data dir, and the data dir lock.
//!
//! Format (one JSON object, pretty-printed for operators):
//!
//! ```text
//! {"epoch": 4, "isr": ["s1","s2"], "epoch_table": [{"epoch":1,"start_seq":1}, ...], "removed": []}
//! ```
//!
//! Invariants:
//! - The file is replaced atomically: write `state.json.tmp`, fsync it, rename it over
//!   `state.json`, fsync the directory. A crash leaves either the old or the new state.
//! - Whatever the caller depends on (an epoch bump, an ISR shrink) is persisted *before* the
//!   caller acts on it; [`StateFile::persist`] returns only after the directory fsync.
//! - `epoch_table` is in epoch order; each entry's `start_seq` is the first seq written in
//!   that epoch (an epoch that wrote nothing still has an entry).
//! - Exactly one frontend uses a data dir: [`StateFile::open`] takes an exclusive lock on
//!   `LOCK` (released by the OS when the process dies, so `kill -9` never leaves it stuck).

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use walkv_shared::{Epoch, NodeId, Seq};

/// Name of the state file inside the data dir.
pub const STATE_FILE: &str = "state.json";
/// Name of the lock file inside the data dir.
pub const LOCK_FILE: &str = "LOCK";

/// One epoch table entry: `epoch` began writing at `start_seq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EpochStart {
    /// The epoch.
    pub epoch: Epoch,
    /// First seq assigned in that epoch.
    pub start_seq: Seq,
}

/// Everything the frontend persists.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// Current epoch; bumped at every start and every re-recovery.
    pub epoch: Epoch,
    /// The in-sync set: nodes that hold every committed record.
    pub isr: BTreeSet<NodeId>,
    /// First seq of every epoch that served.
    pub epoch_table: Vec<EpochStart>,
    /// Node ids retired with `remove_node`; they may never register again.
    pub removed: BTreeSet<NodeId>,
}

/// The open state file, holding the data dir lock for as long as it lives.
#[derive(Debug)]
pub struct StateFile {
    dir: PathBuf,
    /// Held only for its lock; dropping it releases the data dir.
    _lock: File,
}

impl StateFile {
    /// Creates the data dir if needed, locks it, and reads the state (default when absent).
    /// Refuses a locked dir ("another frontend is running") and an unreadable state file.
    pub fn open(dir: &Path) -> Result<(StateFile, State), String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("data_dir {}: cannot create: {e}", dir.display()))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| format!("{}: cannot open lock file: {e}", lock_path.display()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(format!(
                "data_dir {} is locked by another process ({}): is another frontend running on it?",
                dir.display(),
                lock_path.display()
            ))
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(format!("{}: cannot lock: {e}", lock_path.display()))
            }
        }
        let path = dir.join(STATE_FILE);
        let state = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                format!(
                    "{}: corrupt state file ({e}); refusing to guess the in-sync set",
                    path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(format!("{}: cannot read: {e}", path.display())),
        };
        Ok((
            StateFile {
                dir: dir.to_path_buf(),
                _lock: lock,
            },
            state,
        ))
    }

    /// Atomically replaces the state file (temp, fsync, rename, fsync dir). Blocking.
    pub fn persist(&self, state: &State) -> std::io::Result<()> {
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        let mut bytes = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
        bytes.push(b'\n');
        let mut f = File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, self.dir.join(STATE_FILE))?;
        File::open(&self.dir)?.sync_all()
    }

    /// The data dir.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> State {
        State {
            epoch: Epoch(4),
            isr: [NodeId("s1".into()), NodeId("s2".into())].into(),
            epoch_table: vec![
                EpochStart {
                    epoch: Epoch(1),
                    start_seq: Seq(1),
                },
                EpochStart {
                    epoch: Epoch(3),
                    start_seq: Seq(10),
                },
            ],
            removed: [NodeId("old".into())].into(),
        }
    }

    #[test]
    fn fresh_dir_gives_default_state_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let (file, state) = StateFile::open(dir.path()).unwrap();
        assert_eq!(state, State::default());
        file.persist(&sample()).unwrap();
        assert!(
            !dir.path().join("state.json.tmp").exists(),
            "temp file renamed away"
        );
        drop(file);
        let (_file, state) = StateFile::open(dir.path()).unwrap();
        assert_eq!(state, sample());
    }

    #[test]
    fn second_open_is_refused_while_locked() {
        let dir = tempfile::tempdir().unwrap();
        let (_file, _) = StateFile::open(dir.path()).unwrap();
        let err = StateFile::open(dir.path()).unwrap_err();
        assert!(err.contains("locked"), "{err}");
    }

    #[test]
    fn leftover_temp_file_does_not_matter_and_corrupt_state_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (file, _) = StateFile::open(dir.path()).unwrap();
            file.persist(&sample()).unwrap();
        }
        // A crash between writing the temp file and renaming it leaves the old state.
        std::fs::write(dir.path().join("state.json.tmp"), b"{garbage").unwrap();
        {
            let (_file, state) = StateFile::open(dir.path()).unwrap();
            assert_eq!(state, sample());
        }
        std::fs::write(dir.path().join("state.json"), b"{garbage").unwrap();
        let err = StateFile::open(dir.path()).unwrap_err();
        assert!(
            err.contains("state.json") && err.contains("corrupt"),
            "{err}"
        );
    }
}
