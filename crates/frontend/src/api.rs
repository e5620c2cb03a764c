//! `Api`: what the HTTP and RESP doors call. A thin layer over [`FrontendServer`]: every
//! operation goes through the very `Frontend` methods the tarpc door serves (validation,
//! sequencer, linearizable reads, errors, request metrics labelled with the door).
//!
//! # Client ids for doors without one
//!
//! A write needs a `(client, op_no)` pair, and op numbers of one client id must be issued
//! one at a time. HTTP may pass its own (`X-Walkv-Client` / `X-Walkv-Op`, which makes a
//! retry exactly-once); otherwise the write borrows a **lane** from [`Lanes`]: a client id
//! `<door>-<instance>-<n>` that only one request uses at a time, with an increasing op
//! number. Lanes are reused, so the frontend's exactly-once table grows by at most the
//! peak number of concurrent anonymous writes per process start, not by one entry per
//! request. Such writes are at most once but a retry by the caller is a new write.

use crate::cluster::Cluster;
use crate::server::FrontendServer;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tarpc::context;
use walkv_shared::rpc::Frontend;
use walkv_shared::transport::unix_micros;
use walkv_shared::types::{
    ClusterStatus, KeyValue, Versioned, WatchBatch, WriteOp, WriteRequest, WriteResult,
};
use walkv_shared::{KvError, Seq};

/// A pool of reusable anonymous client ids (see the module docs).
#[derive(Debug)]
pub struct Lanes {
    prefix: String,
    free: Mutex<Vec<Lane>>,
    created: AtomicU64,
}

#[derive(Debug)]
struct Lane {
    id: String,
    op_no: u64,
}

impl Lanes {
    /// A pool whose ids start with `door` and a per-process random instance number.
    pub fn new(door: &str) -> Lanes {
        Lanes {
            prefix: format!("{door}-{:x}", unix_micros()),
            free: Mutex::new(Vec::new()),
            created: AtomicU64::new(0),
        }
    }

    fn take(&self) -> Lane {
        let reused = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop();
        reused.unwrap_or_else(|| Lane {
            id: format!(
                "{}-{}",
                self.prefix,
                self.created.fetch_add(1, Ordering::Relaxed)
            ),
            op_no: 0,
        })
    }

    fn give_back(&self, lane: Lane) {
        self.free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(lane);
    }
}

/// The doors' handle on the coordinator.
#[derive(Clone, Debug)]
pub struct Api {
    /// The shared cluster handle.
    pub cluster: Arc<Cluster>,
    door: &'static str,
    lanes: Arc<Lanes>,
}

fn ctx(cluster: &Cluster) -> context::Context {
    // The frontend enforces request_timeout_ms itself; this deadline only has to be later.
    let mut ctx = context::current();
    ctx.deadline = Instant::now() + cluster.config.request_timeout() + Duration::from_secs(1);
    ctx
}

impl Api {
    /// An API for door `door` (a metrics label and lane id prefix).
    pub fn new(cluster: Arc<Cluster>, door: &'static str) -> Api {
        Api {
            cluster,
            door,
            lanes: Arc::new(Lanes::new(door)),
        }
    }

    fn server(&self) -> FrontendServer {
        FrontendServer::for_door(self.cluster.clone(), self.door)
    }

    /// Linearizable read.
    pub async fn get(&self, key: String) -> Result<Versioned, KvError> {
        self.server()
            .get(ctx(&self.cluster), self.door.to_string(), key)
            .await
    }

    /// A write with an explicit `(client, op_no)` (exactly-once retries) or, when `None`,
    /// on a borrowed lane.
    pub async fn write(
        &self,
        op: WriteOp,
        id: Option<(String, u64)>,
    ) -> Result<WriteResult, KvError> {
        match id {
            Some((client, op_no)) => self.write_as(client, op_no, op).await,
            None => {
                let mut lane = self.lanes.take();
                lane.op_no += 1;
                let r = self.write_as(lane.id.clone(), lane.op_no, op).await;
                // A lane whose write has an unknown outcome may still see it applied later;
                // the next op number on it is higher anyway, so reuse is safe.
                self.lanes.give_back(lane);
                r
            }
        }
    }

    async fn write_as(
        &self,
        client: String,
        op_no: u64,
        op: WriteOp,
    ) -> Result<WriteResult, KvError> {
        if client.is_empty() || client.len() > self.cluster.config.max_key_bytes as usize {
            return Err(KvError::InvalidInput(
                "client id must be 1 to max_key_bytes bytes".into(),
            ));
        }
        self.server()
            .write(ctx(&self.cluster), WriteRequest { client, op_no, op })
            .await
    }

    /// Prefix scan.
    pub async fn scan(&self, prefix: String, limit: u32) -> Result<Vec<KeyValue>, KvError> {
        self.server()
            .scan(ctx(&self.cluster), self.door.to_string(), prefix, limit)
            .await
    }

    /// Cluster status.
    pub async fn status(&self) -> ClusterStatus {
        self.server().status(ctx(&self.cluster)).await
    }

    /// One watch long-poll.
    pub async fn watch(
        &self,
        prefix: String,
        from: Seq,
        max: u32,
        wait: Duration,
    ) -> Result<WatchBatch, KvError> {
        let wait_ms = wait.as_millis().min(u32::MAX as u128) as u32;
        self.server()
            .watch(ctx(&self.cluster), prefix, from, max, wait_ms)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_are_reused_and_never_shared() {
        let lanes = Lanes::new("http");
        let a = lanes.take();
        let b = lanes.take();
        assert_ne!(a.id, b.id, "two requests in flight use two ids");
        let a_id = a.id.clone();
        lanes.give_back(Lane { op_no: 5, ..a });
        let again = lanes.take();
        assert_eq!((again.id.as_str(), again.op_no), (a_id.as_str(), 5));
        assert!(again.id.starts_with("http-"));
    }
}
