//! The disk under the WAL's append path, as a trait, so tests can crash it.
//!
//! `kill -9` leaves the page cache intact, so a process test cannot tell an ack sent
//! after `fsync` from one sent before. [`SimDisk`] can: it remembers, per segment, what
//! was durable at the last `sync_data` (how far the records went, and how long the
//! zero-filled file was), and [`SimDisk::crash`] puts every segment back to that state,
//! optionally keeping a torn part of the unsynced records (as a power cut in the middle
//! of writing a page does); [`SimDisk::crash_losing_sectors`] loses chosen sectors of
//! them in any order (nothing orders a write over preallocated zeros), and
//! [`SimDisk::fail_next_sync`] leaves a batch written but not durable. Recovery then runs
//! on the real files, with the normal code path.
//!
//! - [`RealDisk`] is what the node uses: `OpenOptions` + `pwrite` + `fdatasync`.
//! - The trait covers what `WalFile` does: create a segment (durably), open one for
//!   writing, write records at an offset, extend the file with written zeros
//!   (preallocation), `sync_data`. Truncation at recovery, snapshots and the epoch file
//!   use `sync_all` right away and stay on `std::fs`; the simulation only models the
//!   group-commit append path, which is where an ack-before-fsync bug would live.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// An open WAL segment.
pub trait DiskFile: Send + Debug {
    /// Writes `bytes` at `offset` (may be lost by a crash until [`DiskFile::sync_data`]
    /// returns).
    fn write_at(&mut self, bytes: &[u8], offset: u64) -> io::Result<()>;
    /// Grows the file from `from` (its current length) to `to` bytes by writing zeros:
    /// real blocks, not a hole, so later writes over them change no file metadata.
    /// Lost by a crash until [`DiskFile::sync_data`] returns.
    fn extend_zeroed(&mut self, from: u64, to: u64) -> io::Result<()>;
    /// Makes everything written so far durable, the file length included.
    fn sync_data(&mut self) -> io::Result<()>;
}

/// Opens WAL segments.
pub trait Disk: Send + Sync + Debug {
    /// Creates `path` (which must not exist) and makes the empty file and its name
    /// durable (fsync of the file and of `dir`).
    fn create_new(&self, dir: &Path, path: &Path) -> io::Result<Box<dyn DiskFile>>;
    /// Opens an existing segment for writing. Recovery read it back, so its content is
    /// durable; its records end at `data_end` and only zeros follow.
    fn open_existing(&self, path: &Path, data_end: u64) -> io::Result<Box<dyn DiskFile>>;
}

/// The real disk.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealDisk;

/// Zeros for [`DiskFile::extend_zeroed`], written a slice at a time.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

impl DiskFile for File {
    fn write_at(&mut self, bytes: &[u8], offset: u64) -> io::Result<()> {
        self.write_all_at(bytes, offset)
    }
    fn extend_zeroed(&mut self, from: u64, to: u64) -> io::Result<()> {
        write_zeros(self, from, to)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        File::sync_data(self)
    }
}

/// Writes zeros over `from..to` of `file`, a slice of [`ZEROS`] at a time.
fn write_zeros(file: &File, from: u64, to: u64) -> io::Result<()> {
    let mut at = from;
    while at < to {
        let n = (to - at).min(ZEROS.len() as u64);
        file.write_all_at(&ZEROS[..n as usize], at)?;
        at += n;
    }
    Ok(())
}

/// Opened for positioned writes. Never `O_APPEND`: Linux would then ignore the offset of
/// every `pwrite` and append.
fn open_for_writes(path: &Path) -> io::Result<File> {
    OpenOptions::new().write(true).open(path)
}

impl Disk for RealDisk {
    fn create_new(&self, dir: &Path, path: &Path) -> io::Result<Box<dyn DiskFile>> {
        let file = OpenOptions::new().create_new(true).write(true).open(path)?;
        file.sync_all()?;
        super::file::sync_dir(dir)?;
        Ok(Box::new(file))
    }
    fn open_existing(&self, path: &Path, _data_end: u64) -> io::Result<Box<dyn DiskFile>> {
        Ok(Box::new(open_for_writes(path)?))
    }
}

