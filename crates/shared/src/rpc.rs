//! The three tarpc services.
//!
//! - [`Frontend`]: clients → frontend (`client_listen`, default 127.0.0.1:7000).
//! - [`Registry`]: storage nodes → frontend (`storage_listen`, default 127.0.0.1:7001):
//!   register and heartbeat.
//! - [`Storage`]: frontend → storage node (`--listen`): replication, reads, catch-up.
//!
//! Every `Registry` and `Storage` call carries the cluster token; a node refuses
//! replication from anyone without it, and from an epoch older than the highest it has seen.

use crate::error::KvError;
use crate::record::Record;
use crate::types::*;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, OnceLock};

/// Client → frontend.
#[tarpc::service]
pub trait Frontend {
    /// Liveness check; returns the frontend's epoch.
    async fn ping() -> Epoch;
    /// Linearizable read of one key.
    async fn get(client: String, key: String) -> Result<Versioned, KvError>;
    /// A put / delete / cas; at most once per `(client, op_no)`.
    async fn write(req: WriteRequest) -> Result<WriteResult, KvError>;
    /// Linearizable scan of keys starting with `prefix`, in key order, at most `limit`.
    async fn scan(client: String, prefix: String, limit: u32) -> Result<Vec<KeyValue>, KvError>;
    /// Cluster status.
    async fn status() -> ClusterStatus;
    /// Long-poll watch: committed changes of keys starting with `prefix`, in commit order,
    /// with `version >= from`, at most `max`. Waits up to `wait_ms` for a first change; an
    /// empty answer is not an error. Resume with the answer's `next`.
    async fn watch(
        prefix: String,
        from: Seq,
        max: u32,
        wait_ms: u32,
    ) -> Result<WatchBatch, KvError>;
    /// Retires a node for good: it leaves the in-sync set and status, and may not register again.
    async fn remove_node(id: NodeId) -> Result<(), KvError>;
}

/// Storage → frontend: a node announces itself after recovery, then heartbeats.
#[tarpc::service]
pub trait Registry {
    /// Registers (or re-registers) a node. Refused with `Unauthorized` for a wrong token,
    /// a removed id, or an id that is live in another process.
    async fn register(req: RegisterRequest) -> Result<RegisterReply, KvError>;
    /// Periodic liveness signal.
    async fn heartbeat(req: HeartbeatRequest) -> Result<HeartbeatReply, KvError>;
}

/// Frontend → storage node.
#[tarpc::service]
pub trait Storage {
    /// Who this process is and where its log ends. Used to tell a live duplicate id from
    /// a restarted node.
    async fn identity(token: String) -> Result<NodeIdentity, KvError>;
    /// Appends records (WAL write + fsync + apply) and returns each record's outcome.
    /// Records at or below the node's last seq are skipped; a gap is refused.
    async fn append(token: String, req: AppendRequest) -> Result<Vec<Outcome>, KvError>;
    /// Reads a key once the node has applied at least `min_seq`.
    async fn read(token: String, key: String, min_seq: Seq) -> Result<ReadReply, KvError>;
    /// Reads several keys at one state, once the node has applied at least `min_seq`. The
    /// answer is a non-empty prefix of `keys`, in order: it stops early once its values
    /// pass [`READ_MANY_MAX_BYTES`], and the caller asks again for the rest.
    async fn read_many(
        token: String,
        keys: Vec<String>,
        min_seq: Seq,
    ) -> Result<Vec<ReadReply>, KvError>;
    /// Scans a prefix once the node has applied at least `min_seq`.
    async fn scan(
        token: String,
        prefix: String,
        limit: u32,
        min_seq: Seq,
    ) -> Result<ScanReply, KvError>;
    /// Drops every record after `after` (a divergent tail) and returns the new log end.
    /// Handled in order with appends, after fencing at `epoch`; with `after` at or past
    /// the log end it cuts nothing and is the frontend's fence (`Pool::fence`).
    async fn truncate(token: String, epoch: Epoch, after: Seq) -> Result<LogPosition, KvError>;
    /// Up to `max` records starting at `from`, or `SnapshotNeeded` when they were compacted.
    async fn fetch(token: String, from: Seq, max: u32) -> Result<FetchReply, KvError>;
    /// One page of the node's snapshot at `snapshot_seq`: first its exactly-once table,
    /// then its keys after `after_key`, each page under [`SNAPSHOT_PAGE_MAX_BYTES`] (plus
    /// one entry). While `after_key` is `None`, the page starts with the table's entries
    /// after `after_client`; a page that carries entries but no keys and is not `done`
    /// stopped inside the table: ask again with its last client id as `after_client`.
    /// (`after_client` comes last and may be absent: a caller that never sends it gets the
    /// table on the first page, as before, as long as it fits.)
    async fn snapshot_page(
        token: String,
        snapshot_seq: Seq,
        after_key: Option<String>,
        max: u32,
        after_client: Option<String>,
    ) -> Result<SnapshotPage, KvError>;
    /// Receives one chunk of a snapshot; the last chunk replaces the node's state and log.
    async fn install_snapshot(
        token: String,
        epoch: Epoch,
        chunk: SnapshotChunk,
    ) -> Result<LogPosition, KvError>;
    /// A digest of the node's logical content, to check convergence.
    async fn digest(token: String) -> Result<Digest, KvError>;
}

