//! The in-memory state machine: what the WAL means.
//!
//! [`Store::apply`] is the one function that turns a [`Record`] into state. Recovery
//! (snapshot + WAL replay) and live appends both call it, so a node that restarts reaches
//! exactly the state it had, and every replica computes the same [`Outcome`] for the same
//! log (see docs/DESIGN.md, "Records and state machine").
//!
//! # Representation
//!
//! The key map, the exactly-once table and the tombstones are persistent ordered maps
//! (`imbl::OrdMap`: a B+tree whose nodes are reference counted). Cloning one is O(1): the
//! clone shares every node, and a later write copies only the nodes on its own path. So
//! [`Store::snapshot_data`] costs the writer three reference counts, whatever the number
//! of keys, and the snapshot thread serialises that frozen view while writes go on.
//! Values are [`Text`] (`Arc<str>`): no spare capacity, and a copied node or a tail record
//! clones them by bumping a count instead of copying the bytes. Keys and client ids are
//! [`Key`]s, inline up to 24 bytes: the maps compare keys on every lookup, and an inline
//! key is compared in the node already loaded rather than behind a pointer.
//!
//! Invariants:
//! - `pos.seq` is the seq of the last applied record; `apply` asserts that each record is
//!   exactly `pos.seq + 1` (the WAL checks this too, before writing and after reading).
//! - A [`SnapshotData`] from `snapshot_data` is the state after exactly its `pos` and never
//!   changes afterwards: later writes copy the nodes they touch instead of mutating shared
//!   ones.
//! - `tail` holds every record after `snapshot_pos.seq`, in order, with the outcome it had,
//!   so `fetch` can serve catch-up without touching disk; older records answer
//!   `SnapshotNeeded`. Its strings are shared with the maps, not copied.
//! - The exactly-once table `clients` is part of the state (and of snapshots and digests).
//! - Tombstones remember the seq of a key's last delete so a read can report `last_touch`;
//!   they are dropped once the frontend's commit index passes them.
//!
//! No IO happens here.

use imbl::OrdMap;
use std::collections::VecDeque;
use std::sync::Arc;
use walkv_shared::rpc::{
    json_str_len, ClientEntry, Digest, FetchReply, ReadReply, READ_MANY_MAX_BYTES, SCAN_MAX_BYTES,
};
use walkv_shared::types::{KeyValue, LogPosition, Outcome, Versioned, WriteOp};
use walkv_shared::{Epoch, KvError, Record, Seq};

/// Most bytes of client ids, keys and values, as JSON (escaping included), one `fetch`
/// page carries; a record that does not fit goes alone. So a page stays below a storage
/// node's frame limit, which holds one maximal record escaped (checked at start).
pub const FETCH_MAX_BYTES: usize = 2 << 20;

/// Client id, key and value bytes of a record as JSON: the measure behind
/// [`FETCH_MAX_BYTES`].
pub fn record_bytes(r: &Record) -> usize {
    use walkv_shared::Op;
    json_str_len(&r.client)
        + match &r.op {
            Op::Put { key, value } | Op::Cas { key, value, .. } => {
                json_str_len(key) + json_str_len(value)
            }
            Op::Delete { key } => json_str_len(key),
        }
}

/// Keys per window of [`KeyMapBuilder`]: enough that the one half-full leaf per window
/// does not matter, small enough to stay in cache.
const BUILD_WINDOW: usize = 1024;

/// An immutable, shared string: a stored value.
pub type Text = Arc<str>;

/// A key or client id: what the maps compare. Up to 24 bytes it is stored inline, in the
/// B-tree node itself, so a lookup's comparisons read the node it already loaded instead of
/// following a pointer per comparison (on a busy machine, a cache miss each); longer ones
/// live on the heap.
pub type Key = compact_str::CompactString;

/// Every key with its value and the seq of the write that produced it, in key order.
pub type KeyMap = OrdMap<Key, (Text, Seq)>;

/// The exactly-once table: client id to its last op number and that op's outcome.
pub type ClientMap = OrdMap<Key, (u64, Outcome)>;

/// Delete tombstones not yet known to be committed: key to the seq of the delete.
pub type TombstoneMap = OrdMap<Key, Seq>;

/// The whole state at one log position, as written to and read from a snapshot. Its maps
/// share structure with the store it was taken from, so it is cheap to take and to clone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotData {
    /// The last record the snapshot covers.
    pub pos: LogPosition,
    /// Every key, in key order.
    pub items: KeyMap,
    /// The exactly-once table.
    pub clients: ClientMap,
    /// Delete tombstones not yet known to be committed.
    pub tombstones: TombstoneMap,
}

impl SnapshotData {
    /// Adds one key (snapshot loading and `install_snapshot`).
    pub fn insert_item(&mut self, key: &str, value: &str, version: Seq) {
        self.items.insert(key.into(), (value.into(), version));
    }

