//! One chaos run: start a cluster behind proxies, run client workers and the nemesis,
//! heal, read every key one last time, check the history.
//!
//! The run's directory is the cluster's temp dir: every process log, `history.jsonl`,
//! `schedule.txt` and `report.txt`. It is removed when the run passes and kept (and its
//! path printed) when it finds a violation, or always with `WALKV_KEEP_TMP=1`.
//!
//! # Workers
//!
//! Each worker is a loop of put / get / delete / cas on a small key space with values
//! unique in the run. A write whose outcome is unknown (`Timeout`) is recorded as `info`
//! and the worker continues as a new process (a new client id), as Jepsen does: the old
//! process may still have that write in flight. Every client call is bounded by the
//! client's retry deadline, so a worker never hangs.

use super::checker::{self, Violation};
use super::history::{self, Input, Operation, Output, Recorder};
use super::nemesis::{self, Fault, FaultMix, Step};
use super::proxy::{Mode, Proxy};
use crate::cluster::{ClusterOptions, TestCluster};
use crate::process::{bin_path, NodeProcess};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use walkv_client::{Client, ClientConfig};
use walkv_shared::types::NodeRole;
use walkv_shared::{KvError, Seq};

/// How long healing may take (all nodes back in sync) before it counts as a violation.
const HEAL_TIMEOUT: Duration = Duration::from_secs(45);
/// How long a destructive fault waits for all nodes to be in sync before it is skipped.
const IN_SYNC_WAIT: Duration = Duration::from_secs(5);
/// Attempts of each final read before the key counts as unreadable.
const FINAL_READ_ATTEMPTS: u32 = 5;
/// A final read's client: retry deadline of one attempt, ms (attempts × this bounds it).
const FINAL_READ_DEADLINE_MS: u64 = 3000;
/// A worker's client: deadline of one attempt, ms.
const WORKER_REQUEST_TIMEOUT_MS: u64 = 700;
/// A worker's client: total retry deadline of one operation, ms.
const WORKER_RETRY_DEADLINE_MS: u64 = 1500;
/// Harness bound on one client call, far past the client's own deadlines: a call still
/// running then is a client hang (SPEC §2: never a hang without deadline).
const CLIENT_HANG: Duration = Duration::from_secs(10);

/// What to run.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// Seed of the nemesis schedule and the workers' choices.
    pub seed: u64,
    /// How long workers run under faults.
    pub duration: Duration,
    /// Concurrent client workers.
    pub workers: usize,
    /// Number of keys (`k0`..).
    pub keys: usize,
    /// Fault families.
    pub mix: FaultMix,
    /// Replaces the seeded schedule (drills and negative controls).
    pub schedule: Option<Vec<Step>>,
    /// Lines appended to frontend.toml.
    pub frontend_extra: String,
    /// Print progress lines.
    pub verbose: bool,
    /// Keep the run directory when a violation is found (negative controls, which expect
    /// violations, turn this off so they leave nothing behind).
    pub keep_on_failure: bool,
}

impl RunConfig {
    /// Defaults for `seed`: 10 workers, 8 keys, every fault family, `duration`.
    pub fn new(seed: u64, duration: Duration) -> RunConfig {
        RunConfig {
            seed,
            duration,
            workers: 10,
            keys: 8,
            mix: FaultMix::ALL,
            schedule: None,
            frontend_extra: String::new(),
            verbose: true,
            keep_on_failure: true,
        }
    }
}

/// What a run found.
#[derive(Clone, Debug, Default)]
pub struct RunReport {
    /// The seed.
    pub seed: u64,
    /// Operations recorded (final reads included).
    pub ops: u64,
    /// Of which `ok`, `fail`, `info`.
    pub ok: u64,
    /// Definitely not applied.
    pub fail: u64,
    /// Unknown outcome.
    pub info: u64,
    /// Faults injected by kind (skipped ones are `skipped_<kind>`).
    pub faults: BTreeMap<String, u64>,
    /// Every violation found.
    pub violations: Vec<Violation>,
    /// Keys whose linearizability search ran out of budget.
    pub unchecked_keys: usize,
    /// The run directory, when kept.
    pub kept_dir: Option<PathBuf>,
}

impl RunReport {
    /// Violations of `kind`.
    pub fn count(&self, kind: &str) -> usize {
        self.violations.iter().filter(|v| v.kind == kind).count()
    }
}

fn say(cfg: &RunConfig, msg: &str) {
    if cfg.verbose {
        eprintln!("[chaos seed {}] {msg}", cfg.seed);
    }
}

