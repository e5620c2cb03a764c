//! Prometheus metrics of the frontend, served as text at `GET /metrics` on the HTTP door.
//!
//! - `walkv_requests_total{door, op, outcome}`: every request through any door (`tarpc`,
//!   `http`, `resp`), `outcome` being `ok` or the `KvError::code()` of the failure.
//! - `walkv_request_seconds{door, op}`: latency histogram of the same requests.
//! - Cluster gauges, computed from the status at scrape time (so they can never drift):
//!   `walkv_epoch`, `walkv_commit_index`, `walkv_isr_size`, `walkv_available`,
//!   `walkv_node_applied_seq{node}`, `walkv_node_lag{node}`, `walkv_node_role{node, role}`
//!   (1 for the node's role), `walkv_catchup_done{node}` / `walkv_catchup_total{node}`.
//! - `walkv_watch_sessions`: open WebSocket watchers.
//! - `walkv_batch_records`: records per replicated batch; `walkv_batches_in_flight`: batches
//!   replicating when one starts, itself included (at most `pipeline_depth`).
//!
//! Counters live in one process-wide registry ([`METRICS`]): a process has one frontend,
//! and in-process tests that start several only share counters, never state.

use crate::cluster::Cluster;
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::sync::LazyLock;
use std::time::Instant;
use walkv_shared::types::NodeRole;
use walkv_shared::KvError;

/// Latency buckets (seconds): 100 µs to 10 s, covering a cached read to a request timeout.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// The frontend's request metrics.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    /// Open WebSocket watch sessions.
    pub watch_sessions: IntGauge,
    batch_records: Histogram,
    batches_in_flight: Histogram,
}

/// The process-wide metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Metrics {
        let registry = Registry::new();
        // Metric names and label sets are constants; construction fails only on an invalid
        // name or a duplicate registration, which would be a programming error here.
        let requests = IntCounterVec::new(
            Opts::new("walkv_requests_total", "Requests by door, op and outcome"),
            &["door", "op", "outcome"],
        )
        .expect("valid metric definition");
        let latency = HistogramVec::new(
            HistogramOpts::new("walkv_request_seconds", "Request latency by door and op")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["door", "op"],
        )
        .expect("valid metric definition");
        let watch_sessions = IntGauge::new("walkv_watch_sessions", "Open WebSocket watchers")
            .expect("valid metric definition");
        let batch_records = Histogram::with_opts(
            HistogramOpts::new("walkv_batch_records", "Records per replicated batch")
                .buckets(prometheus::exponential_buckets(1.0, 2.0, 12).expect("valid buckets")),
        )
        .expect("valid metric definition");
        let batches_in_flight = Histogram::with_opts(
            HistogramOpts::new(
                "walkv_batches_in_flight",
                "Batches replicating when one starts, itself included",
            )
            .buckets(vec![1.0, 2.0, 3.0, 4.0, 8.0]),
        )
        .expect("valid metric definition");
        for m in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(latency.clone()),
            Box::new(watch_sessions.clone()),
            Box::new(batch_records.clone()),
            Box::new(batches_in_flight.clone()),
        ] {
            registry.register(m).expect("registered once");
        }
        Metrics {
            registry,
            requests,
            latency,
            watch_sessions,
            batch_records,
            batches_in_flight,
        }
    }

    /// Records a batch started with `records` records, `in_flight` batches replicating
    /// (itself included).
    pub fn batch_started(&self, records: usize, in_flight: usize) {
        self.batch_records.observe(records as f64);
        self.batches_in_flight.observe(in_flight as f64);
    }

    /// Records one finished request.
    pub fn observe<T>(&self, door: &str, op: &str, result: &Result<T, KvError>, start: Instant) {
        let outcome = match result {
            Ok(_) => "ok",
            Err(e) => e.code(),
        };
        self.requests.with_label_values(&[door, op, outcome]).inc();
        self.latency
            .with_label_values(&[door, op])
            .observe(start.elapsed().as_secs_f64());
    }
}

/// The Prometheus text exposition: request metrics plus cluster gauges.
pub fn render(cluster: &Cluster) -> String {
    let status = cluster
        .m()
        .status(cluster.commit(), cluster.config.min_insync, Instant::now());
    let gauges = Registry::new();
    let int = |name: &str, help: &str, v: i64| {
        let g = IntGauge::new(name, help).expect("valid metric definition");
        g.set(v);
        gauges.register(Box::new(g)).expect("registered once");
    };
    int("walkv_epoch", "Frontend epoch", status.epoch.0 as i64);
    int(
        "walkv_commit_index",
        "Highest committed seq",
        status.commit_seq.0 as i64,
    );
    int(
        "walkv_isr_size",
        "Nodes in the in-sync set",
        status
            .nodes
            .iter()
            .filter(|n| n.role == NodeRole::InSync)
            .count() as i64,
    );
    int(
        "walkv_available",
        "1 when reads and writes are served",
        status.available as i64,
    );
    let node_vec = |name: &str, help: &str, labels: &[&str]| {
        let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition");
        gauges
            .register(Box::new(g.clone()))
            .expect("registered once");
        g
    };
    let applied = node_vec(
        "walkv_node_applied_seq",
        "Last seq a node applied",
        &["node"],
    );
    let lag = node_vec(
        "walkv_node_lag",
        "Records a node is behind the commit index",
        &["node"],
    );
    let role = node_vec(
        "walkv_node_role",
        "1 for the node's current role",
        &["node", "role"],
    );
    let progress = GaugeVec::new(
        Opts::new(
            "walkv_catchup_progress",
            "Catch-up progress of a node, 0..1",
        ),
        &["node"],
    )
    .expect("valid metric definition");
    gauges
        .register(Box::new(progress.clone()))
        .expect("registered once");
    let done = node_vec(
        "walkv_catchup_done",
        "Catch-up items transferred",
        &["node"],
    );
    let total = node_vec(
        "walkv_catchup_total",
        "Catch-up items to transfer",
        &["node"],
    );
    for n in &status.nodes {
        let id = n.id.0.as_str();
        applied.with_label_values(&[id]).set(n.applied_seq.0 as i64);
        lag.with_label_values(&[id]).set(n.lag as i64);
        for r in [NodeRole::InSync, NodeRole::CatchingUp, NodeRole::Down] {
            role.with_label_values(&[id, &r.to_string()])
                .set((n.role == r) as i64);
        }
        let (d, t) = n
            .catch_up
            .as_ref()
            .map(|c| (c.done, c.total))
            .unwrap_or((0, 0));
        done.with_label_values(&[id]).set(d as i64);
        total.with_label_values(&[id]).set(t as i64);
        let p = match (&n.catch_up, n.role) {
            (Some(c), _) if c.total > 0 => (c.done as f64 / c.total as f64).min(1.0),
            (_, NodeRole::InSync) => 1.0,
            _ => 0.0,
        };
        progress.with_label_values(&[id]).set(p);
    }
    let mut families = METRICS.registry.gather();
    families.extend(gauges.gather());
    let mut out = Vec::new();
    // Encoding into a Vec cannot fail for families we built ourselves.
    if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
        tracing::warn!(error = %e, "cannot encode metrics");
    }
    String::from_utf8(out).unwrap_or_default()
}
