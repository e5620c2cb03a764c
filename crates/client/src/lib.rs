//! walkv-client: the library every walkv client uses, and the `client` CLI built on it.
//!
//! A [`Client`] talks to the frontend (`Frontend` service, default 127.0.0.1:7000) over a
//! [`Connection`]: its own by default, or one shared with other clients
//! ([`Client::with_connection`]; tarpc multiplexes concurrent calls over one connection,
//! which is how `client bench` runs many client ids over a few sockets). Every write carries the client id and an operation number; a write that
//! fails with a retryable error (`Unavailable`, `Timeout`, lost connection) is retried with
//! the **same** op number, with capped backoff, until `retry_deadline`. The frontend applies
//! a `(client, op_no)` at most once, so a retry never applies a write twice.
//!
//! # Op numbers
//!
//! Op numbers must increase for a client id, also across separate `client` invocations with
//! the same `--id`. They are derived from the wall clock in microseconds (and +1 past the
//! previous one), so a new process continues above the last one. Two processes using the
//! same id **at the same time** are not supported: their op numbers interleave and one's
//! writes may be refused as stale.
//!
//! # Unknown outcomes
//!
//! When retries are exhausted and some attempt may have reached the frontend (a timeout or
//! a connection lost mid-request), a write returns `KvError::Timeout`: it may or may not
//! have committed. `Unavailable` means no attempt could have been applied.
//!
//! # Request size
//!
//! A request whose frame could exceed `max_frame_bytes` is refused with `TooLarge` before
//! anything is sent: it was not applied. With the default limit every request that is sent
//! reaches the frontend, whose client frame limit is never below it, and a key or value over
//! the cluster's limits gets the frontend's `TooLarge` (see
//! [`walkv_shared::rpc::CLIENT_MAX_FRAME_DEFAULT`]).

use std::sync::Arc;
use std::time::Duration;
use tarpc::client::Config as RpcConfig;
use walkv_shared::rpc::{request_frame_bytes, FrontendClient};
use walkv_shared::transport::{connect, context_with_timeout, unix_micros};
use walkv_shared::types::{
    ClusterStatus, KeyValue, NodeId, Versioned, WatchBatch, WriteOp, WriteRequest,
};
use walkv_shared::{KvError, Seq};

pub mod bench;
pub mod config;

pub use config::ClientConfig;

/// First retry delay; doubles up to [`RETRY_BACKOFF_MAX`].
const RETRY_BACKOFF_START: Duration = Duration::from_millis(20);
/// Cap on the retry delay, so a client notices a recovered cluster within a second.
const RETRY_BACKOFF_MAX: Duration = Duration::from_millis(1000);

/// A lazily made, shareable tarpc connection to the frontend. Cloning it shares the
/// socket: every clone sees the same connection and the same reconnect after a failure.
#[derive(Clone, Debug)]
pub struct Connection {
    config: ClientConfig,
    /// The live connection, if any. A tokio mutex because connecting awaits; it is held
    /// only to read, make or clear the handle, never across a call.
    rpc: Arc<tokio::sync::Mutex<Option<FrontendClient>>>,
}

impl Connection {
    /// A connection to the frontend in `config`; nothing is dialled until first use.
    pub fn new(config: ClientConfig) -> Connection {
        Connection {
            config,
            rpc: Arc::new(tokio::sync::Mutex::new(None)),
        }
    }

    /// The live connection, dialling it first if needed.
    async fn get(&self) -> Result<FrontendClient, KvError> {
        let mut slot = self.rpc.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let transport = connect(
            &self.config.frontend,
            self.config.connect_timeout(),
            self.config.max_frame_bytes as usize,
        )
        .await
        .map_err(|e| {
            KvError::Unavailable(format!(
                "cannot connect to frontend {}: {e}",
                self.config.frontend
            ))
        })?;
        // The detached dispatch task ends when the transport closes or every handle is dropped.
        let client = FrontendClient::new(RpcConfig::default(), transport).spawn();
        *slot = Some(client.clone());
        Ok(client)
    }

    /// Forgets the connection so the next call dials again (after a transport failure).
    async fn reset(&self) {
        *self.rpc.lock().await = None;
    }
}

/// A client id talking to the frontend over a [`Connection`].
pub struct Client {
    id: String,
    config: ClientConfig,
    conn: Connection,
    last_op_no: u64,
}

/// Whether a failed attempt could have been applied by the cluster.
fn attempt_is_ambiguous(e: &KvError) -> bool {
    match e {
        KvError::Timeout(_) => true,
        // The frontend itself answers Unavailable only before queueing the write; a closed
        // or failed connection is mapped to Unavailable too but may have carried the write.
        KvError::Unavailable(why) => {
            why.starts_with("rpc failed") || why.starts_with("connection closed")
        }
        _ => false,
    }
}

