//! Offline tools behind `storage wal verify|dump|bench`.
//!
//! - `verify` reads a data directory without changing it and checks the snapshot
//!   checksum, every record checksum and seq continuity; a torn last line is reported but
//!   is not an error (the next start truncates it).
//! - `dump` prints the snapshot header and every record as JSON lines for `jq`.
//! - `bench` drives the WAL writer in-process with N concurrent writers (fsync on) and
//!   reports appends/s and latency percentiles: a benchmark, never a test.

use crate::store::Store;
use crate::wal::writer::{read_epoch, NodeState, WalWriter, WriterConfig};
use crate::wal::{inspect, recover, replay, Inspection, Problem};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use walkv_shared::{Epoch, Op, Record, Seq};

fn check(dir: &Path) -> Result<(Inspection, Store, Option<Problem>), String> {
    if !dir.is_dir() {
        return Err(format!("{}: not a directory", dir.display()));
    }
    let ins = inspect(dir).map_err(|e| e.to_string())?;
    let (store, problem) = replay(&ins).map_err(|e| e.to_string())?;
    Ok((ins, store, problem))
}

/// `storage wal verify`: returns a summary, or an error naming file, offset and seq.
pub fn verify(dir: &Path) -> Result<String, String> {
    let (ins, store, problem) = check(dir)?;
    if !ins.bad_snapshots.is_empty() {
        return Err(format!(
            "unreadable snapshot: {}",
            ins.bad_snapshots.join("; ")
        ));
    }
    let mut out = String::new();
    match &ins.snapshot {
        Some((p, d)) => out.push_str(&format!(
            "snapshot {}: seq {}, {} keys, checksum ok\n",
            p.display(),
            d.pos.seq,
            d.items.len()
        )),
        None => out.push_str("no snapshot\n"),
    }
    for seg in &ins.segments {
        let recs = &seg.decoded.records;
        let range = match (recs.first(), recs.last()) {
            (Some(a), Some(b)) => format!("seqs {}..={}", a.seq, b.seq),
            _ => "empty".into(),
        };
        out.push_str(&format!(
            "segment {}: {} records ({range}), {} bytes\n",
            seg.path.display(),
            recs.len(),
            seg.file_len
        ));
    }
    match problem {
        Some(p) if p.torn => out.push_str(&format!(
            "warning: torn last line (crash mid-write) {p}; the next start truncates it\n"
        )),
        Some(p) => return Err(format!("corrupt WAL record: {p}")),
        None => {}
    }
    out.push_str(&format!(
        "ok: log ends at seq {} (epoch {}), {} keys",
        store.pos().seq,
        store.pos().epoch,
        store.len()
    ));
    Ok(out)
}

/// `storage wal dump`: writes JSON lines to `out`; an error if the log is corrupt (after
/// printing the valid prefix).
pub fn dump(dir: &Path, out: &mut impl std::io::Write) -> Result<(), String> {
    let (ins, _, problem) = check(dir)?;
    let w = |out: &mut dyn std::io::Write, v: &serde_json::Value| {
        writeln!(out, "{v}").map_err(|e| format!("stdout: {e}"))
    };
    if let Some((p, d)) = &ins.snapshot {
        let v = serde_json::json!({"type": "snapshot", "file": p.display().to_string(), "seq": d.pos.seq, "epoch": d.pos.epoch, "keys": d.items.len(), "clients": d.clients.len()});
        w(out, &v)?;
    }
    for seg in &ins.segments {
        for r in &seg.decoded.records {
            w(out, &serde_json::to_value(r).map_err(|e| e.to_string())?)?;
        }
    }
    match problem {
        Some(p) if !p.torn => Err(format!("corrupt WAL record: {p}")),
        _ => Ok(()),
    }
}

/// Results of `storage wal bench`.
#[derive(Debug, Clone)]
pub struct BenchReport {
    /// Appends acknowledged.
    pub appends: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Group commits (fsyncs).
    pub fsyncs: u64,
    /// Median latency, µs.
    pub p50_us: u64,
    /// 99th percentile latency, µs.
    pub p99_us: u64,
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        write!(
            f,
            "{} appends in {:.2}s: {:.0} appends/s, p50 {} us, p99 {} us, {} fsyncs ({:.1} appends per fsync)",
            self.appends,
            secs,
            self.appends as f64 / secs,
            self.p50_us,
            self.p99_us,
            self.fsyncs,
            self.appends as f64 / self.fsyncs.max(1) as f64
        )
    }
}

/// Appends `records` single-record appends from `writers` concurrent tasks to a WAL in
/// `dir` (fsync on, no snapshots) and measures throughput and latency.
pub async fn bench(
    dir: &Path,
    writers: usize,
    records: u64,
    value_size: usize,
) -> Result<BenchReport, String> {
    let _lock = crate::lock_data_dir(dir).map_err(|e| e.to_string())?;
    let r = recover(dir, true, false).map_err(|e| e.to_string())?;
    let start_seq = r.store.pos().seq;
    let state = NodeState::new(
        dir.to_path_buf(),
        r.store,
        read_epoch(dir).map_err(|e| e.to_string())?,
    );
    let epoch = Epoch(state.highest_epoch.load(Ordering::SeqCst).max(1));
    let cfg = WriterConfig {
        batch_max: 1024,
        snapshot_every: u64::MAX,
        fsync: true,
    };
    let (writer, thread) =
        WalWriter::start(state.clone(), r.wal, cfg).map_err(|e| e.to_string())?;
    // The lock hands out seqs in queue order: the writer refuses gaps.
    let next = Arc::new(tokio::sync::Mutex::new(start_seq.0));
    let value = "x".repeat(value_size);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let (writer, next, value) = (writer.clone(), next.clone(), value.clone());
        let end = start_seq.0 + records;
        tasks.spawn(async move {
            let mut hist = hdrhistogram::Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
            loop {
                let t = Instant::now();
                let rx = {
                    let mut seq = next.lock().await;
                    if *seq >= end {
                        break;
                    }
                    *seq += 1;
                    let op = Op::Put {
                        key: format!("bench-{}", *seq % 100_000),
                        value: value.clone(),
                    };
                    let rec = Record {
                        seq: Seq(*seq),
                        epoch,
                        client: format!("bench-{w}"),
                        op_no: *seq,
                        op,
                    };
                    writer
                        .submit(epoch, Seq(0), vec![rec])
                        .await
                        .map_err(|e| e.to_string())?
                };
                rx.await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                hist.record(t.elapsed().as_micros() as u64)
                    .map_err(|e| e.to_string())?;
            }
            Ok::<_, String>(hist)
        });
    }
    let mut hist = hdrhistogram::Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    while let Some(res) = tasks.join_next().await {
        hist.add(res.map_err(|e| e.to_string())??)
            .map_err(|e| e.to_string())?;
    }
    let elapsed = started.elapsed();
    writer.close().await;
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    Ok(BenchReport {
        appends: hist.len(),
        elapsed,
        fsyncs: state.wal_batches.load(Ordering::Relaxed),
        p50_us: hist.value_at_quantile(0.5),
        p99_us: hist.value_at_quantile(0.99),
    })
}
