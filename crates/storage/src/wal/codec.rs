//! Pure decoding of one WAL segment's bytes. No IO.
//!
//! A segment is a sequence of lines produced by `walkv_shared::record::encode`. Scanning
//! stops at the first line that does not count; whether that is a crash artifact or
//! corruption depends only on where it is:
//!
//! - a last line without `\n`, or a last line that fails its checksum or does not parse,
//!   is a **torn tail** (a write that a crash interrupted): [`DecodeError::TornTail`];
//! - a bad line followed by more data is a torn tail too when what follows the last whole
//!   record is what a crash leaves of one write over preallocated zeros (see below);
//! - any other bad line followed by more data, or a well-formed line whose seq is not
//!   exactly one more than the previous one, is **corruption**: [`DecodeError::Corrupt`].
//!
//! A segment may end in zero bytes: the writer preallocates the file ahead of its records
//! (see `super::file::WalFile`). Trailing zeros are not data; the log ends at the last
//! non-zero byte, and the rules above apply to what comes before. A record never contains
//! a zero byte (JSON escapes control characters), so trimming cannot cut into one.
//!
//! A batch overwrites zeros that are already on disk, so nothing (no file size) orders
//! its sectors: a crash before its `fdatasync` returns can leave any of them written and
//! the others still zero, e.g. half a record, a sector of zeros, then whole records. Only
//! the one batch being written can be torn, so that is recognised by its shape
//! ([`torn_write_over_zeros`]): every run of zeros after the last whole record begins
//! there or at a sector boundary and ends at a sector boundary, the first bad line holds
//! the first zero, every later line holds zeros or is an intact later record, and the
//! whole region is at most [`TORN_WRITE_MAX_BYTES`]. Anything else (a zeroed record,
//! bytes zeroed off the sector grid, a damaged line without zeros, a bit flip anywhere in
//! the region) is still corruption. One case looks the same as a crash and cannot be told
//! apart here: a disk returning whole zero sectors inside the last 16 MiB of synced
//! records; recovery therefore keeps a copy of every torn tail of more than one line.

use walkv_shared::record::{decode_line, encode_into};
use walkv_shared::{Record, Seq};

/// The unit a disk writes atomically: what a crash leaves of a write is whole sectors of
/// it, each either written or as before.
pub const SECTOR_BYTES: u64 = 512;

/// Most bytes one write can have unsynced when a crash tears it: the writer writes a
/// group commit in parts of at most `writer::WRITE_MAX_BYTES` (4 MiB) plus one append,
/// and an append is below the node's frame limit (8 MiB by default). A larger region of
/// bad bytes is reported as corruption, the safe side (the node refuses to start and
/// names the offset); so is a torn append larger than 12 MiB, possible only with
/// `max_frame_bytes` raised above that.
pub const TORN_WRITE_MAX_BYTES: usize = 16 << 20;

/// Why scanning stopped before the end of the bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The last line is incomplete or unchecksummed: a crash mid-write.
    TornTail {
        /// Byte offset where the torn line starts.
        offset: u64,
        /// What was wrong with it.
        reason: String,
    },
    /// A bad record before the end, or a break in seq continuity.
    Corrupt {
        /// Byte offset where the bad line starts.
        offset: u64,
        /// The seq that should have been there.
        expected_seq: Seq,
        /// What was wrong with it.
        reason: String,
    },
}

impl DecodeError {
    /// Byte offset of the first line that does not count.
    pub fn offset(&self) -> u64 {
        match self {
            DecodeError::TornTail { offset, .. } | DecodeError::Corrupt { offset, .. } => *offset,
        }
    }
}

/// The result of scanning a segment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decoded {
    /// The records of the valid prefix, consecutive from the segment's first seq.
    pub records: Vec<Record>,
    /// End offset of each record (the byte after its newline).
    pub ends: Vec<u64>,
    /// Length of the valid prefix in bytes.
    pub valid_len: u64,
    /// Why scanning stopped early, if it did.
    pub error: Option<DecodeError>,
}

