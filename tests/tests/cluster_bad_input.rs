//! Bad input and misconfiguration: limits answered with typed errors, garbage on every
//! port survived, wrong tokens and duplicate ids refused, data dirs locked, bad configs
//! refused at start with a message naming file and key.

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;
use walkv_shared::KvError;
use walkv_tests::cluster::{ClusterOptions, TestCluster, CONVERGE_TIMEOUT};
use walkv_tests::process::{bin_path, free_addr, wait_until_async, NodeProcess};

/// How long a process refusing to start may take to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

/// Oversized keys and values get `TooLarge`, an empty key `InvalidKey`, and the
/// connection stays usable. A value too large for the frontend's old frame limit (10 MB)
/// gets the frontend's typed answer too: the frontend closed the connection and the client
/// retried until it reported an unknown outcome. One too large for the client's own frame
/// limit is refused before sending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_typed_errors() {
    let cluster = TestCluster::start(ClusterOptions {
        storage_nodes: 1,
        ..Default::default()
    })
    .await;
    let mut c = cluster.client("limits").await;
    let big_key = "k".repeat(2048);
    assert!(matches!(
        c.put(&big_key, "v").await,
        Err(KvError::TooLarge { .. })
    ));
    let big_value = "v".repeat((1 << 20) + 10);
    match c.put("k", &big_value).await {
        Err(KvError::TooLarge { limit, .. }) => assert_eq!(limit, 1 << 20),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let huge_value = "v".repeat(10_000_000);
    match c.put("k", &huge_value).await {
        Err(KvError::TooLarge { what, limit }) => {
            assert_eq!((what.as_str(), limit), ("value", 1 << 20))
        }
        other => panic!("expected the frontend's TooLarge, got {other:?}"),
    }
    let beyond_the_client = "v".repeat(17 << 20);
    match c.put("k", &beyond_the_client).await {
        Err(KvError::TooLarge { what, limit }) => {
            assert!(what.contains("max_frame_bytes"), "{what}");
            assert_eq!(limit, 16 << 20);
        }
        other => panic!("expected the client's TooLarge, got {other:?}"),
    }
    assert!(matches!(c.put("", "v").await, Err(KvError::InvalidKey(_))));
    c.put("k", "fine").await.unwrap();
    assert_eq!(c.get("k").await.unwrap().value, "fine");
}

/// Values of control characters, which JSON writes in 6 bytes each, written at once: each
/// is within the limits, so each is accepted, and the batches they share fit the storage
/// nodes' frame limit (a too-large append made every node drop the connection, the frontend
/// start a recovery, and retries repeat it). Reads of them are answered in frames that fit
/// too, and a scan too large to send is refused. The in-sync set and the epoch never change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_that_escape_six_fold_replicate_without_a_recovery() {
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    cluster.wait_in_sync(3).await;
    let before = cluster.status().await.expect("status").epoch;
    let value: String = "\u{1}".repeat(1_000_000);
    let mut writers = tokio::task::JoinSet::new();
    for i in 0..4 {
        let mut c = cluster.client(&format!("escape{i}")).await;
        let value = value.clone();
        writers.spawn(async move { (i, c.put(&format!("ctl{i}"), &value).await) });
    }
    while let Some(done) = writers.join_next().await {
        let (i, put) = done.unwrap();
        assert!(put.is_ok(), "write {i}: {put:?}");
    }
    assert_undisturbed(&cluster, before, "the writes").await;
    let mut c = cluster.client("escape-read").await;
    for i in 0..4 {
        assert_eq!(c.get(&format!("ctl{i}")).await.unwrap().value, value);
    }
    // A scan whose answer the nodes could not send (4 x 6 MB as JSON) is refused with a
    // typed error instead of closing the node's connection; one key at a time works.
    match c.scan("ctl", 10).await {
        Err(KvError::TooLarge { what, .. }) => assert!(what.contains("fewer keys"), "{what}"),
        other => panic!("expected TooLarge, got {:?}", other.map(|v| v.len())),
    }
    let one = c.scan("ctl", 1).await.unwrap();
    assert_eq!((one.len(), one[0].value.len()), (1, value.len()));
    assert_undisturbed(&cluster, before, "the reads").await;
}

