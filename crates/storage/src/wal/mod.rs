//! The write-ahead log (WAL): on-disk format, recovery rules and the writer.
//!
//! # On-disk format
//!
//! The data directory holds:
//!
//! - `wal-<first seq, 20 digits>.log`: segments. Each line is one record encoded by
//!   `walkv_shared::record::encode`: a JSON object whose first member `crc` is the CRC32C
//!   of the rest of the line, then `seq`, `epoch`, `client`, `op_no` and the operation.
//!   Records are consecutive: each seq is exactly one more than the previous one, across
//!   segments too. A segment may end in zero bytes, space the writer preallocated
//!   (see [`file`](mod@file)); the records end at its last non-zero byte.
//! - `snapshot-<seq, 20 digits>.json`: the state after record `seq` (see [`crate::snapshot`]).
//! - `epoch`: the highest frontend epoch the node has seen (written atomically).
//! - `log-cut` ([`LOG_CUT_FILE`]): present while the log was cut at a corrupt record
//!   (`discard_corrupt_tail`) and no frontend has taken the node in sync since; it holds
//!   the seq of the first record cut. Such a log may lack writes the node acknowledged, so
//!   the node registers with highest epoch 0 and the frontend never takes it as the truth
//!   of a recovery (see `registration`). The next fence (a frontend making the node a
//!   member, or confirming it in a recovery) removes it.
//! - `LOCK`: locked by the running process; a second process refuses to start.
//!
//! # Recovery (at start, and after `truncate` / `install_snapshot`)
//!
//! 1. Load the newest snapshot whose checksum verifies (an unreadable one is logged and
//!    the next older one tried).
//! 2. Scan segments in order with [`codec::decode`], skipping records the snapshot covers,
//!    and apply the rest with `Store::apply`, the same function live appends use.
//! 3. A record after the snapshot must be exactly the next seq; a segment that starts
//!    beyond the next expected seq is a **gap** and is refused.
//! 4. A torn tail of the last segment (a cut-off last line, or the last batch with some
//!    sectors never written, see [`codec`]) is a crash mid-write: the file is truncated
//!    to the valid prefix (`set_len` + fsync) and a warning names file, offset and seq.
//!    A tail of more than one line is first copied to `<segment>.torn-<unix time>`.
//! 5. Anything else (a bad line followed by data, a seq break, a torn line in an older
//!    segment) is **corruption**: the node refuses to start, naming file, offset and the
//!    seq expected there. With `discard_corrupt_tail` it instead keeps a
//!    `<segment>.corrupt-<unix time>` copy, cuts the log at the bad record (later
//!    segments are renamed the same way) and relies on catch-up for the rest.
//!
//! # Writing
//!
//! [`writer`] owns the open segment on a dedicated thread and group-commits: one write
//! and one `sync_data` per batch, nobody acked before it returns, and any IO error stops
//! the node (fail-stop; an fsync error is never retried because the kernel may have
//! dropped the dirty pages).

pub mod codec;
pub mod disk;
pub mod file;
pub mod writer;

use crate::snapshot;
use crate::store::{SnapshotData, Store};
use codec::{DecodeError, Decoded};
use disk::{Disk, RealDisk};
use file::WalFile;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tracing::{error, info, warn};
use walkv_shared::Seq;

/// Why a data directory cannot be used as it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecoveryError {
    /// A file could not be read, written or listed.
    Io(String),
    /// The data is corrupt or has a gap; the message names file, offset and seq.
    Corrupt(String),
}

impl std::fmt::Display for RecoveryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecoveryError::Io(m) => write!(f, "disk error during recovery: {m}"),
            RecoveryError::Corrupt(m) => write!(f, "corrupt data directory: {m}"),
        }
    }
}

impl std::error::Error for RecoveryError {}

fn io_err<'a>(what: &str, path: &'a Path) -> impl Fn(std::io::Error) -> RecoveryError + 'a {
    let what = what.to_string();
    move |e| RecoveryError::Io(format!("{what} {}: {e}", path.display()))
}

/// One segment as read from disk.
#[derive(Debug)]
pub struct SegmentScan {
    /// Path of the segment.
    pub path: PathBuf,
    /// First seq, from the file name.
    pub first: Seq,
    /// Its decoded records and where scanning stopped.
    pub decoded: Decoded,
    /// Length of the file in bytes.
    pub file_len: u64,
    /// Length without the zeros at its end (preallocated space).
    pub data_len: u64,
}

