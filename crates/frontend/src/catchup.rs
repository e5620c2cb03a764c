//! Matching points, the recovery decision, and catch-up of a node that is behind.
//!
//! ## Matching point (pure)
//!
//! The epoch table lists the first seq of every epoch that served. A node whose last record
//! is `(e, s)` holds a prefix of the truth up to `match = min(s, end(e))`, where `end(e)` is
//! the smallest `start_seq` of any epoch `> e`, minus one (or +inf when no later epoch
//! exists). Records of epoch `e` were written only by the frontend of epoch `e`, all to the
//! same seqs, so everything up to `end(e)` agrees; anything after `end(e)` in epoch `e` was
//! never committed and is a divergent tail to truncate. "Smallest" (not "next") matters
//! after an unsafe recovery, when a later epoch may restart below an earlier one.
//!
//! ## Recovery decision (pure, [`decide_recovery`])
//!
//! - Fresh cluster (no epoch table, empty ISR): the first registered nodes, after the grace
//!   period, form the ISR; the most advanced one is the truth.
//! - Otherwise the truth is the registered *ISR member* with the highest matching point `L`;
//!   the new ISR is every registered ISR member at `L` (after truncation). Nodes outside the
//!   ISR never become the truth: they may lack acknowledged writes.
//! - An ISR member that registers with highest epoch 0 lost its disk ([`lost_its_disk`]):
//!   every in-sync node has persisted an epoch >= 1, because it got into the ISR through
//!   recovery, which fences it at the new epoch first, or through catch-up, which fences it
//!   before it joins (`join`; a node with nothing to copy got no other request carrying
//!   the epoch). Such a node holds nothing it can vouch for, so it counts as a missing
//!   member (it catches up later like any node outside the ISR); if it alone were taken,
//!   its empty log would become the truth and the healthy members would be truncated to it.
//! - No usable ISR member registered: wait, naming the missing members (and those that lost
//!   their disk), unless `--unsafe-recover`, which takes the most advanced reachable node
//!   and reports that writes from seq `L + 1` on may be lost.
//!
//! ## Catch-up (IO, [`run_catchup`])
//!
//! One task per registered node outside the ISR: ask the node where its log ends, truncate
//! it to its matching point, then copy pages of at most `catchup_page_max` records from an
//! ISR member *through the frontend* (`fetch` → `append`), or the member's snapshot
//! (`snapshot_page` → `install_snapshot`) when the records were compacted away. Only
//! committed records are copied outside the write gate. Client traffic keeps flowing. Once
//! the node is fewer than `catchup_join_lag` records behind, the task takes the write gate
//! (no batch in flight, commit fixed), copies the rest, adds the node to the ISR and
//! persists the state before releasing the gate. Progress is logged every second and shown
//! in `status`. The task ends when its node's session, the epoch or the phase changes; the
//! control loop starts a new one when needed.

use crate::cluster::Cluster;
use crate::isr::join_ids;
use crate::state::EpochStart;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{error, info, warn};
use walkv_shared::rpc::{append_bytes, AppendRequest, FetchReply, SnapshotChunk, BATCH_MAX_BYTES};
use walkv_shared::types::{CatchUpProgress, LogPosition};
use walkv_shared::{Epoch, KvError, NodeId, Record, Seq};

/// How often catch-up progress is logged and published to `status`.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// Pause when there is nothing to copy yet (the node is level with the commit index but
/// not allowed to join, e.g. waiting for the gate) or after a failed page.
const IDLE_PAUSE: Duration = Duration::from_millis(50);
/// Upper bound of the retry backoff after failed pages.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// `end(e)`: the last seq that epoch `e` may have committed, `None` for +inf.
pub fn end_of_epoch(table: &[EpochStart], epoch: Epoch) -> Option<Seq> {
    table
        .iter()
        .filter(|t| t.epoch > epoch)
        .map(|t| t.start_seq)
        .min()
        .map(|s| Seq(s.0.saturating_sub(1)))
}

/// The highest seq up to which a log ending at `pos` agrees with the truth.
pub fn matching_point(table: &[EpochStart], pos: LogPosition) -> Seq {
    match end_of_epoch(table, pos.epoch) {
        Some(end) => pos.seq.min(end),
        None => pos.seq,
    }
}

/// A registered node considered by recovery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Node id.
    pub id: NodeId,
    /// Where its log ends.
    pub pos: LogPosition,
    /// The highest epoch persisted in its data dir when it registered (`None`: its storage
    /// binary does not report it). See [`lost_its_disk`].
    pub highest_epoch: Option<Epoch>,
}

/// Whether node `id`, which reported `highest_epoch` at registration, is listed in the
/// persisted `isr` but lost its disk: it reports epoch 0, which no in-sync node can (see
/// the module docs), so its data dir was wiped or replaced by an empty one. It cannot vouch
/// for acknowledged writes. A node that does not report its epoch (`None`, an older
/// storage binary) is trusted as before. Pure.
pub fn lost_its_disk(isr: &BTreeSet<NodeId>, id: &NodeId, highest_epoch: Option<Epoch>) -> bool {
    isr.contains(id) && highest_epoch == Some(Epoch(0))
}

