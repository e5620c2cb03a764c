//! Client settings: `config/client.toml`, overridable by flags.

use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Duration;

/// Client settings. Every field has a default; unknown keys are refused.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientConfig {
    /// Frontend client address (`--frontend`). Default `127.0.0.1:7000`.
    pub frontend: String,
    /// Deadline of one request attempt, in ms. Default 5000.
    pub request_timeout_ms: u64,
    /// How long to keep retrying a retryable failure, in ms. Default 15000.
    pub retry_deadline_ms: u64,
    /// TCP connect timeout, in ms. Default 2000.
    pub connect_timeout_ms: u64,
    /// Largest frame sent to or accepted from the frontend, in bytes. A request that could
    /// be larger is refused with `TooLarge` before sending. Default 16 MiB, which the
    /// frontend always accepts (so its own limits answer); raise it only with the frontend's.
    pub max_frame_bytes: u64,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            frontend: "127.0.0.1:7000".into(),
            request_timeout_ms: 5000,
            retry_deadline_ms: 15000,
            connect_timeout_ms: 2000,
            max_frame_bytes: walkv_shared::rpc::CLIENT_MAX_FRAME_DEFAULT as u64,
        }
    }
}

impl ClientConfig {
    /// Reads and validates a TOML file; errors name the file, the key and the expectation.
    pub fn load(path: &Path) -> Result<ClientConfig, String> {
        let config: ClientConfig = walkv_shared::config::read_toml(path).map_err(|e| e.0)?;
        config
            .validate()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(config)
    }

    /// Checks value ranges; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        walkv_shared::transport::parse_addr("frontend", &self.frontend)?;
        for (key, v) in [
            ("request_timeout_ms", self.request_timeout_ms),
            ("retry_deadline_ms", self.retry_deadline_ms),
            ("connect_timeout_ms", self.connect_timeout_ms),
        ] {
            if v == 0 || v > 3_600_000 {
                return Err(format!("{key}: expected 1..=3600000 milliseconds, got {v}"));
            }
        }
        if self.max_frame_bytes < 4096 {
            return Err(format!(
                "max_frame_bytes: expected at least 4096, got {}",
                self.max_frame_bytes
            ));
        }
        Ok(())
    }

    /// Per-attempt deadline.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
    /// Overall retry deadline.
    pub fn retry_deadline(&self) -> Duration {
        Duration::from_millis(self.retry_deadline_ms)
    }
    /// Connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_names_file_and_key() {
        let dir = std::env::temp_dir().join(format!("walkv-client-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("client.toml");
        std::fs::write(&path, "frontnd = \"127.0.0.1:1\"\n").unwrap();
        let err = ClientConfig::load(&path).unwrap_err();
        assert!(
            err.contains("client.toml") && err.contains("frontnd"),
            "{err}"
        );
        std::fs::write(&path, "request_timeout_ms = 0\n").unwrap();
        let err = ClientConfig::load(&path).unwrap_err();
        assert!(err.contains("request_timeout_ms"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
