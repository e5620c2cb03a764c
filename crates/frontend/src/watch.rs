//! The watch feed: committed changes in commit order, resumable from a version.
//!
//! # Sources
//!
//! - **Live**: after a batch commits, the sequencer calls [`ChangeLog::publish`] with the
//!   changes the batch made (computed by the pure [`changes_of`] from the records and the
//!   outcomes the storage nodes returned), *before* it advances the commit index. The
//!   change log is a bounded ring ([`CHANGE_LOG_MAX`] changes); publishing never waits, so
//!   watchers can never slow down writes. Waiters wake on the commit index (`commit_tx`).
//! - **History**: a `from` older than the ring is served from an in-sync storage node with
//!   `Storage::fetch`, in pages, up to where the ring starts. Records compacted into a
//!   snapshot are gone: the answer is [`KvError::Compacted`], telling the client to resume
//!   from the current version (and scan for the state).
//!
//! # Invariants
//!
//! - The ring holds every change with `version >= covered_from` up to the last published
//!   batch, in commit order (one publisher: the sequencer, under the write gate). A batch
//!   that does not continue the previous one (recovery committed records the sequencer
//!   never saw) restarts the ring, so the gap is served from history instead.
//! - Only changes at or below the commit index are ever returned.
//! - [`poll`] always returns a `next` such that every matching change below `next` was
//!   delivered (in this or an earlier answer); resuming from `next` loses nothing.
//!
//! # History and outcomes
//!
//! The log stores operations, not outcomes. History reconstructs them: a put is a put, a
//! delete is reported as a delete (for a key that did not exist this is a harmless no-op
//! for a mirror), and a cas counts as a put when the key's version at that point is known
//! from the history itself; otherwise it is resolved by a linearizable read (it took effect
//! if the key's current version is the cas's seq). A cas whose value was overwritten later
//! and whose key was not written since `from` is therefore not reported from history: a
//! documented limitation of watching from far back; the live ring is exact.
//!
//! A live watcher (WebSocket) that falls more than the ring behind is disconnected with an
//! explicit error by its door; [`poll`] itself never blocks the sequencer.

use crate::cluster::Cluster;
use crate::reads;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};
use walkv_shared::rpc::FetchReply;
use walkv_shared::types::{Change, ChangeOp, Outcome, WatchBatch, WriteOp};
use walkv_shared::{KvError, Record, Seq};

/// Changes kept in memory for live watchers: enough for several seconds of writes at
/// benchmark rates, small enough (values are bounded by `max_value_bytes`, but typical
/// ones are small) to keep memory modest.
pub const CHANGE_LOG_MAX: usize = 65_536;
/// Records asked per `fetch` page when serving history.
pub const HISTORY_PAGE: u32 = 1000;
/// Most changes one poll answer carries.
pub const MAX_BATCH: u32 = 10_000;
/// Longest a long-poll may wait for a change.
pub const MAX_WAIT: Duration = Duration::from_secs(30);

/// The bounded ring of recently committed changes.
#[derive(Debug, Default)]
pub struct ChangeLog {
    inner: std::sync::Mutex<Ring>,
}

#[derive(Debug, Default)]
struct Ring {
    changes: VecDeque<Change>,
    /// Every change with a version >= this is in the ring (0: nothing published yet).
    covered_from: Seq,
    /// Last seq of the last published batch.
    last: Seq,
}

impl ChangeLog {
    /// Records the changes of the committed batch `first..=last`. Never blocks.
    pub fn publish(&self, first: Seq, last: Seq, changes: Vec<Change>) {
        let mut r = self.lock();
        if r.covered_from == Seq(0) || first != r.last.next() {
            r.changes.clear();
            r.covered_from = first;
        }
        r.last = last;
        r.changes.extend(changes);
        while r.changes.len() > CHANGE_LOG_MAX {
            if let Some(old) = r.changes.pop_front() {
                r.covered_from = old.version.next();
            }
        }
    }

    /// Where the ring's coverage starts (0 when nothing was published yet).
    pub fn covered_from(&self) -> Seq {
        self.lock().covered_from
    }