/// A node that missed writes of such values catches up from a snapshot in pages that fit
/// a frame. Pages were bounded by key count only (2,000): the source could not send a page
/// of six 6 MB values and closed the connection, which its appends share with the
/// catch-up, and the catch-up retried with halved pages until one fitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_escaped_values_catches_up_in_pages_that_fit() {
    let mut cluster = TestCluster::start(ClusterOptions {
        snapshot_every: 6,
        ..Default::default()
    })
    .await;
    cluster.nodes[2].process.kill();
    let mut c = cluster.client("snap-escape").await;
    let value: String = "\u{1}".repeat(1_000_000);
    for i in 0..6 {
        c.put(&format!("big{i}"), &value).await.unwrap();
    }
    // The sources must have compacted the records away, so that the catch-up copies a
    // snapshot instead of fetching records.
    for n in &cluster.nodes[..2] {
        let compacted = wait_until_async(CONVERGE_TIMEOUT, || async {
            n.process.log().contains("snapshot written")
        })
        .await;
        assert!(compacted, "{} wrote no snapshot", n.id);
    }
    let before = cluster.status().await.expect("status").epoch;
    let log = restart_third_node_copying_a_snapshot(&mut cluster).await;
    for trouble in ["catch-up attempt failed", "in-sync set shrank"] {
        assert!(
            !log.contains(trouble),
            "{trouble} during the catch-up:\n{log}"
        );
    }
    assert_undisturbed(&cluster, before, "the catch-up").await;
    let digest = cluster.wait_converged().await;
    assert_eq!(digest.keys, 6);
}

/// A catch-up copies a snapshot whose exactly-once table is larger than a storage node's
/// frame (8 MiB): client ids of 1000 control characters, six bytes each as JSON. The
/// table went whole on the first snapshot page, the source closed the connection on that
/// frame, and the catch-up failed on every attempt; now it comes in pages of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exactly_once_table_larger_than_a_frame_catches_up_in_pages() {
    use futures::stream::{self, StreamExt};
    use walkv_shared::rpc::FrontendClient;
    use walkv_shared::transport::{connect, context_with_timeout};
    use walkv_shared::types::{WriteOp, WriteRequest};

    // Snapshots come every max(500, keys / 2) records: the newest covers 1500 of them,
    // a 9 MB table.
    const CLIENTS: usize = 2400;
    let mut cluster = TestCluster::start(ClusterOptions {
        snapshot_every: 500,
        ..Default::default()
    })
    .await;
    cluster.nodes[2].process.kill();
    // One connection, a distinct client id per write (as HTTP clients naming themselves
    // with X-Walkv-Client would).
    let transport = connect(&cluster.client_addr, Duration::from_secs(5), 16 << 20)
        .await
        .expect("connect to the frontend");
    let rpc = FrontendClient::new(Default::default(), transport).spawn();
    let prefix = "\u{1}".repeat(1000);
    let written = stream::iter(0..CLIENTS)
        .map(|i| {
            let (rpc, client) = (rpc.clone(), format!("{prefix}{i}"));
            async move {
                let req = WriteRequest {
                    client,
                    op_no: 1,
                    op: WriteOp::Put {
                        key: format!("t{i}"),
                        value: "v".into(),
                    },
                };
                rpc.write(context_with_timeout(Duration::from_secs(10)), req)
                    .await
                    .expect("write rpc")
                    .expect("write")
            }
        })
        .buffer_unordered(32)
        .count()
        .await;
    assert_eq!(written, CLIENTS);
    // What a source will copy: its newest snapshot, whose header line holds the table.
    // Both sources must have written one whose table is over a frame.
    for n in &cluster.nodes[..2] {
        let large = wait_until_async(CONVERGE_TIMEOUT, || async {
            newest_snapshot_header_bytes(&n.data_dir) > 8 << 20
        })
        .await;
        assert!(
            large,
            "{} wrote no snapshot with a table over 8 MiB (newest header: {} bytes)",
            n.id,
            newest_snapshot_header_bytes(&n.data_dir)
        );
    }
    restart_third_node_copying_a_snapshot(&mut cluster).await;
    // The digest covers the exactly-once table: the restarted node has all of it.
    let digest = cluster.wait_converged().await;
    assert_eq!(digest.keys, CLIENTS as u64);
}

