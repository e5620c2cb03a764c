//! walkv-storage: the storage node of walkv.
//!
//! A storage node keeps a full copy of the key-value data in a durable JSON write-ahead
//! log (WAL) and serves the frontend over the `Storage` tarpc service
//! (`walkv_shared::rpc`). It never talks to clients. Run it with
//! `storage --id s1 --listen 127.0.0.1:7101` (see `storage --help`).
//!
//! # Layout
//!
//! - [`config`]: `Config` (TOML file + flags), defaults and validation.
//! - [`store`]: the in-memory map and the one `apply(&Record)` function.
//! - [`wal`]: the on-disk format, recovery rules, and the group-commit writer thread.
//! - [`snapshot`]: atomic JSON snapshots that bound WAL size and restart time.
//! - [`server`]: `StorageServer`, the RPC adapter (token check, fencing via the writer).
//! - [`registration`]: register + heartbeat loop against the frontend's `Registry`.
//! - [`metrics`]: Prometheus metrics (fsync latency, batch sizes, WAL bytes, snapshots).
//! - [`tools`]: the offline `storage wal verify|dump|bench|store-bench|sync-bench` subcommands.
//!
//! # Lifecycle
//!
//! [`run`] locks the data directory (`LOCK`), recovers (snapshot + WAL replay), starts the
//! writer thread, serves connections on the given listener and registers with the
//! frontend. It returns when the shutdown future resolves (graceful: stop accepting,
//! finish in-flight requests within `shutdown_grace_ms`, close the writer), or as soon as
//! the node hits a disk error ([`RunError::Fatal`]) or the frontend refuses it
//! ([`RunError::Refused`]).

pub mod config;
pub mod metrics;
pub mod page_cursors;
pub mod registration;
pub mod server;
pub mod snapshot;
pub mod store;
pub mod tools;
pub mod wal;

pub use config::Config;

/// Unit tests run on the binary's allocator, so that memory measurements (the ignored
/// `store::tests::memory_*`) mean what they would in a storage node.
#[cfg(test)]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
pub use server::StorageServer;

use std::fs::File;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use tarpc::server::{BaseChannel, Channel};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{error, info, warn};
use wal::writer::{read_epoch, NodeState, WalWriter, WriterConfig, WriterThread};
use walkv_shared::conn::{serve_requests, InFlight, MAX_IN_FLIGHT_PER_CONN};
use walkv_shared::rpc::Storage;
use walkv_shared::{transport, NodeId};

/// Why the node stopped, mapped to exit codes by `main`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunError {
    /// The node could not start or was not let in: data directory locked, corrupt,
    /// unreadable, or its registration refused by the frontend (wrong token, an id that is
    /// live or retired). Exit 1.
    Refused(String),
    /// A disk error stopped a running node. Exit 3.
    Fatal(String),
}

impl RunError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::Refused(_) => 1,
            RunError::Fatal(_) => 3,
        }
    }
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Refused(m) => write!(f, "refused to start: {m}"),
            RunError::Fatal(m) => write!(f, "stopped: {m}"),
        }
    }
}

impl std::error::Error for RunError {}

/// A recovered node: the lock, the shared state and the writer.
struct Node {
    _lock: File,
    state: Arc<NodeState>,
    writer: WalWriter,
    thread: WriterThread,
}

