//! The in-sync set and node roles: a pure state machine (no IO, no clock reads; callers
//! pass `now`), unit tested without a network.
//!
//! [`Membership`] holds the persisted [`State`] (epoch, ISR, epoch table, removed ids), the
//! registered nodes with their sessions and heartbeats, the service phase, and `next_seq`.
//! The IO layer (registry, sequencer, control loop) locks it briefly, asks it what to do,
//! performs the RPCs and the state-file write, and reports back.
//!
//! Roles (as shown by `status`):
//! - `in_sync`: in the persisted ISR and registered (has a live session), unless it lost
//!   its disk ([`crate::catchup::lost_its_disk`]): such a member holds nothing it can vouch
//!   for, recovery does not count it, and it shows as `catching_up` until it has copied the
//!   log and joined again;
//! - `catching_up`: registered but not in the ISR, or a member that lost its disk (it never
//!   serves reads);
//! - `down`: known (in the ISR, or registered once) but without a live session.
//!
//! Invariants:
//! - The ISR is never made empty by a failure: when every member would be removed, the
//!   members stay and the phase becomes `Recovering` instead. An empty ISR would leave no
//!   node that is known to hold every acknowledged write.
//! - While `Serving`, every ISR member holds every committed record; a member that misses
//!   one is removed (and the removal persisted by the caller) before anything is acknowledged.
//! - A removed id never registers again.
//! - Sessions only grow, so a heartbeat from an older registration is told to re-register.

use crate::state::State;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use walkv_shared::rpc::{HeartbeatReply, RegisterRequest};
use walkv_shared::types::{CatchUpProgress, ClusterStatus, LogPosition, NodeRole, NodeStatus};
use walkv_shared::{Epoch, KvError, NodeId, Seq};

/// Whether the frontend serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for in-sync members or re-running recovery; requests get `Unavailable(reason)`.
    Recovering {
        /// Why, for `status` and error messages.
        reason: String,
        /// Whether this recovery's epoch bump is already persisted.
        epoch_bumped: bool,
    },
    /// Reads and writes are served (given at least `min_insync` ISR members).
    Serving,
}

/// One registered (or formerly registered) storage node.
#[derive(Clone, Debug)]
pub struct Node {
    /// Address the frontend dials.
    pub addr: String,
    /// Process instance number from its registration.
    pub instance: u64,
    /// The live session, `None` once the node is down.
    pub session: Option<u64>,
    /// Log position the node reported at registration (or learned since).
    pub pos: LogPosition,
    /// Seq covered by its newest snapshot at registration.
    pub snapshot_seq: Seq,
    /// The highest epoch the process had persisted when it first registered with this
    /// frontend (`None`: its storage binary does not say), raised once this frontend has
    /// made it an in-sync member. `Some(Epoch(0))` on a member of the persisted ISR means it
    /// lost its disk ([`crate::catchup::lost_its_disk`]). A re-registration of the same
    /// process keeps this value: an epoch persisted since (a recovery's fence, an append it
    /// refused) says nothing about whether it holds the committed records.
    pub highest_epoch: Option<Epoch>,
    /// Last applied seq known (heartbeats, appends, catch-up).
    pub applied: Seq,
    /// When the last heartbeat (or registration) arrived.
    pub last_heartbeat: Option<Instant>,
    /// Catch-up progress while catching up.
    pub progress: Option<CatchUpProgress>,
}

impl Node {
    /// This frontend made the node an in-sync member at `epoch`: it holds every committed
    /// record, whatever it reported when it registered.
    fn joined_at(&mut self, epoch: Epoch) {
        self.highest_epoch = Some(self.highest_epoch.unwrap_or_default().max(epoch));
    }
}

/// What a registration needs before it can be accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegisterCheck {
    /// Nothing live under this id (or the same process again): accept.
    Accept,
    /// Another process registered this id and still has a live session: ask that address
    /// who it is; refuse if it answers as `instance`.
    VerifyOld {
        /// The old registration's address.
        addr: String,
        /// The old registration's instance.
        instance: u64,
    },
}

