//! Snapshots: a full copy of the state at one log position, so the WAL can be trimmed.
//!
//! # Format
//!
//! `snapshot-<seq, 20 digits>.json`, JSON lines that `jq` can read:
//!
//! ```text
//! {"type":"header","seq":S,"epoch":E,"keys":N,"clients":[..],"tombstones":[[key,seq],..]}
//! {"key":"k","value":"v","version":7}          one line per key, in key order
//! {"type":"footer","items":N,"crc":C}          C = CRC32C of every byte before this line
//! ```
//!
//! # Invariants and crash behaviour
//!
//! - A snapshot is written to `<name>.tmp`, fsynced, renamed, and the directory fsynced;
//!   only then are the WAL segments and snapshots it supersedes removed (oldest first).
//!   A crash at any step leaves either the old snapshot with its full WAL, or the new
//!   snapshot with a suffix of the WAL that still overlaps or continues it.
//! - A file without a matching footer is never used. `*.tmp` leftovers are removed at start.
//! - Encoding and decoding are pure functions; only [`write()`] and [`read()`] touch disk.
//! - Neither holds a whole file in memory. The writer takes a [`SnapshotData`] in O(1) (its
//!   maps share nodes with the store, see [`crate::store`]) and the snapshot thread streams
//!   it out line by line; reading parses line by line into the maps, and returns nothing
//!   unless the footer's count and checksum match.

use crate::store::{ClientMap, Key, KeyMapBuilder, SnapshotData, TombstoneMap};
use crate::wal::file::{list_named, sync_dir, write_atomic_with};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use walkv_shared::json;
use walkv_shared::rpc::ClientEntry;
use walkv_shared::types::{KeyValue, LogPosition, Outcome};
use walkv_shared::{Epoch, Seq};

/// Start of the footer line; a key line starts with `{"key"`, so it cannot be mistaken.
const FOOTER_PREFIX: &[u8] = b"{\"type\":\"footer\"";

/// Bytes read from a snapshot file at a time.
const READ_BUFFER_BYTES: usize = 1 << 20;

/// First line of a snapshot file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename = "header")]
pub struct Header {
    /// Seq of the last record covered.
    pub seq: Seq,
    /// Epoch of that record.
    pub epoch: Epoch,
    /// Number of key lines.
    pub keys: u64,
    /// The exactly-once table.
    pub clients: Vec<ClientEntry>,
    /// Uncommitted delete tombstones.
    pub tombstones: Vec<(String, Seq)>,
}

/// Last line of a snapshot file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename = "footer")]
struct Footer {
    items: u64,
    crc: u32,
}

/// The file name of the snapshot covering up to `seq`.
pub fn snapshot_name(seq: Seq) -> String {
    format!("snapshot-{:020}.json", seq.0)
}

/// The seq in a snapshot file name, if `name` is one.
pub fn parse_snapshot_name(name: &str) -> Option<Seq> {
    let digits = name.strip_prefix("snapshot-")?.strip_suffix(".json")?;
    (digits.len() == 20)
        .then(|| digits.parse().ok().map(Seq))
        .flatten()
}

/// Every snapshot in `dir`, oldest first.
pub fn list(dir: &Path) -> io::Result<Vec<(Seq, PathBuf)>> {
    list_named(dir, parse_snapshot_name)
}

/// Encodes a snapshot into memory (pure; tests and small snapshots).
pub fn encode(data: &SnapshotData) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing into a Vec cannot fail.
    encode_to(data, &mut out).expect("encoding into memory cannot fail");
    out
}

/// Streams the encoding of `data` into `out`, one line at a time, straight from the
/// shared maps: no copy of the keys is made, so the snapshot thread needs no more memory
/// than one line, and the writer never waits for it.
pub fn encode_to(data: &SnapshotData, out: &mut impl Write) -> io::Result<()> {
    let (mut line, mut crc) = (Vec::new(), 0);
    let header = HeaderOut {
        kind: "header",
        seq: data.pos.seq,
        epoch: data.pos.epoch,
        keys: data.items.len() as u64,
        clients: Lines(&data.clients),
        tombstones: Lines(&data.tombstones),
    };
    serde_json::to_writer(&mut line, &header)?;
    put_line(&mut line, &mut crc, out)?;
    for (key, (value, version)) in &data.items {
        key_line(&mut line, key, value, *version);
        put_line(&mut line, &mut crc, out)?;
    }
    let footer = Footer {
        items: data.items.len() as u64,
        crc,
    };
    serde_json::to_writer(&mut line, &footer)?;
    line.push(b'\n');
    out.write_all(&line)
}

