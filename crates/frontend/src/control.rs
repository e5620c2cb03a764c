//! The control loop: drives recovery, the failure detector and catch-up tasks.
//!
//! Every [`CONTROL_TICK`]:
//! - run the heartbeat failure detector;
//! - while `Recovering`: bump and persist the epoch (once per recovery), ask
//!   [`decide_recovery`] whether the registered nodes allow a decision, and if so confirm
//!   the nodes' log ends with `identity` and fence them at the new epoch (except nodes that
//!   reported highest epoch 0 and are left out of the plan), truncate divergent tails, persist
//!   the new ISR and epoch table entry `(epoch, L + 1)`, set the commit index to `L` and
//!   start serving. While it waits, the reason is shown by `status`; this runs every tick,
//!   so it logs nothing per attempt (the registry warns once per registration);
//! - while `Serving`: make sure every registered node outside the ISR has a catch-up task.
//!
//! Recovery runs under the write gate, so no batch is in flight while the truth is chosen.

use crate::catchup::{
    decide_recovery, fence_in_recovery, lost_its_disk, run_catchup, Candidate, Decision, Plan,
    RecoveryInput,
};
use crate::cluster::Cluster;
use crate::isr::join_ids;
use crate::registry::detect_failures;
use crate::state::EpochStart;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};
use walkv_shared::types::LogPosition;
use walkv_shared::{Epoch, KvError, NodeId};

/// Period of the control loop: bounds how late a failure, a registration or a finished
/// recovery is acted upon, at negligible cost.
pub const CONTROL_TICK: Duration = Duration::from_millis(50);

/// When the first node relevant to recovery was seen (for the grace period).
#[derive(Debug, Default)]
struct Grace {
    since: Option<Instant>,
}

/// Runs until shutdown; aborts catch-up tasks on the way out.
pub async fn run(cluster: Arc<Cluster>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(CONTROL_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut catchups: HashMap<NodeId, (u64, JoinHandle<()>)> = HashMap::new();
    let mut grace = Grace::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => break,
        }
        detect_failures(&cluster).await;
        if !cluster.m().serving() {
            for (_, (_, task)) in catchups.drain() {
                task.abort();
            }
            recovery_step(&cluster, &mut grace).await;
            continue;
        }
        grace = Grace::default();
        let wanted = cluster.m().catching_up();
        catchups.retain(|id, (session, task)| {
            let keep = !task.is_finished() && wanted.iter().any(|(w, s)| w == id && s == session);
            if !keep {
                task.abort();
            }
            keep
        });
        for (id, session) in wanted {
            if let std::collections::hash_map::Entry::Vacant(slot) = catchups.entry(id.clone()) {
                let task = tokio::spawn(run_catchup(cluster.clone(), id, session));
                slot.insert((session, task));
            }
        }
    }
    for (_, (_, task)) in catchups.drain() {
        task.abort();
    }
}

