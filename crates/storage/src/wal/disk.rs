//! The disk under the WAL's append path, as a trait, so tests can crash it.
//!
//! `kill -9` leaves the page cache intact, so a process test cannot tell an ack sent
//! after `fsync` from one sent before. [`SimDisk`] can: it remembers, per segment, how
//! many bytes were durable at the last `sync_data`, and [`SimDisk::crash`] cuts every
//! segment back to that length (optionally keeping a torn part of the unsynced tail, as a
//! power cut in the middle of writing a page does). Recovery then runs on the real files,
//! with the normal code path.
//!
//! - [`RealDisk`] is what the node uses: `OpenOptions` + `write_all` + `sync_data`,
//!   exactly the syscalls `WalFile` made before the trait existed.
//! - The trait covers what `WalFile` does: create a segment (durably), open one for
//!   appending, write, `sync_data`. Truncation at recovery, snapshots and the epoch file
//!   use `sync_all` right away and stay on `std::fs`; the simulation only models the
//!   group-commit append path, which is where an ack-before-fsync bug would live.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// An open WAL segment.
pub trait DiskFile: Send + Debug {
    /// Appends `bytes` (may be lost by a crash until [`DiskFile::sync_data`] returns).
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Makes everything written so far durable.
    fn sync_data(&mut self) -> io::Result<()>;
}

/// Opens WAL segments.
pub trait Disk: Send + Sync + Debug {
    /// Creates `path` (which must not exist) for appending and makes the empty file and
    /// its name durable (fsync of the file and of `dir`).
    fn create_new(&self, dir: &Path, path: &Path) -> io::Result<Box<dyn DiskFile>>;
    /// Opens an existing segment for appending.
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn DiskFile>>;
}

/// The real disk.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealDisk;

impl DiskFile for File {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        Write::write_all(self, bytes)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        File::sync_data(self)
    }
}

impl Disk for RealDisk {
    fn create_new(&self, dir: &Path, path: &Path) -> io::Result<Box<dyn DiskFile>> {
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(path)?;
        file.sync_all()?;
        super::file::sync_dir(dir)?;
        Ok(Box::new(file))
    }
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn DiskFile>> {
        Ok(Box::new(OpenOptions::new().append(true).open(path)?))
    }
}

/// A disk that forgets unsynced bytes on [`SimDisk::crash`]. Cheap to clone (shared).
#[derive(Debug, Default, Clone)]
pub struct SimDisk {
    /// Durable length of every segment opened through this disk.
    durable: Arc<Mutex<BTreeMap<PathBuf, u64>>>,
}

#[derive(Debug)]
struct SimFile {
    file: File,
    path: PathBuf,
    durable: Arc<Mutex<BTreeMap<PathBuf, u64>>>,
}

impl DiskFile for SimFile {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        Write::write_all(&mut self.file, bytes)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        // The bytes are in the real file already (the "page cache"); syncing makes them
        // survive the next simulated crash.
        let len = self.file.metadata()?.len();
        self.durable
            .lock()
            .expect("sim disk lock is never poisoned")
            .insert(self.path.clone(), len);
        Ok(())
    }
}

impl SimDisk {
    /// A fresh simulated disk.
    pub fn new() -> SimDisk {
        SimDisk::default()
    }

    fn open(&self, path: &Path, file: File, len: u64) -> Box<dyn DiskFile> {
        self.durable
            .lock()
            .expect("sim disk lock is never poisoned")
            .entry(path.to_path_buf())
            .or_insert(len);
        Box::new(SimFile {
            file,
            path: path.to_path_buf(),
            durable: self.durable.clone(),
        })
    }

    /// A power cut: every segment goes back to its durable length, plus the first
    /// `torn_bytes` of its unsynced tail (a partly written page). Open handles must be
    /// dropped first (the process is gone).
    pub fn crash(&self, torn_bytes: u64) -> io::Result<()> {
        let durable = self
            .durable
            .lock()
            .expect("sim disk lock is never poisoned");
        for (path, len) in durable.iter() {
            let Ok(meta) = std::fs::metadata(path) else {
                continue; // removed (compacted) since
            };
            let keep = (*len + torn_bytes).min(meta.len());
            OpenOptions::new().write(true).open(path)?.set_len(keep)?;
        }
        Ok(())
    }
}

impl Disk for SimDisk {
    fn create_new(&self, dir: &Path, path: &Path) -> io::Result<Box<dyn DiskFile>> {
        let file = RealDisk.create_new(dir, path)?;
        drop(file);
        let f = OpenOptions::new().append(true).open(path)?;
        Ok(self.open(path, f, 0))
    }
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn DiskFile>> {
        let f = OpenOptions::new().append(true).open(path)?;
        // What recovery found on disk at open time is durable (it was read back).
        let len = f.metadata()?.len();
        Ok(self.open(path, f, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_drops_exactly_the_unsynced_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg");
        let disk = SimDisk::new();
        let mut f = disk.create_new(dir.path(), &path).unwrap();
        f.write_all(b"durable\n").unwrap();
        f.sync_data().unwrap();
        f.write_all(b"lost\n").unwrap();
        drop(f);
        assert_eq!(std::fs::read(&path).unwrap(), b"durable\nlost\n");
        disk.crash(2).unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"durable\nlo",
            "torn tail kept"
        );
        disk.crash(0).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"durable\n");
    }
}
