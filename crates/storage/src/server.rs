//! `StorageServer`: the thin RPC adapter between tarpc and the node's state.
//!
//! Every call first checks the cluster token (`Unauthorized` otherwise). Writes
//! (`append`, `truncate`, `install_snapshot`) go to the WAL writer, which does epoch
//! fencing, skip/gap checks, the fsync and the apply; reads go straight to the store
//! under a short read lock, after waiting (bounded by `read_wait_ms`) until the node has
//! applied `min_seq`. Nothing here does file IO except `snapshot_page`, which streams a
//! snapshot file on a blocking thread and keeps it open for the rest of the transfer
//! ([`crate::page_cursors`]), so a newer snapshot removing it does not cut the copy off.

use crate::page_cursors::PageCursors;
use crate::snapshot;
use crate::store::SnapshotData;
use crate::wal::writer::{NodeState, WalWriter};
use std::sync::Arc;
use std::time::Duration;
use tarpc::context::Context;
use tracing::{debug, instrument, warn};
use walkv_shared::rpc::{
    AppendRequest, Digest, FetchReply, NodeIdentity, ReadReply, ScanReply, SnapshotChunk,
    SnapshotPage, Storage, SNAPSHOT_PAGE_MAX_BYTES,
};
use walkv_shared::types::LogPosition;
use walkv_shared::types::Outcome;
use walkv_shared::{Epoch, KvError, NodeId, Seq};

/// Most records, keys or items one `fetch`, `scan` or `snapshot_page` returns, whatever
/// the caller asks. Each is bounded in bytes too (`FETCH_MAX_BYTES`, `SCAN_MAX_BYTES`,
/// `SNAPSHOT_PAGE_MAX_BYTES`), so a reply fits the frame limit whatever the values.
pub const MAX_PAGE_ITEMS: usize = 10_000;

/// Longest an append that arrived before the append it follows waits for it (the frontend
/// pipelines batches; see [`WalWriter::append_in_order`]). The one before it is normally
/// microseconds behind; when it never comes, the append is answered `Gap`.
pub const OVERTAKEN_APPEND_WAIT: Duration = Duration::from_secs(1);

/// The node's `Storage` service. Cheap to clone (one `Arc`).
#[derive(Clone, Debug)]
pub struct StorageServer {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    id: NodeId,
    instance: u64,
    token: String,
    state: Arc<NodeState>,
    writer: WalWriter,
    read_wait: Duration,
    max_key_bytes: usize,
    max_value_bytes: usize,
    /// A snapshot being received chunk by chunk (`install_snapshot`).
    install: tokio::sync::Mutex<Option<SnapshotData>>,
    /// The snapshot transfers in progress (`snapshot_page`): the file each keeps open, so
    /// a newer snapshot does not cut it off, and the offset its next page starts at.
    page_cursors: std::sync::Mutex<PageCursors>,
}

/// Limits the server enforces on incoming records.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Longest a read waits for `min_seq`.
    pub read_wait: Duration,
    /// Largest key in bytes.
    pub max_key_bytes: usize,
    /// Largest value in bytes.
    pub max_value_bytes: usize,
}

impl StorageServer {
    /// A server for node `id` (process `instance`) over `state`, writing through `writer`.
    pub fn new(
        id: NodeId,
        instance: u64,
        token: String,
        state: Arc<NodeState>,
        writer: WalWriter,
        limits: Limits,
    ) -> StorageServer {
        let inner = Inner {
            page_cursors: std::sync::Mutex::new(PageCursors::default()),
            id,
            instance,
            token,
            state,
            writer,
            read_wait: limits.read_wait,
            max_key_bytes: limits.max_key_bytes,
            max_value_bytes: limits.max_value_bytes,
            install: tokio::sync::Mutex::new(None),
        };
        StorageServer {
            inner: Arc::new(inner),
        }
    }

    fn auth(&self, token: &str) -> Result<(), KvError> {
        if token == self.inner.token {
            Ok(())
        } else {
            warn!("request with a wrong cluster token refused");
            Err(KvError::Unauthorized("wrong cluster token".into()))
        }
    }

    /// Waits until the node has applied `min_seq`, at most `read_wait`.
    async fn wait_applied(&self, min_seq: Seq) -> Result<(), KvError> {
        let mut rx = self.inner.state.applied.subscribe();
        let waited = tokio::time::timeout(self.inner.read_wait, rx.wait_for(|s| *s >= min_seq))
            .await
            .map(|r| r.is_ok());
        match waited {
            Ok(true) => Ok(()),
            _ => Err(KvError::Unavailable(format!(
                "node has applied seq {} but the read needs {min_seq}",
                *rx.borrow()
            ))),
        }
    }

