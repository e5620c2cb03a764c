//! Offline tools behind `storage wal verify|dump|bench|store-bench|sync-bench`.
//!
//! - `verify` reads a data directory without changing it and checks the snapshot
//!   checksum, every record checksum and seq continuity; a torn last line is reported but
//!   is not an error (the next start truncates it).
//! - `dump` prints the snapshot header and every record as JSON lines for `jq`.
//! - `bench` drives the WAL writer in-process with N concurrent writers (fsync on) and
//!   reports appends/s and latency percentiles: a benchmark, never a test.
//! - `store-bench` loads N keys into an in-memory [`Store`] and reports RSS per key, how
//!   long the writer stalls to take a snapshot, `apply` latency with and without a
//!   snapshot alive, and recovery time from it: also a benchmark.
//! - `sync-bench` times 1..=N threads writing and `fdatasync`ing preallocated (or, with
//!   `--append`, growing) files at once: the floor the disk puts under a group commit of N
//!   nodes sharing it, with the block writes and cache flushes each call cost the device.

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
            "segment {}: {} records ({range}), {} bytes of records, {} preallocated\n",
            seg.path.display(),
            recs.len(),
            seg.decoded.valid_len,
            seg.file_len - seg.data_len
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
    /// 99.9th percentile latency, µs.
    pub p999_us: u64,
    /// Slowest append, µs.
    pub max_us: u64,
    /// Keys written (the key space the appends cycle through).
    pub keys: u64,
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        write!(
            f,
            "{} appends over {} keys in {:.2}s: {:.0} appends/s, p50 {} us, p99 {} us, p99.9 {} us, max {} us, {} fsyncs ({:.1} appends per fsync)",
            self.appends,
            self.keys,
            secs,
            self.appends as f64 / secs,
            self.p50_us,
            self.p99_us,
            self.p999_us,
            self.max_us,
            self.fsyncs,
            self.appends as f64 / self.fsyncs.max(1) as f64
        )
    }
}

/// Appends `records` single-record appends from `writers` concurrent tasks to a WAL in
/// `dir` (fsync on) and measures throughput and latency. The puts cycle through `keys`
/// keys (16 bytes, random order); with `snapshot_every`, the writer snapshots as a node
/// does, so the latency shows what a snapshot costs the write path at that many keys.
pub async fn bench(
    dir: &Path,
    writers: usize,
    records: u64,
    value_size: usize,
    keys: u64,
    snapshot_every: Option<u64>,
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
        snapshot_every: snapshot_every.unwrap_or(u64::MAX),
        fsync: true,
    };
    let keys = keys.max(1);
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
                        key: bench_key(*seq % keys),
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
                    .into_result()
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
        p999_us: hist.value_at_quantile(0.999),
        max_us: hist.max(),
        keys: keys.min(records),
    })
}

/// Records between the simulated snapshots of `store-bench`'s load phase: the default
/// `snapshot_every`, so the tail holds what a running node's would.
const STORE_BENCH_SNAPSHOT_EVERY: u64 = 100_000;

/// Latency of a run of `Store::apply` calls, ns.
#[derive(Debug, Clone, Copy)]
pub struct ApplyLatency {
    /// Median.
    pub p50_ns: u64,
    /// 99.9th percentile.
    pub p999_ns: u64,
    /// Slowest.
    pub max_ns: u64,
    /// Mean.
    pub mean_ns: u64,
}

impl std::fmt::Display for ApplyLatency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "mean {} ns, p50 {} ns, p99.9 {} ns, max {} ns",
            self.mean_ns, self.p50_ns, self.p999_ns, self.max_ns
        )
    }
}

