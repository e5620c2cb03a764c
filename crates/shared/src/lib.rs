//! walkv-shared: the wire contract between walkv's three processes.
//!
//! walkv is a durable replicated key-value store: one **frontend** coordinates, any number
//! of **storage** nodes keep full copies in a JSON write-ahead log (WAL), and **clients**
//! talk only to the frontend. This crate holds only what those processes must agree on,
//! and no business logic or IO (compare tarpc's `example-service`):
//!
//! - [`types`]: newtypes (`Seq`, `Epoch`, `NodeId`) and the data carried by requests.
//! - [`record`]: the replicated log entry and its one-JSON-line-with-checksum encoding.
//! - [`json`]: JSON strings and integers written and measured as `serde_json` does, faster.
//! - [`error`]: `KvError`, the typed error every RPC returns.
//! - [`rpc`]: the three tarpc services: `Frontend` (client → frontend), `Registry`
//!   (storage → frontend) and `Storage` (frontend → storage).
//! - [`tagged`]: one-pass decoders for the internally tagged types (same JSON as the
//!   derives, without serde's buffering).
//! - [`conn`]: drives one server connection, flushing together the responses of requests
//!   that finish together.
//! - [`transport`]: connect/listen helpers with explicit frame limits and deadlines.
//! - [`telemetry`]: the tracing subscriber every `main` installs.
//! - [`shutdown`]: the SIGINT/SIGTERM future every `main` passes to `run`.
//! - [`runtime`]: the tokio runtime every server `main` builds (`worker_threads`).
//! - [`idle_poll`]: keeps the CPUs awake briefly after work (`idle_poll_us`).
//! - [`memory`]: turns transparent huge pages off for the process, first thing in `main`.
#![warn(missing_docs)]

pub mod config;
pub mod conn;
pub mod error;
pub mod idle_poll;
pub mod json;
pub mod memory;
pub mod record;
pub mod rpc;
pub mod runtime;
pub mod shutdown;
pub mod tagged;
pub mod telemetry;
pub mod transport;
pub mod types;

pub use error::KvError;
pub use record::{Op, Record};
pub use types::{Epoch, NodeId, Seq};
