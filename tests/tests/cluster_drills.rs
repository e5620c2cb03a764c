//! Restart drills over real processes (issue 3): SIGKILL, SIGSTOP and restarts of storage
//! nodes and the frontend, each ending with every acknowledged write readable and every
//! node holding the same content.

use walkv_shared::types::NodeRole;
use walkv_shared::KvError;
use walkv_tests::cluster::{ClusterOptions, TestCluster};
use walkv_tests::load::{assert_acked_present, WriteLoad};

fn role_of(s: &walkv_shared::types::ClusterStatus, id: &str) -> Option<NodeRole> {
    s.nodes.iter().find(|n| n.id.0 == id).map(|n| n.role)
}

/// Drill 1: a storage node killed under load catches up while writes continue; no
/// acknowledged write is lost and all nodes converge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill1_kill_and_restart_one_node_under_load() {
    let mut cluster = TestCluster::start(ClusterOptions::default()).await;
    let load = WriteLoad::start(&cluster, "d1-", 4, 100_000).await;
    load.wait_progress(200).await;
    cluster.nodes[1].process.kill();
    cluster
        .wait_status("s2 out of the ISR", |s| {
            role_of(s, "s2") != Some(NodeRole::InSync)
        })
        .await;
    load.wait_progress(500).await;
    cluster.nodes[1].process.restart();
    cluster.wait_in_sync(3).await;
    load.wait_progress(200).await;
    let report = load.stop().await;
    assert!(
        report.acked.len() > 900,
        "load ran: {} acked",
        report.acked.len()
    );
    assert_acked_present(&cluster, &report).await;
    cluster.wait_converged().await;
}

/// Drill 2: every storage node is killed; the stale one restarts first and must not serve;
/// once an up-to-date node is back, no acknowledged write is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill2_kill_all_restart_stale_node_first() {
    let mut cluster = TestCluster::start(ClusterOptions::default()).await;
    let mut client = cluster.client("d2").await;
    for i in 0..50 {
        client.put(&format!("early{i}"), "x").await.unwrap();
    }
    // s3 falls behind: it misses everything written after it dies.
    cluster.nodes[2].process.kill();
    cluster
        .wait_status("s3 out of the ISR", |s| {
            role_of(s, "s3") != Some(NodeRole::InSync)
        })
        .await;
    let mut acked = Vec::new();
    for i in 0..100 {
        let key = format!("late{i}");
        acked.push((key.clone(), client.put(&key, "y").await.unwrap()));
    }
    cluster.nodes[0].process.kill();
    cluster.nodes[1].process.kill();

    // The stale node alone must not serve reads or take writes.
    cluster.nodes[2].process.restart();
    let mut impatient = walkv_client::Client::connect(
        "d2-impatient",
        walkv_client::ClientConfig {
            retry_deadline_ms: 1500,
            ..cluster.client_config()
        },
    )
    .await
    .unwrap();
    match impatient.get("late99").await {
        Err(KvError::Unavailable(_)) | Err(KvError::Timeout(_)) => {}
        other => panic!("a stale node must not serve: got {other:?}"),
    }
    let status = cluster.status().await.expect("frontend answers status");
    assert!(
        !status.available,
        "cluster must be unavailable with only the stale node: {status:?}"
    );

    cluster.nodes[1].process.restart();
    cluster.nodes[0].process.restart();
    cluster.wait_in_sync(3).await;
    for (key, version) in &acked {
        assert_eq!(client.get(key).await.unwrap().version, *version, "{key}");
    }
    cluster.wait_converged().await;
}

/// Drill 3: ISR = {s1} after s2 died; a restarted frontend that can reach only s2 refuses
/// service with a clear reason; when s1 returns, every acknowledged write is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill3_frontend_refuses_when_only_non_isr_nodes_reachable() {
    let mut cluster = TestCluster::start(ClusterOptions {
        storage_nodes: 2,
        ..Default::default()
    })
    .await;
    let mut client = cluster.client("d3").await;
    client.put("before", "1").await.unwrap();
    cluster.nodes[1].process.kill();
    cluster
        .wait_status("s2 out of the ISR", |s| {
            role_of(s, "s2") != Some(NodeRole::InSync)
        })
        .await;
    let after = client.put("after", "2").await.unwrap();

    cluster.frontend.kill();
    cluster.nodes[0].process.kill();
    cluster.restart_frontend(&[]);
    cluster.nodes[1].process.restart();
    let status = cluster
        .wait_status("s2 registered with the restarted frontend", |s| {
            s.nodes
                .iter()
                .any(|n| n.id.0 == "s2" && n.role != NodeRole::Down)
        })
        .await;
    assert!(!status.available, "{status:?}");
    assert!(
        status.state.contains("s1"),
        "the reason names the missing in-sync node: {}",
        status.state
    );
    let mut impatient = walkv_client::Client::connect(
        "d3-impatient",
        walkv_client::ClientConfig {
            retry_deadline_ms: 1000,
            ..cluster.client_config()
        },
    )
    .await
    .unwrap();
    match impatient.get("after").await {
        Err(KvError::Unavailable(why)) => assert!(why.contains("s1"), "{why}"),
        other => panic!("expected Unavailable naming s1, got {other:?}"),
    }

    cluster.nodes[0].process.restart();
    cluster.wait_in_sync(2).await;
    assert_eq!(client.get("after").await.unwrap().version, after);
    assert_eq!(client.get("before").await.unwrap().value, "1");
    cluster.wait_converged().await;
}

