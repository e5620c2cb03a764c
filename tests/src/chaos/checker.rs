//! Checkers over a history: pure functions from [`Operation`]s to [`Violation`]s.
//!
//! 1. [`check_linearizable`]: every key's operations are linearizable against a versioned
//!    register (Wing & Gong's search with Lowe's memoization, as porcupine does it,
//!    partitioned by key because single-key linearizability composes).
//! 2. [`check_final_reads`]: no acknowledged write lost: the final read of each key (after
//!    healing) is at least as new as the newest acknowledged write on that key.
//! 3. Convergence is checked by the runner (node digests), not here.
//! 4. [`check_versions`]: cheap invariants: writes ordered in real time get increasing
//!    seqs; reads ordered in real time never see an older version of a key.
//!
//! # The model
//!
//! State: absent, or present with a value and a version (`None` when the value came from a
//! write of unknown outcome, whose version nobody saw). Values are unique per run, so a
//! read names exactly one write. An `info` operation may take effect at any point after its
//! invocation or never: it is given an infinite return time, so the search may place it
//! anywhere later, including after everything (which is "never", as nothing observes it).
//! A cas of unknown outcome on a state with an unknown version may or may not apply: the
//! model is nondeterministic and the search runs over *sets* of states (porcupine's
//! power-set construction). `fail` operations did not happen and are left out.
//!
//! # Bounds
//!
//! The search is exponential in the worst case; [`SEARCH_BUDGET`] caps the steps per key
//! and an exhausted budget is reported as [`Verdict::Unknown`], never as a pass.

use super::history::{Input, Operation, Output};
use std::collections::{BTreeMap, HashSet};
use std::fmt;

/// Search steps allowed per key before the linearizability check gives up (unknown).
pub const SEARCH_BUDGET: u64 = 5_000_000;

/// Operations shown in a counterexample's linearizable prefix (the last ones).
const COUNTEREXAMPLE_PREFIX: usize = 12;

/// A property the history breaks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// `linearizability`, `lost_write`, `write_order`, `read_order`, `convergence`, ...
    pub kind: String,
    /// A readable explanation naming the operations involved.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] {}", self.kind, self.detail)
    }
}

/// The linearizability verdict for one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A linearization exists.
    Ok,
    /// None exists; the text is the counterexample.
    Illegal(String),
    /// The search budget ran out.
    Unknown,
}

/// One register state.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Reg {
    Absent,
    Present(String, Option<u64>),
}

fn version_below(state: &Reg, v: u64) -> bool {
    match state {
        Reg::Present(_, Some(c)) => *c < v,
        _ => true,
    }
}

/// The states `op` can lead to from `s` (empty: `op` cannot happen in `s`).
fn step(s: &Reg, input: &Input, output: &Output) -> Vec<Reg> {
    use Output as O;
    match (input, output) {
        (Input::Put { value }, O::Written { version }) => {
            if version_below(s, *version) {
                vec![Reg::Present(value.clone(), Some(*version))]
            } else {
                vec![]
            }
        }
        (Input::Put { value }, O::Unknown) => vec![Reg::Present(value.clone(), None)],
        (Input::Get, O::Value { value, version }) => match s {
            Reg::Present(v, ver) if v == value && ver.is_none_or(|x| x == *version) => {
                vec![Reg::Present(v.clone(), Some(*version))]
            }
            _ => vec![],
        },
        (Input::Get | Input::Delete, O::NotFound) => match s {
            Reg::Absent => vec![Reg::Absent],
            _ => vec![],
        },
        (Input::Get, _) => vec![s.clone()],
        (Input::Delete, O::Written { version }) => match s {
            Reg::Present(..) if version_below(s, *version) => vec![Reg::Absent],
            _ => vec![],
        },
        (Input::Delete, O::Unknown) => vec![Reg::Absent],
        (Input::Cas { expected, value }, O::Written { version }) => {
            let matches = match s {
                Reg::Absent => *expected == 0,
                Reg::Present(_, ver) => *expected != 0 && ver.is_none_or(|x| x == *expected),
            };
            if matches && version_below(s, *version) {
                vec![Reg::Present(value.clone(), Some(*version))]
            } else {
                vec![]
            }
        }
        (Input::Cas { expected, .. }, O::Mismatch { current }) => match s {
            Reg::Absent if *current == 0 && *expected != 0 => vec![Reg::Absent],
            Reg::Present(v, ver) if *current != 0 && current != expected => match ver {
                Some(x) if x == current => vec![s.clone()],
                None => vec![Reg::Present(v.clone(), Some(*current))],
                _ => vec![],
            },
            _ => vec![],
        },
        (Input::Cas { expected, value }, O::Unknown) => {
            let applied = Reg::Present(value.clone(), None);
            match s {
                Reg::Absent if *expected == 0 => vec![applied],
                Reg::Absent => vec![s.clone()],
                Reg::Present(_, Some(x)) if x == expected => vec![applied],
                Reg::Present(_, Some(_)) => vec![s.clone()],
                Reg::Present(_, None) if *expected == 0 => vec![s.clone()],
                Reg::Present(_, None) => vec![s.clone(), applied],
            }
        }
        // Any other pairing (a put answering NotFound, ...) is impossible.
        _ => vec![],
    }
}