/// Restarts the third storage node, waits until all three are in sync, checks that the
/// catch-up copied a snapshot, and returns the frontend's log since the restart.
async fn restart_third_node_copying_a_snapshot(cluster: &mut TestCluster) -> String {
    let logged = cluster.frontend.log().len();
    cluster.nodes[2].process.restart();
    cluster.wait_in_sync(3).await;
    let log = cluster.frontend.log()[logged..].to_string();
    assert!(
        log.contains("copying snapshot"),
        "the catch-up did not copy a snapshot:\n{log}"
    );
    log
}

/// Length of the header line of the newest snapshot in `dir` (0 when there is none).
fn newest_snapshot_header_bytes(dir: &std::path::Path) -> usize {
    let newest = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with("snapshot-") && name.ends_with(".json")
        })
        .max();
    newest
        .and_then(|p| std::fs::File::open(p).ok())
        .and_then(|f| std::io::BufRead::lines(std::io::BufReader::new(f)).next())
        .and_then(|line| line.ok())
        .map_or(0, |line| line.len())
}

/// Every node still in sync and no recovery since `epoch`.
async fn assert_undisturbed(cluster: &TestCluster, epoch: walkv_shared::Epoch, after: &str) {
    let st = cluster.status().await.expect("status");
    assert_eq!(st.epoch, epoch, "a recovery ran after {after}: {st:?}");
    assert!(
        st.nodes
            .iter()
            .all(|n| n.role == walkv_shared::types::NodeRole::InSync),
        "a node left the in-sync set after {after}: {st:?}"
    );
}

fn send_garbage(addr: &str) {
    let payloads: [&[u8]; 4] = [
        b"\x00\x00\x00\x05hello",                         // a frame that is not JSON
        b"\xff\xff\xff\xff",                              // a length far beyond the limit
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",             // the wrong protocol
        b"\x00\x00\x00\x40{\"not\":\"a tarpc message\"}", // a short frame, then silence
    ];
    for p in payloads {
        if let Ok(mut s) = TcpStream::connect(addr) {
            let _ = s.write_all(p);
            // Half-open: keep some connections open without finishing the frame.
            std::mem::forget(s);
        }
    }
}

/// Garbage bytes and half-open connections on every listening port crash nothing and
/// do not disturb other clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_every_port() {
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    let mut c = cluster.client("garbage").await;
    c.put("before", "1").await.unwrap();
    send_garbage(&cluster.client_addr);
    send_garbage(&cluster.storage_listen);
    for n in &cluster.nodes {
        send_garbage(&n.addr);
    }
    for i in 0..20 {
        c.put(&format!("after{i}"), "2").await.unwrap();
    }
    assert_eq!(c.get("before").await.unwrap().value, "1");
    assert!(cluster.frontend.is_alive());
    assert!(cluster.nodes.iter().all(|n| n.process.is_alive()));
    cluster.wait_in_sync(3).await;
}