/// Where a segment's data ends: after its last non-zero byte (the zeros after it are
/// preallocated space).
pub fn data_end(bytes: &[u8]) -> usize {
    bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1)
}

/// Scans `bytes`, whose first record must have seq `first`.
pub fn decode(bytes: &[u8], first: Seq) -> Decoded {
    let mut out = Decoded::default();
    let mut pos = 0usize;
    let mut expected = first;
    let bytes = &bytes[..data_end(bytes)];
    while pos < bytes.len() {
        let Some(nl) = bytes[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|i| pos + i)
        else {
            out.error = Some(DecodeError::TornTail {
                offset: pos as u64,
                reason: "last line has no newline".into(),
            });
            break;
        };
        let is_last = nl + 1 == bytes.len();
        match decode_line(&bytes[pos..nl]) {
            Ok(r) if r.seq == expected => {
                out.records.push(r);
                pos = nl + 1;
                out.ends.push(pos as u64);
                expected = expected.next();
            }
            Ok(r) => {
                let reason = format!("record has seq {} where {} was expected", r.seq, expected);
                out.error = Some(DecodeError::Corrupt {
                    offset: pos as u64,
                    expected_seq: expected,
                    reason,
                });
                break;
            }
            Err(e) if is_last => {
                out.error = Some(DecodeError::TornTail {
                    offset: pos as u64,
                    reason: e.to_string(),
                });
                break;
            }
            Err(e) => {
                let region = &bytes[pos..];
                out.error = Some(
                    match torn_write_over_zeros(region, pos as u64, expected, TORN_WRITE_MAX_BYTES)
                    {
                        Some(reason) => DecodeError::TornTail {
                            offset: pos as u64,
                            reason,
                        },
                        None => DecodeError::Corrupt {
                            offset: pos as u64,
                            expected_seq: expected,
                            reason: e.to_string(),
                        },
                    },
                );
                break;
            }
        }
    }
    out.valid_len = pos as u64;
    out
}

/// Whether `region` (from the first bad line, at `offset` in the segment, where record
/// `expected` should be, to the last non-zero byte) is what a crash leaves of one write
/// over preallocated zeros. Everything of that write before its first lost sector is
/// intact, and so is every sector it kept; so all of these must hold:
///
/// - the region is at most `max_bytes` (one write);
/// - it holds zeros, and every run of them begins at the region's start or on a sector
///   boundary and ends on one (whole sectors lost);
/// - the first bad line holds the first zero (else that line was damaged, not lost);
/// - every later line holds zeros or is an intact record with a seq above `expected` and
///   above the one before (only its last, unterminated piece may be cut short).
///
/// Returns why it counts as torn. Pure.
pub fn torn_write_over_zeros(
    region: &[u8],
    offset: u64,
    expected: Seq,
    max_bytes: usize,
) -> Option<String> {
    if region.len() > max_bytes {
        return None;
    }
    let first_line_end = region
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or(region.len());
    if !region[..first_line_end].contains(&0) {
        return None;
    }
    let mut last_seq = expected;
    let mut rest = region.get(first_line_end + 1..).unwrap_or_default();
    while !rest.is_empty() {
        let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
            break; // the last piece, cut short by a lost sector after it
        };
        let line = &rest[..nl];
        if !line.contains(&0) {
            match decode_line(line) {
                Ok(r) if r.seq > last_seq => last_seq = r.seq,
                _ => return None,
            }
        }
        rest = &rest[nl + 1..];
    }
    let mut runs = 0;
    let mut at = 0;
    while let Some(start) = region[at..].iter().position(|&b| b == 0).map(|i| at + i) {
        // The region ends in a non-zero byte, so every run ends inside it.
        let end = region[start..]
            .iter()
            .position(|&b| b != 0)
            .map_or(region.len(), |i| start + i);
        let on_grid = |i: usize| (offset + i as u64).is_multiple_of(SECTOR_BYTES);
        if !(start == 0 || on_grid(start)) || !on_grid(end) {
            return None;
        }
        runs += 1;
        at = end;
    }
    (runs > 0).then(|| {
        format!(
            "a write cut short by a crash: {} bytes after the last whole record, with {runs} run(s) of unwritten sectors",
            region.len()
        )
    })
}

