//! Tracing setup. Only `main` functions call [`init`].

use tracing_subscriber::EnvFilter;

/// Installs a stderr subscriber filtered by `RUST_LOG` (default `info`).
pub fn init() {
    init_with_default("info");
}

/// tarpc opens an INFO span for every request and response, and the fmt layer formats
/// its fields (trace id, an RFC 3339 deadline) eagerly: about a fifth of the frontend's
/// CPU on the write path. Its warnings still come through.
const QUIET_PER_REQUEST_SPANS: &str = "tarpc=warn";

/// Like [`init`] with another default level (the CLI client uses `warn`, so its
/// stderr carries only what a user must see).
pub fn init_with_default(level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{level},{QUIET_PER_REQUEST_SPANS}")));
    // A second init (tests running several nodes in-process) is harmless, so ignore it.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        // Colour codes only on a terminal: log files must stay greppable.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
