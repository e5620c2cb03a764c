//! The write path: one task that orders, batches and replicates every write.
//!
//! Clients' writes wait in a bounded queue (`write_queue`; a full queue makes callers wait,
//! which is the backpressure). The sequencer takes what is queued, up to `batch_max`
//! records and [`BATCH_MAX_BYTES`], and under the write gate:
//!
//! 1. refuses the batch with `Unavailable` unless serving with at least `min_insync` members;
//! 2. assigns consecutive seqs from `next_seq`, stamps the epoch ([`build_records`], pure);
//! 3. sends one `append` to every ISR member concurrently (deadline `rpc_timeout_ms`);
//! 4. removes every member that failed from the ISR and **persists the new ISR before
//!    acknowledging anything**;
//! 5. if fewer than `min_insync` members acked (or every member failed), answers `Timeout`
//!    (outcome unknown: the records may survive on a member) and enters recovery, which
//!    bumps the epoch and re-establishes the truth;
//! 6. otherwise publishes the batch's changes to the watch ring ([`crate::watch`], never
//!    blocks), advances the commit index and answers each write from the deterministic
//!    [`Outcome`] its record produced ([`outcome_result`]); when more writes are queued,
//!    the answers go out just after the next batch's appends are started (`Answers`).
//!
//! Invariants: one batch in flight at a time; seqs are assigned without gaps and never
//! reused within an epoch (recovery resets `next_seq` to `L + 1` and bumps the epoch);
//! a write is acknowledged only after every ISR member at that moment fsynced it.

use crate::cluster::Cluster;
use crate::isr::IsrChange;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, warn};
use walkv_shared::rpc::AppendRequest;
use walkv_shared::types::{Outcome, WriteRequest, WriteResult};
use walkv_shared::{Epoch, KvError, NodeId, Record, Seq};

/// Bytes of keys and values after which a batch is closed even below `batch_max`. A batch
/// is then at most this plus one maximal value, which keeps one append frame (JSON adds
/// some escaping and field names) well under the storage nodes' default 8 MiB frame limit,
/// and one fsync short.
pub const BATCH_MAX_BYTES: usize = 1 << 20;

/// One queued write and where to send its answer.
#[derive(Debug)]
pub struct WriteJob {
    /// The client's request.
    pub req: WriteRequest,
    /// Receives the result; dropped by a client that gave up.
    pub reply: oneshot::Sender<Result<WriteResult, KvError>>,
}

/// Turns requests into records with consecutive seqs starting at `first`. Pure.
pub fn build_records<'a>(
    reqs: impl Iterator<Item = &'a WriteRequest>,
    first: Seq,
    epoch: Epoch,
) -> Vec<Record> {
    reqs.enumerate()
        .map(|(i, r)| Record {
            seq: Seq(first.0 + i as u64),
            epoch,
            client: r.client.clone(),
            op_no: r.op_no,
            op: r.op.clone(),
        })
        .collect()
}

/// Maps a record's outcome to what the client sees. Pure.
pub fn outcome_result(outcome: &Outcome) -> Result<WriteResult, KvError> {
    match outcome {
        Outcome::Written { version } => Ok(WriteResult { version: *version }),
        Outcome::NotFound => Err(KvError::NotFound),
        Outcome::VersionMismatch { current } => Err(KvError::VersionMismatch { current: *current }),
        Outcome::StaleOp { last_op_no } => Err(KvError::InvalidInput(format!(
            "stale operation number: this client's last applied op is {last_op_no}; op numbers must increase"
        ))),
    }
}

fn job_bytes(job: &WriteJob) -> usize {
    op_bytes(&job.req.op)
}

/// Key plus value bytes of an operation: the measure behind [`BATCH_MAX_BYTES`].
pub fn op_bytes(op: &walkv_shared::Op) -> usize {
    op.key().len()
        + match op {
            walkv_shared::Op::Put { value, .. } | walkv_shared::Op::Cas { value, .. } => {
                value.len()
            }
            walkv_shared::Op::Delete { .. } => 0,
        }
}

