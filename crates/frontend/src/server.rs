//! `FrontendServer`: the `Frontend` service clients call. A thin adapter: it validates
//! input, then hands writes to the sequencer and reads to [`crate::reads`].
//!
//! Validation: an empty key is `InvalidKey`; a key over `max_key_bytes` or a value over
//! `max_value_bytes` is `TooLarge { what, limit }`; a scan `limit` of 0 or above
//! [`MAX_SCAN_LIMIT`] is clamped to [`MAX_SCAN_LIMIT`]. Every request ends within
//! `request_timeout_ms` (a write still in the queue or in flight then answers `Timeout`:
//! its outcome is unknown and a retry with the same op number settles it).

use crate::cluster::Cluster;
use crate::metrics::METRICS;
use crate::reads;
use crate::sequencer::WriteJob;
use std::sync::Arc;
use std::time::Instant;
use tarpc::context::Context;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, instrument};
use walkv_shared::rpc::Frontend;
use walkv_shared::types::{
    ClusterStatus, KeyValue, Versioned, WatchBatch, WriteOp, WriteRequest, WriteResult,
};
use walkv_shared::{Epoch, KvError, NodeId, Seq};

/// Largest number of items one scan returns, so one reply stays bounded.
pub const MAX_SCAN_LIMIT: u32 = 10_000;

/// Serves `Frontend` for one connection.
#[derive(Clone, Debug)]
pub struct FrontendServer {
    cluster: Arc<Cluster>,
    /// Which door the requests came through (`tarpc`, `http`, `resp`): a metrics label.
    door: &'static str,
}

impl FrontendServer {
    /// A server over the shared cluster handle, for the tarpc door.
    pub fn new(cluster: Arc<Cluster>) -> FrontendServer {
        Self::for_door(cluster, "tarpc")
    }

    /// A server for another door ([`crate::api`]); the same code path, another label.
    pub fn for_door(cluster: Arc<Cluster>, door: &'static str) -> FrontendServer {
        FrontendServer { cluster, door }
    }

    fn check_key(&self, key: &str) -> Result<(), KvError> {
        if key.is_empty() {
            return Err(KvError::InvalidKey("key is empty".into()));
        }
        let limit = self.cluster.config.max_key_bytes;
        if key.len() > limit as usize {
            return Err(KvError::TooLarge {
                what: "key".into(),
                limit: limit.into(),
            });
        }
        Ok(())
    }

    fn check_value(&self, value: &str) -> Result<(), KvError> {
        let limit = self.cluster.config.max_value_bytes;
        if value.len() > limit as usize {
            return Err(KvError::TooLarge {
                what: "value".into(),
                limit: limit.into(),
            });
        }
        Ok(())
    }

    fn check_write(&self, op: &WriteOp) -> Result<(), KvError> {
        self.check_key(op.key())?;
        match op {
            WriteOp::Put { value, .. } | WriteOp::Cas { value, .. } => self.check_value(value),
            WriteOp::Delete { .. } => Ok(()),
        }
    }
}

impl Frontend for FrontendServer {
    async fn ping(self, _: Context) -> Epoch {
        self.cluster.m().state.epoch
    }

    #[instrument(level = "debug", skip(self, _ctx))]
    async fn get(self, _ctx: Context, client: String, key: String) -> Result<Versioned, KvError> {
        let start = Instant::now();
        let r = match self.check_key(&key) {
            Ok(()) => reads::get(&self.cluster, key).await,
            Err(e) => Err(e),
        };
        METRICS.observe(self.door, "get", &r, start);
        r
    }

    #[instrument(level = "debug", skip(self, _ctx), fields(client = %req.client, op_no = req.op_no))]
    async fn write(self, _ctx: Context, req: WriteRequest) -> Result<WriteResult, KvError> {
        let start = Instant::now();
        let op = match req.op {
            WriteOp::Put { .. } => "put",
            WriteOp::Delete { .. } => "delete",
            WriteOp::Cas { .. } => "cas",
        };
        let door = self.door;
        let r = self.write_inner(req).await;
        METRICS.observe(door, op, &r, start);
        r
    }

    #[instrument(level = "debug", skip(self, _ctx))]
    async fn scan(
        self,
        _ctx: Context,
        client: String,
        prefix: String,
        limit: u32,
    ) -> Result<Vec<KeyValue>, KvError> {
        let start = Instant::now();
        let door = self.door;
        // Boxed, like `watch`: their state is kilobytes, and every request's future is as
        // large as the largest method's, so inline they would make each get and write
        // copy it around.
        let r = Box::pin(self.scan_inner(prefix, limit)).await;
        METRICS.observe(door, "scan", &r, start);
        r
    }