/// The outcome of removing nodes from the ISR.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IsrChange {
    /// Nothing changed (none of the ids were members).
    Unchanged,
    /// These members left; the caller must persist before acknowledging anything.
    Shrunk(Vec<NodeId>),
    /// Every member would have left: the ISR is kept and the phase is now `Recovering`.
    RecoveryNeeded,
}

/// The pure cluster state machine.
#[derive(Debug)]
pub struct Membership {
    /// The persisted part. Change it only through methods, then persist.
    pub state: State,
    nodes: BTreeMap<NodeId, Node>,
    phase: Phase,
    next_session: u64,
    /// Next seq the sequencer assigns; set by recovery to L + 1.
    pub next_seq: Seq,
    round_robin: usize,
}

impl Membership {
    /// A membership for a freshly started frontend: `Recovering` with the epoch bump
    /// already persisted by the caller.
    pub fn new(state: State) -> Membership {
        Membership {
            state,
            nodes: BTreeMap::new(),
            phase: Phase::Recovering {
                reason: "waiting for in-sync storage nodes to register".into(),
                epoch_bumped: true,
            },
            next_session: 1,
            next_seq: Seq(1),
            round_robin: 0,
        }
    }

    /// The current phase.
    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// Whether reads and writes may be served now.
    pub fn serving(&self) -> bool {
        self.phase == Phase::Serving
    }

    /// `Ok` when serving with at least `min_insync` members, else the `Unavailable` to return.
    pub fn check_available(&self, min_insync: u32) -> Result<(), KvError> {
        match &self.phase {
            Phase::Recovering { reason, .. } => Err(KvError::Unavailable(format!(
                "frontend is recovering: {reason}"
            ))),
            Phase::Serving if (self.state.isr.len() as u64) < u64::from(min_insync) => {
                Err(KvError::Unavailable(format!(
                    "in-sync set has {} node(s) ({}), fewer than min_insync = {min_insync}",
                    self.state.isr.len(),
                    join_ids(self.state.isr.iter())
                )))
            }
            Phase::Serving => Ok(()),
        }
    }

    /// Enters `Recovering`; the control loop bumps the epoch and re-runs recovery.
    pub fn start_recovery(&mut self, reason: String) {
        if self.serving() {
            self.phase = Phase::Recovering {
                reason,
                epoch_bumped: false,
            };
        }
    }

    /// Updates the reason shown while recovering (e.g. which ISR members are missing).
    pub fn set_recovering_reason(&mut self, why: String) {
        if let Phase::Recovering { reason, .. } = &mut self.phase {
            *reason = why;
        }
    }

    /// Bumps the epoch for a recovery that has not done so yet; returns whether the caller
    /// must persist the state before going on.
    pub fn bump_epoch_if_needed(&mut self) -> bool {
        match &mut self.phase {
            Phase::Recovering { epoch_bumped, .. } if !*epoch_bumped => {
                *epoch_bumped = true;
                self.state.epoch.0 += 1;
                true
            }
            _ => false,
        }
    }

    /// Ends recovery: the ISR, epoch table entry and commit are decided (caller persists
    /// first and only then calls this).
    pub fn finish_recovery(&mut self, next_seq: Seq) {
        self.next_seq = next_seq;
        self.phase = Phase::Serving;
    }

    /// Whether `id` may register, before any RPC. Refuses removed ids.
    pub fn check_register(&self, req: &RegisterRequest) -> Result<RegisterCheck, KvError> {
        if self.state.removed.contains(&req.id) {
            return Err(KvError::Unauthorized(format!(
                "node id {} was removed from the cluster with remove_node and may not register again; use a new id",
                req.id
            )));
        }
        match self.nodes.get(&req.id) {
            Some(n) if n.session.is_some() && n.instance != req.instance => {
                Ok(RegisterCheck::VerifyOld {
                    addr: n.addr.clone(),
                    instance: n.instance,
                })
            }
            _ => Ok(RegisterCheck::Accept),
        }
    }

