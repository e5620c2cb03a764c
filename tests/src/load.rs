//! `WriteLoad`: background writers that remember what was acknowledged.
//!
//! Each worker has its own client id and puts unique keys (`<prefix><worker>-<n>`) until
//! stopped or until its op budget is spent. Every acknowledged write is recorded with its
//! version; writes whose outcome is unknown (`Timeout`) are recorded apart, so a check can
//! demand that acknowledged writes are present and tolerate either result for unknown ones.

use crate::cluster::TestCluster;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use walkv_shared::{KvError, Seq};

/// The result of a load run.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Acknowledged writes: (key, value, version).
    pub acked: Vec<(String, String, Seq)>,
    /// Writes with an unknown outcome: (key, value).
    pub unknown: Vec<(String, String)>,
    /// Writes refused as unavailable (nothing applied).
    pub unavailable: u64,
}

/// A running write load.
pub struct WriteLoad {
    stop: Arc<AtomicBool>,
    acked_count: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<LoadReport>>,
}

impl WriteLoad {
    /// Starts `workers` writers with keys under `prefix`, each doing at most `max_ops`.
    pub async fn start(
        cluster: &TestCluster,
        prefix: &str,
        workers: usize,
        max_ops: u64,
    ) -> WriteLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let acked_count = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for w in 0..workers {
            let mut client = cluster.client(&format!("{prefix}writer{w}")).await;
            let (stop, acked_count, prefix) =
                (stop.clone(), acked_count.clone(), prefix.to_string());
            tasks.push(tokio::spawn(async move {
                let mut report = LoadReport::default();
                for n in 0..max_ops {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let key = format!("{prefix}{w}-{n}");
                    let value = format!("v{w}-{n}");
                    match client.put(&key, &value).await {
                        Ok(version) => {
                            report.acked.push((key, value, version));
                            acked_count.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(KvError::Timeout(_)) => report.unknown.push((key, value)),
                        Err(KvError::Unavailable(_)) => report.unavailable += 1,
                        Err(e) => panic!("writer {w}: unexpected error {e}"),
                    }
                }
                report
            }));
        }
        WriteLoad {
            stop,
            acked_count,
            tasks,
        }
    }

    /// Writes acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.acked_count.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` more writes than now have been acknowledged (bounded).
    pub async fn wait_progress(&self, n: u64) {
        let target = self.acked() + n;
        let deadline = tokio::time::Instant::now() + crate::cluster::CONVERGE_TIMEOUT;
        while self.acked() < target {
            assert!(
                tokio::time::Instant::now() < deadline,
                "write load made no progress: {} acked, wanted {target}",
                self.acked()
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Waits for every writer to spend its op budget, then collects what they saw.
    pub async fn stop_when_done(self) -> LoadReport {
        self.collect().await
    }

    /// Stops the writers and collects what they saw.
    pub async fn stop(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        self.collect().await
    }

    async fn collect(self) -> LoadReport {
        let mut all = LoadReport::default();
        for t in self.tasks {
            let r = t.await.expect("writer task panicked");
            all.acked.extend(r.acked);
            all.unknown.extend(r.unknown);
            all.unavailable += r.unavailable;
        }
        all
    }
}

/// Asserts that every acknowledged write is readable with its value (or a newer version of
/// the same key, which these loads never write) and that versions were never reused.
pub async fn assert_acked_present(cluster: &TestCluster, report: &LoadReport) {
    let mut client = cluster.client("checker").await;
    let mut versions: Vec<u64> = report.acked.iter().map(|(_, _, v)| v.0).collect();
    versions.sort_unstable();
    let before = versions.len();
    versions.dedup();
    assert_eq!(
        before,
        versions.len(),
        "two acknowledged writes share a version (seq reused)"
    );
    for (key, value, version) in &report.acked {
        let got = client
            .get(key)
            .await
            .unwrap_or_else(|e| panic!("acknowledged write {key} lost: {e}"));
        assert_eq!(
            &got.value, value,
            "acknowledged write {key} has the wrong value"
        );
        assert_eq!(
            got.version, *version,
            "acknowledged write {key} has the wrong version"
        );
    }
}
