//! Read batching: concurrent reads of one storage node share `read_many` calls.
//!
//! Each read is an RPC to a storage node, and at high concurrency the per-call cost
//! (framing, tasks, syscalls on both ends) dominates the lookup itself. Reads queue per
//! node; a node has at most [`MAX_IN_FLIGHT`] calls outstanding, and each call takes
//! everything queued (up to [`MAX_BATCH`] keys), so batches grow with load and a lone
//! read still goes out at once.
//!
//! Linearizability is unchanged: a batch asks for `min_seq` = the highest of its reads'
//! `min_seq`s. Each of those was the commit index when its read began, and the batch is
//! sent after every one of its reads began, so the state it reads lies inside every read's
//! interval. The caller ([`crate::reads`]) still waits for each key's `last_touch` to commit.
//!
//! A failed call fails every read in it with the same error; each caller then tries the
//! next in-sync node, as before. A caller that gives up (deadline, dropped request) simply
//! stops waiting; its answer is discarded.

use crate::pool::Pool;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::oneshot;
use walkv_shared::rpc::ReadReply;
use walkv_shared::{KvError, NodeId, Seq};

/// Outstanding `read_many` calls per node: one being answered while the next batch fills.
pub const MAX_IN_FLIGHT: usize = 2;
/// Most keys in one call.
pub const MAX_BATCH: usize = 256;

struct Waiting {
    key: String,
    min_seq: Seq,
    reply: oneshot::Sender<Result<ReadReply, KvError>>,
}

#[derive(Default)]
struct NodeQueue {
    waiting: Vec<Waiting>,
    in_flight: usize,
}

/// The per-node read queues.
#[derive(Default)]
pub struct ReadBatcher {
    queues: Mutex<HashMap<NodeId, NodeQueue>>,
}

impl std::fmt::Debug for ReadBatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadBatcher").finish_non_exhaustive()
    }
}

impl ReadBatcher {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, NodeQueue>> {
        // Queues hold no invariant a panicking holder could break half-way.
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads `key` from node `id` at a state of at least `min_seq`, batched with the
    /// node's other reads; gives up at `deadline`.
    pub async fn read(
        self: &Arc<Self>,
        pool: &Arc<Pool>,
        id: &NodeId,
        key: String,
        min_seq: Seq,
        deadline: Instant,
    ) -> Result<ReadReply, KvError> {
        let (tx, rx) = oneshot::channel();
        let start_sender = {
            let mut queues = self.lock();
            if !queues.contains_key(id) {
                queues.insert(id.clone(), NodeQueue::default());
            }
            let q = queues.get_mut(id).expect("inserted above");
            q.waiting.push(Waiting {
                key,
                min_seq,
                reply: tx,
            });
            let start = q.in_flight < MAX_IN_FLIGHT;
            if start {
                q.in_flight += 1;
            }
            start
        };
        if start_sender {
            tokio::spawn(self.clone().send_batches(pool.clone(), id.clone()));
        }
        match tokio::time::timeout_at(deadline.into(), rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(KvError::Internal(format!(
                "read batch for storage node {id} ended without an answer"
            ))),
            Err(_) => Err(KvError::Timeout(format!(
                "read from storage node {id} did not finish in time"
            ))),
        }
    }

    /// Sends the node's queued reads until the queue is empty, then gives its slot back.
    async fn send_batches(self: Arc<Self>, pool: Arc<Pool>, id: NodeId) {
        let mut slot = Slot {
            batcher: &self,
            id: &id,
            held: true,
        };
        loop {
            let batch = {
                let mut queues = self.lock();
                let Some(q) = queues.get_mut(&id) else { return };
                // Callers that gave up need no answer.
                q.waiting.retain(|w| !w.reply.is_closed());
                if q.waiting.is_empty() {
                    // Given back under the same lock that saw the queue empty, so a read
                    // queued right after starts a sender of its own.
                    q.in_flight -= 1;
                    slot.held = false;
                    return;
                }
                let n = q.waiting.len().min(MAX_BATCH);
                q.waiting.drain(..n).collect::<Vec<_>>()
            };
            self.send(&pool, &id, batch).await;
        }
    }

    /// One batch, re-asking for any tail the node left out (its byte cap).
    async fn send(&self, pool: &Pool, id: &NodeId, mut batch: Vec<Waiting>) {
        while !batch.is_empty() {
            let min_seq = batch.iter().map(|w| w.min_seq).max().unwrap_or_default();
            let keys = batch.iter().map(|w| w.key.clone()).collect();
            match pool.read_many(id, keys, min_seq).await {
                Ok(replies) if !replies.is_empty() && replies.len() <= batch.len() => {
                    let rest = batch.split_off(replies.len());
                    for (w, reply) in batch.into_iter().zip(replies) {
                        let _ = w.reply.send(Ok(reply));
                    }
                    batch = rest;
                }
                Ok(replies) => {
                    let e = KvError::Internal(format!(
                        "storage node {id} answered {} of {} reads",
                        replies.len(),
                        batch.len()
                    ));
                    return fail_all(batch, e);
                }
                Err(e) => return fail_all(batch, e),
            }
        }
    }
}

/// A sender's in-flight slot; given back on drop too, so a sender that panicked or was
/// cancelled (runtime shutdown) cannot leave its node without senders.
struct Slot<'a> {
    batcher: &'a ReadBatcher,
    id: &'a NodeId,
    held: bool,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if self.held {
            if let Some(q) = self.batcher.lock().get_mut(self.id) {
                q.in_flight -= 1;
            }
        }
    }
}

fn fail_all(batch: Vec<Waiting>, e: KvError) {
    for w in batch {
        let _ = w.reply.send(Err(e.clone()));
    }
}