/// Ends `line`, adds it to the running CRC and writes it out; leaves `line` empty.
fn put_line(line: &mut Vec<u8>, crc: &mut u32, out: &mut impl Write) -> io::Result<()> {
    line.push(b'\n');
    *crc = crc32c::crc32c_append(*crc, line);
    out.write_all(line)?;
    line.clear();
    Ok(())
}

/// [`Header`] as written: the same fields in the same order, borrowing the tables.
#[derive(Serialize)]
struct HeaderOut<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    seq: Seq,
    epoch: Epoch,
    keys: u64,
    clients: Lines<'a, ClientMap>,
    tombstones: Lines<'a, TombstoneMap>,
}

/// Appends a key line without its newline: `{"key":K,"value":V,"version":N}`, written by
/// hand (byte for byte what `serde_json` writes, checked by a test), because a snapshot
/// writes one per key and `serde_json` spent most of the snapshot's time escaping values.
fn key_line(line: &mut Vec<u8>, key: &str, value: &str, version: Seq) {
    line.extend_from_slice(b"{\"key\":");
    json::write_str(line, key);
    line.extend_from_slice(b",\"value\":");
    json::write_str(line, value);
    line.extend_from_slice(b",\"version\":");
    json::write_u64(line, version.0);
    line.push(b'}');
}

/// A `KeyValue` line as read: borrows from the file's bytes unless a string has escapes.
#[derive(Deserialize)]
struct KeyValueIn<'a> {
    #[serde(borrow)]
    key: Cow<'a, str>,
    #[serde(borrow)]
    value: Cow<'a, str>,
    version: Seq,
}

/// A shared table serialised as a JSON array, in key order, without copying it.
struct Lines<'a, M>(&'a M);

impl Serialize for Lines<'_, ClientMap> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Entry<'a> {
            client: &'a str,
            op_no: u64,
            outcome: &'a Outcome,
        }
        s.collect_seq(self.0.iter().map(|(client, (op_no, outcome))| Entry {
            client,
            op_no: *op_no,
            outcome,
        }))
    }
}

impl Serialize for Lines<'_, TombstoneMap> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|(key, seq)| (&**key, *seq)))
    }
}

/// Decodes and verifies a snapshot held in memory (pure).
pub fn decode(bytes: &[u8]) -> Result<SnapshotData, String> {
    decode_from(bytes)
}

/// Decodes and verifies a snapshot one line at a time, so a large file is never held in
/// memory whole. Lines are parsed as they arrive, but nothing is returned unless the
/// footer's count and checksum match; when both a line and the checksum are bad, the
/// checksum is reported (a flipped bit is the likelier story).
fn decode_from(mut input: impl BufRead) -> Result<SnapshotData, String> {
    let (mut line, mut crc) = (Vec::new(), 0);
    let mut header: Option<Header> = None;
    let (mut data, mut items) = (SnapshotData::default(), KeyMapBuilder::default());
    let (mut found, mut bad) = (0u64, None::<String>);
    let footer = loop {
        line.clear();
        let n = input
            .read_until(b'\n', &mut line)
            .map_err(|e| format!("cannot read: {e}"))?;
        if line.starts_with(FOOTER_PREFIX) {
            break serde_json::from_slice::<Footer>(&line)
                .map_err(|e| format!("bad footer: {e}"))?;
        }
        if n == 0 || !line.ends_with(b"\n") {
            return Err("no footer line".into());
        }
        crc = crc32c::crc32c_append(crc, &line);
        if bad.is_some() || line == b"\n" {
            continue;
        }
        let parsed = match &header {
            None => serde_json::from_slice::<Header>(&line)
                .map(|h| header = Some(h))
                .map_err(|e| format!("bad header: {e}")),
            Some(_) => serde_json::from_slice::<KeyValueIn<'_>>(&line)
                .map(|kv| {
                    items.push(&kv.key, &kv.value, kv.version);
                    found += 1;
                })
                .map_err(|e| format!("bad item: {e}")),
        };
        bad = parsed.err();
    };
    if crc != footer.crc {
        return Err(format!(
            "checksum mismatch (footer {}, computed {crc})",
            footer.crc
        ));
    }
    line.clear();
    input
        .read_to_end(&mut line)
        .map_err(|e| format!("cannot read: {e}"))?;
    if !line.is_empty() {
        return Err(format!("{} bytes after the footer line", line.len()));
    }
    if let Some(e) = bad {
        return Err(e);
    }
    let header = header.ok_or("no header line")?;
    data.items = items.finish();
    // A repeated key would collapse in the map: count lines and keys both.
    if found != footer.items || header.keys != footer.items || data.items.len() as u64 != found {
        return Err(format!(
            "footer says {} items, header {}, found {found} lines with {} distinct keys",
            footer.items,
            header.keys,
            data.items.len()
        ));
    }
    data.pos = LogPosition {
        epoch: header.epoch,
        seq: header.seq,
    };
    header
        .clients
        .into_iter()
        .for_each(|c| data.insert_client(c));
    data.tombstones = header
        .tombstones
        .into_iter()
        .map(|(key, seq)| (Key::from(key), seq))
        .collect();
    Ok(data)
}

