//! Loading config files: the one place that turns a TOML file into a typed `Config`.
//!
//! Every binary's `Config` lives in its own crate (it knows its keys and defaults); what
//! they share is how a file is read and how a refusal reads: it always names the file, and
//! the TOML parser's message names the key and what was expected.

use std::fmt;
use std::path::Path;

/// A config that could not be loaded or is invalid; the message names file, key and
/// what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Reads and parses the TOML file at `path` (unknown keys are refused when `T` says
/// `deny_unknown_fields`). No validation: callers validate after applying flags.
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("{}: cannot read config file: {e}", path.display())))?;
    toml::from_str(&text)
        .map_err(|e| ConfigError(format!("{}: {}", path.display(), e.to_string().trim_end())))
}