/// Results of `storage wal store-bench`.
#[derive(Debug, Clone)]
pub struct StoreBenchReport {
    /// Keys loaded.
    pub keys: u64,
    /// Bytes per value.
    pub value_size: usize,
    /// Time to apply the `keys` puts (snapshots simulated by compacting the tail).
    pub load: Duration,
    /// Resident set size growth per key after the load, bytes.
    pub rss_per_key: f64,
    /// Time the writer spends taking the snapshot (with the store lock held).
    pub snapshot_take: Duration,
    /// Overwrites of existing keys applied while the snapshot was alive, then again after.
    pub updates: u64,
    /// `Store::apply` while the snapshot is alive (a write may have to copy shared nodes).
    pub apply_during: ApplyLatency,
    /// RSS growth while those updates ran with the snapshot alive, bytes.
    pub rss_during: u64,
    /// `Store::apply` with no snapshot alive.
    pub apply_after: ApplyLatency,
    /// Time to write the snapshot file (the snapshot thread's work; no store lock).
    pub snapshot_write: Duration,
    /// Time to recover (load the snapshot, replay `updates` WAL records).
    pub recover: Duration,
    /// Resident set size after recovery, minus the size before the load, per key.
    pub rss_per_key_recovered: f64,
}

impl std::fmt::Display for StoreBenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / f64::from(1 << 20);
        writeln!(
            f,
            "{} keys ({}-byte values) loaded in {:.2}s: RSS {:.0} B/key",
            self.keys,
            self.value_size,
            self.load.as_secs_f64(),
            self.rss_per_key
        )?;
        writeln!(
            f,
            "snapshot: taken in {} us (writer stalled), written in {} ms",
            self.snapshot_take.as_micros(),
            self.snapshot_write.as_millis()
        )?;
        writeln!(
            f,
            "{} applies with the snapshot alive: {}; RSS +{:.1} MiB",
            self.updates,
            self.apply_during,
            mib(self.rss_during)
        )?;
        writeln!(
            f,
            "{} applies with no snapshot alive: {}",
            self.updates, self.apply_after
        )?;
        write!(
            f,
            "recovery (snapshot + {} WAL records): {} ms, RSS {:.0} B/key after it",
            self.updates,
            self.recover.as_millis(),
            self.rss_per_key_recovered
        )
    }
}

/// The resident set size of this process in bytes (`VmRSS`; 0 where /proc is missing).
pub(crate) fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// Key number `i` of the bench: 16 hex digits of a bijective mix of `i` (splitmix64's
/// finaliser), so keys are distinct and arrive in random order, as real keys would.
pub(crate) fn bench_key(i: u64) -> String {
    let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    format!("{:016x}", z ^ (z >> 31))
}

fn bench_put(seq: u64, key: String, value: &str) -> Record {
    Record {
        seq: Seq(seq),
        epoch: Epoch(1),
        client: "bench".into(),
        op_no: seq,
        op: Op::Put {
            key,
            value: value.to_string(),
        },
    }
}

/// Applies `records` one at a time and measures each call.
fn timed_applies(store: &mut Store, records: &[Record]) -> Result<ApplyLatency, String> {
    let mut hist = hdrhistogram::Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    for r in records {
        let t = Instant::now();
        store.apply(r);
        hist.record(t.elapsed().as_nanos() as u64)
            .map_err(|e| e.to_string())?;
    }
    Ok(ApplyLatency {
        p50_ns: hist.value_at_quantile(0.5),
        p999_ns: hist.value_at_quantile(0.999),
        max_ns: hist.max(),
        mean_ns: hist.mean() as u64,
    })
}

