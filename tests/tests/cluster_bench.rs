//! `client bench` against a real 3-node cluster: the JSON report has the promised fields
//! and a mixed run completes without errors. No timing is asserted (numbers belong in
//! benchmarks, never in tests).

use std::process::Command;
use std::time::Duration;
use walkv_shared::idle_poll::{policies_of_pollers, SCHED_IDLE};
use walkv_tests::cluster::{ClusterOptions, TestCluster};
use walkv_tests::process::{bin_path, wait_until, wait_until_async, NodeProcess, TestDir};

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

/// Every walkv process turns transparent huge pages off for itself as it starts
/// (`walkv_shared::memory`: memory mimalloc hands back and touches again can come back as a
/// 2 MiB page the kernel zeroes whole): the frontend, each storage node and a running
/// `client bench`. The kernel reports it as `THP_enabled: 0` in the process's status,
/// whatever the machine's setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_and_the_bench_run_without_transparent_huge_pages() {
    // Children inherit the flag: with THP already off for this test, they would pass
    // without turning it off themselves.
    assert_eq!(
        thp_enabled(std::process::id()),
        Some(true),
        "this kernel reports THP off for the test process itself, so the check would show nothing"
    );
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    assert_eq!(thp_enabled(cluster.frontend.pid()), Some(false), "frontend");
    for node in &cluster.nodes {
        assert_eq!(thp_enabled(node.process.pid()), Some(false), "{}", node.id);
    }
    // A bench that outlives the check; dropping it kills it.
    let dir = TestDir::new("thp-bench");
    let args = ["--id", "thp", "--frontend", &cluster.client_addr, "bench"]
        .into_iter()
        .chain(["--clients", "2", "--keys", "10", "--duration", "30"])
        .map(String::from)
        .collect::<Vec<_>>();
    let mut bench = NodeProcess::spawn("bench", &bin_path("client"), &args, dir.path());
    let pid = bench.pid();
    let off = wait_until_async(Duration::from_secs(10), || async move {
        thp_enabled(pid) == Some(false)
    })
    .await;
    bench.assert_alive();
    assert!(
        off,
        "client bench runs with THP: {:?}",
        thp_enabled(bench.pid())
    );
}

/// `THP_enabled` of process `pid`'s status (`None` if the kernel does not report it).
fn thp_enabled(pid: u32) -> Option<bool> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .map(|v| v.trim() != "0")
}

/// Policies of the `idle-poll` threads of process `pid`.
fn idle_pollers(pid: u32) -> Vec<u32> {
    policies_of_pollers(&pid.to_string()).expect("read the task list")
}

/// CPUs process `pid` may run on (`Cpus_allowed_list`, such as `0-1` or `0,2-3`).
fn allowed_cpus(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list in status")
        .trim();
    list.split(',')
        .map(|range| match range.split_once('-') {
            Some((a, b)) => b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1,
            None => 1,
        })
        .sum()
}

/// `idle_poll_us` in the frontend's and the storage nodes' configs starts one poller per
/// CPU in each of them, every one `SCHED_IDLE` (so it never takes a CPU from the servers'
/// own threads), and the cluster serves writes as usual; without the key no process has
/// pollers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_polling_runs_sched_idle_pollers_in_every_server_that_asks_for_it() {
    let polling = TestCluster::start(ClusterOptions {
        frontend_extra: "idle_poll_us = 500\n".into(),
        storage_extra: "idle_poll_us = 500\n".into(),
        ..ClusterOptions::default()
    })
    .await;
    let mut pids = vec![("frontend".to_string(), polling.frontend.pid())];
    pids.extend(
        polling
            .nodes
            .iter()
            .map(|n| (n.id.clone(), n.process.pid())),
    );
    for (name, pid) in &pids {
        // Each poller makes itself SCHED_IDLE as it starts.
        let cpus = allowed_cpus(*pid);
        wait_until(Duration::from_secs(10), || {
            let policies = idle_pollers(*pid);
            policies.len() == cpus && policies.iter().all(|&p| p == SCHED_IDLE)
        });
        let policies = idle_pollers(*pid);
        assert_eq!(
            policies.len(),
            cpus,
            "{name}: one poller per CPU, got {policies:?}"
        );
        assert!(
            policies.iter().all(|&p| p == SCHED_IDLE),
            "{name}: every poller is SCHED_IDLE, got policies {policies:?}"
        );
    }
    let mut client = polling.client("idle-poll").await;
    for i in 0..20 {
        client.put(&format!("k{i}"), "v").await.expect("put");
    }
    assert_eq!(polling.wait_converged().await.keys, 20);

    let plain = TestCluster::start(ClusterOptions::default()).await;
    assert!(idle_pollers(plain.frontend.pid()).is_empty());
    assert!(idle_pollers(plain.nodes[0].process.pid()).is_empty());
}
