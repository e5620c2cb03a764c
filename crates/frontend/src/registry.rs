//! The `Registry` service (storage nodes → frontend) and the heartbeat failure detector.
//!
//! Registration:
//! - a wrong cluster token and a retired (removed) id are refused with `Unauthorized`;
//! - an id that has a live session from another process instance: the frontend asks the
//!   old address for its `identity`; if that process answers as the registered instance,
//!   the newcomer is a duplicate and is refused, otherwise the old one is gone and the new
//!   registration replaces it;
//! - every accepted registration gets a new session, and the pool reconnects to its address;
//! - a new process registering under an ISR member's id while serving may have restarted
//!   and missed writes, so it leaves the ISR through the write gate and catches up (as the
//!   last member it triggers a recovery instead, which keeps it as the truth unless it lost
//!   its disk); the same process registering again (after a lost heartbeat) keeps its place;
//! - an ISR member registering with highest epoch 0 lost its disk
//!   ([`crate::catchup::lost_its_disk`]): one warning names it, and recovery does not count
//!   it as a member.
//!
//! Heartbeats with the current session refresh the node; any other session gets
//! `Reregister`. The failure detector ([`detect_failures`]) marks a node down after
//! `failure_timeout_ms` without a heartbeat and takes it out of the ISR (persisted).

use crate::catchup::lost_its_disk;
use crate::cluster::Cluster;
use crate::isr::RegisterCheck;
use std::sync::Arc;
use std::time::Instant;
use tarpc::context::Context;
use tracing::{info, warn};
use walkv_shared::rpc::{
    HeartbeatReply, HeartbeatRequest, RegisterReply, RegisterRequest, Registry,
};
use walkv_shared::KvError;

/// Serves `Registry` for one connection.
#[derive(Clone, Debug)]
pub struct RegistryServer {
    cluster: Arc<Cluster>,
}

impl RegistryServer {
    /// A server over the shared cluster handle.
    pub fn new(cluster: Arc<Cluster>) -> RegistryServer {
        RegistryServer { cluster }
    }

    fn check_token(&self, token: &str) -> Result<(), KvError> {
        if token == self.cluster.config.cluster_token {
            Ok(())
        } else {
            Err(KvError::Unauthorized(
                "wrong cluster token: it must match the frontend's cluster_token".into(),
            ))
        }
    }
}

impl Registry for RegistryServer {
    async fn register(self, _: Context, req: RegisterRequest) -> Result<RegisterReply, KvError> {
        if let Err(e) = self.check_token(&req.token) {
            warn!(node = %req.id, addr = %req.addr, "registration refused: wrong cluster token");
            return Err(e);
        }
        let check = self.cluster.m().check_register(&req);
        if let RegisterCheck::VerifyOld { addr, instance } =
            check.inspect_err(|e| warn!(node = %req.id, error = %e, "registration refused"))?
        {
            if let Ok(who) = self.cluster.pool.identity_at(&addr).await {
                if who.id == req.id && who.instance == instance {
                    warn!(node = %req.id, live_addr = %addr, new_addr = %req.addr, "registration refused: id is live in another process");
                    return Err(KvError::Unauthorized(format!(
                        "node id {} is already live at {addr}; a second process may not use the same id",
                        req.id
                    )));
                }
            }
        }
        let (session, epoch, leave_isr, lost_disk) = {
            let mut m = self.cluster.m();
            let leave = m.rejoin_needs_isr_exit(&req.id, req.instance);
            let session = m.accept_register(&req, Instant::now());
            let reported = m.node(&req.id).and_then(|n| n.highest_epoch);
            let lost = lost_its_disk(&m.state.isr, &req.id, reported);
            (session, m.state.epoch, leave, lost)
        };
        self.cluster.pool.set_addr(&req.id, &req.addr);
        info!(node = %req.id, addr = %req.addr, epoch = %req.pos.epoch, seq = %req.pos.seq, session, "node registered");
        if lost_disk {
            warn!(node = %req.id, "in-sync node registered with highest epoch 0 (an empty data dir, or a log cut at a corrupt record): it lost data and cannot vouch for acknowledged writes; it is not counted as in sync and will catch up like a new node");
        }
        if leave_isr {
            let cluster = self.cluster.clone();
            let id = req.id.clone();
            // Detached: the ISR exit waits for the write gate (up to one batch), which must
            // not hold up the registration reply; it is self-contained and ends on its own.
            tokio::spawn(async move {
                cluster
                    .leave_isr(&[id], "in-sync node registered again (restarted)")
                    .await
            });
        }
        Ok(RegisterReply { session, epoch })
    }

    async fn heartbeat(self, _: Context, req: HeartbeatRequest) -> Result<HeartbeatReply, KvError> {
        self.check_token(&req.token)?;
        Ok(self
            .cluster
            .m()
            .heartbeat(&req.id, req.session, req.applied, Instant::now()))
    }
}

/// Marks nodes without heartbeats down and removes them from the ISR (persisted).
pub async fn detect_failures(cluster: &Cluster) {
    let down = cluster
        .m()
        .expire(Instant::now(), cluster.config.failure_timeout());
    if down.is_empty() {
        return;
    }
    for id in &down {
        warn!(node = %id, timeout_ms = cluster.config.failure_timeout_ms, "no heartbeat: node is down");
    }
    let in_isr: Vec<_> = {
        let m = cluster.m();
        down.iter()
            .filter(|id| m.state.isr.contains(*id))
            .cloned()
            .collect()
    };
    if !in_isr.is_empty() && cluster.m().serving() {
        cluster.leave_isr(&in_isr, "heartbeat timeout").await;
    }
}