    /// Records a registration and returns its new session. The caller handles an ISR member
    /// re-registering while serving (see [`Membership::rejoin_needs_isr_exit`]).
    pub fn accept_register(&mut self, req: &RegisterRequest, now: Instant) -> u64 {
        let session = self.next_session;
        self.next_session += 1;
        let highest_epoch = match self.nodes.get(&req.id) {
            Some(n) if n.instance == req.instance => n.highest_epoch,
            _ => req.highest_epoch,
        };
        self.nodes.insert(
            req.id.clone(),
            Node {
                addr: req.addr.clone(),
                instance: req.instance,
                session: Some(session),
                pos: req.pos,
                snapshot_seq: req.snapshot_seq,
                highest_epoch,
                applied: req.pos.seq,
                last_heartbeat: Some(now),
                progress: None,
            },
        );
        session
    }

    /// Whether a registration of `id` by process `instance` means the node must leave the
    /// ISR and catch up: while serving, a *new process* under an ISR member's id may have
    /// lost its connection mid-batch or restarted from an older disk. The same process
    /// re-registering (e.g. after a lost heartbeat) keeps its place: every committed record
    /// reached it, or the write path would already have removed it. Call before
    /// [`Membership::accept_register`].
    pub fn rejoin_needs_isr_exit(&self, id: &NodeId, instance: u64) -> bool {
        let restarted = self.nodes.get(id).is_none_or(|n| n.instance != instance);
        self.serving() && self.state.isr.contains(id) && restarted
    }

    /// Handles a heartbeat: `Ok` for the live session, else `Reregister`.
    pub fn heartbeat(
        &mut self,
        id: &NodeId,
        session: u64,
        applied: Seq,
        now: Instant,
    ) -> HeartbeatReply {
        match self.nodes.get_mut(id) {
            Some(n) if n.session == Some(session) => {
                n.last_heartbeat = Some(now);
                n.applied = n.applied.max(applied);
                HeartbeatReply::Ok
            }
            _ => HeartbeatReply::Reregister,
        }
    }

    /// Marks nodes without a heartbeat for `timeout` as down; returns them.
    pub fn expire(&mut self, now: Instant, timeout: Duration) -> Vec<NodeId> {
        let mut down = Vec::new();
        for (id, n) in self.nodes.iter_mut() {
            let stale = n
                .last_heartbeat
                .is_none_or(|t| now.saturating_duration_since(t) > timeout);
            if n.session.is_some() && stale {
                n.session = None;
                n.progress = None;
                down.push(id.clone());
            }
        }
        down
    }

    /// Marks one node down (a failed RPC on the write path or during catch-up).
    pub fn mark_down(&mut self, id: &NodeId) {
        if let Some(n) = self.nodes.get_mut(id) {
            n.session = None;
            n.progress = None;
        }
    }

    /// Removes `ids` from the ISR, unless that would empty it (see [`IsrChange`]).
    pub fn remove_from_isr(&mut self, ids: &[NodeId], why: &str) -> IsrChange {
        let leaving: Vec<NodeId> = ids
            .iter()
            .filter(|id| self.state.isr.contains(*id))
            .cloned()
            .collect();
        if leaving.is_empty() {
            return IsrChange::Unchanged;
        }
        if leaving.len() == self.state.isr.len() {
            self.start_recovery(format!(
                "every in-sync node failed ({}): {why}",
                join_ids(leaving.iter())
            ));
            return IsrChange::RecoveryNeeded;
        }
        for id in &leaving {
            self.state.isr.remove(id);
        }
        IsrChange::Shrunk(leaving)
    }

    /// Adds a caught-up node to the ISR.
    pub fn add_to_isr(&mut self, id: &NodeId) {
        self.state.isr.insert(id.clone());
        let epoch = self.state.epoch;
        if let Some(n) = self.nodes.get_mut(id) {
            n.progress = None;
            n.joined_at(epoch);
        }
    }

    /// Makes `ids` the ISR decided by recovery at the current epoch (caller persists).
    pub fn set_recovered_isr(&mut self, ids: &[NodeId]) {
        self.state.isr = ids.iter().cloned().collect();
        let epoch = self.state.epoch;
        for id in ids {
            if let Some(n) = self.nodes.get_mut(id) {
                n.joined_at(epoch);
            }
        }
    }

