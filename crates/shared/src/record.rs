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
pub fn encode_into(record: &Record, out: &mut Vec<u8>) {
    // Serialising a struct of strings and integers into a Vec cannot fail.
    let body = serde_json::to_vec(record).expect("record serialises to JSON");
    let crc = crc32c::crc32c(&body);
    out.extend_from_slice(CRC_PREFIX);
    out.extend_from_slice(crc.to_string().as_bytes());
    out.push(b',');
    out.extend_from_slice(&body[1..]);
    out.push(b'\n');
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
