//! Connections to storage nodes: one tarpc `StorageClient` per node id.
//!
//! - Connections are made lazily, with a connect timeout of `rpc_timeout_ms`, and replaced
//!   when a node registers from a new address or a call reports a broken connection.
//! - After a failed connect, the next attempt waits a capped, doubling backoff; calls in
//!   between fail fast with `Unavailable` instead of piling up on a dead address.
//! - Every call sets `ctx.deadline` to `rpc_timeout_ms` from now (never tarpc's implicit
//!   10 s) and is additionally bounded by a tokio timeout of the same length plus a margin.
//! - [`rpc_error`] is the one place where `tarpc::client::RpcError` becomes `KvError`: a
//!   deadline or a lost connection means the node is unavailable. For an `append` that means
//!   the outcome on that node is unknown, which the sequencer handles by dropping the node
//!   from the in-sync set.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tarpc::client::RpcError;
use walkv_shared::rpc::{
    AppendRequest, FetchReply, NodeIdentity, ReadReply, ScanReply, SnapshotChunk, SnapshotPage,
    StorageClient,
};
use walkv_shared::transport::{connect, context_with_timeout};
use walkv_shared::types::{LogPosition, Outcome};
use walkv_shared::{Epoch, KvError, NodeId, Seq};

/// Largest frame exchanged with a storage node. Append batches (`batch_max` records, capped
/// in bytes by the sequencer) and catch-up pages (`catchup_page_max` records) of large values
/// need room; 256 MiB bounds the memory one peer can make us allocate.
pub const STORAGE_MAX_FRAME: usize = 256 << 20;
/// First reconnect backoff after a failed connect.
const MIN_BACKOFF: Duration = Duration::from_millis(50);
/// Cap of the reconnect backoff: a restarted node is found again within this time.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Extra time past the RPC deadline before the local timeout fires, so that the server's
/// `DeadlineExceeded` normally arrives first and is reported as such.
const DEADLINE_MARGIN: Duration = Duration::from_millis(100);

/// Maps a transport failure of a call to `node` to a `KvError` (the only such mapping).
pub fn rpc_error(node: &NodeId, e: RpcError) -> KvError {
    match e {
        RpcError::DeadlineExceeded => {
            KvError::Unavailable(format!("storage node {node}: deadline exceeded"))
        }
        RpcError::Shutdown => {
            KvError::Unavailable(format!("storage node {node}: connection closed"))
        }
        other => KvError::Unavailable(format!("storage node {node}: rpc failed: {other}")),
    }
}

/// Whether a transport failure means the cached connection is unusable.
fn breaks_connection(e: &RpcError) -> bool {
    !matches!(e, RpcError::DeadlineExceeded)
}

#[derive(Debug)]
struct Conn {
    addr: String,
    client: Option<StorageClient>,
    backoff: Duration,
    retry_at: Option<Instant>,
}

/// The connection pool.
#[derive(Debug)]
pub struct Pool {
    token: String,
    timeout: Duration,
    conns: Mutex<HashMap<NodeId, Conn>>,
}