    /// Adds one entry of the exactly-once table.
    pub fn insert_client(&mut self, c: ClientEntry) {
        self.clients
            .insert(c.client.as_str().into(), (c.op_no, c.outcome));
    }

    /// The exactly-once table as sent over the wire, in client order.
    pub fn client_entries(&self) -> impl Iterator<Item = ClientEntry> + '_ {
        self.clients
            .iter()
            .map(|(c, (op_no, outcome))| ClientEntry {
                client: c.to_string(),
                op_no: *op_no,
                outcome: outcome.clone(),
            })
    }
}

/// A record as the tail keeps it. Its values are the ones the map holds, shared rather than
/// copied, and its keys are inline copies (heap copies beyond 24 bytes), so the records
/// since the newest snapshot cost little more than their fixed-size fields.
#[derive(Clone, Debug)]
struct Applied {
    seq: Seq,
    epoch: Epoch,
    client: Key,
    op_no: u64,
    op: AppliedOp,
    outcome: Outcome,
}

/// [`WriteOp`] with shared strings.
#[derive(Clone, Debug)]
enum AppliedOp {
    Put {
        key: Key,
        value: Text,
    },
    Delete {
        key: Key,
    },
    Cas {
        key: Key,
        expected: Seq,
        value: Text,
    },
}

impl AppliedOp {
    /// `op` with strings of its own: for records that change no state (retries, stale ops).
    fn copied(op: &WriteOp) -> AppliedOp {
        match op {
            WriteOp::Put { key, value } => AppliedOp::Put {
                key: key.as_str().into(),
                value: value.as_str().into(),
            },
            WriteOp::Delete { key } => AppliedOp::Delete {
                key: key.as_str().into(),
            },
            WriteOp::Cas {
                key,
                expected,
                value,
            } => AppliedOp::Cas {
                key: key.as_str().into(),
                expected: *expected,
                value: value.as_str().into(),
            },
        }
    }
}

impl Applied {
    /// The record as it was appended (for `fetch`).
    fn record(&self) -> Record {
        let op = match &self.op {
            AppliedOp::Put { key, value } => WriteOp::Put {
                key: key.to_string(),
                value: value.to_string(),
            },
            AppliedOp::Delete { key } => WriteOp::Delete {
                key: key.to_string(),
            },
            AppliedOp::Cas {
                key,
                expected,
                value,
            } => WriteOp::Cas {
                key: key.to_string(),
                expected: *expected,
                value: value.to_string(),
            },
        };
        Record {
            seq: self.seq,
            epoch: self.epoch,
            client: self.client.to_string(),
            op_no: self.op_no,
            op,
        }
    }

    /// [`record_bytes`] of [`Applied::record`], without building it.
    fn bytes(&self) -> usize {
        json_str_len(&self.client)
            + match &self.op {
                AppliedOp::Put { key, value } | AppliedOp::Cas { key, value, .. } => {
                    json_str_len(key) + json_str_len(value)
                }
                AppliedOp::Delete { key } => json_str_len(key),
            }
    }
}

/// Builds a [`KeyMap`] from keys that arrive in ascending order (a snapshot file).
///
/// Inserting ascending keys one at a time leaves the B-tree's leaves half empty: a full
/// leaf splits in two and no later key lands in its left half, so 8 of imbl's 16 slots
/// stay used (about 45 B more per key). The builder inserts each window of 1024 keys
/// (`BUILD_WINDOW`) as its even-numbered keys first, then its odd-numbered ones,
/// which land in the gaps the first pass left: leaves end up about 98% full. The map's
/// content does not depend on the order; only its layout does.
#[derive(Debug, Default)]
pub struct KeyMapBuilder {
    map: KeyMap,
    evens: Vec<(Key, (Text, Seq))>,
    odds: Vec<(Key, (Text, Seq))>,
}

impl KeyMapBuilder {
    /// Adds the next key (ascending order keeps the leaves full; any order is correct).
    pub fn push(&mut self, key: &str, value: &str, version: Seq) {
        let entry = (Key::from(key), (Text::from(value), version));
        if self.evens.len() == self.odds.len() {
            self.evens.push(entry);
        } else {
            self.odds.push(entry);
        }
        if self.evens.len() + self.odds.len() == BUILD_WINDOW {
            self.flush();
        }
    }

    fn flush(&mut self) {
        for (key, value) in self.evens.drain(..).chain(self.odds.drain(..)) {
            self.map.insert(key, value);
        }
    }

    /// The map of every key pushed.
    pub fn finish(mut self) -> KeyMap {
        self.flush();
        self.map
    }
}

/// Records [`Store::compacted`] took out of the tail. Freeing a snapshot's worth of them
/// (100k by default) takes milliseconds, so the snapshot thread drops this after releasing
/// the store lock instead of stalling the writer and every read.
#[derive(Debug)]
#[must_use = "drop it after releasing the store lock"]
pub struct Compacted(VecDeque<Applied>);