impl Client {
    /// Creates a client `id` for the frontend named in `config`. The connection is made
    /// on first use (and re-made after failures), so a client started while the frontend
    /// restarts simply retries; an unreachable frontend surfaces as `Unavailable`.
    pub async fn connect(id: impl Into<String>, config: ClientConfig) -> Result<Client, KvError> {
        let client = Client::with_connection(id, Connection::new(config))?;
        // A first attempt now reports a bad address early; failure is not fatal here.
        if let Err(e) = client.conn.get().await {
            tracing::debug!(error = %e, "frontend not reachable yet; will retry on first request");
        }
        Ok(client)
    }

    /// Creates a client `id` over a connection that other clients may share. Each client
    /// keeps its own op numbers, so exactly-once holds per id as with [`Client::connect`].
    pub fn with_connection(id: impl Into<String>, conn: Connection) -> Result<Client, KvError> {
        let id = id.into();
        if id.is_empty() {
            return Err(KvError::InvalidInput("client id must not be empty".into()));
        }
        Ok(Client {
            id,
            config: conn.config.clone(),
            conn,
            last_op_no: unix_micros(),
        })
    }

    /// The client id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Refuses a request carrying `strings` whose frame could exceed `max_frame_bytes`:
    /// the codec would fail to send it and close the connection, which reads as a lost
    /// request (retried, then an unknown outcome) although nothing left the client.
    fn check_request_size(&self, strings: &[&str]) -> Result<(), KvError> {
        let limit = self.config.max_frame_bytes;
        if request_frame_bytes(strings) as u64 > limit {
            return Err(KvError::TooLarge {
                what: "request (as JSON, over the client's max_frame_bytes)".into(),
                limit,
            });
        }
        Ok(())
    }

    fn next_op_no(&mut self) -> u64 {
        self.last_op_no = (self.last_op_no + 1).max(unix_micros());
        self.last_op_no
    }

