//! The history of a chaos run: every client operation and every nemesis event, in order.
//!
//! # Format
//!
//! `history.jsonl` holds one JSON object per line ([`Event`]). A client operation is an
//! `invoke` line followed later by exactly one completion with the same `op`: `ok`
//! (it happened, with its result), `fail` (it definitely did not happen) or `info` (the
//! outcome is unknown: a timeout or a lost connection; an `info` write may take effect at
//! any point after its invocation, or never). Times are nanoseconds since the run started,
//! from one monotonic clock, so `a.ret < b.call` means `a` finished before `b` began.
//! Nemesis events (`type = "nemesis"`) share the file so a reader sees what was broken when.
//!
//! [`Recorder`] writes the file as the run goes (so a crashed runner still leaves it) and
//! keeps the events in memory; [`operations`] folds them into [`Operation`]s, the checkers'
//! input. Everything but the recorder is pure.

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What an operation asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "f", rename_all = "snake_case")]
pub enum Input {
    /// Read the key.
    Get,
    /// Set the key to `value`.
    Put {
        /// The (unique) value.
        value: String,
    },
    /// Remove the key.
    Delete,
    /// Set the key to `value` if its version is `expected` (0: absent).
    Cas {
        /// Expected version.
        expected: u64,
        /// The (unique) value.
        value: String,
    },
}

/// What an operation returned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Output {
    /// A write committed at `version`.
    Written {
        /// The seq it committed at.
        version: u64,
    },
    /// A read found `value` at `version`.
    Value {
        /// The value.
        value: String,
        /// Its version.
        version: u64,
    },
    /// A read or delete found no key.
    NotFound,
    /// A cas found another version (`current`, 0 = absent).
    Mismatch {
        /// The key's version.
        current: u64,
    },
    /// Unknown outcome (`info`).
    Unknown,
    /// Definitely not applied (`fail`), with the error.
    Failed {
        /// The error text.
        error: String,
    },
}

impl Output {
    /// The history line type for this completion.
    pub fn kind(&self) -> &'static str {
        match self {
            Output::Unknown => "info",
            Output::Failed { .. } => "fail",
            _ => "ok",
        }
    }
}

/// One line of `history.jsonl`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// An operation starts.
    Invoke {
        /// Operation id (unique in the run).
        op: u64,
        /// Process id: a worker gets a new one after every `info`.
        process: u64,
        /// Nanoseconds since the run started.
        time: u64,
        /// The key.
        key: String,
        /// What was asked.
        input: Input,
    },
    /// An operation ends (`ok`, `fail` or `info`: see [`Output::kind`]).
    Complete {
        /// Operation id.
        op: u64,
        /// `ok`, `fail` or `info`.
        kind: String,
        /// Process id.
        process: u64,
        /// Nanoseconds since the run started.
        time: u64,
        /// What came back.
        output: Output,
    },
    /// A nemesis action (fault or heal).
    Nemesis {
        /// Nanoseconds since the run started.
        time: u64,
        /// What was done, e.g. `kill s1,s2` or `heal`.
        what: String,
    },
}

/// A completed (or unknown) operation: the checkers' unit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operation {
    /// Operation id.
    pub id: u64,
    /// Process id.
    pub process: u64,
    /// The key.
    pub key: String,
    /// Invocation time.
    pub call: u64,
    /// Completion time; `u64::MAX` for `info` (it stays concurrent with everything later).
    pub ret: u64,
    /// What was asked.
    pub input: Input,
    /// What came back.
    pub output: Output,
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ret = if self.ret == u64::MAX {
            "?".to_string()
        } else {
            format!("{:.3}", self.ret as f64 / 1e9)
        };
        write!(
            f,
            "op {} p{} [{:.3}s..{}s] {} {:?} -> {:?}",
            self.id,
            self.process,
            self.call as f64 / 1e9,
            ret,
            self.key,
            self.input,
            self.output
        )
    }
}

