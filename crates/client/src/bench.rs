//! `client bench`: a closed-loop load generator for a running cluster.
//!
//! `clients` tasks, each a [`Client`] with its own id (`bench-<pid>-<i>`), share
//! `connections` tarpc connections (round robin) and issue one operation at a time: a
//! `get` with probability `read_ratio`, else a `put` of a `value_size`-byte value, on a key
//! drawn uniformly from `keys` keys. The run stops after `duration` or after `ops`
//! operations in total. Before it, `preload` keys are written (not measured).
//!
//! # What is counted
//!
//! - Every operation's latency goes into an HDR histogram (microseconds, 3 significant
//!   digits), successful or not, so slow failures are not hidden from the tail.
//! - A `get` of a key that does not exist is a correct answer (`not_found`), not an error.
//! - Every other failure is counted by its kind (`KvError::code`): `timeout` is an unknown
//!   outcome, `unavailable` a refused one. The library retries retryable failures with the
//!   same op number until `retry_deadline_ms`; what is left after that is an error here.
//!
//! The pure parts (options, percentiles, the report's text and JSON) are unit tested; the
//! load itself is exercised by `tests/tests/cluster_bench.rs`.

use crate::{Client, ClientConfig, Connection};
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use walkv_shared::conn::MAX_IN_FLIGHT_PER_CONN;
use walkv_shared::KvError;

/// Most concurrent clients one bench runs (each is a task with a request in flight).
pub const MAX_CLIENTS: u32 = 4096;
/// Most connections one bench opens.
pub const MAX_CONNECTIONS: u32 = 256;
/// Largest value a bench writes (the frontend's default `max_value_bytes`).
pub const MAX_VALUE_SIZE: u32 = 1 << 20;
/// Highest latency the histogram records (60 s, in µs); slower ops are clamped to it.
const HIST_MAX_US: u64 = 60_000_000;
/// How often the progress line is refreshed.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// What to run.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchOpts {
    /// Concurrent clients, each with its own id and one request in flight.
    pub clients: u32,
    /// tarpc connections the clients share.
    pub connections: u32,
    /// Stop after this long ...
    pub duration: Option<Duration>,
    /// ... or after this many operations in total.
    pub ops: Option<u64>,
    /// Bytes per written value.
    pub value_size: u32,
    /// Size of the key space.
    pub keys: u64,
    /// Fraction of operations that are reads, 0.0..=1.0.
    pub read_ratio: f64,
    /// Keys written before the measured run (capped at `keys`).
    pub preload: u64,
    /// Print the live progress line on stderr.
    pub progress: bool,
}

impl BenchOpts {
    /// Checks the options; the error names the flag.
    pub fn validate(&self) -> Result<(), String> {
        if self.clients == 0 || self.clients > MAX_CLIENTS {
            return Err(format!(
                "--clients: expected 1..={MAX_CLIENTS}, got {}",
                self.clients
            ));
        }
        if self.connections == 0 || self.connections > MAX_CONNECTIONS {
            return Err(format!(
                "--connections: expected 1..={MAX_CONNECTIONS}, got {}",
                self.connections
            ));
        }
        match (self.duration, self.ops) {
            (Some(_), Some(_)) => return Err("give --duration or --ops, not both".into()),
            (Some(d), None) if d.is_zero() => return Err("--duration must be above 0".into()),
            (None, Some(0)) => return Err("--ops must be above 0".into()),
            _ => {}
        }
        if self.value_size > MAX_VALUE_SIZE {
            return Err(format!(
                "--value-size: expected 0..={MAX_VALUE_SIZE}, got {}",
                self.value_size
            ));
        }
        if self.keys == 0 {
            return Err("--keys must be above 0".into());
        }
        if !(0.0..=1.0).contains(&self.read_ratio) {
            return Err(format!(
                "--read-ratio: expected 0.0..=1.0, got {}",
                self.read_ratio
            ));
        }
        Ok(())
    }

    /// The duration to run when neither `--duration` nor `--ops` is given.
    pub fn stop_after(&self) -> Option<Duration> {
        match (self.duration, self.ops) {
            (None, None) => Some(Duration::from_secs(10)),
            (d, _) => d,
        }
    }
}

