//! Registration with the frontend: register, then heartbeat, forever.
//!
//! After recovery the node is already serving `Storage`; this loop tells the frontend
//! where it is, where its log ends and the highest epoch persisted in its data dir (0 on
//! an empty data dir: the frontend then knows that, if it was in sync, it lost its disk). A frontend that is down or restarting only costs
//! warnings and retries with capped exponential backoff; the node keeps serving.
//! `Reregister` or a failed heartbeat starts a new registration (the log position may have
//! changed). `Unauthorized` from `register` (wrong token, duplicate live id, removed id)
//! is returned as an error: the caller stops the node and the process exits non-zero.

use crate::wal::writer::NodeState;
use std::sync::Arc;
use std::time::Duration;
use tarpc::client;
use tracing::{info, warn};
use walkv_shared::rpc::{HeartbeatReply, HeartbeatRequest, RegisterRequest, RegistryClient};
use walkv_shared::{transport, KvError, NodeId};

/// First retry delay after a failed registration.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest retry delay: a restarted frontend learns about the node within this.
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Deadline of one connect or register/heartbeat call.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest frame on the registry connection (requests and replies are tiny).
pub const REGISTRY_MAX_FRAME: usize = 1024 * 1024;

/// What the loop needs to know about the node.
#[derive(Clone, Debug)]
pub struct Registration {
    /// Node id.
    pub id: NodeId,
    /// Address to advertise.
    pub addr: String,
    /// Frontend's registry address.
    pub frontend: String,
    /// Cluster token.
    pub token: String,
    /// Random per-process number.
    pub instance: u64,
    /// Heartbeat interval.
    pub heartbeat: Duration,
}

