//! Frontend configuration: `config/frontend.toml`, overridden by command-line flags.
//!
//! Every key has a default (see [`Config::default`]) so a missing file at the default path
//! means "all defaults". [`Config::load`] parses with `deny_unknown_fields`, so a typo is
//! refused rather than silently ignored, and [`Config::validate`] checks ranges. Every error
//! names the file, the key and what was expected.
//!
//! Invariants after `validate()`:
//! - every timeout is > 0 and `failure_timeout_ms > heartbeat_ms` (a node that heartbeats on
//!   schedule is never declared down);
//! - `min_insync >= 1`, every bound (`batch_max`, `write_queue`, ...) is >= 1;
//! - listen addresses parse as `ip:port`.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;
use walkv_shared::transport::parse_addr;

/// Frame slack beyond the values themselves: JSON framing, keys and field names.
const FRAME_SLACK_BYTES: usize = 1 << 20;

/// Frontend settings. Field docs give the default.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address clients connect to (`Frontend` service). Default `127.0.0.1:7000`.
    pub client_listen: String,
    /// Address storage nodes register at (`Registry` service). Default `127.0.0.1:7001`.
    pub storage_listen: String,
    /// HTTP/JSON + WebSocket + `/metrics` + status page listen address; empty = off. Default `127.0.0.1:7080`.
    pub http_listen: String,
    /// Whether the HTTP door is served. Default true.
    pub http_enabled: bool,
    /// RESP (redis protocol, also inline text for `nc`) listen address; empty = off. Default `127.0.0.1:6380`.
    pub resp_listen: String,
    /// Whether the RESP door is served. Default true.
    pub resp_enabled: bool,
    /// Directory of the state file (`state.json`) and the `LOCK` file. Default `data/frontend`.
    pub data_dir: PathBuf,
    /// Shared secret that storage nodes present and the frontend presents to them. Default `walkv-dev-token`.
    pub cluster_token: String,
    /// Minimum in-sync set size for reads and writes to be served. Default 1.
    pub min_insync: u32,
    /// Deadline of every frontend → storage RPC, and of connecting to a node. Default 2000.
    pub rpc_timeout_ms: u64,
    /// Deadline of a client request inside the frontend (queueing, replication, read wait). Default 5000.
    pub request_timeout_ms: u64,
    /// Heartbeat period storage nodes are expected to use (informational). Default 200.
    pub heartbeat_ms: u64,
    /// A registered node with no heartbeat for this long is down and leaves the in-sync set. Default 1500.
    pub failure_timeout_ms: u64,
    /// Maximum records in one replicated batch. Default 1024.
    pub batch_max: u32,
    /// Capacity of the write queue in front of the sequencer; a full queue makes clients wait. Default 4096.
    pub write_queue: u32,
    /// Most batches replicating at once: batch n + 1 is sent before batch n is acknowledged, up to this many (1 = one at a time). Default 2.
    pub pipeline_depth: u32,
    /// Records (or snapshot keys) per catch-up page. Default 2000.
    pub catchup_page_max: u32,
    /// A catching-up node joins the in-sync set (under the write gate) once it is fewer than this many records behind. Default 1000.
    pub catchup_join_lag: u64,
    /// After the first in-sync member registers at start, how long to wait for the others. Default 1000.
    pub recovery_grace_ms: u64,
    /// Largest key in bytes. Default 1024.
    pub max_key_bytes: u32,
    /// Largest value in bytes. Default 1048576.
    pub max_value_bytes: u32,
    /// Maximum concurrent connections per listener. Default 1024.
    pub max_connections: u32,
    /// On shutdown, how long in-flight requests may take before they are aborted. Default 2000.
    pub shutdown_grace_ms: u64,
    /// Async runtime worker threads; 0 = one per core, 1 = the current-thread scheduler.
    /// Default 0.
    pub worker_threads: u32,
    /// Keep the CPUs awake this many µs after the frontend was last busy (see
    /// `walkv_shared::idle_poll`); 0 = off. Default 0.
    pub idle_poll_us: u64,
    /// NEGATIVE CONTROL, NEVER IN PRODUCTION: serve reads from any registered node
    /// (catching-up and stale ones included) without waiting for the commit index. This
    /// breaks linearizability on purpose so the chaos harness can prove its checker catches
    /// stale reads. Logs a loud warning at start. Default false.
    pub unsafe_read_any_node: bool,
    /// Command line only (`--unsafe-recover`): when no member of the last in-sync set can be
    /// reached, take the most up-to-date reachable node as the truth. Never read from a file.
    /// It applies to the first recovery of the process only (see
    /// `Cluster::disarm_unsafe_recover`).
    #[serde(skip)]
    pub unsafe_recover: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            client_listen: "127.0.0.1:7000".into(),
            storage_listen: "127.0.0.1:7001".into(),
            http_listen: "127.0.0.1:7080".into(),
            http_enabled: true,
            resp_listen: "127.0.0.1:6380".into(),
            resp_enabled: true,
            data_dir: PathBuf::from("data/frontend"),
            cluster_token: "walkv-dev-token".into(),
            min_insync: 1,
            rpc_timeout_ms: 2000,
            request_timeout_ms: 5000,
            heartbeat_ms: 200,
            failure_timeout_ms: 1500,
            batch_max: 1024,
            write_queue: 4096,
            pipeline_depth: 2,
            catchup_page_max: 2000,
            catchup_join_lag: 1000,
            recovery_grace_ms: 1000,
            max_key_bytes: 1024,
            max_value_bytes: 1_048_576,
            max_connections: 1024,
            shutdown_grace_ms: 2000,
            worker_threads: 0,
            idle_poll_us: 0,
            unsafe_read_any_node: false,
            unsafe_recover: false,
        }
    }
}

