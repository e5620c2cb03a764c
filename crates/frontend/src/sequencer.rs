//! The write path: one task that orders, batches and replicates every write.
//!
//! Clients' writes wait in a bounded queue (`write_queue`; a full queue makes callers wait,
//! which is the backpressure). The sequencer takes what is queued, up to `batch_max`
//! records and [`BATCH_MAX_BYTES`], and under the write gate:
//!
//! 1. refuses the batch with `Unavailable` unless serving with at least `min_insync` members;
//! 2. assigns consecutive seqs after the last batch in flight (or from `next_seq`), stamps
//!    the epoch ([`build_records`], pure);
//! 3. sends one `append` to every ISR member concurrently (deadline `rpc_timeout_ms`), and
//!    goes on to the next batch while this one replicates, up to `pipeline_depth` batches
//!    in flight ([`may_start`]);
//! 4. when the oldest batch's appends have answered, removes every member that failed from
//!    the ISR and **persists the new ISR before acknowledging anything**;
//! 5. if fewer than `min_insync` current members acked (or every member failed), answers
//!    `Timeout` (outcome unknown: the records may survive on a member) to it and to every
//!    batch behind it, and enters recovery, which bumps the epoch and re-establishes the
//!    truth;
//! 6. otherwise publishes the batch's changes to the watch ring ([`crate::watch`], never
//!    blocks), advances the commit index and answers each write from the deterministic
//!    [`Outcome`] its record produced ([`outcome_result`]); when more writes are queued,
//!    the answers go out just after the next batch's appends are started (`Answers`).
//!
//! Invariants: batches commit in seq order, each only after every batch before it; seqs
//! are assigned without gaps and never reused within an epoch (recovery resets `next_seq`
//! to `L + 1` and bumps the epoch); a write is acknowledged only after every ISR member at
//! that moment fsynced it (the ISR cannot grow while batches are in flight: joining needs
//! the gate); the gate is held exactly while batches are in flight.

use crate::cluster::{Cluster, GateGuard};
use crate::isr::IsrChange;
use futures::stream::{FuturesOrdered, StreamExt};
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, warn};
use walkv_shared::rpc::{append_bytes, AppendRequest, BATCH_MAX_BYTES};
use walkv_shared::types::{Outcome, WriteRequest, WriteResult};
use walkv_shared::{Epoch, KvError, NodeId, Record, Seq};

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

/// What a write adds to an append frame, escaping included (see [`BATCH_MAX_BYTES`]).
fn job_bytes(job: &WriteJob) -> usize {
    append_bytes(&job.req.client, &job.req.op)
}

/// Runs the sequencer until shutdown; then answers whatever is still queued `Unavailable`.
pub async fn run(
    cluster: Arc<Cluster>,
    mut rx: mpsc::Receiver<WriteJob>,
    mut shutdown: watch::Receiver<bool>,
) {
    let batch_max = cluster.config.batch_max as usize;
    let depth = cluster.config.pipeline_depth as usize;
    let mut pipeline = Pipeline::default();
    // The answers of the last committed batch, held while the next batch is started.
    let mut held = Answers::default();
    // A write taken from the queue while waiting on the pipeline: it opens the next batch.
    let mut carried: Option<WriteJob> = None;
    let mut queue_open = true;
    loop {
        // While the cluster is unavailable a pass can refuse a batch without awaiting
        // anything; this lets the runtime's other tasks run between such passes.
        tokio::task::consume_budget().await;
        if *shutdown.borrow() {
            break;
        }
        if pipeline.is_empty() {
            // The gate is held exactly while batches are in flight.
            pipeline.gate = None;
        }
        if pipeline.has_room(&cluster, depth) {
            let first = match carried.take().or_else(|| rx.try_recv().ok()) {
                Some(job) => Some(job),
                None if pipeline.is_empty() => {
                    // Nothing in flight and nothing to start: answer now, then wait.
                    held.send();
                    tokio::select! {
                        job = rx.recv() => match job { Some(j) => Some(j), None => break },
                        _ = shutdown.wait_for(|s| *s) => break,
                    }
                }
                None => None,
            };
            if let Some(first) = first {
                let batch = take_batch(first, &mut rx, batch_max);
                if !batch.is_empty() {
                    pipeline.start(&cluster, batch, &mut held).await;
                }
                held.send();
                continue;
            }
        }
        // Wait for the oldest batch, or for a write to start another batch beside it.
        held.send();
        let room = queue_open && carried.is_none() && pipeline.has_room(&cluster, depth);
        let results = tokio::select! {
            biased;
            results = pipeline.results.next() => results.expect("one future per batch in flight"),
            job = rx.recv(), if room => {
                match job {
                    Some(job) => carried = Some(job),
                    None => queue_open = false,
                }
                continue;
            }
        };
        held = pipeline.finish_oldest(&cluster, results).await;
    }
    held.send();
    // Batches in flight get their real answers (each append is bounded by the RPC timeout).
    while let Some(results) = pipeline.results.next().await {
        pipeline.finish_oldest(&cluster, results).await.send();
    }
    if let Some(job) = carried {
        let _ = job.reply.send(Err(KvError::Unavailable(
            "frontend is shutting down".into(),
        )));
    }
    rx.close();
    while let Ok(job) = rx.try_recv() {
        let _ = job.reply.send(Err(KvError::Unavailable(
            "frontend is shutting down".into(),
        )));
    }
}