/// A node's registration.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RegisterRequest {
    /// Cluster token from config.
    pub token: String,
    /// Node id.
    pub id: NodeId,
    /// Address the frontend should dial (`--advertise`, default `--listen`).
    pub addr: String,
    /// Random number chosen at process start: tells a restart from a duplicate.
    pub instance: u64,
    /// Where the node's log ends after recovery.
    pub pos: LogPosition,
    /// Seq covered by the node's newest snapshot.
    pub snapshot_seq: Seq,
    /// The highest epoch persisted in the node's data dir (its `epoch` file, or its last
    /// record's epoch if higher). `Some(Epoch(0))`: the node started on an empty data dir,
    /// or its log was cut at a corrupt record and no frontend has fenced it since (it then
    /// disowns the epoch it persisted). A frontend fences a node before it counts it as in
    /// sync, which persists its epoch, so an in-sync node reporting 0 has lost data and
    /// cannot vouch for acknowledged writes. `None` (absent on the wire): a storage binary that predates
    /// this field; the frontend then cannot tell, and trusts it as before.
    #[serde(default)]
    pub highest_epoch: Option<Epoch>,
}

/// The frontend's answer to a registration.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RegisterReply {
    /// Session number to quote in heartbeats.
    pub session: u64,
    /// The frontend's epoch.
    pub epoch: Epoch,
}

/// A heartbeat.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HeartbeatRequest {
    /// Cluster token.
    pub token: String,
    /// Node id.
    pub id: NodeId,
    /// Session from [`RegisterReply`].
    pub session: u64,
    /// Last seq the node has applied.
    pub applied: Seq,
}

/// The frontend's answer to a heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HeartbeatReply {
    /// The session is current.
    Ok,
    /// The frontend no longer knows this session (it restarted, or removed the node from
    /// the in-sync set): register again.
    Reregister,
}

/// A storage process's identity.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeIdentity {
    /// Node id.
    pub id: NodeId,
    /// Per-process random number.
    pub instance: u64,
    /// Where the log ends.
    pub pos: LogPosition,
}

/// Bytes of keys and values, as JSON (escaping included), that a `read_many` answer stops
/// before; it always answers at least one key, which a node's frame limit holds.
pub const READ_MANY_MAX_BYTES: usize = 2 << 20;

/// Bytes of items, as JSON (escaping included), that a `snapshot_page` answer stops
/// before; it always carries at least one item, which a node's frame limit holds. The
/// catch-up sends each page on as one `install_snapshot` chunk, so the bound holds there too.
pub const SNAPSHOT_PAGE_MAX_BYTES: usize = 2 << 20;

/// Most bytes JSON takes per byte of a string: a control character is written `\u00XX`.
pub const JSON_ESCAPE_MAX: usize = 6;

