//! The shared handle every frontend task holds: configuration, the membership state
//! machine, the write gate, the commit index, the connection pool, the read batcher and
//! the state file.
//!
//! Locking rules:
//! - `membership` is a `std::sync::Mutex`, held only for short synchronous steps, never
//!   across `.await`.
//! - `gate` (the write gate, a [`Gate`]) is held by the sequencer while any batch is in
//!   flight and by every ISR change (removal, join, recovery, retirement). So the ISR never
//!   grows and the epoch never changes while a batch is in flight, the commit index only
//!   moves under the gate, and state-file writes (always made under the gate) are never
//!   reordered. The sequencer starts no new batch while another task waits for the gate, so
//!   a steady stream of writes cannot keep an ISR change out.
//! - The commit index lives in a `watch` channel so reads can wait for a seq to commit.

use crate::config::Config;
use crate::isr::{join_ids, IsrChange, Membership};
use crate::pool::Pool;
use crate::read_batch::ReadBatcher;
use crate::sequencer::WriteJob;
use crate::state::StateFile;
use crate::watch::ChangeLog;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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
    pub gate: Gate,
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
    /// `--unsafe-recover`, until the first recovery of this process has served (see
    /// [`Cluster::disarm_unsafe_recover`]).
    unsafe_recover: AtomicBool,
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
            unsafe_recover: AtomicBool::new(config.unsafe_recover),
            config,
            membership: std::sync::Mutex::new(membership),
            gate: Gate::default(),
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

    /// Whether a recovery may take a node outside the last in-sync set as the truth.
    pub fn unsafe_recover_armed(&self) -> bool {
        self.unsafe_recover.load(Ordering::SeqCst)
    }

    /// Ends `--unsafe-recover` once a recovery has served; returns whether it was on.
    ///
    /// The operator's flag answers one situation, the one at this start: every node of the
    /// last in-sync set is gone for good. A later recovery of the same process (the new
    /// in-sync set failing while it runs) waits for its members again instead of adopting
    /// whatever registers first.
    pub fn disarm_unsafe_recover(&self) -> bool {
        self.unsafe_recover.swap(false, Ordering::SeqCst)
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

/// The write gate: a fair (FIFO) async mutex that also tells its holder whether another
/// task is waiting for it, so the sequencer can let an ISR change in between batches.
#[derive(Debug, Default)]
pub struct Gate {
    mutex: tokio::sync::Mutex<()>,
    waiting: AtomicUsize,
}

/// Holding this is holding the write gate.
pub type GateGuard<'a> = tokio::sync::MutexGuard<'a, ()>;

impl Gate {
    /// Waits for the gate; counted as waiting (see [`Gate::contended`]) until it has it.
    pub async fn lock(&self) -> GateGuard<'_> {
        if let Ok(guard) = self.mutex.try_lock() {
            return guard;
        }
        /// Uncounts the waiter also when the waiting future is dropped.
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.waiting);
        self.mutex.lock().await
    }

    /// The gate if it is free now.
    pub fn try_lock(&self) -> Option<GateGuard<'_>> {
        self.mutex.try_lock().ok()
    }

    /// Whether a task is waiting for the gate.
    pub fn contended(&self) -> bool {
        self.waiting.load(Ordering::SeqCst) > 0
    }
}

#[cfg(test)]
mod tests {
    use super::Gate;

    #[tokio::test(flavor = "current_thread")]
    async fn a_waiter_is_counted_until_it_has_the_gate_or_gives_up() {
        let gate = Gate::default();
        let held = gate.lock().await;
        assert!(!gate.contended(), "the holder itself is not a waiter");
        let mut waiter = Box::pin(gate.lock());
        assert!(futures::poll!(waiter.as_mut()).is_pending());
        assert!(gate.contended());
        drop(held);
        let second = waiter.await;
        assert!(!gate.contended(), "the waiter got the gate");
        let mut gave_up = Box::pin(gate.lock());
        assert!(futures::poll!(gave_up.as_mut()).is_pending());
        assert!(gate.contended());
        drop(gave_up);
        assert!(!gate.contended(), "a dropped wait is uncounted");
        drop(second);
        assert!(gate.try_lock().is_some());
    }
}