/// Writes a snapshot atomically, streaming it from the shared maps, and returns its path.
pub fn write(dir: &Path, data: &SnapshotData) -> io::Result<PathBuf> {
    let name = snapshot_name(data.pos.seq);
    write_atomic_with(dir, &name, |out| encode_to(data, out))?;
    Ok(dir.join(name))
}

/// Reads and verifies a snapshot file, streaming it.
pub fn read(path: &Path) -> Result<SnapshotData, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    decode_from(io::BufReader::with_capacity(READ_BUFFER_BYTES, file))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Removes every segment whose records are all covered by the snapshot at `seq` (first
/// seq <= `seq`, given the writer rolled to a new segment at `seq + 1`), and every older
/// snapshot, oldest first, then fsyncs the directory.
pub fn remove_superseded(dir: &Path, seq: Seq) -> io::Result<()> {
    for (first, path) in crate::wal::file::list_segments(dir)? {
        if first <= seq {
            std::fs::remove_file(path)?;
        }
    }
    for (s, path) in list(dir)? {
        if s < seq {
            std::fs::remove_file(path)?;
        }
    }
    sync_dir(dir)
}

/// One page of keys after `after_key` from the snapshot file at `path` (streamed, so a
/// large snapshot is never loaded whole to serve a page).
///
/// A page holds at most `max` keys and stops before its items, as the JSON lines the file
/// holds them in, pass `max_bytes`; the first item always goes, so paging progresses.
pub fn read_page(
    path: &Path,
    after_key: Option<&str>,
    max: usize,
    max_bytes: usize,
) -> io::Result<(LogPosition, Vec<KeyValue>, bool)> {
    let file = std::fs::File::open(path)?;
    read_page_from(&file, path, after_key, max, max_bytes, None)
        .map(|(items, done, next)| (next.pos, items, done))
}

/// Where the next page of a transfer starts: the offset of its first key line, and the
/// position the snapshot covers, read from the header by the transfer's first page, so
/// later pages need not parse the header again (it holds the whole exactly-once table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resume {
    /// The last record the snapshot covers.
    pub pos: LogPosition,
    /// Byte offset of the first line not sent yet.
    pub offset: u64,
}

/// The exactly-once table's part of a snapshot page: the entries of `clients` after
/// `after` in client order, stopping before their JSON passes `max_bytes` (the first
/// always goes, so paging progresses). Returns them, their bytes as JSON, and whether
/// they end the table. The table rides on the first pages of a transfer, before any key:
/// sent whole, a table of some 90k client ids outgrew a node's 8 MiB frame, and a
/// catch-up by snapshot failed for good. Pure.
pub fn clients_page(
    mut clients: Vec<ClientEntry>,
    after: Option<&str>,
    max_bytes: usize,
) -> (Vec<ClientEntry>, usize, bool) {
    clients.retain(|c| after.is_none_or(|a| c.client.as_str() > a));
    clients.sort_unstable_by(|a, b| a.client.cmp(&b.client));
    let mut bytes = 0;
    let mut taken = 0;
    for c in &clients {
        // An entry serialises into memory without fail; +1 for the separating comma.
        let b = serde_json::to_vec(c)
            .expect("a client entry serialises")
            .len()
            + 1;
        if taken > 0 && bytes + b > max_bytes {
            break;
        }
        bytes += b;
        taken += 1;
    }
    let complete = taken == clients.len();
    clients.truncate(taken);
    (clients, bytes, complete)
}

