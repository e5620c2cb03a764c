//! Soak mode: many seeds, one after another, within a time budget, and the summary
//! (runs, operations, faults by kind, violations by kind, the failing seeds).

use super::runner::{self, RunConfig, RunReport};
use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

/// Totals over many runs.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// Runs completed.
    pub runs: u64,
    /// Operations recorded.
    pub ops: u64,
    /// Operations of unknown outcome.
    pub info: u64,
    /// Faults injected by kind.
    pub faults: BTreeMap<String, u64>,
    /// Violations by kind.
    pub violations: BTreeMap<String, u64>,
    /// Keys whose linearizability search ran out of budget.
    pub unchecked_keys: u64,
    /// Seeds with violations, and where their runs were kept.
    pub failed: Vec<(u64, String)>,
}

impl Summary {
    /// Adds one run.
    pub fn add(&mut self, r: &RunReport) {
        self.runs += 1;
        self.ops += r.ops;
        self.info += r.info;
        self.unchecked_keys += r.unchecked_keys as u64;
        for (k, n) in &r.faults {
            *self.faults.entry(k.clone()).or_default() += n;
        }
        for v in &r.violations {
            *self.violations.entry(v.kind.clone()).or_default() += 1;
        }
        if !r.violations.is_empty() {
            let dir = r
                .kept_dir
                .as_ref()
                .map_or("?".to_string(), |d| d.display().to_string());
            self.failed.push((r.seed, dir));
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "chaos summary")?;
        writeln!(f, "  runs:        {}", self.runs)?;
        writeln!(f, "  operations:  {} ({} info)", self.ops, self.info)?;
        writeln!(
            f,
            "  faults:      {} total",
            self.faults.values().sum::<u64>()
        )?;
        for (k, n) in &self.faults {
            writeln!(f, "    {k:<22} {n}")?;
        }
        writeln!(
            f,
            "  violations:  {} total",
            self.violations.values().sum::<u64>()
        )?;
        for (k, n) in &self.violations {
            writeln!(f, "    {k:<22} {n}")?;
        }
        writeln!(
            f,
            "  keys unchecked (search budget): {}",
            self.unchecked_keys
        )?;
        for (seed, dir) in &self.failed {
            writeln!(f, "  FAILED seed {seed}: {dir}")?;
        }
        Ok(())
    }
}

/// Runs seeds `first..first+runs` (each `duration` long) until done or `budget` is spent.
pub async fn soak(first: u64, runs: u64, duration: Duration, budget: Duration) -> Summary {
    let started = Instant::now();
    let mut summary = Summary::default();
    for seed in first..first.saturating_add(runs) {
        if started.elapsed() >= budget {
            eprintln!(
                "[chaos] time budget {budget:?} spent after {} runs",
                summary.runs
            );
            break;
        }
        let mut cfg = RunConfig::new(seed, duration);
        cfg.verbose = false;
        let r = runner::run(cfg).await;
        summary.add(&r);
    }
    summary
}