/// Runs one seed end to end. Panics only on harness failures (a binary missing, ...);
/// everything the cluster does wrong ends up in the report's violations.
pub async fn run(cfg: RunConfig) -> RunReport {
    eprintln!("[chaos] seed {} duration {:?}", cfg.seed, cfg.duration);
    let duration_ms = cfg.duration.as_millis() as u64;
    let steps = cfg
        .schedule
        .clone()
        .unwrap_or_else(|| nemesis::schedule(cfg.seed, duration_ms, cfg.mix));
    let mut proxies: Vec<Proxy> = Vec::new();
    let options = ClusterOptions {
        frontend_extra: cfg.frontend_extra.clone(),
        // A node whose WAL was bit-flipped cuts it and catches up instead of refusing.
        storage_extra: "discard_corrupt_tail = true".into(),
        ..ClusterOptions::default()
    };
    let mut cluster = TestCluster::start_with(options, |_, listen| {
        let p = Proxy::start(listen);
        let addr = p.addr.clone();
        proxies.push(p);
        Some(addr)
    })
    .await;
    let dir = cluster.dir.path().to_path_buf();
    check_advertised(&cluster, &proxies).await;
    let schedule_text: String = steps
        .iter()
        .map(|s| format!("{:>6} ms  hold {:>5} ms  {}\n", s.at_ms, s.hold_ms, s.fault))
        .collect();
    let _ = std::fs::write(dir.join("schedule.txt"), &schedule_text);
    say(
        &cfg,
        &format!("run dir {}; schedule:\n{schedule_text}", dir.display()),
    );
    let recorder = Recorder::create(&dir.join("history.jsonl")).expect("create history.jsonl");
    let mut report = RunReport {
        seed: cfg.seed,
        ..RunReport::default()
    };

    let stop = Arc::new(AtomicBool::new(false));
    let processes = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..cfg.workers {
        workers.push(tokio::spawn(worker(
            w,
            cfg.clone(),
            cluster.client_config(),
            recorder.clone(),
            stop.clone(),
            processes.clone(),
        )));
    }

    let mut traced = vec![false; cluster.nodes.len()];
    let start = tokio::time::Instant::now();
    for step in &steps {
        tokio::time::sleep_until(start + Duration::from_millis(step.at_ms)).await;
        let applied = inject(&mut cluster, &proxies, &mut traced, &step.fault, &recorder).await;
        let kind = step.fault.kind();
        let name = if applied {
            kind.to_string()
        } else {
            format!("skipped_{kind}")
        };
        *report.faults.entry(name).or_default() += 1;
        tokio::time::sleep(Duration::from_millis(step.hold_ms)).await;
        heal(&mut cluster, &proxies, &mut traced, &recorder);
    }
    tokio::time::sleep_until(start + cfg.duration).await;
    // Faults stop with the workload (SPEC §3.4 promises convergence once faults stop):
    // every worker's last op is bounded by its client's retry deadline.
    stop.store(true, Ordering::Relaxed);
    let mut hangs = 0;
    for w in workers {
        // A worker task only ends by itself; a panic is a harness bug worth surfacing.
        hangs += w.await.expect("chaos worker panicked");
    }
    if hangs > 0 {
        report.violations.push(Violation {
            kind: "client_hang".into(),
            detail: format!("{hangs} client call(s) ran past {CLIENT_HANG:?} (see history.jsonl)"),
        });
    }
    heal(&mut cluster, &proxies, &mut traced, &recorder);
    let healed = wait_healthy(&cluster, HEAL_TIMEOUT).await;
    if !healed {
        report.violations.push(Violation {
            kind: "heal".into(),
            detail: format!(
                "the cluster was not available with 3 in-sync nodes {HEAL_TIMEOUT:?} after healing: {:?}",
                cluster.status().await
            ),
        });
    }
    say(&cfg, "workers stopped; final reads");
    // A cluster that did not heal cannot be read; its violation is already recorded.
    let mut finals = Vec::new();
    if healed {
        finals = final_reads(&cluster, &cfg, &recorder, &processes, &mut report).await;
        if let Err(why) = converged(&cluster, HEAL_TIMEOUT).await {
            report.violations.push(Violation {
                kind: "convergence".into(),
                detail: why,
            });
        }
    }
    check(&recorder, &finals, &mut report);
    finish(&mut cluster, &dir, &steps, cfg.keep_on_failure, &mut report);
    report
}

