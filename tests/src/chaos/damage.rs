//! Storage damage the nemesis applies to a killed node's data dir: a torn last record, a
//! bit flip in the middle of the WAL, a wiped directory.
//!
//! A torn tail writes half of a copy of the last record, without its newline, right after
//! the records (over the segment's preallocated zeros, as the writer would): what a
//! crash in the middle of an unacknowledged `write` leaves. It never removes an
//! fsynced record (a real crash cannot), so the node must come back with every record.
//! A bit flip and a wipe do destroy acknowledged records on that one node; the node must
//! notice (checksums), cut or start empty, and catch up from its peers.

use std::io;
use std::path::{Path, PathBuf};

fn newest_segment(dir: &Path) -> io::Result<Option<PathBuf>> {
    let mut segs: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("wal-") && n.ends_with(".log"))
        })
        .collect();
    segs.sort();
    Ok(segs.pop())
}

/// Where a segment's records end: the zeros after them are preallocated space.
fn data_end(bytes: &[u8]) -> usize {
    bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1)
}

/// Writes half of the last record (no newline) after the records of the newest segment.
pub fn tear_tail(dir: &Path) -> io::Result<()> {
    let Some(seg) = newest_segment(dir)? else {
        return Ok(());
    };
    let mut bytes = std::fs::read(&seg)?;
    let end = data_end(&bytes);
    let body = bytes[..end].strip_suffix(b"\n").unwrap_or(&bytes[..end]);
    let start = body.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let half = body[start..].len() / 2;
    if half == 0 {
        return Ok(());
    }
    let torn = bytes[start..start + half].to_vec();
    bytes.truncate(end);
    bytes.extend_from_slice(&torn);
    let len = std::fs::metadata(&seg)?.len() as usize;
    bytes.resize(bytes.len().max(len), 0);
    std::fs::write(&seg, bytes)
}

/// Flips one bit of a byte in the middle of the newest segment's records (never a
/// newline).
pub fn flip_mid_wal(dir: &Path) -> io::Result<()> {
    let Some(seg) = newest_segment(dir)? else {
        return Ok(());
    };
    let mut bytes = std::fs::read(&seg)?;
    let end = data_end(&bytes);
    if end < 4 {
        return Ok(());
    }
    let mut i = end / 2;
    while i < end && (bytes[i] == b'\n' || bytes[i] == b'\n' ^ 0x01) {
        i += 1;
    }
    if i < end {
        bytes[i] ^= 0x01;
    }
    std::fs::write(&seg, bytes)
}

/// Removes everything in the data dir (the directory itself stays).
pub fn wipe(dir: &Path) -> io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            std::fs::remove_dir_all(&p)?;
        } else {
            std::fs::remove_file(&p)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn damage_shapes() {
        let d = tempfile::tempdir().unwrap();
        let seg = d.path().join("wal-00000000000000000001.log");
        let records = b"{\"a\":1}\n{\"b\":22222}\n";
        for prealloc in [0, 64] {
            let mut file = records.to_vec();
            file.resize(records.len() + prealloc, 0);
            std::fs::write(&seg, &file).unwrap();
            tear_tail(d.path()).unwrap();
            let torn = std::fs::read(&seg).unwrap();
            assert!(torn.starts_with(records));
            let tail = &torn[records.len()..data_end(&torn)];
            assert_eq!(tail, b"{\"b\":", "half the last record, no newline");
            assert_eq!(torn.len(), file.len().max(records.len() + tail.len()));
            flip_mid_wal(d.path()).unwrap();
            let flipped = std::fs::read(&seg).unwrap();
            assert_eq!(flipped.len(), torn.len());
            let diff: Vec<usize> = (0..torn.len()).filter(|&i| flipped[i] != torn[i]).collect();
            assert!(diff.len() == 1 && diff[0] < records.len(), "{diff:?}");
        }
        wipe(d.path()).unwrap();
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }
}