/// Steps a set of states; the result is sorted and deduplicated.
fn step_set(states: &[Reg], op: &Operation) -> Vec<Reg> {
    let mut out: Vec<Reg> = states
        .iter()
        .flat_map(|s| step(s, &op.input, &op.output))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Wing–Gong–Lowe search over one key's operations (failed ones already removed).
pub fn check_key(ops: &[&Operation]) -> Verdict {
    const END: usize = usize::MAX;
    // Events: (time, is_return, op index). Calls sort before returns at equal times, so
    // touching operations count as concurrent.
    let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(ops.len() * 2);
    for (i, op) in ops.iter().enumerate() {
        events.push((op.call, false, i));
        events.push((op.ret, true, i));
    }
    events.sort();
    let n = events.len();
    // Doubly linked list over the events with a head sentinel at index n.
    let mut next: Vec<usize> = (1..=n).map(|i| if i == n { END } else { i }).collect();
    next.push(if n == 0 { END } else { 0 });
    let mut prev: Vec<usize> = (0..n).map(|i| if i == 0 { n } else { i - 1 }).collect();
    prev.push(END);
    let mut ret_of = vec![0usize; ops.len()];
    for (idx, e) in events.iter().enumerate() {
        if e.1 {
            ret_of[e.2] = idx;
        }
    }
    let unlink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, i: usize| {
        next[prev[i]] = next[i];
        if next[i] != END {
            prev[next[i]] = prev[i];
        }
    };
    let relink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, i: usize| {
        next[prev[i]] = i;
        if next[i] != END {
            prev[next[i]] = i;
        }
    };
    let words = ops.len().div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, Vec<Reg>)> = HashSet::new();
    let mut stack: Vec<(usize, Vec<Reg>)> = Vec::new();
    let mut best: Vec<usize> = Vec::new();
    let mut state = vec![Reg::Absent];
    let mut entry = next[n];
    let mut steps = 0u64;
    while next[n] != END {
        steps += 1;
        if steps > SEARCH_BUDGET {
            return Verdict::Unknown;
        }
        let (_, is_return, i) = events[entry];
        if !is_return {
            let new_state = step_set(&state, ops[i]);
            if !new_state.is_empty() {
                let mut lin = linearized.clone();
                lin[i / 64] |= 1 << (i % 64);
                if cache.insert((lin.clone(), new_state.clone())) {
                    stack.push((entry, std::mem::replace(&mut state, new_state)));
                    linearized = lin;
                    unlink(&mut next, &mut prev, entry);
                    unlink(&mut next, &mut prev, ret_of[i]);
                    if stack.len() > best.len() {
                        best = stack.iter().map(|(e, _)| events[*e].2).collect();
                    }
                    entry = next[n];
                    continue;
                }
            }
            entry = next[entry];
        } else {
            let Some((call_entry, old_state)) = stack.pop() else {
                return Verdict::Illegal(counterexample(ops, &best));
            };
            let j = events[call_entry].2;
            state = old_state;
            linearized[j / 64] &= !(1 << (j % 64));
            relink(&mut next, &mut prev, ret_of[j]);
            relink(&mut next, &mut prev, call_entry);
            entry = next[call_entry];
        }
    }
    Verdict::Ok
}