/// Default connection count: one per bench thread, and enough that no connection carries
/// more clients than the frontend serves at once on one ([`MAX_IN_FLIGHT_PER_CONN`]);
/// never more than clients.
///
/// A tarpc connection multiplexes requests, and every connection costs a `read` and a
/// `writev` on both ends for each batch of answers a group commit or a read batch releases
/// together, so splitting the same load over more connections only adds system calls. On
/// the 2-vCPU development VM, 64 clients over 1 connection instead of 16 (one bench
/// thread) did PUT 24.2-24.7k instead of 20.2-21.3k ops/s and GET 76-79k instead of
/// 50-54k. One per thread keeps every thread of the bench doing its own IO.
pub fn default_connections(clients: u32, threads: u32) -> u32 {
    let per_conn = MAX_IN_FLIGHT_PER_CONN as u32;
    threads
        .max(clients.div_ceil(per_conn))
        .clamp(1, MAX_CONNECTIONS)
        .min(clients.max(1))
}

/// The name of key number `i`: fixed width, so every key has the same size.
pub fn key_name(i: u64) -> String {
    format!("bench-{i:010}")
}

/// A new empty latency histogram (µs).
pub fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 60 s with 3 significant digits: valid bounds, cannot fail.
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("valid histogram bounds")
}

/// The result of a run.
#[derive(Clone, Debug)]
pub struct Report {
    /// Operations finished (ok, not found or failed).
    pub ops: u64,
    /// Of which reads.
    pub reads: u64,
    /// Reads of an absent key (correct answers, not errors).
    pub not_found: u64,
    /// Wall time of the measured run.
    pub elapsed: Duration,
    /// Latency of every operation, µs.
    pub latency: Histogram<u64>,
    /// Failures by kind (`KvError::code`).
    pub errors: BTreeMap<String, u64>,
}

impl Report {
    /// Total failures.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Operations per second over the run.
    pub fn ops_per_sec(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.ops as f64 / secs
        } else {
            0.0
        }
    }

    fn pct(&self, q: f64) -> u64 {
        if self.latency.is_empty() {
            0
        } else {
            self.latency.value_at_quantile(q)
        }
    }

    /// One JSON object with the options and the results.
    pub fn to_json(&self, opts: &BenchOpts) -> serde_json::Value {
        json!({
            "clients": opts.clients,
            "connections": opts.connections,
            "value_size": opts.value_size,
            "keys": opts.keys,
            "read_ratio": opts.read_ratio,
            "ops": self.ops,
            "reads": self.reads,
            "writes": self.ops - self.reads,
            "not_found": self.not_found,
            "seconds": self.elapsed.as_secs_f64(),
            "ops_per_sec": self.ops_per_sec().round() as u64,
            "p50_us": self.pct(0.5),
            "p90_us": self.pct(0.9),
            "p99_us": self.pct(0.99),
            "p999_us": self.pct(0.999),
            "max_us": self.latency.max(),
            "errors": self.error_count(),
            "errors_by_kind": self.errors,
        })
    }

    /// The human-readable summary.
    pub fn to_text(&self, opts: &BenchOpts) -> String {
        let errors = if self.errors.is_empty() {
            "0".to_string()
        } else {
            let kinds: Vec<String> = self
                .errors
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            format!("{} ({})", self.error_count(), kinds.join(", "))
        };
        format!(
            "{} clients over {} connections, {} B values, {} keys, {:.0}% reads\n\
             ops:     {} in {:.2} s ({} reads, {} not found)\n\
             rate:    {:.0} ops/s\n\
             latency: p50 {} µs, p90 {} µs, p99 {} µs, p99.9 {} µs, max {} µs\n\
             errors:  {}",
            opts.clients,
            opts.connections,
            opts.value_size,
            opts.keys,
            opts.read_ratio * 100.0,
            self.ops,
            self.elapsed.as_secs_f64(),
            self.reads,
            self.not_found,
            self.ops_per_sec(),
            self.pct(0.5),
            self.pct(0.9),
            self.pct(0.99),
            self.pct(0.999),
            self.latency.max(),
            errors
        )
    }
}

/// The progress line for `done` ops after `secs` seconds.
pub fn progress_line(secs: u64, done: u64, rate: u64, errors: u64) -> String {
    format!("[{secs:>4} s] {done:>10} ops  {rate:>8} ops/s  {errors} errors")
}

/// Counters the clients update and the progress task reads.
#[derive(Default)]
struct Shared {
    done: AtomicU64,
    errors: AtomicU64,
    /// Operations still to start (for `--ops`).
    budget: AtomicU64,
    stop: AtomicBool,
}

/// What one client task measured.
struct TaskResult {
    hist: Histogram<u64>,
    reads: u64,
    not_found: u64,
    errors: BTreeMap<String, u64>,
}