/// Runs the sequencer until shutdown; then answers whatever is still queued `Unavailable`.
pub async fn run(
    cluster: Arc<Cluster>,
    mut rx: mpsc::Receiver<WriteJob>,
    mut shutdown: watch::Receiver<bool>,
) {
    let batch_max = cluster.config.batch_max as usize;
    // The answers of the last committed batch, held while the next batch is started.
    let mut held = Answers::default();
    loop {
        // While the cluster is unavailable a pass can refuse a batch without awaiting
        // anything; this lets the runtime's other tasks run between such passes.
        tokio::task::consume_budget().await;
        if *shutdown.borrow() {
            break;
        }
        let first = match rx.try_recv() {
            Ok(job) => job,
            Err(_) => {
                // Nothing to start: answer now, then wait.
                held.send();
                tokio::select! {
                    job = rx.recv() => match job { Some(j) => j, None => break },
                    _ = shutdown.wait_for(|s| *s) => break,
                }
            }
        };
        let mut bytes = job_bytes(&first);
        let mut batch = vec![first];
        while batch.len() < batch_max && bytes < BATCH_MAX_BYTES {
            match rx.try_recv() {
                Ok(job) => {
                    bytes += job_bytes(&job);
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        // A client that already gave up gets nothing written: skipping is safe because
        // nothing of it reached a node yet, and it keeps a backlog from growing.
        batch.retain(|j| !j.reply.is_closed());
        if batch.is_empty() {
            held.send();
        } else {
            held = replicate(&cluster, batch, held).await;
        }
    }
    held.send();
    rx.close();
    while let Ok(job) = rx.try_recv() {
        let _ = job.reply.send(Err(KvError::Unavailable(
            "frontend is shutting down".into(),
        )));
    }
}

/// The answers of a committed batch, not sent yet.
///
/// A write's answer wakes the task that serves its client, and the frontend runs its tasks
/// in the order they were woken; answering a batch of 30 clients before the next batch's
/// appends were sent would put 30 responses to encode and write ahead of those appends,
/// on the path that every queued write waits on. So the sequencer sends the answers just
/// after it has started the next batch's appends (or at once, when nothing is queued).
/// Answers are never held across an await that waits on a node.
#[derive(Default)]
struct Answers(Vec<(oneshot::Sender<Answer>, Answer)>);

/// What a write's client is told.
type Answer = Result<WriteResult, KvError>;

impl Answers {
    fn send(&mut self) {
        for (reply, result) in self.0.drain(..) {
            let _ = reply.send(result);
        }
    }
}

fn answer_all(batch: Vec<WriteJob>, err: KvError) -> Answers {
    for job in batch {
        let _ = job.reply.send(Err(err.clone()));
    }
    Answers::default()
}

/// Replicates one batch under the write gate. Sends `held` once this batch's appends are
/// started, and returns this batch's answers (errors are answered at once).
async fn replicate(cluster: &Cluster, batch: Vec<WriteJob>, mut held: Answers) -> Answers {
    let min_insync = cluster.config.min_insync as usize;
    // Recovery holds the gate for as long as it takes: the held answers do not wait on it.
    let _gate = match cluster.gate.try_lock() {
        Ok(gate) => gate,
        Err(_) => {
            held.send();
            cluster.gate.lock().await
        }
    };
    let (epoch, targets, first) = {
        let m = cluster.m();
        if let Err(e) = m.check_available(cluster.config.min_insync) {
            drop(m);
            held.send();
            return answer_all(batch, e);
        }
        (
            m.state.epoch,
            m.state.isr.iter().cloned().collect::<Vec<NodeId>>(),
            m.next_seq,
        )
    };
    let records = build_records(batch.iter().map(|j| &j.req), first, epoch);
    let last = Seq(first.0 + records.len() as u64 - 1);
    let req = AppendRequest {
        epoch,
        commit_seq: cluster.commit(),
        records: records.into(),
    };
    let n = req.records.len();
    let calls = targets.iter().map(|id| {
        let req = req.clone();
        async move { (id.clone(), cluster.pool.append(id, req).await) }
    });
    let mut results = std::pin::pin!(futures::future::join_all(calls));
    // One poll usually hands every append to its connection's dispatch task (not when a
    // node must be connected to first, or its dispatch queue is full); either way the
    // previous batch's clients are woken right after it, and only then.
    let first_poll = futures::poll!(results.as_mut());
    held.send();
    let results = match first_poll {
        std::task::Poll::Ready(r) => r,
        std::task::Poll::Pending => results.await,
    };
    let mut acked: Vec<(NodeId, Vec<Outcome>)> = Vec::new();
    let mut failed: Vec<NodeId> = Vec::new();
    for (id, result) in results {
        match result {
            Ok(outcomes) if outcomes.len() == n => acked.push((id, outcomes)),
            Ok(outcomes) => {
                warn!(node = %id, expected = n, got = outcomes.len(), "append answered the wrong number of outcomes");
                failed.push(id);
            }
            Err(e) => {
                warn!(node = %id, error = %e, first = %first, last = %last, "append failed");
                failed.push(id);
            }
        }
    }
    if !failed.is_empty() {
        let why = format!("append of seq {first}..={last} failed");
        let change = cluster.m().remove_from_isr(&failed, &why);
        let recovering = change == IsrChange::RecoveryNeeded;
        cluster.after_isr_change(change, &why).await;
        if recovering || !cluster.m().serving() {
            return answer_all(
                batch,
                KvError::Timeout(format!("replication of seq {first}..={last} failed")),
            );
        }
    }
    if acked.len() < min_insync {
        cluster.m().start_recovery(format!(
            "only {} in-sync node(s) acknowledged seq {first}..={last}",
            acked.len()
        ));
        return answer_all(
            batch,
            KvError::Timeout(format!(
                "fewer than min_insync = {min_insync} nodes acknowledged"
            )),
        );
    }
    {
        let mut m = cluster.m();
        m.next_seq = last.next();
        for (id, _) in &acked {
            if let Some(node) = m.node_mut(id) {
                node.applied = node.applied.max(last);
            }
        }
    }
    assert!(
        cluster.commit() < last,
        "commit index must only grow: {} -> {last}",
        cluster.commit()
    );
    let outcomes = &acked[0].1;
    // Published before the commit index moves, so a watcher woken by it finds the changes.
    cluster.changes.publish(
        first,
        last,
        crate::watch::changes_of(&req.records, outcomes),
    );
    cluster.commit_tx.send_replace(last);
    debug!(first = %first, last = %last, "batch committed");
    Answers(
        batch
            .into_iter()
            .zip(outcomes)
            .map(|(job, outcome)| (job.reply, outcome_result(outcome)))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use walkv_shared::types::WriteOp;

    #[test]
    fn records_get_consecutive_seqs_and_the_epoch() {
        let reqs = [
            WriteRequest {
                client: "a".into(),
                op_no: 1,
                op: WriteOp::Put {
                    key: "k".into(),
                    value: "v".into(),
                },
            },
            WriteRequest {
                client: "b".into(),
                op_no: 7,
                op: WriteOp::Delete { key: "k".into() },
            },
        ];
        let recs = build_records(reqs.iter(), Seq(10), Epoch(3));
        assert_eq!(
            recs.iter().map(|r| r.seq.0).collect::<Vec<_>>(),
            vec![10, 11]
        );
        assert!(recs.iter().all(|r| r.epoch == Epoch(3)));
        assert_eq!(recs[1].client, "b");
        assert_eq!(recs[1].op_no, 7);
    }

    #[test]
    fn outcomes_map_to_client_results() {
        assert_eq!(
            outcome_result(&Outcome::Written { version: Seq(4) }),
            Ok(WriteResult { version: Seq(4) })
        );
        assert_eq!(outcome_result(&Outcome::NotFound), Err(KvError::NotFound));
        assert_eq!(
            outcome_result(&Outcome::VersionMismatch { current: Seq(2) }),
            Err(KvError::VersionMismatch { current: Seq(2) })
        );
        assert!(matches!(
            outcome_result(&Outcome::StaleOp { last_op_no: 9 }),
            Err(KvError::InvalidInput(_))
        ));
    }
}
