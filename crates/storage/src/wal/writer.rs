//! The WAL writer: one thread owns the open segment and every change to the store.
//!
//! Callers send commands over a bounded channel (actor pattern) and wait on a oneshot.
//! The thread:
//!
//! 1. takes the next command; for an append it also drains whatever appends are already
//!    queued, up to `wal_batch_max` records (**group commit**: everything that arrived
//!    while the previous fsync ran shares the next one);
//! 2. checks each append: epoch fencing (`Fenced`), records already present are skipped,
//!    a gap is refused (`Gap`); raises and persists the highest epoch first if needed;
//! 3. encodes the accepted records into one buffer, writes it and calls `sync_data` once;
//! 4. applies them to the store in order with `Store::apply`, publishes the applied seq,
//!    and only then replies to every sender;
//! 5. once a snapshot is due ([`snapshot_due`]: at least `snapshot_every` records since the
//!    last one, and at least half as many as there are keys), rolls to a new segment and
//!    hands a view of the state to a snapshot thread, so snapshot IO never sits on the
//!    write path. Taking the view is O(1) whatever the number of keys: the store's maps
//!    are persistent and share their nodes with it (see [`crate::store`]); the thread
//!    streams it to disk without the store lock, then drops the records it covers from the
//!    tail.
//!
//! `truncate` and `install_snapshot` run on the same thread (after joining any snapshot
//! in progress) and rebuild the store from disk with the same recovery code as startup.
//!
//! # Failure
//!
//! Any IO error is fail-stop: the failing batch and every pending and later command get
//! `KvError::Io`, an error is logged once, and `NodeState::fatal` is set so the server
//! shuts down and the process exits non-zero. Nothing is retried: after a failed fsync the
//! kernel may have dropped the dirty pages, so a retry could "succeed" on lost data.

use crate::snapshot;
use crate::store::{SnapshotData, Store};
use crate::wal::file::{self, WalFile};
use crate::wal::{codec, recover_on, LOG_CUT_FILE};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info};
use walkv_shared::types::{LogPosition, Outcome};
use walkv_shared::{Epoch, KvError, Record, Seq};

/// Commands queued for the writer. Bounded so that a flood of appends waits in the
/// callers (and, through tarpc, in the frontend) instead of growing memory.
pub const WRITER_CHANNEL_CAPACITY: usize = 4096;

/// Name of the file holding the highest epoch seen.
pub const EPOCH_FILE: &str = "epoch";

/// State shared by the writer thread, the snapshot thread and the RPC handlers.
#[derive(Debug)]
pub struct NodeState {
    /// The data directory.
    pub dir: PathBuf,
    /// The state machine. Only the writer (and the snapshot thread, to mark compaction)
    /// takes the write lock; never held across an `.await`.
    store: RwLock<Store>,
    /// Seq of the last applied record, for reads waiting on `min_seq`.
    pub applied: watch::Sender<Seq>,
    /// Highest epoch seen (mirrors the `epoch` file).
    pub highest_epoch: AtomicU64,
    /// Set once, with the reason, when the node hits a disk error and stops.
    pub fatal: watch::Sender<Option<String>>,
    /// Group commits (one write + one fsync each) done so far; for tests and the bench.
    pub wal_batches: AtomicU64,
    /// Whether the log was cut at a corrupt record and no frontend has fenced the node
    /// since (the `log-cut` marker, see [`crate::wal`]).
    log_cut: AtomicBool,
}

impl NodeState {
    /// Wraps a recovered store.
    pub fn new(dir: PathBuf, store: Store, epoch: Epoch) -> Arc<NodeState> {
        let applied = watch::Sender::new(store.pos().seq);
        let highest_epoch = AtomicU64::new(epoch.0.max(store.pos().epoch.0));
        Arc::new(NodeState {
            store: RwLock::new(store),
            applied,
            highest_epoch,
            fatal: watch::Sender::new(None),
            wal_batches: AtomicU64::new(0),
            log_cut: AtomicBool::new(dir.join(LOG_CUT_FILE).exists()),
            dir,
        })
    }

    /// Read access to the store.
    pub fn store(&self) -> RwLockReadGuard<'_, Store> {
        // A poisoned lock means the writer panicked on a broken invariant; serving on
        // would expose half-applied state, so propagate the panic.
        self.store
            .read()
            .expect("store lock poisoned by a panic in the writer")
    }

    fn store_mut(&self) -> RwLockWriteGuard<'_, Store> {
        self.store
            .write()
            .expect("store lock poisoned by a panic in the writer")
    }

    /// The highest epoch this node can vouch for its log with: the highest epoch seen, or
    /// 0 while its log is cut (a frontend then never takes it as the truth).
    pub fn vouched_epoch(&self) -> Epoch {
        if self.log_cut.load(Ordering::SeqCst) {
            Epoch(0)
        } else {
            Epoch(self.highest_epoch.load(Ordering::SeqCst))
        }
    }

    /// The disk error that stopped the node, if any.
    pub fn failure(&self) -> Option<String> {
        self.fatal.borrow().clone()
    }

    /// Stops the node: logs once and wakes everyone watching `fatal`.
    pub fn fail(&self, why: String) {
        if self.fatal.borrow().is_none() {
            error!(reason = %why, "disk error: the node stops taking writes and exits (fail-stop)");
            self.fatal.send_replace(Some(why));
        }
    }
}

/// Reads the `epoch` file (0 when absent).
pub fn read_epoch(dir: &Path) -> std::io::Result<Epoch> {
    match std::fs::read_to_string(dir.join(EPOCH_FILE)) {
        Ok(s) => s.trim().parse().map(Epoch).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", dir.join(EPOCH_FILE).display()),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Epoch(0)),
        Err(e) => Err(e),
    }
}

