//! walkv-tests: the harness for integration tests over real processes.
//!
//! - [`process`]: one child process (spawn, SIGKILL, SIGTERM, SIGSTOP/SIGCONT, restart,
//!   logs), free ports, `wait_until`.
//!
//! The binaries come from `target/debug` (`make build`; `make test` builds them first).

pub mod process;