/// Whether a batch may start with `in_flight` batches replicating: always when none is
/// (the gate is taken fairly then), else only below `depth` and while no other task waits
/// for the write gate, so the pipeline drains and lets an ISR change in. Pure.
pub fn may_start(in_flight: usize, depth: usize, gate_contended: bool) -> bool {
    in_flight == 0 || (in_flight < depth && !gate_contended)
}

/// Takes `first` and what is queued behind it, up to `batch_max` writes and
/// [`BATCH_MAX_BYTES`]; drops the writes whose clients already gave up.
fn take_batch(
    first: WriteJob,
    rx: &mut mpsc::Receiver<WriteJob>,
    batch_max: usize,
) -> Vec<WriteJob> {
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
    batch
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

/// What every target answered to one batch's append.
type AppendResults = Vec<(NodeId, Result<Vec<Outcome>, KvError>)>;

/// One batch's appends to every target, answering when the last has answered.
type Appends<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = AppendResults> + Send + 'a>>;

/// A batch whose appends are on their way to the nodes.
struct SentBatch {
    batch: Vec<WriteJob>,
    req: AppendRequest,
    first: Seq,
    last: Seq,
}

/// The batches in flight, oldest first, and the write gate while there are any.
///
/// Batch `n + 1` may be sent before batch `n` is acknowledged (up to `pipeline_depth`
/// batches), so a node's disk is never idle waiting for the frontend's round trip. Every
/// node receives them in order over its one connection and keeps its log without gaps
/// (an append that arrives before the one it follows waits for it; see the storage node's
/// `append`). Batches commit strictly in order: a batch is acknowledged only once every
/// batch before it committed, and when one fails in a way that needs recovery, every batch
/// behind it is answered `Timeout` (outcome unknown) and the pipeline is emptied.
///
/// Every batch's appends are polled while it is in flight (not only the oldest's), so an
/// append that could not be handed to its connection at once (a node being connected to)
/// goes out as soon as it can.
#[derive(Default)]
struct Pipeline<'a> {
    gate: Option<GateGuard<'a>>,
    batches: VecDeque<SentBatch>,
    /// The batches' appends, in the same order as `batches`.
    results: FuturesOrdered<Appends<'a>>,
}

impl<'a> Pipeline<'a> {
    fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// Whether another batch may start now (see [`may_start`]).
    fn has_room(&self, cluster: &Cluster, depth: usize) -> bool {
        may_start(self.batches.len(), depth, cluster.gate.contended())
    }

    /// Starts replicating `batch`: takes the gate if needed, assigns seqs after the last
    /// batch in flight and hands the appends to the connections. Sends `held` once the
    /// appends are started (or before waiting for the gate). A refused batch is answered
    /// at once.
    async fn start(&mut self, cluster: &'a Cluster, batch: Vec<WriteJob>, held: &mut Answers) {
        if self.gate.is_none() {
            // Recovery holds the gate for as long as it takes: the held answers do not
            // wait on it.
            self.gate = Some(match cluster.gate.try_lock() {
                Some(gate) => gate,
                None => {
                    held.send();
                    cluster.gate.lock().await
                }
            });
        }
        let (epoch, targets, first) = {
            let m = cluster.m();
            if let Err(e) = m.check_available(cluster.config.min_insync) {
                drop(m);
                answer_all(batch, e);
                return;
            }
            let first = match self.batches.back() {
                Some(b) => b.last.next(),
                None => m.next_seq,
            };
            (
                m.state.epoch,
                m.state.isr.iter().cloned().collect::<Vec<NodeId>>(),
                first,
            )
        };
        let records = build_records(batch.iter().map(|j| &j.req), first, epoch);
        let n = records.len();
        let last = Seq(first.0 + n as u64 - 1);
        let req = AppendRequest {
            epoch,
            commit_seq: cluster.commit(),
            records: records.into(),
        };
        let calls = targets.into_iter().map(|id| {
            let req = req.clone();
            async move {
                let result = cluster.pool.append(&id, req).await;
                (id, result)
            }
        });
        let mut results: Appends<'a> = Box::pin(futures::future::join_all(calls));
        // One poll usually hands every append to its connection's dispatch task (not when
        // a node must be connected to first, or its dispatch queue is full); the previous
        // batch's clients are woken right after it, and only then.
        let results = match futures::poll!(results.as_mut()) {
            std::task::Poll::Ready(r) => Box::pin(std::future::ready(r)) as _,
            std::task::Poll::Pending => results,
        };
        self.batches.push_back(SentBatch {
            batch,
            req,
            first,
            last,
        });
        self.results.push_back(results);
        crate::metrics::METRICS.batch_started(n, self.batches.len());
    }

