//! The nemesis: a seeded schedule of faults (pure) and the code that applies them to a
//! [`TestCluster`](crate::cluster::TestCluster) and its proxies.
//!
//! [`schedule`] turns `(seed, duration)` into a list of [`Step`]s: a quiet start, then
//! faults one at a time, each held for a while and then healed, with quiet gaps between.
//! The same seed always gives the same schedule (the run prints it), so a failure can be
//! replayed; the operations interleave differently each time, as on a real machine.
//!
//! Faults never exceed what the guarantees cover: destructive storage faults (torn tail,
//! bit flip, wiped data dir) hit one node, and only while all three are in sync (§3.1: an
//! acknowledged write survives while one in-sync node keeps its disk); the runner skips
//! them otherwise. Disk errors (`DiskError`) need `strace`; without it they are skipped
//! (counted as `skipped_fsync_*`), so a seed's schedule does not depend on the machine.

use super::proxy::Mode;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::fmt;

/// Quiet time before the first fault, in ms (workers warm up).
const FIRST_FAULT_MS: u64 = 300;
/// Shortest and longest time a fault is held, in ms.
const HOLD_MS: (u64, u64) = (300, 1500);
/// Shortest and longest quiet gap between faults, in ms.
const GAP_MS: (u64, u64) = (200, 800);

/// One fault. Node indexes are 0-based (`0` is `s1`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL these storage nodes; restart them at heal.
    KillStorage(Vec<usize>),
    /// SIGKILL the frontend; restart it at heal.
    KillFrontend,
    /// SIGSTOP these storage nodes; SIGCONT at heal.
    PauseStorage(Vec<usize>),
    /// SIGSTOP the frontend; SIGCONT at heal.
    PauseFrontend,
    /// Set the proxy in front of a node to a mode; `Pass` at heal.
    Proxy(usize, Mode),
    /// Kill a node, append half a record to its WAL (a torn write), restart it.
    TornTail(usize),
    /// Kill a node, flip a bit in the middle of its WAL, restart it (it discards the
    /// corrupt tail and catches up).
    BitFlip(usize),
    /// Kill a node, delete its data dir's contents, restart it (it catches up from empty).
    WipeData(usize),
    /// Restart a node under `strace` so that its `after`-th and later `fdatasync` calls
    /// fail with `errno` (EIO or ENOSPC); it must stop. At heal it restarts without strace.
    DiskError {
        /// The node.
        node: usize,
        /// `EIO` or `ENOSPC`.
        errno: &'static str,
        /// First failing `fdatasync` call.
        after: u32,
    },
}

impl Fault {
    /// A short name for counting faults by kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::KillStorage(n) if n.len() == 1 => "kill_storage_one",
            Fault::KillStorage(n) if n.len() == 3 => "kill_storage_all",
            Fault::KillStorage(_) => "kill_storage_some",
            Fault::KillFrontend => "kill_frontend",
            Fault::PauseStorage(_) => "pause_storage",
            Fault::PauseFrontend => "pause_frontend",
            Fault::Proxy(_, Mode::Blackhole) => "proxy_blackhole",
            Fault::Proxy(_, Mode::DropReplies) => "proxy_drop_replies",
            Fault::Proxy(_, Mode::Delay(_)) => "proxy_delay",
            Fault::Proxy(_, Mode::Bandwidth(_)) => "proxy_bandwidth",
            Fault::Proxy(_, Mode::Pass) => "proxy_pass",
            Fault::TornTail(_) => "torn_tail",
            Fault::BitFlip(_) => "bit_flip",
            Fault::WipeData(_) => "wipe_data",
            Fault::DiskError { errno: "EIO", .. } => "fsync_eio",
            Fault::DiskError { .. } => "fsync_enospc",
        }
    }

    /// Whether the fault destroys data on a node (needs every node in sync first).
    pub fn destructive(&self) -> bool {
        matches!(
            self,
            Fault::TornTail(_) | Fault::BitFlip(_) | Fault::WipeData(_)
        )
    }
}

fn names(nodes: &[usize]) -> String {
    nodes
        .iter()
        .map(|i| format!("s{}", i + 1))
        .collect::<Vec<_>>()
        .join(",")
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::KillStorage(n) => write!(f, "kill -9 {}", names(n)),
            Fault::KillFrontend => write!(f, "kill -9 frontend"),
            Fault::PauseStorage(n) => write!(f, "SIGSTOP {}", names(n)),
            Fault::PauseFrontend => write!(f, "SIGSTOP frontend"),
            Fault::Proxy(i, m) => write!(f, "proxy s{} {m:?}", i + 1),
            Fault::TornTail(i) => write!(f, "torn WAL tail on s{}", i + 1),
            Fault::BitFlip(i) => write!(f, "bit flip mid-WAL on s{}", i + 1),
            Fault::WipeData(i) => write!(f, "wipe data dir of s{}", i + 1),
            Fault::DiskError { node, errno, after } => write!(
                f,
                "s{} under strace: fdatasync fails with {errno} from call {after} on",
                node + 1
            ),
        }
    }
}