/// Runs the benchmark against the frontend in `config`.
pub async fn run(config: ClientConfig, opts: BenchOpts) -> Result<Report, String> {
    opts.validate()?;
    let conns: Vec<Connection> = (0..opts.connections)
        .map(|_| Connection::new(config.clone()))
        .collect();
    let pid = std::process::id();
    let clients = (0..opts.clients)
        .map(|i| {
            let conn = conns[i as usize % conns.len()].clone();
            Client::with_connection(format!("bench-{pid}-{i}"), conn).map_err(|e| e.to_string())
        })
        .collect::<Result<Vec<_>, _>>()?;
    let clients = preload(clients, &opts).await?;

    let shared = Arc::new(Shared::default());
    shared
        .budget
        .store(opts.ops.unwrap_or(u64::MAX), Ordering::Relaxed);
    let value: Arc<str> = "v".repeat(opts.value_size as usize).into();
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, client) in clients.into_iter().enumerate() {
        let (shared, opts, value) = (shared.clone(), opts.clone(), value.clone());
        tasks.spawn(client_loop(client, i as u64, shared, opts, value));
    }
    let progress = opts
        .progress
        .then(|| tokio::spawn(progress_loop(shared.clone(), start)));
    if let Some(d) = opts.stop_after() {
        let shared = shared.clone();
        // Ends on its own; nothing joins it because the run ends when the clients stop.
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            shared.stop.store(true, Ordering::Relaxed);
        });
    }
    let mut report = Report {
        ops: 0,
        reads: 0,
        not_found: 0,
        elapsed: Duration::ZERO,
        latency: new_histogram(),
        errors: BTreeMap::new(),
    };
    while let Some(joined) = tasks.join_next().await {
        let r = joined.map_err(|e| format!("bench task failed: {e}"))?;
        report.latency.add(&r.hist).map_err(|e| e.to_string())?;
        report.reads += r.reads;
        report.not_found += r.not_found;
        for (k, n) in r.errors {
            *report.errors.entry(k).or_default() += n;
        }
    }
    report.elapsed = start.elapsed();
    report.ops = report.latency.len();
    shared.stop.store(true, Ordering::Relaxed);
    if let Some(p) = progress {
        p.abort();
        if std::io::stderr().is_terminal() {
            eprintln!();
        }
    }
    Ok(report)
}