/// What survives a crash of one segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Extent {
    /// End of the records (the first byte no record was written to).
    data_end: u64,
    /// File length; from `data_end` to here the file holds zeros.
    len: u64,
}

/// The simulated disk's shared state.
#[derive(Debug, Default)]
struct SimState {
    /// What is durable of every segment opened through this disk.
    extents: BTreeMap<PathBuf, Extent>,
    /// The next `sync_data` fails (and makes nothing durable).
    fail_next_sync: bool,
}

type Durable = Arc<Mutex<SimState>>;

/// A disk that forgets unsynced writes on [`SimDisk::crash`]. Cheap to clone (shared).
#[derive(Debug, Default, Clone)]
pub struct SimDisk {
    /// What is durable of every segment opened through this disk.
    durable: Durable,
}

#[derive(Debug)]
struct SimFile {
    file: File,
    path: PathBuf,
    /// The segment as written so far (the "page cache").
    written: Extent,
    durable: Durable,
}

impl DiskFile for SimFile {
    fn write_at(&mut self, bytes: &[u8], offset: u64) -> io::Result<()> {
        // `write_all_at`: `FileExt::write_at` is one `pwrite` and may write less.
        self.file.write_all_at(bytes, offset)?;
        let end = offset + bytes.len() as u64;
        self.written.data_end = self.written.data_end.max(end);
        self.written.len = self.written.len.max(end);
        Ok(())
    }
    fn extend_zeroed(&mut self, from: u64, to: u64) -> io::Result<()> {
        self.file.extend_zeroed(from, to)?;
        self.written.len = self.written.len.max(to);
        Ok(())
    }
    fn sync_data(&mut self) -> io::Result<()> {
        // The bytes are in the real file already; syncing makes them survive the next
        // simulated crash.
        let mut state = self
            .durable
            .lock()
            .expect("sim disk lock is never poisoned");
        if std::mem::take(&mut state.fail_next_sync) {
            return Err(io::Error::other("simulated fdatasync failure"));
        }
        state.extents.insert(self.path.clone(), self.written);
        Ok(())
    }
}

impl SimDisk {
    /// A fresh simulated disk.
    pub fn new() -> SimDisk {
        SimDisk::default()
    }

    fn open(&self, path: &Path, file: File, durable: Extent) -> Box<dyn DiskFile> {
        self.durable
            .lock()
            .expect("sim disk lock is never poisoned")
            .extents
            .insert(path.to_path_buf(), durable);
        Box::new(SimFile {
            file,
            path: path.to_path_buf(),
            written: durable,
            durable: self.durable.clone(),
        })
    }

    /// Makes the next `sync_data` of any file on this disk fail, durably storing nothing:
    /// the writer then fails with a batch written but not synced, which a crash can tear.
    pub fn fail_next_sync(&self) {
        self.durable
            .lock()
            .expect("sim disk lock is never poisoned")
            .fail_next_sync = true;
    }

    /// A power cut: every segment goes back to what was durable, plus the first
    /// `torn_bytes` of the unsynced records (a partly written page). Unsynced records
    /// that fell on preallocated space become zeros again; an unsynced extension of the
    /// file is lost. Open handles must be dropped first (the process is gone).
    pub fn crash(&self, torn_bytes: u64) -> io::Result<()> {
        self.crash_keeping(|d, end| vec![((d.data_end + torn_bytes).min(end), end)])
    }

    /// A power cut that tears the unsynced bytes at sector granularity, in no order: each
    /// [`super::codec::SECTOR_BYTES`] sector after what was durable survives unless
    /// `lost(sector index)`, and a lost one reads as the zeros that were there before.
    pub fn crash_losing_sectors(&self, lost: impl Fn(u64) -> bool) -> io::Result<()> {
        let sector = super::codec::SECTOR_BYTES;
        self.crash_keeping(|d, end| {
            (d.data_end / sector..end.div_ceil(sector))
                .filter(|&k| lost(k))
                .map(|k| ((k * sector).max(d.data_end), ((k + 1) * sector).min(end)))
                .collect()
        })
    }