/// Locks `dir` (creating it) so no second process uses it; the lock lasts as long as the
/// returned file is open, and the OS releases it when the process dies.
pub fn lock_data_dir(dir: &Path) -> Result<File, RunError> {
    std::fs::create_dir_all(dir).map_err(|e| {
        RunError::Refused(format!(
            "cannot create data directory {}: {e}",
            dir.display()
        ))
    })?;
    let path = dir.join("LOCK");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| RunError::Refused(format!("cannot open {}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(RunError::Refused(format!(
            "data directory {} is in use by another process (cannot lock {})",
            dir.display(),
            path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(RunError::Refused(format!(
            "cannot lock {}: {e}",
            path.display()
        ))),
    }
}

fn open(config: &Config) -> Result<Node, RunError> {
    let dir = config.data_dir();
    let lock = lock_data_dir(&dir)?;
    let started = std::time::Instant::now();
    let recovered = wal::recover(&dir, config.fsync, config.discard_corrupt_tail)
        .map_err(|e| RunError::Refused(e.to_string()))?;
    let epoch =
        read_epoch(&dir).map_err(|e| RunError::Refused(format!("cannot read epoch file: {e}")))?;
    let pos = recovered.store.pos();
    info!(
        dir = %dir.display(),
        snapshot_seq = %recovered.store.snapshot_pos().seq,
        wal_records = recovered.replayed,
        seq = %pos.seq,
        epoch = epoch.0,
        keys = recovered.store.len(),
        ms = started.elapsed().as_millis() as u64,
        "recovered from snapshot + WAL"
    );
    let state = NodeState::new(dir.clone(), recovered.store, epoch);
    let cfg = WriterConfig {
        batch_max: config.wal_batch_max as usize,
        snapshot_every: config.snapshot_every,
        fsync: config.fsync,
    };
    let (writer, thread) = WalWriter::start(state.clone(), recovered.wal, cfg)
        .map_err(|e| RunError::Refused(format!("cannot start wal writer: {e}")))?;
    Ok(Node {
        _lock: lock,
        state,
        writer,
        thread,
    })
}

/// Runs a storage node on `listener` until `shutdown` resolves or the node fails.
/// `config` must be validated; the caller binds the listener (tests use port 0).
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    if !config.fsync {
        warn!("!!! fsync = false: acknowledged writes can be LOST on power failure; this setting exists only for negative-control tests !!!");
    }
    let cfg = config.clone();
    let node = tokio::task::spawn_blocking(move || open(&cfg))
        .await
        .map_err(|e| RunError::Refused(format!("recovery task failed: {e}")))??;
    let instance: u64 = rand::random();
    let id = NodeId(config.id.clone());
    let limits = server::Limits {
        read_wait: config.read_wait(),
        max_key_bytes: config.max_key_bytes as usize,
        max_value_bytes: config.max_value_bytes as usize,
    };
    let server = StorageServer::new(
        id.clone(),
        instance,
        config.cluster_token.clone(),
        node.state.clone(),
        node.writer.clone(),
        limits,
    );
    let reg = registration::Registration {
        id: id.clone(),
        addr: config.advertise(),
        frontend: config.frontend.clone(),
        token: config.cluster_token.clone(),
        instance,
        heartbeat: config.heartbeat(),
    };
    let mut registration = tokio::spawn(registration::run(reg, node.state.clone()));
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    info!(node = %id, addr = %addr, advertise = %config.advertise(), frontend = %config.frontend, "storage node listening");

    let mut conns = JoinSet::new();
    let limit = Arc::new(Semaphore::new(config.max_connections as usize));
    let mut fatal = node.state.fatal.subscribe();
    let max_frame = config.max_frame_bytes as usize;
    let in_flight = InFlight::new();
    tokio::pin!(shutdown);
    let result = loop {
        // Reap finished connection tasks so the set does not grow without bound.
        while conns.try_join_next().is_some() {}
        let permit = tokio::select! {
            _ = &mut shutdown => break Ok(()),
            _ = fatal.wait_for(|f| f.is_some()) => break Err(RunError::Fatal(node.state.failure().unwrap_or_default())),
            why = &mut registration => break Err(RunError::Refused(why.unwrap_or_else(|e| format!("registration task failed: {e}")))),
            p = limit.clone().acquire_owned() => p,
        };
        let Ok(permit) = permit else { break Ok(()) };
        let accepted = tokio::select! {
            _ = &mut shutdown => break Ok(()),
            _ = fatal.wait_for(|f| f.is_some()) => break Err(RunError::Fatal(node.state.failure().unwrap_or_default())),
            // A refused registration must stop the node even while it waits for a connection.
            why = &mut registration => break Err(RunError::Refused(why.unwrap_or_else(|e| format!("registration task failed: {e}")))),
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let (server, in_flight) = (server.clone(), in_flight.clone());
                conns.spawn(async move {
                    let transport = transport::json_transport(stream, max_frame);
                    let requests = BaseChannel::with_defaults(transport).execute(server.serve());
                    serve_requests(requests, MAX_IN_FLIGHT_PER_CONN, |f| in_flight.track(f)).await;
                    tracing::debug!(peer = %peer, "connection closed");
                    drop(permit);
                });
            }
            // Accept errors (EMFILE, aborted handshakes) are per-connection; keep serving.
            Err(e) => warn!(error = %e, "accept failed"),
        }
    };
    drop(listener);
    registration.abort();
    match &result {
        Ok(()) => info!(
            grace_ms = config.shutdown_grace_ms,
            "shutting down: finishing in-flight requests"
        ),
        Err(e) => error!(error = %e, "stopping the node"),
    }
    // In-flight requests get the grace period; the rest are aborted with the connections.
    if result.is_ok() {
        let left = in_flight.drain(config.shutdown_grace()).await;
        if left > 0 {
            warn!(
                in_flight = left,
                "grace period over; aborting requests still in flight"
            );
        }
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
    drop(server);
    node.writer.close().await;
    let thread = node.thread;
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    info!(node = %id, "storage node stopped");
    result
}
