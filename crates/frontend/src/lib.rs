//! walkv-frontend: the coordinator of walkv.
//!
//! Clients talk only to the frontend (`Frontend` service on `client_listen`); storage nodes
//! register and heartbeat at `storage_listen` (`Registry` service); the frontend calls the
//! nodes' `Storage` service to replicate, read and catch them up. The protocol is
//! `docs/DESIGN.md` ("Frontend"); in short: the frontend assigns every write a `seq` and its
//! `epoch`, appends it to every member of the in-sync set (ISR), and acknowledges once all
//! of them fsynced it; a member that fails leaves the ISR, persisted first.
//!
//! Layout:
//! - [`config`]: `Config`, load + validate.
//! - [`state`]: `state.json` (epoch, ISR, epoch table, removed ids) and the data dir lock.
//! - [`isr`]: the pure membership / ISR state machine.
//! - [`catchup`]: pure matching-point and recovery logic, and the catch-up task.
//! - [`pool`]: one `StorageClient` per node; deadlines, reconnects, error mapping.
//! - [`cluster`]: the handle shared by all tasks (membership, write gate, commit index).
//! - [`sequencer`]: the write path.
//! - [`reads`]: linearizable reads; [`read_batch`]: concurrent reads of a node share one call.
//! - [`registry`]: the `Registry` service and the failure detector.
//! - [`control`]: the loop driving recovery, failure detection and catch-up.
//! - [`server`]: `FrontendServer`, the client-facing service.
//! - [`api`]: the handle the other doors call (the same `FrontendServer` code path).
//! - [`http`]: the HTTP/JSON door, WebSocket watch, `/metrics`, `/health`, status page.
//! - [`resp`] (pure framing) and [`resp_door`]: the Redis-protocol door.
//! - [`watch`]: the committed-change feed behind every watch door.
//! - [`metrics`]: Prometheus metrics.
//!
//! Lifecycle: [`run`] locks the data dir, bumps and persists the epoch, starts `Recovering`,
//! serves both listeners, and becomes `Serving` once recovery has chosen the truth. On
//! shutdown it stops accepting, waits (at most `shutdown_grace_ms`) until no client request
//! is in flight, closes the connections, stops the sequencer (queued writes that never
//! started get `Unavailable`), and persists the state a last time. Correctness never
//! depends on this: every acknowledged write is already fsynced on every ISR member.

pub mod api;
pub mod catchup;
pub mod cluster;
pub mod config;
pub mod control;
pub mod http;
pub mod isr;
pub mod metrics;
pub mod pool;
pub mod read_batch;
pub mod reads;
pub mod registry;
pub mod resp;
pub mod resp_door;
pub mod sequencer;
pub mod server;
pub mod state;
pub mod watch;

pub use config::Config;

use crate::cluster::Cluster;
use crate::isr::{join_ids, Membership};
use crate::registry::RegistryServer;
use crate::server::FrontendServer;
use crate::state::StateFile;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use tarpc::server::{BaseChannel, Channel};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch as signal, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};
use walkv_shared::conn::{serve_requests, InFlight, MAX_IN_FLIGHT_PER_CONN};
use walkv_shared::rpc::{Frontend, Registry};
use walkv_shared::transport::json_transport;

/// Largest frame on the registry listener: registrations and heartbeats are small.
pub const REGISTRY_MAX_FRAME: usize = 1 << 20;

/// A start-up failure, with the reason for the operator.
#[derive(Debug, Clone)]
pub struct StartError(pub String);

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

/// The optional front doors, already bound by the caller (`None` = off).
#[derive(Debug, Default)]
pub struct Doors {
    /// HTTP/JSON + WebSocket + metrics + status page listener.
    pub http: Option<TcpListener>,
    /// Redis-protocol listener.
    pub resp: Option<TcpListener>,
}

/// Runs the frontend on already-bound listeners until `shutdown` resolves, without the
/// HTTP and RESP doors.
pub async fn run(
    config: Config,
    client_listener: TcpListener,
    storage_listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    run_with_doors(
        config,
        client_listener,
        storage_listener,
        Doors::default(),
        shutdown,
    )
    .await
}

