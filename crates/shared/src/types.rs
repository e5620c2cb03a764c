//! Newtypes and plain data that cross the wire.
//!
//! Everything stored on disk or sent over the wire uses explicitly sized integers.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A global sequence number: the position of a record in the replicated log, and the
/// version of the value it wrote. Seq 0 means "nothing": the first record is seq 1.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Seq(pub u64);

impl Seq {
    /// The seq that follows this one.
    pub fn next(self) -> Seq {
        Seq(self.0 + 1)
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A frontend incarnation. Bumped and persisted every time a frontend starts or
/// recovers; storage nodes refuse replication from an epoch lower than the highest seen.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The name of a storage node (`--id`). Stable across restarts: it is how the frontend
/// knows that a registering node was in the in-sync set.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub String);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The position of the last record in a log: `(epoch of that record, its seq)`.
/// `LogPosition::default()` is the empty log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LogPosition {
    /// Epoch of the last record (0 for an empty log).
    pub epoch: Epoch,
    /// Seq of the last record (0 for an empty log).
    pub seq: Seq,
}

/// A stored value with the seq that wrote it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Versioned {
    /// The value bytes, as UTF-8 text.
    pub value: String,
    /// The seq of the write that produced this value.
    pub version: Seq,
}

/// One key with its value, as returned by scans and snapshot pages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value.
    pub value: String,
    /// The seq of the write that produced this value.
    pub version: Seq,
}

/// What a client asks to write. The frontend turns it into an [`crate::Op`] inside a
/// [`crate::Record`]; storage nodes evaluate the condition (cas, delete of a missing key)
/// deterministically while applying, so every replica reaches the same outcome.
///
/// `Deserialize` is hand-written in [`crate::tagged`] (one pass, same JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum WriteOp {
    /// Set `key` to `value`.
    Put {
        /// Key.
        key: String,
        /// Value.
        value: String,
    },
    /// Remove `key`; `NotFound` when it does not exist.
    Delete {
        /// Key.
        key: String,
    },
    /// Set `key` to `value` only if its current version is `expected` (0 = must not exist).
    Cas {
        /// Key.
        key: String,
        /// Expected current version; `Seq(0)` means the key must be absent.
        expected: Seq,
        /// New value.
        value: String,
    },
}

impl WriteOp {
    /// The key this operation touches.
    pub fn key(&self) -> &str {
        match self {
            WriteOp::Put { key, .. } | WriteOp::Delete { key } | WriteOp::Cas { key, .. } => key,
        }
    }
}

/// A client's write: the operation plus the `(client, op_no)` pair that makes retries
/// exactly-once. Op numbers of one client id must increase and its writes must be issued
/// one at a time; a retry reuses the same op number.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteRequest {
    /// The client's id (`--id`).
    pub client: String,
    /// The client's operation number.
    pub op_no: u64,
    /// What to write.
    pub op: WriteOp,
}

/// The deterministic result of applying one record on a storage node. Every replica
/// computes the same outcome for the same log, so any in-sync node's answer is the answer.
///
/// `Deserialize` is hand-written in [`crate::tagged`] (one pass, same JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// The write took effect at `version`.
    Written {
        /// The seq it committed at.
        version: Seq,
    },
    /// Delete of a key that does not exist (consumes a seq, changes nothing).
    NotFound,
    /// A cas whose expected version did not match; `current` is 0 when the key is absent.
    VersionMismatch {
        /// The key's current version.
        current: Seq,
    },
    /// The `(client, op_no)` was older than the last one applied for that client, so its
    /// outcome is no longer known; nothing was changed.
    StaleOp {
        /// The last op number applied for this client.
        last_op_no: u64,
    },
}

/// A successful write as the client sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteResult {
    /// The seq (version) the write committed at.
    pub version: Seq,
}

/// Role of a storage node in `status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeRole {
    /// In the in-sync set: holds every committed record and serves reads.
    InSync,
    /// Registered and receiving missing records; never serves reads.
    CatchingUp,
    /// Not registered, failed, or not heard from within the failure timeout.
    Down,
}

impl fmt::Display for NodeRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeRole::InSync => "in_sync",
            NodeRole::CatchingUp => "catching_up",
            NodeRole::Down => "down",
        })
    }
}

/// Catch-up progress of one node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CatchUpProgress {
    /// Records (or snapshot items) transferred so far.
    pub done: u64,
    /// Records (or snapshot items) to transfer in total, as estimated at the start.
    pub total: u64,
    /// Current transfer rate, per second.
    pub rate_per_sec: f64,
    /// Estimated seconds left.
    pub eta_secs: f64,
    /// `"snapshot"` or `"log"`.
    pub phase: String,
}

/// One storage node in `status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Node id.
    pub id: NodeId,
    /// Advertised address.
    pub addr: String,
    /// Role.
    pub role: NodeRole,
    /// Last seq the node is known to have applied.
    pub applied_seq: Seq,
    /// `commit_seq - applied_seq`, saturating.
    pub lag: u64,
    /// Milliseconds since the last heartbeat, if one was ever received.
    pub last_heartbeat_ms: Option<u64>,
    /// Catch-up progress while catching up.
    pub catch_up: Option<CatchUpProgress>,
}

/// The cluster as the frontend sees it (`client status`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The frontend's epoch.
    pub epoch: Epoch,
    /// Highest committed seq.
    pub commit_seq: Seq,
    /// `serving`, or `recovering: <why>` when the frontend refuses service.
    pub state: String,
    /// Whether reads and writes are currently served.
    pub available: bool,
    /// Configured minimum in-sync set size.
    pub min_insync: u32,
    /// Every known node, sorted by id.
    pub nodes: Vec<NodeStatus>,
}

/// What a committed change did to its key (watch feeds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeOp {
    /// The key was set (a put, or a cas that matched).
    Put,
    /// The key was removed.
    Delete,
}

/// One committed change, as watchers see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// The key.
    pub key: String,
    /// The new value; `None` for a delete.
    pub value: Option<String>,
    /// The seq the change committed at.
    pub version: Seq,
    /// Put or delete.
    pub op: ChangeOp,
}

/// One answer of the `watch` long-poll.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchBatch {
    /// Matching changes in commit order, all with `version >= from`.
    pub changes: Vec<Change>,
    /// The version to ask from next: every change below it has been delivered.
    pub next: Seq,
    /// The commit index when the answer was made.
    pub commit_seq: Seq,
}
