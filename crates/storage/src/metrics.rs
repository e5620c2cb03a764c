//! Prometheus metrics of a storage node, served as text at `GET /metrics` on
//! `metrics_listen` (`--metrics-listen`; empty, the default, means off).
//!
//! - `walkv_storage_fsync_seconds`: histogram of one WAL group commit (write + fsync).
//! - `walkv_storage_batch_records`: histogram of records per group commit.
//! - `walkv_storage_wal_bytes_total`: bytes appended to the WAL.
//! - `walkv_storage_snapshots_total`: snapshots written.
//!
//! The WAL writer thread records into one process-wide registry ([`METRICS`]): recording
//! is a few atomic adds, so it never slows the write path, and a process runs one node
//! (in-process tests with several nodes only share counters).

use axum::http::header;
use axum::routing::get;
use axum::Router;
use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, Registry, TextEncoder};
use std::future::Future;
use std::sync::LazyLock;
use std::time::Duration;
use tokio::net::TcpListener;
use tracing::{info, warn};

/// Group-commit latency buckets (seconds): from a page-cache write to a stalled disk.
const FSYNC_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];
/// Records-per-batch buckets, up to the default `wal_batch_max` (1024) and beyond.
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

/// The storage node's metrics.
pub struct Metrics {
    registry: Registry,
    /// Seconds per group commit (write + fsync).
    pub fsync_seconds: Histogram,
    /// Records per group commit.
    pub batch_records: Histogram,
    /// Bytes appended to the WAL.
    pub wal_bytes: IntCounter,
    /// Snapshots written.
    pub snapshots: IntCounter,
}

/// The process-wide metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Metrics {
        // Names, help texts and buckets are constants: construction and registration can
        // only fail on a programming error.
        let fsync_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "walkv_storage_fsync_seconds",
                "Seconds per WAL group commit (write + fsync)",
            )
            .buckets(FSYNC_BUCKETS.to_vec()),
        )
        .expect("valid metric definition");
        let batch_records = Histogram::with_opts(
            HistogramOpts::new(
                "walkv_storage_batch_records",
                "Records per WAL group commit",
            )
            .buckets(BATCH_BUCKETS.to_vec()),
        )
        .expect("valid metric definition");
        let wal_bytes =
            IntCounter::new("walkv_storage_wal_bytes_total", "Bytes appended to the WAL")
                .expect("valid metric definition");
        let snapshots = IntCounter::new("walkv_storage_snapshots_total", "Snapshots written")
            .expect("valid metric definition");
        let registry = Registry::new();
        for m in [
            Box::new(fsync_seconds.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(batch_records.clone()),
            Box::new(wal_bytes.clone()),
            Box::new(snapshots.clone()),
        ] {
            registry.register(m).expect("registered once");
        }
        Metrics {
            registry,
            fsync_seconds,
            batch_records,
            wal_bytes,
            snapshots,
        }
    }

    /// Records one group commit of `records` records and `bytes` bytes.
    pub fn group_commit(&self, records: usize, bytes: usize, took: Duration) {
        self.fsync_seconds.observe(took.as_secs_f64());
        self.batch_records.observe(records as f64);
        self.wal_bytes.inc_by(bytes as u64);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            warn!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` resolves.
pub async fn serve(listener: TcpListener, shutdown: impl Future<Output = ()> + Send + 'static) {
    let app = Router::new().route(
        "/metrics",
        get(|| async {
            (
                [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                METRICS.render(),
            )
        }),
    );
    if let Ok(addr) = listener.local_addr() {
        info!(addr = %addr, "metrics listening");
    }
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        warn!(error = %e, "metrics endpoint stopped");
    }
}