/// Whether recovery fences a registered node to confirm its position: every node except
/// one that reported highest epoch 0 (nothing to vouch for, see [`lost_its_disk`]) and is
/// not taken by the plan. Fencing it would persist an epoch in its empty data dir or end a
/// cut log's disowning, so that after a frontend crash before the new ISR is persisted it
/// would look healthy; whether it is an ISR member is not asked, because the in-memory ISR
/// can be ahead of the persisted one while a failed persist is retried. Pure.
pub fn fence_in_recovery(in_plan: bool, highest_epoch: Option<Epoch>) -> bool {
    in_plan || highest_epoch != Some(Epoch(0))
}

/// What recovery knows when it decides.
#[derive(Clone, Debug)]
pub struct RecoveryInput<'a> {
    /// The persisted epoch table.
    pub table: &'a [EpochStart],
    /// The persisted ISR.
    pub isr: &'a BTreeSet<NodeId>,
    /// Registered nodes and their log ends.
    pub registered: &'a [Candidate],
    /// Whether the grace period since the first relevant registration is over.
    pub grace_over: bool,
    /// `--unsafe-recover`.
    pub unsafe_recover: bool,
}

/// Writes that an unsafe recovery cannot vouch for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnsafeLoss {
    /// Every acknowledged write with seq >= `from` may be lost.
    pub from: Seq,
    /// The last ISR, none of which was reachable.
    pub missing: Vec<NodeId>,
}

/// A decided recovery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The node whose log is the truth.
    pub truth: NodeId,
    /// `L`: the truth's matching point; the commit index after recovery.
    pub point: Seq,
    /// The new ISR: registered candidates whose matching point is `L`.
    pub isr: Vec<NodeId>,
    /// Members of the new ISR that must first drop a divergent tail: `(node, truncate after)`.
    pub truncate: Vec<(NodeId, Seq)>,
    /// Set for an unsafe recovery.
    pub unsafe_loss: Option<UnsafeLoss>,
}

/// The recovery decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Not yet; `reason` is what `status` and `Unavailable` say.
    Wait {
        /// Why the frontend still waits.
        reason: String,
    },
    /// Recover with this plan.
    Recover(Plan),
}

/// Decides whether and how to end recovery. Pure.
pub fn decide_recovery(input: &RecoveryInput<'_>) -> Decision {
    let fresh = input.table.is_empty() && input.isr.is_empty();
    if input.registered.is_empty() {
        let reason = if fresh {
            "waiting for the first storage node to register".to_string()
        } else {
            format!(
                "waiting for in-sync storage nodes to register (missing: {})",
                join_ids(input.isr.iter())
            )
        };
        return Decision::Wait { reason };
    }
    // Members that lost their disk count as missing: they hold nothing to vouch for.
    let (lost, isr_members): (Vec<&Candidate>, Vec<&Candidate>) = input
        .registered
        .iter()
        .filter(|c| input.isr.contains(&c.id))
        .partition(|c| lost_its_disk(input.isr, &c.id, c.highest_epoch));
    let (pool, unsafe_loss): (Vec<&Candidate>, bool) = if fresh {
        (input.registered.iter().collect(), false)
    } else if !isr_members.is_empty() {
        let all_here = isr_members.len() == input.isr.len();
        if !all_here && !input.grace_over {
            return Decision::Wait {
                reason: "in-sync nodes are registering (grace period)".into(),
            };
        }
        (isr_members, false)
    } else if input.unsafe_recover && input.grace_over {
        (input.registered.iter().collect(), true)
    } else if !lost.is_empty() {
        return Decision::Wait {
            reason: lost_disk_reason(input.isr, &lost),
        };
    } else {
        let reachable = join_ids(input.registered.iter().map(|c| &c.id));
        let reason = format!(
            "none of the last in-sync nodes ({}) has registered; only nodes outside the in-sync set are reachable ({reachable}), \
             which may lack acknowledged writes. Start a missing in-sync node, or restart the frontend with --unsafe-recover to \
             accept losing writes",
            join_ids(input.isr.iter())
        );
        return Decision::Wait { reason };
    };
    if fresh && !input.grace_over {
        return Decision::Wait {
            reason: "storage nodes are registering (grace period)".into(),
        };
    }
    let points: Vec<(&Candidate, Seq)> = pool
        .iter()
        .map(|c| (*c, matching_point(input.table, c.pos)))
        .collect();
    // Highest matching point wins; ties go to the smallest id so the choice is deterministic.
    let (truth, point) = points
        .iter()
        .max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.id.cmp(&a.0.id)))
        .map(|(c, p)| (c.id.clone(), *p))
        .expect("pool is non-empty: registered is non-empty and each branch keeps at least one");
    let at_point: Vec<&(&Candidate, Seq)> = points.iter().filter(|(_, p)| *p == point).collect();
    Decision::Recover(Plan {
        truth,
        point,
        isr: at_point.iter().map(|(c, _)| c.id.clone()).collect(),
        truncate: at_point
            .iter()
            .filter(|(c, p)| c.pos.seq > *p)
            .map(|(c, p)| (c.id.clone(), *p))
            .collect(),
        unsafe_loss: unsafe_loss.then(|| UnsafeLoss {
            from: point.next(),
            missing: input.isr.iter().cloned().collect(),
        }),
    })
}