/// Room an append record takes besides its key, value and client id as JSON strings: field
/// names, `seq`, `epoch`, `op_no` and a CAS's `expected` at their longest.
pub const RECORD_FIELDS_BYTES: usize = 192;

/// Bytes (as the append frame carries them, see [`append_bytes`]) after which the frontend
/// closes a write batch even below `batch_max`. A batch is at most this plus one write, so
/// an append frame stays under a storage node's `max_frame_bytes`, which the node checks at
/// start against this bound and its largest key and value, escaped.
pub const BATCH_MAX_BYTES: usize = 1 << 20;

/// The length of `s` as a JSON string, quotes included, exactly as serde_json writes it:
/// `"` and `\` take two bytes, a control character two (`\n`, `\t`, ...) or six
/// (`\u0001`), every other byte one (non-ASCII text is written as it is).
pub use crate::json::str_len as json_str_len;

/// Bytes a write adds to an append frame: its key, value and client id as JSON strings
/// plus [`RECORD_FIELDS_BYTES`]. The measure behind [`BATCH_MAX_BYTES`].
pub fn append_bytes(client: &str, op: &WriteOp) -> usize {
    let value = match op {
        WriteOp::Put { value, .. } | WriteOp::Cas { value, .. } => json_str_len(value),
        WriteOp::Delete { .. } => 0,
    };
    RECORD_FIELDS_BYTES + json_str_len(client) + json_str_len(op.key()) + value
}

/// A client's default `max_frame_bytes`, for what it sends and receives. The frontend's
/// client frame limit is never below it, so every request a client with the default
/// sends reaches the frontend and is answered (with `TooLarge` when over a limit) instead
/// of closing the connection; a larger request is refused by the client before sending.
pub const CLIENT_MAX_FRAME_DEFAULT: usize = 16 << 20;

/// Room a client request frame takes besides its strings: tarpc's envelope (request id,
/// deadline, trace context, method name) and the write's own fields at their longest.
pub const REQUEST_ENVELOPE_BYTES: usize = 512;

/// An upper bound on the frame of a client request carrying `strings` (the client id, key,
/// value or prefix), as JSON: their escaped lengths plus [`REQUEST_ENVELOPE_BYTES`].
pub fn request_frame_bytes(strings: &[&str]) -> usize {
    REQUEST_ENVELOPE_BYTES + strings.iter().map(|s| json_str_len(s)).sum::<usize>()
}

/// Bytes of keys and values, as JSON (escaping included), above which a node answers a
/// scan of more than one key with `TooLarge` instead of a frame it could not send (one key
/// always fits: a node's frame limit holds one maximal value escaped). Scans have no
/// continuation, so a shorter answer would read as the end of the range.
pub const SCAN_MAX_BYTES: usize = 2 << 20;

/// A batch of records to append.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AppendRequest {
    /// The sender's epoch; refused when lower than the highest the node has seen.
    pub epoch: Epoch,
    /// The frontend's commit index, so the node can forget delete tombstones below it.
    pub commit_seq: Seq,
    /// Consecutive records.
    pub records: RecordBatch,
}

/// Records of one append, shared by every node it is sent to and serialised at most once.
///
/// The sequencer sends the same batch to each in-sync node; cloning this is two reference
/// counts, and the first transport to send it caches its JSON, which the others copy
/// verbatim. On the wire it is exactly a JSON array of records.
#[derive(Clone)]
pub struct RecordBatch(Arc<SharedRecords>);

struct SharedRecords {
    records: Vec<Record>,
    json: OnceLock<Box<serde_json::value::RawValue>>,
}

impl RecordBatch {
    /// The records, owned: free when this is the only handle (as on a receiving node).
    pub fn into_vec(self) -> Vec<Record> {
        match Arc::try_unwrap(self.0) {
            Ok(shared) => shared.records,
            Err(shared) => shared.records.clone(),
        }
    }
}