/// Folds history events into operations. An invocation with no completion (the run ended
/// first) counts as `info`. `fail` operations are kept; checkers skip them.
pub fn operations(events: &[Event]) -> Vec<Operation> {
    let mut open = std::collections::BTreeMap::new();
    let mut out = Vec::new();
    for e in events {
        match e {
            Event::Invoke {
                op,
                process,
                time,
                key,
                input,
            } => {
                open.insert(*op, (*process, *time, key.clone(), input.clone()));
            }
            Event::Complete {
                op, time, output, ..
            } => {
                if let Some((process, call, key, input)) = open.remove(op) {
                    let ret = if *output == Output::Unknown {
                        u64::MAX
                    } else {
                        *time
                    };
                    out.push(Operation {
                        id: *op,
                        process,
                        key,
                        call,
                        ret,
                        input,
                        output: output.clone(),
                    });
                }
            }
            Event::Nemesis { .. } => {}
        }
    }
    for (op, (process, call, key, input)) in open {
        out.push(Operation {
            id: op,
            process,
            key,
            call,
            ret: u64::MAX,
            input,
            output: Output::Unknown,
        });
    }
    out.sort_by_key(|o| (o.call, o.id));
    out
}

/// Reads a `history.jsonl` file (for replaying a checker on a kept run).
pub fn load(path: &Path) -> std::io::Result<Vec<Event>> {
    let text = std::fs::read_to_string(path)?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
        })
        .collect()
}

struct Inner {
    file: std::io::BufWriter<std::fs::File>,
    events: Vec<Event>,
    next_op: u64,
}

/// Appends events to `history.jsonl` and keeps them in memory. Cheap to clone.
#[derive(Clone)]
pub struct Recorder {
    start: Instant,
    inner: Arc<Mutex<Inner>>,
}

impl Recorder {
    /// Creates (truncates) the history file.
    pub fn create(path: &Path) -> std::io::Result<Recorder> {
        let file = std::io::BufWriter::new(std::fs::File::create(path)?);
        Ok(Recorder {
            start: Instant::now(),
            inner: Arc::new(Mutex::new(Inner {
                file,
                events: Vec::new(),
                next_op: 0,
            })),
        })
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn push(&self, inner: &mut Inner, e: Event) {
        // A history that cannot be written is a harness failure, not a cluster one.
        let line = serde_json::to_string(&e).expect("history events serialize");
        writeln!(inner.file, "{line}").expect("write history.jsonl");
        inner.events.push(e);
    }

    /// Records an invocation; returns the op id to complete it with.
    pub fn invoke(&self, process: u64, key: &str, input: Input) -> u64 {
        let mut inner = self.inner.lock().expect("recorder lock is never poisoned");
        let op = inner.next_op;
        inner.next_op += 1;
        let e = Event::Invoke {
            op,
            process,
            time: self.now(),
            key: key.to_string(),
            input,
        };
        self.push(&mut inner, e);
        op
    }

    /// Records the completion of `op`.
    pub fn complete(&self, op: u64, process: u64, output: Output) {
        let mut inner = self.inner.lock().expect("recorder lock is never poisoned");
        let e = Event::Complete {
            op,
            kind: output.kind().to_string(),
            process,
            time: self.now(),
            output,
        };
        self.push(&mut inner, e);
    }

    /// Records a nemesis action, and flushes the file so that a stuck run's history on
    /// disk is current up to its last fault.
    pub fn nemesis(&self, what: &str) {
        let mut inner = self.inner.lock().expect("recorder lock is never poisoned");
        let e = Event::Nemesis {
            time: self.now(),
            what: what.to_string(),
        };
        self.push(&mut inner, e);
        let _ = inner.file.flush();
    }

    /// Flushes the file and returns every event so far.
    pub fn snapshot(&self) -> Vec<Event> {
        let mut inner = self.inner.lock().expect("recorder lock is never poisoned");
        let _ = inner.file.flush();
        inner.events.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_and_fold_into_operations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.jsonl");
        let r = Recorder::create(&path).unwrap();
        let a = r.invoke(1, "k", Input::Put { value: "x".into() });
        let b = r.invoke(2, "k", Input::Get);
        r.nemesis("kill s1");
        r.complete(a, 1, Output::Written { version: 3 });
        r.complete(b, 2, Output::Unknown);
        let c = r.invoke(3, "k", Input::Delete);
        let events = r.snapshot();
        assert_eq!(load(&path).unwrap(), events);
        let ops = operations(&events);
        assert_eq!(ops.len(), 3);
        assert_eq!(ops[0].output, Output::Written { version: 3 });
        assert!(ops[0].ret < u64::MAX);
        assert_eq!(ops[1].ret, u64::MAX, "info stays open forever");
        assert_eq!(ops[2].id, c);
        assert_eq!(ops[2].output, Output::Unknown, "never completed = info");
    }
}