/// Writes the first `preload` keys, every client taking a share; any failure aborts.
async fn preload(clients: Vec<Client>, opts: &BenchOpts) -> Result<Vec<Client>, String> {
    let total = opts.preload.min(opts.keys);
    if total == 0 {
        return Ok(clients);
    }
    let next = Arc::new(AtomicU64::new(0));
    let value: Arc<str> = "p".repeat(opts.value_size as usize).into();
    let started = Instant::now();
    let mut tasks: tokio::task::JoinSet<Result<Client, String>> = tokio::task::JoinSet::new();
    for mut client in clients {
        let (next, value) = (next.clone(), value.clone());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok(client);
                }
                client
                    .put(&key_name(i), &value)
                    .await
                    .map_err(|e| format!("preload of {} failed: {e}", key_name(i)))?;
            }
        });
    }
    let mut out = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        out.push(joined.map_err(|e| format!("preload task failed: {e}"))??);
    }
    if opts.progress {
        eprintln!(
            "preloaded {total} keys in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(out)
}

async fn client_loop(
    mut client: Client,
    i: u64,
    shared: Arc<Shared>,
    opts: BenchOpts,
    value: Arc<str>,
) -> TaskResult {
    let mut rng = rand::rngs::StdRng::seed_from_u64(i ^ 0x5eed);
    let mut r = TaskResult {
        hist: new_histogram(),
        reads: 0,
        not_found: 0,
        errors: BTreeMap::new(),
    };
    loop {
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        // Take one op from the budget; stop when it is spent.
        if shared
            .budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1))
            .is_err()
        {
            break;
        }
        let key = key_name(rng.gen_range(0..opts.keys));
        let read = rng.gen_bool(opts.read_ratio);
        let t = Instant::now();
        let result: Result<(), KvError> = if read {
            r.reads += 1;
            client.get(&key).await.map(|_| ())
        } else {
            client.put(&key, &value).await.map(|_| ())
        };
        let us = (t.elapsed().as_micros() as u64).clamp(1, HIST_MAX_US);
        r.hist.saturating_record(us);
        match result {
            Ok(()) => {}
            Err(KvError::NotFound) if read => r.not_found += 1,
            Err(e) => {
                *r.errors.entry(e.code().to_string()).or_default() += 1;
                shared.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        shared.done.fetch_add(1, Ordering::Relaxed);
    }
    r
}

async fn progress_loop(shared: Arc<Shared>, start: Instant) {
    let terminal = std::io::stderr().is_terminal();
    let mut last = 0;
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
    loop {
        tick.tick().await;
        let done = shared.done.load(Ordering::Relaxed);
        let line = progress_line(
            start.elapsed().as_secs(),
            done,
            done - last,
            shared.errors.load(Ordering::Relaxed),
        );
        last = done;
        let mut err = std::io::stderr().lock();
        let _ = if terminal {
            write!(err, "\r{line}")
        } else {
            writeln!(err, "{line}")
        };
        let _ = err.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report_for_test(latencies_us: &[u64], errors: &[(&str, u64)], secs: f64) -> Report {
        let mut latency = new_histogram();
        for &l in latencies_us {
            latency.saturating_record(l);
        }
        Report {
            ops: latencies_us.len() as u64,
            reads: 0,
            not_found: 0,
            elapsed: Duration::from_secs_f64(secs),
            latency,
            errors: errors.iter().map(|(k, n)| (k.to_string(), *n)).collect(),
        }
    }

    fn opts() -> BenchOpts {
        BenchOpts {
            clients: 4,
            connections: 2,
            duration: None,
            ops: Some(100),
            value_size: 100,
            keys: 10,
            read_ratio: 0.5,
            preload: 0,
            progress: false,
        }
    }

    #[test]
    fn options_are_validated_naming_the_flag() {
        assert_eq!(opts().validate(), Ok(()));
        let bad = |f: fn(&mut BenchOpts)| {
            let mut o = opts();
            f(&mut o);
            o.validate().unwrap_err()
        };
        assert!(bad(|o| o.clients = 0).contains("--clients"));
        assert!(bad(|o| o.connections = 0).contains("--connections"));
        assert!(bad(|o| o.connections = MAX_CONNECTIONS + 1).contains("--connections"));
        assert!(bad(|o| o.duration = Some(Duration::from_secs(1))).contains("not both"));
        assert!(bad(|o| o.ops = Some(0)).contains("--ops"));
        assert!(bad(|o| o.keys = 0).contains("--keys"));
        assert!(bad(|o| o.read_ratio = 1.5).contains("--read-ratio"));
        assert!(bad(|o| o.read_ratio = f64::NAN).contains("--read-ratio"));
        assert!(bad(|o| o.value_size = MAX_VALUE_SIZE + 1).contains("--value-size"));
    }

    #[test]
    fn defaults() {
        assert_eq!(
            default_connections(1, 2),
            1,
            "never more connections than clients"
        );
        assert_eq!(default_connections(64, 1), 1);
        assert_eq!(default_connections(64, 2), 2, "one per bench thread");
        assert_eq!(default_connections(MAX_CLIENTS, 1024), MAX_CONNECTIONS);
        let per_conn = MAX_IN_FLIGHT_PER_CONN as u32;
        assert_eq!(
            default_connections(per_conn + 1, 1),
            2,
            "no connection carries more clients than the frontend serves at once"
        );
        assert_eq!(default_connections(MAX_CLIENTS, 1), MAX_CLIENTS / per_conn);
        let mut o = opts();
        o.ops = None;
        assert_eq!(o.stop_after(), Some(Duration::from_secs(10)));
        assert_eq!(key_name(7), "bench-0000000007");
        assert_eq!(key_name(7).len(), key_name(9_999_999_999).len());
    }

    #[test]
    fn report_json_has_percentiles_and_errors() {
        let lat: Vec<u64> = (1..=1000).collect();
        let r = report_for_test(&lat, &[("timeout", 2), ("unavailable", 1)], 2.0);
        let j = r.to_json(&opts());
        assert_eq!(j["ops"], 1000);
        assert_eq!(j["ops_per_sec"], 500);
        assert_eq!(j["p50_us"], 500);
        assert_eq!(j["p99_us"], 990);
        assert_eq!(j["p999_us"], 999);
        assert_eq!(j["max_us"], 1000);
        assert_eq!(j["errors"], 3);
        assert_eq!(j["errors_by_kind"]["timeout"], 2);
    }

    #[test]
    fn report_text_names_rate_percentiles_and_error_kinds() {
        let r = report_for_test(&[100, 200, 300], &[("timeout", 1)], 1.0);
        let t = r.to_text(&opts());
        assert!(t.contains("rate:    3 ops/s"), "{t}");
        assert!(t.contains("p50 200 µs"), "{t}");
        assert!(t.contains("max 300 µs"), "{t}");
        assert!(t.contains("errors:  1 (timeout 1)"), "{t}");
        let clean = report_for_test(&[], &[], 0.0);
        assert!(clean.to_text(&opts()).contains("errors:  0"));
        assert_eq!(clean.to_json(&opts())["p99_us"], 0);
    }

    #[test]
    fn progress_line_shows_ops_rate_and_errors() {
        assert_eq!(
            progress_line(3, 1234, 400, 1),
            "[   3 s]       1234 ops       400 ops/s  1 errors"
        );
    }
}
