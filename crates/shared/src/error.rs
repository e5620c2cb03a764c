//! `KvError`: the one error type that crosses tarpc.
//!
//! Variants say what the caller should do. `Unavailable` and `Timeout` are retryable
//! (`is_retryable`); a write that ended in `Timeout` has an **unknown outcome**: it may or
//! may not have committed, and a retry with the same `(client, op_no)` is how a client
//! learns which, because the frontend applies it at most once.

use crate::types::Seq;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Every error a walkv RPC can return.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvError {
    /// No in-sync storage node, fewer than `min_insync`, or the frontend is recovering.
    /// Nothing was written; retry later.
    Unavailable(String),
    /// The deadline passed; for a write the outcome is unknown. Retry with the same op no.
    Timeout(String),
    /// The key does not exist.
    NotFound,
    /// A cas whose expected version did not match; `current` is 0 when the key is absent.
    VersionMismatch {
        /// The key's current version.
        current: Seq,
    },
    /// A key, value or frame exceeds its limit.
    TooLarge {
        /// What was too large (`key`, `value`, ...).
        what: String,
        /// The limit in bytes.
        limit: u64,
    },
    /// The key is empty or otherwise unusable.
    InvalidKey(String),
    /// A request that is malformed or not allowed in the current state.
    InvalidInput(String),
    /// Wrong or missing cluster token, or a refused registration (duplicate or removed id).
    Unauthorized(String),
    /// A replication request from an epoch older than one the node has seen.
    Fenced {
        /// The highest epoch the node has seen.
        seen: u64,
    },
    /// A storage node received records that do not continue its log.
    Gap {
        /// The seq the node expected next.
        expected: Seq,
    },
    /// A disk error on a storage node; the node stops taking writes.
    Io(String),
    /// A broken invariant or an unexpected failure.
    Internal(String),
    /// Watch history from `from` is gone (compacted into a snapshot at `snapshot_seq`);
    /// resume from `current` (the commit index) and read the state with a scan.
    Compacted {
        /// The version asked for.
        from: Seq,
        /// The snapshot that covers it.
        snapshot_seq: Seq,
        /// The commit index to resume from.
        current: Seq,
    },
}

impl KvError {
    /// Whether retrying the same request later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, KvError::Unavailable(_) | KvError::Timeout(_))
    }

    /// A short stable code for logs, JSON output and exit-code mapping.
    pub fn code(&self) -> &'static str {
        match self {
            KvError::Unavailable(_) => "unavailable",
            KvError::Timeout(_) => "timeout",
            KvError::NotFound => "not_found",
            KvError::VersionMismatch { .. } => "version_mismatch",
            KvError::TooLarge { .. } => "too_large",
            KvError::InvalidKey(_) => "invalid_key",
            KvError::InvalidInput(_) => "invalid_input",
            KvError::Unauthorized(_) => "unauthorized",
            KvError::Fenced { .. } => "fenced",
            KvError::Gap { .. } => "gap",
            KvError::Io(_) => "io",
            KvError::Internal(_) => "internal",
            KvError::Compacted { .. } => "compacted",
        }
    }
}

impl fmt::Display for KvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvError::Unavailable(why) => write!(f, "unavailable: {why}"),
            KvError::Timeout(why) => write!(f, "timeout (outcome unknown): {why}"),
            KvError::NotFound => f.write_str("not found"),
            KvError::VersionMismatch { current } => {
                write!(f, "version mismatch: current version is {current}")
            }
            KvError::TooLarge { what, limit } => {
                write!(f, "{what} too large: limit is {limit} bytes")
            }
            KvError::InvalidKey(why) => write!(f, "invalid key: {why}"),
            KvError::InvalidInput(why) => write!(f, "invalid input: {why}"),
            KvError::Unauthorized(why) => write!(f, "unauthorized: {why}"),
            KvError::Fenced { seen } => write!(f, "fenced: node has seen epoch {seen}"),
            KvError::Gap { expected } => write!(f, "log gap: node expected seq {expected} next"),
            KvError::Io(why) => write!(f, "disk error: {why}"),
            KvError::Internal(why) => write!(f, "internal error: {why}"),
            KvError::Compacted {
                from,
                snapshot_seq,
                current,
            } => write!(
                f,
                "history from version {from} was compacted into a snapshot at seq {snapshot_seq}; \
                 resume the watch from the current version {current} (scan to read the state)"
            ),
        }
    }
}

impl std::error::Error for KvError {}

impl From<tarpc::client::RpcError> for KvError {
    /// The one mapping of transport failures: a lost connection or deadline means the
    /// peer is unreachable, and for a write the outcome is unknown.
    fn from(e: tarpc::client::RpcError) -> Self {
        use tarpc::client::RpcError;
        match e {
            RpcError::DeadlineExceeded => KvError::Timeout("deadline exceeded".into()),
            RpcError::Shutdown => KvError::Unavailable("connection closed".into()),
            other => KvError::Unavailable(format!("rpc failed: {other}")),
        }
    }
}