/// Everything in a data directory, read but not modified.
#[derive(Debug, Default)]
pub struct Inspection {
    /// The newest snapshot that verifies, with its path.
    pub snapshot: Option<(PathBuf, SnapshotData)>,
    /// Snapshots that failed verification (newer than the one used).
    pub bad_snapshots: Vec<String>,
    /// Every segment, in order.
    pub segments: Vec<SegmentScan>,
}

/// Reads the snapshot and every segment of `dir` without changing anything.
pub fn inspect(dir: &Path) -> Result<Inspection, RecoveryError> {
    let mut out = Inspection::default();
    for (_, path) in snapshot::list(dir)
        .map_err(io_err("cannot list", dir))?
        .into_iter()
        .rev()
    {
        match snapshot::read(&path) {
            Ok(data) => {
                out.snapshot = Some((path, data));
                break;
            }
            Err(e) => out.bad_snapshots.push(e),
        }
    }
    for (first, path) in file::list_segments(dir).map_err(io_err("cannot list", dir))? {
        let bytes = std::fs::read(&path).map_err(io_err("cannot read", &path))?;
        let decoded = codec::decode(&bytes, first);
        out.segments.push(SegmentScan {
            path,
            first,
            decoded,
            file_len: bytes.len() as u64,
            data_len: codec::data_end(&bytes) as u64,
        });
    }
    Ok(out)
}

/// Where replay stopped early.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Index of the segment in [`Inspection::segments`].
    pub segment: usize,
    /// The segment's path.
    pub path: PathBuf,
    /// Byte offset of the first bad byte.
    pub offset: u64,
    /// The seq that should have been there.
    pub expected_seq: Seq,
    /// A torn last line (crash artifact) rather than corruption.
    pub torn: bool,
    /// What was wrong.
    pub reason: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} at offset {} (expected seq {}): {}",
            self.path.display(),
            self.offset,
            self.expected_seq,
            self.reason
        )
    }
}

/// Rebuilds the state from an inspection: snapshot, then every record after it.
/// Returns the store (the valid prefix) and the first problem met, if any.
/// A gap between the snapshot and the WAL, or between segments, is an error.
pub fn replay(ins: &Inspection) -> Result<(Store, Option<Problem>), RecoveryError> {
    let base = ins.snapshot.as_ref().map(|(_, data)| data.clone());
    replay_from(base, ins)
}

/// [`replay`] starting from `base`, the state of `ins.snapshot`. Recovery moves that state
/// out of the inspection instead of sharing it: while a second reference to the maps
/// lives, every replayed write copies the nodes it touches.
fn replay_from(
    base: Option<SnapshotData>,
    ins: &Inspection,
) -> Result<(Store, Option<Problem>), RecoveryError> {
    let mut store = base.map_or_else(Store::new, Store::from_snapshot);
    let last = ins.segments.len().saturating_sub(1);
    for (i, seg) in ins.segments.iter().enumerate() {
        let expected = store.pos().seq.next();
        if seg.first > expected {
            let base = match &ins.snapshot {
                Some((p, _)) => format!(
                    "snapshot {} covers up to seq {}",
                    p.display(),
                    store.snapshot_pos().seq
                ),
                None => "there is no snapshot".to_string(),
            };
            let bad = if ins.bad_snapshots.is_empty() {
                String::new()
            } else {
                format!("; unreadable snapshots: {}", ins.bad_snapshots.join("; "))
            };
            return Err(RecoveryError::Corrupt(format!(
                "gap in the log: {} starts at seq {} but {base}, so seq {expected} is missing{bad}",
                seg.path.display(),
                seg.first
            )));
        }
        for r in &seg.decoded.records {
            if r.seq > store.pos().seq {
                if r.seq != store.pos().seq.next() {
                    return Err(RecoveryError::Corrupt(format!(
                        "{}: seq {} follows seq {} (overlapping segments)",
                        seg.path.display(),
                        r.seq,
                        store.pos().seq
                    )));
                }
                store.apply(r);
            }
        }
        if let Some(e) = &seg.decoded.error {
            let first_bad = Seq(seg.first.0 + seg.decoded.records.len() as u64);
            let (torn, reason, expected_seq) = match e {
                DecodeError::TornTail { reason, .. } => (i == last, reason.clone(), first_bad),
                DecodeError::Corrupt {
                    reason,
                    expected_seq,
                    ..
                } => (false, reason.clone(), *expected_seq),
            };
            let problem = Problem {
                segment: i,
                path: seg.path.clone(),
                offset: e.offset(),
                expected_seq,
                torn,
                reason,
            };
            return Ok((store, Some(problem)));
        }
    }
    Ok((store, None))
}

