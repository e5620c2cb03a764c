//! Linearizable reads.
//!
//! A read goes to an ISR member (round robin) with `min_seq = commit index`, so the node
//! first applies every write that completed before the read began. Concurrent reads of one
//! node share a `read_many` call ([`crate::read_batch`]). The node's answer may
//! reflect a newer, not yet committed record (a batch in flight): its `last_touch` (for a
//! scan, the node's `applied` seq) tells, and the frontend answers only once the commit
//! index reaches it. Catching-up nodes are never asked.
//!
//! A not yet committed record can also be discarded: when a recovery takes a node that
//! never got it as the truth, the next epoch writes another record at its seq, and the
//! commit index passes that seq all the same. So an answer that reflected a record above
//! the commit index the read began with counts only if the commit index reached it in the
//! epoch the read began in; after a recovery the read starts over (see [`vouched`]).
//!
//! Every step is bounded by the request deadline (`request_timeout_ms`): a node that
//! cannot reach `min_seq` (it left the ISR meanwhile) times out and the next member is
//! tried; waiting for a commit that never comes ends in `Timeout`.

use crate::cluster::Cluster;
use std::time::Instant;
use tracing::debug;
use walkv_shared::types::{KeyValue, Versioned};
use walkv_shared::{Epoch, KvError, NodeId, Seq};

/// Where a read began: the commit index the node is asked to reach, and the epoch (which
/// every recovery raises).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ReadStart {
    commit: Seq,
    epoch: Epoch,
}

/// Whether a node's answer, which reflects its log up to `seen`, is committed, given that
/// the commit index has reached `seen` and the epoch is now `now`.
///
/// Up to the commit index the read began with, it was committed before the read began.
/// Above it, the answer reflected a record in flight: one epoch assigns each seq once, so
/// in the read's own epoch the record committed at `seen` is the one the node answered
/// with; after a recovery it may be another record at the same seq.
fn vouched(start: ReadStart, seen: Seq, now: Epoch) -> bool {
    seen <= start.commit || now == start.epoch
}

/// How a read attempt ended.
enum Attempt<T> {
    /// The answer, committed.
    Done(T),
    /// A recovery ran while the read waited for its answer to commit: read again.
    Again,
}

/// Waits until the node's answer (reflecting its log up to `seen`) is committed; `false`
/// when a recovery since the read began makes it unusable.
async fn settle(
    cluster: &Cluster,
    start: ReadStart,
    seen: Seq,
    deadline: Instant,
) -> Result<bool, KvError> {
    if seen <= start.commit {
        return Ok(true);
    }
    wait_commit(cluster, seen, deadline).await?;
    Ok(vouched(start, seen, cluster.m().state.epoch))
}

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

/// The members to try and where the read begins, or `Unavailable`.
fn begin(cluster: &Cluster) -> Result<(Vec<NodeId>, ReadStart), KvError> {
    // The commit index first: any epoch read after it is at least the one it belongs to.
    let commit = cluster.commit();
    let mut m = cluster.m();
    m.check_available(cluster.config.min_insync)?;
    let order = m.read_order();
    if order.is_empty() {
        return Err(KvError::Unavailable(
            "no in-sync storage node is registered".into(),
        ));
    }
    let start = ReadStart {
        commit,
        epoch: m.state.epoch,
    };
    Ok((order, start))
}

/// Runs read attempts until one is done, within the deadline.
async fn until_done<T, F, Fut>(deadline: Instant, mut attempt: F) -> Result<T, KvError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Attempt<T>, KvError>>,
{
    loop {
        match attempt().await? {
            Attempt::Done(v) => return Ok(v),
            Attempt::Again if Instant::now() < deadline => {
                debug!(
                    "a recovery ran while a read waited for its answer to commit; reading again"
                );
            }
            Attempt::Again => {
                return Err(KvError::Timeout(
                    "a recovery ran while the read waited for its answer to commit".into(),
                ))
            }
        }
    }
}

/// Reads one key.
pub async fn get(cluster: &Cluster, key: String) -> Result<Versioned, KvError> {
    let deadline = Instant::now() + cluster.config.request_timeout();
    if cluster.config.unsafe_read_any_node {
        // Boxed: a direct tarpc call's state would otherwise enlarge every get's future.
        return Box::pin(get_from_any_node(cluster, key, deadline)).await;
    }
    until_done(deadline, || get_once(cluster, &key, deadline))
        .await?
        .ok_or(KvError::NotFound)
}

async fn get_once(
    cluster: &Cluster,
    key: &str,
    deadline: Instant,
) -> Result<Attempt<Option<Versioned>>, KvError> {
    let (members, start) = begin(cluster)?;
    let mut last_err = None;
    for id in members {
        let read = cluster
            .reads
            .read(&cluster.pool, &id, key.to_string(), start.commit, deadline);
        match read.await {
            Ok(reply) => {
                return Ok(
                    match settle(cluster, start, reply.last_touch, deadline).await? {
                        true => Attempt::Done(reply.value),
                        false => Attempt::Again,
                    },
                );
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
    until_done(deadline, || scan_once(cluster, &prefix, limit, deadline)).await
}

async fn scan_once(
    cluster: &Cluster,
    prefix: &str,
    limit: u32,
    deadline: Instant,
) -> Result<Attempt<Vec<KeyValue>>, KvError> {
    let (members, start) = begin(cluster)?;
    let mut last_err = None;
    for id in members {
        match cluster
            .pool
            .scan(&id, prefix.to_string(), limit, start.commit, deadline)
            .await
        {
            Ok(reply) => {
                return Ok(
                    match settle(cluster, start, reply.applied, deadline).await? {
                        true => Attempt::Done(reply.items),
                        false => Attempt::Again,
                    },
                );
            }
            // The same answer on every node: the client must ask for fewer keys.
            Err(e @ KvError::TooLarge { .. }) => return Err(e),
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

#[cfg(test)]
mod tests {
    use super::{vouched, ReadStart};
    use walkv_shared::{Epoch, Seq};

    const START: ReadStart = ReadStart {
        commit: Seq(10),
        epoch: Epoch(3),
    };

    #[test]
    fn an_answer_committed_before_the_read_began_stands_across_recoveries() {
        assert!(vouched(START, Seq(10), Epoch(3)));
        assert!(vouched(START, Seq(7), Epoch(4)));
        assert!(vouched(START, Seq(10), Epoch(9)));
    }

    #[test]
    fn an_answer_from_a_record_in_flight_stands_only_in_the_epoch_the_read_began_in() {
        assert!(vouched(START, Seq(11), Epoch(3)));
        // After a recovery the record at seq 11 may be another one: read again.
        assert!(!vouched(START, Seq(11), Epoch(4)));
        assert!(!vouched(START, Seq(12), Epoch(5)));
    }
}