impl From<Vec<Record>> for RecordBatch {
    fn from(records: Vec<Record>) -> Self {
        RecordBatch(Arc::new(SharedRecords {
            records,
            json: OnceLock::new(),
        }))
    }
}

impl std::ops::Deref for RecordBatch {
    type Target = [Record];
    fn deref(&self) -> &[Record] {
        &self.0.records
    }
}

impl std::fmt::Debug for RecordBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.records.fmt(f)
    }
}

impl PartialEq for RecordBatch {
    fn eq(&self, other: &Self) -> bool {
        self.0.records == other.0.records
    }
}

impl Serialize for RecordBatch {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let json = match self.0.json.get() {
            Some(json) => json,
            None => {
                let json = serde_json::value::to_raw_value(&self.0.records)
                    .map_err(serde::ser::Error::custom)?;
                self.0.json.get_or_init(|| json)
            }
        };
        json.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for RecordBatch {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Vec::<Record>::deserialize(deserializer).map(RecordBatch::from)
    }
}

/// The answer to a read.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReadReply {
    /// The value, if the key exists.
    pub value: Option<Versioned>,
    /// Seq of the newest record that touched the key as far as the node knows (the
    /// value's version, or a delete's seq, or 0). The frontend answers only once this is
    /// committed, so a read never exposes an uncommitted write or delete.
    pub last_touch: Seq,
}

/// The answer to a scan.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ScanReply {
    /// Matching keys in order.
    pub items: Vec<KeyValue>,
    /// The node's applied seq when it scanned; the frontend waits for it to commit.
    pub applied: Seq,
}

/// Records for catch-up, or the news that they were compacted into a snapshot.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum FetchReply {
    /// Consecutive records starting at the requested seq (empty when there are none).
    Records(Vec<Record>),
    /// The requested seq is covered by the snapshot at `snapshot_seq`; transfer it first.
    SnapshotNeeded {
        /// Seq the snapshot covers.
        snapshot_seq: Seq,
        /// Number of keys in it.
        keys: u64,
    },
}

/// One entry of the exactly-once table: the last op applied for a client and its outcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientEntry {
    /// Client id.
    pub client: String,
    /// Last op number applied.
    pub op_no: u64,
    /// Its outcome, returned again for a retry.
    pub outcome: Outcome,
}

/// A page read from a snapshot.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotPage {
    /// Seq the snapshot covers.
    pub seq: Seq,
    /// Epoch of the record at `seq`.
    pub epoch: Epoch,
    /// Keys in order.
    pub items: Vec<KeyValue>,
    /// Entries of the exactly-once table, in client order, only on pages asked for with
    /// `after_key == None` (see `Storage::snapshot_page`).
    pub clients: Vec<ClientEntry>,
    /// No keys after this page.
    pub done: bool,
}

/// A chunk of a snapshot being installed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotChunk {
    /// Seq the snapshot covers.
    pub seq: Seq,
    /// Epoch of the record at `seq`.
    pub epoch: Epoch,
    /// First chunk: discard any partial install.
    pub first: bool,
    /// Last chunk: persist and switch over.
    pub last: bool,
    /// Keys.
    pub items: Vec<KeyValue>,
    /// Exactly-once entries.
    pub clients: Vec<ClientEntry>,
}