impl Pool {
    /// An empty pool; nothing is connected until first use.
    pub fn new(token: String, timeout: Duration) -> Pool {
        Pool {
            token,
            timeout,
            conns: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, Conn>> {
        // The map holds no invariant a panicking holder could break half-way.
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets (or changes) the address of `id`; a change drops the old connection.
    pub fn set_addr(&self, id: &NodeId, addr: &str) {
        let mut conns = self.lock();
        let fresh = || Conn {
            addr: addr.to_string(),
            client: None,
            backoff: MIN_BACKOFF,
            retry_at: None,
        };
        match conns.get_mut(id) {
            Some(c) if c.addr == addr => {
                // A re-registration: the process may be new, so reconnect now.
                c.client = None;
                c.retry_at = None;
                c.backoff = MIN_BACKOFF;
            }
            _ => {
                conns.insert(id.clone(), fresh());
            }
        }
    }

    /// Forgets a retired node.
    pub fn forget(&self, id: &NodeId) {
        self.lock().remove(id);
    }

    async fn client(&self, id: &NodeId) -> Result<StorageClient, KvError> {
        let addr = {
            let conns = self.lock();
            let c = conns.get(id).ok_or_else(|| {
                KvError::Unavailable(format!("storage node {id} is not registered"))
            })?;
            if let Some(client) = &c.client {
                return Ok(client.clone());
            }
            if c.retry_at.is_some_and(|t| Instant::now() < t) {
                return Err(KvError::Unavailable(format!(
                    "storage node {id} at {}: reconnect backoff",
                    c.addr
                )));
            }
            c.addr.clone()
        };
        let result = connect(&addr, self.timeout, STORAGE_MAX_FRAME).await;
        let mut conns = self.lock();
        let Some(c) = conns.get_mut(id).filter(|c| c.addr == addr) else {
            return Err(KvError::Unavailable(format!(
                "storage node {id} changed address while connecting"
            )));
        };
        match result {
            Ok(transport) => {
                let client =
                    StorageClient::new(tarpc::client::Config::default(), transport).spawn();
                c.client = Some(client.clone());
                c.backoff = MIN_BACKOFF;
                c.retry_at = None;
                Ok(client)
            }
            Err(e) => {
                c.retry_at = Some(Instant::now() + c.backoff);
                c.backoff = (c.backoff * 2).min(MAX_BACKOFF);
                Err(KvError::Unavailable(format!(
                    "storage node {id}: cannot connect to {addr}: {e}"
                )))
            }
        }
    }

    fn drop_client(&self, id: &NodeId) {
        if let Some(c) = self.lock().get_mut(id) {
            c.client = None;
        }
    }

    /// Runs one call with a deadline of `timeout` and maps its errors.
    async fn call<T, F, Fut>(&self, id: &NodeId, timeout: Duration, f: F) -> Result<T, KvError>
    where
        F: FnOnce(StorageClient, tarpc::context::Context, String) -> Fut,
        Fut: Future<Output = Result<Result<T, KvError>, RpcError>>,
    {
        let client = self.client(id).await?;
        let ctx = context_with_timeout(timeout);
        match tokio::time::timeout(
            timeout + DEADLINE_MARGIN,
            f(client, ctx, self.token.clone()),
        )
        .await
        {
            Err(_) => Err(KvError::Unavailable(format!(
                "storage node {id}: no reply within {} ms",
                timeout.as_millis()
            ))),
            Ok(Ok(inner)) => inner,
            Ok(Err(e)) => {
                if breaks_connection(&e) {
                    self.drop_client(id);
                }
                Err(rpc_error(id, e))
            }
        }
    }

    /// `identity` of a registered node.
    pub async fn identity(&self, id: &NodeId) -> Result<NodeIdentity, KvError> {
        self.call(id, self.timeout, |c, ctx, t| async move {
            c.identity(ctx, t).await
        })
        .await
    }

    /// `identity` of whatever process listens at `addr` (a one-off connection, used to tell
    /// a live duplicate id from a dead registration).
    pub async fn identity_at(&self, addr: &str) -> Result<NodeIdentity, KvError> {
        let transport = connect(addr, self.timeout, STORAGE_MAX_FRAME)
            .await
            .map_err(|e| KvError::Unavailable(format!("cannot connect to {addr}: {e}")))?;
        let client = StorageClient::new(tarpc::client::Config::default(), transport).spawn();
        let ctx = context_with_timeout(self.timeout);
        match tokio::time::timeout(
            self.timeout + DEADLINE_MARGIN,
            client.identity(ctx, self.token.clone()),
        )
        .await
        {
            Err(_) => Err(KvError::Unavailable(format!("{addr}: no reply"))),
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(KvError::Unavailable(format!("{addr}: {e}"))),
        }
    }

    /// `append` to one node.
    pub async fn append(&self, id: &NodeId, req: AppendRequest) -> Result<Vec<Outcome>, KvError> {
        self.call(id, self.timeout, |c, ctx, t| async move {
            c.append(ctx, t, req).await
        })
        .await
    }

    /// `read`, bounded by `deadline` as well as the RPC timeout.
    pub async fn read(
        &self,
        id: &NodeId,
        key: String,
        min_seq: Seq,
        deadline: Instant,
    ) -> Result<ReadReply, KvError> {
        let timeout = self.bounded(deadline);
        self.call(id, timeout, |c, ctx, t| async move {
            c.read(ctx, t, key, min_seq).await
        })
        .await
    }

    /// `read_many`, bounded by the RPC timeout: a prefix of `keys`' answers, in order.
    pub async fn read_many(
        &self,
        id: &NodeId,
        keys: Vec<String>,
        min_seq: Seq,
    ) -> Result<Vec<ReadReply>, KvError> {
        self.call(id, self.timeout, |c, ctx, t| async move {
            c.read_many(ctx, t, keys, min_seq).await
        })
        .await
    }

    /// `scan`, bounded by `deadline` as well as the RPC timeout.
    pub async fn scan(
        &self,
        id: &NodeId,
        prefix: String,
        limit: u32,
        min_seq: Seq,
        deadline: Instant,
    ) -> Result<ScanReply, KvError> {
        let timeout = self.bounded(deadline);
        self.call(id, timeout, |c, ctx, t| async move {
            c.scan(ctx, t, prefix, limit, min_seq).await
        })
        .await
    }

    /// `truncate` a node's log after `after`.
    pub async fn truncate(
        &self,
        id: &NodeId,
        epoch: Epoch,
        after: Seq,
    ) -> Result<LogPosition, KvError> {
        self.call(id, self.timeout, |c, ctx, t| async move {
            c.truncate(ctx, t, epoch, after).await
        })
        .await
    }

    /// Fences node `id` at `epoch` and returns its log end: a `truncate` past any log
    /// end, which cuts nothing. A node handles it in order with its appends, so the
    /// answer counts every append it had already accepted (one that timed out here may
    /// still be queued there), and it refuses appends of older epochs from then on.
    pub async fn fence(&self, id: &NodeId, epoch: Epoch) -> Result<LogPosition, KvError> {
        self.truncate(id, epoch, Seq(u64::MAX)).await
    }

    /// `fetch` records for catch-up.
    pub async fn fetch(&self, id: &NodeId, from: Seq, max: u32) -> Result<FetchReply, KvError> {
        self.call(id, self.timeout, |c, ctx, t| async move {
            c.fetch(ctx, t, from, max).await
        })
        .await
    }

    /// One `snapshot_page`: keys after `after`, or while `after` is `None`, the
    /// exactly-once table's entries after `after_client` first.
    pub async fn snapshot_page(
        &self,
        id: &NodeId,
        seq: Seq,
        after: Option<String>,
        after_client: Option<String>,
        max: u32,
    ) -> Result<SnapshotPage, KvError> {
        self.call(id, self.timeout, |c, ctx, t| async move {
            c.snapshot_page(ctx, t, seq, after, max, after_client).await
        })
        .await
    }

    /// One `install_snapshot` chunk, with a deadline of `timeout` (the last chunk makes the
    /// node persist the whole snapshot, which can take longer than an ordinary call).
    pub async fn install_snapshot(
        &self,
        id: &NodeId,
        epoch: Epoch,
        chunk: SnapshotChunk,
        timeout: Duration,
    ) -> Result<LogPosition, KvError> {
        self.call(id, timeout, |c, ctx, t| async move {
            c.install_snapshot(ctx, t, epoch, chunk).await
        })
        .await
    }

    /// The deadline of an ordinary call (`rpc_timeout_ms`).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn bounded(&self, deadline: Instant) -> Duration {
        self.timeout
            .min(deadline.saturating_duration_since(Instant::now()))
            .max(Duration::from_millis(1))
    }
}