/// Settings of the writer.
#[derive(Clone, Copy, Debug)]
pub struct WriterConfig {
    /// Most records per group commit.
    pub batch_max: usize,
    /// Fewest records between snapshots (see [`snapshot_due`]).
    pub snapshot_every: u64,
    /// Whether to fsync (only negative-control tests turn this off).
    pub fsync: bool,
}

type Reply<T> = oneshot::Sender<Result<T, KvError>>;

/// The writer's answer to an append.
#[derive(Debug)]
pub enum Appended {
    /// One outcome per record, or why the append was refused.
    Done(Result<Vec<Outcome>, KvError>),
    /// The append starts after the end of the log (a `Gap`): its records come back, so the
    /// caller can submit them again once the append before them has arrived.
    Early {
        /// The seq the log needs next.
        expected: Seq,
        /// The append's records, untouched.
        records: Vec<Record>,
    },
}

impl Appended {
    /// The outcomes, or the refusal (`Gap` for an early append).
    pub fn into_result(self) -> Result<Vec<Outcome>, KvError> {
        match self {
            Appended::Done(r) => r,
            Appended::Early { expected, .. } => Err(KvError::Gap { expected }),
        }
    }
}

enum Command {
    Append {
        epoch: Epoch,
        commit: Seq,
        records: Vec<Record>,
        reply: oneshot::Sender<Appended>,
    },
    Truncate {
        epoch: Epoch,
        after: Seq,
        reply: Reply<LogPosition>,
    },
    Install {
        epoch: Epoch,
        data: SnapshotData,
        reply: Reply<LogPosition>,
    },
    Close,
}

/// Cheap handle for sending commands to the writer thread.
#[derive(Clone, Debug)]
pub struct WalWriter {
    tx: mpsc::Sender<Command>,
    state: Arc<NodeState>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Append { .. } => "Append",
            Command::Truncate { .. } => "Truncate",
            Command::Install { .. } => "Install",
            Command::Close => "Close",
        })
    }
}

/// The writer thread; [`WriterThread::join`] waits for it (and any snapshot) to finish.
#[derive(Debug)]
pub struct WriterThread(JoinHandle<()>);

impl WriterThread {
    /// Blocks until the thread has exited.
    pub fn join(self) {
        if self.0.join().is_err() {
            error!("wal writer thread panicked");
        }
    }
}

fn closed() -> KvError {
    KvError::Unavailable("storage node is shutting down".into())
}

impl WalWriter {
    /// Starts the writer thread on a recovered segment.
    pub fn start(
        state: Arc<NodeState>,
        wal: WalFile,
        cfg: WriterConfig,
    ) -> std::io::Result<(WalWriter, WriterThread)> {
        let (tx, rx) = mpsc::channel(WRITER_CHANNEL_CAPACITY);
        let handle_state = state.clone();
        let mut w = Writer {
            state,
            wal,
            cfg,
            rx,
            snapshot: None,
        };
        let handle = std::thread::Builder::new()
            .name("wal-writer".into())
            .spawn(move || w.run())?;
        Ok((
            WalWriter {
                tx,
                state: handle_state,
            },
            WriterThread(handle),
        ))
    }

    /// Queues an append and returns the receiver of its outcome. Queue order is commit
    /// order, so a caller that must keep seqs in order awaits this under its own lock and
    /// the reply outside it.
    pub async fn submit(
        &self,
        epoch: Epoch,
        commit: Seq,
        records: Vec<Record>,
    ) -> Result<oneshot::Receiver<Appended>, KvError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Append {
                epoch,
                commit,
                records,
                reply,
            })
            .await
            .map_err(|_| closed())?;
        Ok(rx)
    }

    /// Appends records durably and returns one outcome per record.
    pub async fn append(
        &self,
        epoch: Epoch,
        commit: Seq,
        records: Vec<Record>,
    ) -> Result<Vec<Outcome>, KvError> {
        self.submit(epoch, commit, records)
            .await?
            .await
            .map_err(|_| closed())?
            .into_result()
    }

    /// Like [`WalWriter::append`], but an append that arrives before the append it follows
    /// waits up to `wait` for the log to reach the seq before its first record, then goes
    /// to the writer again; `Gap` only when that does not happen in time. The frontend sends
    /// a node several batches at once, in order on one connection, and the requests of one
    /// connection run concurrently: without this, the rare overtaking would cost the node
    /// its place in the in-sync set.
    pub async fn append_in_order(
        &self,
        epoch: Epoch,
        commit: Seq,
        mut records: Vec<Record>,
        wait: std::time::Duration,
    ) -> Result<Vec<Outcome>, KvError> {
        // The wait starts at the first `Early`: time spent queued behind a slow fsync is
        // not the predecessor's fault.
        let mut give_up = None;
        let mut applied = self.state.applied.subscribe();
        loop {
            let answer = self
                .submit(epoch, commit, records)
                .await?
                .await
                .map_err(|_| closed())?;
            let (expected, back) = match answer {
                Appended::Done(r) => return r,
                Appended::Early { expected, records } => (expected, records),
            };
            // `Early` means the log ends before the first record's predecessor.
            let before = Seq(back[0].seq.0 - 1);
            let give_up = *give_up.get_or_insert_with(|| tokio::time::Instant::now() + wait);
            let arrived = tokio::time::timeout_at(give_up, applied.wait_for(|s| *s >= before));
            match arrived.await {
                Ok(Ok(_)) => records = back,
                _ => return Err(KvError::Gap { expected }),
            }
        }
    }

    /// Drops every record after `after`.
    pub async fn truncate(&self, epoch: Epoch, after: Seq) -> Result<LogPosition, KvError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Truncate {
                epoch,
                after,
                reply,
            })
            .await
            .map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// Replaces state and log with a snapshot.
    pub async fn install(&self, epoch: Epoch, data: SnapshotData) -> Result<LogPosition, KvError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Install { epoch, data, reply })
            .await
            .map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// Asks the thread to exit after the commands queued before this one.
    pub async fn close(&self) {
        let _ = self.tx.send(Command::Close).await;
    }
}