/// Runs until `Unauthorized` (returned as the error message); never returns otherwise.
pub async fn run(reg: Registration, state: Arc<NodeState>) -> String {
    let mut backoff = BACKOFF_MIN;
    let mut attempt: u64 = 0;
    loop {
        attempt += 1;
        match session(&reg, &state).await {
            Ok(()) => {
                backoff = BACKOFF_MIN;
                attempt = 0;
                continue;
            }
            Err(KvError::Unauthorized(why)) => {
                return format!("frontend {} refused registration: {why}", reg.frontend)
            }
            Err(e) => {
                warn!(frontend = %reg.frontend, attempt, retry_ms = backoff.as_millis() as u64, error = %e, "cannot register with frontend; retrying")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// The registration as of now: log end, snapshot seq and the highest persisted epoch.
fn register_request(reg: &Registration, state: &NodeState) -> RegisterRequest {
    let (pos, snapshot_seq) = {
        let s = state.store();
        (s.pos(), s.snapshot_pos().seq)
    };
    RegisterRequest {
        token: reg.token.clone(),
        id: reg.id.clone(),
        addr: reg.addr.clone(),
        instance: reg.instance,
        pos,
        snapshot_seq,
        // Mirrors the `epoch` file (raised to the last record's epoch at startup), so it is
        // what a restart of this process would report too; 0 while the log is cut at a
        // corrupt record and no frontend has fenced the node since (`log-cut`).
        highest_epoch: Some(state.vouched_epoch()),
    }
}

/// One registration and the heartbeats that follow it. `Ok` means "register again now".
async fn session(reg: &Registration, state: &NodeState) -> Result<(), KvError> {
    let transport = transport::connect(&reg.frontend, RPC_TIMEOUT, REGISTRY_MAX_FRAME)
        .await
        .map_err(|e| KvError::Unavailable(format!("connect: {e}")))?;
    let client = RegistryClient::new(client::Config::default(), transport).spawn();
    let req = register_request(reg, state);
    let (pos, highest_epoch) = (req.pos, req.highest_epoch.unwrap_or_default());
    let reply = client
        .register(transport::context_with_timeout(RPC_TIMEOUT), req)
        .await??;
    info!(frontend = %reg.frontend, session = reply.session, epoch = reply.epoch.0, seq = %pos.seq, highest_epoch = highest_epoch.0, "registered with frontend");
    let mut tick = tokio::time::interval(reg.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let req = HeartbeatRequest {
            token: reg.token.clone(),
            id: reg.id.clone(),
            session: reply.session,
            applied: *state.applied.borrow(),
        };
        match client
            .heartbeat(transport::context_with_timeout(RPC_TIMEOUT), req)
            .await?
        {
            Ok(HeartbeatReply::Ok) => {}
            Ok(HeartbeatReply::Reregister) => {
                info!("frontend asked the node to register again");
                return Ok(());
            }
            Err(e) => {
                warn!(error = %e, "heartbeat refused; registering again");
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::recover;
    use crate::wal::writer::{read_epoch, WalWriter, WriterConfig};
    use std::path::Path;
    use walkv_shared::{Epoch, Seq};

    fn registration() -> Registration {
        Registration {
            id: NodeId("a".into()),
            addr: "127.0.0.1:1".into(),
            frontend: "127.0.0.1:2".into(),
            token: "t".into(),
            instance: 7,
            heartbeat: Duration::from_millis(100),
        }
    }

    /// Opens the node's data dir as startup does; returns its state and writer.
    fn open(dir: &Path) -> (Arc<NodeState>, WalWriter, crate::wal::writer::WriterThread) {
        let r = recover(dir, true, false).unwrap();
        let state = NodeState::new(dir.to_path_buf(), r.store, read_epoch(dir).unwrap());
        let cfg = WriterConfig {
            batch_max: 16,
            snapshot_every: 1_000_000,
            fsync: true,
        };
        let (w, t) = WalWriter::start(state.clone(), r.wal, cfg).unwrap();
        (state, w, t)
    }

    /// Stops the writer as shutdown does.
    async fn close(w: WalWriter, t: crate::wal::writer::WriterThread) {
        w.close().await;
        tokio::task::spawn_blocking(move || t.join()).await.unwrap();
    }

    /// The epoch a node started on `dir` registers with.
    async fn reported_epoch(dir: &Path) -> Option<Epoch> {
        let (state, w, t) = open(dir);
        let epoch = register_request(&registration(), &state).highest_epoch;
        close(w, t).await;
        epoch
    }

    /// A node on an empty data dir registers with highest epoch 0; once a frontend has
    /// fenced it (as recovery does before making it in sync) it reports that epoch, also
    /// after a restart, even though its log is still empty.
    #[tokio::test]
    async fn registration_reports_the_persisted_highest_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let (state, w, t) = open(dir.path());
        let req = register_request(&registration(), &state);
        assert_eq!(req.highest_epoch, Some(Epoch(0)));
        assert_eq!(req.pos.seq, Seq(0));
        w.truncate(Epoch(3), Seq(u64::MAX)).await.unwrap();
        assert_eq!(
            register_request(&registration(), &state).highest_epoch,
            Some(Epoch(3))
        );
        close(w, t).await;
        let (state, w, t) = open(dir.path());
        let req = register_request(&registration(), &state);
        assert_eq!((req.highest_epoch, req.pos.seq), (Some(Epoch(3)), Seq(0)));
        close(w, t).await;
    }

    /// A node whose log was cut at a corrupt record reports epoch 0 (it cannot vouch for
    /// what it acknowledged), across restarts, until a frontend fences it; then the marker
    /// is gone and it reports its epoch again.
    #[tokio::test]
    async fn a_log_cut_at_a_corrupt_record_disowns_itself_until_a_fence() {
        let dir = tempfile::tempdir().unwrap();
        let (state, w, t) = open(dir.path());
        w.truncate(Epoch(3), Seq(u64::MAX)).await.unwrap();
        close(w, t).await;
        drop(state);
        // What `--discard-corrupt-tail` leaves after cutting at seq 8.
        std::fs::write(dir.path().join(crate::wal::LOG_CUT_FILE), "8\n").unwrap();
        for _ in 0..2 {
            assert_eq!(reported_epoch(dir.path()).await, Some(Epoch(0)));
        }
        let (state, w, t) = open(dir.path());
        // A fence (a truncate past the end): a frontend took this log into account.
        w.truncate(Epoch(4), Seq(u64::MAX)).await.unwrap();
        assert_eq!(
            register_request(&registration(), &state).highest_epoch,
            Some(Epoch(4))
        );
        assert!(!dir.path().join(crate::wal::LOG_CUT_FILE).exists());
        close(w, t).await;
        assert_eq!(reported_epoch(dir.path()).await, Some(Epoch(4)));
        // A marker removed by hand while the node runs: the next fence must not fail on it.
        let marker = dir.path().join(crate::wal::LOG_CUT_FILE);
        std::fs::write(&marker, "9\n").unwrap();
        let (state, w, t) = open(dir.path());
        std::fs::remove_file(&marker).unwrap();
        w.truncate(Epoch(5), Seq(u64::MAX)).await.unwrap();
        assert_eq!(
            register_request(&registration(), &state).highest_epoch,
            Some(Epoch(5))
        );
        close(w, t).await;
    }
}
