//! Storage node configuration.
//!
//! One TOML file per process (`config/storage.toml` by default, every key commented
//! there). Every field has a default from [`Config::default`]; CLI flags override the file
//! in `main`. [`Config::load`] refuses unknown keys and wrong types, and
//! [`Config::validate`] refuses values that parse but make no sense; both name the file,
//! the key and what was expected.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use walkv_shared::rpc::{BATCH_MAX_BYTES, JSON_ESCAPE_MAX};

/// Every setting of a storage node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Node id; normally given with `--id`. Default: empty (must be set by file or flag).
    pub id: String,
    /// Data directory (WAL segments, snapshots, epoch file, LOCK). Default: `data/<id>`.
    pub data_dir: Option<PathBuf>,
    /// Address of the frontend's storage (Registry) endpoint. Default: `127.0.0.1:7001`.
    pub frontend: String,
    /// Address this node listens on for the frontend. Default: `127.0.0.1:7101`.
    pub listen: String,
    /// Address the frontend should dial. Default: the same as `listen`.
    pub advertise: Option<String>,
    /// Address of the Prometheus `GET /metrics` endpoint; empty = off. Default: empty.
    pub metrics_listen: String,
    /// Shared secret every Storage/Registry call must carry. Default: `walkv-dev-token`.
    pub cluster_token: String,
    /// Fewest records between snapshots (and WAL trims); a snapshot also waits for half as
    /// many records as there are keys. Default: 100000.
    pub snapshot_every: u64,
    /// Most records written with one fsync (group commit batch). Default: 1024.
    pub wal_batch_max: u32,
    /// Interval between heartbeats to the frontend, in ms. Default: 200.
    pub heartbeat_ms: u64,
    /// Longest a read/scan waits for the node to apply `min_seq`, in ms. Default: 2000.
    pub read_wait_ms: u64,
    /// Largest key, in bytes. Default: 1024.
    pub max_key_bytes: u32,
    /// Largest value, in bytes. Default: 1048576 (1 MiB).
    pub max_value_bytes: u32,
    /// Largest RPC frame, in bytes. Default: 8388608 (8 MiB).
    pub max_frame_bytes: u32,
    /// Most concurrent RPC connections. Default: 256.
    pub max_connections: u32,
    /// How long shutdown waits for in-flight requests, in ms. Default: 2000.
    pub shutdown_grace_ms: u64,
    /// Async runtime worker threads (the WAL writer has its own thread); 0 = one per core,
    /// 1 = the current-thread scheduler.
    /// Default: 0.
    pub worker_threads: u32,
    /// Keep the CPUs awake this many µs after the node was last busy (see
    /// `walkv_shared::idle_poll`); 0 = off. Default: 0.
    pub idle_poll_us: u64,
    /// fsync every WAL batch. Default: true. `false` exists only for negative-control
    /// tests: acknowledged writes can then be lost on power failure.
    pub fsync: bool,
    /// At start, cut the WAL at the first corrupt record (keeping a `.corrupt-<time>` copy)
    /// instead of refusing to start; the lost tail comes back by catch-up. Default: false.
    pub discard_corrupt_tail: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            id: String::new(),
            data_dir: None,
            frontend: "127.0.0.1:7001".into(),
            listen: "127.0.0.1:7101".into(),
            metrics_listen: String::new(),
            advertise: None,
            cluster_token: "walkv-dev-token".into(),
            snapshot_every: 100_000,
            wal_batch_max: 1024,
            heartbeat_ms: 200,
            read_wait_ms: 2000,
            max_key_bytes: 1024,
            max_value_bytes: 1024 * 1024,
            max_frame_bytes: 8 * 1024 * 1024,
            max_connections: 256,
            worker_threads: 0,
            idle_poll_us: 0,
            shutdown_grace_ms: 2000,
            fsync: true,
            discard_corrupt_tail: false,
        }
    }
}

pub use walkv_shared::config::ConfigError;