/// Encodes records into one buffer (one write for a whole group commit), asserting that
/// they are consecutive: the paired check of the one `decode` makes after reading.
pub fn encode_batch<'a>(records: impl IntoIterator<Item = &'a Record>, out: &mut Vec<u8>) {
    let mut prev: Option<Seq> = None;
    for r in records {
        if let Some(p) = prev {
            assert_eq!(r.seq, p.next(), "a WAL batch must be consecutive");
        }
        prev = Some(r.seq);
        encode_into(r, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::put;

    fn log(n: u64) -> (Vec<Record>, Vec<u8>) {
        let records: Vec<Record> = (1..=n)
            .map(|i| put(i, &format!("key{i}"), &"v".repeat(i as usize)))
            .collect();
        let mut bytes = Vec::new();
        encode_batch(&records, &mut bytes);
        (records, bytes)
    }

    #[test]
    fn round_trip() {
        let (records, bytes) = log(20);
        let d = decode(&bytes, Seq(1));
        assert_eq!(d.records, records);
        assert_eq!(d.valid_len, bytes.len() as u64);
        assert_eq!(d.error, None);
    }

    /// For every cut of an 8-record log, decodes `torn(bytes, cut)` and checks that exactly
    /// the records wholly before the cut come back and the rest is a torn tail, never
    /// corruption.
    fn assert_every_cut_recovers_the_complete_prefix(torn: impl Fn(&[u8], usize) -> Vec<u8>) {
        let (records, bytes) = log(8);
        let ends = decode(&bytes, Seq(1)).ends;
        for cut in 0..=bytes.len() {
            let d = decode(&torn(&bytes, cut), Seq(1));
            let complete = ends.iter().filter(|&&e| e as usize <= cut).count();
            assert_eq!(d.records, records[..complete], "cut at {cut}");
            let prefix_end = if complete == 0 { 0 } else { ends[complete - 1] };
            assert_eq!(d.valid_len, prefix_end, "cut at {cut}");
            match d.error {
                None => assert_eq!(cut as u64, prefix_end),
                Some(DecodeError::TornTail { offset, .. }) => assert_eq!(offset, prefix_end),
                Some(e) => panic!("cut at {cut}: a torn write is not corruption: {e:?}"),
            }
        }
    }

    #[test]
    fn truncation_at_every_offset_recovers_exactly_the_complete_prefix() {
        assert_every_cut_recovers_the_complete_prefix(|bytes, cut| bytes[..cut].to_vec());
    }

    #[test]
    fn a_value_with_nul_characters_encodes_without_a_zero_byte() {
        // Trimming the zero tail relies on it: JSON escapes control characters.
        let r = put(1, "k\0ey", "a\0b\0");
        let mut bytes = Vec::new();
        encode_batch([&r], &mut bytes);
        assert!(!bytes.contains(&0), "{bytes:?}");
        bytes.resize(bytes.len() + 100, 0);
        assert_eq!(decode(&bytes, Seq(1)).records, vec![r]);
    }

    #[test]
    fn zero_tail_is_preallocation_not_data() {
        let (records, mut bytes) = log(6);
        let logical = bytes.len() as u64;
        bytes.resize(bytes.len() + 5000, 0);
        let d = decode(&bytes, Seq(1));
        assert_eq!(d.records, records);
        assert_eq!(d.valid_len, logical);
        assert_eq!(d.error, None);
        assert_eq!(
            decode(&[0; 64], Seq(1)),
            Decoded::default(),
            "all zeros is empty"
        );
    }

    #[test]
    fn truncation_into_a_zero_tail_recovers_exactly_the_complete_prefix() {
        // A torn write over preallocated space: a prefix of the bytes, then the zeros.
        assert_every_cut_recovers_the_complete_prefix(|bytes, cut| {
            let mut torn = bytes[..cut].to_vec();
            torn.resize(bytes.len() + 512, 0);
            torn
        });
    }

    /// A synced log of 5 records, then one unsynced batch of 20 more written over
    /// preallocated zeros: (all records, the bytes with their zero tail, where the batch
    /// starts).
    fn log_and_batch() -> (Vec<Record>, Vec<u8>, usize) {
        let records: Vec<Record> = (1..=25)
            .map(|i| put(i, &format!("key{i}"), &"v".repeat(40)))
            .collect();
        let mut bytes = Vec::new();
        encode_batch(&records[..5], &mut bytes);
        let batch_start = bytes.len();
        encode_batch(&records[5..], &mut bytes);
        bytes.resize(bytes.len().next_multiple_of(4096) + 4096, 0);
        (records, bytes, batch_start)
    }

    #[test]
    fn a_batch_torn_at_any_set_of_sectors_keeps_the_whole_records_before_the_first_hole() {
        let (records, bytes, batch_start) = log_and_batch();
        let ends = decode(&bytes, Seq(1)).ends;
        let batch_end = *ends.last().unwrap() as usize;
        let sector = SECTOR_BYTES as usize;
        // The batch's bytes in each sector it touches: what a crash keeps or loses whole.
        let sectors: Vec<(usize, usize)> = (batch_start / sector..batch_end.div_ceil(sector))
            .map(|k| {
                (
                    (k * sector).max(batch_start),
                    ((k + 1) * sector).min(batch_end),
                )
            })
            .collect();
        assert!(
            sectors.len() >= 5,
            "the batch spans {} sectors",
            sectors.len()
        );
        for lost in 1u32..(1 << sectors.len()) {
            let mut torn = bytes.clone();
            for (k, &(from, to)) in sectors.iter().enumerate() {
                if lost & (1 << k) != 0 {
                    torn[from..to].fill(0);
                }
            }
            let hole = batch_start + torn[batch_start..].iter().position(|&b| b == 0).unwrap();
            let complete = ends.iter().filter(|&&e| e as usize <= hole).count();
            let d = decode(&torn, Seq(1));
            assert_eq!(d.records, records[..complete], "sectors lost: {lost:b}");
            assert_eq!(d.valid_len, ends[complete - 1], "sectors lost: {lost:b}");
            match d.error {
                None => assert!(torn[hole..].iter().all(|&b| b == 0)),
                Some(DecodeError::TornTail { offset, .. }) => assert_eq!(offset, d.valid_len),
                Some(e) => panic!("sectors lost {lost:b}: a torn batch is not corruption: {e:?}"),
            }
        }
    }

    #[test]
    fn zeros_off_the_sector_grid_or_too_far_back_are_corruption() {
        let (_, bytes, batch_start) = log_and_batch();
        let sector = SECTOR_BYTES as usize;
        // 100 zero bytes inside the batch, not on sector boundaries: no crash does that.
        let mut bad = bytes.clone();
        let from = batch_start.next_multiple_of(sector) + 10;
        bad[from..from + 100].fill(0);
        let d = decode(&bad, Seq(1));
        assert!(
            matches!(d.error, Some(DecodeError::Corrupt { .. })),
            "{:?}",
            d.error
        );
        // A bit flip in a synced record, and the last batch torn too: the flipped line is
        // damage (it holds no zeros), so the whole is corruption at that record.
        let ends = decode(&bytes, Seq(1)).ends;
        let mut bad = bytes.clone();
        bad[ends[1] as usize + 20] ^= 0x04;
        let lost = batch_start.next_multiple_of(sector);
        bad[lost..lost + sector].fill(0);
        assert!(
            matches!(decode(&bad, Seq(1)).error, Some(DecodeError::Corrupt { offset, expected_seq: Seq(3), .. }) if offset == ends[1]),
            "{:?}",
            decode(&bad, Seq(1)).error
        );
        // The same flip in a record after the lost sector: also corruption.
        let mut bad = bytes.clone();
        bad[batch_start..batch_start.next_multiple_of(sector)].fill(0);
        let later = ends[ends.len() - 2] as usize;
        bad[later + 20] ^= 0x04;
        assert!(
            matches!(
                decode(&bad, Seq(1)).error,
                Some(DecodeError::Corrupt { .. })
            ),
            "{:?}",
            decode(&bad, Seq(1)).error
        );
        // Whole sectors of zeros, but more bad bytes behind them than one write can tear.
        // At offset 412: half a record up to the sector boundary at 512, the next sector
        // lost, then written bytes.
        let region = [vec![b'x'; 100], vec![0; 512], vec![b'x'; 600]].concat();
        assert!(torn_write_over_zeros(&region, 412, Seq(1), 4096).is_some());
        assert_eq!(torn_write_over_zeros(&region, 412, Seq(1), 1000), None);
        assert_eq!(
            torn_write_over_zeros(&region, 413, Seq(1), 4096),
            None,
            "the same bytes one off the grid"
        );
        assert_eq!(
            torn_write_over_zeros(&vec![b'x'; 600], 0, Seq(1), 4096),
            None,
            "a bad line without zeros (a bit flip) is corruption"
        );
    }

    #[test]
    fn zeroed_record_before_later_records_is_corruption() {
        let (_, mut bytes) = log(6);
        let ends = decode(&bytes, Seq(1)).ends;
        let (start, end) = (ends[2] as usize, ends[3] as usize); // record 4
        bytes[start..end].fill(0);
        bytes.resize(bytes.len() + 100, 0);
        let d = decode(&bytes, Seq(1));
        assert_eq!(d.records.len(), 3);
        assert!(
            matches!(d.error, Some(DecodeError::Corrupt { offset, expected_seq: Seq(4), .. }) if offset == start as u64),
            "{:?}",
            d.error
        );
    }

    #[test]
    fn bit_flip_in_middle_record_is_corruption_at_its_offset() {
        let (_, mut bytes) = log(10);
        let ends = decode(&bytes, Seq(1)).ends;
        let start = ends[4] as usize; // record 6 starts here
        bytes[start + 20] ^= 0x04;
        let d = decode(&bytes, Seq(1));
        assert_eq!(d.records.len(), 5);
        match d.error {
            Some(DecodeError::Corrupt {
                offset,
                expected_seq,
                ..
            }) => {
                assert_eq!(offset, start as u64);
                assert_eq!(expected_seq, Seq(6));
            }
            other => panic!("expected corruption, got {other:?}"),
        }
    }

    #[test]
    fn bad_last_complete_line_is_torn() {
        let (_, mut bytes) = log(3);
        let n = bytes.len();
        bytes[n - 5] ^= 0x01;
        let d = decode(&bytes, Seq(1));
        assert_eq!(d.records.len(), 2);
        assert!(matches!(d.error, Some(DecodeError::TornTail { .. })));
    }

    #[test]
    fn seq_gap_is_corruption() {
        let mut bytes = Vec::new();
        encode_into(&put(1, "a", "1"), &mut bytes);
        encode_into(&put(3, "b", "2"), &mut bytes);
        let d = decode(&bytes, Seq(1));
        assert_eq!(d.records.len(), 1);
        assert!(matches!(
            d.error,
            Some(DecodeError::Corrupt {
                expected_seq: Seq(2),
                ..
            })
        ));
        let d = decode(&bytes, Seq(5));
        assert!(matches!(
            d.error,
            Some(DecodeError::Corrupt {
                offset: 0,
                expected_seq: Seq(5),
                ..
            })
        ));
    }
}