/// Loads `keys` keys into a [`Store`] and measures what a storage node pays for them:
/// RSS per key, the writer's stall when it takes a snapshot, `apply` latency with and
/// without a snapshot alive, the snapshot write, and recovery from that snapshot plus
/// the `2 * updates` WAL records applied meanwhile (written to `dir`, which must hold no
/// snapshot or segment). Single-threaded, so other load on the machine blurs only the
/// tails. A benchmark, never a test.
pub fn store_bench(
    dir: &Path,
    keys: u64,
    value_size: usize,
    updates: u64,
) -> Result<StoreBenchReport, String> {
    let _lock = crate::lock_data_dir(dir).map_err(|e| e.to_string())?;
    let used = !crate::wal::file::list_segments(dir)
        .and_then(|s| Ok(s.is_empty() && crate::snapshot::list(dir)?.is_empty()))
        .map_err(|e| e.to_string())?;
    if used || keys == 0 {
        return Err(format!(
            "{}: needs an empty data directory and at least one key",
            dir.display()
        ));
    }
    let value = "x".repeat(value_size);
    let rss_start = rss_bytes();
    let started = Instant::now();
    let mut store = Store::new();
    for seq in 1..=keys {
        store.apply(&bench_put(seq, bench_key(seq), &value));
        if seq % STORE_BENCH_SNAPSHOT_EVERY == 0 {
            drop(store.compacted(store.pos()));
        }
    }
    drop(store.compacted(store.pos()));
    let load = started.elapsed();
    let per_key = |rss: u64| rss.saturating_sub(rss_start) as f64 / keys as f64;
    let rss_loaded = rss_bytes();

    // Overwrites of random existing keys, the steady state of a full store.
    let wal: Vec<Record> = (0..2 * updates)
        .map(|i| bench_put(keys + 1 + i, bench_key(1 + i * 7919 % keys), &value))
        .collect();
    let (during, after) = wal.split_at(updates as usize);
    let started = Instant::now();
    let data = store.snapshot_data();
    let snapshot_take = started.elapsed();
    let rss_before = rss_bytes();
    let apply_during = timed_applies(&mut store, during)?;
    let rss_during = rss_bytes().saturating_sub(rss_before);
    let started = Instant::now();
    crate::snapshot::write(dir, &data).map_err(|e| format!("cannot write snapshot: {e}"))?;
    let snapshot_write = started.elapsed();
    drop(data);
    let apply_after = timed_applies(&mut store, after)?;
    drop(store);
    if !wal.is_empty() {
        let mut buf = Vec::new();
        crate::wal::codec::encode_batch(&wal, &mut buf);
        crate::wal::file::WalFile::create(dir, wal[0].seq, false)
            .and_then(|mut f| f.append(&buf))
            .map_err(|e| e.to_string())?;
    }
    drop(wal);

    let started = Instant::now();
    let r = recover(dir, false, false).map_err(|e| e.to_string())?;
    let recover = started.elapsed();
    if r.store.len() as u64 != keys || r.replayed != 2 * updates {
        return Err(format!(
            "recovered {} keys and {} records, expected {keys} and {}",
            r.store.len(),
            r.replayed,
            2 * updates
        ));
    }
    Ok(StoreBenchReport {
        keys,
        value_size,
        load,
        rss_per_key: per_key(rss_loaded),
        snapshot_take,
        updates,
        apply_during,
        rss_during,
        apply_after,
        snapshot_write,
        recover,
        rss_per_key_recovered: per_key(rss_bytes()),
    })
}

/// `store-bench --recover-only`: recovers `dir` (left by an earlier `store-bench`) in this
/// fresh process and reports the time and the RSS per key of the recovered store alone,
/// which is what a restarted node holds.
pub fn recover_bench(dir: &Path) -> Result<String, String> {
    let _lock = crate::lock_data_dir(dir).map_err(|e| e.to_string())?;
    let rss_start = rss_bytes();
    let started = Instant::now();
    let r = recover(dir, false, false).map_err(|e| e.to_string())?;
    let elapsed = started.elapsed();
    let keys = r.store.len().max(1) as f64;
    let rss_per_key = rss_bytes().saturating_sub(rss_start) as f64 / keys;
    let what = format!(
        "{} keys (snapshot at seq {} + {} WAL records)",
        r.store.len(),
        r.store.snapshot_pos().seq,
        r.replayed
    );
    drop(r);
    // Once more, the snapshot alone (page-cached now), to split the time.
    let started = Instant::now();
    if let Some((_, path)) = crate::snapshot::list(dir).map_err(|e| e.to_string())?.pop() {
        crate::snapshot::read(&path)?;
    }
    Ok(format!(
        "recovered {what} in {} ms (loading the snapshot alone: {} ms): RSS {rss_per_key:.0} B/key",
        elapsed.as_millis(),
        started.elapsed().as_millis(),
    ))
}