/// The frontend must know each node by its proxy's address (`--advertise`), or the
/// network faults would miss the frontend → storage path.
async fn check_advertised(cluster: &TestCluster, proxies: &[Proxy]) {
    let status = cluster
        .status()
        .await
        .expect("a started cluster answers status");
    for (node, proxy) in cluster.nodes.iter().zip(proxies) {
        let seen = status.nodes.iter().find(|n| n.id.0 == node.id);
        assert_eq!(
            seen.map(|n| n.addr.as_str()),
            Some(proxy.addr.as_str()),
            "{} must be registered at its advertised (proxy) address",
            node.id
        );
    }
}

/// Runs all checkers over the history.
fn check(recorder: &Recorder, finals: &[u64], report: &mut RunReport) {
    let ops = history::operations(&recorder.snapshot());
    for op in &ops {
        report.ops += 1;
        match op.output {
            Output::Unknown => report.info += 1,
            Output::Failed { .. } => report.fail += 1,
            _ => report.ok += 1,
        }
    }
    let (lin, unknown) = checker::check_linearizable(&ops);
    report.violations.extend(lin);
    report.unchecked_keys = unknown;
    let final_ops: Vec<Operation> = ops
        .iter()
        .filter(|o| finals.contains(&o.id))
        .cloned()
        .collect();
    report
        .violations
        .extend(checker::check_final_reads(&ops, &final_ops));
    report.violations.extend(checker::check_versions(&ops));
}

/// Writes `report.txt`, prints the verdict, keeps the directory on failure.
fn finish(
    cluster: &mut TestCluster,
    dir: &Path,
    steps: &[Step],
    keep_on_failure: bool,
    report: &mut RunReport,
) {
    let mut text = format!(
        "seed {}\nops {} (ok {}, fail {}, info {})\nfaults {:?}\nunchecked keys {}\nviolations {}\n",
        report.seed,
        report.ops,
        report.ok,
        report.fail,
        report.info,
        report.faults,
        report.unchecked_keys,
        report.violations.len()
    );
    for v in &report.violations {
        text.push_str(&format!("\n{v}\n"));
    }
    text.push_str(&format!("\nschedule: {} steps\n", steps.len()));
    let _ = std::fs::write(dir.join("report.txt"), &text);
    let keep = !report.violations.is_empty() && keep_on_failure;
    if keep || std::env::var_os("WALKV_KEEP_TMP").is_some() {
        let kept = cluster.keep_dir();
        eprintln!(
            "[chaos] seed {}: {} violation(s); run kept in {} (history.jsonl, report.txt, logs)",
            report.seed,
            report.violations.len(),
            kept.display()
        );
        report.kept_dir = Some(kept);
    } else if !report.violations.is_empty() {
        eprintln!(
            "[chaos] seed {}: {} violation(s) (expected by this negative control); report:\n{text}",
            report.seed,
            report.violations.len()
        );
    } else {
        eprintln!(
            "[chaos] seed {}: ok ({} ops, {} info, faults {:?})",
            report.seed, report.ops, report.info, report.faults
        );
    }
}