/// The result of opening a data directory for writing.
#[derive(Debug)]
pub struct Recovered {
    /// The state after the last valid record.
    pub store: Store,
    /// The segment to append to.
    pub wal: WalFile,
    /// Records replayed from the WAL on top of the snapshot.
    pub replayed: u64,
}

/// Opens `dir` for writing: recovery as described in the module docs.
pub fn recover(
    dir: &Path,
    fsync: bool,
    discard_corrupt_tail: bool,
) -> Result<Recovered, RecoveryError> {
    recover_on(Arc::new(RealDisk), dir, fsync, discard_corrupt_tail)
}

/// [`recover`] with the WAL's appends going to `disk` (crash tests use a simulated one).
pub fn recover_on(
    disk: Arc<dyn Disk>,
    dir: &Path,
    fsync: bool,
    discard_corrupt_tail: bool,
) -> Result<Recovered, RecoveryError> {
    remove_temp_files(dir)?;
    // Bounded: each round either succeeds or cuts the log shorter; a second problem after
    // a cut would mean the cut did not take effect.
    for _ in 0..MAX_REPAIR_ROUNDS {
        let mut ins = inspect(dir)?;
        let base = ins.snapshot.as_mut().map(|(_, data)| std::mem::take(data));
        let (store, problem) = replay_from(base, &ins)?;
        let Some(p) = problem else {
            return finish(disk, dir, &ins, store, fsync);
        };
        if p.torn {
            let seg = &ins.segments[p.segment];
            // A tail of several lines (a batch torn across sectors) has the shape of a
            // crash, but could also be a disk that lost a sector of older records: keep a
            // copy of what is cut, as `--discard-corrupt-tail` does.
            let copy = if cut_spans_lines(&p.path, p.offset, seg.data_len)? {
                let copy = stamped(&p.path, "torn", unix_now());
                std::fs::copy(&p.path, &copy).map_err(io_err("cannot copy", &p.path))?;
                Some(copy.display().to_string())
            } else {
                None
            };
            warn!(file = %p.path.display(), offset = p.offset, seq = %p.expected_seq, bytes = seg.data_len.saturating_sub(p.offset), reason = %p.reason, copy = copy.as_deref().unwrap_or("none"), "torn WAL tail truncated (crash mid-write)");
            file::truncate_file(&p.path, p.offset).map_err(io_err("cannot truncate", &p.path))?;
            continue;
        }
        if !discard_corrupt_tail {
            return Err(RecoveryError::Corrupt(format!("corrupt WAL record: {p}; refusing to start (the file is kept for inspection; --discard-corrupt-tail cuts the log there and relies on catch-up)")));
        }
        discard_from(dir, &ins, &p)?;
    }
    Err(RecoveryError::Corrupt(format!(
        "{}: the WAL could not be repaired",
        dir.display()
    )))
}

/// Name of the marker of a log cut at a corrupt record (see the module docs).
pub const LOG_CUT_FILE: &str = "log-cut";

/// Most repair passes `recover` makes (one torn-tail truncation plus one corruption cut).
const MAX_REPAIR_ROUNDS: usize = 4;

fn finish(
    disk: Arc<dyn Disk>,
    dir: &Path,
    ins: &Inspection,
    store: Store,
    fsync: bool,
) -> Result<Recovered, RecoveryError> {
    let next = store.pos().seq.next();
    let snap_seq = store.snapshot_pos().seq;
    let replayed = store.pos().seq.0 - snap_seq.0;
    // Append to the last segment only if it ends exactly where the store does; otherwise
    // (no segments, or a leftover segment wholly covered by the snapshot) start a new one.
    let wal = match ins.segments.last() {
        Some(seg) if seg.first.0 + seg.decoded.records.len() as u64 == next.0 => {
            let (data_end, len) = (seg.decoded.valid_len, seg.file_len);
            WalFile::open_append(disk, &seg.path, seg.first, data_end, len, fsync)
                .map_err(io_err("cannot open", &seg.path))?
        }
        _ => {
            if ins.segments.iter().any(|s| s.first == next) {
                return Err(RecoveryError::Corrupt(format!(
                    "{}: segment for seq {next} exists but does not continue the log",
                    dir.display()
                )));
            }
            WalFile::create_on(disk, dir, next, fsync)
                .map_err(io_err("cannot create segment in", dir))?
        }
    };
    Ok(Recovered {
        store,
        wal,
        replayed,
    })
}