impl Compacted {
    /// Number of records removed.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no record was removed.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The key-value map plus everything `apply` needs to be deterministic.
#[derive(Debug, Default)]
pub struct Store {
    map: KeyMap,
    clients: ClientMap,
    tombstones: TombstoneMap,
    pos: LogPosition,
    snapshot_pos: LogPosition,
    tail: VecDeque<Applied>,
}

/// Evaluates an operation that is not a retry: its outcome, and the operation with the
/// strings the maps now hold.
fn evaluate(map: &mut KeyMap, tombstones: &mut TombstoneMap, r: &Record) -> (Outcome, AppliedOp) {
    let written = Outcome::Written { version: r.seq };
    match &r.op {
        WriteOp::Put { key, value } => {
            let (key, value) = set(map, key, value, r.seq);
            (written, AppliedOp::Put { key, value })
        }
        WriteOp::Delete { key } => match map.remove_with_key(key.as_str()) {
            None => (Outcome::NotFound, AppliedOp::copied(&r.op)),
            Some((key, _)) => {
                tombstones.insert(key.clone(), r.seq);
                (written, AppliedOp::Delete { key })
            }
        },
        WriteOp::Cas {
            key,
            expected,
            value,
        } => {
            let current = map.get(key.as_str()).map(|(_, v)| *v).unwrap_or_default();
            if current != *expected {
                return (
                    Outcome::VersionMismatch { current },
                    AppliedOp::copied(&r.op),
                );
            }
            let (key, value) = set(map, key, value, r.seq);
            let expected = *expected;
            (
                written,
                AppliedOp::Cas {
                    key,
                    expected,
                    value,
                },
            )
        }
    }
}

/// Sets `key` to `value` and returns the strings stored; an existing key keeps its own.
fn set(map: &mut KeyMap, key: &str, value: &str, seq: Seq) -> (Key, Text) {
    let value = Text::from(value);
    match map.get_key_value_mut(key) {
        Some((key, slot)) => {
            *slot = (value.clone(), seq);
            (key.clone(), value)
        }
        None => {
            let key = Key::from(key);
            map.insert(key.clone(), (value.clone(), seq));
            (key, value)
        }
    }
}

impl Store {
    /// An empty store at the empty log position.
    pub fn new() -> Store {
        Store::default()
    }

    /// A store holding exactly the state of a snapshot (O(1): the maps are shared).
    pub fn from_snapshot(data: SnapshotData) -> Store {
        Store {
            map: data.items,
            clients: data.clients,
            tombstones: data.tombstones,
            pos: data.pos,
            snapshot_pos: data.pos,
            tail: VecDeque::new(),
        }
    }

    /// Applies the next record of the log and returns its deterministic outcome.
    pub fn apply(&mut self, r: &Record) -> Outcome {
        assert_eq!(
            r.seq,
            self.pos.seq.next(),
            "records must be applied in seq order without gaps"
        );
        let Store {
            map,
            clients,
            tombstones,
            ..
        } = self;
        // One lookup in the exactly-once table tells a retry from a new op, and records a
        // new op's outcome in place.
        let (client, outcome, op) = match clients.get_key_value_mut(r.client.as_str()) {
            Some((id, (last, _))) if r.op_no < *last => (
                id.clone(),
                Outcome::StaleOp { last_op_no: *last },
                AppliedOp::copied(&r.op),
            ),
            Some((id, (last, outcome))) if r.op_no == *last => {
                (id.clone(), outcome.clone(), AppliedOp::copied(&r.op))
            }
            Some((id, slot)) => {
                let (outcome, op) = evaluate(map, tombstones, r);
                *slot = (r.op_no, outcome.clone());
                (id.clone(), outcome, op)
            }
            None => {
                let id = Key::from(r.client.as_str());
                let (outcome, op) = evaluate(map, tombstones, r);
                clients.insert(id.clone(), (r.op_no, outcome.clone()));
                (id, outcome, op)
            }
        };
        self.pos = LogPosition {
            epoch: r.epoch,
            seq: r.seq,
        };
        self.tail.push_back(Applied {
            seq: r.seq,
            epoch: r.epoch,
            client,
            op_no: r.op_no,
            op,
            outcome: outcome.clone(),
        });
        outcome
    }

    /// The epoch of the record at `seq`, if it is still in memory (after the newest
    /// snapshot).
    pub fn epoch_at(&self, seq: Seq) -> Option<Epoch> {
        let first = self.tail.front()?.seq;
        (seq >= first && seq <= self.pos.seq).then(|| self.tail[(seq.0 - first.0) as usize].epoch)
    }