/// Why recovery waits when the only registered ISR members lost their disk (`lost`).
fn lost_disk_reason(isr: &BTreeSet<NodeId>, lost: &[&Candidate]) -> String {
    let lost_ids = join_ids(lost.iter().map(|c| &c.id));
    let others: Vec<&NodeId> = isr
        .iter()
        .filter(|id| !lost.iter().any(|c| c.id == **id))
        .collect();
    let what_now = if others.is_empty() {
        "Every in-sync node lost its disk: restore one of their data dirs and restart it, or \
         restart the frontend with --unsafe-recover to serve from the most advanced reachable \
         node, accepting lost writes"
            .to_string()
    } else {
        format!(
            "Start an in-sync node that kept its disk ({}), or restart the frontend with \
             --unsafe-recover to accept losing writes",
            join_ids(others.into_iter())
        )
    };
    format!(
        "in-sync node(s) {lost_ids} registered with an empty data dir or a log cut at a corrupt \
         record (highest epoch 0): they lost data and cannot vouch for acknowledged writes, so \
         they are not used as the truth (they will catch up once recovery is done). {what_now}"
    )
}

/// Progress of one catch-up, for logs and `status`.
#[derive(Debug)]
struct Progress {
    started: Instant,
    last_log: Instant,
    done: u64,
    total: u64,
    phase: &'static str,
}

impl Progress {
    fn new(total: u64) -> Progress {
        let now = Instant::now();
        Progress {
            started: now,
            last_log: now,
            done: 0,
            total,
            phase: "log",
        }
    }

    fn snapshot(&self) -> CatchUpProgress {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = self.done as f64 / secs;
        let left = self.total.saturating_sub(self.done) as f64;
        CatchUpProgress {
            done: self.done,
            total: self.total.max(self.done),
            rate_per_sec: rate,
            eta_secs: if rate > 0.0 { left / rate } else { 0.0 },
            phase: self.phase.to_string(),
        }
    }
}

/// The current page size: halved after a failed attempt, doubled (up to
/// `catchup_page_max`) after each page copied, so that pages too large for a frame still
/// get through. (A source bounds its pages by bytes too; this covers what that bound does
/// not, such as a node of an older version.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PageSize(u32);

impl PageSize {
    /// After a failed attempt: half, at least one.
    fn shrink(&mut self) {
        self.0 = (self.0 / 2).max(1);
    }

    /// After a page copied (its records appended, or its snapshot installed): double, up
    /// to `max`. Not when the page was merely fetched: a snapshot page that fails to
    /// arrive follows a successful `fetch`, and growing then undid every shrink, so the
    /// same too-large page was asked for forever.
    fn grow(&mut self, max: u32) {
        self.0 = self.0.saturating_mul(2).min(max);
    }
}

/// Why a catch-up task stopped early.
enum Stop {
    /// The node's session, the epoch or the phase changed: a newer task (or none) takes over.
    Superseded,
    /// An RPC failed; retry after a backoff.
    Failed(KvError),
}

impl From<KvError> for Stop {
    fn from(e: KvError) -> Self {
        Stop::Failed(e)
    }
}