/// Round latency of `sync-bench` for one number of files.
#[derive(Debug, Clone)]
pub struct SyncRoundReport {
    /// Files written and synced in parallel each round.
    pub files: usize,
    /// Rounds measured.
    pub rounds: u64,
    /// Median round, µs.
    pub p50_us: u64,
    /// 90th percentile round, µs.
    pub p90_us: u64,
    /// 99th percentile round, µs.
    pub p99_us: u64,
    /// Slowest round, µs.
    pub max_us: u64,
    /// The files grew with every write instead of overwriting preallocated zeros.
    pub append: bool,
    /// The CPUs were kept awake between rounds for this many µs (idle polling, as
    /// `idle_poll_us` does in the servers); 0 = they could halt.
    pub idle_poll_us: u64,
    /// Block writes and cache flushes the device completed per `fdatasync`, from
    /// `/proc/diskstats`; `None` where the directory's device is not listed there (tmpfs,
    /// overlay). They count the whole device, other processes' IO included.
    pub io: Option<IoPerSync>,
}

/// What one `fdatasync` cost the device, on average.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IoPerSync {
    /// Write requests completed.
    pub writes: f64,
    /// Cache flush requests completed (`None` on kernels before 5.5, which do not count them).
    pub flushes: Option<f64>,
}

/// A block device's cumulative request counters (`/proc/diskstats`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskCounters {
    /// Writes completed (the 5th statistic).
    pub writes: u64,
    /// Flush requests completed (the 16th statistic, kernel 5.5 and later).
    pub flushes: Option<u64>,
}

impl DiskCounters {
    /// What happened between `self` and `later`, per one of `syncs` calls.
    pub fn per_sync(&self, later: &DiskCounters, syncs: u64) -> IoPerSync {
        let per = |a: u64, b: u64| b.saturating_sub(a) as f64 / syncs.max(1) as f64;
        IoPerSync {
            writes: per(self.writes, later.writes),
            flushes: self.flushes.zip(later.flushes).map(|(a, b)| per(a, b)),
        }
    }
}

/// Splits a `st_dev` into (major, minor) the way glibc's `gnu_dev_major`/`minor` do. Pure.
pub fn dev_major_minor(dev: u64) -> (u64, u64) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & 0xffff_f000);
    let minor = (dev & 0xff) | ((dev >> 12) & 0xffff_ff00);
    (major, minor)
}

/// The counters of device `major:minor` in the text of `/proc/diskstats`. Pure.
pub fn parse_diskstats(text: &str, major: u64, minor: u64) -> Option<DiskCounters> {
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
        (num(0)? == major && num(1)? == minor).then_some(DiskCounters {
            writes: num(7)?,
            flushes: num(18),
        })
    })
}

/// The counters of the device holding `dir`, if `/proc/diskstats` lists it.
fn disk_counters(dir: &Path) -> Option<DiskCounters> {
    use std::os::unix::fs::MetadataExt;
    let (major, minor) = dev_major_minor(std::fs::metadata(dir).ok()?.dev());
    parse_diskstats(
        &std::fs::read_to_string("/proc/diskstats").ok()?,
        major,
        minor,
    )
}

impl std::fmt::Display for SyncRoundReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} file(s) synced in parallel: {} rounds, p50 {} us, p90 {} us, p99 {} us, max {} us",
            self.files,
            if self.append { "appended" } else { "preallocated" },
            self.rounds,
            self.p50_us,
            self.p90_us,
            self.p99_us,
            self.max_us
        )?;
        if self.idle_poll_us > 0 {
            write!(
                f,
                "; CPUs kept awake (idle polling {} us)",
                self.idle_poll_us
            )?;
        }
        match self.io {
            Some(IoPerSync { writes, flushes }) => {
                write!(f, "; per fdatasync the device did {writes:.2} writes")?;
                match flushes {
                    Some(fl) => write!(f, " and {fl:.2} cache flushes"),
                    None => write!(f, " (flushes not counted by this kernel)"),
                }
            }
            None => write!(f, "; the device's IO counters are not in /proc/diskstats"),
        }
    }
}