    /// Puts every segment back to what was durable. `lost(durable, file length)` names
    /// the ranges (ascending, after `durable.data_end`) of unsynced bytes that read as
    /// zeros again; the other unsynced bytes survive. The file keeps its durable length,
    /// or reaches the last surviving byte: an unsynced extension past it is lost. Open
    /// handles must be dropped first (the process is gone).
    fn crash_keeping(&self, lost: impl Fn(&Extent, u64) -> Vec<(u64, u64)>) -> io::Result<()> {
        let state = self
            .durable
            .lock()
            .expect("sim disk lock is never poisoned");
        for (path, d) in state.extents.iter() {
            let Ok(meta) = std::fs::metadata(path) else {
                continue; // removed (compacted) since
            };
            let end = meta.len();
            let ranges = lost(d, end);
            // The end of the last unsynced byte that survives (none: the durable end).
            let mut survivor_end = d.data_end;
            let mut at = d.data_end;
            for &(from, to) in &ranges {
                if from > at {
                    survivor_end = from;
                }
                at = at.max(to);
            }
            if end > at {
                survivor_end = end;
            }
            let len = d.len.max(survivor_end);
            let f = open_for_writes(path)?;
            f.set_len(len)?;
            for (from, to) in ranges {
                write_zeros(&f, from.min(len), to.min(len))?;
            }
        }
        Ok(())
    }
}

impl Disk for SimDisk {
    fn create_new(&self, dir: &Path, path: &Path) -> io::Result<Box<dyn DiskFile>> {
        drop(RealDisk.create_new(dir, path)?);
        Ok(self.open(path, open_for_writes(path)?, Extent::default()))
    }
    fn open_existing(&self, path: &Path, data_end: u64) -> io::Result<Box<dyn DiskFile>> {
        let f = open_for_writes(path)?;
        let len = f.metadata()?.len();
        Ok(self.open(path, f, Extent { data_end, len }))
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
        f.write_at(b"durable\n", 0).unwrap();
        f.sync_data().unwrap();
        f.write_at(b"lost\n", 8).unwrap();
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

    #[test]
    fn crash_restores_preallocated_zeros_and_drops_an_unsynced_extension() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg");
        let disk = SimDisk::new();
        let mut f = disk.create_new(dir.path(), &path).unwrap();
        f.write_at(b"a\n", 0).unwrap();
        f.extend_zeroed(2, 16).unwrap();
        f.sync_data().unwrap();
        f.write_at(b"bbbb\n", 2).unwrap();
        f.extend_zeroed(16, 32).unwrap();
        drop(f);
        disk.crash(3).unwrap();
        let mut want = b"a\nbbb".to_vec();
        want.resize(16, 0);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            want,
            "torn part, then the durable zeros"
        );

        // Reopened as recovery does: what is on disk now is durable.
        let mut f = disk.open_existing(&path, 2).unwrap();
        f.write_at(b"c\n", 2).unwrap();
        drop(f);
        disk.crash(0).unwrap();
        let mut want = b"a\n".to_vec();
        want.resize(16, 0);
        assert_eq!(std::fs::read(&path).unwrap(), want);
    }

    #[test]
    fn a_failed_sync_makes_nothing_durable_and_sectors_are_lost_in_any_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg");
        let disk = SimDisk::new();
        let mut f = disk.create_new(dir.path(), &path).unwrap();
        f.write_at(b"d\n", 0).unwrap();
        f.extend_zeroed(2, 2048).unwrap();
        f.sync_data().unwrap();
        // Four sectors of unsynced data after the durable 2 bytes.
        let data = vec![b'x'; 4 * 512 - 2];
        f.write_at(&data, 2).unwrap();
        disk.fail_next_sync();
        assert!(f.sync_data().is_err(), "the failure is reported");
        drop(f);
        // Sectors 0 and 2 lost: the durable prefix, then the unsynced sectors 1 and 3.
        disk.crash_losing_sectors(|k| k == 0 || k == 2).unwrap();
        let mut want = b"d\n".to_vec();
        want.resize(512, 0);
        want.resize(1024, b'x');
        want.resize(1536, 0);
        want.resize(2048, b'x');
        assert_eq!(std::fs::read(&path).unwrap(), want);
    }
}