    /// Handles the oldest batch's append results: shrinks the ISR by the members that
    /// failed, and commits the batch or (when it cannot) answers it and every batch behind
    /// it `Timeout`. Returns the committed batch's answers, not yet sent.
    async fn finish_oldest(&mut self, cluster: &Cluster, results: AppendResults) -> Answers {
        let SentBatch {
            batch,
            req,
            first,
            last,
        } = self
            .batches
            .pop_front()
            .expect("finishing an empty pipeline");
        let min_insync = cluster.config.min_insync as usize;
        let n = req.records.len();
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
                self.abandon_behind(first, last);
                return answer_all(
                    batch,
                    KvError::Timeout(format!("replication of seq {first}..={last} failed")),
                );
            }
        }
        // Only members of the ISR as it is now count: a member that left it while an
        // earlier batch failed may still acknowledge this one.
        {
            let m = cluster.m();
            acked.retain(|(id, _)| m.state.isr.contains(id));
        }
        if acked.len() < min_insync {
            cluster.m().start_recovery(format!(
                "only {} in-sync node(s) acknowledged seq {first}..={last}",
                acked.len()
            ));
            self.abandon_behind(first, last);
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

    /// Answers every batch still in flight (all behind the failed batch `first..=last`)
    /// `Timeout`: its records may survive on a node, recovery decides. Stops waiting for
    /// their appends.
    fn abandon_behind(&mut self, first: Seq, last: Seq) {
        self.results = FuturesOrdered::new();
        for b in self.batches.drain(..) {
            answer_all(
                b.batch,
                KvError::Timeout(format!(
                    "replication of seq {}..={} abandoned: the batch before it (seq {first}..={last}) failed",
                    b.first, b.last
                )),
            );
        }
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
    fn a_batch_of_escaped_values_fits_a_storage_nodes_frame() {
        // Values just under the limit made of control characters, which JSON writes in 6
        // bytes each: counted by raw bytes, two shared a batch and its append frame was
        // ~12 MiB, over the nodes' 8 MiB limit (every node dropped the connection).
        let (tx, mut rx) = mpsc::channel(16);
        let mut answers = Vec::new();
        for i in 0..8 {
            let (reply, answer) = oneshot::channel();
            answers.push(answer);
            let req = WriteRequest {
                client: format!("c{i}"),
                op_no: 1,
                op: WriteOp::Put {
                    key: format!("k{i}"),
                    value: "\u{1}".repeat(1_000_000),
                },
            };
            tx.try_send(WriteJob { req, reply }).unwrap();
        }
        let mut frames = Vec::new();
        while let Ok(first) = rx.try_recv() {
            let batch = take_batch(first, &mut rx, 64);
            let records = build_records(batch.iter().map(|j| &j.req), Seq(1), Epoch(1));
            let append = AppendRequest {
                epoch: Epoch(1),
                commit_seq: Seq(0),
                records: records.into(),
            };
            frames.push(serde_json::to_vec(&append).unwrap().len());
        }
        assert_eq!(
            frames.len(),
            8,
            "each such write is a batch of its own: {frames:?}"
        );
        let limit = 8 << 20;
        assert!(
            frames.iter().all(|&f| f <= limit),
            "append frames {frames:?} > {limit}"
        );
    }

    #[test]
    fn a_batch_starts_below_the_depth_unless_an_isr_change_waits() {
        assert!(may_start(0, 1, false));
        assert!(
            may_start(0, 2, true),
            "an empty pipeline takes the gate in turn"
        );
        assert!(!may_start(1, 1, false), "depth 1: one batch at a time");
        assert!(may_start(1, 2, false));
        assert!(
            !may_start(1, 2, true),
            "a waiting ISR change drains the pipeline"
        );
        assert!(!may_start(2, 2, false));
        assert!(may_start(3, 4, false));
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