/// Catches `id` (registered with `session`) up and adds it to the ISR. Runs until the node
/// joins, or the session, epoch or phase changes.
pub async fn run_catchup(cluster: Arc<Cluster>, id: NodeId, session: u64) {
    let epoch = cluster.m().state.epoch;
    let mut backoff = IDLE_PAUSE;
    let mut page = PageSize(cluster.config.catchup_page_max);
    loop {
        match catch_up_once(&cluster, &id, session, epoch, &mut page).await {
            Ok(()) | Err(Stop::Superseded) => return,
            Err(Stop::Failed(e)) => {
                // A page too large for a frame fails every time; halving it makes progress.
                page.shrink();
                warn!(node = %id, error = %e, retry_in_ms = backoff.as_millis() as u64, page = page.0, "catch-up attempt failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// One attempt: truncate, copy, join.
async fn catch_up_once(
    cluster: &Cluster,
    id: &NodeId,
    session: u64,
    epoch: Epoch,
    page: &mut PageSize,
) -> Result<(), Stop> {
    check_valid(cluster, id, session, epoch)?;
    let pos = cluster.pool.identity(id).await?.pos;
    let table = cluster.m().state.epoch_table.clone();
    let point = matching_point(&table, pos);
    let mut at = pos;
    if pos.seq > point {
        info!(node = %id, from = %pos.seq, to = %point, "truncating divergent tail");
        at = cluster.pool.truncate(id, epoch, point).await?;
    }
    let start = at.seq;
    let mut progress = Progress::new(cluster.commit().0.saturating_sub(start.0));
    info!(node = %id, from = %start, commit = %cluster.commit(), "catch-up started");
    loop {
        check_valid(cluster, id, session, epoch)?;
        let commit = cluster.commit();
        if commit.0.saturating_sub(at.seq.0) < cluster.config.catchup_join_lag {
            return join(cluster, id, session, epoch, at, &mut progress, page).await;
        }
        let before = at.seq;
        at = copy_page(cluster, id, epoch, at, commit, &mut progress, page).await?;
        publish(cluster, id, at, &mut progress);
        if at.seq == before {
            tokio::time::sleep(IDLE_PAUSE).await;
        }
    }
}

/// Finishes under the write gate: copies up to the (now fixed) commit index, then joins.
async fn join(
    cluster: &Cluster,
    id: &NodeId,
    session: u64,
    epoch: Epoch,
    mut at: LogPosition,
    progress: &mut Progress,
    page: &mut PageSize,
) -> Result<(), Stop> {
    let _gate = cluster.gate.lock().await;
    check_valid(cluster, id, session, epoch)?;
    let commit = cluster.commit();
    while at.seq < commit {
        let before = at.seq;
        at = copy_page(cluster, id, epoch, at, commit, progress, page).await?;
        if at.seq == before {
            return Err(Stop::Failed(KvError::Internal(format!(
                "no progress copying to {id} at seq {before}"
            ))));
        }
    }
    if at.seq > commit {
        // Only possible via a snapshot that covered uncommitted records; the gate means
        // nothing is in flight, so those records belong to no batch and must go.
        at = cluster.pool.truncate(id, epoch, commit).await?;
        if at.seq != commit {
            return Err(Stop::Failed(KvError::Internal(format!(
                "{id} truncated to {} instead of {commit}",
                at.seq
            ))));
        }
    }
    // The node persists our epoch before it counts as in sync. A page or a truncate would
    // have done so, but a node that joins with nothing to copy (commit 0) got neither, and
    // an in-sync node reporting epoch 0 is taken for one that lost its disk.
    let fenced = cluster.pool.fence(id, epoch).await?;
    if fenced.seq != at.seq {
        return Err(Stop::Failed(KvError::Internal(format!(
            "{id} is at seq {} after the join fence, {} expected",
            fenced.seq, at.seq
        ))));
    }
    {
        let mut m = cluster.m();
        m.add_to_isr(id);
        if let Some(n) = m.node_mut(id) {
            n.applied = at.seq;
            n.pos = at;
        }
    }
    if let Err(e) = cluster.persist().await {
        // The node is in the in-memory ISR; without a persisted record of it a restart would
        // merely forget it, which is safe. Leaving it in memory is safe too.
        error!(node = %id, error = %e, "cannot persist the in-sync set after a join");
    }
    let isr = join_ids(cluster.m().state.isr.iter());
    info!(node = %id, seq = %at.seq, secs = progress.started.elapsed().as_secs_f64(), isr = %isr, "node caught up and joined the in-sync set");
    Ok(())
}

/// Copies one page (records, or a whole snapshot in pages) and returns the node's new end.
async fn copy_page(
    cluster: &Cluster,
    id: &NodeId,
    epoch: Epoch,
    at: LogPosition,
    commit: Seq,
    progress: &mut Progress,
    page: &mut PageSize,
) -> Result<LogPosition, Stop> {
    let source = pick_source(cluster)?;
    let max = page.0;
    let reply = cluster.pool.fetch(&source, at.seq.next(), max).await?;
    let end = match reply {
        FetchReply::Records(mut records) => {
            records.retain(|r| r.seq <= commit);
            let Some(last) = records.last() else {
                return Ok(at);
            };
            let end = LogPosition {
                epoch: last.epoch,
                seq: last.seq,
            };
            if records[0].seq != at.seq.next() {
                return Err(Stop::Failed(KvError::Internal(format!(
                    "{source} returned records from seq {} when {} was asked",
                    records[0].seq,
                    at.seq.next()
                ))));
            }
            progress.phase = "log";
            // In appends no larger than a write batch (escaping included), the bound a
            // node's frame limit is checked against; a fetched page may be larger.
            for chunk in byte_chunks(records) {
                let n = chunk.len() as u64;
                cluster
                    .pool
                    .append(
                        id,
                        AppendRequest {
                            epoch,
                            commit_seq: commit,
                            records: chunk.into(),
                        },
                    )
                    .await?;
                progress.done += n;
            }
            end
        }
        FetchReply::SnapshotNeeded { snapshot_seq, keys } => {
            info!(node = %id, source = %source, snapshot_seq = %snapshot_seq, keys, "records compacted away; copying snapshot");
            progress.phase = "snapshot";
            progress.total = progress.total.max(progress.done + keys);
            copy_snapshot(cluster, &source, id, epoch, snapshot_seq, progress, max).await?
        }
    };
    page.grow(cluster.config.catchup_page_max);
    Ok(end)
}

/// Time a node may take per installed key to persist a snapshot on its last chunk: a 1M-key
/// snapshot took 0.7-1 s to write on an idle 2-core machine, so 4 us per key leaves room for
/// a busy one.
const INSTALL_PER_KEY: Duration = Duration::from_micros(4);

/// Deadline of one `install_snapshot` call: `base` (`rpc_timeout_ms`), and for the last
/// chunk, which makes the node write and fsync the whole snapshot, `INSTALL_PER_KEY` more for
/// each of the `keys` installed. Before, finalising 1M keys could pass the 2 s deadline and
/// the catch-up attempt restarted. Pure.
pub fn install_timeout(base: Duration, keys: u64, last: bool) -> Duration {
    if last {
        base + INSTALL_PER_KEY * u32::try_from(keys).unwrap_or(u32::MAX)
    } else {
        base
    }
}

/// Streams `source`'s snapshot at `snapshot_seq` into `id`, page by page.
async fn copy_snapshot(
    cluster: &Cluster,
    source: &NodeId,
    id: &NodeId,
    epoch: Epoch,
    snapshot_seq: Seq,
    progress: &mut Progress,
    max: u32,
) -> Result<LogPosition, Stop> {
    let mut after: Option<String> = None;
    // The exactly-once table comes first, in pages of its own when it is large.
    let mut after_client: Option<String> = None;
    let mut first = true;
    let mut installed = 0u64;
    loop {
        let page = cluster
            .pool
            .snapshot_page(
                source,
                snapshot_seq,
                after.clone(),
                after_client.clone(),
                max,
            )
            .await?;
        if page.items.is_empty() && !page.done {
            let Some(last) = page.clients.last() else {
                return Err(Stop::Failed(KvError::Internal(format!(
                    "{source} sent an empty snapshot page for seq {snapshot_seq} that is not the last"
                ))));
            };
            after_client = Some(last.client.clone());
        }
        after = page.items.last().map(|kv| kv.key.clone()).or(after);
        let n = page.items.len() as u64;
        let chunk = SnapshotChunk {
            seq: page.seq,
            epoch: page.epoch,
            first,
            last: page.done,
            items: page.items,
            clients: page.clients,
        };
        first = false;
        installed += n;
        let timeout = install_timeout(cluster.pool.timeout(), installed, page.done);
        let pos = cluster
            .pool
            .install_snapshot(id, epoch, chunk, timeout)
            .await?;
        progress.done += n;
        if progress.last_log.elapsed() >= PROGRESS_INTERVAL {
            publish(cluster, id, LogPosition::default(), progress);
        }
        if page.done {
            info!(node = %id, seq = %pos.seq, "snapshot installed");
            return Ok(pos);
        }
    }
}

/// Splits a page into appends of at most [`BATCH_MAX_BYTES`] plus one record, the bound
/// of the write path ([`append_bytes`], escaping included), so a page of large values never
/// exceeds a storage node's frame limit.
pub fn byte_chunks(records: Vec<Record>) -> Vec<Vec<Record>> {
    let mut chunks = Vec::new();
    let mut current = Vec::new();
    let mut bytes = 0;
    for r in records {
        let b = append_bytes(&r.client, &r.op);
        if !current.is_empty() && bytes + b > BATCH_MAX_BYTES {
            chunks.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += b;
        current.push(r);
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

/// An ISR member to copy from (round robin).
fn pick_source(cluster: &Cluster) -> Result<NodeId, Stop> {
    cluster
        .m()
        .read_order()
        .into_iter()
        .next()
        .ok_or_else(|| Stop::Failed(KvError::Unavailable("no in-sync node to copy from".into())))
}

/// Stops the task when it no longer applies.
fn check_valid(cluster: &Cluster, id: &NodeId, session: u64, epoch: Epoch) -> Result<(), Stop> {
    let m = cluster.m();
    let valid = m.serving()
        && m.state.epoch == epoch
        && m.session_is(id, session)
        && !m.state.isr.contains(id);
    if valid {
        Ok(())
    } else {
        Err(Stop::Superseded)
    }
}

/// Publishes progress to `status` and logs it at most once per [`PROGRESS_INTERVAL`].
fn publish(cluster: &Cluster, id: &NodeId, at: LogPosition, progress: &mut Progress) {
    let snap = progress.snapshot();
    if let Some(n) = cluster.m().node_mut(id) {
        if at.seq > Seq(0) {
            n.applied = n.applied.max(at.seq);
        }
        n.progress = Some(snap.clone());
    }
    if progress.last_log.elapsed() >= PROGRESS_INTERVAL {
        progress.last_log = Instant::now();
        info!(
            node = %id,
            phase = %snap.phase,
            done = snap.done,
            total = snap.total,
            rate_per_sec = format!("{:.0}", snap.rate_per_sec),
            eta_secs = format!("{:.1}", snap.eta_secs),
            "catch-up progress"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_snapshot_chunk_gets_time_to_persist_every_key() {
        let base = Duration::from_secs(2);
        assert_eq!(install_timeout(base, 1_000_000, false), base);
        assert_eq!(install_timeout(base, 0, true), base);
        assert_eq!(
            install_timeout(base, 1_000_000, true),
            base + Duration::from_secs(4)
        );
    }

    fn table(entries: &[(u64, u64)]) -> Vec<EpochStart> {
        entries
            .iter()
            .map(|&(e, s)| EpochStart {
                epoch: Epoch(e),
                start_seq: Seq(s),
            })
            .collect()
    }

    fn pos(e: u64, s: u64) -> LogPosition {
        LogPosition {
            epoch: Epoch(e),
            seq: Seq(s),
        }
    }

    fn cand(id: &str, e: u64, s: u64) -> Candidate {
        Candidate {
            id: NodeId(id.into()),
            pos: pos(e, s),
            highest_epoch: Some(Epoch(e.max(1))),
        }
    }

    /// A node that restarted on an empty data dir.
    fn wiped(id: &str) -> Candidate {
        Candidate {
            highest_epoch: Some(Epoch(0)),
            ..cand(id, 0, 0)
        }
    }

    fn ids(v: &[&str]) -> BTreeSet<NodeId> {
        v.iter().map(|s| NodeId(s.to_string())).collect()
    }

    #[test]
    fn pages_are_split_by_bytes() {
        let rec = |seq: u64, len: usize| Record {
            seq: Seq(seq),
            epoch: Epoch(1),
            client: "c".into(),
            op_no: seq,
            op: walkv_shared::Op::Put {
                key: "k".into(),
                value: "v".repeat(len),
            },
        };
        let big = BATCH_MAX_BYTES / 2;
        let chunks = byte_chunks(vec![
            rec(1, big),
            rec(2, big),
            rec(3, 10),
            rec(4, BATCH_MAX_BYTES * 2),
        ]);
        let seqs: Vec<Vec<u64>> = chunks
            .iter()
            .map(|c| c.iter().map(|r| r.seq.0).collect())
            .collect();
        assert_eq!(seqs, vec![vec![1], vec![2, 3], vec![4]]);
        assert!(byte_chunks(vec![]).is_empty());
    }

    #[test]
    fn end_of_epoch_across_epochs_including_empty_ones() {
        // Epoch 1 wrote 1..=9, epoch 2 wrote nothing, epoch 3 wrote 10..=19, epoch 4 from 20.
        let t = table(&[(1, 1), (2, 10), (3, 10), (4, 20)]);
        assert_eq!(end_of_epoch(&t, Epoch(1)), Some(Seq(9)));
        assert_eq!(end_of_epoch(&t, Epoch(2)), Some(Seq(9)));
        assert_eq!(end_of_epoch(&t, Epoch(3)), Some(Seq(19)));
        assert_eq!(end_of_epoch(&t, Epoch(4)), None);
        assert_eq!(end_of_epoch(&t, Epoch(0)), Some(Seq(0)));
    }

    #[test]
    fn matching_point_cuts_divergent_tails() {
        let t = table(&[(1, 1), (2, 10), (3, 10), (4, 20)]);
        assert_eq!(
            matching_point(&t, pos(1, 5)),
            Seq(5),
            "behind: nothing to cut"
        );
        assert_eq!(
            matching_point(&t, pos(1, 14)),
            Seq(9),
            "epoch 1 tail past its end diverges"
        );
        assert_eq!(matching_point(&t, pos(3, 25)), Seq(19));
        assert_eq!(matching_point(&t, pos(4, 25)), Seq(25));
        assert_eq!(matching_point(&t, pos(0, 0)), Seq(0), "empty log");
        assert_eq!(
            matching_point(&[], pos(7, 30)),
            Seq(30),
            "no table: nothing known to diverge"
        );
    }

    #[test]
    fn matching_point_after_unsafe_recovery_restarting_lower() {
        // Epoch 5 wrote 30..; epoch 6 (unsafe) restarted at 26: epoch 5's records are cut at 25.
        let t = table(&[(4, 20), (5, 30), (6, 26)]);
        assert_eq!(matching_point(&t, pos(5, 35)), Seq(25));
        assert_eq!(
            matching_point(&t, pos(4, 28)),
            Seq(25),
            "smallest later start, not the next one"
        );
    }

    #[test]
    fn truth_is_the_isr_member_with_the_highest_matching_point() {
        let t = table(&[(1, 1), (2, 10)]);
        let isr = ids(&["a", "b"]);
        // c is outside the ISR and further ahead: never the truth.
        let reg = vec![cand("a", 2, 15), cand("b", 1, 12), cand("c", 2, 40)];
        let d = decide_recovery(&RecoveryInput {
            table: &t,
            isr: &isr,
            registered: &reg,
            grace_over: true,
            unsafe_recover: false,
        });
        let Decision::Recover(plan) = d else {
            panic!("{d:?}")
        };
        assert_eq!(plan.truth, NodeId("a".into()));
        assert_eq!(plan.point, Seq(15));
        assert_eq!(
            plan.isr,
            vec![NodeId("a".into())],
            "b matches only up to 9 and must catch up"
        );
        assert!(plan.truncate.is_empty());
        assert_eq!(plan.unsafe_loss, None);
    }

    #[test]
    fn members_at_the_point_join_and_divergent_tails_are_truncated() {
        let t = table(&[(1, 1), (2, 10)]);
        let isr = ids(&["a", "b"]);
        let reg = vec![cand("a", 1, 9), cand("b", 1, 12)];
        let Decision::Recover(plan) = decide_recovery(&RecoveryInput {
            table: &t,
            isr: &isr,
            registered: &reg,
            grace_over: true,
            unsafe_recover: false,
        }) else {
            panic!()
        };
        assert_eq!(plan.point, Seq(9));
        assert_eq!(plan.isr.len(), 2);
        assert_eq!(plan.truncate, vec![(NodeId("b".into()), Seq(9))]);
    }

    #[test]
    fn waits_for_grace_unless_every_member_is_here() {
        let t = table(&[(1, 1)]);
        let isr = ids(&["a", "b"]);
        let reg = vec![cand("a", 1, 3)];
        let d = decide_recovery(&RecoveryInput {
            table: &t,
            isr: &isr,
            registered: &reg,
            grace_over: false,
            unsafe_recover: false,
        });
        assert!(matches!(d, Decision::Wait { .. }));
        let reg = vec![cand("a", 1, 3), cand("b", 1, 3)];
        let d = decide_recovery(&RecoveryInput {
            table: &t,
            isr: &isr,
            registered: &reg,
            grace_over: false,
            unsafe_recover: false,
        });
        assert!(matches!(d, Decision::Recover(_)));
    }

    #[test]
    fn refuses_when_only_nodes_outside_the_isr_are_reachable() {
        let t = table(&[(1, 1), (3, 8)]);
        let isr = ids(&["a"]);
        let reg = vec![cand("b", 1, 5)];
        let d = decide_recovery(&RecoveryInput {
            table: &t,
            isr: &isr,
            registered: &reg,
            grace_over: true,
            unsafe_recover: false,
        });
        let Decision::Wait { reason } = d else {
            panic!("{d:?}")
        };
        assert!(
            reason.contains("(a)") && reason.contains("(b)") && reason.contains("--unsafe-recover"),
            "{reason}"
        );
        let empty: Vec<Candidate> = vec![];
        let d = decide_recovery(&RecoveryInput {
            table: &t,
            isr: &isr,
            registered: &empty,
            grace_over: true,
            unsafe_recover: true,
        });
        assert!(matches!(d, Decision::Wait { reason } if reason.contains("missing: a")));
    }

    #[test]
    fn unsafe_recovery_takes_the_best_reachable_node_and_names_the_lost_range() {
        let t = table(&[(1, 1), (3, 8)]);
        let isr = ids(&["a"]);
        let reg = vec![cand("b", 1, 5), cand("c", 3, 9)];
        let d = decide_recovery(&RecoveryInput {
            table: &t,
            isr: &isr,
            registered: &reg,
            grace_over: true,
            unsafe_recover: true,
        });
        let Decision::Recover(plan) = d else {
            panic!("{d:?}")
        };
        assert_eq!(plan.truth, NodeId("c".into()));
        assert_eq!(plan.point, Seq(9));
        assert_eq!(
            plan.unsafe_loss,
            Some(UnsafeLoss {
                from: Seq(10),
                missing: vec![NodeId("a".into())]
            })
        );
        let d = decide_recovery(&RecoveryInput {
            table: &t,
            isr: &isr,
            registered: &reg,
            grace_over: false,
            unsafe_recover: true,
        });
        assert!(
            matches!(d, Decision::Wait { .. }),
            "unsafe still waits out the grace period"
        );
    }

    #[test]
    fn fresh_cluster_adopts_registered_nodes_after_grace() {
        let isr = BTreeSet::new();
        let reg = vec![cand("a", 0, 0), cand("b", 0, 0)];
        let d = decide_recovery(&RecoveryInput {
            table: &[],
            isr: &isr,
            registered: &reg,
            grace_over: false,
            unsafe_recover: false,
        });
        assert!(matches!(d, Decision::Wait { .. }));
        let d = decide_recovery(&RecoveryInput {
            table: &[],
            isr: &isr,
            registered: &reg,
            grace_over: true,
            unsafe_recover: false,
        });
        let Decision::Recover(plan) = d else { panic!() };
        assert_eq!(plan.point, Seq(0));
        assert_eq!(plan.isr.len(), 2);
        assert_eq!(plan.truth, NodeId("a".into()));
        let none: Vec<Candidate> = vec![];
        let d = decide_recovery(&RecoveryInput {
            table: &[],
            isr: &isr,
            registered: &none,
            grace_over: true,
            unsafe_recover: false,
        });
        assert!(matches!(d, Decision::Wait { reason } if reason.contains("first storage node")));
    }

    fn input<'a>(
        t: &'a [EpochStart],
        isr: &'a BTreeSet<NodeId>,
        reg: &'a [Candidate],
        grace_over: bool,
        unsafe_recover: bool,
    ) -> RecoveryInput<'a> {
        RecoveryInput {
            table: t,
            isr,
            registered: reg,
            grace_over,
            unsafe_recover,
        }
    }

    /// Property: an in-sync node that lost its disk never becomes the truth. Registered
    /// alone, even long after the grace period, recovery waits and says why (before, its
    /// empty log became the truth and the healthy members were later truncated to it).
    #[test]
    fn an_isr_member_that_lost_its_disk_alone_is_never_the_truth() {
        let t = table(&[(1, 1), (2, 10)]);
        let isr = ids(&["a", "b"]);
        let reg = vec![wiped("a")];
        for grace_over in [false, true] {
            let d = decide_recovery(&input(&t, &isr, &reg, grace_over, false));
            let Decision::Wait { reason } = d else {
                panic!("grace_over {grace_over}: {d:?}")
            };
            assert!(
                reason.contains("node(s) a registered with an empty data dir or a log cut")
                    && reason.contains("lost data")
                    && reason.contains("kept its disk (b)")
                    && reason.contains("--unsafe-recover"),
                "{reason}"
            );
        }
        // Every member lost its disk: only --unsafe-recover (or a restored disk) helps.
        let isr = ids(&["a"]);
        let d = decide_recovery(&input(&t, &isr, &reg, true, false));
        assert!(
            matches!(&d, Decision::Wait { reason } if reason.contains("Every in-sync node lost its disk")),
            "{d:?}"
        );
    }

    /// With a healthy member registered too, the healthy one is the truth and the one that
    /// lost its disk stays out of the new ISR, also when nothing was written yet (a tie at
    /// seq 0 went to the smaller id, the wiped one). It counts as missing for the grace
    /// period: it cannot vouch, so recovery waits for the other members as usual.
    #[test]
    fn a_healthy_member_is_the_truth_and_one_that_lost_its_disk_is_left_out() {
        let t = table(&[(1, 1), (2, 10)]);
        let isr = ids(&["a", "b"]);
        let reg = vec![wiped("a"), cand("b", 2, 15)];
        assert!(matches!(
            decide_recovery(&input(&t, &isr, &reg, false, false)),
            Decision::Wait { .. }
        ));
        let d = decide_recovery(&input(&t, &isr, &reg, true, false));
        let Decision::Recover(plan) = d else {
            panic!("{d:?}")
        };
        assert_eq!((plan.truth, plan.point), (NodeId("b".into()), Seq(15)));
        assert_eq!(plan.isr, vec![NodeId("b".into())]);
        assert_eq!(plan.unsafe_loss, None);

        // Nothing written since epoch 1 began: both logs end at seq 0.
        let t = table(&[(1, 1)]);
        let reg = vec![wiped("a"), cand("b", 1, 0)];
        let d = decide_recovery(&input(&t, &isr, &reg, true, false));
        let Decision::Recover(plan) = d else {
            panic!("{d:?}")
        };
        assert_eq!(plan.truth, NodeId("b".into()));
        assert_eq!(plan.isr, vec![NodeId("b".into())], "a catches up later");
    }

    #[test]
    fn recovery_fences_only_nodes_that_vouch_or_that_the_plan_takes() {
        assert!(fence_in_recovery(false, Some(Epoch(3))));
        assert!(fence_in_recovery(false, None), "an older node: as before");
        assert!(!fence_in_recovery(false, Some(Epoch(0))), "member or not");
        assert!(
            fence_in_recovery(true, Some(Epoch(0))),
            "a fresh cluster, an unsafe truth"
        );
    }

    /// A fresh cluster starts on empty data dirs: the rule does not apply.
    #[test]
    fn a_fresh_cluster_adopts_nodes_on_empty_data_dirs() {
        let isr = BTreeSet::new();
        let reg = vec![wiped("a"), wiped("b")];
        let d = decide_recovery(&input(&[], &isr, &reg, true, false));
        let Decision::Recover(plan) = d else {
            panic!("{d:?}")
        };
        assert_eq!(plan.point, Seq(0));
        assert_eq!(plan.isr, vec![NodeId("a".into()), NodeId("b".into())]);
    }

    /// `--unsafe-recover` still recovers from what is reachable, and now reports the range
    /// it cannot vouch for when the only member it finds lost its disk.
    #[test]
    fn unsafe_recovery_still_works_with_members_that_lost_their_disk() {
        let t = table(&[(1, 1), (3, 8)]);
        let isr = ids(&["a"]);
        let reg = vec![wiped("a"), cand("c", 3, 9)];
        let Decision::Recover(plan) = decide_recovery(&input(&t, &isr, &reg, true, true)) else {
            panic!()
        };
        assert_eq!((plan.truth, plan.point), (NodeId("c".into()), Seq(9)));
        assert_eq!(
            plan.unsafe_loss,
            Some(UnsafeLoss {
                from: Seq(10),
                missing: vec![NodeId("a".into())]
            })
        );
        let reg = vec![wiped("a")];
        let Decision::Recover(plan) = decide_recovery(&input(&t, &isr, &reg, true, true)) else {
            panic!()
        };
        assert_eq!((plan.truth, plan.point), (NodeId("a".into()), Seq(0)));
        assert_eq!(plan.unsafe_loss.map(|l| l.from), Some(Seq(1)));
    }

    /// A storage binary that does not report its epoch is trusted as before.
    #[test]
    fn a_member_that_does_not_report_its_epoch_is_trusted() {
        let t = table(&[(1, 1)]);
        let isr = ids(&["a"]);
        let reg = vec![Candidate {
            highest_epoch: None,
            ..cand("a", 1, 4)
        }];
        let d = decide_recovery(&input(&t, &isr, &reg, true, false));
        assert!(
            matches!(&d, Decision::Recover(p) if p.truth == NodeId("a".into())),
            "{d:?}"
        );
        assert!(!lost_its_disk(&isr, &NodeId("a".into()), None));
        assert!(lost_its_disk(&isr, &NodeId("a".into()), Some(Epoch(0))));
        assert!(!lost_its_disk(&isr, &NodeId("z".into()), Some(Epoch(0))));
    }
}