/// Drill 4: the frontend is SIGKILLed mid-load and restarted; clients retry with the same
/// op numbers, so a cas counter counts each successful increment exactly once, no
/// acknowledged write is lost and no seq is reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill4_frontend_killed_mid_load() {
    let mut cluster = TestCluster::start(ClusterOptions::default()).await;
    let load = WriteLoad::start(&cluster, "d4-", 3, 100_000).await;
    let mut counter_client = cluster.client("d4-counter").await;
    counter_client.put("counter", "0").await.unwrap();
    let counter = tokio::spawn({
        let mut c = counter_client;
        async move {
            let (mut ok, mut unknown) = (0u64, 0u64);
            for _ in 0..300 {
                let cur = c.get("counter").await.expect("counter readable");
                let next = cur.value.parse::<u64>().unwrap() + 1;
                match c.cas("counter", cur.version, &next.to_string()).await {
                    Ok(_) => ok += 1,
                    Err(KvError::VersionMismatch { .. }) => {
                        panic!("single writer: a mismatch means a retry applied twice")
                    }
                    Err(KvError::Timeout(_)) => unknown += 1,
                    Err(e) => panic!("counter: {e}"),
                }
            }
            (ok, unknown)
        }
    });
    load.wait_progress(300).await;
    cluster.restart_frontend(&[]);
    cluster.wait_in_sync(3).await;
    load.wait_progress(300).await;
    let (ok, unknown) = counter.await.unwrap();
    let report = load.stop().await;
    assert_acked_present(&cluster, &report).await;
    let mut checker = cluster.client("d4-check").await;
    let value: u64 = checker.get("counter").await.unwrap().value.parse().unwrap();
    assert!(
        ok <= value && value <= ok + unknown,
        "counter {value}, {ok} acked increments, {unknown} unknown"
    );
    let status = cluster.status().await.unwrap();
    assert!(status.epoch.0 >= 2, "restart bumps the epoch");
    cluster.wait_converged().await;
}

/// Drill 5: a brand-new node joins a cluster holding more than one snapshot's worth of
/// data and catches up through snapshot + tail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill5_new_node_joins_via_snapshot() {
    let mut cluster = TestCluster::start(ClusterOptions {
        snapshot_every: 200,
        ..Default::default()
    })
    .await;
    let load = WriteLoad::start(&cluster, "d5-", 4, 300).await;
    let report = load.stop_when_done().await;
    assert_eq!(report.acked.len(), 1200);
    cluster.add_node("s4");
    cluster.wait_in_sync(4).await;
    let mut c = cluster.client("d5").await;
    c.put("after-join", "1").await.unwrap();
    assert_acked_present(&cluster, &report).await;
    let digest = cluster.wait_converged().await;
    assert_eq!(digest.keys, 1201);
}

/// Drill 6: a SIGSTOPped node leaves the ISR, never serves stale data, and rejoins after
/// SIGCONT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill6_paused_node_leaves_and_rejoins() {
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    let mut c = cluster.client("d6").await;
    c.put("k", "0").await.unwrap();
    cluster.nodes[0].process.pause();
    cluster
        .wait_status("s1 out of the ISR", |s| {
            role_of(s, "s1") != Some(NodeRole::InSync)
        })
        .await;
    for i in 1..=50 {
        let v = i.to_string();
        c.put("k", &v).await.unwrap();
        assert_eq!(
            c.get("k").await.unwrap().value,
            v,
            "reads never see the paused node's stale value"
        );
    }
    cluster.nodes[0].process.resume();
    cluster.wait_in_sync(3).await;
    for _ in 0..20 {
        assert_eq!(c.get("k").await.unwrap().value, "50");
    }
    cluster.wait_converged().await;
}