/// One scheduled fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// When to inject, ms after the workers start.
    pub at_ms: u64,
    /// What to inject.
    pub fault: Fault,
    /// How long to hold it before healing, ms.
    pub hold_ms: u64,
}

/// Which fault families a schedule may draw from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultMix {
    /// SIGKILL / SIGSTOP of storage nodes and the frontend.
    pub process: bool,
    /// Proxy faults between the frontend and one node.
    pub network: bool,
    /// Torn tails, bit flips, wiped data dirs.
    pub storage: bool,
}

impl FaultMix {
    /// Every family.
    pub const ALL: FaultMix = FaultMix {
        process: true,
        network: true,
        storage: true,
    };
}

fn random_fault(rng: &mut StdRng, mix: FaultMix) -> Fault {
    let mut families = Vec::new();
    if mix.process {
        families.extend([0, 0, 0]);
    }
    if mix.network {
        families.extend([1, 1]);
    }
    if mix.storage {
        families.push(2);
    }
    let node = rng.gen_range(0..3);
    match families[rng.gen_range(0..families.len())] {
        0 => match rng.gen_range(0..6) {
            0 | 1 => Fault::KillStorage(vec![node]),
            2 => {
                let other = (node + rng.gen_range(1..3)) % 3;
                let mut v = vec![node, other];
                v.sort_unstable();
                Fault::KillStorage(v)
            }
            3 => {
                if rng.gen_bool(0.5) {
                    Fault::KillStorage(vec![0, 1, 2])
                } else {
                    Fault::KillFrontend
                }
            }
            4 => Fault::PauseStorage(vec![node]),
            _ => Fault::PauseFrontend,
        },
        1 => Fault::Proxy(
            node,
            match rng.gen_range(0..4) {
                0 => Mode::Blackhole,
                1 => Mode::DropReplies,
                2 => Mode::Delay(rng.gen_range(5..200)),
                _ => Mode::Bandwidth(rng.gen_range(2_000..50_000)),
            },
        ),
        _ => match rng.gen_range(0..4) {
            0 => Fault::TornTail(node),
            1 => Fault::BitFlip(node),
            2 => Fault::WipeData(node),
            _ => Fault::DiskError {
                node,
                errno: if rng.gen_bool(0.5) { "EIO" } else { "ENOSPC" },
                after: rng.gen_range(1..40),
            },
        },
    }
}

/// The schedule for `seed`: faults from `mix`, all healed by `duration_ms`.
pub fn schedule(seed: u64, duration_ms: u64, mix: FaultMix) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut steps = Vec::new();
    if !(mix.process || mix.network || mix.storage) {
        return steps;
    }
    let mut t = FIRST_FAULT_MS;
    loop {
        let hold_ms = rng.gen_range(HOLD_MS.0..=HOLD_MS.1);
        if t + hold_ms > duration_ms {
            return steps;
        }
        let fault = random_fault(&mut rng, mix);
        steps.push(Step {
            at_ms: t,
            fault,
            hold_ms,
        });
        t += hold_ms + rng.gen_range(GAP_MS.0..=GAP_MS.1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_schedule_and_bounded_by_duration() {
        let a = schedule(42, 10_000, FaultMix::ALL);
        assert_eq!(a, schedule(42, 10_000, FaultMix::ALL));
        assert_ne!(a, schedule(43, 10_000, FaultMix::ALL));
        assert!(!a.is_empty());
        for s in &a {
            assert!(s.at_ms + s.hold_ms <= 10_000);
        }
        for w in a.windows(2) {
            assert!(
                w[0].at_ms + w[0].hold_ms < w[1].at_ms,
                "faults never overlap"
            );
        }
    }

    #[test]
    fn mix_restricts_families() {
        for seed in 0..50 {
            for s in schedule(
                seed,
                20_000,
                FaultMix {
                    process: false,
                    network: true,
                    storage: false,
                },
            ) {
                assert!(matches!(s.fault, Fault::Proxy(..)), "{:?}", s.fault);
            }
        }
    }
}