    /// The outcome a record already in the log had, for an `append` that re-sends it.
    /// Records older than the newest snapshot fall back to the exactly-once table.
    pub fn outcome_of(&self, r: &Record) -> Outcome {
        if let Some(first) = self.tail.front() {
            if r.seq >= first.seq && r.seq <= self.pos.seq {
                return self.tail[(r.seq.0 - first.seq.0) as usize].outcome.clone();
            }
        }
        match self.clients.get(r.client.as_str()) {
            Some((last, outcome)) if *last == r.op_no => outcome.clone(),
            Some((last, _)) => Outcome::StaleOp { last_op_no: *last },
            None => Outcome::StaleOp { last_op_no: 0 },
        }
    }

    /// Forgets tombstones at or below the frontend's commit index.
    pub fn forget_tombstones(&mut self, commit: Seq) {
        // OrdMap has no `retain`; the table is small (deletes not yet committed).
        let committed: Vec<Key> = self
            .tombstones
            .iter()
            .filter(|(_, seq)| **seq <= commit)
            .map(|(k, _)| k.clone())
            .collect();
        for key in committed {
            self.tombstones.remove(&key);
        }
    }

    /// [`Store::get`] of `keys` in order, stopping before the answer's keys and values as
    /// JSON (escaping included) would pass [`READ_MANY_MAX_BYTES`]; the first key is always
    /// answered. The caller asks again for the rest.
    pub fn read_many(&self, keys: &[String]) -> Vec<ReadReply> {
        let mut replies = Vec::with_capacity(keys.len());
        let mut bytes = 0;
        for key in keys {
            let (value, last_touch) = self.get(key);
            let b = json_str_len(key) + value.as_ref().map_or(0, |v| json_str_len(&v.value));
            if !replies.is_empty() && bytes + b > READ_MANY_MAX_BYTES {
                break;
            }
            bytes += b;
            replies.push(ReadReply { value, last_touch });
        }
        replies
    }

    /// [`Store::scan`], refused with `TooLarge` when more than one key would pass
    /// [`SCAN_MAX_BYTES`] of keys and values as JSON: the node could not send that frame.
    pub fn scan_bounded(&self, prefix: &str, limit: usize) -> Result<Vec<KeyValue>, KvError> {
        let items = self.scan(prefix, limit);
        let bytes: usize = items
            .iter()
            .map(|kv| json_str_len(&kv.key) + json_str_len(&kv.value))
            .sum();
        if items.len() > 1 && bytes > SCAN_MAX_BYTES {
            return Err(KvError::TooLarge {
                what: format!(
                    "scan answer ({} keys, {bytes} bytes as JSON; ask for fewer keys)",
                    items.len()
                ),
                limit: SCAN_MAX_BYTES as u64,
            });
        }
        Ok(items)
    }

    /// The value of `key` and the seq of the newest record known to have touched it.
    pub fn get(&self, key: &str) -> (Option<Versioned>, Seq) {
        match self.map.get(key) {
            Some((value, version)) => (
                Some(Versioned {
                    value: value.to_string(),
                    version: *version,
                }),
                *version,
            ),
            None => (None, self.tombstones.get(key).copied().unwrap_or_default()),
        }
    }

