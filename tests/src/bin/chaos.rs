//! `chaos`: randomized fault runs against a real walkv cluster (debug binaries from
//! `make build`), checked for linearizability and lost writes.
//!
//! ```text
//! chaos --seed 7 --duration-secs 10            # one run (replays seed 7's schedule)
//! chaos --seed 1 --runs 200 --minutes 15 --duration-secs 4   # soak: seeds 1..=200
//! ```
//!
//! Exit code 0 when every run passed, 1 when any found a violation (its run directory is
//! kept and printed), 2 on bad usage.

use std::time::Duration;
use walkv_tests::chaos::{runner, soak};

const USAGE: &str =
    "usage: chaos [--seed S] [--duration-secs D] [--runs N] [--minutes M] [--workers W]";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut seed: Option<u64> = None;
    let (mut duration, mut runs, mut minutes, mut workers) = (10u64, 1u64, 0u64, 10usize);
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).and_then(|v| v.parse::<u64>().ok());
        let Some(v) = value else {
            eprintln!("{USAGE}\n(bad or missing value for {})", args[i]);
            std::process::exit(2);
        };
        match args[i].as_str() {
            "--seed" => seed = Some(v),
            "--duration-secs" => duration = v,
            "--runs" => runs = v,
            "--minutes" => minutes = v,
            "--workers" => workers = v as usize,
            _ => {
                eprintln!("{USAGE}");
                std::process::exit(2);
            }
        }
        i += 2;
    }
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs())
    });
    let rt = tokio::runtime::Runtime::new().expect("start tokio runtime");
    let failed = rt.block_on(async {
        if runs == 1 {
            let mut cfg = runner::RunConfig::new(seed, Duration::from_secs(duration));
            cfg.workers = workers;
            let r = runner::run(cfg).await;
            for v in &r.violations {
                eprintln!("{v}");
            }
            let mut s = soak::Summary::default();
            s.add(&r);
            println!("{s}");
            !r.violations.is_empty()
        } else {
            let budget = if minutes == 0 {
                Duration::MAX
            } else {
                Duration::from_secs(minutes * 60)
            };
            let s = soak::soak(seed, runs, Duration::from_secs(duration), budget).await;
            println!("{s}");
            !s.failed.is_empty()
        }
    });
    std::process::exit(i32::from(failed));
}
