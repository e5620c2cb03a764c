//! Basic operations through a real 3-node cluster, from the library and from the CLI.

use std::process::Command;
use walkv_shared::{KvError, Seq};
use walkv_tests::cluster::{ClusterOptions, TestCluster};
use walkv_tests::process::bin_path;

/// put/get/delete/cas/scan from two clients see each other's writes, versions increase,
/// and all three nodes end with identical content. Servers on the current-thread scheduler
/// (`worker_threads = 1`, the quick-start setting and the harness default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_from_two_clients_and_nodes_converge() {
    operations_converge(ClusterOptions::default()).await;
}

/// The same with every server on a multi-threaded runtime (`worker_threads = 0`, one
/// worker per core: the built-in default for a server with a machine of its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_converge_on_multi_threaded_servers() {
    operations_converge(ClusterOptions {
        worker_threads: 0,
        ..ClusterOptions::default()
    })
    .await;
}

async fn operations_converge(options: ClusterOptions) {
    let cluster = TestCluster::start(options).await;
    let mut alice = cluster.client("alice").await;
    let mut bob = cluster.client("bob").await;

    let v1 = alice.put("fruit/apple", "red").await.unwrap();
    let got = bob.get("fruit/apple").await.unwrap();
    assert_eq!((got.value.as_str(), got.version), ("red", v1));

    let v2 = bob.put("fruit/banana", "yellow").await.unwrap();
    assert!(v2 > v1, "versions increase: {v1} then {v2}");

    // cas succeeds only on the current version.
    let v3 = alice.cas("fruit/apple", v1, "green").await.unwrap();
    match bob.cas("fruit/apple", v1, "blue").await {
        Err(KvError::VersionMismatch { current }) => assert_eq!(current, v3),
        other => panic!("stale cas must fail with VersionMismatch, got {other:?}"),
    }
    // cas with version 0 creates only when absent.
    alice.cas("fruit/cherry", Seq(0), "dark").await.unwrap();
    assert!(matches!(
        bob.cas("fruit/cherry", Seq(0), "x").await,
        Err(KvError::VersionMismatch { .. })
    ));

    bob.put("veg/leek", "green").await.unwrap();
    let scan = alice.scan("fruit/", 10).await.unwrap();
    let keys: Vec<&str> = scan.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["fruit/apple", "fruit/banana", "fruit/cherry"]);
    assert_eq!(
        alice.scan("fruit/", 2).await.unwrap().len(),
        2,
        "limit is honoured"
    );

    bob.delete("fruit/banana").await.unwrap();
    assert_eq!(alice.get("fruit/banana").await, Err(KvError::NotFound));
    assert_eq!(alice.delete("fruit/banana").await, Err(KvError::NotFound));

    let digest = cluster.wait_converged().await;
    assert_eq!(digest.keys, 3, "apple, cherry, leek remain");
}

fn client_cmd(cluster: &TestCluster, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin_path("client"))
        .args([
            "--id",
            "cli",
            "--frontend",
            &cluster.client_addr,
            "--timeout-ms",
            "5000",
        ])
        .args(args)
        .output()
        .expect("run client");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The CLI follows its contract: JSON output, exit code 1 for not found and version
/// mismatch, commands from stdin, and `status --json` with every node in sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_contract() {
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    let (code, out, err) = client_cmd(&cluster, &["--json", "put", "k", "v 1"]);
    assert_eq!(code, 0, "{err}");
    let put: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let version = put["version"].as_u64().expect("put prints a version");

    let (code, out, _) = client_cmd(&cluster, &["--json", "get", "k"]);
    assert_eq!(code, 0);
    let get: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(get["value"], "v 1");
    assert_eq!(get["version"].as_u64(), Some(version));

    assert_eq!(
        client_cmd(&cluster, &["get", "missing"]).0,
        1,
        "not found exits 1"
    );
    assert_eq!(
        client_cmd(&cluster, &["cas", "k", "999999", "x"]).0,
        1,
        "version mismatch exits 1"
    );
    assert_eq!(
        client_cmd(&cluster, &["frobnicate"]).0,
        2,
        "bad usage exits 2"
    );

    let (code, out, _) = client_cmd(&cluster, &["--json", "status"]);
    assert_eq!(code, 0);
    let status: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(status["epoch"].as_u64().unwrap() >= 1);
    assert!(status["commit_seq"].as_u64().unwrap() >= version);
    let nodes = status["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    assert!(nodes
        .iter()
        .all(|n| n["role"] == "in_sync" && n["id"].is_string() && n["addr"].is_string()));

    // Commands from stdin when stdin is not a terminal.
    let mut child = Command::new(bin_path("client"))
        .args(["--id", "piped", "--frontend", &cluster.client_addr])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"put a \"hello world\"\nget a\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.lines().any(|l| l == "hello world"),
        "stdout: {stdout}"
    );

    // Unavailable frontend: exit 2.
    let out = Command::new(bin_path("client"))
        .args([
            "--id",
            "x",
            "--frontend",
            "127.0.0.1:1",
            "--timeout-ms",
            "200",
            "get",
            "k",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// `client admin remove-node` retires a node for good: it leaves status and the ISR, the
/// cluster keeps serving, and the retired process is refused when it tries to come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_node_retires_it() {
    let mut cluster = TestCluster::start(ClusterOptions::default()).await;
    let (code, _, err) = client_cmd(&cluster, &["admin", "remove-node", "s3"]);
    assert_eq!(code, 0, "{err}");
    let status = cluster
        .wait_status("s3 gone from status", |s| {
            s.nodes.iter().all(|n| n.id.0 != "s3")
        })
        .await;
    assert_eq!(status.nodes.len(), 2);
    let mut c = cluster.client("after-remove").await;
    c.put("k", "v").await.unwrap();
    let exit = cluster.nodes[2]
        .process
        .wait_exit(std::time::Duration::from_secs(20))
        .expect("the retired node is refused at its next registration and exits");
    assert!(!exit.success(), "a retired node exits non-zero");
    assert!(
        cluster.nodes[2].process.log_tail(30).contains("removed"),
        "{}",
        cluster.nodes[2].process.log_tail(30)
    );
}
