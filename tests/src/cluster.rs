//! `TestCluster`: a real walkv cluster (one frontend, N storage nodes) on 127.0.0.1.
//!
//! Every process runs from the debug binaries (`make build`), with its config written into
//! one `TempDir`, ports picked at start and kept for the cluster's lifetime so restarts
//! reuse them. Dropping the cluster kills every process (also on panic); its directory
//! is kept when `WALKV_KEEP_TMP=1`, and the log paths are printed when a test panics.

use crate::process::{bin_path, free_addr, NodeProcess};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tarpc::client::Config as RpcConfig;
use walkv_client::{Client, ClientConfig};
use walkv_shared::rpc::Digest;
use walkv_shared::rpc::StorageClient;
use walkv_shared::transport::{connect, context_with_timeout};
use walkv_shared::types::{ClusterStatus, NodeRole};

/// Cluster token written into every config of a test cluster.
pub const TOKEN: &str = "test-token";

/// How long a cluster may take to come up or converge before a test fails.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);

/// Knobs a scenario may turn.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Number of storage nodes.
    pub storage_nodes: usize,
    /// Records between snapshots on storage nodes.
    pub snapshot_every: u64,
    /// Frontend failure timeout (no heartbeat) in ms.
    pub failure_timeout_ms: u64,
    /// Frontend → storage RPC deadline in ms.
    pub rpc_timeout_ms: u64,
    /// Extra lines appended to frontend.toml.
    pub frontend_extra: String,
    /// Extra lines appended to every storage node's config.
    pub storage_extra: String,
    /// `worker_threads` of the frontend and every storage node. 1 (the quick-start setting)
    /// runs each server on tokio's current-thread scheduler, 0 on a worker per core.
    pub worker_threads: u32,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            storage_nodes: 3,
            snapshot_every: 100_000,
            failure_timeout_ms: 1000,
            rpc_timeout_ms: 1000,
            frontend_extra: String::new(),
            storage_extra: String::new(),
            worker_threads: 1,
        }
    }
}

/// A storage node of the cluster.
pub struct StorageNode {
    /// Node id (`s1`, `s2`, ...).
    pub id: String,
    /// Listen (= advertised) address.
    pub addr: String,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Prometheus `/metrics` address of the node (`metrics_listen`).
    pub metrics_addr: String,
    /// The process.
    pub process: NodeProcess,
    /// The `storage` arguments it runs with (to respawn it under a wrapper such as strace).
    pub args: Vec<String>,
}

/// A running cluster.
pub struct TestCluster {
    /// Temp dir with configs, data and logs.
    pub dir: tempfile::TempDir,
    /// Frontend client address.
    pub client_addr: String,
    /// Frontend storage (registry) address.
    pub storage_listen: String,
    /// Frontend HTTP door address (REST, WebSocket watch, /metrics, status page).
    pub http_addr: String,
    /// Frontend RESP (redis protocol) door address.
    pub resp_addr: String,
    /// The frontend process.
    pub frontend: NodeProcess,
    /// Storage nodes, index 0 is `s1`.
    pub nodes: Vec<StorageNode>,
    options: ClusterOptions,
    kept: bool,
}

impl TestCluster {
    /// Starts a frontend and `options.storage_nodes` storage nodes and waits until every
    /// node is in sync.
    pub async fn start(options: ClusterOptions) -> TestCluster {
        Self::start_with(options, |_, _| None).await
    }

    /// Like [`TestCluster::start`], but `advertise(id, listen)` may return the address a
    /// node advertises instead of its listen address (a proxy in front of it).
    pub async fn start_with(
        options: ClusterOptions,
        mut advertise: impl FnMut(&str, &str) -> Option<String>,
    ) -> TestCluster {
        let dir = tempfile::Builder::new()
            .prefix("walkv-test-")
            .tempdir()
            .expect("create temp dir");
        let client_addr = free_addr();
        let storage_listen = free_addr();
        let doors = [free_addr(), free_addr()];
        let frontend = Self::spawn_frontend(
            dir.path(),
            [&client_addr, &storage_listen, &doors[0], &doors[1]],
            &options,
            &[],
        );
        let [http_addr, resp_addr] = doors;
        let mut cluster = TestCluster {
            dir,
            client_addr,
            storage_listen,
            http_addr,
            resp_addr,
            frontend,
            nodes: Vec::new(),
            options: options.clone(),
            kept: false,
        };
        for i in 1..=options.storage_nodes {
            cluster.add_node_with(&format!("s{i}"), &mut advertise);
        }
        cluster.wait_in_sync(options.storage_nodes).await;
        cluster
    }