impl Config {
    /// Reads and parses `path` (no validation: flags may still override fields).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        walkv_shared::config::read_toml(path)
    }

    /// Checks every value; `source` names where the config came from (file path or "defaults").
    pub fn validate(&self, source: &str) -> Result<(), ConfigError> {
        let bad = |key: &str, expected: &str| {
            Err(ConfigError(format!(
                "{source}: key `{key}`: expected {expected}"
            )))
        };
        if self.id.is_empty()
            || self.id.len() > 128
            || !self
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return bad(
                "id",
                "a non-empty name of at most 128 characters [A-Za-z0-9._-] (set --id)",
            );
        }
        for (key, value) in [
            ("listen", Some(&self.listen)),
            ("advertise", self.advertise.as_ref()),
            ("frontend", Some(&self.frontend)),
            (
                "metrics_listen",
                Some(&self.metrics_listen).filter(|m| !m.is_empty()),
            ),
        ] {
            if let Some(v) = value {
                if v.parse::<SocketAddr>().is_err() {
                    return bad(key, &format!("ip:port such as 127.0.0.1:7101, got {v:?}"));
                }
            }
        }
        if self.cluster_token.is_empty() {
            return bad("cluster_token", "a non-empty string");
        }
        let positive = [
            ("snapshot_every", self.snapshot_every),
            ("wal_batch_max", u64::from(self.wal_batch_max)),
            ("heartbeat_ms", self.heartbeat_ms),
            ("read_wait_ms", self.read_wait_ms),
            ("max_key_bytes", u64::from(self.max_key_bytes)),
            ("max_value_bytes", u64::from(self.max_value_bytes)),
            ("max_connections", u64::from(self.max_connections)),
        ];
        for (key, v) in positive {
            if v == 0 {
                return bad(key, "a positive integer, got 0");
            }
        }
        if let Err(expected) = walkv_shared::runtime::check_idle_poll_us(self.idle_poll_us) {
            return bad("idle_poll_us", &expected);
        }
        let needed = append_frame_needed(self.max_key_bytes, self.max_value_bytes);
        if u64::from(self.max_frame_bytes) < needed {
            return bad(
                "max_frame_bytes",
                &format!(
                    "at least {needed}, the largest append the frontend sends: a batch of \
                     {BATCH_MAX_BYTES} bytes plus one write whose client id, key and value are \
                     all control characters, which JSON writes {JSON_ESCAPE_MAX} bytes each \
                     ({BATCH_MAX_BYTES} + {JSON_ESCAPE_MAX} x (2 x max_key_bytes + max_value_bytes) \
                     + {FRAME_OVERHEAD_BYTES})"
                ),
            );
        }
        Ok(())
    }

    /// The data directory: `data_dir`, or `data/<id>`.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("data").join(&self.id))
    }

    /// The address to register with: `advertise`, or `listen`.
    pub fn advertise(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| self.listen.clone())
    }

    /// `heartbeat_ms` as a duration.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }

    /// `read_wait_ms` as a duration.
    pub fn read_wait(&self) -> Duration {
        Duration::from_millis(self.read_wait_ms)
    }

    /// `shutdown_grace_ms` as a duration.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
}

/// Room an append frame needs besides its records' strings (JSON framing, numbers).
pub const FRAME_OVERHEAD_BYTES: u64 = 4096;

/// The largest append frame a frontend with these limits sends: a full batch
/// ([`BATCH_MAX_BYTES`], closed once passed) plus one write whose client id (at most
/// `max_key_bytes`), key and value escape to [`JSON_ESCAPE_MAX`] bytes each.
pub fn append_frame_needed(max_key_bytes: u32, max_value_bytes: u32) -> u64 {
    let strings = 2 * u64::from(max_key_bytes) + u64::from(max_value_bytes);
    BATCH_MAX_BYTES as u64 + JSON_ESCAPE_MAX as u64 * strings + FRAME_OVERHEAD_BYTES
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quick_start_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/storage.toml");
        let c = Config {
            id: "s1".into(),
            ..Config::load(&path).unwrap()
        };
        c.validate("config/storage.toml").unwrap();
        assert_eq!((c.worker_threads, c.idle_poll_us), (1, 1000));
    }

    #[test]
    fn defaults_round_trip_and_validate() {
        let c = Config {
            id: "s1".into(),
            ..Config::default()
        };
        c.validate("defaults").unwrap();
        let text = toml::to_string(&c).unwrap();
        assert_eq!(toml::from_str::<Config>(&text).unwrap(), c);
        assert!(c.fsync, "fsync must be on by default");
    }

    #[test]
    fn the_frame_limit_must_hold_a_full_batch_of_escaped_writes() {
        // The defaults hold the worst case: 1 MiB of batch plus a write of 1 KiB client id,
        // 1 KiB key and 1 MiB value, all control characters.
        assert!(append_frame_needed(1024, 1 << 20) <= u64::from(Config::default().max_frame_bytes));
        // A 2 MiB value needs more than the default 8 MiB.
        let c = Config {
            id: "s1".into(),
            max_value_bytes: 2 << 20,
            ..Config::default()
        };
        let e = c.validate("f.toml").unwrap_err().0;
        let needed = append_frame_needed(1024, 2 << 20);
        assert!(needed > 8 << 20);
        assert!(
            e.contains("max_frame_bytes")
                && e.contains(&needed.to_string())
                && e.contains("control characters"),
            "{e}"
        );
        let c = Config {
            max_frame_bytes: needed as u32,
            ..c
        };
        c.validate("f.toml").unwrap();
    }

    #[test]
    fn unknown_key_and_bad_value_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(&path, "snapshot_evry = 5\n").unwrap();
        let e = Config::load(&path).unwrap_err().0;
        assert!(e.contains("s.toml") && e.contains("snapshot_evry"), "{e}");
        std::fs::write(&path, "snapshot_every = \"x\"\n").unwrap();
        let e = Config::load(&path).unwrap_err().0;
        assert!(e.contains("s.toml") && e.contains("snapshot_every"), "{e}");
        let c = Config {
            id: "s1".into(),
            listen: "nope".into(),
            ..Config::default()
        };
        let e = c.validate("f.toml").unwrap_err().0;
        assert!(
            e.contains("f.toml") && e.contains("`listen`") && e.contains("ip:port"),
            "{e}"
        );
        let c = Config {
            id: "s1".into(),
            idle_poll_us: 100_001,
            ..Config::default()
        };
        let e = c.validate("f.toml").unwrap_err().0;
        assert!(
            e.contains("`idle_poll_us`") && e.contains("up to 100000"),
            "{e}"
        );
    }
}