/// Names the longest linearizable prefix found and the operations none of which could
/// come next.
fn counterexample(ops: &[&Operation], best: &[usize]) -> String {
    let done: HashSet<usize> = best.iter().copied().collect();
    let mut text = format!(
        "longest linearizable prefix has {} of {} operations; its last ones:\n",
        best.len(),
        ops.len()
    );
    for &i in best
        .iter()
        .skip(best.len().saturating_sub(COUNTEREXAMPLE_PREFIX))
    {
        text.push_str(&format!("    {}\n", ops[i]));
    }
    // The candidates: pending operations invoked before the earliest pending return.
    let first_ret = (0..ops.len())
        .filter(|i| !done.contains(i))
        .map(|i| ops[i].ret)
        .min()
        .unwrap_or(u64::MAX);
    text.push_str("  none of these can be linearized next:\n");
    for (i, op) in ops.iter().enumerate() {
        if !done.contains(&i) && op.call <= first_ret {
            text.push_str(&format!("    {op}\n"));
        }
    }
    text
}

/// Splits by key and checks each key. Returns violations and the number of keys whose
/// search ran out of budget.
pub fn check_linearizable(ops: &[Operation]) -> (Vec<Violation>, usize) {
    let mut by_key: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for op in ops {
        let failed = matches!(op.output, Output::Failed { .. });
        // Reads of unknown outcome change nothing and constrain nothing.
        let blind_read = op.input == Input::Get && op.output == Output::Unknown;
        if !failed && !blind_read {
            by_key.entry(&op.key).or_default().push(op);
        }
    }
    let mut violations = Vec::new();
    let mut unknown = 0;
    for (key, ops) in by_key {
        match check_key(&ops) {
            Verdict::Ok => {}
            Verdict::Unknown => unknown += 1,
            Verdict::Illegal(text) => violations.push(Violation {
                kind: "linearizability".into(),
                detail: format!("key {key}: {text}"),
            }),
        }
    }
    (violations, unknown)
}

fn written_version(op: &Operation) -> Option<u64> {
    match op.output {
        Output::Written { version } => Some(version),
        _ => None,
    }
}

/// No acknowledged write lost: `finals` are the final reads (one per key, after healing);
/// each must be at least as new as the newest acknowledged write of its key, and a
/// `NotFound` must be explained by a delete.
pub fn check_final_reads(ops: &[Operation], finals: &[Operation]) -> Vec<Violation> {
    let mut out = Vec::new();
    for fin in finals {
        let writes: Vec<&Operation> = ops
            .iter()
            .filter(|o| o.key == fin.key && o.input != Input::Get && o.id != fin.id)
            .collect();
        let newest_acked = writes
            .iter()
            .filter_map(|o| written_version(o).map(|v| (v, *o)))
            .max_by_key(|(v, _)| *v);
        let Some((acked_version, acked)) = newest_acked else {
            continue;
        };
        let lost = match &fin.output {
            Output::Value { version, .. } => *version < acked_version,
            Output::NotFound => {
                let acked_delete = acked.input == Input::Delete;
                let later_delete = writes.iter().any(|o| {
                    o.input == Input::Delete
                        && (o.output == Output::Unknown
                            || written_version(o).is_some_and(|v| v > acked_version))
                });
                !acked_delete && !later_delete
            }
            _ => false,
        };
        if lost {
            out.push(Violation {
                kind: "lost_write".into(),
                detail: format!(
                    "key {}: final read {fin}\n  but this write was acknowledged: {acked}",
                    fin.key
                ),
            });
        }
    }
    out
}

/// Cheap version invariants. Writes (any key) that are ordered in real time must commit
/// at increasing seqs; per key, a read returning a value must not be older than any write
/// or read of that key that completed before the read began.
pub fn check_versions(ops: &[Operation]) -> Vec<Violation> {
    let mut out = Vec::new();
    let writes: Vec<(&Operation, u64)> = ops
        .iter()
        .filter_map(|o| written_version(o).map(|v| (o, v)))
        .collect();
    if let Some(v) = real_time_regression(&writes, false) {
        out.push(Violation {
            kind: "write_order".into(),
            detail: v,
        });
    }
    let mut by_key: BTreeMap<&str, Vec<(&Operation, u64)>> = BTreeMap::new();
    for o in ops {
        let v = match o.output {
            Output::Written { version } => version,
            Output::Value { version, .. } => version,
            _ => continue,
        };
        by_key.entry(&o.key).or_default().push((o, v));
    }
    for (_, list) in by_key {
        if let Some(v) = real_time_regression(&list, true) {
            out.push(Violation {
                kind: "read_order".into(),
                detail: v,
            });
        }
    }
    out
}