    /// Writes frontend.toml and starts the frontend; `addrs` are the client, storage, HTTP
    /// and RESP listen addresses (every door gets its own free port, so tests never
    /// collide on the default ports).
    fn spawn_frontend(
        dir: &Path,
        addrs: [&str; 4],
        options: &ClusterOptions,
        extra_args: &[&str],
    ) -> NodeProcess {
        let [client_addr, storage_listen, http_addr, resp_addr] = addrs;
        let config = dir.join("frontend.toml");
        let data = dir.join("frontend");
        std::fs::write(
            &config,
            format!(
                "client_listen = \"{client_addr}\"\nstorage_listen = \"{storage_listen}\"\n\
                 http_listen = \"{http_addr}\"\nresp_listen = \"{resp_addr}\"\n\
                 data_dir = \"{}\"\ncluster_token = \"{TOKEN}\"\nrpc_timeout_ms = {}\n\
                 failure_timeout_ms = {}\nrecovery_grace_ms = 300\nworker_threads = {}\n{}\n",
                data.display(),
                options.rpc_timeout_ms,
                options.failure_timeout_ms,
                options.worker_threads,
                options.frontend_extra
            ),
        )
        .expect("write frontend.toml");
        let mut args = vec!["--config".to_string(), config.display().to_string()];
        args.extend(extra_args.iter().map(|s| s.to_string()));
        NodeProcess::spawn("frontend", &bin_path("frontend"), &args, dir)
    }

    /// Adds (and starts) a storage node with a new id.
    pub fn add_node(&mut self, id: &str) -> usize {
        self.add_node_with(id, |_, _| None)
    }

    /// Adds (and starts) a storage node; `advertise(id, listen)` may name the address it
    /// registers with (`--advertise`).
    pub fn add_node_with(
        &mut self,
        id: &str,
        mut advertise: impl FnMut(&str, &str) -> Option<String>,
    ) -> usize {
        let addr = free_addr();
        let metrics_addr = free_addr();
        let data_dir = self.dir.path().join(id);
        let config = self.dir.path().join(format!("{id}.toml"));
        std::fs::write(
            &config,
            format!(
                "frontend = \"{}\"\ncluster_token = \"{TOKEN}\"\nsnapshot_every = {}\nheartbeat_ms = 100\n\
                 metrics_listen = \"{metrics_addr}\"\nworker_threads = {}\n{}\n",
                self.storage_listen,
                self.options.snapshot_every,
                self.options.worker_threads,
                self.options.storage_extra
            ),
        )
        .expect("write storage config");
        let mut args = vec![
            "--config".to_string(),
            config.display().to_string(),
            "--id".into(),
            id.into(),
            "--listen".into(),
            addr.clone(),
            "--data-dir".into(),
            data_dir.display().to_string(),
        ];
        if let Some(adv) = advertise(id, &addr) {
            args.extend(["--advertise".to_string(), adv]);
        }
        let process = NodeProcess::spawn(id, &bin_path("storage"), &args, self.dir.path());
        self.nodes.push(StorageNode {
            id: id.to_string(),
            addr,
            data_dir,
            metrics_addr,
            process,
            args,
        });
        self.nodes.len() - 1
    }

    /// Kills the frontend with SIGKILL and starts it again with the same config.
    pub fn restart_frontend(&mut self, extra_args: &[&str]) {
        self.frontend.kill();
        self.frontend = Self::spawn_frontend(
            self.dir.path(),
            [
                &self.client_addr,
                &self.storage_listen,
                &self.http_addr,
                &self.resp_addr,
            ],
            &self.options,
            extra_args,
        );
    }

