//! The watch feed through every door: a WebSocket client (tokio-tungstenite), the tarpc
//! long-poll of the Rust client, and `client watch`, live and resumed from a version, and
//! from the storage nodes' logs after a frontend restart.

use futures::{SinkExt, StreamExt};
use serde_json::Value;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;
use walkv_shared::Seq;
use walkv_tests::cluster::{ClusterOptions, TestCluster};
use walkv_tests::process::bin_path;
use walkv_tests::tools::run;

/// Longest wait for one WebSocket message.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(20);

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(cluster: &TestCluster, query: &str) -> Ws {
    let url = format!("ws://{}/v1/watch?{query}", cluster.http_addr);
    let (ws, _) = tokio::time::timeout(
        MESSAGE_TIMEOUT,
        tokio_tungstenite::connect_async(url.as_str()),
    )
    .await
    .expect("websocket connect in time")
    .unwrap_or_else(|e| panic!("websocket {url}: {e}"));
    ws
}

/// The next JSON text message.
async fn next_json(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(MESSAGE_TIMEOUT, ws.next())
            .await
            .expect("a watch message in time")
            .expect("the socket stays open")
            .expect("a well-formed frame");
        match msg {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("JSON message"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected message {other:?}"),
        }
    }
}

async fn take(ws: &mut Ws, n: usize) -> Vec<(String, Option<String>, u64, String)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let m = next_json(ws).await;
        assert!(m.get("error").is_none(), "unexpected error: {m}");
        out.push((
            m["key"].as_str().unwrap().to_string(),
            m["value"].as_str().map(str::to_string),
            m["version"].as_u64().unwrap(),
            m["op"].as_str().unwrap().to_string(),
        ));
    }
    out
}

/// Committed changes arrive in commit order over the WebSocket, filtered by prefix, live
/// and from a version; a resumed watch continues exactly where the last one stopped; the
/// tarpc long-poll and `client watch` see the same feed; after a frontend restart the same
/// history is served from the storage nodes' logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_watch_live_resume_and_history() {
    let mut cluster = TestCluster::start(ClusterOptions::default()).await;
    let mut c = cluster.client("watcher-test").await;
    let mut versions = Vec::new();
    for i in 1..=5 {
        versions.push(c.put(&format!("w/{i}"), &format!("v{i}")).await.unwrap().0);
        c.put(&format!("other/{i}"), "x").await.unwrap();
    }

    let mut ws = connect(&cluster, "prefix=w/&from=1").await;
    let first = take(&mut ws, 5).await;
    assert_eq!(first.iter().map(|c| c.2).collect::<Vec<_>>(), versions);
    assert!(first.iter().all(|c| c.3 == "put" && c.0.starts_with("w/")));
    assert_eq!(first[2].1.as_deref(), Some("v3"));

    // Live: new changes, including a delete, arrive while connected.
    let v6 = c.put("w/6", "v6").await.unwrap().0;
    c.put("other/6", "x").await.unwrap();
    let vdel = c.delete("w/1").await.unwrap().0;
    let live = take(&mut ws, 2).await;
    assert_eq!(live[0], ("w/6".into(), Some("v6".into()), v6, "put".into()));
    assert_eq!(live[1], ("w/1".into(), None, vdel, "delete".into()));
    ws.close(None).await.ok();

    // Resume after the last version seen: only what came later.
    let v7 = c.put("w/7", "v7").await.unwrap().0;
    let mut ws = connect(&cluster, &format!("prefix=w/&from={}", vdel + 1)).await;
    assert_eq!(take(&mut ws, 1).await[0].2, v7);
    ws.close(None).await.ok();

    // The tarpc long-poll sees the same feed.
    let all: Vec<u64> = first.iter().chain(&live).map(|c| c.2).chain([v7]).collect();
    let batch = c
        .watch("w/", Seq(1), 100, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(
        batch
            .changes
            .iter()
            .map(|c| c.version.0)
            .collect::<Vec<_>>(),
        all
    );
    assert_eq!(batch.next.0, batch.commit_seq.0 + 1);
    let empty = c
        .watch("w/", batch.next, 100, Duration::from_millis(200))
        .await
        .unwrap();
    assert!(
        empty.changes.is_empty() && empty.next == batch.next,
        "nothing new: {empty:?}"
    );

    // `client watch` prints one JSON line per change.
    let out = run(
        60,
        bin_path("client").to_str().unwrap(),
        &[
            "--id",
            "cli-watch",
            "--frontend",
            &cluster.client_addr,
            "--json",
            "watch",
            "w/",
            "--from",
            "1",
            "--count",
            "3",
        ],
        None,
    );
    assert_eq!(out.code, 0, "{out:?}");
    let lines: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines
            .iter()
            .map(|l| l["version"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        all[..3]
    );

    // After a frontend restart the ring is empty: history comes from the nodes' logs.
    cluster.restart_frontend(&[]);
    cluster.wait_in_sync(3).await;
    let mut ws = connect(&cluster, "prefix=w/&from=1").await;
    let replayed = take(&mut ws, all.len()).await;
    let expected: Vec<_> = first
        .iter()
        .chain(&live)
        .cloned()
        .chain([(
            "w/7".to_string(),
            Some("v7".to_string()),
            v7,
            "put".to_string(),
        )])
        .collect();
    assert_eq!(replayed, expected);
    // ...and it continues live.
    let v8 = c.put("w/8", "v8").await.unwrap().0;
    assert_eq!(take(&mut ws, 1).await[0].2, v8);

    // A bad `from` is refused before the upgrade.
    let url = format!("ws://{}/v1/watch?from=abc", cluster.http_addr);
    assert!(tokio_tungstenite::connect_async(url.as_str())
        .await
        .is_err());
    // Client frames beyond the limit close that session only.
    let mut ws = connect(&cluster, "prefix=w/").await;
    let _ = ws.send(Message::Text("x".repeat(1 << 20).into())).await;
    let mut ok = cluster.client("after-big-frame").await;
    ok.put("w/9", "v9").await.unwrap();
}

/// A watch from a version whose records were compacted into a snapshot gets a clear error
/// that says to resume from the current version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_from_compacted_history_says_where_to_resume() {
    let mut cluster = TestCluster::start(ClusterOptions {
        snapshot_every: 20,
        ..ClusterOptions::default()
    })
    .await;
    let mut c = cluster.client("compact").await;
    for i in 0..60 {
        c.put(&format!("k/{i}"), "v").await.unwrap();
    }
    cluster.restart_frontend(&[]);
    cluster.wait_in_sync(3).await;
    let mut ws = connect(&cluster, "prefix=k/&from=1").await;
    let m = next_json(&mut ws).await;
    assert_eq!(m["error"], "compacted", "{m}");
    let msg = m["message"].as_str().unwrap();
    assert!(
        msg.contains("resume") && msg.contains("current version"),
        "{msg}"
    );
    let current = m["current"].as_u64().unwrap();
    assert!(current >= 60, "{m}");
    let err = cluster
        .client("compact2")
        .await
        .watch("k/", Seq(1), 10, Duration::ZERO)
        .await;
    assert!(
        matches!(err, Err(walkv_shared::KvError::Compacted { .. })),
        "{err:?}"
    );
    // Resuming from the current version works.
    let mut ws = connect(&cluster, &format!("prefix=k/&from={current}")).await;
    let v = c.put("k/new", "v").await.unwrap().0;
    assert_eq!(take(&mut ws, 1).await[0].2, v);
}