struct Writer {
    state: Arc<NodeState>,
    wal: WalFile,
    cfg: WriterConfig,
    rx: mpsc::Receiver<Command>,
    snapshot: Option<JoinHandle<()>>,
}

/// Bytes after which a group commit is written and fsynced before the rest of it: one
/// write is then at most this plus one append (below `max_frame_bytes`, 8 MiB by
/// default), which keeps what a crash can tear of it within
/// [`codec::TORN_WRITE_MAX_BYTES`], the largest torn tail recovery accepts.
pub const WRITE_MAX_BYTES: usize = 4 << 20;

/// An append that passed its checks: index of the first new record.
struct Accepted {
    records: Vec<Record>,
    first_new: usize,
    commit: Seq,
    reply: oneshot::Sender<Appended>,
}

impl Accepted {
    /// The epoch of the record this append adds at `seq`, if it adds one there.
    fn epoch_at(&self, seq: Seq) -> Option<Epoch> {
        let new = &self.records[self.first_new..];
        let first = new.first()?.seq;
        let i = seq.0.checked_sub(first.0)?;
        new.get(i as usize).map(|r| r.epoch)
    }
}

impl Writer {
    fn run(&mut self) {
        let mut stash: Option<Command> = None;
        loop {
            let cmd = match stash.take() {
                Some(c) => c,
                None => match self.rx.blocking_recv() {
                    Some(c) => c,
                    None => break,
                },
            };
            match cmd {
                Command::Close => break,
                Command::Append { ref records, .. } => {
                    // Count the first command too, so a batch never exceeds `wal_batch_max`
                    // records unless a single append is larger on its own.
                    let mut n = records.len();
                    let mut batch = vec![cmd];
                    while n < self.cfg.batch_max {
                        match self.rx.try_recv() {
                            Ok(c @ Command::Append { .. }) => {
                                if let Command::Append { records, .. } = &c {
                                    n += records.len();
                                }
                                batch.push(c);
                            }
                            Ok(other) => {
                                stash = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.append_batch(batch);
                }
                Command::Truncate {
                    epoch,
                    after,
                    reply,
                } => {
                    let _ = reply.send(self.truncate(epoch, after));
                }
                Command::Install { epoch, data, reply } => {
                    let _ = reply.send(self.install(epoch, data));
                }
            }
        }
        self.join_snapshot();
        info!("wal writer closed");
    }

    fn io_error(&self) -> Option<KvError> {
        self.state.failure().map(KvError::Io)
    }

    /// Fencing: refuse an epoch below the highest seen; persist a higher one first.
    fn observe_epoch(&mut self, epoch: Epoch) -> Result<(), KvError> {
        let seen = self.state.highest_epoch.load(Ordering::SeqCst);
        if epoch.0 < seen {
            return Err(KvError::Fenced { seen });
        }
        if epoch.0 > seen {
            if let Err(e) = file::write_atomic(
                &self.state.dir,
                EPOCH_FILE,
                format!("{}\n", epoch.0).as_bytes(),
            ) {
                let why = format!(
                    "cannot persist epoch {} in {}: {e}",
                    epoch.0,
                    self.state.dir.display()
                );
                self.state.fail(why.clone());
                return Err(KvError::Io(why));
            }
            self.state.highest_epoch.store(epoch.0, Ordering::SeqCst);
            info!(epoch = epoch.0, "new highest epoch persisted");
        }
        Ok(())
    }

    fn append_batch(&mut self, batch: Vec<Command>) {
        let mut next = self.state.store().pos().seq.next();
        let mut accepted = Vec::with_capacity(batch.len());
        for cmd in batch {
            let Command::Append {
                epoch,
                commit,
                records,
                reply,
            } = cmd
            else {
                unreachable!("only appends are batched")
            };
            if let Some(e) = self.io_error() {
                let _ = reply.send(Appended::Done(Err(e)));
                continue;
            }
            match self.check_append(epoch, &records, next, &accepted) {
                Ok(first_new) => {
                    next = Seq(next.0 + (records.len() - first_new) as u64);
                    accepted.push(Accepted {
                        records,
                        first_new,
                        commit,
                        reply,
                    });
                }
                Err(KvError::Gap { expected }) => {
                    let _ = reply.send(Appended::Early { expected, records });
                }
                Err(e) => {
                    let _ = reply.send(Appended::Done(Err(e)));
                }
            }
        }
        // One write and one fsync for the group, or several when it passes
        // `WRITE_MAX_BYTES`: each write is then at most that plus one append.
        let mut buf = Vec::new();
        let mut records = 0;
        for (i, a) in accepted.iter().enumerate() {
            codec::encode_batch(&a.records[a.first_new..], &mut buf);
            records += a.records.len() - a.first_new;
            let last = i + 1 == accepted.len();
            if buf.is_empty() || !(last || buf.len() >= WRITE_MAX_BYTES) {
                continue;
            }
            let started = std::time::Instant::now();
            if let Err(e) = self.wal.append(&buf) {
                self.state.fail(format!(
                    "cannot write or fsync {}: {e}",
                    self.wal.path().display()
                ));
                for a in accepted {
                    let _ = a.reply.send(Appended::Done(Err(self
                        .io_error()
                        .unwrap_or_else(|| KvError::Io(e.to_string())))));
                }
                return;
            }
            self.state.wal_batches.fetch_add(1, Ordering::Relaxed);
            crate::metrics::METRICS.group_commit(records, buf.len(), started.elapsed());
            buf.clear();
            records = 0;
        }
        // Durable now: apply in order and reply.
        let mut replies = Vec::with_capacity(accepted.len());
        {
            let mut store = self.state.store_mut();
            for a in accepted {
                let mut outcomes: Vec<Outcome> = a.records[..a.first_new]
                    .iter()
                    .map(|r| store.outcome_of(r))
                    .collect();
                outcomes.extend(a.records[a.first_new..].iter().map(|r| store.apply(r)));
                store.forget_tombstones(a.commit);
                replies.push((a.reply, outcomes));
            }
            self.state.applied.send_replace(store.pos().seq);
        }
        for (reply, outcomes) in replies {
            let _ = reply.send(Appended::Done(Ok(outcomes)));
        }
        self.maybe_snapshot();
    }

    /// Returns the index of the first record not yet in the log. `pending` holds the
    /// appends accepted earlier in the same batch: their records come before `next` but are
    /// not in the store yet.
    fn check_append(
        &mut self,
        epoch: Epoch,
        records: &[Record],
        next: Seq,
        pending: &[Accepted],
    ) -> Result<usize, KvError> {
        if records.windows(2).any(|w| w[1].seq != w[0].seq.next()) {
            return Err(KvError::InvalidInput(
                "append records must have consecutive seqs".into(),
            ));
        }
        self.observe_epoch(epoch)?;
        let first_new = records
            .iter()
            .position(|r| r.seq >= next)
            .unwrap_or(records.len());
        // Records already in the log are answered from it, but only if they are the same
        // records: the same seq from another epoch is a diverged log, never a retry. That
        // includes records of an append queued just before this one (an old epoch's append
        // still in the queue when a catch-up's arrived). Records older than the newest
        // snapshot have no epoch left to compare; the exactly-once table answers them.
        {
            let store = self.state.store();
            for r in &records[..first_new] {
                let here = store
                    .epoch_at(r.seq)
                    .or_else(|| pending.iter().find_map(|a| a.epoch_at(r.seq)));
                match here {
                    Some(e) if e != r.epoch => {
                        return Err(KvError::Internal(format!(
                            "diverged log: seq {} is from epoch {e} here, the append has it from epoch {}",
                            r.seq, r.epoch
                        )))
                    }
                    _ => {}
                }
            }
        }
        match records.get(first_new) {
            Some(r) if r.seq != next => Err(KvError::Gap { expected: next }),
            _ => Ok(first_new),
        }
    }

    fn maybe_snapshot(&mut self) {
        self.reap_snapshot();
        let (pos, since, keys) = {
            let s = self.state.store();
            (s.pos(), s.since_snapshot(), s.len() as u64)
        };
        if self.snapshot.is_some()
            || !snapshot_due(since, self.cfg.snapshot_every, keys)
            || self.wal.first() == pos.seq.next()
        {
            return;
        }
        // Roll first, so every older segment is wholly covered by the snapshot.
        match self.wal.create_next(&self.state.dir, pos.seq.next()) {
            Ok(w) => self.wal = w,
            Err(e) => {
                return self.state.fail(format!(
                    "cannot create segment for seq {} in {}: {e}",
                    pos.seq.next(),
                    self.state.dir.display()
                ))
            }
        }
        let data = self.state.store().snapshot_data();
        let state = self.state.clone();
        let spawned = std::thread::Builder::new()
            .name("wal-snapshot".into())
            .spawn(move || write_snapshot(&state, data));
        match spawned {
            Ok(h) => self.snapshot = Some(h),
            Err(e) => self
                .state
                .fail(format!("cannot start snapshot thread: {e}")),
        }
    }

    fn reap_snapshot(&mut self) {
        if self.snapshot.as_ref().is_some_and(|h| h.is_finished()) {
            self.join_snapshot();
        }
    }

    fn join_snapshot(&mut self) {
        if let Some(h) = self.snapshot.take() {
            if h.join().is_err() {
                self.state.fail("snapshot thread panicked".into());
            }
        }
    }

    /// A fence means a frontend has accounted for this log at its epoch (it makes the node
    /// a member, or confirms it in a recovery): the log no longer needs to disown itself.
    fn clear_log_cut(&self) -> Result<(), KvError> {
        if !self.state.log_cut.load(Ordering::SeqCst) {
            return Ok(());
        }
        let dir = &self.state.dir;
        // Already gone (removed by hand) is as good as removed.
        std::fs::remove_file(dir.join(LOG_CUT_FILE))
            .or_else(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Ok(()),
                _ => Err(e),
            })
            .and_then(|()| file::sync_dir(dir))
            .map_err(|e| {
                KvError::Io(format!(
                    "cannot remove {}: {e}",
                    dir.join(LOG_CUT_FILE).display()
                ))
            })?;
        self.state.log_cut.store(false, Ordering::SeqCst);
        info!("fenced by the frontend: the log cut at a corrupt record is accounted for");
        Ok(())
    }

    fn truncate(&mut self, epoch: Epoch, after: Seq) -> Result<LogPosition, KvError> {
        if let Some(e) = self.io_error() {
            return Err(e);
        }
        self.observe_epoch(epoch)?;
        let pos = self.state.store().pos();
        if after >= pos.seq {
            // Nothing to cut: a fence. The epoch is persisted and, the writer being one
            // queue, `pos` counts every append queued before this command.
            self.clear_log_cut()?;
            return Ok(pos);
        }
        self.join_snapshot();
        let snap = self.state.store().snapshot_pos().seq;
        let dir = self.state.dir.clone();
        let result = if after < snap {
            wipe(&dir)
        } else {
            cut_segments(&dir, after)
        };
        if let Err(e) = result {
            let why = format!(
                "cannot truncate the WAL in {} after seq {after}: {e}",
                dir.display()
            );
            self.state.fail(why.clone());
            return Err(KvError::Io(why));
        }
        let new_pos = self.reload()?;
        info!(after = %after, from = %pos.seq, now = %new_pos.seq, wiped = after < snap, "wal truncated");
        Ok(new_pos)
    }

    fn install(&mut self, epoch: Epoch, data: SnapshotData) -> Result<LogPosition, KvError> {
        if let Some(e) = self.io_error() {
            return Err(e);
        }
        self.observe_epoch(epoch)?;
        self.join_snapshot();
        let dir = self.state.dir.clone();
        let seq = data.pos.seq;
        let result = (|| -> std::io::Result<()> {
            snapshot::write(&dir, &data)?;
            file::remove_newest_first(&dir, &file::list_segments(&dir)?)?;
            let older: Vec<_> = snapshot::list(&dir)?
                .into_iter()
                .filter(|(s, _)| *s != seq)
                .collect();
            file::remove_newest_first(&dir, &older)
        })();
        if let Err(e) = result {
            let why = format!(
                "cannot install snapshot at seq {seq} in {}: {e}",
                dir.display()
            );
            self.state.fail(why.clone());
            return Err(KvError::Io(why));
        }
        let pos = self.reload()?;
        info!(seq = %seq, keys = data.items.len(), "snapshot installed");
        Ok(pos)
    }

    /// Rebuilds the store from disk with the startup recovery code.
    fn reload(&mut self) -> Result<LogPosition, KvError> {
        match recover_on(self.wal.disk(), &self.state.dir, self.cfg.fsync, false) {
            Ok(r) => {
                self.wal = r.wal;
                let pos = r.store.pos();
                *self.state.store_mut() = r.store;
                self.state.applied.send_replace(pos.seq);
                Ok(pos)
            }
            Err(e) => {
                let why = format!("cannot reload the data directory: {e}");
                self.state.fail(why.clone());
                Err(KvError::Io(why))
            }
        }
    }
}

/// Removes every segment and snapshot, newest first: a crash midway leaves a prefix.
fn wipe(dir: &Path) -> std::io::Result<()> {
    file::remove_newest_first(dir, &file::list_segments(dir)?)?;
    file::remove_newest_first(dir, &snapshot::list(dir)?)
}

/// Removes segments that start after `after` (newest first) and cuts the one holding it.
fn cut_segments(dir: &Path, after: Seq) -> std::io::Result<()> {
    let segments = file::list_segments(dir)?;
    let later: Vec<_> = segments
        .iter()
        .filter(|(f, _)| *f > after)
        .cloned()
        .collect();
    file::remove_newest_first(dir, &later)?;
    if let Some((first, path)) = segments.iter().rev().find(|(f, _)| *f <= after) {
        let decoded = codec::decode(&std::fs::read(path)?, *first);
        let keep = (after.0 - first.0 + 1) as usize;
        if let Some(end) = decoded.ends.get(keep - 1) {
            file::truncate_file(path, *end)?;
        }
    }
    Ok(())
}

fn write_snapshot(state: &NodeState, data: SnapshotData) {
    let started = std::time::Instant::now();
    let pos = data.pos;
    let keys = data.items.len();
    // The store moves to the new snapshot (so `fetch` names it) before the older files
    // are removed: the other order left a moment in which `fetch` named a snapshot that was
    // already gone, and a catch-up that asked for it then started over.
    let written = snapshot::write(&state.dir, &data).map(|_| {
        // The guard is a temporary of this statement: the records are freed after the
        // lock is released.
        let compacted = state.store_mut().compacted(pos);
        drop(compacted);
    });
    match written.and_then(|()| snapshot::remove_superseded(&state.dir, pos.seq)) {
        Ok(()) => {
            crate::metrics::METRICS.snapshots.inc();
            info!(seq = %pos.seq, keys, ms = started.elapsed().as_millis() as u64, "snapshot written, older WAL segments removed");
        }
        Err(e) => state.fail(format!(
            "cannot write snapshot at seq {} in {}: {e}",
            pos.seq,
            state.dir.display()
        )),
    }
}

/// Whether a snapshot is due after `since` records: at least `snapshot_every`, and at least
/// half the number of keys. Writing a snapshot costs time and disk in proportion to the
/// keys, so the second bound keeps that cost per write at most two key lines per record
/// however large the store grows (at 1M keys a snapshot every 100k records spent ~20% of
/// a 2-core machine re-writing 155 MB files). The price is a longer tail in memory and in
/// the WAL, so a restart replays at most `max(snapshot_every, keys / 2)` records. Pure.
pub fn snapshot_due(since: u64, snapshot_every: u64, keys: u64) -> bool {
    since >= snapshot_every.max(keys / 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::put;
    use crate::wal::disk::SimDisk;
    use crate::wal::recover;
    use std::time::Duration;

    #[test]
    fn snapshots_are_due_after_snapshot_every_or_half_the_keys_whichever_is_more() {
        assert!(!snapshot_due(99_999, 100_000, 10_000));
        assert!(snapshot_due(100_000, 100_000, 10_000));
        assert!(snapshot_due(100_000, 100_000, 200_000));
        assert!(!snapshot_due(100_000, 100_000, 1_000_000));
        assert!(!snapshot_due(499_999, 100_000, 1_000_000));
        assert!(snapshot_due(500_000, 100_000, 1_000_000));
    }

    fn open(dir: &Path, snapshot_every: u64) -> (Arc<NodeState>, WalWriter, WriterThread) {
        let r = recover(dir, true, false).unwrap();
        let state = NodeState::new(dir.to_path_buf(), r.store, read_epoch(dir).unwrap());
        let (w, t) = WalWriter::start(
            state.clone(),
            r.wal,
            WriterConfig {
                batch_max: 1024,
                snapshot_every,
                fsync: true,
            },
        )
        .unwrap();
        (state, w, t)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn group_commit_acks_everything_with_fewer_fsyncs() {
        let dir = tempfile::tempdir().unwrap();
        let (state, w, t) = open(dir.path(), 1_000_000);
        let order = Arc::new(tokio::sync::Mutex::new(0u64));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..32 {
            let (w, order) = (w.clone(), order.clone());
            tasks.spawn(async move {
                for _ in 0..20 {
                    let rx = {
                        let mut seq = order.lock().await;
                        *seq += 1;
                        w.submit(Epoch(1), Seq(0), vec![put(*seq, &format!("k{seq}"), "v")])
                            .await
                            .unwrap()
                    };
                    assert!(matches!(
                        rx.await.unwrap().into_result().unwrap()[0],
                        Outcome::Written { .. }
                    ));
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        assert_eq!(state.store().pos().seq, Seq(640));
        w.close().await;
        tokio::task::spawn_blocking(move || t.join()).await.unwrap();
        let fsyncs = state.wal_batches.load(Ordering::Relaxed);
        assert!(
            fsyncs < 640,
            "640 concurrent appends took {fsyncs} fsyncs: no group commit"
        );
        let r = recover(dir.path(), true, false).unwrap();
        assert_eq!(r.store.pos().seq, Seq(640));
    }

    /// An old epoch's append still queued when a newer epoch's append for the same seq
    /// arrives (a catch-up after the node was dropped with a slow fsync) lands in the same
    /// group-commit batch: the newer one is a diverged log, not a re-send of a record that
    /// is not in the store yet.
    #[tokio::test]
    async fn a_resend_is_checked_against_an_append_queued_just_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let (state, w, t) = open(dir.path(), 1_000_000);
        // More than `batch_max` records: a batch of its own, which keeps the writer busy
        // writing and fsyncing while the two appends below queue behind it and so share
        // the next batch.
        let busy: Vec<Record> = (1..=2000).map(|i| put(i, &format!("k{i}"), "v")).collect();
        let busy = w.submit(Epoch(1), Seq(0), busy).await.unwrap();
        let old = w
            .submit(Epoch(1), Seq(0), vec![put(2001, "x", "old")])
            .await
            .unwrap();
        let mut newer = put(2001, "x", "new");
        newer.epoch = Epoch(2);
        let new = w.submit(Epoch(2), Seq(0), vec![newer]).await.unwrap();
        assert_eq!(busy.await.unwrap().into_result().unwrap().len(), 2000);
        assert!(matches!(
            old.await.unwrap().into_result().unwrap()[..],
            [Outcome::Written { .. }]
        ));
        let r = new.await.unwrap().into_result();
        assert!(
            matches!(&r, Err(KvError::Internal(m)) if m.contains("diverged log: seq 2001")),
            "{r:?}"
        );
        let (stored, _) = state.store().get("x");
        assert_eq!(stored.map(|v| v.value), Some("old".to_string()));
        w.close().await;
        tokio::task::spawn_blocking(move || t.join()).await.unwrap();
    }

    /// A group commit of more than `WRITE_MAX_BYTES` is written and fsynced in parts, so
    /// a crash never has more than that plus one append unsynced; every record lands.
    #[tokio::test]
    async fn a_large_group_commit_is_written_in_parts() {
        let value = "v".repeat(1_500_000);
        // The four large appends must share one group commit; they queue behind a batch
        // of its own (more than `batch_max` records). Should a slow host let the writer
        // take them apart, the run says so and is repeated.
        for _attempt in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let (state, w, t) = open(dir.path(), 1_000_000);
            let busy: Vec<Record> = (1..=2000).map(|i| put(i, &format!("k{i}"), "v")).collect();
            let busy = w.submit(Epoch(1), Seq(0), busy).await.unwrap();
            let mut large = Vec::new();
            for i in 0..4u64 {
                let r = vec![put(2001 + i, &format!("big{i}"), &value)];
                large.push(w.submit(Epoch(1), Seq(0), r).await.unwrap());
            }
            busy.await.unwrap().into_result().unwrap();
            for rx in large {
                rx.await.unwrap().into_result().unwrap();
            }
            w.close().await;
            tokio::task::spawn_blocking(move || t.join()).await.unwrap();
            assert_eq!(
                recover(dir.path(), true, false).unwrap().store.pos().seq,
                Seq(2004)
            );
            match state.wal_batches.load(Ordering::Relaxed) {
                // The busy batch, then 3 x 1.5 MB (past WRITE_MAX_BYTES), then the last.
                3 => return,
                2 => panic!("6 MB went to disk in one write"),
                _ => continue, // the large appends did not share a group commit
            }
        }
        panic!("the large appends never shared a group commit in 5 attempts");
    }

    #[tokio::test]
    async fn skip_gap_fence_and_epoch_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let (state, w, t) = open(dir.path(), 1_000_000);
        assert_eq!(
            w.append(Epoch(2), Seq(0), vec![put(1, "a", "1"), put(2, "b", "2")])
                .await
                .unwrap()
                .len(),
            2
        );
        // Re-sent records are skipped, with their original outcome.
        let out = w
            .append(Epoch(2), Seq(0), vec![put(2, "b", "2"), put(3, "c", "3")])
            .await
            .unwrap();
        assert_eq!(
            out,
            vec![
                Outcome::Written { version: Seq(2) },
                Outcome::Written { version: Seq(3) }
            ]
        );
        assert_eq!(
            w.append(Epoch(2), Seq(0), vec![put(5, "e", "5")]).await,
            Err(KvError::Gap { expected: Seq(4) })
        );
        assert_eq!(
            w.append(Epoch(1), Seq(0), vec![put(4, "d", "4")]).await,
            Err(KvError::Fenced { seen: 2 })
        );
        // The same seq from another epoch is not a re-send: a diverged log is refused.
        let mut other = put(3, "c", "other");
        other.epoch = Epoch(2);
        let r = w
            .append(Epoch(2), Seq(0), vec![other, put(4, "d", "4")])
            .await;
        assert!(
            matches!(&r, Err(KvError::Internal(m)) if m.contains("diverged log: seq 3")),
            "{r:?}"
        );
        assert_eq!(state.store().pos().seq, Seq(3), "nothing of it was written");
        w.close().await;
        tokio::task::spawn_blocking(move || t.join()).await.unwrap();
        assert_eq!(read_epoch(dir.path()).unwrap(), Epoch(2));
    }

    /// Pipelined batches can reach the writer out of order: the later one waits for the
    /// one it follows instead of being refused, and only a predecessor that never comes
    /// makes it a `Gap`.
    #[tokio::test]
    async fn an_append_that_overtook_the_one_before_it_waits_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let (state, w, t) = open(dir.path(), 1_000_000);
        let wait = Duration::from_secs(10);
        let mut second = Box::pin(w.append_in_order(
            Epoch(1),
            Seq(0),
            vec![put(3, "c", "3"), put(4, "d", "4")],
            wait,
        ));
        // The first poll hands it to the writer, ahead of the append it follows.
        assert!(futures::poll!(second.as_mut()).is_pending());
        let first = w
            .append_in_order(
                Epoch(1),
                Seq(0),
                vec![put(1, "a", "1"), put(2, "b", "2")],
                wait,
            )
            .await
            .unwrap();
        assert_eq!(first.len(), 2);
        assert_eq!(
            second.await.unwrap(),
            vec![
                Outcome::Written { version: Seq(3) },
                Outcome::Written { version: Seq(4) }
            ]
        );
        assert_eq!(state.store().pos().seq, Seq(4));

        // No append before it ever comes: a gap, after the wait.
        let started = std::time::Instant::now();
        let lonely = w
            .append_in_order(
                Epoch(1),
                Seq(0),
                vec![put(7, "g", "7")],
                Duration::from_millis(50),
            )
            .await;
        assert_eq!(lonely, Err(KvError::Gap { expected: Seq(5) }));
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(state.store().pos().seq, Seq(4), "nothing of it was written");
        w.close().await;
        tokio::task::spawn_blocking(move || t.join()).await.unwrap();
    }

    /// An append waiting for the one before it while the node is fenced at a newer epoch,
    /// and that epoch's records fill the gap: resubmitted, it is refused as `Fenced`,
    /// never written after them.
    #[tokio::test]
    async fn an_overtaking_append_fenced_while_it_waits_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (state, w, t) = open(dir.path(), 1_000_000);
        let wait = Duration::from_secs(10);
        let mut old = Box::pin(w.append_in_order(
            Epoch(1),
            Seq(0),
            vec![put(3, "c", "old"), put(4, "d", "old")],
            wait,
        ));
        assert!(futures::poll!(old.as_mut()).is_pending());
        w.truncate(Epoch(2), Seq(0)).await.unwrap();
        let newer: Vec<Record> = (1..=2)
            .map(|i| Record {
                epoch: Epoch(2),
                ..put(i, &format!("n{i}"), "new")
            })
            .collect();
        w.append(Epoch(2), Seq(0), newer).await.unwrap();
        assert_eq!(old.await, Err(KvError::Fenced { seen: 2 }));
        assert_eq!(state.store().pos().seq, Seq(2));
        assert_eq!(state.store().get("c").0, None);
        w.close().await;
        tokio::task::spawn_blocking(move || t.join()).await.unwrap();
    }

    #[tokio::test]
    async fn snapshots_trim_the_wal_and_truncate_rebuilds() {
        let dir = tempfile::tempdir().unwrap();
        let (_, w, t) = open(dir.path(), 10);
        for i in 1..=35 {
            w.append(
                Epoch(1),
                Seq(0),
                vec![put(i, &format!("k{}", i % 4), &format!("v{i}"))],
            )
            .await
            .unwrap();
        }
        // Closing the writer waits for the background snapshot; check the directory, then
        // go on with a writer on the recovered node.
        w.close().await;
        tokio::task::spawn_blocking(move || t.join()).await.unwrap();
        let (state, w, t) = open(dir.path(), 10);
        assert_eq!(state.store().pos().seq, Seq(35));
        let snaps = snapshot::list(dir.path()).unwrap();
        assert_eq!(snaps.len(), 1, "older snapshots removed: {snaps:?}");
        // The snapshot was written while appends went on: it must hold exactly its prefix.
        let written = snapshot::read(&snaps[0].1).unwrap();
        let mut prefix = Store::new();
        for i in 1..=written.pos.seq.0 {
            prefix.apply(&put(i, &format!("k{}", i % 4), &format!("v{i}")));
        }
        assert_eq!(written, prefix.snapshot_data());
        assert!(file::list_segments(dir.path())
            .unwrap()
            .iter()
            .all(|(f, _)| *f > snaps[0].0));
        let before = state.store().digest();
        // Where the last snapshot landed depends on when the snapshot thread ran (a slow
        // one delays the next); cut within the WAL after it.
        let cut = Seq(snaps[0].0 .0.max(33));
        let pos = w.truncate(Epoch(1), cut).await.unwrap();
        assert_eq!(pos.seq, cut);
        let pos = w.truncate(Epoch(1), Seq(2)).await.unwrap();
        assert_eq!(
            pos.seq,
            Seq(0),
            "truncating below the snapshot wipes the node"
        );
        w.close().await;
        tokio::task::spawn_blocking(move || t.join()).await.unwrap();
        assert_ne!(before, state.store().digest());
        assert_eq!(
            recover(dir.path(), true, false).unwrap().store.pos().seq,
            Seq(0)
        );
    }

    /// Appends `n` records, one acknowledged batch at a time, through a writer on the
    /// simulated `disk`, then cuts the power: the writer is gone and every byte that was
    /// not `sync_data`ed is lost (`torn` bytes of the unsynced tail survive, a torn page).
    /// Returns the highest acknowledged seq.
    async fn append_then_power_cut(
        dir: &Path,
        disk: &SimDisk,
        fsync: bool,
        n: u64,
        torn: u64,
    ) -> Seq {
        append_fail_then_power_cut(dir, disk, fsync, n, 0, |d| d.crash(torn).unwrap()).await
    }

    /// [`append_then_power_cut`] with one more batch of `unsynced` records (if not 0)
    /// whose `sync_data` fails, so it is written but not durable when `cut` tears it.
    async fn append_fail_then_power_cut(
        dir: &Path,
        disk: &SimDisk,
        fsync: bool,
        n: u64,
        unsynced: u64,
        cut: impl Fn(&SimDisk),
    ) -> Seq {
        let r = recover_on(Arc::new(disk.clone()), dir, fsync, false).unwrap();
        let first = r.store.pos().seq.0 + 1;
        let state = NodeState::new(dir.to_path_buf(), r.store, read_epoch(dir).unwrap());
        let cfg = WriterConfig {
            batch_max: 64,
            snapshot_every: 1_000_000,
            fsync,
        };
        let (w, t) = WalWriter::start(state, r.wal, cfg).unwrap();
        let mut acked = Seq(first - 1);
        for s in first..first + n {
            w.append(Epoch(1), Seq(0), vec![put(s, &format!("k{s}"), "v")])
                .await
                .unwrap();
            acked = Seq(s);
        }
        if unsynced > 0 {
            disk.fail_next_sync();
            let batch = (1..=unsynced)
                .map(|i| put(acked.0 + i, &format!("u{i}"), "unsynced"))
                .collect();
            let r = w.append(Epoch(1), Seq(0), batch).await;
            assert!(matches!(r, Err(KvError::Io(_))), "{r:?}");
        }
        w.close().await;
        tokio::task::spawn_blocking(move || t.join()).await.unwrap();
        cut(disk);
        acked
    }

    /// The last batch is written but its `fdatasync` fails (the node stops; nothing of it
    /// was acknowledged), then the power goes and tears it, as a prefix or sector by
    /// sector in any order. Recovery starts (a torn tail, never corruption), keeps every
    /// acknowledged record, and of the failed batch at most whole records.
    #[tokio::test]
    async fn a_batch_torn_by_a_power_cut_after_its_sync_failed_is_a_torn_tail() {
        /// A name and a power cut.
        type Tear<'a> = (&'a str, &'a dyn Fn(&SimDisk));
        let tears: [Tear; 6] = [
            ("nothing kept", &|d| d.crash(0).unwrap()),
            ("a prefix kept", &|d| d.crash(700).unwrap()),
            ("even sectors lost", &|d| {
                d.crash_losing_sectors(|k| k % 2 == 0).unwrap()
            }),
            ("odd sectors lost", &|d| {
                d.crash_losing_sectors(|k| k % 2 == 1).unwrap()
            }),
            ("every third lost", &|d| {
                d.crash_losing_sectors(|k| k % 3 == 1).unwrap()
            }),
            ("all kept", &|d| d.crash_losing_sectors(|_| false).unwrap()),
        ];
        for (name, tear) in tears {
            let dir = tempfile::tempdir().unwrap();
            let disk = SimDisk::new();
            let acked = append_fail_then_power_cut(dir.path(), &disk, true, 40, 30, tear).await;
            let r = recover(dir.path(), true, false)
                .unwrap_or_else(|e| panic!("{name}: a torn unsynced batch stopped recovery: {e}"));
            let pos = r.store.pos().seq;
            assert!(
                pos >= acked && pos.0 <= acked.0 + 30,
                "{name}: recovered up to {pos}, acknowledged {acked}"
            );
            for i in 1..=pos.0 - acked.0 {
                let (v, _) = r.store.get(&format!("u{i}"));
                assert_eq!(v.map(|v| v.value).as_deref(), Some("unsynced"), "{name}");
            }
        }
    }

    #[tokio::test]
    async fn acked_appends_survive_a_simulated_power_cut() {
        for torn in [0, 1, 17, 4096] {
            let dir = tempfile::tempdir().unwrap();
            let disk = SimDisk::new();
            let acked = append_then_power_cut(dir.path(), &disk, true, 40, torn).await;
            assert_eq!(
                recover(dir.path(), true, false).unwrap().store.pos().seq,
                acked
            );
            // Recover on the same disk, append more, crash again: still nothing lost.
            let acked = append_then_power_cut(dir.path(), &disk, true, 25, torn).await;
            assert_eq!(acked, Seq(65));
            let r = recover(dir.path(), true, false).unwrap();
            assert_eq!(
                r.store.pos().seq,
                acked,
                "torn {torn}: acknowledged records lost"
            );
        }
    }

    /// Negative control: with `fsync = false` the writer acks before the data is durable,
    /// and the simulated power cut must expose it (else the crash test proves nothing).
    #[tokio::test]
    async fn negative_control_fsync_off_loses_acked_appends_on_power_cut() {
        // Torn parts shorter than the 40 unsynced records (~4 KiB), so some must be lost.
        for torn in [0, 1, 17, 300] {
            let dir = tempfile::tempdir().unwrap();
            let disk = SimDisk::new();
            let acked = append_then_power_cut(dir.path(), &disk, false, 40, torn).await;
            let r = recover(dir.path(), true, false).expect("a torn tail is repaired, not refused");
            assert!(
                r.store.pos().seq < acked,
                "torn {torn}: fsync=false lost nothing ({} of {acked}): the simulated crash cannot catch ack-before-fsync",
                r.store.pos().seq
            );
        }
    }
}