    fn check_sizes(&self, key: &str, value: Option<&str>) -> Result<(), KvError> {
        if key.len() > self.inner.max_key_bytes {
            return Err(KvError::TooLarge {
                what: "key".into(),
                limit: self.inner.max_key_bytes as u64,
            });
        }
        if value.is_some_and(|v| v.len() > self.inner.max_value_bytes) {
            return Err(KvError::TooLarge {
                what: "value".into(),
                limit: self.inner.max_value_bytes as u64,
            });
        }
        Ok(())
    }

    fn cursors(&self) -> std::sync::MutexGuard<'_, PageCursors> {
        // Only open files and offsets (a lost cursor costs a re-read): ignore poisoning.
        self.inner
            .page_cursors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn value_of(op: &walkv_shared::Op) -> Option<&str> {
        match op {
            walkv_shared::Op::Put { value, .. } | walkv_shared::Op::Cas { value, .. } => {
                Some(value)
            }
            walkv_shared::Op::Delete { .. } => None,
        }
    }
}

impl Storage for StorageServer {
    async fn identity(self, _: Context, token: String) -> Result<NodeIdentity, KvError> {
        self.auth(&token)?;
        let pos = self.inner.state.store().pos();
        Ok(NodeIdentity {
            id: self.inner.id.clone(),
            instance: self.inner.instance,
            pos,
        })
    }

    #[instrument(skip_all, fields(n = req.records.len(), epoch = req.epoch.0))]
    async fn append(
        self,
        _: Context,
        token: String,
        req: AppendRequest,
    ) -> Result<Vec<Outcome>, KvError> {
        self.auth(&token)?;
        for r in req.records.iter() {
            self.check_sizes(r.op.key(), Self::value_of(&r.op))?;
        }
        debug!("append");
        self.inner
            .writer
            .append_in_order(
                req.epoch,
                req.commit_seq,
                req.records.into_vec(),
                OVERTAKEN_APPEND_WAIT,
            )
            .await
    }

    async fn read(
        self,
        _: Context,
        token: String,
        key: String,
        min_seq: Seq,
    ) -> Result<ReadReply, KvError> {
        self.auth(&token)?;
        self.wait_applied(min_seq).await?;
        let (value, last_touch) = self.inner.state.store().get(&key);
        Ok(ReadReply { value, last_touch })
    }

    async fn read_many(
        self,
        _: Context,
        token: String,
        keys: Vec<String>,
        min_seq: Seq,
    ) -> Result<Vec<ReadReply>, KvError> {
        self.auth(&token)?;
        self.wait_applied(min_seq).await?;
        Ok(self.inner.state.store().read_many(&keys))
    }

    async fn scan(
        self,
        _: Context,
        token: String,
        prefix: String,
        limit: u32,
        min_seq: Seq,
    ) -> Result<ScanReply, KvError> {
        self.auth(&token)?;
        self.wait_applied(min_seq).await?;
        let store = self.inner.state.store();
        let items = store.scan_bounded(&prefix, (limit as usize).min(MAX_PAGE_ITEMS))?;
        Ok(ScanReply {
            items,
            applied: store.pos().seq,
        })
    }

    #[instrument(skip_all, fields(epoch = epoch.0, after = after.0))]
    async fn truncate(
        self,
        _: Context,
        token: String,
        epoch: Epoch,
        after: Seq,
    ) -> Result<LogPosition, KvError> {
        self.auth(&token)?;
        self.inner.writer.truncate(epoch, after).await
    }

    async fn fetch(
        self,
        _: Context,
        token: String,
        from: Seq,
        max: u32,
    ) -> Result<FetchReply, KvError> {
        self.auth(&token)?;
        Ok(self
            .inner
            .state
            .store()
            .fetch(from, (max as usize).min(MAX_PAGE_ITEMS)))
    }