pub use walkv_shared::config::ConfigError;

impl Config {
    /// Reads and validates `path`. Unknown keys and wrong types are refused.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let config: Config = walkv_shared::config::read_toml(path)?;
        config
            .validate()
            .map_err(|e| ConfigError(format!("{}: {}", path.display(), e.0)))?;
        Ok(config)
    }

    /// Checks every value; the error names the key and the expectation.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, value) in [
            ("client_listen", &self.client_listen),
            ("storage_listen", &self.storage_listen),
        ] {
            parse_addr(key, value).map_err(ConfigError)?;
        }
        // An empty door address turns that door off.
        for (key, value) in [
            ("http_listen", &self.http_listen),
            ("resp_listen", &self.resp_listen),
        ] {
            if !value.is_empty() {
                parse_addr(key, value).map_err(ConfigError)?;
            }
        }
        let at_least_one = |key: &str, v: u64| {
            if v == 0 {
                Err(ConfigError(format!(
                    "{key}: expected an integer >= 1, got 0"
                )))
            } else {
                Ok(())
            }
        };
        at_least_one("min_insync", self.min_insync.into())?;
        at_least_one("rpc_timeout_ms", self.rpc_timeout_ms)?;
        at_least_one("request_timeout_ms", self.request_timeout_ms)?;
        at_least_one("heartbeat_ms", self.heartbeat_ms)?;
        at_least_one("batch_max", self.batch_max.into())?;
        at_least_one("write_queue", self.write_queue.into())?;
        at_least_one("pipeline_depth", self.pipeline_depth.into())?;
        at_least_one("catchup_page_max", self.catchup_page_max.into())?;
        at_least_one("catchup_join_lag", self.catchup_join_lag)?;
        at_least_one("max_key_bytes", self.max_key_bytes.into())?;
        at_least_one("max_value_bytes", self.max_value_bytes.into())?;
        at_least_one("max_connections", self.max_connections.into())?;
        if self.failure_timeout_ms <= self.heartbeat_ms {
            return Err(ConfigError(format!(
                "failure_timeout_ms: expected more than heartbeat_ms ({}), got {}",
                self.heartbeat_ms, self.failure_timeout_ms
            )));
        }
        walkv_shared::runtime::check_idle_poll_us(self.idle_poll_us)
            .map_err(|expected| ConfigError(format!("idle_poll_us: expected {expected}")))?;
        if self.cluster_token.is_empty() {
            return Err(ConfigError(
                "cluster_token: expected a non-empty string".into(),
            ));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError(
                "data_dir: expected a directory path, got an empty string".into(),
            ));
        }
        Ok(())
    }

    /// The HTTP door's address, or `None` when it is off.
    pub fn http_addr(&self) -> Option<&str> {
        (self.http_enabled && !self.http_listen.is_empty()).then_some(self.http_listen.as_str())
    }

    /// The RESP door's address, or `None` when it is off.
    pub fn resp_addr(&self) -> Option<&str> {
        (self.resp_enabled && !self.resp_listen.is_empty()).then_some(self.resp_listen.as_str())
    }

    /// `rpc_timeout_ms` as a duration.
    pub fn rpc_timeout(&self) -> Duration {
        Duration::from_millis(self.rpc_timeout_ms)
    }

    /// `request_timeout_ms` as a duration.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// `failure_timeout_ms` as a duration.
    pub fn failure_timeout(&self) -> Duration {
        Duration::from_millis(self.failure_timeout_ms)
    }

    /// `recovery_grace_ms` as a duration.
    pub fn recovery_grace(&self) -> Duration {
        Duration::from_millis(self.recovery_grace_ms)
    }

    /// `shutdown_grace_ms` as a duration.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    /// Largest client frame accepted: room for a write whose client id, key and value are
    /// at their limits and all control characters (JSON writes each in 6 bytes), plus slack,
    /// and never below a client's default frame limit. So a request within the limits always
    /// arrives, and an oversized value that a client sends reaches the server and gets a
    /// typed `TooLarge` instead of a dropped connection (the client refuses larger requests
    /// itself); anything beyond is a malformed frame and closes that connection only.
    pub fn client_max_frame(&self) -> usize {
        let strings = 2 * self.max_key_bytes as usize + self.max_value_bytes as usize;
        let needed = walkv_shared::rpc::JSON_ESCAPE_MAX * strings + FRAME_SLACK_BYTES;
        needed.max(walkv_shared::rpc::CLIENT_MAX_FRAME_DEFAULT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("frontend.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(&path)
    }

    #[test]
    fn the_quick_start_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/frontend.toml");
        let c = Config::load(&path).unwrap();
        assert_eq!((c.worker_threads, c.idle_poll_us), (1, 1000));
    }

    #[test]
    fn defaults_are_valid_and_round_trip() {
        let c = Config::default();
        c.validate().unwrap();
        let text = toml::to_string(&c).unwrap();
        assert_eq!(load_str(&text).unwrap(), c);
        assert_eq!(load_str("").unwrap(), c);
    }

    #[test]
    fn unknown_key_is_refused_naming_file_and_key() {
        let err = load_str("min_insynk = 2\n").unwrap_err().0;
        assert!(err.contains("frontend.toml"), "{err}");
        assert!(err.contains("min_insynk"), "{err}");
    }

    #[test]
    fn wrong_type_is_refused() {
        let err = load_str("min_insync = \"two\"\n").unwrap_err().0;
        assert!(err.contains("min_insync"), "{err}");
    }

    #[test]
    fn bad_values_are_refused_naming_key_and_expectation() {
        let err = load_str("min_insync = 0\n").unwrap_err().0;
        assert!(
            err.contains("frontend.toml") && err.contains("min_insync") && err.contains(">= 1"),
            "{err}"
        );
        let err = load_str("client_listen = \"nowhere\"\n").unwrap_err().0;
        assert!(
            err.contains("client_listen") && err.contains("ip:port"),
            "{err}"
        );
        let err = load_str("heartbeat_ms = 500\nfailure_timeout_ms = 400\n")
            .unwrap_err()
            .0;
        assert!(err.contains("failure_timeout_ms"), "{err}");
        let err = load_str("idle_poll_us = 100001\n").unwrap_err().0;
        assert!(
            err.contains("idle_poll_us") && err.contains("up to 100000"),
            "{err}"
        );
        assert_eq!(
            load_str("idle_poll_us = 100000\n").unwrap().idle_poll_us,
            100_000
        );
    }

    #[test]
    fn missing_file_is_refused() {
        let err = Config::load(Path::new("/nonexistent/frontend.toml"))
            .unwrap_err()
            .0;
        assert!(err.contains("/nonexistent/frontend.toml"), "{err}");
    }
}