/// One recovery attempt (see the module docs).
async fn recovery_step(cluster: &Cluster, grace: &mut Grace) {
    let _gate = cluster.gate.lock().await;
    if cluster.m().bump_epoch_if_needed() {
        let epoch = cluster.m().state.epoch;
        if let Err(e) = cluster.persist().await {
            error!(error = %e, "cannot persist the epoch bump; will retry");
            return;
        }
        info!(epoch = %epoch, "epoch bumped for recovery");
    }
    let Some(plan) = decide(cluster, grace, None) else {
        return;
    };
    // Positions from registrations may be stale (a re-run recovery): confirm them, and
    // fence every node at the new epoch while at it. The fence answers the log end behind
    // every append the node accepted before it, so an append of the old epoch that timed
    // out here but still sits in a node's queue is counted, not written after the truth
    // is chosen (where the next epoch's records would be taken for copies of it).
    //
    // Except a node with nothing to vouch for that the plan does not take
    // (`fence_in_recovery`).
    let epoch = cluster.m().state.epoch;
    let candidates: Vec<NodeId> = {
        let m = cluster.m();
        m.live()
            .filter(|(id, n)| fence_in_recovery(plan.isr.contains(id), n.highest_epoch))
            .map(|(id, _)| id.clone())
            .collect()
    };
    let answers = futures::future::join_all(candidates.into_iter().map(|id| async move {
        let confirmed = match cluster.pool.identity(&id).await {
            Ok(who) if who.id != id => Err(KvError::Internal(format!(
                "node answered identity as {}",
                who.id
            ))),
            Ok(_) => cluster.pool.fence(&id, epoch).await,
            Err(e) => Err(e),
        };
        (id, confirmed)
    }))
    .await;
    let mut fresh = Vec::new();
    let mut seen_above: Option<u64> = None;
    for (id, confirmed) in answers {
        match confirmed {
            Ok(pos) => {
                // As registered, not as now: the fence just persisted our epoch.
                let highest_epoch = cluster.m().node(&id).and_then(|n| n.highest_epoch);
                fresh.push(Candidate {
                    id,
                    pos,
                    highest_epoch,
                })
            }
            Err(KvError::Fenced { seen }) => seen_above = seen_above.max(Some(seen)),
            Err(e) => warn!(node = %id, error = %e, "cannot confirm log position for recovery"),
        }
    }
    // A node has seen a higher epoch than ours and refused the fence: jump past it.
    if let Some(seen) = seen_above {
        if let Err(e) = jump_epoch(cluster, Epoch(seen)).await {
            warn!(error = %e, "cannot persist the epoch jump; retrying");
        }
        return;
    }
    // Logs from an epoch at or above ours mean this frontend's state is older than the
    // cluster's (e.g. its data dir was replaced); nodes would fence every request, so jump
    // past that epoch first.
    if let Some(highest) = fresh.iter().map(|c| c.pos.epoch).max() {
        if highest >= cluster.m().state.epoch {
            if let Err(e) = jump_epoch(cluster, highest).await {
                warn!(error = %e, "cannot persist the epoch jump; retrying");
                return;
            }
        }
    }
    // Remember the confirmed positions: the registered ones go stale while a node keeps
    // appending, and a recovery re-run in place (no re-registration) would otherwise
    // compare against them forever ("positions changed") and never serve again.
    {
        let mut m = cluster.m();
        for c in &fresh {
            if let Some(n) = m.node_mut(&c.id) {
                n.pos = c.pos;
            }
        }
    }
    let Some(plan2) = decide(cluster, grace, Some(fresh)) else {
        return;
    };
    if plan2 != plan {
        info!("node positions changed while deciding; deciding again");
        return;
    }
    if let Err(e) = execute(cluster, plan).await {
        warn!(error = %e, "recovery attempt failed; retrying");
    }
}

/// Sets the epoch to `seen + 1` and persists it (write gate held by the caller).
async fn jump_epoch(cluster: &Cluster, seen: Epoch) -> Result<(), KvError> {
    let epoch = Epoch(seen.0 + 1);
    cluster.m().state.epoch = epoch;
    cluster.persist().await?;
    warn!(seen = %seen, epoch = %epoch, "storage nodes have seen a newer epoch than this frontend's state; epoch raised");
    Ok(())
}

/// Runs the pure decision over the registered nodes (or the given fresh positions).
fn decide(cluster: &Cluster, grace: &mut Grace, fresh: Option<Vec<Candidate>>) -> Option<Plan> {
    let mut m = cluster.m();
    let registered: Vec<Candidate> = fresh.unwrap_or_else(|| {
        m.live()
            .map(|(id, n)| Candidate {
                id: id.clone(),
                pos: n.pos,
                highest_epoch: n.highest_epoch,
            })
            .collect()
    });
    // The grace period starts with the first member that can vouch for the data.
    let relevant = registered.iter().any(|c| {
        m.state.isr.contains(&c.id) && !lost_its_disk(&m.state.isr, &c.id, c.highest_epoch)
    }) || (m.state.isr.is_empty() || cluster.unsafe_recover_armed())
        && !registered.is_empty();
    if relevant && grace.since.is_none() {
        grace.since = Some(Instant::now());
    }
    let grace_over = grace
        .since
        .is_some_and(|t| t.elapsed() >= cluster.config.recovery_grace());
    let input = RecoveryInput {
        table: &m.state.epoch_table,
        isr: &m.state.isr,
        registered: &registered,
        grace_over,
        unsafe_recover: cluster.unsafe_recover_armed(),
    };
    match decide_recovery(&input) {
        Decision::Wait { reason } => {
            m.set_recovering_reason(reason);
            None
        }
        Decision::Recover(plan) => Some(plan),
    }
}