/// `storage wal sync-bench`: the disk's own floor under a replicated write. For each
/// `n` in `1..=files`, `n` threads each write `bytes` into a preallocated file (as a WAL
/// segment is, see [`crate::wal::file`]; with `append`, into a file that grows, as
/// segments were before preallocation) and `fdatasync` it, all starting together, for
/// `rounds` rounds; a round lasts until the last of them is durable. `n` = 3 is what one
/// group commit costs three storage nodes sharing this disk before any network or CPU
/// work. With `idle_poll_us` > 0 the CPUs are kept awake meanwhile
/// ([`walkv_shared::idle_poll`]), as in servers with that setting: on a virtual machine a
/// round otherwise also pays for waking halted CPUs. The files live in `dir` and are
/// removed afterwards.
pub fn sync_bench(
    dir: &Path,
    files: usize,
    rounds: u64,
    bytes: usize,
    append: bool,
    idle_poll_us: u64,
) -> Result<Vec<SyncRoundReport>, String> {
    use crate::wal::disk::{Disk, DiskFile, RealDisk};
    use std::sync::Barrier;
    if !dir.is_dir() {
        return Err(format!("{}: not a directory", dir.display()));
    }
    let bytes = bytes.max(1);
    let payload = vec![b'x'; bytes];
    let poller = match idle_poll_us {
        0 => None,
        us => Some(
            walkv_shared::idle_poll::IdlePoller::start(std::time::Duration::from_micros(us))
                .map_err(|e| format!("cannot start idle polling: {e}"))?,
        ),
    };
    let active = || {
        if let Some(p) = &poller {
            p.activity();
        }
    };
    let mut reports = Vec::new();
    for n in 1..=files.max(1) {
        let paths: Vec<_> = (0..n)
            .map(|i| dir.join(format!("sync-bench-{}-{i}.tmp", std::process::id())))
            .collect();
        let mut handles: Vec<Box<dyn DiskFile>> = Vec::new();
        let mut opened = || -> std::io::Result<()> {
            for path in &paths {
                let mut f = RealDisk.create_new(dir, path)?;
                if !append {
                    f.extend_zeroed(0, rounds * bytes as u64)?;
                }
                f.sync_data()?;
                handles.push(f);
            }
            Ok(())
        };
        let result = opened().map_err(|e| format!("{}: {e}", dir.display()));
        let result = result.and_then(|()| {
            // Two barriers per round: everyone starts together, and the round ends when
            // the last file is durable.
            let start = Arc::new(Barrier::new(n + 1));
            let done = Arc::new(Barrier::new(n + 1));
            let threads: Vec<_> = handles
                .drain(..)
                .map(|mut f| {
                    let (start, done, payload) = (start.clone(), done.clone(), payload.clone());
                    std::thread::spawn(move || {
                        let mut failed = None;
                        for round in 0..rounds {
                            start.wait();
                            if failed.is_none() {
                                let at = round * payload.len() as u64;
                                failed =
                                    f.write_at(&payload, at).and_then(|()| f.sync_data()).err();
                            }
                            done.wait();
                        }
                        failed.map_or(Ok(()), Err)
                    })
                })
                .collect();
            let mut hist = hdrhistogram::Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
            let counters_before = disk_counters(dir);
            for _ in 0..rounds {
                let t = Instant::now();
                active();
                start.wait();
                done.wait();
                active();
                hist.record(t.elapsed().as_micros() as u64)
                    .map_err(|e| e.to_string())?;
            }
            for t in threads {
                t.join()
                    .map_err(|_| "a sync-bench thread panicked".to_string())?
                    .map_err(|e| format!("write or fdatasync in {}: {e}", dir.display()))?;
            }
            let io = counters_before
                .zip(disk_counters(dir))
                .map(|(before, after)| before.per_sync(&after, rounds * n as u64));
            Ok(SyncRoundReport {
                files: n,
                rounds: hist.len(),
                p50_us: hist.value_at_quantile(0.5),
                p90_us: hist.value_at_quantile(0.9),
                p99_us: hist.value_at_quantile(0.99),
                max_us: hist.max(),
                append,
                idle_poll_us,
                io,
            })
        });
        for path in &paths {
            let _ = std::fs::remove_file(path);
        }
        reports.push(result?);
    }
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_bench_times_every_round_for_each_file_count_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let reports = sync_bench(dir.path(), 3, 25, 300, false, 0).unwrap();
        assert_eq!(
            reports.iter().map(|r| r.files).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        for r in &reports {
            assert_eq!(r.rounds, 25, "{r}");
            assert!(r.p50_us <= r.p99_us && r.p99_us <= r.max_us, "{r}");
        }
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "the bench's files are removed"
        );
    }

    #[test]
    fn sync_bench_refuses_a_missing_directory() {
        let dir = tempfile::tempdir().unwrap();
        let err = sync_bench(&dir.path().join("nope"), 1, 1, 10, false, 0).unwrap_err();
        assert!(err.contains("not a directory"), "{err}");
    }

    #[test]
    fn sync_bench_appends_when_asked_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let reports = sync_bench(dir.path(), 1, 5, 100, true, 0).unwrap();
        assert!(reports[0].append);
        assert!(
            reports[0].to_string().contains("1 appended file(s)"),
            "{}",
            reports[0]
        );
    }

    #[test]
    fn sync_bench_keeps_the_cpus_awake_when_asked_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let reports = sync_bench(dir.path(), 2, 5, 100, false, 1000).unwrap();
        assert_eq!(reports.len(), 2);
        for r in &reports {
            assert_eq!(r.idle_poll_us, 1000);
            assert!(
                r.to_string()
                    .contains("CPUs kept awake (idle polling 1000 us)"),
                "{r}"
            );
        }
        let plain = sync_bench(dir.path(), 1, 5, 100, false, 0).unwrap();
        assert!(!plain[0].to_string().contains("awake"), "{}", plain[0]);
    }

    #[test]
    fn dev_numbers_split_like_glibc() {
        // glibc's makedev, written out.
        let makedev = |major: u64, minor: u64| {
            (minor & 0xff)
                | ((major & 0xfff) << 8)
                | ((minor & !0xff) << 12)
                | ((major & !0xfff) << 32)
        };
        assert_eq!(dev_major_minor(0x0801), (8, 1), "/dev/sda1");
        assert_eq!(dev_major_minor(0xfd00), (253, 0), "/dev/vda");
        for (major, minor) in [(259, 3), (0x1002, 0x10005), (4095, 255)] {
            assert_eq!(dev_major_minor(makedev(major, minor)), (major, minor));
        }
    }

    #[test]
    fn diskstats_counters_of_one_device() {
        let text = "\
 253       0 vda 100 0 800 10 5000 20 40000 300 0 400 500 7 0 56 1 2500 60
 253       1 vda1 90 0 700 9 4900 20 39000 290 0 390 480 0 0 0 0
   7       0 loop0 1 0 2 0 0 0 0 0 0 0 0
";
        assert_eq!(
            parse_diskstats(text, 253, 0),
            Some(DiskCounters {
                writes: 5000,
                flushes: Some(2500)
            })
        );
        assert_eq!(
            parse_diskstats(text, 253, 1),
            Some(DiskCounters {
                writes: 4900,
                flushes: None
            }),
            "a line without the flush fields (kernel < 5.5)"
        );
        assert_eq!(parse_diskstats(text, 8, 0), None);
        let before = DiskCounters {
            writes: 100,
            flushes: Some(10),
        };
        let after = DiskCounters {
            writes: 310,
            flushes: Some(110),
        };
        assert_eq!(
            before.per_sync(&after, 100),
            IoPerSync {
                writes: 2.1,
                flushes: Some(1.0)
            }
        );
    }
}
