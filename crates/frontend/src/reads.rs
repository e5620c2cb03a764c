//! Linearizable reads.
//!
//! A read goes to an ISR member (round robin) with `min_seq = commit index`, so the node
//! first applies every write that completed before the read began. Concurrent reads of one
//! node share a `read_many` call ([`crate::read_batch`]). The node's answer may
//! reflect a newer, not yet committed record (a batch in flight): its `last_touch` (for a
//! scan, the node's `applied` seq) tells, and the frontend answers only once the commit
//! index reaches it. Catching-up nodes are never asked.
//!
//! Every step is bounded by the request deadline (`request_timeout_ms`): a node that
//! cannot reach `min_seq` (it left the ISR meanwhile) times out and the next member is
//! tried; waiting for a commit that never comes ends in `Timeout`.

use crate::cluster::Cluster;
use std::time::Instant;
use tracing::debug;
use walkv_shared::types::{KeyValue, Versioned};
use walkv_shared::{KvError, NodeId, Seq};

/// Waits until the commit index reaches `seq`, or the deadline.
async fn wait_commit(cluster: &Cluster, seq: Seq, deadline: Instant) -> Result<(), KvError> {
    // The common case, without subscribing to the commit index.
    if cluster.commit() >= seq {
        return Ok(());
    }
    // Boxed: the timer and subscription would otherwise enlarge every read's future.
    Box::pin(wait_commit_slow(cluster, seq, deadline)).await
}

async fn wait_commit_slow(cluster: &Cluster, seq: Seq, deadline: Instant) -> Result<(), KvError> {
    let mut rx = cluster.commit_tx.subscribe();
    let waited = tokio::time::timeout_at(deadline.into(), rx.wait_for(|c| *c >= seq))
        .await
        .map(|r| r.is_ok());
    match waited {
        Ok(true) => Ok(()),
        Ok(false) => Err(KvError::Unavailable("frontend is shutting down".into())),
        Err(_) => Err(KvError::Timeout(format!(
            "read waited for seq {seq} to commit"
        ))),
    }
}

/// The members to try, or `Unavailable`.
fn members(cluster: &Cluster) -> Result<Vec<NodeId>, KvError> {
    let mut m = cluster.m();
    m.check_available(cluster.config.min_insync)?;
    let order = m.read_order();
    if order.is_empty() {
        return Err(KvError::Unavailable(
            "no in-sync storage node is registered".into(),
        ));
    }
    Ok(order)
}

/// Reads one key.
pub async fn get(cluster: &Cluster, key: String) -> Result<Versioned, KvError> {
    let deadline = Instant::now() + cluster.config.request_timeout();
    if cluster.config.unsafe_read_any_node {
        // Boxed: a direct tarpc call's state would otherwise enlarge every get's future.
        return Box::pin(get_from_any_node(cluster, key, deadline)).await;
    }
    let commit = cluster.commit();
    let mut last_err = None;
    for id in members(cluster)? {
        let read = cluster
            .reads
            .read(&cluster.pool, &id, key.clone(), commit, deadline);
        match read.await {
            Ok(reply) => {
                wait_commit(cluster, reply.last_touch, deadline).await?;
                return reply.value.ok_or(KvError::NotFound);
            }
            Err(e) => {
                debug!(node = %id, error = %e, "read failed; trying another in-sync node");
                last_err = Some(e);
            }
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    Err(unreachable(last_err))
}

/// The `unsafe_read_any_node` negative control: the first registered node that answers,
/// ISR or not, with `min_seq = 0` and no wait for the commit index. Deliberately wrong.
async fn get_from_any_node(
    cluster: &Cluster,
    key: String,
    deadline: Instant,
) -> Result<Versioned, KvError> {
    let nodes = cluster.m().read_order_any();
    let mut last_err = None;
    for id in nodes {
        match cluster.pool.read(&id, key.clone(), Seq(0), deadline).await {
            Ok(reply) => return reply.value.ok_or(KvError::NotFound),
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    Err(unreachable(last_err))
}

/// Scans a prefix.
pub async fn scan(cluster: &Cluster, prefix: String, limit: u32) -> Result<Vec<KeyValue>, KvError> {
    let deadline = Instant::now() + cluster.config.request_timeout();
    let commit = cluster.commit();
    let mut last_err = None;
    for id in members(cluster)? {
        match cluster
            .pool
            .scan(&id, prefix.clone(), limit, commit, deadline)
            .await
        {
            Ok(reply) => {
                wait_commit(cluster, reply.applied, deadline).await?;
                return Ok(reply.items);
            }
            Err(e) => {
                debug!(node = %id, error = %e, "scan failed; trying another in-sync node");
                last_err = Some(e);
            }
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    Err(unreachable(last_err))
}

fn unreachable(last: Option<KvError>) -> KvError {
    match last {
        Some(e) => KvError::Unavailable(format!("no in-sync storage node answered: {e}")),
        None => KvError::Unavailable("no in-sync storage node answered".into()),
    }
}