/// Applies `fault`; false when it was skipped (destructive with a node out of sync).
async fn inject(
    cluster: &mut TestCluster,
    proxies: &[Proxy],
    under_strace: &mut [bool],
    fault: &Fault,
    recorder: &Recorder,
) -> bool {
    if fault.destructive() && !all_in_sync(cluster, IN_SYNC_WAIT).await {
        recorder.nemesis(&format!("skip {fault}: not every node is in sync"));
        return false;
    }
    if let (Fault::DiskError { .. }, Some(why)) = (fault, strace_unusable()) {
        recorder.nemesis(&format!("skip {fault}: {why}"));
        return false;
    }
    recorder.nemesis(&fault.to_string());
    match fault {
        Fault::KillStorage(nodes) => {
            for &i in nodes {
                cluster.nodes[i].process.kill();
            }
        }
        Fault::KillFrontend => cluster.frontend.kill(),
        Fault::PauseStorage(nodes) => {
            for &i in nodes {
                cluster.nodes[i].process.pause();
            }
        }
        Fault::PauseFrontend => cluster.frontend.pause(),
        Fault::Proxy(i, mode) => proxies[*i].set(*mode),
        Fault::DiskError { node, errno, after } => {
            let dir = cluster.dir.path().to_path_buf();
            let n = &mut cluster.nodes[*node];
            n.process.kill();
            let mut args: Vec<String> = ["-f", "-qq", "-o", "/dev/null", "-e"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            args.push(format!("inject=fdatasync:error={errno}:when={after}+"));
            args.push("--".into());
            args.push(bin_path("storage").display().to_string());
            args.extend(n.args.iter().cloned());
            n.process = NodeProcess::spawn(&n.id, Path::new("strace"), &args, &dir);
            under_strace[*node] = true;
        }
        Fault::TornTail(i) | Fault::BitFlip(i) | Fault::WipeData(i) => {
            let node = &mut cluster.nodes[*i];
            node.process.kill();
            let damaged = match fault {
                Fault::TornTail(_) => super::damage::tear_tail(&node.data_dir),
                Fault::BitFlip(_) => super::damage::flip_mid_wal(&node.data_dir),
                _ => super::damage::wipe(&node.data_dir),
            };
            if let Err(e) = damaged {
                recorder.nemesis(&format!("damage failed: {e}"));
            }
            node.process.restart();
        }
    }
    true
}

/// Why `strace` fault injection cannot run here, if it cannot (checked once per process).
pub fn strace_unusable() -> Option<String> {
    static CHECK: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    CHECK
        .get_or_init(|| {
            let probe = ["-f", "-qq", "-o", "/dev/null", "-e"];
            match std::process::Command::new("strace")
                .args(probe)
                .args(["inject=fdatasync:error=EIO:when=1000", "true"])
                .status()
            {
                Ok(s) if s.success() => None,
                Ok(s) => Some(format!(
                    "strace cannot trace here ({s}); ptrace not permitted?"
                )),
                Err(e) => Some(format!("strace not available: {e}")),
            }
        })
        .clone()
}

/// Ends every fault: proxies pass, paused processes continue, dead ones restart, nodes
/// under strace come back without it.
pub fn heal(
    cluster: &mut TestCluster,
    proxies: &[Proxy],
    under_strace: &mut [bool],
    recorder: &Recorder,
) {
    for p in proxies {
        p.set(Mode::Pass);
    }
    let mut restarted = Vec::new();
    let dir = cluster.dir.path().to_path_buf();
    for (i, traced) in under_strace.iter_mut().enumerate() {
        if std::mem::take(traced) {
            let n = &mut cluster.nodes[i];
            n.process.kill();
            n.process = NodeProcess::spawn(&n.id, &bin_path("storage"), &n.args, &dir);
            restarted.push(format!("{} (without strace)", n.id));
        }
    }
    cluster.frontend.resume();
    if !cluster.frontend.is_alive() {
        cluster.restart_frontend(&[]);
        restarted.push("frontend".to_string());
    }
    for n in &mut cluster.nodes {
        n.process.resume();
        if !n.process.is_alive() {
            n.process.restart();
            restarted.push(n.id.clone());
        }
    }
    recorder.nemesis(&format!("heal (restarted: {})", restarted.join(",")));
}

async fn all_in_sync(cluster: &TestCluster, timeout: Duration) -> bool {
    crate::process::wait_until_async(timeout, || async {
        cluster.status().await.is_some_and(|s| {
            s.available
                && s.nodes
                    .iter()
                    .filter(|n| n.role == NodeRole::InSync)
                    .count()
                    == cluster.nodes.len()
        })
    })
    .await
}

async fn wait_healthy(cluster: &TestCluster, timeout: Duration) -> bool {
    all_in_sync(cluster, timeout).await
}

/// Waits until every node reports the same digest.
async fn converged(cluster: &TestCluster, timeout: Duration) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let mut digests = Vec::new();
        for i in 0..cluster.nodes.len() {
            digests.push(cluster.digest(i).await);
        }
        if digests[0].is_ok() && digests.iter().all(|d| d == &digests[0]) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "storage nodes did not converge within {timeout:?}: {digests:?}"
            ));
        }
        tokio::time::sleep(crate::process::POLL_INTERVAL * 5).await;
    }
}

/// Reads every key once more after healing; returns the op ids of the successful reads.
async fn final_reads(
    cluster: &TestCluster,
    cfg: &RunConfig,
    recorder: &Recorder,
    processes: &AtomicU64,
    report: &mut RunReport,
) -> Vec<u64> {
    let process = processes.fetch_add(1, Ordering::Relaxed) + 1_000_000;
    let config = ClientConfig {
        retry_deadline_ms: FINAL_READ_DEADLINE_MS,
        ..cluster.client_config()
    };
    let mut client = Client::connect(format!("final-{}", cfg.seed), config)
        .await
        .expect("client config is valid");
    let mut ids = Vec::new();
    for k in 0..cfg.keys {
        let key = format!("k{k}");
        let mut done = false;
        for _ in 0..FINAL_READ_ATTEMPTS {
            let op = recorder.invoke(process, &key, Input::Get);
            let out = classify_read(client.get(&key).await);
            let ok = out.kind() == "ok";
            recorder.complete(op, process, out);
            if ok {
                ids.push(op);
                done = true;
                break;
            }
        }
        if !done {
            report.violations.push(Violation {
                kind: "final_read".into(),
                detail: format!("key {key} could not be read after healing"),
            });
        }
    }
    ids
}

