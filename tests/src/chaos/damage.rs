//! Storage damage the nemesis applies to a killed node's data dir: a torn last record, a
//! bit flip in the middle of the WAL, a wiped directory.
//!
//! A torn tail appends half of a copy of the last record without its newline: what a
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

/// Appends half of the last record (no newline) to the newest segment.
pub fn tear_tail(dir: &Path) -> io::Result<()> {
    let Some(seg) = newest_segment(dir)? else {
        return Ok(());
    };
    let bytes = std::fs::read(&seg)?;
    let body = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
    let start = body.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let last = &body[start..];
    if last.is_empty() {
        return Ok(());
    }
    let mut out = bytes.clone();
    out.extend_from_slice(&last[..last.len() / 2]);
    std::fs::write(&seg, out)
}

/// Flips one bit of a byte in the middle of the newest segment (never a newline).
pub fn flip_mid_wal(dir: &Path) -> io::Result<()> {
    let Some(seg) = newest_segment(dir)? else {
        return Ok(());
    };
    let mut bytes = std::fs::read(&seg)?;
    if bytes.len() < 4 {
        return Ok(());
    }
    let mut i = bytes.len() / 2;
    while i < bytes.len() && (bytes[i] == b'\n' || bytes[i] == b'\n' ^ 0x01) {
        i += 1;
    }
    if i < bytes.len() {
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
        std::fs::write(&seg, b"{\"a\":1}\n{\"b\":22222}\n").unwrap();
        tear_tail(d.path()).unwrap();
        let torn = std::fs::read(&seg).unwrap();
        assert!(torn.starts_with(b"{\"a\":1}\n{\"b\":22222}\n"));
        assert!(!torn.ends_with(b"\n"), "torn tail has no newline");
        flip_mid_wal(d.path()).unwrap();
        let flipped = std::fs::read(&seg).unwrap();
        assert_eq!(flipped.len(), torn.len());
        assert_eq!(flipped.iter().zip(&torn).filter(|(a, b)| a != b).count(), 1);
        wipe(d.path()).unwrap();
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }
}