    async fn watch(
        self,
        _: Context,
        prefix: String,
        from: Seq,
        max: u32,
        wait_ms: u32,
    ) -> Result<WatchBatch, KvError> {
        if prefix.len() > self.cluster.config.max_key_bytes as usize {
            return Err(KvError::TooLarge {
                what: "prefix".into(),
                limit: self.cluster.config.max_key_bytes.into(),
            });
        }
        let wait = std::time::Duration::from_millis(wait_ms.into());
        Box::pin(crate::watch::poll(&self.cluster, &prefix, from, max, wait)).await
    }

    async fn status(self, _: Context) -> ClusterStatus {
        self.cluster.m().status(
            self.cluster.commit(),
            self.cluster.config.min_insync,
            Instant::now(),
        )
    }

    async fn remove_node(self, _: Context, id: NodeId) -> Result<(), KvError> {
        let _gate = self.cluster.gate.lock().await;
        self.cluster.m().retire(&id)?;
        self.cluster.pool.forget(&id);
        self.cluster.persist().await?;
        let isr = crate::isr::join_ids(self.cluster.m().state.isr.iter());
        info!(node = %id, isr = %isr, "node retired with remove_node");
        Ok(())
    }
}

impl FrontendServer {
    async fn write_inner(self, req: WriteRequest) -> Result<WriteResult, KvError> {
        self.check_write(&req.op)?;
        let deadline = Instant::now() + self.cluster.config.request_timeout();
        let (tx, rx) = oneshot::channel();
        // The queue usually has room: take it without the (larger, boxed) waiting future.
        match self.cluster.writes.try_send(WriteJob { req, reply: tx }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Closed(_)) => {
                return Err(KvError::Unavailable("frontend is shutting down".into()))
            }
            Err(mpsc::error::TrySendError::Full(job)) => {
                let queued = Box::pin(tokio::time::timeout_at(
                    deadline.into(),
                    self.cluster.writes.send(job),
                ))
                .await;
                match queued {
                    Err(_) => return Err(KvError::Unavailable("write queue is full".into())),
                    Ok(Err(_)) => {
                        return Err(KvError::Unavailable("frontend is shutting down".into()))
                    }
                    Ok(Ok(())) => {}
                }
            }
        }
        match tokio::time::timeout_at(deadline.into(), rx).await {
            Err(_) => Err(KvError::Timeout(format!(
                "no answer within {} ms; the write may or may not have committed",
                self.cluster.config.request_timeout_ms
            ))),
            Ok(Err(_)) => Err(KvError::Timeout(
                "frontend stopped before answering; outcome unknown".into(),
            )),
            Ok(Ok(result)) => result,
        }
    }

    async fn scan_inner(self, prefix: String, limit: u32) -> Result<Vec<KeyValue>, KvError> {
        let max = self.cluster.config.max_key_bytes;
        if prefix.len() > max as usize {
            return Err(KvError::TooLarge {
                what: "prefix".into(),
                limit: max.into(),
            });
        }
        let limit = if limit == 0 {
            MAX_SCAN_LIMIT
        } else {
            limit.min(MAX_SCAN_LIMIT)
        };
        reads::scan(&self.cluster, prefix, limit).await
    }
}

#[cfg(test)]
mod tests {
    use tarpc::server::Serve;
    use walkv_shared::rpc::{Frontend, FrontendRequest};

    fn size_of_output<A, R>(_: impl FnOnce(A) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// Every request's future is as large as the largest method's, and tarpc and the
    /// connection's driver (`serve_requests`) move it into place (memcpy) per request. With
    /// scan and watch inline it was 4976 bytes and `memmove` led the frontend's profile
    /// under GET load; the cold, large paths are boxed to keep it small.
    #[test]
    fn request_futures_stay_small() {
        let ctx = tarpc::context::current();
        let serve = size_of_output(move |s: super::FrontendServer| {
            s.serve().serve(ctx, FrontendRequest::Ping {})
        });
        let get = size_of_output(move |s: super::FrontendServer| {
            s.get(ctx, String::new(), String::new())
        });
        let write = size_of_output(
            move |(s, r): (super::FrontendServer, walkv_shared::types::WriteRequest)| {
                s.write(ctx, r)
            },
        );
        assert!(get <= 1536, "get's future is {get} bytes");
        assert!(write <= 1536, "write's future is {write} bytes");
        assert!(serve <= 2048, "a request's future is {serve} bytes");
    }
}