    /// A client config pointing at this cluster, with a bounded retry deadline.
    pub fn client_config(&self) -> ClientConfig {
        ClientConfig {
            frontend: self.client_addr.clone(),
            request_timeout_ms: 3000,
            retry_deadline_ms: 20_000,
            ..ClientConfig::default()
        }
    }

    /// A client with id `id`.
    pub async fn client(&self, id: &str) -> Client {
        Client::connect(id, self.client_config())
            .await
            .expect("client config is valid")
    }

    /// The frontend's status, or `None` when it does not answer.
    pub async fn status(&self) -> Option<ClusterStatus> {
        let mut c = Client::connect(
            "status-probe",
            ClientConfig {
                retry_deadline_ms: 1,
                ..self.client_config()
            },
        )
        .await
        .ok()?;
        c.status().await.ok()
    }

    /// Waits until at least `n` nodes are in sync and the cluster is available; panics
    /// with the process logs otherwise.
    pub async fn wait_in_sync(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + CONVERGE_TIMEOUT;
        loop {
            if let Some(s) = self.status().await {
                if s.available
                    && s.nodes
                        .iter()
                        .filter(|x| x.role == NodeRole::InSync)
                        .count()
                        >= n
                {
                    return;
                }
            }
            if tokio::time::Instant::now() > deadline {
                self.dump_logs();
                panic!(
                    "cluster did not reach {n} in-sync nodes within {CONVERGE_TIMEOUT:?}: {:?}",
                    self.status().await
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `pred(status)` holds.
    pub async fn wait_status(
        &self,
        what: &str,
        pred: impl Fn(&ClusterStatus) -> bool,
    ) -> ClusterStatus {
        let deadline = tokio::time::Instant::now() + CONVERGE_TIMEOUT;
        loop {
            if let Some(s) = self.status().await {
                if pred(&s) {
                    return s;
                }
            }
            if tokio::time::Instant::now() > deadline {
                self.dump_logs();
                panic!(
                    "timed out waiting for {what}: last status {:?}",
                    self.status().await
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The digest of node `i`'s content, asked over the `Storage` RPC.
    pub async fn digest(&self, i: usize) -> Result<Digest, String> {
        let transport = connect(&self.nodes[i].addr, Duration::from_secs(2), 64 << 20)
            .await
            .map_err(|e| e.to_string())?;
        let client = StorageClient::new(RpcConfig::default(), transport).spawn();
        client
            .digest(
                context_with_timeout(Duration::from_secs(10)),
                TOKEN.to_string(),
            )
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    /// Waits until every live node reports the same digest at the frontend's commit seq;
    /// returns it.
    pub async fn wait_converged(&self) -> Digest {
        let deadline = tokio::time::Instant::now() + CONVERGE_TIMEOUT;
        let mut last = Vec::new();
        loop {
            let mut digests = Vec::new();
            for i in 0..self.nodes.len() {
                digests.push(self.digest(i).await);
            }
            if let Ok(first) = &digests[0] {
                if digests.iter().all(|d| d.as_ref().ok() == Some(first)) {
                    return first.clone();
                }
            }
            if tokio::time::Instant::now() > deadline {
                self.dump_logs();
                panic!("nodes did not converge: {digests:?} (previous {last:?})");
            }
            last = digests;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Keeps the cluster directory after the cluster is dropped; returns its path.
    pub fn keep_dir(&mut self) -> PathBuf {
        let path = self.dir.path().to_path_buf();
        if !self.kept {
            let old = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir"));
            let _ = old.keep();
            self.kept = true;
        }
        path
    }

    /// Prints where every process's log is and its tail.
    pub fn dump_logs(&self) {
        eprintln!(
            "--- cluster dir {} (set WALKV_KEEP_TMP=1 to keep it)",
            self.dir.path().display()
        );
        eprintln!(
            "--- frontend log {}:\n{}",
            self.frontend.log_path().display(),
            self.frontend.log_tail(40)
        );
        for n in &self.nodes {
            eprintln!(
                "--- {} log {}:\n{}",
                n.id,
                n.process.log_path().display(),
                n.process.log_tail(25)
            );
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        if std::env::var_os("WALKV_KEEP_TMP").is_some() && !self.kept {
            let path =
                std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir")).keep();
            eprintln!("kept cluster dir {}", path.display());
        }
    }
}