/// Runs the frontend with the given extra doors until `shutdown` resolves.
pub async fn run_with_doors(
    config: Config,
    client_listener: TcpListener,
    storage_listener: TcpListener,
    doors: Doors,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    config
        .validate()
        .map_err(|e| StartError(format!("invalid configuration: {e}")))?;
    let (state_file, mut state) = StateFile::open(&config.data_dir).map_err(StartError)?;
    state.epoch.0 += 1;
    state_file.persist(&state).map_err(|e| {
        StartError(format!(
            "cannot persist epoch to {}: {e}",
            config.data_dir.display()
        ))
    })?;
    info!(
        epoch = %state.epoch,
        isr = %join_ids(state.isr.iter()),
        client_listen = %local(&client_listener),
        storage_listen = %local(&storage_listener),
        data_dir = %config.data_dir.display(),
        unsafe_recover = config.unsafe_recover,
        "frontend starting; recovering"
    );
    if config.unsafe_read_any_node {
        warn!(
            "!!! UNSAFE: unsafe_read_any_node = true: reads are served by ANY registered node \
             without waiting for commit; they can be stale or uncommitted and are NOT \
             linearizable. This setting exists only as a negative control for tests !!!"
        );
    }
    let (write_tx, write_rx) = mpsc::channel(config.write_queue as usize);
    let (shutdown_tx, shutdown_rx) = signal::channel(false);
    let cluster = Arc::new(Cluster::new(
        config,
        Membership::new(state),
        state_file,
        write_tx,
    ));

    let sequencer = tokio::spawn(sequencer::run(
        cluster.clone(),
        write_rx,
        shutdown_rx.clone(),
    ));
    let control = tokio::spawn(control::run(cluster.clone(), shutdown_rx.clone()));
    let (doors_stop_tx, doors_stop) = signal::channel(false);
    let door_tasks = spawn_doors(&cluster, doors, doors_stop);

    let max_conns = cluster.config.max_connections as usize;
    let client_sem = Arc::new(Semaphore::new(max_conns));
    let storage_sem = Arc::new(Semaphore::new(max_conns));
    let client_frame = cluster.config.client_max_frame();
    let mut conns = JoinSet::new();
    let in_flight = InFlight::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = accept(&client_listener, &client_sem) => {
                if let Some((stream, permit)) = accepted {
                    let serve = FrontendServer::new(cluster.clone());
                    let channel = BaseChannel::with_defaults(json_transport(stream, client_frame));
                    let in_flight = in_flight.clone();
                    conns.spawn(async move {
                        let _permit = permit;
                        serve_requests(channel.execute(serve.serve()), MAX_IN_FLIGHT_PER_CONN, |f| {
                            in_flight.track(f)
                        })
                        .await;
                    });
                }
            }
            accepted = accept(&storage_listener, &storage_sem) => {
                if let Some((stream, permit)) = accepted {
                    let serve = RegistryServer::new(cluster.clone());
                    let channel = BaseChannel::with_defaults(json_transport(stream, REGISTRY_MAX_FRAME));
                    conns.spawn(async move {
                        let _permit = permit;
                        serve_requests(channel.execute(serve.serve()), MAX_IN_FLIGHT_PER_CONN, |f| f).await;
                    });
                }
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }

    info!("shutting down: no longer accepting connections");
    let _ = doors_stop_tx.send(true);
    stop_doors(door_tasks, cluster.config.shutdown_grace()).await;
    drop(client_listener);
    drop(storage_listener);
    let left = in_flight.drain(cluster.config.shutdown_grace()).await;
    if left > 0 {
        warn!(
            in_flight = left,
            "grace period over; aborting requests still in flight"
        );
    }
    debug!(open = conns.len(), "closing connections");
    conns.abort_all();
    while conns.join_next().await.is_some() {}
    let _ = shutdown_tx.send(true);
    if let Err(e) = sequencer.await {
        warn!(error = %e, "sequencer task ended abnormally");
    }
    if let Err(e) = control.await {
        warn!(error = %e, "control task ended abnormally");
    }
    {
        let _gate = cluster.gate.lock().await;
        if let Err(e) = cluster.persist().await {
            error!(error = %e, "cannot persist state at shutdown");
        }
    }
    info!(epoch = %cluster.m().state.epoch, commit = %cluster.commit(), "frontend stopped");
    Ok(())
}

/// Starts the HTTP and RESP doors that were given; they stop when `stop` turns true.
fn spawn_doors(cluster: &Arc<Cluster>, doors: Doors, stop: signal::Receiver<bool>) -> JoinSet<()> {
    let mut tasks = JoinSet::new();
    let stopped = move |mut rx: signal::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    if let Some(l) = doors.http {
        let api = api::Api::new(cluster.clone(), "http");
        tasks.spawn(http::serve(api, l, stopped(stop.clone())));
    }
    if let Some(l) = doors.resp {
        let api = api::Api::new(cluster.clone(), "resp");
        tasks.spawn(resp_door::serve(api, l, stopped(stop.clone())));
    }
    tasks
}

/// Gives the doors the grace period to finish open requests, then aborts them (open
/// WebSocket watchers never finish on their own).
async fn stop_doors(mut tasks: JoinSet<()>, grace: std::time::Duration) {
    let drained =
        tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}

/// Accepts one connection once a connection slot is free. Accept errors (e.g. out of file
/// descriptors) are logged and retried after a short pause instead of ending the server.
async fn accept(
    listener: &TcpListener,
    sem: &Arc<Semaphore>,
) -> Option<(TcpStream, OwnedSemaphorePermit)> {
    /// Pause after a failed accept so a persistent error does not spin.
    const ACCEPT_ERROR_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);
    // The semaphore is never closed, so acquiring only waits.
    let permit = sem.clone().acquire_owned().await.ok()?;
    match listener.accept().await {
        Ok((stream, peer)) => {
            debug!(peer = %peer, "connection accepted");
            Some((stream, permit))
        }
        Err(e) => {
            warn!(error = %e, "accept failed");
            tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            None
        }
    }
}

fn local(l: &TcpListener) -> String {
    l.local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into())
}