    /// Retires a node: out of the ISR, out of status, never again. Refuses the last member.
    pub fn retire(&mut self, id: &NodeId) -> Result<(), KvError> {
        if self.state.isr.contains(id) && self.state.isr.len() == 1 {
            return Err(KvError::InvalidInput(format!(
                "{id} is the only in-sync node; removing it would lose the only copy known to be complete"
            )));
        }
        if !self.state.isr.contains(id) && !self.nodes.contains_key(id) {
            return Err(KvError::InvalidInput(format!("unknown node id {id}")));
        }
        self.state.isr.remove(id);
        self.nodes.remove(id);
        self.state.removed.insert(id.clone());
        Ok(())
    }

    /// A registered node.
    pub fn node(&self, id: &NodeId) -> Option<&Node> {
        self.nodes.get(id)
    }

    /// A registered node, mutable (positions, progress).
    pub fn node_mut(&mut self, id: &NodeId) -> Option<&mut Node> {
        self.nodes.get_mut(id)
    }

    /// Whether `id` has a live session equal to `session`.
    pub fn session_is(&self, id: &NodeId, session: u64) -> bool {
        self.nodes
            .get(id)
            .is_some_and(|n| n.session == Some(session))
    }

    /// Registered (live) nodes.
    pub fn live(&self) -> impl Iterator<Item = (&NodeId, &Node)> {
        self.nodes.iter().filter(|(_, n)| n.session.is_some())
    }

    /// Live nodes outside the ISR (they need catch-up), with their sessions.
    pub fn catching_up(&self) -> Vec<(NodeId, u64)> {
        self.live()
            .filter(|(id, _)| !self.state.isr.contains(*id))
            .filter_map(|(id, n)| n.session.map(|s| (id.clone(), s)))
            .collect()
    }

    /// ISR members to read from, rotated so that successive reads spread over them.
    pub fn read_order(&mut self) -> Vec<NodeId> {
        let mut members: Vec<NodeId> = self
            .state
            .isr
            .iter()
            .filter(|id| self.nodes.get(*id).is_some_and(|n| n.session.is_some()))
            .cloned()
            .collect();
        if !members.is_empty() {
            self.round_robin = self.round_robin.wrapping_add(1);
            let k = self.round_robin % members.len();
            members.rotate_left(k);
        }
        members
    }

    /// Every registered node, ISR or not, rotated: only for the `unsafe_read_any_node`
    /// negative control, which must be able to read from stale nodes.
    pub fn read_order_any(&mut self) -> Vec<NodeId> {
        let mut nodes: Vec<NodeId> = self.live().map(|(id, _)| id.clone()).collect();
        if !nodes.is_empty() {
            self.round_robin = self.round_robin.wrapping_add(1);
            let k = self.round_robin % nodes.len();
            nodes.rotate_left(k);
        }
        nodes
    }

    /// The cluster as `status` shows it.
    pub fn status(&self, commit: Seq, min_insync: u32, now: Instant) -> ClusterStatus {
        let mut ids: Vec<&NodeId> = self.nodes.keys().chain(self.state.isr.iter()).collect();
        ids.sort();
        ids.dedup();
        let nodes = ids
            .into_iter()
            .map(|id| {
                let n = self.nodes.get(id);
                let live = n.is_some_and(|n| n.session.is_some());
                let member = self.state.isr.contains(id)
                    && !n.is_some_and(|n| {
                        crate::catchup::lost_its_disk(&self.state.isr, id, n.highest_epoch)
                    });
                let role = match (live, member) {
                    (false, _) => NodeRole::Down,
                    (true, true) => NodeRole::InSync,
                    (true, false) => NodeRole::CatchingUp,
                };
                let applied = n.map(|n| n.applied).unwrap_or_default();
                NodeStatus {
                    id: id.clone(),
                    addr: n.map(|n| n.addr.clone()).unwrap_or_default(),
                    role,
                    applied_seq: applied,
                    lag: commit.0.saturating_sub(applied.0),
                    last_heartbeat_ms: n
                        .and_then(|n| n.last_heartbeat)
                        .map(|t| now.saturating_duration_since(t).as_millis() as u64),
                    catch_up: if role == NodeRole::CatchingUp {
                        n.and_then(|n| n.progress.clone())
                    } else {
                        None
                    },
                }
            })
            .collect();
        let available = self.check_available(min_insync).is_ok();
        let state = match &self.phase {
            Phase::Serving if available => "serving".to_string(),
            Phase::Serving => {
                format!("serving: unavailable, fewer than min_insync = {min_insync} in-sync nodes")
            }
            Phase::Recovering { reason, .. } => format!("recovering: {reason}"),
        };
        ClusterStatus {
            epoch: self.state.epoch,
            commit_seq: commit,
            state,
            available,
            min_insync,
            nodes,
        }
    }
}