fn classify_read(r: Result<walkv_shared::types::Versioned, KvError>) -> Output {
    match r {
        Ok(v) => Output::Value {
            value: v.value,
            version: v.version.0,
        },
        Err(KvError::NotFound) => Output::NotFound,
        Err(KvError::Timeout(_) | KvError::Unavailable(_)) => Output::Unknown,
        Err(e) => Output::Failed {
            error: e.to_string(),
        },
    }
}

fn classify_write(r: Result<Seq, KvError>) -> Output {
    match r {
        Ok(v) => Output::Written { version: v.0 },
        Err(KvError::NotFound) => Output::NotFound,
        Err(KvError::VersionMismatch { current }) => Output::Mismatch { current: current.0 },
        // The client turns every possibly-applied failure into Timeout.
        Err(KvError::Timeout(_)) => Output::Unknown,
        Err(e) => Output::Failed {
            error: e.to_string(),
        },
    }
}

/// One client worker: random ops until `stop`, a new process id after every `info`.
async fn worker(
    w: usize,
    cfg: RunConfig,
    client_config: ClientConfig,
    recorder: Recorder,
    stop: Arc<AtomicBool>,
    processes: Arc<AtomicU64>,
) -> u64 {
    let mut hangs = 0u64;
    let mut rng = StdRng::seed_from_u64(cfg.seed.wrapping_mul(1000).wrapping_add(w as u64));
    let config = ClientConfig {
        request_timeout_ms: WORKER_REQUEST_TIMEOUT_MS,
        retry_deadline_ms: WORKER_RETRY_DEADLINE_MS,
        ..client_config
    };
    let mut process = processes.fetch_add(1, Ordering::Relaxed);
    let mut client = new_client(&cfg, process, &config).await;
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let key = format!("k{}", rng.gen_range(0..cfg.keys));
        let value = format!("p{process}-{n}");
        let input = match rng.gen_range(0..100) {
            0..=39 => Input::Get,
            40..=64 => Input::Put { value },
            65..=74 => Input::Delete,
            _ => Input::Cas {
                // Mostly the version this worker last saw, sometimes a wrong guess.
                expected: if rng.gen_bool(0.8) {
                    seen.get(&key).copied().unwrap_or(0)
                } else {
                    rng.gen_range(0..1000)
                },
                value,
            },
        };
        let op = recorder.invoke(process, &key, input.clone());
        let call = async {
            match &input {
                Input::Get => classify_read(client.get(&key).await),
                Input::Put { value } => classify_write(client.put(&key, value).await),
                Input::Delete => classify_write(client.delete(&key).await),
                Input::Cas { expected, value } => {
                    classify_write(client.cas(&key, Seq(*expected), value).await)
                }
            }
        };
        let out = match tokio::time::timeout(CLIENT_HANG, call).await {
            Ok(out) => out,
            Err(_) => {
                hangs += 1;
                recorder.nemesis(&format!(
                    "client hang: op {op} of p{process} ran past {CLIENT_HANG:?}"
                ));
                Output::Unknown
            }
        };
        match &out {
            Output::Value { version, .. } | Output::Written { version } => {
                seen.insert(key.clone(), *version);
            }
            Output::Mismatch { current } => {
                seen.insert(key.clone(), *current);
            }
            Output::NotFound => {
                seen.insert(key.clone(), 0);
            }
            _ => {}
        }
        let unknown = out == Output::Unknown;
        recorder.complete(op, process, out);
        if unknown {
            // The old process may still have the op in flight: continue as a new one.
            process = processes.fetch_add(1, Ordering::Relaxed);
            client = new_client(&cfg, process, &config).await;
        }
    }
    hangs
}

async fn new_client(cfg: &RunConfig, process: u64, config: &ClientConfig) -> Client {
    Client::connect(format!("chaos-{}-p{process}", cfg.seed), config.clone())
        .await
        .expect("client config is valid")
}