    async fn snapshot_page(
        self,
        _: Context,
        token: String,
        snapshot_seq: Seq,
        after_key: Option<String>,
        max: u32,
        after_client: Option<String>,
    ) -> Result<SnapshotPage, KvError> {
        self.auth(&token)?;
        let dir = self.inner.state.dir.clone();
        let max = (max as usize).clamp(1, MAX_PAGE_ITEMS);
        let now = std::time::Instant::now();
        let open = self.cursors().take(snapshot_seq, after_key.as_deref(), now);
        let page = tokio::task::spawn_blocking(move || {
            let path = dir.join(snapshot::snapshot_name(snapshot_seq));
            let (file, resume) = match open {
                Some(open) => open,
                None => (Arc::new(std::fs::File::open(&path)?), None),
            };
            // Before the first key, the exactly-once table: in pages of its own while it
            // does not fit, then its last entries with the first keys.
            let (mut clients, mut key_bytes, mut resume) =
                (Vec::new(), SNAPSHOT_PAGE_MAX_BYTES, resume);
            if after_key.is_none() {
                let (header, first_key) = snapshot::read_header_from(&file, &path)?;
                let (page, bytes, complete) = snapshot::clients_page(
                    header.clients,
                    after_client.as_deref(),
                    SNAPSHOT_PAGE_MAX_BYTES,
                );
                if !complete {
                    let page = SnapshotPage {
                        seq: header.seq,
                        epoch: header.epoch,
                        items: Vec::new(),
                        clients: page,
                        done: false,
                    };
                    return Ok((file, page, None));
                }
                clients = page;
                key_bytes = SNAPSHOT_PAGE_MAX_BYTES.saturating_sub(bytes);
                // The keys start right after the header just read: no second parse.
                resume = Some(first_key);
            }
            snapshot::read_page_from(&file, &path, after_key.as_deref(), max, key_bytes, resume)
                .map(|(items, done, next)| {
                    let page = SnapshotPage {
                        seq: next.pos.seq,
                        epoch: next.pos.epoch,
                        items,
                        clients,
                        done,
                    };
                    (file, page, Some(next))
                })
        })
        .await
        .map_err(|e| KvError::Internal(format!("snapshot page task failed: {e}")))?;
        match page {
            Ok((file, page, next)) => {
                if let (false, Some(last), Some(next)) = (page.done, page.items.last(), next) {
                    self.cursors()
                        .remember(snapshot_seq, file, last.key.clone(), next, now);
                }
                Ok(page)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let newest = snapshot::list(&self.inner.state.dir)
                    .ok()
                    .and_then(|all| all.last().map(|(seq, _)| *seq));
                Err(KvError::InvalidInput(match newest {
                    Some(newest) => format!(
                        "snapshot at seq {snapshot_seq} is gone; the newest is at seq {newest}"
                    ),
                    None => format!("snapshot at seq {snapshot_seq} is gone; there is none"),
                }))
            }
            Err(e) => Err(KvError::Io(format!(
                "cannot read snapshot at seq {snapshot_seq}: {e}"
            ))),
        }
    }

    async fn install_snapshot(
        self,
        _: Context,
        token: String,
        epoch: Epoch,
        chunk: SnapshotChunk,
    ) -> Result<LogPosition, KvError> {
        self.auth(&token)?;
        let seen = self
            .inner
            .state
            .highest_epoch
            .load(std::sync::atomic::Ordering::SeqCst);
        if epoch.0 < seen {
            return Err(KvError::Fenced { seen });
        }
        let mut pending = self.inner.install.lock().await;
        if chunk.first {
            *pending = Some(SnapshotData {
                pos: LogPosition {
                    epoch: chunk.epoch,
                    seq: chunk.seq,
                },
                ..SnapshotData::default()
            });
        }
        let Some(data) = pending.as_mut() else {
            return Err(KvError::InvalidInput(
                "install_snapshot chunk without a first chunk".into(),
            ));
        };
        if data.pos.seq != chunk.seq {
            return Err(KvError::InvalidInput(format!(
                "chunk for snapshot {} while installing {}",
                chunk.seq, data.pos.seq
            )));
        }
        if data
            .items
            .get_max()
            .zip(chunk.items.first())
            .is_some_and(|((a, _), b)| **a >= *b.key)
        {
            return Err(KvError::InvalidInput(
                "snapshot chunks must arrive in key order".into(),
            ));
        }
        for kv in chunk.items {
            data.insert_item(&kv.key, &kv.value, kv.version);
        }
        chunk
            .clients
            .into_iter()
            .for_each(|c| data.insert_client(c));
        if !chunk.last {
            return Ok(self.inner.state.store().pos());
        }
        let data = pending.take().unwrap_or_default();
        drop(pending);
        self.inner.writer.install(epoch, data).await
    }

    async fn digest(self, _: Context, token: String) -> Result<Digest, KvError> {
        self.auth(&token)?;
        Ok(self.inner.state.store().digest())
    }
}
