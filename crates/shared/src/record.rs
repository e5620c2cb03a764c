//! The replicated log entry and its on-disk line format.
//!
//! A [`Record`] is one write in the global order: the frontend assigns `seq` and stamps its
//! `epoch`; storage nodes append it to their WAL and apply it. The same struct travels over
//! tarpc (plain JSON) and is stored on disk as one line:
//!
//! ```text
//! {"crc":3141592653,"seq":7,"epoch":2,"client":"alice","op_no":12,"op":"put","key":"k","value":"v"}\n
//! ```
//!
//! - `crc` is CRC32C of the line *without* the `"crc":N,` member, that is of the bytes
//!   `{"seq":7,...}` exactly as [`encode`] produced them. Putting it first lets a reader
//!   verify a line without re-serialising it.
//! - A line counts only if it ends in `\n`, its checksum matches and it parses.
//! - `#[serde(tag = "op")]` keeps the operation greppable with `jq`.

use crate::json;
use crate::types::{Epoch, Seq, WriteOp};
use serde::Serialize;
use std::fmt;

/// The operation a record applies; the same shape a client asks for.
pub type Op = WriteOp;

/// One entry of the replicated log. `Deserialize` is hand-written in [`crate::tagged`]
/// (one pass, same JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Record {
    /// Global sequence number; the version of anything this record writes.
    pub seq: Seq,
    /// Epoch of the frontend that assigned `seq`.
    pub epoch: Epoch,
    /// Id of the client that issued the write.
    pub client: String,
    /// The client's operation number (exactly-once retries).
    pub op_no: u64,
    /// What to do.
    #[serde(flatten)]
    pub op: Op,
}

/// Prefix of every encoded line, before the checksum digits.
const CRC_PREFIX: &[u8] = b"{\"crc\":";

/// Why one line could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LineError {
    /// The line does not start with the checksum member or its number is malformed.
    MissingChecksum,
    /// The checksum does not match the content.
    ChecksumMismatch {
        /// Checksum stored in the line.
        stored: u32,
        /// Checksum computed over the content.
        computed: u32,
    },
    /// Checksum matched but the JSON does not describe a record.
    Malformed(String),
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LineError::MissingChecksum => f.write_str("line has no leading crc member"),
            LineError::ChecksumMismatch { stored, computed } => {
                write!(
                    f,
                    "checksum mismatch (stored {stored}, computed {computed})"
                )
            }
            LineError::Malformed(why) => write!(f, "malformed record: {why}"),
        }
    }
}

/// Encodes one record as a checksummed JSON line, newline included.
pub fn encode(record: &Record) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    encode_into(record, &mut out);
    out
}

/// Appends the encoding of `record` (newline included) to `out`.
///
/// Written by hand with [`crate::json`], byte for byte what `serde_json` writes for the
/// record (a test checks it for every operation), because it runs for every record on
/// every node: the body is written in place, its checksum computed over it, and the
/// `{"crc":N,` prefix put in front.
pub fn encode_into(record: &Record, out: &mut Vec<u8>) {
    // `{"crc":` plus ten digits and a comma, the longest the prefix can be.
    const PREFIX_MAX: usize = CRC_PREFIX.len() + 11;
    let start = out.len();
    out.resize(start + PREFIX_MAX - 1, 0);
    let body = out.len();
    write_body(record, out);
    let crc = crc32c::crc32c(&out[body..]);
    // The body's own `{` gives way to the prefix, which opens the object instead: the
    // prefix goes in front of the rest of the body, which then moves up to meet it.
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(crc).as_bytes();
    let prefix_end = start + CRC_PREFIX.len() + digits.len() + 1;
    out[start..start + CRC_PREFIX.len()].copy_from_slice(CRC_PREFIX);
    out[start + CRC_PREFIX.len()..prefix_end - 1].copy_from_slice(digits);
    out[prefix_end - 1] = b',';
    out.copy_within(body + 1.., prefix_end);
    out.truncate(out.len() - (body + 1 - prefix_end));
    out.push(b'\n');
}

