//! The shared handle every frontend task holds: configuration, the membership state
//! machine, the write gate, the commit index, the connection pool, the read batcher and
//! the state file.
//!
//! Locking rules:
//! - `membership` is a `std::sync::Mutex`, held only for short synchronous steps, never
//!   across `.await`.
//! - `gate` (the write gate) is a tokio mutex held by the sequencer for a whole batch and by
//!   every ISR change (removal, join, recovery, retirement). So the ISR never changes while a
//!   batch is in flight, the commit index only moves under the gate, and state-file writes
//!   (always made under the gate) are never reordered.
//! - The commit index lives in a `watch` channel so reads can wait for a seq to commit.

use crate::config::Config;
use crate::isr::{join_ids, IsrChange, Membership};
use crate::pool::Pool;
use crate::read_batch::ReadBatcher;
use crate::sequencer::WriteJob;
use crate::state::StateFile;
use crate::watch::ChangeLog;
use std::sync::{Arc, MutexGuard};
use tokio::sync::{mpsc, watch};
use tracing::{error, warn};
use walkv_shared::{KvError, NodeId, Seq};

/// State shared by the frontend's tasks.
#[derive(Debug)]
pub struct Cluster {
    /// Validated configuration.
    pub config: Config,
    /// The pure membership state machine (see [`crate::isr`]).
    pub membership: std::sync::Mutex<Membership>,
    /// The write gate (see the module docs).
    pub gate: tokio::sync::Mutex<()>,
    /// Highest committed seq.
    pub commit_tx: watch::Sender<Seq>,
    /// Connections to storage nodes.
    pub pool: Arc<Pool>,
    /// Per-node queues that batch concurrent reads (see [`crate::read_batch`]).
    pub reads: Arc<ReadBatcher>,
    /// Queue in front of the sequencer.
    pub writes: mpsc::Sender<WriteJob>,
    /// Recently committed changes for watchers (published by the sequencer).
    pub changes: ChangeLog,
    state_file: Arc<StateFile>,
}

impl Cluster {
    /// Builds the handle; the caller has already persisted the start epoch.
    pub fn new(
        config: Config,
        membership: Membership,
        state_file: StateFile,
        writes: mpsc::Sender<WriteJob>,
    ) -> Cluster {
        let pool = Arc::new(Pool::new(
            config.cluster_token.clone(),
            config.rpc_timeout(),
        ));
        Cluster {
            config,
            membership: std::sync::Mutex::new(membership),
            gate: tokio::sync::Mutex::new(()),
            commit_tx: watch::channel(Seq(0)).0,
            pool,
            reads: Arc::default(),
            writes,
            changes: ChangeLog::default(),
            state_file: Arc::new(state_file),
        }
    }

    /// Locks the membership. Never hold the guard across `.await`.
    pub fn m(&self) -> MutexGuard<'_, Membership> {
        // Membership methods keep it consistent at every return; a panic elsewhere while
        // holding the guard cannot leave it half-updated in a way that matters more than
        // stopping the whole frontend would.
        self.membership.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The commit index.
    pub fn commit(&self) -> Seq {
        *self.commit_tx.borrow()
    }

    /// Writes the current persisted state to disk (temp, fsync, rename, fsync dir) on a
    /// blocking thread. Call with the write gate held so writes are not reordered.
    pub async fn persist(&self) -> Result<(), KvError> {
        let state = self.m().state.clone();
        let file = self.state_file.clone();
        tokio::task::spawn_blocking(move || file.persist(&state))
            .await
            .map_err(|e| KvError::Internal(format!("state writer panicked: {e}")))?
            .map_err(|e| {
                KvError::Io(format!(
                    "cannot write {}/state.json: {e}",
                    self.state_file.dir().display()
                ))
            })
    }

    /// Takes `ids` out of the ISR through the write gate and persists the result. When
    /// every member would leave, the ISR is kept and recovery starts instead.
    pub async fn leave_isr(&self, ids: &[NodeId], why: &str) {
        let _gate = self.gate.lock().await;
        let change = self.m().remove_from_isr(ids, why);
        self.after_isr_change(change, why).await;
    }

    /// Logs and persists an ISR change; the caller holds the write gate.
    pub async fn after_isr_change(&self, change: IsrChange, why: &str) {
        match change {
            IsrChange::Unchanged => {}
            IsrChange::Shrunk(left) => {
                let isr = join_ids(self.m().state.isr.iter());
                warn!(left = %join_ids(left.iter()), isr = %isr, reason = why, "in-sync set shrank");
                if let Err(e) = self.persist().await {
                    error!(error = %e, "cannot persist the in-sync set; stopping service until recovery");
                    self.m()
                        .start_recovery(format!("state file write failed: {e}"));
                }
            }
            IsrChange::RecoveryNeeded => {
                warn!(
                    reason = why,
                    "every in-sync node failed; re-running recovery"
                );
            }
        }
    }
}
