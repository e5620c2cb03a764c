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
//!    [`Outcome`] its record produced ([`outcome_result`]).
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
    loop {
        let first = tokio::select! {
            job = rx.recv() => match job { Some(j) => j, None => break },
            _ = shutdown.wait_for(|s| *s) => break,
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
        if !batch.is_empty() {
            replicate(&cluster, batch).await;
        }
    }
    rx.close();
    while let Ok(job) = rx.try_recv() {
        let _ = job.reply.send(Err(KvError::Unavailable(
            "frontend is shutting down".into(),
        )));
    }
}

fn answer_all(batch: Vec<WriteJob>, err: KvError) {
    for job in batch {
        let _ = job.reply.send(Err(err.clone()));
    }
}

/// Replicates one batch under the write gate and answers it.
async fn replicate(cluster: &Cluster, batch: Vec<WriteJob>) {
    let min_insync = cluster.config.min_insync as usize;
    let _gate = cluster.gate.lock().await;
    let (epoch, targets, first) = {
        let m = cluster.m();
        if let Err(e) = m.check_available(cluster.config.min_insync) {
            drop(m);
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
    let results = futures::future::join_all(calls).await;
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
    for (job, outcome) in batch.into_iter().zip(outcomes) {
        let _ = job.reply.send(outcome_result(outcome));
    }
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
