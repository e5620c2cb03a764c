//! Blocking file IO for WAL segments and small atomic files. Only the writer thread, the
//! snapshot thread and startup call these.
//!
//! - Segments are named `wal-<first seq, 20 digits>.log` so a directory listing sorts them.
//! - Every file creation and rename is followed by an fsync of the directory, so the
//!   name survives a crash along with the data.
//! - [`WalFile`] goes through a [`Disk`] (`RealDisk` in the node; a simulated disk that
//!   loses unsynced bytes in crash tests).
//! - [`WalFile::append`] writes a whole group-commit batch with one `pwrite` (plus the
//!   zeros of the next preallocation when the batch does not fit) and one `sync_data`; a
//!   failure of any is returned and the caller stops the node.
//! - Segments are **preallocated**: the file is grown [`PREALLOCATE_BYTES`] at a time
//!   with written zeros, and records overwrite those zeros. An `fdatasync` after
//!   appending to a file must also write the inode and the block allocation (on this
//!   ext4, 3.07 block writes and a cache flush per call); one after overwriting written
//!   blocks writes only the data (2.06: the kernel adds one write per call even then;
//!   `storage wal sync-bench [--append]` measures both). Decoding ends the log at the
//!   last non-zero byte (`super::codec`).

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

/// How far ahead of its records a segment is zero-filled. Each extension rides on the
/// `sync_data` of the batch that needed it, once every ~1,700 records of 150 bytes. On
/// the development VM that `sync_data` takes ~0.8 ms instead of ~0.1 ms; 1 MiB cost the
/// same per record but ~2.8 ms at once, 64 KiB twice as much per record.
pub const PREALLOCATE_BYTES: u64 = 256 << 10;

/// The open, last segment of the WAL, to which the writer appends.
#[derive(Debug)]
pub struct WalFile {
    file: Box<dyn DiskFile>,
    disk: Arc<dyn Disk>,
    path: PathBuf,
    first: Seq,
    fsync: bool,
    /// End of the records: where the next batch goes.
    data_end: u64,
    /// File length; the bytes from `data_end` to here are zeros.
    len: u64,
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
            data_end: 0,
            len: 0,
        })
    }

    /// The next segment, from `first` on, on the same disk as this one.
    pub fn create_next(&self, dir: &Path, first: Seq) -> io::Result<WalFile> {
        Self::create_on(self.disk.clone(), dir, first, self.fsync)
    }

    /// Opens an existing segment for appending. Recovery scanned it (and cut a torn
    /// tail): its records end at `data_end` and only zeros follow, up to `len` bytes.
    pub fn open_append(
        disk: Arc<dyn Disk>,
        path: &Path,
        first: Seq,
        data_end: u64,
        len: u64,
        fsync: bool,
    ) -> io::Result<WalFile> {
        let file = disk.open_existing(path, data_end)?;
        Ok(WalFile {
            file,
            disk,
            path: path.to_path_buf(),
            first,
            fsync,
            data_end,
            len,
        })
    }

    /// Writes a batch after the last one and, unless fsync is disabled by config, waits
    /// for it to be durable. A batch that does not fit in the preallocated zeros first
    /// grows the file by [`PREALLOCATE_BYTES`] past its end, under the same `sync_data`.
    pub fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        let end = self.data_end + bytes.len() as u64;
        self.file.write_at(bytes, self.data_end)?;
        if end > self.len {
            let to = end + PREALLOCATE_BYTES;
            self.file.extend_zeroed(end, to)?;
            self.len = to;
        }
        if self.fsync {
            self.file.sync_data()?;
        }
        self.data_end = end;
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
    fn appends_overwrite_preallocated_zeros_and_decode_back() {
        use crate::store::tests::put;
        let dir = tempfile::tempdir().unwrap();
        let mut wal = WalFile::create(dir.path(), Seq(1), true).unwrap();
        let mut expected = Vec::new();
        let mut first_batch = 0;
        for seq in 1..=3 {
            let mut buf = Vec::new();
            super::super::codec::encode_batch(&[put(seq, "k", "v")], &mut buf);
            wal.append(&buf).unwrap();
            expected.extend_from_slice(&buf);
            if seq == 1 {
                first_batch = buf.len() as u64;
            }
        }
        let bytes = std::fs::read(wal.path()).unwrap();
        assert_eq!(
            bytes.len() as u64,
            first_batch + PREALLOCATE_BYTES,
            "one extension, by the first batch"
        );
        assert_eq!(&bytes[..expected.len()], expected);
        assert!(bytes[expected.len()..].iter().all(|&b| b == 0));
        let d = super::super::codec::decode(&bytes, Seq(1));
        assert_eq!(
            (d.records.len(), d.valid_len, d.error),
            (3, expected.len() as u64, None)
        );
    }

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