/// Reads a file from a position of its own (`pread`), leaving the file's shared offset alone.
struct ReadAt<'a> {
    file: &'a std::fs::File,
    pos: u64,
}

impl io::Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// The header of an open snapshot file (`name` labels errors), read by position, and
/// where its first key line starts: pass that to [`read_page_from`] so the header is not
/// read again.
pub fn read_header_from(file: &std::fs::File, name: &Path) -> io::Result<(Header, Resume)> {
    let mut reader = io::BufReader::new(ReadAt { file, pos: 0 });
    read_header_line(&mut reader, &mut String::new(), name)
}

/// Reads the first line into `line` and parses it as the header; returns it with the
/// position it names and the offset of the line after it.
fn read_header_line(
    reader: &mut impl BufRead,
    line: &mut String,
    name: &Path,
) -> io::Result<(Header, Resume)> {
    if reader.read_line(line)? == 0 {
        return Err(invalid(name, "empty"));
    }
    let header: Header = serde_json::from_str(line).map_err(|e| invalid(name, e))?;
    let first_key = Resume {
        pos: LogPosition {
            epoch: header.epoch,
            seq: header.seq,
        },
        offset: line.len() as u64,
    };
    Ok((header, first_key))
}

/// An `InvalidData` error naming the snapshot file.
fn invalid(name: &Path, why: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: {why}", name.display()),
    )
}

