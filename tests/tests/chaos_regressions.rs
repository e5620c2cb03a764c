//! Regression drills for bugs the chaos runs found.
//!
//! 1. Seed 1115 (`make chaos SEED=1115 DURATION=3`): SIGSTOP of the frontend for 1.2 s
//!    under load. On SIGCONT every in-flight append had outlived its deadline, so every
//!    ISR node "failed" and the frontend re-ran recovery in place. Recovery compared the
//!    positions the nodes registered with (seq 0, long stale) against the confirmed ones
//!    and concluded "positions changed while deciding; deciding again" forever: the
//!    cluster never served again. Fixed by remembering the confirmed positions.
//!
//! Property: after a frontend pause longer than the RPC deadline, the cluster serves
//! writes again and all three nodes are back in sync.

use std::time::Duration;
use walkv_tests::cluster::{ClusterOptions, TestCluster};
use walkv_tests::load::{assert_acked_present, WriteLoad};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frontend_pause_longer_than_rpc_deadline_recovers() {
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    let load = WriteLoad::start(&cluster, "pause-", 6, 1_000_000).await;
    for _ in 0..5 {
        load.wait_progress(20).await;
        cluster.frontend.pause();
        // The pause must outlast rpc_timeout_ms (1000) so in-flight appends expire.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        cluster.frontend.resume();
    }
    // Bounded by CONVERGE_TIMEOUT: before the fix this never made progress.
    load.wait_progress(50).await;
    let report = load.stop().await;
    cluster.wait_in_sync(3).await;
    assert_acked_present(&cluster, &report).await;
    cluster.wait_converged().await;
}
