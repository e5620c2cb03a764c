//! `client bench` against a real 3-node cluster: the JSON report has the promised fields
//! and a mixed run completes without errors. No timing is asserted (numbers belong in
//! benchmarks, never in tests).

use std::process::Command;
use walkv_tests::cluster::{ClusterOptions, TestCluster};
use walkv_tests::process::bin_path;

/// `client bench --ops N --json` runs N operations (half reads, over a preloaded key space)
/// with several clients sharing fewer connections, prints one JSON object with ops/s,
/// latency percentiles and error counts, reports 0 errors and exits 0; the writes land on
/// every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_json_report_has_the_fields_and_no_errors() {
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    let out = Command::new(bin_path("client"))
        .args([
            "--id",
            "bench",
            "--frontend",
            &cluster.client_addr,
            "--json",
        ])
        .args([
            "bench",
            "--clients",
            "8",
            "--connections",
            "3",
            "--ops",
            "400",
        ])
        .args(["--keys", "50", "--preload", "50", "--read-ratio", "0.5"])
        .args(["--value-size", "100"])
        .output()
        .expect("run client bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench failed: {:?}\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("bench --json must print one JSON object ({e}): {stdout}"));
    for field in [
        "ops_per_sec",
        "p50_us",
        "p90_us",
        "p99_us",
        "p999_us",
        "max_us",
        "errors",
    ] {
        assert!(
            report[field].is_u64(),
            "{field} missing or not a number: {report}"
        );
    }
    assert_eq!(report["ops"], 400, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(report["not_found"], 0, "every key was preloaded: {report}");
    assert!(report["reads"].as_u64().unwrap() > 0, "{report}");
    assert!(report["writes"].as_u64().unwrap() > 0, "{report}");
    let digest = cluster.wait_converged().await;
    assert_eq!(digest.keys, 50);
}