    /// Matching changes with `from <= version <= upto`, at most `max`, when the ring covers
    /// `from`; `None` when it does not.
    fn read(&self, prefix: &str, from: Seq, upto: Seq, max: usize) -> Option<Vec<Change>> {
        let r = self.lock();
        if r.covered_from == Seq(0) || from < r.covered_from {
            return None;
        }
        let start = r.changes.partition_point(|c| c.version < from);
        Some(
            r.changes
                .range(start..)
                .take_while(|c| c.version <= upto)
                .filter(|c| c.key.starts_with(prefix))
                .take(max)
                .cloned()
                .collect(),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        // The ring is consistent after every statement that touches it; a poisoned lock
        // still holds a usable ring.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The changes a committed batch made: records whose outcome is `Written`. Pure.
pub fn changes_of(records: &[Record], outcomes: &[Outcome]) -> Vec<Change> {
    records
        .iter()
        .zip(outcomes)
        .filter_map(|(r, o)| match o {
            Outcome::Written { version } => Some(change(&r.op, *version)),
            _ => None,
        })
        .collect()
}

fn change(op: &WriteOp, version: Seq) -> Change {
    match op {
        WriteOp::Put { key, value } | WriteOp::Cas { key, value, .. } => Change {
            key: key.clone(),
            value: Some(value.clone()),
            version,
            op: ChangeOp::Put,
        },
        WriteOp::Delete { key } => Change {
            key: key.clone(),
            value: None,
            version,
            op: ChangeOp::Delete,
        },
    }
}

/// How a history record is reported, given the key's version as known from the history
/// so far (`None` when the history has not touched the key yet). Pure.
pub enum HistoryVerdict {
    /// Report this change.
    Change(Change),
    /// Nothing changed (a cas that did not match).
    Nothing,
    /// A cas on a key the history has not seen: ask the store.
    Unknown,
}

/// Classifies one history record. Pure.
pub fn classify(record: &Record, known: Option<Seq>) -> HistoryVerdict {
    match &record.op {
        WriteOp::Put { .. } | WriteOp::Delete { .. } => {
            HistoryVerdict::Change(change(&record.op, record.seq))
        }
        WriteOp::Cas { expected, .. } => match known {
            Some(v) if v == *expected => HistoryVerdict::Change(change(&record.op, record.seq)),
            Some(_) => HistoryVerdict::Nothing,
            None => HistoryVerdict::Unknown,
        },
    }
}

/// One long-poll: matching changes from `from`, at most `max`, waiting up to `wait` for
/// the commit index to reach `from`. The single code path behind every watch door.
pub async fn poll(
    cluster: &Cluster,
    prefix: &str,
    from: Seq,
    max: u32,
    wait: Duration,
) -> Result<WatchBatch, KvError> {
    let from = from.max(Seq(1));
    let max = max.clamp(1, MAX_BATCH) as usize;
    let wait = wait.min(MAX_WAIT);
    if cluster.commit() < from {
        let mut rx = cluster.commit_tx.subscribe();
        // A timeout is a normal empty answer; a closed channel means shutdown.
        let waited = tokio::time::timeout(wait, rx.wait_for(|c| *c >= from)).await;
        if let Ok(Err(_)) = waited {
            return Err(KvError::Unavailable("frontend is shutting down".into()));
        }
    }
    let commit = cluster.commit();
    if commit < from {
        return Ok(WatchBatch {
            changes: Vec::new(),
            next: from,
            commit_seq: commit,
        });
    }
    if let Some(changes) = cluster.changes.read(prefix, from, commit, max) {
        let next = match changes.last() {
            Some(c) if changes.len() == max => c.version.next(),
            _ => commit.next(),
        };
        return Ok(WatchBatch {
            changes,
            next,
            commit_seq: commit,
        });
    }
    history(cluster, prefix, from, commit, max).await
}

/// Serves `from..` out of storage nodes' logs, up to where the ring starts (or the commit
/// index when the ring is empty).
async fn history(
    cluster: &Cluster,
    prefix: &str,
    from: Seq,
    commit: Seq,
    max: usize,
) -> Result<WatchBatch, KvError> {
    let covered = cluster.changes.covered_from();
    let upto = if covered == Seq(0) || covered > commit {
        commit
    } else {
        Seq(covered.0 - 1)
    };
    let deadline = Instant::now() + cluster.config.request_timeout();
    let mut known: HashMap<String, Seq> = HashMap::new();
    let mut changes = Vec::new();
    let mut next = from;
    while next <= upto && changes.len() < max && Instant::now() < deadline {
        let records = fetch_page(cluster, next, commit).await?;
        if records.is_empty() {
            break;
        }
        for r in records.into_iter().take_while(|r| r.seq <= upto) {
            let key = r.op.key().to_string();
            let verdict = match classify(&r, known.get(&key).copied()) {
                HistoryVerdict::Unknown => resolve_cas(cluster, &r).await?,
                v => v,
            };
            next = r.seq.next();
            if let HistoryVerdict::Change(c) = verdict {
                // After a delete the key is absent, which a cas expects as version 0.
                let version = match c.op {
                    ChangeOp::Put => c.version,
                    ChangeOp::Delete => Seq(0),
                };
                known.insert(key, version);
                if c.key.starts_with(prefix) {
                    changes.push(c);
                    if changes.len() >= max {
                        break;
                    }
                }
            }
        }
    }
    Ok(WatchBatch {
        changes,
        next,
        commit_seq: commit,
    })
}

/// A cas the history cannot judge: it took effect iff the key's current version is its seq.
async fn resolve_cas(cluster: &Cluster, r: &Record) -> Result<HistoryVerdict, KvError> {
    match reads::get(cluster, r.op.key().to_string()).await {
        Ok(v) if v.version == r.seq => Ok(HistoryVerdict::Change(change(&r.op, r.seq))),
        Ok(_) | Err(KvError::NotFound) => Ok(HistoryVerdict::Nothing),
        Err(e) => Err(e),
    }
}

/// One page of records from an in-sync node, or `Compacted`.
async fn fetch_page(cluster: &Cluster, from: Seq, commit: Seq) -> Result<Vec<Record>, KvError> {
    let members = {
        let mut m = cluster.m();
        m.check_available(cluster.config.min_insync)?;
        m.read_order()
    };
    let mut last_err = KvError::Unavailable("no in-sync storage node is registered".into());
    for id in members {
        match cluster.pool.fetch(&id, from, HISTORY_PAGE).await {
            Ok(FetchReply::Records(records)) => return Ok(records),
            Ok(FetchReply::SnapshotNeeded { snapshot_seq, .. }) => {
                return Err(KvError::Compacted {
                    from,
                    snapshot_seq,
                    current: commit.next(),
                })
            }
            Err(e) => last_err = e,
        }
    }
    Err(last_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use walkv_shared::Epoch;

    fn rec(seq: u64, op: WriteOp) -> Record {
        Record {
            seq: Seq(seq),
            epoch: Epoch(1),
            client: "c".into(),
            op_no: seq,
            op,
        }
    }

    fn put(k: &str, v: &str) -> WriteOp {
        WriteOp::Put {
            key: k.into(),
            value: v.into(),
        }
    }

    fn ch(k: &str, v: u64) -> Change {
        change(&put(k, "x"), Seq(v))
    }

    #[test]
    fn only_written_outcomes_become_changes() {
        let records = [
            rec(1, put("a", "1")),
            rec(2, WriteOp::Delete { key: "b".into() }),
            rec(
                3,
                WriteOp::Cas {
                    key: "a".into(),
                    expected: Seq(9),
                    value: "2".into(),
                },
            ),
            rec(4, WriteOp::Delete { key: "a".into() }),
        ];
        let outcomes = [
            Outcome::Written { version: Seq(1) },
            Outcome::NotFound,
            Outcome::VersionMismatch { current: Seq(1) },
            Outcome::Written { version: Seq(4) },
        ];
        let c = changes_of(&records, &outcomes);
        assert_eq!(c.len(), 2);
        assert_eq!((c[0].op, c[0].value.as_deref()), (ChangeOp::Put, Some("1")));
        assert_eq!((c[1].op, c[1].value.as_deref()), (ChangeOp::Delete, None));
    }

    #[test]
    fn ring_serves_from_its_coverage_and_filters_prefix_and_commit() {
        let log = ChangeLog::default();
        assert!(
            log.read("", Seq(1), Seq(10), 10).is_none(),
            "nothing published"
        );
        log.publish(
            Seq(5),
            Seq(7),
            vec![ch("a/1", 5), ch("b/1", 6), ch("a/2", 7)],
        );
        assert!(
            log.read("", Seq(4), Seq(10), 10).is_none(),
            "4 is before coverage"
        );
        let got = log.read("a/", Seq(5), Seq(10), 10).unwrap();
        assert_eq!(got.iter().map(|c| c.version.0).collect::<Vec<_>>(), [5, 7]);
        let got = log.read("", Seq(6), Seq(6), 10).unwrap();
        assert_eq!(got.len(), 1, "never past the commit index");
        // A batch that skips seqs restarts coverage.
        log.publish(Seq(20), Seq(20), vec![ch("a/3", 20)]);
        assert_eq!(log.covered_from(), Seq(20));
        assert!(log.read("", Seq(7), Seq(20), 10).is_none());
    }

    #[test]
    fn ring_is_bounded_and_coverage_moves_with_eviction() {
        let log = ChangeLog::default();
        let n = CHANGE_LOG_MAX as u64 + 10;
        for s in 1..=n {
            log.publish(Seq(s), Seq(s), vec![ch("k", s)]);
        }
        assert_eq!(log.covered_from(), Seq(11));
        assert_eq!(
            log.read("", Seq(11), Seq(n), 1).unwrap()[0].version,
            Seq(11)
        );
    }

    #[test]
    fn history_cas_is_judged_by_known_versions() {
        let cas = rec(
            9,
            WriteOp::Cas {
                key: "k".into(),
                expected: Seq(3),
                value: "v".into(),
            },
        );
        assert!(matches!(
            classify(&cas, Some(Seq(3))),
            HistoryVerdict::Change(_)
        ));
        assert!(matches!(
            classify(&cas, Some(Seq(4))),
            HistoryVerdict::Nothing
        ));
        assert!(matches!(classify(&cas, None), HistoryVerdict::Unknown));
        assert!(matches!(
            classify(&rec(2, put("k", "v")), None),
            HistoryVerdict::Change(_)
        ));
    }
}