/// Whether the bytes of `path` from `offset` to `data_end` hold more than one line.
fn cut_spans_lines(path: &Path, offset: u64, data_end: u64) -> Result<bool, RecoveryError> {
    let bytes = std::fs::read(path).map_err(io_err("cannot read", path))?;
    let cut = bytes
        .get(offset as usize..(data_end as usize).saturating_sub(1))
        .unwrap_or_default();
    Ok(cut.contains(&b'\n'))
}

/// Seconds since the Unix epoch: the stamp of kept copies.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `<path>.<kind>-<stamp>`: where a copy of a cut segment is kept.
fn stamped(path: &Path, kind: &str, stamp: u64) -> PathBuf {
    PathBuf::from(format!("{}.{kind}-{stamp}", path.display()))
}

fn discard_from(dir: &Path, ins: &Inspection, p: &Problem) -> Result<(), RecoveryError> {
    let stamp = unix_now();
    let keep = |path: &Path| stamped(path, "corrupt", stamp);
    // The marker first: a crash after the cut must not leave a short log that vouches.
    file::write_atomic(
        dir,
        LOG_CUT_FILE,
        format!("{}\n", p.expected_seq).as_bytes(),
    )
    .map_err(io_err("cannot write", &dir.join(LOG_CUT_FILE)))?;
    std::fs::copy(&p.path, keep(&p.path)).map_err(io_err("cannot copy", &p.path))?;
    for seg in &ins.segments[p.segment + 1..] {
        std::fs::rename(&seg.path, keep(&seg.path)).map_err(io_err("cannot rename", &seg.path))?;
    }
    file::truncate_file(&p.path, p.offset).map_err(io_err("cannot truncate", &p.path))?;
    file::sync_dir(dir).map_err(io_err("cannot sync", dir))?;
    error!(file = %p.path.display(), offset = p.offset, seq = %p.expected_seq, reason = %p.reason, copy = %keep(&p.path).display(), "corrupt WAL tail discarded (--discard-corrupt-tail); records from this seq on must come back by catch-up");
    Ok(())
}

