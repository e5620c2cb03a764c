//! The chaos harness: randomized fault runs over a real cluster, checked for
//! linearizability, lost acknowledged writes, convergence and version order.
//!
//! - [`history`]: the JSON-lines history (invoke / ok / fail / info, nemesis events).
//! - [`checker`]: pure checkers over a history (Wing–Gong–Lowe per key, final reads,
//!   version invariants), unit tested with histories that must be rejected.
//! - [`nemesis`]: the seeded fault schedule; [`damage`]: WAL damage on a killed node.
//! - [`proxy`]: the fault-injecting TCP proxy between the frontend and each storage node.
//! - [`runner`]: one run end to end; [`soak`]: many seeds and their summary.
//!
//! Entry points: `tests/tests/chaos*.rs` (CI) and the `chaos` binary (`make chaos`,
//! `make soak`). Every run prints its seed; the same seed replays the same schedule.

pub mod checker;
pub mod damage;
pub mod history;
pub mod nemesis;
pub mod proxy;
pub mod runner;
pub mod soak;
