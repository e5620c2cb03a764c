//! In-process checks of the `Storage` RPC surface: `walkv_storage::run` on a port-0
//! listener, driven by a tarpc client over real TCP. Covers what the frontend relies on:
//! token check, read waits bounded by `min_seq`, fetch, truncate, and moving a node's
//! state to another node with `snapshot_page` + `install_snapshot` (equal digests).

use std::time::Duration;
use tarpc::client::Config as RpcConfig;
use walkv_shared::rpc::{AppendRequest, FetchReply, SnapshotChunk, StorageClient};
use walkv_shared::transport::{connect, context_with_timeout};
use walkv_shared::types::WriteOp;
use walkv_shared::{Epoch, KvError, Record, Seq};
use walkv_storage::Config;

const TOKEN: &str = "t";

fn ctx() -> tarpc::context::Context {
    context_with_timeout(Duration::from_secs(5))
}

struct Running {
    client: StorageClient,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), walkv_storage::RunError>>,
    _dir: tempfile::TempDir,
}

async fn start(snapshot_every: u64) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    // Nobody listens on the frontend address: registration only warns and retries.
    let frontend = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let config = Config {
        id: "n".into(),
        data_dir: Some(dir.path().join("data")),
        frontend,
        listen: addr.clone(),
        cluster_token: TOKEN.into(),
        snapshot_every,
        read_wait_ms: 200,
        ..Config::default()
    };
    config.validate("test").unwrap();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(walkv_storage::run(config, listener, async move {
        let _ = rx.await;
    }));
    let transport = connect(&addr, Duration::from_secs(5), 8 << 20)
        .await
        .unwrap();
    let client = StorageClient::new(RpcConfig::default(), transport).spawn();
    Running {
        client,
        stop,
        task,
        _dir: dir,
    }
}

fn put(seq: u64, key: &str) -> Record {
    Record {
        seq: Seq(seq),
        epoch: Epoch(1),
        client: format!("c{seq}"),
        op_no: 1,
        op: WriteOp::Put {
            key: key.into(),
            value: format!("v{seq}"),
        },
    }
}

async fn append(
    c: &StorageClient,
    records: Vec<Record>,
) -> Result<Vec<walkv_shared::types::Outcome>, KvError> {
    c.append(
        ctx(),
        TOKEN.into(),
        AppendRequest {
            epoch: Epoch(1),
            commit_seq: Seq(0),
            records: records.into(),
        },
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_surface() {
    let n = start(25).await;
    let c = &n.client;
    assert!(matches!(
        c.digest(ctx(), "wrong".into()).await.unwrap(),
        Err(KvError::Unauthorized(_))
    ));
    // The first batch crosses `snapshot_every` (a snapshot at 30), the second does not.
    append(
        c,
        (1..=30)
            .map(|i| put(i, &format!("k{:02}", i % 30)))
            .collect(),
    )
    .await
    .unwrap();
    append(
        c,
        (31..=50)
            .map(|i| put(i, &format!("k{:02}", i % 30)))
            .collect(),
    )
    .await
    .unwrap();
    // A read that needs a seq the node does not have waits, then is refused.
    let r = c
        .read(ctx(), TOKEN.into(), "k01".into(), Seq(51))
        .await
        .unwrap();
    assert!(matches!(r, Err(KvError::Unavailable(_))), "{r:?}");
    let r = c
        .read(ctx(), TOKEN.into(), "k01".into(), Seq(50))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.value.unwrap().version, Seq(31));
    let scan = c
        .scan(ctx(), TOKEN.into(), "k0".into(), 5, Seq(0))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(scan.items.len(), 5);
    // Wait for the background snapshot to be durable.
    let mut fetched = c
        .fetch(ctx(), TOKEN.into(), Seq(1), 10)
        .await
        .unwrap()
        .unwrap();
    for _ in 0..100 {
        if matches!(fetched, FetchReply::SnapshotNeeded { .. }) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        fetched = c
            .fetch(ctx(), TOKEN.into(), Seq(1), 10)
            .await
            .unwrap()
            .unwrap();
    }
    let FetchReply::SnapshotNeeded { snapshot_seq, .. } = fetched else {
        panic!("old records must need the snapshot: {fetched:?}")
    };
    assert_eq!(snapshot_seq, Seq(30));

    // Copy the snapshot to a second node page by page, then the records after it.
    let m = start(1000).await;
    let mut after = None;
    let mut first = true;
    loop {
        let page = c
            .snapshot_page(ctx(), TOKEN.into(), snapshot_seq, after.clone(), 7, None)
            .await
            .unwrap()
            .unwrap();
        after = page.items.last().map(|kv| kv.key.clone()).or(after);
        let chunk = SnapshotChunk {
            seq: page.seq,
            epoch: page.epoch,
            first,
            last: page.done,
            items: page.items,
            clients: page.clients,
        };
        first = false;
        m.client
            .install_snapshot(ctx(), TOKEN.into(), Epoch(1), chunk)
            .await
            .unwrap()
            .unwrap();
        if page.done {
            break;
        }
    }
    let FetchReply::Records(rest) = c
        .fetch(ctx(), TOKEN.into(), snapshot_seq.next(), 1000)
        .await
        .unwrap()
        .unwrap()
    else {
        panic!("records after the snapshot")
    };
    append(&m.client, rest).await.unwrap();
    let (d1, d2) = (
        c.digest(ctx(), TOKEN.into()).await.unwrap().unwrap(),
        m.client.digest(ctx(), TOKEN.into()).await.unwrap().unwrap(),
    );
    assert_eq!(
        d1, d2,
        "a snapshot transfer plus the tail reproduces the state"
    );

    // Truncate drops a divergent tail; fencing refuses an older epoch afterwards.
    let pos = m
        .client
        .truncate(ctx(), TOKEN.into(), Epoch(2), Seq(45))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pos.seq, Seq(45));
    assert_eq!(
        append(&m.client, vec![put(46, "x")]).await,
        Err(KvError::Fenced { seen: 2 })
    );

    for r in [n, m] {
        r.stop.send(()).unwrap();
        assert_eq!(r.task.await.unwrap(), Ok(()));
    }
}