fn remove_temp_files(dir: &Path) -> Result<(), RecoveryError> {
    for entry in std::fs::read_dir(dir).map_err(io_err("cannot list", dir))? {
        let entry = entry.map_err(io_err("cannot list", dir))?;
        if entry.file_name().to_string_lossy().ends_with(".tmp") {
            info!(file = %entry.path().display(), "removing leftover temp file from an interrupted write");
            std::fs::remove_file(entry.path()).map_err(io_err("cannot remove", &entry.path()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::put;
    use walkv_shared::record::encode_into;
    use walkv_shared::Record;

    fn records(from: u64, to: u64) -> Vec<Record> {
        (from..=to)
            .map(|i| put(i, &format!("k{}", i % 7), &format!("v{i}")))
            .collect()
    }

    /// The contents of the files in `dir` whose name contains `marker`.
    fn kept_copies(dir: &Path, marker: &str) -> Vec<Vec<u8>> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains(marker))
            .map(|p| std::fs::read(p).unwrap())
            .collect()
    }

    fn write_segment(dir: &Path, recs: &[Record]) -> PathBuf {
        let mut bytes = Vec::new();
        codec::encode_batch(recs, &mut bytes);
        let path = dir.join(file::segment_name(recs[0].seq));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn full_replay(recs: &[Record]) -> Store {
        let mut s = Store::new();
        recs.iter().for_each(|r| {
            s.apply(r);
        });
        s
    }

    #[test]
    fn snapshot_plus_wal_equals_full_replay() {
        let dir = tempfile::tempdir().unwrap();
        let all = records(1, 60);
        // The snapshot at 40 overlaps segment 31..50, as after a crash before cleanup.
        write_segment(dir.path(), &all[30..50]);
        write_segment(dir.path(), &all[50..60]);
        let snap = full_replay(&all[..40]).snapshot_data();
        snapshot::write(dir.path(), &snap).unwrap();
        let r = recover(dir.path(), true, false).unwrap();
        assert_eq!(r.store.digest(), full_replay(&all).digest());
        assert_eq!(r.replayed, 20);
    }

    #[test]
    fn gap_between_snapshot_and_wal_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let all = records(1, 60);
        snapshot::write(dir.path(), &full_replay(&all[..20]).snapshot_data()).unwrap();
        write_segment(dir.path(), &all[30..60]);
        let e = recover(dir.path(), true, false).unwrap_err();
        assert!(
            matches!(&e, RecoveryError::Corrupt(m) if m.contains("gap") && m.contains("seq 21")),
            "{e}"
        );
    }

    #[test]
    fn gap_without_snapshot_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write_segment(dir.path(), &records(5, 9));
        assert!(matches!(
            recover(dir.path(), true, false),
            Err(RecoveryError::Corrupt(_))
        ));
    }

    #[test]
    fn torn_tail_is_truncated_and_appendable() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_segment(dir.path(), &records(1, 5));
        let mut extra = Vec::new();
        encode_into(&put(6, "x", "y"), &mut extra);
        let mut bytes = std::fs::read(&path).unwrap();
        let good_len = bytes.len();
        bytes.extend_from_slice(&extra[..extra.len() / 2]);
        std::fs::write(&path, &bytes).unwrap();
        let mut r = recover(dir.path(), true, false).unwrap();
        assert_eq!(r.store.pos().seq, Seq(5));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good_len as u64);
        assert!(
            kept_copies(dir.path(), ".torn-").is_empty(),
            "half a last line needs no copy"
        );
        r.wal.append(&extra).unwrap();
        assert_eq!(
            recover(dir.path(), true, false).unwrap().store.pos().seq,
            Seq(6)
        );
    }

    /// A crash tore the last batch out of order: its first sector is still the
    /// preallocated zeros, later sectors were written. The node starts (nothing of that
    /// batch was acknowledged), truncates it away and appends after it.
    #[test]
    fn batch_torn_across_sectors_is_truncated_and_appendable() {
        let dir = tempfile::tempdir().unwrap();
        let synced = records(1, 5);
        let path = write_segment(dir.path(), &synced);
        let mut bytes = std::fs::read(&path).unwrap();
        let good_len = bytes.len();
        codec::encode_batch(&records(6, 40), &mut bytes);
        bytes.resize(bytes.len().next_multiple_of(4096) + 4096, 0);
        let sector = codec::SECTOR_BYTES as usize;
        bytes[good_len..good_len.next_multiple_of(sector)].fill(0);
        std::fs::write(&path, &bytes).unwrap();
        let mut r = recover(dir.path(), true, false).unwrap();
        assert_eq!(r.store.pos().seq, Seq(5));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good_len as u64);
        // Whole records followed the hole: what was cut is kept, in case it was not a
        // crash but a disk that lost a sector.
        assert_eq!(kept_copies(dir.path(), ".torn-"), vec![bytes]);
        let mut extra = Vec::new();
        encode_into(&put(6, "x", "y"), &mut extra);
        r.wal.append(&extra).unwrap();
        assert_eq!(
            recover(dir.path(), true, false).unwrap().store.pos().seq,
            Seq(6)
        );
    }

    #[test]
    fn corruption_refused_or_discarded_on_request() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_segment(dir.path(), &records(1, 10));
        let mut bytes = std::fs::read(&path).unwrap();
        let offset = codec::decode(&bytes, Seq(1)).ends[3] as usize;
        bytes[offset + 30] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        let e = recover(dir.path(), true, false).unwrap_err().to_string();
        assert!(
            e.contains(&format!("offset {offset}")) && e.contains("seq 5") && e.contains("wal-"),
            "{e}"
        );
        assert_eq!(
            std::fs::read(&path).unwrap(),
            bytes,
            "a refused start changes nothing"
        );
        assert!(!dir.path().join(LOG_CUT_FILE).exists());
        let r = recover(dir.path(), true, true).unwrap();
        assert_eq!(r.store.pos().seq, Seq(4));
        assert_eq!(
            std::fs::read_to_string(dir.path().join(LOG_CUT_FILE)).unwrap(),
            "5\n",
            "the cut is marked with the first seq it lost"
        );
        let kept = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains(".corrupt-")
            })
            .count();
        assert_eq!(kept, 1);
    }
}