    /// Keys starting with `prefix`, in order, at most `limit`.
    pub fn scan(&self, prefix: &str, limit: usize) -> Vec<KeyValue> {
        use std::ops::Bound;
        self.map
            .range::<_, str>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, (v, ver))| KeyValue {
                key: k.to_string(),
                value: v.to_string(),
                version: *ver,
            })
            .collect()
    }

    /// Up to `max` records starting at `from`, or `SnapshotNeeded` if `from` was compacted.
    pub fn fetch(&self, from: Seq, max: usize) -> FetchReply {
        if from <= self.snapshot_pos.seq && self.snapshot_pos.seq > Seq(0) {
            return FetchReply::SnapshotNeeded {
                snapshot_seq: self.snapshot_pos.seq,
                keys: self.map.len() as u64,
            };
        }
        let Some(first) = self.tail.front().map(|a| a.seq) else {
            return FetchReply::Records(Vec::new());
        };
        let skip = from.0.saturating_sub(first.0) as usize;
        // Bound the page by bytes as well as by count, so a page of large values still
        // fits one frame; the first record always goes, so progress is guaranteed.
        let mut bytes = 0usize;
        let records = self
            .tail
            .iter()
            .skip(skip)
            .take(max)
            .take_while(|a| {
                let fits = bytes == 0 || bytes + a.bytes() <= FETCH_MAX_BYTES;
                bytes += a.bytes();
                fits
            })
            .map(Applied::record)
            .collect();
        FetchReply::Records(records)
    }

    /// Marks the snapshot at `pos` durable: records up to it are no longer kept in memory.
    /// They are returned, to be dropped after the store lock is released.
    pub fn compacted(&mut self, pos: LogPosition) -> Compacted {
        // Tail seqs are consecutive, so the records to drop are a counted prefix.
        let n = self
            .tail
            .front()
            .map_or(0, |a| (pos.seq.0 + 1).saturating_sub(a.seq.0) as usize)
            .min(self.tail.len());
        // Copy the (shorter) rest into a buffer as large as the old one, so the tail does
        // not regrow by doubling, each time copying itself under the store lock.
        let mut kept = VecDeque::with_capacity(self.tail.capacity());
        kept.extend(self.tail.drain(n..));
        self.snapshot_pos = pos;
        Compacted(std::mem::replace(&mut self.tail, kept))
    }

    /// The whole state at the current position, for a snapshot: O(1), whatever the number
    /// of keys, because the maps are shared, not copied (see the module docs).
    pub fn snapshot_data(&self) -> SnapshotData {
        SnapshotData {
            pos: self.pos,
            items: self.map.clone(),
            clients: self.clients.clone(),
            tombstones: self.tombstones.clone(),
        }
    }

    /// Position of the last applied record.
    pub fn pos(&self) -> LogPosition {
        self.pos
    }

    /// Position covered by the newest durable snapshot.
    pub fn snapshot_pos(&self) -> LogPosition {
        self.snapshot_pos
    }

    /// Records applied since the newest durable snapshot.
    pub fn since_snapshot(&self) -> u64 {
        self.pos.seq.0 - self.snapshot_pos.seq.0
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// A hash of the logical content: every (key, value, version) in key order and the
    /// exactly-once table (FNV-1a, stable across processes and versions).
    pub fn digest(&self) -> Digest {
        let mut h = Fnv::new();
        for (k, (v, ver)) in &self.map {
            h.field(k.as_bytes());
            h.field(v.as_bytes());
            h.field(&ver.0.to_le_bytes());
        }
        h.field(b"clients");
        for (c, (op_no, outcome)) in &self.clients {
            h.field(c.as_bytes());
            h.field(&op_no.to_le_bytes());
            // Serialising an enum of integers cannot fail.
            h.field(&serde_json::to_vec(outcome).expect("outcome serialises"));
        }
        Digest {
            pos: self.pos,
            keys: self.map.len() as u64,
            hash: h.0,
        }
    }
}

