//! Helpers shared by the `storage_*` scenarios: start a lone `storage` process (its
//! frontend does not exist, so it only logs registration warnings) and drive it as the
//! frontend would, with a tarpc `StorageClient`.
#![allow(dead_code)] // Each scenario file uses a different subset.

use std::path::{Path, PathBuf};
use std::time::Duration;
use tarpc::client::Config as RpcConfig;
use walkv_shared::rpc::{AppendRequest, StorageClient};
use walkv_shared::transport::{connect, context_with_timeout};
use walkv_shared::types::{LogPosition, Outcome, WriteOp};
use walkv_shared::{Epoch, KvError, Record, Seq};
use walkv_tests::process::{bin_path, free_addr, NodeProcess, POLL_INTERVAL};

/// Cluster token written into the test configs.
pub const TOKEN: &str = "storage-test-token";
/// Deadline of one RPC in these tests.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a node may take to start serving.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Frame limit of the test client.
pub const MAX_FRAME: usize = 8 * 1024 * 1024;

/// A storage process under test.
pub struct Node {
    pub process: NodeProcess,
    pub addr: String,
    pub data_dir: PathBuf,
}

/// Writes `<dir>/<name>.toml` and starts `storage` with it. The frontend address points at
/// a port nobody listens on.
pub fn spawn_node(
    dir: &Path,
    name: &str,
    data_dir: &Path,
    config_extra: &str,
    extra_args: &[&str],
) -> Node {
    let addr = free_addr();
    let config = dir.join(format!("{name}.toml"));
    let text = format!(
        "cluster_token = \"{TOKEN}\"\nfrontend = \"{}\"\nheartbeat_ms = 100\n{config_extra}\n",
        free_addr()
    );
    std::fs::write(&config, text).expect("write config");
    let mut args: Vec<String> = [
        "--config",
        &config.display().to_string(),
        "--id",
        name,
        "--listen",
        &addr,
        "--data-dir",
        &data_dir.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra_args.iter().map(|s| s.to_string()));
    let process = NodeProcess::spawn(name, &bin_path("storage"), &args, dir);
    Node {
        process,
        addr,
        data_dir: data_dir.to_path_buf(),
    }
}

/// Connects once.
pub async fn try_connect(addr: &str) -> Option<StorageClient> {
    let transport = connect(addr, Duration::from_secs(1), MAX_FRAME)
        .await
        .ok()?;
    Some(StorageClient::new(RpcConfig::default(), transport).spawn())
}

/// Waits until the node answers `identity`, panicking with its log if it dies.
pub async fn connect_ready(node: &mut Node) -> StorageClient {
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    loop {
        node.process.assert_alive();
        if let Some(c) = try_connect(&node.addr).await {
            if matches!(
                c.identity(context_with_timeout(Duration::from_secs(1)), TOKEN.into())
                    .await,
                Ok(Ok(_))
            ) {
                return c;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "storage node at {} not ready within {READY_TIMEOUT:?}:\n{}",
            node.addr,
            node.process.log_tail(20)
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// The record the tests write at `seq`: key `k<seq>`, value `v<seq>-<padding>`.
pub fn record(seq: u64, value_size: usize) -> Record {
    Record {
        seq: Seq(seq),
        epoch: Epoch(1),
        client: format!("c{}", seq % 7),
        op_no: seq,
        op: WriteOp::Put {
            key: format!("k{seq}"),
            value: value_for(seq, value_size),
        },
    }
}

/// The value written at `seq`.
pub fn value_for(seq: u64, value_size: usize) -> String {
    let mut v = format!("v{seq}-");
    v.extend(std::iter::repeat_n('x', value_size.saturating_sub(v.len())));
    v
}

/// One append RPC (epoch 1, commit 0); transport failures become `Unavailable`.
pub async fn append(client: &StorageClient, records: Vec<Record>) -> Result<Vec<Outcome>, KvError> {
    let req = AppendRequest {
        epoch: Epoch(1),
        commit_seq: Seq(0),
        records: records.into(),
    };
    client
        .append(context_with_timeout(RPC_TIMEOUT), TOKEN.into(), req)
        .await?
}

/// Where the node's log ends.
pub async fn position(client: &StorageClient) -> LogPosition {
    client
        .identity(context_with_timeout(RPC_TIMEOUT), TOKEN.into())
        .await
        .expect("identity rpc")
        .expect("identity")
        .pos
}

/// Runs `storage <args>` to completion: (exit code, stdout, stderr).
pub fn run_tool(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(bin_path("storage"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("run storage");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The WAL segments in `dir`, sorted.
pub fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read data dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("wal-") && n.ends_with(".log"))
        })
        .collect();
    v.sort();
    v
}