/// Appends `record` as the JSON object `serde_json` makes of it.
fn write_body(record: &Record, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"seq\":");
    json::write_u64(out, record.seq.0);
    out.extend_from_slice(b",\"epoch\":");
    json::write_u64(out, record.epoch.0);
    out.extend_from_slice(b",\"client\":");
    json::write_str(out, &record.client);
    out.extend_from_slice(b",\"op_no\":");
    json::write_u64(out, record.op_no);
    match &record.op {
        Op::Put { key, value } => {
            out.extend_from_slice(b",\"op\":\"put\",\"key\":");
            json::write_str(out, key);
            out.extend_from_slice(b",\"value\":");
            json::write_str(out, value);
        }
        Op::Delete { key } => {
            out.extend_from_slice(b",\"op\":\"delete\",\"key\":");
            json::write_str(out, key);
        }
        Op::Cas {
            key,
            expected,
            value,
        } => {
            out.extend_from_slice(b",\"op\":\"cas\",\"key\":");
            json::write_str(out, key);
            out.extend_from_slice(b",\"expected\":");
            json::write_u64(out, expected.0);
            out.extend_from_slice(b",\"value\":");
            json::write_str(out, value);
        }
    }
    out.push(b'}');
}

/// Decodes one line (without its trailing newline) and verifies its checksum.
pub fn decode_line(line: &[u8]) -> Result<Record, LineError> {
    let rest = line
        .strip_prefix(CRC_PREFIX)
        .ok_or(LineError::MissingChecksum)?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 10 || rest.get(digits) != Some(&b',') {
        return Err(LineError::MissingChecksum);
    }
    let stored: u32 = std::str::from_utf8(&rest[..digits])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(LineError::MissingChecksum)?;
    let tail = &rest[digits + 1..];
    let computed = crc32c::crc32c_append(crc32c::crc32c(b"{"), tail);
    if stored != computed {
        return Err(LineError::ChecksumMismatch { stored, computed });
    }
    let mut body = Vec::with_capacity(tail.len() + 1);
    body.push(b'{');
    body.extend_from_slice(tail);
    serde_json::from_slice(&body).map_err(|e| LineError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(seq: u64) -> Record {
        Record {
            seq: Seq(seq),
            epoch: Epoch(3),
            client: "alice".into(),
            op_no: 9,
            op: Op::Cas {
                key: "k\"ey\n".into(),
                expected: Seq(4),
                value: "v ü".into(),
            },
        }
    }

    #[test]
    fn round_trip() {
        let r = sample(7);
        let line = encode(&r);
        assert_eq!(*line.last().unwrap(), b'\n');
        assert_eq!(
            line.iter().filter(|&&b| b == b'\n').count(),
            1,
            "escaped newline stays escaped"
        );
        assert_eq!(decode_line(&line[..line.len() - 1]).unwrap(), r);
    }

    #[test]
    fn line_is_plain_json_with_op_tag() {
        let line = encode(&sample(1));
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["op"], "cas");
        assert_eq!(v["seq"], 1);
        assert!(v["crc"].is_u64());
    }

    /// The line as `serde_json` builds it: the derived encoding with the checksum member
    /// put first. The hand-written encoder must match it byte for byte.
    fn serde_line(r: &Record) -> Vec<u8> {
        let body = serde_json::to_vec(r).unwrap();
        let mut line = format!("{{\"crc\":{},", crc32c::crc32c(&body)).into_bytes();
        line.extend_from_slice(&body[1..]);
        line.push(b'\n');
        line
    }

    #[test]
    fn the_line_is_what_serde_json_writes_for_every_op() {
        let texts = [
            "",
            "k",
            "plain value",
            "q\"uote\\back\u{1}\n\u{1f}",
            "ü€😀 text",
        ];
        let mut n = 0;
        for client in texts {
            for key in texts {
                for value in texts {
                    for op in [
                        Op::Put {
                            key: key.into(),
                            value: value.into(),
                        },
                        Op::Delete { key: key.into() },
                        Op::Cas {
                            key: key.into(),
                            expected: Seq(n * 31),
                            value: value.into(),
                        },
                    ] {
                        n += 1;
                        let r = Record {
                            seq: Seq(n),
                            epoch: Epoch(u64::MAX - n),
                            client: client.into(),
                            op_no: n * 7,
                            op,
                        };
                        let line = encode(&r);
                        assert_eq!(
                            String::from_utf8(line.clone()).unwrap(),
                            String::from_utf8(serde_line(&r)).unwrap()
                        );
                        assert_eq!(decode_line(&line[..line.len() - 1]), Ok(r));
                    }
                }
            }
        }
    }

    #[test]
    fn any_flipped_byte_is_detected() {
        let line = encode(&sample(2));
        let body = &line[..line.len() - 1];
        for i in 0..body.len() {
            let mut bad = body.to_vec();
            bad[i] ^= 0x01;
            assert!(
                decode_line(&bad).is_err(),
                "flip at byte {i} went unnoticed"
            );
        }
    }
}