/// Truncates, persists and starts serving. Called with the write gate held.
async fn execute(cluster: &Cluster, plan: Plan) -> Result<(), KvError> {
    let epoch = cluster.m().state.epoch;
    let truth_snapshot = cluster
        .m()
        .node(&plan.truth)
        .map(|n| n.snapshot_seq)
        .unwrap_or_default();
    if plan.truncate.iter().any(|(id, _)| *id == plan.truth) && truth_snapshot > plan.point {
        let why = format!(
            "the truth {} has a snapshot at seq {truth_snapshot} beyond its matching point {}; truncating would wipe it",
            plan.truth, plan.point
        );
        error!("{why}");
        cluster.m().set_recovering_reason(why.clone());
        return Err(KvError::Internal(why));
    }
    let mut isr = Vec::new();
    for id in &plan.isr {
        let target = plan.truncate.iter().find(|(t, _)| t == id).map(|(_, s)| *s);
        match target {
            None => isr.push(id.clone()),
            Some(after) => {
                info!(node = %id, after = %after, "truncating divergent tail");
                match cluster.pool.truncate(id, epoch, after).await {
                    Ok(pos) if pos.seq == after => isr.push(id.clone()),
                    Ok(pos) => {
                        warn!(node = %id, now = %pos.seq, wanted = %after, "truncation went further; node will catch up")
                    }
                    Err(KvError::Fenced { seen }) => {
                        jump_epoch(cluster, Epoch(seen)).await?;
                        return Err(KvError::Fenced { seen });
                    }
                    Err(e) if *id == plan.truth => return Err(e),
                    Err(e) => {
                        warn!(node = %id, error = %e, "truncation failed; node will catch up")
                    }
                }
            }
        }
    }
    if !isr.contains(&plan.truth) {
        return Err(KvError::Internal(format!(
            "the truth {} could not be truncated to seq {}",
            plan.truth, plan.point
        )));
    }
    if let Some(loss) = &plan.unsafe_loss {
        error!(
            truth = %plan.truth,
            lost_from_seq = %loss.from,
            missing = %join_ids(loss.missing.iter()),
            "UNSAFE RECOVERY: no member of the last in-sync set that kept its disk is reachable; taking {} (log up to seq {}) as the truth. \
             Acknowledged writes with seq >= {} may be lost",
            plan.truth, plan.point, loss.from
        );
    }
    {
        let mut m = cluster.m();
        m.set_recovered_isr(&isr);
        m.state.epoch_table.push(EpochStart {
            epoch,
            start_seq: plan.point.next(),
        });
        for id in &isr {
            if let Some(n) = m.node_mut(id) {
                n.pos = LogPosition {
                    epoch: n.pos.epoch,
                    seq: plan.point,
                };
                n.applied = plan.point;
            }
        }
    }
    cluster.persist().await?;
    cluster.commit_tx.send_replace(plan.point);
    cluster.m().finish_recovery(plan.point.next());
    info!(
        epoch = %epoch,
        truth = %plan.truth,
        commit = %plan.point,
        isr = %join_ids(isr.iter()),
        "recovery decided: serving"
    );
    if cluster.disarm_unsafe_recover() {
        if plan.unsafe_loss.is_some() {
            warn!("--unsafe-recover is now off: a later recovery of this frontend waits for members of the in-sync set again");
        } else {
            info!("--unsafe-recover was not needed (a member of the last in-sync set registered) and is now off");
        }
    }
    Ok(())
}