/// A summary of a node's logical content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digest {
    /// Where the log ends.
    pub pos: LogPosition,
    /// Number of keys.
    pub keys: u64,
    /// Hash over every (key, value, version) in key order and the exactly-once table.
    pub hash: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_bytes_bounds_a_record_as_the_append_frame_carries_it() {
        let worst = "\u{1}".repeat(1000);
        for op in [
            WriteOp::Put {
                key: worst.clone(),
                value: worst.clone(),
            },
            WriteOp::Cas {
                key: worst.clone(),
                value: worst.clone(),
                expected: Seq(u64::MAX),
            },
            WriteOp::Delete { key: worst.clone() },
        ] {
            let r = Record {
                seq: Seq(u64::MAX),
                epoch: Epoch(u64::MAX),
                client: worst.clone(),
                op_no: u64::MAX,
                op: op.clone(),
            };
            let written = serde_json::to_vec(&r).unwrap().len();
            let counted = append_bytes(&r.client, &op);
            // Never less than what is written; the slack is only the field allowance.
            assert!(
                written <= counted && counted - written < RECORD_FIELDS_BYTES,
                "{written} vs {counted}"
            );
        }
    }

    /// The bound must hold for the frame tarpc really sends: the request envelope with a
    /// full trace context, the largest ids, and every write kind and read.
    #[test]
    fn request_frame_bytes_bounds_the_client_frame() {
        let worst = "\u{1}".repeat(1000);
        let client = "c\"".repeat(300);
        let frame = |message: FrontendRequest| {
            let mut context = tarpc::context::current();
            context.trace_context.trace_id = tarpc::trace::TraceId::from(u128::MAX);
            context.trace_context.span_id = tarpc::trace::SpanId::from(u64::MAX);
            let request = tarpc::ClientMessage::Request(tarpc::Request {
                context,
                id: u64::MAX,
                message,
            });
            serde_json::to_vec(&request).unwrap().len()
        };
        let write = |op: WriteOp| FrontendRequest::Write {
            req: WriteRequest {
                client: client.clone(),
                op_no: u64::MAX,
                op,
            },
        };
        let cases = [
            (
                write(WriteOp::Cas {
                    key: worst.clone(),
                    value: worst.clone(),
                    expected: Seq(u64::MAX),
                }),
                request_frame_bytes(&[&client, &worst, &worst]),
            ),
            (
                write(WriteOp::Delete { key: worst.clone() }),
                request_frame_bytes(&[&client, &worst]),
            ),
            (
                FrontendRequest::Scan {
                    client: client.clone(),
                    prefix: worst.clone(),
                    limit: u32::MAX,
                },
                request_frame_bytes(&[&client, &worst]),
            ),
        ];
        for (message, counted) in cases {
            let written = frame(message);
            assert!(written <= counted, "{written} vs {counted}");
        }
    }

    fn records() -> Vec<Record> {
        (1..=3)
            .map(|i| Record {
                seq: Seq(i),
                epoch: Epoch(2),
                client: format!("c\"{i}"),
                op_no: i,
                op: WriteOp::Put {
                    key: format!("k{i} ü"),
                    value: "v\n\t".repeat(i as usize),
                },
            })
            .collect()
    }

    /// A shared batch is, on the wire, exactly the array of its records, however many
    /// times (and from however many handles) it is sent; and it decodes back.
    #[test]
    fn record_batch_serialises_once_as_a_plain_array() {
        let plain = serde_json::to_vec(&records()).unwrap();
        let batch = RecordBatch::from(records());
        let copy = batch.clone();
        assert_eq!(serde_json::to_vec(&batch).unwrap(), plain);
        assert!(
            copy.0.json.get().is_some(),
            "the clone sees the cached JSON"
        );
        assert_eq!(serde_json::to_vec(&copy).unwrap(), plain);
        let back: RecordBatch = serde_json::from_slice(&plain).unwrap();
        assert_eq!(back, batch);
        assert_eq!(back.into_vec(), records());
        drop(batch);
        assert_eq!(copy.into_vec(), records(), "last handle gives its records");
    }

    /// A registration from a storage binary without `highest_epoch` still decodes (as
    /// `None`, "cannot tell"), and the field round-trips when present.
    #[test]
    fn registration_without_highest_epoch_still_decodes() {
        let old = r#"{"token":"t","id":"a","addr":"127.0.0.1:1","instance":7,
            "pos":{"epoch":3,"seq":9},"snapshot_seq":0}"#;
        let req: RegisterRequest = serde_json::from_str(old).unwrap();
        assert_eq!(req.highest_epoch, None);
        let new = RegisterRequest {
            highest_epoch: Some(Epoch(0)),
            ..req
        };
        let back: RegisterRequest =
            serde_json::from_str(&serde_json::to_string(&new).unwrap()).unwrap();
        assert_eq!(back.highest_epoch, Some(Epoch(0)));
    }
}