/// Finds `b` (a read when `reads_only`) whose version is not above (for reads: below)
/// the highest version among operations that completed before `b` was invoked.
fn real_time_regression(ops: &[(&Operation, u64)], reads_only: bool) -> Option<String> {
    let mut by_ret: Vec<&(&Operation, u64)> = ops.iter().collect();
    by_ret.sort_by_key(|(o, _)| o.ret);
    let mut by_call: Vec<&(&Operation, u64)> = ops.iter().collect();
    by_call.sort_by_key(|(o, _)| o.call);
    let mut done = 0;
    let mut max: Option<&(&Operation, u64)> = None;
    for b in by_call {
        while done < by_ret.len() && by_ret[done].0.ret < b.0.call {
            if max.is_none_or(|m| by_ret[done].1 > m.1) {
                max = Some(by_ret[done]);
            }
            done += 1;
        }
        let Some(m) = max else { continue };
        let bad = if reads_only {
            b.0.input == Input::Get && b.1 < m.1
        } else {
            b.1 <= m.1
        };
        if bad {
            return Some(format!(
                "{} (version {}) began after {} (version {}) completed",
                b.0, b.1, m.0, m.1
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(id: u64, call: u64, ret: Option<u64>, input: Input, output: Output) -> Operation {
        Operation {
            id,
            process: id,
            key: "k".into(),
            call,
            ret: ret.unwrap_or(u64::MAX),
            input,
            output,
        }
    }
    fn put(v: &str) -> Input {
        Input::Put { value: v.into() }
    }
    fn w(version: u64) -> Output {
        Output::Written { version }
    }
    fn val(v: &str, version: u64) -> Output {
        Output::Value {
            value: v.into(),
            version,
        }
    }
    fn lin(ops: &[Operation]) -> Vec<Violation> {
        let (v, unknown) = check_linearizable(ops);
        assert_eq!(unknown, 0);
        v
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = vec![
            op(1, 0, Some(1), Input::Get, Output::NotFound),
            op(2, 2, Some(3), put("a"), w(5)),
            op(3, 4, Some(5), Input::Get, val("a", 5)),
            op(
                4,
                6,
                Some(7),
                Input::Cas {
                    expected: 5,
                    value: "b".into(),
                },
                w(9),
            ),
            op(
                5,
                8,
                Some(9),
                Input::Cas {
                    expected: 5,
                    value: "c".into(),
                },
                Output::Mismatch { current: 9 },
            ),
            op(6, 10, Some(11), Input::Delete, w(12)),
            op(7, 12, Some(13), Input::Delete, Output::NotFound),
            op(8, 14, Some(15), Input::Get, Output::NotFound),
        ];
        assert!(lin(&h).is_empty());
        assert!(check_versions(&h).is_empty());
    }

    #[test]
    fn stale_read_is_rejected_with_a_counterexample() {
        let h = vec![
            op(1, 0, Some(1), put("a"), w(1)),
            op(2, 2, Some(3), put("b"), w(2)),
            op(3, 4, Some(5), Input::Get, val("a", 1)),
        ];
        let v = lin(&h);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].detail.contains("op 3"), "{}", v[0].detail);
        assert_eq!(check_versions(&h)[0].kind, "read_order");
    }

    #[test]
    fn concurrent_ops_may_be_ordered_either_way() {
        // The read overlaps the put of b, so it may see a or b.
        let h = vec![
            op(1, 0, Some(1), put("a"), w(1)),
            op(2, 2, Some(10), put("b"), w(2)),
            op(3, 3, Some(4), Input::Get, val("b", 2)),
            op(4, 5, Some(6), Input::Get, val("b", 2)),
        ];
        assert!(lin(&h).is_empty());
        // But once b was seen, a later read may not see a again.
        let mut h2 = h.clone();
        h2.push(op(5, 7, Some(8), Input::Get, val("a", 1)));
        assert_eq!(lin(&h2).len(), 1);
    }

    #[test]
    fn info_write_may_apply_late_or_never() {
        let late = vec![
            op(1, 0, None, put("a"), Output::Unknown),
            op(2, 1, Some(2), Input::Get, Output::NotFound),
            op(3, 3, Some(4), Input::Get, val("a", 7)),
        ];
        assert!(lin(&late).is_empty());
        let never = vec![
            op(1, 0, None, put("a"), Output::Unknown),
            op(2, 1, Some(2), put("b"), w(3)),
            op(3, 3, Some(4), Input::Get, val("b", 3)),
        ];
        assert!(lin(&never).is_empty());
        // An info write cannot be seen before it was invoked.
        let early = vec![
            op(1, 0, Some(1), Input::Get, val("a", 7)),
            op(2, 2, None, put("a"), Output::Unknown),
        ];
        assert_eq!(lin(&early).len(), 1);
    }

    #[test]
    fn value_read_twice_after_overwrite_is_rejected() {
        // a, then b acknowledged, then a read of a that started after b's ack.
        let h = vec![
            op(1, 0, None, put("a"), Output::Unknown),
            op(2, 1, Some(2), Input::Get, val("a", 4)),
            op(3, 3, Some(4), put("b"), w(5)),
            op(4, 5, Some(6), Input::Get, val("a", 4)),
        ];
        assert_eq!(lin(&h).len(), 1);
    }

    #[test]
    fn cas_of_unknown_outcome_branches() {
        let h = vec![
            op(1, 0, Some(1), put("a"), w(2)),
            op(
                2,
                2,
                None,
                Input::Cas {
                    expected: 2,
                    value: "b".into(),
                },
                Output::Unknown,
            ),
            op(3, 3, Some(4), Input::Get, val("b", 6)),
        ];
        assert!(lin(&h).is_empty());
        let wrong_expectation = vec![
            op(1, 0, Some(1), put("a"), w(2)),
            op(
                2,
                2,
                None,
                Input::Cas {
                    expected: 1,
                    value: "b".into(),
                },
                Output::Unknown,
            ),
            op(3, 3, Some(4), Input::Get, val("b", 6)),
        ];
        assert_eq!(lin(&wrong_expectation).len(), 1);
    }

    #[test]
    fn lost_acknowledged_write_is_reported() {
        let h = vec![
            op(1, 0, Some(1), put("a"), w(1)),
            op(2, 2, Some(3), put("b"), w(2)),
        ];
        let fin = op(3, 4, Some(5), Input::Get, val("a", 1));
        let v = check_final_reads(&h, std::slice::from_ref(&fin));
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].kind, "lost_write");
        let gone = op(3, 4, Some(5), Input::Get, Output::NotFound);
        assert_eq!(check_final_reads(&h, std::slice::from_ref(&gone)).len(), 1);
        // A delete of unknown outcome explains an absent key.
        let mut h2 = h.clone();
        h2.push(op(4, 3, None, Input::Delete, Output::Unknown));
        assert!(check_final_reads(&h2, &[gone]).is_empty());
        let ok = op(3, 4, Some(5), Input::Get, val("b", 2));
        assert!(check_final_reads(&h, &[ok]).is_empty());
    }

    #[test]
    fn writes_ordered_in_real_time_need_increasing_seqs() {
        let mut h = vec![
            op(1, 0, Some(1), put("a"), w(5)),
            op(2, 2, Some(3), put("b"), w(4)),
        ];
        h[1].key = "other".into();
        let v = check_versions(&h);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].kind, "write_order");
    }

    #[test]
    fn budget_exhaustion_is_unknown_not_ok() {
        // Many concurrent info writes and a read no order explains.
        let mut h: Vec<Operation> = (0..12)
            .map(|i| op(i, i, None, put(&format!("v{i}")), Output::Unknown))
            .collect();
        h.push(op(100, 50, Some(51), Input::Get, val("never-written", 1)));
        let refs: Vec<&Operation> = h.iter().collect();
        assert_ne!(check_key(&refs), Verdict::Ok);
    }
}