/// `a, b, c` for messages.
pub fn join_ids<'a>(ids: impl Iterator<Item = &'a NodeId>) -> String {
    let v: Vec<&str> = ids.map(|i| i.0.as_str()).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> NodeId {
        NodeId(s.into())
    }

    fn reg(name: &str, instance: u64) -> RegisterRequest {
        RegisterRequest {
            token: "t".into(),
            id: id(name),
            addr: format!("127.0.0.1:1{instance}"),
            instance,
            pos: LogPosition {
                epoch: Epoch(1),
                seq: Seq(5),
            },
            snapshot_seq: Seq(0),
            highest_epoch: Some(Epoch(1)),
        }
    }

    fn serving_with(isr: &[&str]) -> (Membership, Instant) {
        let now = Instant::now();
        let mut m = Membership::new(State {
            isr: isr.iter().map(|s| id(s)).collect(),
            ..State::default()
        });
        for (i, s) in isr.iter().enumerate() {
            m.accept_register(&reg(s, i as u64 + 1), now);
        }
        m.finish_recovery(Seq(6));
        (m, now)
    }

    #[test]
    fn starts_recovering_and_unavailable() {
        let m = Membership::new(State::default());
        assert!(!m.serving());
        assert!(
            matches!(m.check_available(1), Err(KvError::Unavailable(msg)) if msg.contains("recovering"))
        );
    }

    #[test]
    fn removing_some_members_shrinks_but_never_empties() {
        let (mut m, _) = serving_with(&["a", "b", "c"]);
        assert_eq!(
            m.remove_from_isr(&[id("b")], "append failed"),
            IsrChange::Shrunk(vec![id("b")])
        );
        assert_eq!(m.remove_from_isr(&[id("b")], "again"), IsrChange::Unchanged);
        assert_eq!(
            m.remove_from_isr(&[id("a"), id("c")], "both failed"),
            IsrChange::RecoveryNeeded
        );
        assert_eq!(m.state.isr.len(), 2, "the last members stay in the ISR");
        assert!(!m.serving());
        assert!(m.bump_epoch_if_needed());
        assert!(!m.bump_epoch_if_needed(), "one bump per recovery");
    }

    #[test]
    fn min_insync_gates_availability() {
        let (m, _) = serving_with(&["a"]);
        assert!(m.check_available(1).is_ok());
        assert!(
            matches!(m.check_available(2), Err(KvError::Unavailable(msg)) if msg.contains("min_insync"))
        );
    }

    #[test]
    fn heartbeats_sessions_and_expiry() {
        let (mut m, now) = serving_with(&["a", "b"]);
        let sa = m.node(&id("a")).unwrap().session.unwrap();
        assert_eq!(m.heartbeat(&id("a"), sa, Seq(9), now), HeartbeatReply::Ok);
        assert_eq!(
            m.heartbeat(&id("a"), sa + 100, Seq(9), now),
            HeartbeatReply::Reregister
        );
        assert_eq!(
            m.heartbeat(&id("zz"), 1, Seq(9), now),
            HeartbeatReply::Reregister
        );
        let later = now + Duration::from_millis(1000);
        assert_eq!(m.heartbeat(&id("a"), sa, Seq(9), later), HeartbeatReply::Ok);
        let down = m.expire(
            later + Duration::from_millis(600),
            Duration::from_millis(800),
        );
        assert_eq!(down, vec![id("b")]);
        assert_eq!(
            m.heartbeat(&id("b"), 2, Seq(9), later),
            HeartbeatReply::Reregister,
            "down node re-registers"
        );
        let st = m.status(Seq(9), 1, later);
        let roles: Vec<_> = st.nodes.iter().map(|n| (n.id.0.clone(), n.role)).collect();
        assert_eq!(
            roles,
            vec![("a".into(), NodeRole::InSync), ("b".into(), NodeRole::Down)]
        );
    }

    #[test]
    fn a_member_that_lost_its_disk_is_not_shown_in_sync() {
        // The persisted ISR is a, b; b comes back wiped (epoch 0) while recovery waits.
        let now = Instant::now();
        let mut m = Membership::new(State {
            isr: [id("a"), id("b")].into(),
            ..State::default()
        });
        m.accept_register(&reg("a", 1), now);
        let wiped = RegisterRequest {
            pos: LogPosition::default(),
            highest_epoch: Some(Epoch(0)),
            ..reg("b", 2)
        };
        m.accept_register(&wiped, now);
        let roles: Vec<_> = m
            .status(Seq(5), 1, now)
            .nodes
            .iter()
            .map(|n| (n.id.0.clone(), n.role))
            .collect();
        assert_eq!(
            roles,
            vec![
                ("a".into(), NodeRole::InSync),
                ("b".into(), NodeRole::CatchingUp)
            ]
        );
    }

    #[test]
    fn duplicate_live_id_needs_verification_and_removed_ids_are_refused() {
        let (mut m, _) = serving_with(&["a"]);
        assert_eq!(
            m.check_register(&reg("a", 1)).unwrap(),
            RegisterCheck::Accept,
            "same process again"
        );
        assert_eq!(
            m.check_register(&reg("a", 7)).unwrap(),
            RegisterCheck::VerifyOld {
                addr: "127.0.0.1:11".into(),
                instance: 1
            }
        );
        m.mark_down(&id("a"));
        assert_eq!(
            m.check_register(&reg("a", 7)).unwrap(),
            RegisterCheck::Accept,
            "old one is down"
        );
        m.accept_register(&reg("b", 2), Instant::now());
        m.retire(&id("b")).unwrap();
        assert!(
            matches!(m.check_register(&reg("b", 3)), Err(KvError::Unauthorized(msg)) if msg.contains("removed"))
        );
        assert!(
            m.retire(&id("a")).is_err(),
            "the only in-sync node cannot be retired"
        );
    }

    #[test]
    fn catching_up_nodes_and_join() {
        let (mut m, now) = serving_with(&["a"]);
        m.accept_register(&reg("b", 2), now);
        assert_eq!(m.catching_up().len(), 1);
        assert!(!m.rejoin_needs_isr_exit(&id("b"), 9), "not in the ISR");
        assert!(
            m.rejoin_needs_isr_exit(&id("a"), 9),
            "a new process under an ISR member's id"
        );
        assert!(
            !m.rejoin_needs_isr_exit(&id("a"), 1),
            "the same process registering again"
        );
        m.add_to_isr(&id("b"));
        assert!(m.catching_up().is_empty());
        let first = m.read_order();
        let second = m.read_order();
        assert_eq!(first.len(), 2);
        assert_ne!(first[0], second[0], "round robin");
    }

    /// The epoch a process reported when it registered sticks until this frontend makes it
    /// in sync: the same process re-registering with an epoch it persisted since (from a
    /// recovery's fence) still shows that it started on an empty data dir.
    #[test]
    fn highest_epoch_sticks_per_process_until_the_node_joins() {
        let now = Instant::now();
        let mut m = Membership::new(State {
            epoch: Epoch(4),
            isr: [id("a")].into_iter().collect(),
            ..State::default()
        });
        let empty = RegisterRequest {
            highest_epoch: Some(Epoch(0)),
            ..reg("a", 1)
        };
        m.accept_register(&empty, now);
        let fenced = RegisterRequest {
            highest_epoch: Some(Epoch(4)),
            ..reg("a", 1)
        };
        m.accept_register(&fenced, now);
        assert_eq!(m.node(&id("a")).unwrap().highest_epoch, Some(Epoch(0)));
        m.set_recovered_isr(&[id("a")]);
        assert_eq!(m.node(&id("a")).unwrap().highest_epoch, Some(Epoch(4)));
        // A new process under the same id starts over from what it reports.
        m.accept_register(
            &RegisterRequest {
                instance: 2,
                ..empty
            },
            now,
        );
        assert_eq!(m.node(&id("a")).unwrap().highest_epoch, Some(Epoch(0)));
        m.add_to_isr(&id("a"));
        assert_eq!(m.node(&id("a")).unwrap().highest_epoch, Some(Epoch(4)));
    }
}