fn spawn_storage(
    cluster: &TestCluster,
    name: &str,
    id: &str,
    config_text: &str,
    data_dir: &std::path::Path,
) -> NodeProcess {
    let config = cluster.dir.path().join(format!("{name}.toml"));
    std::fs::write(&config, config_text).unwrap();
    let args: Vec<String> = [
        "--config",
        &config.display().to_string(),
        "--id",
        id,
        "--listen",
        &free_addr(),
        "--data-dir",
        &data_dir.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    NodeProcess::spawn(name, &bin_path("storage"), &args, cluster.dir.path())
}

/// A node with the wrong cluster token, a second node with a live node's id, and a second
/// process on a locked data dir are all refused with a clear message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals() {
    let cluster = TestCluster::start(ClusterOptions {
        storage_nodes: 1,
        ..Default::default()
    })
    .await;
    let good = format!(
        "frontend = \"{}\"\ncluster_token = \"test-token\"\n",
        cluster.storage_listen
    );

    let bad_token = format!(
        "frontend = \"{}\"\ncluster_token = \"wrong\"\n",
        cluster.storage_listen
    );
    let mut p = spawn_storage(
        &cluster,
        "badtoken",
        "s9",
        &bad_token,
        &cluster.dir.path().join("s9"),
    );
    let status = p
        .wait_exit(EXIT_TIMEOUT)
        .expect("wrong token: the node must exit");
    assert_eq!(status.code(), Some(1), "a refused registration exits 1");
    assert!(
        p.log_tail(20).to_lowercase().contains("token"),
        "{}",
        p.log_tail(20)
    );

    let mut p = spawn_storage(
        &cluster,
        "dupid",
        "s1",
        &good,
        &cluster.dir.path().join("s1-dup"),
    );
    let status = p
        .wait_exit(EXIT_TIMEOUT)
        .expect("duplicate live id: the node must exit");
    assert_eq!(status.code(), Some(1), "a refused registration exits 1");
    assert!(p.log_tail(20).contains("s1"), "{}", p.log_tail(20));

    let mut p = spawn_storage(&cluster, "samedir", "s7", &good, &cluster.nodes[0].data_dir);
    let status = p
        .wait_exit(EXIT_TIMEOUT)
        .expect("locked data dir: the node must exit");
    assert!(!status.success());
    assert!(
        p.log_tail(20).to_lowercase().contains("lock"),
        "{}",
        p.log_tail(20)
    );

    let frontend_config = cluster.dir.path().join("frontend.toml");
    let args: Vec<String> = [
        "--config",
        &frontend_config.display().to_string(),
        "--client-listen",
        &free_addr(),
        "--storage-listen",
        &free_addr(),
        "--http-listen",
        &free_addr(),
        "--resp-listen",
        &free_addr(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut p = NodeProcess::spawn(
        "frontend2",
        &bin_path("frontend"),
        &args,
        cluster.dir.path(),
    );
    let status = p
        .wait_exit(EXIT_TIMEOUT)
        .expect("second frontend on the same data dir must exit");
    assert!(!status.success());
    assert!(
        p.log_tail(20).to_lowercase().contains("lock"),
        "{}",
        p.log_tail(20)
    );

    // The cluster is unaffected.
    let mut c = cluster.client("after-refusals").await;
    c.put("k", "v").await.unwrap();
}

/// A config file with an unknown key or a bad value is refused at start, naming the file,
/// the key and what was expected, for both server binaries.
#[test]
fn bad_config_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("frontend", "min_insyncc = 1\n", "min_insyncc"),
        ("frontend", "min_insync = \"one\"\n", "min_insync"),
        ("storage", "snapshot_evry = 5\n", "snapshot_evry"),
        ("storage", "snapshot_every = -3\n", "snapshot_every"),
    ];
    for (i, (bin, text, key)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let data = dir.path().join(format!("data{i}"));
        let mut cmd = std::process::Command::new(bin_path(bin));
        cmd.arg("--config").arg(&path).arg("--data-dir").arg(&data);
        if *bin == "storage" {
            cmd.args(["--id", "x", "--listen", &free_addr()]);
        } else {
            cmd.args([
                "--client-listen",
                &free_addr(),
                "--storage-listen",
                &free_addr(),
            ]);
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bin} accepted {text:?}");
        assert!(
            stderr.contains(&format!("bad{i}.toml")) && stderr.contains(key),
            "{bin}: message must name file and key {key}: {stderr}"
        );
    }
}