/// [`read_page`] from an open snapshot file (`name` labels errors). With `resume` (what
/// the previous page returned) it starts at that key line and skips the header, so paging
/// through a snapshot of n keys reads the file once instead of O(n²/page) lines, and the
/// header, which holds the whole exactly-once table, is parsed once per transfer instead
/// of once per page. Keys at or below `after_key` are still skipped, so an offset behind
/// the right line can only cost time, never return a key twice. Reads by position, so
/// several transfers can share one open file. Returns the keys, whether they end the
/// snapshot, and where the next page starts (with the position the snapshot covers).
pub fn read_page_from(
    file: &std::fs::File,
    name: &Path,
    after_key: Option<&str>,
    max: usize,
    max_bytes: usize,
    resume: Option<Resume>,
) -> io::Result<(Vec<KeyValue>, bool, Resume)> {
    let mut line = String::new();
    let (mut reader, Resume { pos, mut offset }) = match resume {
        Some(at) => (
            io::BufReader::new(ReadAt {
                file,
                pos: at.offset,
            }),
            at,
        ),
        None => {
            let mut reader = io::BufReader::new(ReadAt { file, pos: 0 });
            let (_, first_key) = read_header_line(&mut reader, &mut line, name)?;
            (reader, first_key)
        }
    };
    let mut items = Vec::new();
    let mut bytes = 0usize;
    let next = |offset| Resume { pos, offset };
    loop {
        line.clear();
        let n = reader.read_line(&mut line)?;
        if n == 0 || !line.ends_with('\n') {
            return Err(invalid(name, "no footer"));
        }
        if line.as_bytes().starts_with(FOOTER_PREFIX) {
            return Ok((items, true, next(offset)));
        }
        if items.len() == max {
            return Ok((items, false, next(offset)));
        }
        let kv: KeyValue = serde_json::from_str(&line).map_err(|e| invalid(name, e))?;
        if after_key.is_some_and(|a| kv.key.as_str() <= a) {
            offset += n as u64;
            continue;
        }
        // The line is the item as JSON, as the answer carries it: stop before the page
        // outgrows the bound, leaving this line to the next page.
        if !items.is_empty() && bytes + n > max_bytes {
            return Ok((items, false, next(offset)));
        }
        offset += n as u64;
        bytes += n;
        items.push(kv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{put, rec};
    use crate::store::Store;
    use walkv_shared::types::WriteOp;

    #[test]
    fn a_key_line_is_what_serde_json_writes() {
        #[derive(Serialize)]
        struct Line<'a> {
            key: &'a str,
            value: &'a str,
            version: Seq,
        }
        let texts = [
            "",
            "k",
            "a 100-byte value? ".repeat(6).leak(),
            "q\"\\\u{1}\n",
            "ü😀",
        ];
        for (i, key) in texts.iter().enumerate() {
            for value in texts {
                let version = Seq(i as u64 * 1_000_003);
                let mut line = Vec::new();
                key_line(&mut line, key, value, version);
                let expected = serde_json::to_vec(&Line {
                    key,
                    value,
                    version,
                })
                .unwrap();
                assert_eq!(
                    String::from_utf8(line).unwrap(),
                    String::from_utf8(expected).unwrap()
                );
            }
        }
    }

    #[test]
    fn the_client_table_comes_in_pages_that_fit() {
        let outcome = Outcome::Written { version: Seq(1) };
        let entry = |i: usize| ClientEntry {
            client: format!("client-{i:05}-{}", "\u{1}".repeat(100)),
            op_no: i as u64,
            outcome: outcome.clone(),
        };
        // Out of order on purpose: pages follow client order whatever the input's.
        let table: Vec<ClientEntry> = (0..500).rev().map(entry).collect();
        let one = serde_json::to_vec(&entry(0)).unwrap().len() + 1;
        let bound = 40 * one + one / 2;
        let (mut got, mut after) = (Vec::new(), None::<String>);
        loop {
            let (page, bytes, complete) = clients_page(table.clone(), after.as_deref(), bound);
            assert!(!page.is_empty(), "every page makes progress");
            assert!(
                bytes <= bound,
                "a page of {bytes} bytes passed the bound {bound}"
            );
            assert_eq!(
                bytes,
                page.iter()
                    .map(|c| serde_json::to_vec(c).unwrap().len() + 1)
                    .sum::<usize>()
            );
            after = page.last().map(|c| c.client.clone());
            got.extend(page);
            if complete {
                break;
            }
        }
        assert_eq!(got, (0..500).map(entry).collect::<Vec<_>>());
        // One entry larger than the bound still goes, alone.
        let (page, _, complete) = clients_page(table.clone(), None, 1);
        assert_eq!((page.len(), complete), (1, false));
        // Past the last entry: nothing left, and the table is complete.
        let last = entry(499).client;
        assert_eq!(
            clients_page(table, Some(&last), bound),
            (Vec::new(), 0, true)
        );
    }

    #[test]
    fn round_trip_and_corruption() {
        let mut s = Store::new();
        for i in 1..=50 {
            s.apply(&put(i, &format!("k{i:03}"), &format!("v{i}")));
        }
        let data = s.snapshot_data();
        let bytes = encode(&data);
        assert_eq!(decode(&bytes).unwrap(), data);
        let mut bad = bytes.clone();
        bad[bytes.len() / 2] ^= 0x02;
        assert!(decode(&bad).unwrap_err().contains("checksum"));
        assert!(decode(&bytes[..bytes.len() - 3]).is_err());
        let footer_start = bytes[..bytes.len() - 1]
            .iter()
            .rposition(|&b| b == b'\n')
            .unwrap();
        assert!(decode(&bytes[..footer_start + 1]).is_err(), "no footer");
        let mut trailing = bytes.clone();
        trailing.extend_from_slice(b"{}\n");
        assert!(decode(&trailing).is_err(), "data after the footer");
    }

    /// The file format is a contract with older nodes and with `jq`: these exact bytes
    /// were written by the encoder before it streamed from shared maps.
    #[test]
    fn format_is_unchanged() {
        let golden = concat!(
            r#"{"type":"header","seq":5,"epoch":1,"keys":2,"clients":[{"client":"c1","op_no":1,"outcome":{"outcome":"written","version":1}},{"client":"c2","op_no":1,"outcome":{"outcome":"written","version":2}},{"client":"c3","op_no":1,"outcome":{"outcome":"written","version":3}},{"client":"carol","op_no":10,"outcome":{"outcome":"version_mismatch","current":2}}],"tombstones":[["gone",4]]}"#,
            "\n",
            r#"{"key":"a","value":"é ✓","version":2}"#,
            "\n",
            r#"{"key":"b","value":"two \"quoted\"\nline","version":1}"#,
            "\n",
            r#"{"type":"footer","items":2,"crc":1096819748}"#,
            "\n",
        );
        let mut s = Store::new();
        s.apply(&put(1, "b", "two \"quoted\"\nline"));
        s.apply(&put(2, "a", "é ✓"));
        s.apply(&put(3, "gone", "x"));
        s.apply(&rec(4, "carol", 9, WriteOp::Delete { key: "gone".into() }));
        let cas = WriteOp::Cas {
            key: "a".into(),
            expected: Seq(1),
            value: "no".into(),
        };
        s.apply(&rec(5, "carol", 10, cas));
        let data = s.snapshot_data();
        assert_eq!(String::from_utf8(encode(&data)).unwrap(), golden);
        assert_eq!(decode(golden.as_bytes()).unwrap(), data);
    }

    #[test]
    fn a_repeated_key_is_refused_even_with_a_valid_checksum() {
        let mut s = Store::new();
        s.apply(&put(1, "a", "1"));
        s.apply(&put(2, "b", "2"));
        let text = String::from_utf8(encode(&s.snapshot_data())).unwrap();
        let body: String = text
            .lines()
            .take(3)
            .map(|l| format!("{}\n", l.replace(r#""key":"b""#, r#""key":"a""#)))
            .collect();
        let footer = format!(
            "{{\"type\":\"footer\",\"items\":2,\"crc\":{}}}\n",
            crc32c::crc32c(body.as_bytes())
        );
        let e = decode(format!("{body}{footer}").as_bytes()).unwrap_err();
        assert!(e.contains("distinct"), "{e}");
    }

    #[test]
    fn pages_cover_every_key_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::new();
        for i in 1..=25 {
            s.apply(&put(i, &format!("k{i:03}"), "v"));
        }
        let path = write(dir.path(), &s.snapshot_data()).unwrap();
        assert_eq!(read(&path).unwrap(), s.snapshot_data());
        let mut after: Option<String> = None;
        let mut seen = Vec::new();
        loop {
            let (pos, items, done) = read_page(&path, after.as_deref(), 7, usize::MAX).unwrap();
            assert_eq!(pos.seq, Seq(25));
            after = items.last().map(|kv| kv.key.clone()).or(after);
            seen.extend(items);
            if done {
                break;
            }
        }
        assert_eq!(seen, s.scan("", usize::MAX));

        // Resuming at the returned offset gives the same pages; a stale offset (from the
        // start) still skips what was already sent. The open file keeps serving pages after
        // the snapshot is removed from the directory, as a newer one removes it.
        let file = std::fs::File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let (mut after, mut at, mut resumed) = (None::<String>, None, Vec::new());
        loop {
            let (items, done, next) =
                read_page_from(&file, &path, after.as_deref(), 7, usize::MAX, at).unwrap();
            after = items.last().map(|kv| kv.key.clone()).or(after);
            at = Some(next);
            resumed.extend(items);
            if done {
                break;
            }
        }
        assert_eq!(resumed, seen);
        let (_, _, first_key) = read_page_from(&file, &path, None, 0, usize::MAX, None).unwrap();
        let (from_start, _, next) =
            read_page_from(&file, &path, Some("k010"), 3, usize::MAX, Some(first_key)).unwrap();
        assert_eq!(from_start[0].key, "k011");
        assert_eq!(next.pos.seq, Seq(25), "the position comes with the resume");
    }

    /// Pages are bounded by their items' bytes as JSON, escaping included, as well as by
    /// count (a count alone let a catch-up page of large values outgrow the source's frame
    /// limit, and the source then closed the connection its appends shared); a page always
    /// carries one item, however large.
    #[test]
    fn pages_of_escaped_values_stop_at_the_byte_bound() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::new();
        for i in 1..=7 {
            let value = "\u{1}".repeat(if i == 4 { 5_000 } else { 1_000 });
            s.apply(&put(i, &format!("k{i}"), &value));
        }
        let path = write(dir.path(), &s.snapshot_data()).unwrap();
        let json = |kv: &KeyValue| serde_json::to_string(kv).unwrap().len() + 1;
        let max_bytes = 20_000;
        let file = std::fs::File::open(&path).unwrap();
        let (mut after, mut at, mut pages) = (None::<String>, None, Vec::new());
        loop {
            let (items, done, next) =
                read_page_from(&file, &path, after.as_deref(), 1000, max_bytes, at).unwrap();
            after = items.last().map(|kv| kv.key.clone()).or(after);
            at = Some(next);
            pages.push(items);
            if done {
                break;
            }
        }
        let sizes: Vec<Vec<usize>> = pages.iter().map(|p| p.iter().map(json).collect()).collect();
        // 6,000-odd bytes a value: three fit in 20,000; the 30,000-byte one goes alone.
        assert_eq!(
            sizes.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![3, 1, 3],
            "{sizes:?}"
        );
        for page in &sizes {
            assert!(
                page.len() <= 1 || page.iter().sum::<usize>() <= max_bytes,
                "{sizes:?}"
            );
        }
        assert_eq!(pages.concat(), s.scan("", usize::MAX));
    }
}