    /// Runs `call` until it succeeds, fails deterministically, or the retry deadline passes.
    /// Returns the final error with `ambiguous` set when any attempt might have been applied.
    async fn with_retries<T, F, Fut>(&mut self, mut call: F) -> Result<T, (KvError, bool)>
    where
        F: FnMut(FrontendClient, tarpc::context::Context) -> Fut,
        Fut: std::future::Future<Output = Result<Result<T, KvError>, tarpc::client::RpcError>>,
    {
        let deadline = tokio::time::Instant::now() + self.config.retry_deadline();
        let mut backoff = RETRY_BACKOFF_START;
        let mut ambiguous = false;
        loop {
            let result = match self.conn.get().await {
                Ok(rpc) => {
                    match call(rpc, context_with_timeout(self.config.request_timeout())).await {
                        Ok(inner) => inner,
                        Err(rpc_err) => {
                            // The connection may be broken: reconnect on the next attempt.
                            self.conn.reset().await;
                            Err(KvError::from(rpc_err))
                        }
                    }
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(v) => return Ok(v),
                Err(e) if e.is_retryable() => {
                    ambiguous |= attempt_is_ambiguous(&e);
                    if tokio::time::Instant::now() + backoff > deadline {
                        return Err((e, ambiguous));
                    }
                    tracing::debug!(error = %e, "retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
                }
                Err(e) => return Err((e, ambiguous)),
            }
        }
    }

    async fn write(&mut self, op: WriteOp) -> Result<Seq, KvError> {
        match &op {
            WriteOp::Put { key, value } | WriteOp::Cas { key, value, .. } => {
                self.check_request_size(&[&self.id, key, value])?
            }
            WriteOp::Delete { key } => self.check_request_size(&[&self.id, key])?,
        }
        let req = WriteRequest {
            client: self.id.clone(),
            op_no: self.next_op_no(),
            op,
        };
        self.with_retries(|rpc, ctx| {
            let req = req.clone();
            async move { rpc.write(ctx, req).await }
        })
        .await
        .map(|r| r.version)
        .map_err(|(e, ambiguous)| match e {
            KvError::Unavailable(why) if ambiguous => KvError::Timeout(format!(
                "gave up retrying; the write may or may not have committed ({why})"
            )),
            other => other,
        })
    }

    /// Sets `key` to `value`; returns the version it committed at.
    pub async fn put(&mut self, key: &str, value: &str) -> Result<Seq, KvError> {
        self.write(WriteOp::Put {
            key: key.into(),
            value: value.into(),
        })
        .await
    }

    /// Deletes `key`; `NotFound` when it does not exist.
    pub async fn delete(&mut self, key: &str) -> Result<Seq, KvError> {
        self.write(WriteOp::Delete { key: key.into() }).await
    }

    /// Sets `key` to `value` if its version is `expected` (0: the key must not exist).
    pub async fn cas(&mut self, key: &str, expected: Seq, value: &str) -> Result<Seq, KvError> {
        self.write(WriteOp::Cas {
            key: key.into(),
            expected,
            value: value.into(),
        })
        .await
    }

    /// Reads `key` (linearizable).
    pub async fn get(&mut self, key: &str) -> Result<Versioned, KvError> {
        self.check_request_size(&[&self.id, key])?;
        let (id, key) = (self.id.clone(), key.to_string());
        self.with_retries(|rpc, ctx| {
            let (id, key) = (id.clone(), key.clone());
            async move { rpc.get(ctx, id, key).await }
        })
        .await
        .map_err(|(e, _)| e)
    }

    /// Keys starting with `prefix`, in key order, at most `limit`.
    pub async fn scan(&mut self, prefix: &str, limit: u32) -> Result<Vec<KeyValue>, KvError> {
        self.check_request_size(&[&self.id, prefix])?;
        let (id, prefix) = (self.id.clone(), prefix.to_string());
        self.with_retries(|rpc, ctx| {
            let (id, prefix) = (id.clone(), prefix.clone());
            async move { rpc.scan(ctx, id, prefix, limit).await }
        })
        .await
        .map_err(|(e, _)| e)
    }

    /// One watch long-poll: committed changes of keys starting with `prefix` with
    /// `version >= from`, at most `max`, waiting up to `wait` for a first one. Retried like
    /// a read; resume with the answer's `next`.
    pub async fn watch(
        &mut self,
        prefix: &str,
        from: Seq,
        max: u32,
        wait: Duration,
    ) -> Result<WatchBatch, KvError> {
        self.check_request_size(&[prefix])?;
        let wait_ms = wait.as_millis().min(u32::MAX as u128) as u32;
        // The frontend may hold the call for `wait` before it starts answering.
        let deadline = self.config.request_timeout() + wait;
        let prefix = prefix.to_string();
        self.with_retries(|rpc, mut ctx| {
            let prefix = prefix.clone();
            ctx.deadline = std::time::Instant::now() + deadline;
            async move { rpc.watch(ctx, prefix, from, max, wait_ms).await }
        })
        .await
        .map_err(|(e, _)| e)
    }

    /// The cluster's status (one attempt: status should show the present, not wait).
    pub async fn status(&mut self) -> Result<ClusterStatus, KvError> {
        let rpc = self.conn.get().await?;
        rpc.status(context_with_timeout(self.config.request_timeout()))
            .await
            .map_err(KvError::from)
    }

    /// Retires node `id` for good.
    pub async fn remove_node(&mut self, id: &str) -> Result<(), KvError> {
        let node = NodeId(id.to_string());
        self.with_retries(|rpc, ctx| {
            let node = node.clone();
            async move { rpc.remove_node(ctx, node).await }
        })
        .await
        .map_err(|(e, _)| e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request over the client's frame limit is refused before anything is sent, so no
    /// frontend is needed to see it; a request within the limit goes on and meets the
    /// closed port (unavailable, not too large).
    #[tokio::test]
    async fn a_request_over_the_frame_limit_is_refused_before_sending() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let frontend = closed.local_addr().unwrap().to_string();
        drop(closed);
        let config = ClientConfig {
            frontend,
            max_frame_bytes: 4096,
            retry_deadline_ms: 1,
            ..ClientConfig::default()
        };
        let mut c = Client::with_connection("small", Connection::new(config)).unwrap();
        let big = "v".repeat(4096);
        // Control characters are counted as JSON writes them: six bytes each.
        let escaped = "\u{1}".repeat(700);
        for refused in [
            c.put("k", &big).await.map(|_| ()),
            c.put("k", &escaped).await.map(|_| ()),
            c.cas("k", Seq(0), &big).await.map(|_| ()),
            c.delete(&big).await.map(|_| ()),
            c.get(&big).await.map(|_| ()),
            c.scan(&big, 1).await.map(|_| ()),
            c.watch(&big, Seq(0), 1, Duration::ZERO).await.map(|_| ()),
        ] {
            match refused {
                Err(KvError::TooLarge { limit, .. }) => assert_eq!(limit, 4096),
                other => panic!("expected TooLarge, got {other:?}"),
            }
        }
        match c.put("k", &"v".repeat(3000)).await {
            Err(KvError::Unavailable(_)) => {}
            other => panic!("expected Unavailable from the closed port, got {other:?}"),
        }
    }
}
