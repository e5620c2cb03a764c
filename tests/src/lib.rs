//! walkv-tests: the harness for integration tests over real processes.
//!
//! - [`process`]: one child process (spawn, SIGKILL, SIGTERM, SIGSTOP/SIGCONT, restart,
//!   logs), free ports, `wait_until`.
//! - [`cluster`]: a frontend plus N storage nodes in one temp dir (`TestCluster`).
//! - [`tools`]: running curl, redis-cli, nc, chromium with a time cap.
//! - [`load`]: background writers that record acknowledged writes, and the check that
//!   they all survived.
//! - [`chaos`]: randomized fault runs with a history checker (`make chaos`, `make soak`).
//!
//! The binaries come from `target/debug` (`make build`; `make test` builds them first).

pub mod chaos;
pub mod cluster;
pub mod load;
pub mod process;
pub mod tools;