/// FNV-1a 64 with length-prefixed fields, so ("ab","c") and ("a","bc") differ.
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn field(&mut self, bytes: &[u8]) {
        for b in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use walkv_shared::Epoch;

    pub(crate) fn rec(seq: u64, client: &str, op_no: u64, op: WriteOp) -> Record {
        Record {
            seq: Seq(seq),
            epoch: Epoch(1),
            client: client.into(),
            op_no,
            op,
        }
    }

    pub(crate) fn put(seq: u64, key: &str, value: &str) -> Record {
        rec(
            seq,
            &format!("c{seq}"),
            1,
            WriteOp::Put {
                key: key.into(),
                value: value.into(),
            },
        )
    }

    #[test]
    fn put_delete_cas_semantics() {
        let mut s = Store::new();
        assert_eq!(
            s.apply(&put(1, "a", "1")),
            Outcome::Written { version: Seq(1) }
        );
        let del = |seq, key: &str| rec(seq, "d", seq, WriteOp::Delete { key: key.into() });
        assert_eq!(s.apply(&del(2, "missing")), Outcome::NotFound);
        let cas = |seq, expected, v: &str| {
            rec(
                seq,
                "x",
                seq,
                WriteOp::Cas {
                    key: "a".into(),
                    expected: Seq(expected),
                    value: v.into(),
                },
            )
        };
        assert_eq!(
            s.apply(&cas(3, 7, "no")),
            Outcome::VersionMismatch { current: Seq(1) }
        );
        assert_eq!(
            s.apply(&cas(4, 1, "yes")),
            Outcome::Written { version: Seq(4) }
        );
        assert_eq!(s.get("a").0.unwrap().value, "yes");
        assert_eq!(s.apply(&del(5, "a")), Outcome::Written { version: Seq(5) });
        assert_eq!(
            s.get("a"),
            (None, Seq(5)),
            "tombstone reports the delete as last touch"
        );
        s.forget_tombstones(Seq(5));
        assert_eq!(s.get("a"), (None, Seq(0)));
        let absent = rec(
            6,
            "y",
            1,
            WriteOp::Cas {
                key: "a".into(),
                expected: Seq(0),
                value: "new".into(),
            },
        );
        assert_eq!(s.apply(&absent), Outcome::Written { version: Seq(6) });
    }

    #[test]
    fn exactly_once_retry_and_stale_op() {
        let mut s = Store::new();
        let w = |seq, op_no, v: &str| {
            rec(
                seq,
                "alice",
                op_no,
                WriteOp::Put {
                    key: "k".into(),
                    value: v.into(),
                },
            )
        };
        assert_eq!(
            s.apply(&w(1, 5, "first")),
            Outcome::Written { version: Seq(1) }
        );
        // A retry of the same op gets the stored outcome and changes nothing.
        assert_eq!(
            s.apply(&w(2, 5, "retry")),
            Outcome::Written { version: Seq(1) }
        );
        assert_eq!(
            s.get("k").0.unwrap(),
            Versioned {
                value: "first".into(),
                version: Seq(1)
            }
        );
        assert_eq!(s.apply(&w(3, 4, "old")), Outcome::StaleOp { last_op_no: 5 });
        assert_eq!(s.pos().seq, Seq(3), "no-ops still advance the log");
        assert_eq!(
            s.outcome_of(&w(2, 5, "retry")),
            Outcome::Written { version: Seq(1) }
        );
    }

    /// A mix of puts, deletes, cas and retries over few keys and clients, so later
    /// records overwrite, delete and re-create keys that earlier views hold.
    fn mixed(seq: u64) -> Record {
        let key = format!("k{:04}", seq * 7919 % 700);
        let op = match seq % 5 {
            0 => WriteOp::Delete { key },
            1 => WriteOp::Cas {
                key,
                expected: Seq(seq * 31 % 7),
                value: format!("cas{seq}"),
            },
            _ => WriteOp::Put {
                key,
                value: format!("v{seq}"),
            },
        };
        // Every 11th record re-sends the client's previous op number (a retry).
        let op_no = seq / 13 + 1 - u64::from(seq.is_multiple_of(11) && seq > 13);
        rec(seq, &format!("c{}", seq % 13), op_no, op)
    }

    fn apply_mixed(s: &mut Store, seq: u64) {
        s.apply(&mixed(seq));
        s.forget_tombstones(Seq(seq.saturating_sub(40)));
    }

    #[test]
    fn snapshot_data_is_exactly_the_state_at_its_position() {
        let mut live = Store::new();
        let mut views = Vec::new();
        for seq in 1..=4000 {
            apply_mixed(&mut live, seq);
            if seq % 700 == 0 {
                let view = live.snapshot_data();
                let bytes = crate::snapshot::encode(&view);
                views.push((view, bytes));
            }
        }
        assert!(live.len() > 300, "the maps must span many B-tree nodes");
        for (view, bytes) in views {
            let mut replay = Store::new();
            (1..=view.pos.seq.0).for_each(|seq| apply_mixed(&mut replay, seq));
            assert_eq!(view.pos, replay.pos());
            assert_eq!(
                view,
                replay.snapshot_data(),
                "writes after seq {} leaked into its snapshot",
                view.pos.seq
            );
            assert_eq!(
                crate::snapshot::encode(&view),
                bytes,
                "the view changed after it was taken"
            );
            assert_eq!(Store::from_snapshot(view).digest(), replay.digest());
        }
    }

    #[test]
    fn fetch_returns_the_records_as_appended() {
        let mut s = Store::new();
        let records: Vec<Record> = (1..=600).map(mixed).collect();
        for r in &records {
            s.apply(r);
        }
        let FetchReply::Records(fetched) = s.fetch(Seq(1), 10_000) else {
            panic!("records expected")
        };
        assert_eq!(
            fetched, records,
            "puts, deletes, cas, retries and stale ops"
        );
        let sizes: Vec<usize> = s.tail.iter().map(Applied::bytes).collect();
        assert_eq!(sizes, records.iter().map(record_bytes).collect::<Vec<_>>());
    }

    #[test]
    fn key_map_builder_holds_exactly_what_was_pushed() {
        for n in [0, 1, 2, 1023, 1024, 1025, 5000] {
            let mut built = KeyMapBuilder::default();
            let mut inserted = KeyMap::new();
            for i in 0..n {
                // Ascending, except that every 97th key comes out of order.
                let k = if i % 97 == 5 {
                    format!("z{i:05}")
                } else {
                    format!("k{i:05}")
                };
                built.push(&k, &format!("v{i}"), Seq(i));
                inserted.insert(k.as_str().into(), (format!("v{i}").into(), Seq(i)));
            }
            assert_eq!(built.finish(), inserted, "{n} keys");
        }
    }

    #[test]
    fn writes_after_a_snapshot_do_not_reach_it() {
        let mut s = Store::new();
        s.apply(&put(1, "a", "1"));
        s.apply(&put(2, "b", "2"));
        s.apply(&rec(3, "d", 1, WriteOp::Delete { key: "b".into() }));
        let view = s.snapshot_data();
        s.apply(&put(4, "a", "changed"));
        s.apply(&put(5, "c", "new"));
        s.apply(&rec(6, "d", 2, WriteOp::Delete { key: "a".into() }));
        s.forget_tombstones(Seq(6));
        assert_eq!(view.pos.seq, Seq(3));
        let items: Vec<_> = view
            .items
            .iter()
            .map(|(k, (v, ver))| (k.to_string(), v.to_string(), *ver))
            .collect();
        assert_eq!(items, vec![("a".into(), "1".into(), Seq(1))]);
        assert_eq!(view.tombstones.get("b"), Some(&Seq(3)));
        assert_eq!(view.clients.len(), 3, "c4 and c5 came later");
        assert_eq!(
            view.clients.get("d"),
            Some(&(1, Outcome::Written { version: Seq(3) }))
        );
        assert_eq!(s.get("a"), (None, Seq(0)));
        assert_eq!(s.len(), 1);
    }

    /// RSS per key of 1M keys (16-byte keys in random order, 100-byte values) in the
    /// layouts the store could use. Meaningful only in release and one per process:
    /// `cargo test --release -p walkv-storage --lib -- --ignored --exact --nocapture
    /// store::tests::memory_ordmap_arc`.
    mod memory {
        use super::*;
        use crate::tools::{bench_key, rss_bytes};
        use std::collections::BTreeMap;

        const KEYS: u64 = 1_000_000;
        const VALUE: &str = concat!(
            "0123456789012345678901234567890123456789012345678901234567890123456789",
            "012345678901234567890123456789"
        );

        /// Builds a map from `keys` (made before the measurement starts) and prints the RSS
        /// it added per key.
        fn measure<M>(what: &str, keys: &[String], build: impl FnOnce(&[String]) -> M) {
            assert_eq!(VALUE.len(), 100);
            let before = rss_bytes();
            let map = build(keys);
            let per_key = rss_bytes().saturating_sub(before) as f64 / keys.len() as f64;
            println!("{what}: {per_key:.0} B of RSS per key");
            drop(map);
        }

        fn random_keys() -> Vec<String> {
            (1..=KEYS).map(bench_key).collect()
        }

        #[test]
        #[ignore = "measurement: run alone, in release"]
        fn memory_btreemap_string() {
            measure("BTreeMap<String, (String, Seq)>", &random_keys(), |keys| {
                let mut m = BTreeMap::new();
                for (i, k) in keys.iter().enumerate() {
                    m.insert(k.clone(), (VALUE.to_string(), Seq(i as u64)));
                }
                m
            });
        }

        #[test]
        #[ignore = "measurement: run alone, in release"]
        fn memory_btreemap_box() {
            measure(
                "BTreeMap<Box<str>, (Box<str>, Seq)>",
                &random_keys(),
                |keys| {
                    let mut m = BTreeMap::new();
                    for (i, k) in keys.iter().enumerate() {
                        m.insert(
                            Box::<str>::from(k.as_str()),
                            (Box::<str>::from(VALUE), Seq(i as u64)),
                        );
                    }
                    m
                },
            );
        }

        #[test]
        #[ignore = "measurement: run alone, in release"]
        fn memory_ordmap_arc() {
            measure(
                "OrdMap<Arc<str>, (Arc<str>, Seq)>",
                &random_keys(),
                |keys| {
                    let mut m = OrdMap::<Text, (Text, Seq)>::new();
                    for (i, k) in keys.iter().enumerate() {
                        m.insert(Text::from(k.as_str()), (Text::from(VALUE), Seq(i as u64)));
                    }
                    m
                },
            );
        }

        #[test]
        #[ignore = "measurement: run alone, in release"]
        fn memory_keymap_inline_keys() {
            measure(
                "OrdMap<CompactString, (Arc<str>, Seq)> (KeyMap)",
                &random_keys(),
                |keys| {
                    let mut m = KeyMap::new();
                    for (i, k) in keys.iter().enumerate() {
                        m.insert(Key::from(k.as_str()), (Text::from(VALUE), Seq(i as u64)));
                    }
                    m
                },
            );
        }

        #[test]
        #[ignore = "measurement: run alone, in release"]
        fn memory_ordmap_arc_sorted() {
            let mut keys = random_keys();
            keys.sort();
            measure(
                "OrdMap<Arc<str>, ..> inserted in key order",
                &keys,
                |keys| {
                    let mut data = SnapshotData::default();
                    for (i, k) in keys.iter().enumerate() {
                        data.insert_item(k, VALUE, Seq(i as u64));
                    }
                    data
                },
            );
        }

        #[test]
        #[ignore = "measurement: run alone, in release"]
        fn memory_ordmap_arc_built() {
            let mut keys = random_keys();
            keys.sort();
            measure("OrdMap<Arc<str>, ..> from KeyMapBuilder", &keys, |keys| {
                let mut b = KeyMapBuilder::default();
                for (i, k) in keys.iter().enumerate() {
                    b.push(k, VALUE, Seq(i as u64));
                }
                b.finish()
            });
        }

        /// The store as a node holds it just before a snapshot: with `snapshot_every`
        /// (100k) records in the tail.
        #[test]
        #[ignore = "measurement: run alone, in release"]
        fn memory_store() {
            measure(
                "Store through apply, 100k records in the tail",
                &random_keys(),
                |keys| {
                    let mut s = Store::new();
                    for (i, k) in keys.iter().enumerate() {
                        let seq = i as u64 + 1;
                        let op = WriteOp::Put {
                            key: k.clone(),
                            value: VALUE.into(),
                        };
                        s.apply(&rec(seq, "bench", seq, op));
                        if seq.is_multiple_of(100_000) && seq < KEYS {
                            drop(s.compacted(s.pos()));
                        }
                    }
                    assert_eq!(s.since_snapshot(), 100_000);
                    s
                },
            );
        }
    }

    #[test]
    #[should_panic(expected = "seq order")]
    fn gap_is_a_broken_invariant() {
        let mut s = Store::new();
        s.apply(&put(2, "a", "1"));
    }

    #[test]
    fn fetch_pages_are_bounded_by_bytes() {
        let mut s = Store::new();
        let big = "x".repeat(700 << 10);
        for i in 1..=5 {
            s.apply(&put(i, &format!("k{i}"), &big));
        }
        let FetchReply::Records(r) = s.fetch(Seq(1), 100) else {
            panic!("records expected")
        };
        assert_eq!(r.len(), 2, "three 700 KiB values exceed FETCH_MAX_BYTES");
        let huge = "y".repeat(FETCH_MAX_BYTES + 1);
        s.apply(&put(6, "huge", &huge));
        let FetchReply::Records(r) = s.fetch(Seq(6), 100) else {
            panic!("records expected")
        };
        assert_eq!(
            r.len(),
            1,
            "an oversized record still goes alone, so catch-up progresses"
        );
    }

    /// Replies counted as JSON: values of control characters (6 bytes each as JSON) within
    /// the limits fill a page or a read batch in fewer keys, so the frame a node answers
    /// with stays under its 8 MiB default. Counted raw, two 1,000,000-byte values shared a
    /// 12 MB reply, which the node cannot send: it closes the connection, and with it the
    /// appends in flight on it.
    #[test]
    fn fetch_pages_reads_and_scans_fit_a_frame_when_escaped() {
        let mut s = Store::new();
        let ctl = "\u{1}".repeat(1_000_000);
        for i in 1..=4 {
            s.apply(&put(i, &format!("k{i}"), &ctl));
        }
        let frame = 8 << 20;
        let FetchReply::Records(r) = s.fetch(Seq(1), 100) else {
            panic!("records expected")
        };
        let page = serde_json::to_vec(&FetchReply::Records(r.clone()))
            .unwrap()
            .len();
        assert_eq!(r.len(), 1, "one such record per page ({page} bytes)");
        assert!(page < frame, "{page}");
        let keys: Vec<String> = (1..=4).map(|i| format!("k{i}")).collect();
        let replies = s.read_many(&keys);
        let answer = serde_json::to_vec(&replies).unwrap().len();
        assert_eq!(
            replies.len(),
            1,
            "one such value per answer ({answer} bytes)"
        );
        assert!(answer < frame, "{answer}");
        // A scan over them is refused rather than answered in a frame too large to send.
        assert!(matches!(
            s.scan_bounded("k", 10),
            Err(KvError::TooLarge { .. })
        ));
        assert_eq!(
            s.scan_bounded("k1", 10).unwrap().len(),
            1,
            "one key always goes"
        );
        // Plain small values share one answer.
        let mut small = Store::new();
        for i in 1..=4 {
            small.apply(&put(i, &format!("k{i}"), "v"));
        }
        assert_eq!(small.read_many(&keys).len(), 4);
        assert_eq!(small.scan_bounded("k", 10).unwrap().len(), 4);
    }

    #[test]
    fn fetch_and_compaction() {
        let mut s = Store::new();
        for i in 1..=10 {
            s.apply(&put(i, &format!("k{i}"), "v"));
        }
        let FetchReply::Records(r) = s.fetch(Seq(4), 3) else {
            panic!("records expected")
        };
        assert_eq!(r.iter().map(|r| r.seq.0).collect::<Vec<_>>(), vec![4, 5, 6]);
        let dropped = s.compacted(LogPosition {
            epoch: Epoch(1),
            seq: Seq(6),
        });
        assert_eq!(dropped.len(), 6);
        assert!(matches!(
            s.fetch(Seq(6), 3),
            FetchReply::SnapshotNeeded {
                snapshot_seq: Seq(6),
                keys: 10
            }
        ));
        let FetchReply::Records(r) = s.fetch(Seq(7), 100) else {
            panic!("records expected")
        };
        assert_eq!(r.len(), 4);
        let copy = Store::from_snapshot(s.snapshot_data());
        assert_eq!(copy.digest(), s.digest());
    }
}
