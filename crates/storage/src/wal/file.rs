//! Blocking file IO for WAL segments and small atomic files. Only the writer thread, the
//! snapshot thread and startup call these.
//!
//! - Segments are named `wal-<first seq, 20 digits>.log` so a directory listing sorts them.
//! - Every file creation and rename is followed by an fsync of the directory, so the
//!   name survives a crash along with the data.
//! - [`WalFile`] goes through a [`Disk`] (`RealDisk` in the node; a simulated disk that
//!   loses unsynced bytes in crash tests).
//! - [`WalFile::append`] writes a whole group-commit batch with one `write_all` and one
//!   `sync_data`; a failure of either is returned and the caller stops the node.

use super::disk::{Disk, DiskFile, RealDisk};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use walkv_shared::Seq;

/// The file name of the segment whose first record is `first`.
pub fn segment_name(first: Seq) -> String {
    format!("wal-{:020}.log", first.0)
}

/// The first seq encoded in a segment file name, if `name` is one.
pub fn parse_segment_name(name: &str) -> Option<Seq> {
    let digits = name.strip_prefix("wal-")?.strip_suffix(".log")?;
    (digits.len() == 20)
        .then(|| digits.parse().ok().map(Seq))
        .flatten()
}

/// Every segment in `dir`, sorted by first seq.
pub fn list_segments(dir: &Path) -> io::Result<Vec<(Seq, PathBuf)>> {
    list_named(dir, parse_segment_name)
}

/// Every file in `dir` whose name `parse` accepts, sorted by the parsed seq.
pub fn list_named(dir: &Path, parse: fn(&str) -> Option<Seq>) -> io::Result<Vec<(Seq, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(seq) = entry.file_name().to_str().and_then(parse) {
            out.push((seq, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// fsyncs a directory so that creations, renames and removals in it are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Cuts `path` to `len` bytes and makes the new length durable.
pub fn truncate_file(path: &Path, len: u64) -> io::Result<()> {
    let f = OpenOptions::new().write(true).open(path)?;
    f.set_len(len)?;
    f.sync_all()
}

/// Bytes buffered between a streamed file's writer and the kernel (`write_atomic_with`).
const WRITE_BUFFER_BYTES: usize = 1 << 20;

/// Replaces `dir/name` atomically: write a temp file, fsync, rename, fsync the directory.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    write_atomic_with(dir, name, |out| out.write_all(bytes))
}

/// [`write_atomic`] whose content `fill` streams into a buffered temp file, so a large
/// file (a snapshot) never has to sit in memory whole.
pub fn write_atomic_with(
    dir: &Path,
    name: &str,
    fill: impl FnOnce(&mut io::BufWriter<File>) -> io::Result<()>,
) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut out = io::BufWriter::with_capacity(WRITE_BUFFER_BYTES, File::create(&tmp)?);
    fill(&mut out)?;
    let f = out.into_inner().map_err(|e| e.into_error())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

/// Removes files newest first (so a crash midway leaves a prefix), then fsyncs `dir`.
pub fn remove_newest_first(dir: &Path, files: &[(Seq, PathBuf)]) -> io::Result<()> {
    for (_, path) in files.iter().rev() {
        std::fs::remove_file(path)?;
    }
    sync_dir(dir)
}

/// The open, last segment of the WAL, to which the writer appends.
#[derive(Debug)]
pub struct WalFile {
    file: Box<dyn DiskFile>,
    disk: Arc<dyn Disk>,
    path: PathBuf,
    first: Seq,
    fsync: bool,
}

impl WalFile {
    /// Creates an empty segment for records from `first` on and makes its name durable.
    pub fn create(dir: &Path, first: Seq, fsync: bool) -> io::Result<WalFile> {
        Self::create_on(Arc::new(RealDisk), dir, first, fsync)
    }

    /// [`WalFile::create`] on a given disk (tests pass a [`super::disk::SimDisk`]).
    pub fn create_on(
        disk: Arc<dyn Disk>,
        dir: &Path,
        first: Seq,
        fsync: bool,
    ) -> io::Result<WalFile> {
        let path = dir.join(segment_name(first));
        let file = disk.create_new(dir, &path)?;
        Ok(WalFile {
            file,
            disk,
            path,
            first,
            fsync,
        })
    }

    /// The next segment, from `first` on, on the same disk as this one.
    pub fn create_next(&self, dir: &Path, first: Seq) -> io::Result<WalFile> {
        Self::create_on(self.disk.clone(), dir, first, self.fsync)
    }

    /// Opens an existing segment (already scanned and, if torn, truncated) for appending.
    pub fn open_append(
        disk: Arc<dyn Disk>,
        path: &Path,
        first: Seq,
        fsync: bool,
    ) -> io::Result<WalFile> {
        let file = disk.open_append(path)?;
        Ok(WalFile {
            file,
            disk,
            path: path.to_path_buf(),
            first,
            fsync,
        })
    }

    /// Writes a batch and, unless fsync is disabled by config, waits for it to be durable.
    pub fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all(bytes)?;
        if self.fsync {
            self.file.sync_data()?;
        }
        Ok(())
    }

    /// The disk this segment lives on.
    pub fn disk(&self) -> Arc<dyn Disk> {
        self.disk.clone()
    }

    /// The segment's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Seq of the segment's first record.
    pub fn first(&self) -> Seq {
        self.first
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_and_parse() {
        assert_eq!(segment_name(Seq(42)), "wal-00000000000000000042.log");
        assert_eq!(parse_segment_name(&segment_name(Seq(42))), Some(Seq(42)));
        assert_eq!(
            parse_segment_name("wal-00000000000000000042.log.corrupt-1"),
            None
        );
        assert_eq!(parse_segment_name("wal-1.log"), None);
    }
}
