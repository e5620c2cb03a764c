//! Argument parsing and command execution for the `client` binary.

use clap::{Parser, Subcommand};
use serde_json::json;
use std::path::PathBuf;
use walkv_client::Client;
use walkv_shared::types::{ClusterStatus, NodeRole};
use walkv_shared::{KvError, Seq};

/// Config file read when `--config` is not given and the file exists.
pub const DEFAULT_CONFIG: &str = "config/client.toml";

/// Help shown by `help` at the prompt.
pub const REPL_HELP: &str = "commands: put K V | get K | delete K | cas K VERSION V | scan PREFIX [--limit N] | status | admin remove-node ID | quit";

/// walkv command-line client: talks to the frontend only.
///
/// Runs one command, or reads commands from the terminal (prompt) or from stdin when no
/// command is given. Exit codes: 0 success, 1 not found or version mismatch, 2 other errors.
#[derive(Parser, Debug)]
#[command(name = "client", version)]
pub struct Args {
    /// Client id; together with an op number it makes retried writes apply at most once.
    #[arg(long)]
    pub id: String,
    /// Frontend client address [default: 127.0.0.1:7000, or `frontend` in the config file].
    #[arg(long)]
    pub frontend: Option<String>,
    /// Print results as JSON.
    #[arg(long)]
    pub json: bool,
    /// Config file [default: config/client.toml when it exists].
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// How long to keep retrying an unavailable cluster, in ms (overrides retry_deadline_ms).
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    /// The command; omit it for a prompt (or to read commands from stdin).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// One client command.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Set KEY to VALUE; prints the version it committed at.
    Put { key: String, value: String },
    /// Print KEY's value (exit 1 when absent).
    Get { key: String },
    /// Delete KEY (exit 1 when absent).
    Delete { key: String },
    /// Set KEY to VALUE only if its version is VERSION (0: must not exist); exit 1 on mismatch.
    Cas {
        key: String,
        version: u64,
        value: String,
    },
    /// List keys starting with PREFIX, in key order.
    Scan {
        prefix: String,
        /// At most this many keys.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Show the cluster: epoch, commit index, every node's role, applied seq, lag, catch-up.
    /// Exits 2 when the cluster is unavailable.
    Status,
    /// Print committed changes of keys starting with PREFIX, in commit order, one line each
    /// (`VERSION put|delete KEY [VALUE]`, or JSON with --json) until interrupted.
    Watch {
        prefix: String,
        /// Start at this version (older changes come from the storage nodes' logs);
        /// default: only changes from now on.
        #[arg(long)]
        from: Option<u64>,
        /// Stop after this many changes (default: never).
        #[arg(long)]
        count: Option<u64>,
    },
    /// Administrative commands.
    #[command(subcommand)]
    Admin(Admin),
    /// Load the cluster with concurrent clients and report ops/s and latency percentiles.
    /// Progress goes to stderr once a second; `--json` prints one JSON object.
    Bench(BenchArgs),
}

/// Flags of `client bench` (see `walkv_client::bench`).
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Concurrent clients, each with its own id and one request in flight.
    #[arg(long, default_value_t = 1)]
    pub clients: u32,
    /// tarpc connections the clients share [default: one per bench thread]. More
    /// connections split the same answers over more system calls.
    #[arg(long)]
    pub connections: Option<u32>,
    /// Run for this many seconds [default: 10 unless --ops is given].
    #[arg(long)]
    pub duration: Option<f64>,
    /// Run this many operations in total instead of for a duration.
    #[arg(long)]
    pub ops: Option<u64>,
    /// Bytes per written value.
    #[arg(long, default_value_t = 100)]
    pub value_size: u32,
    /// Size of the key space (keys are drawn uniformly).
    #[arg(long, default_value_t = 10_000)]
    pub keys: u64,
    /// Fraction of operations that are gets (0.0 = all puts, 1.0 = all gets).
    #[arg(long, default_value_t = 0.0)]
    pub read_ratio: f64,
    /// Write this many keys before the measured run.
    #[arg(long, default_value_t = 0)]
    pub preload: u64,
    /// Threads of the bench process itself [default: min(cores, clients)]. On a machine
    /// shared with the cluster, 1 leaves the most CPU to the servers being measured.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: Option<u32>,
}

impl BenchArgs {
    /// Threads of the bench's runtime: `--threads`, else one per core but never more than
    /// clients (with one client a second worker only adds a cross-thread wake-up to every
    /// request: PUT-1 p50 measured 402-410 us with two workers, 332-362 us with one).
    pub fn threads(&self) -> u32 {
        self.threads.unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            cores.min(self.clients.max(1) as usize) as u32
        })
    }

    /// The library's options, validated.
    pub fn to_opts(&self) -> Result<walkv_client::bench::BenchOpts, String> {
        let duration = match self.duration {
            Some(d) if !(d.is_finite() && d > 0.0 && d <= 86_400.0) => {
                return Err(format!(
                    "--duration: expected 0 < seconds <= 86400, got {d}"
                ))
            }
            d => d.map(std::time::Duration::from_secs_f64),
        };
        let opts = walkv_client::bench::BenchOpts {
            clients: self.clients,
            connections: self.connections.unwrap_or_else(|| {
                walkv_client::bench::default_connections(self.clients, self.threads())
            }),
            duration,
            ops: self.ops,
            value_size: self.value_size,
            keys: self.keys,
            read_ratio: self.read_ratio,
            preload: self.preload,
            progress: true,
        };
        opts.validate()?;
        Ok(opts)
    }
}

/// Administrative commands.
#[derive(Subcommand, Debug)]
pub enum Admin {
    /// Retire node ID for good: it leaves the in-sync set and status and may not rejoin.
    RemoveNode { id: String },
}

/// The parser used for prompt/stdin lines: the same subcommands without the global flags.
#[derive(Parser, Debug)]
#[command(
    name = "",
    no_binary_name = true,
    disable_help_flag = true,
    disable_version_flag = true
)]
struct Line {
    #[command(subcommand)]
    command: Command,
}

/// Parses one prompt line.
pub fn parse_line(words: &[String]) -> Result<Command, String> {
    Line::try_parse_from(words)
        .map(|l| l.command)
        .map_err(|e| e.to_string().trim_end().to_string())
}

/// Splits a line into words; double or single quotes group words, backslash escapes.
pub fn split_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut cur: Option<String> = None;
    let mut quote: Option<char> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), '\\') | (None, '\\') => match chars.next() {
                Some(n) => cur.get_or_insert_with(String::new).push(n),
                None => return Err("line ends with a lone backslash".into()),
            },
            (Some(_), c) => cur.get_or_insert_with(String::new).push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                cur.get_or_insert_with(String::new);
            }
            (None, c) if c.is_whitespace() => words.extend(cur.take()),
            (None, c) => cur.get_or_insert_with(String::new).push(c),
        }
    }
    if quote.is_some() {
        return Err("unterminated quote".into());
    }
    words.extend(cur);
    Ok(words)
}

/// Exit code for an error: 1 for "not found" and "version mismatch", 2 otherwise.
pub fn exit_code(e: &KvError) -> i32 {
    match e {
        KvError::NotFound | KvError::VersionMismatch { .. } => 1,
        _ => 2,
    }
}

fn fail(e: &KvError, json: bool) -> i32 {
    if json {
        let mut obj = json!({"error": e.code(), "message": e.to_string()});
        if let KvError::VersionMismatch { current } = e {
            obj["current"] = json!(current.0);
        }
        println!("{obj}");
    }
    eprintln!("error: {e}");
    exit_code(e)
}

fn print_version(version: Seq, json: bool) {
    if json {
        println!("{}", json!({"version": version.0}));
    } else {
        println!("OK version {version}");
    }
}

/// Runs one command and returns its exit code.
pub async fn execute(client: &mut Client, command: Command, json: bool) -> i32 {
    let result = match command {
        Command::Put { key, value } => client
            .put(&key, &value)
            .await
            .map(|v| print_version(v, json)),
        Command::Delete { key } => client.delete(&key).await.map(|v| print_version(v, json)),
        Command::Cas {
            key,
            version,
            value,
        } => client
            .cas(&key, Seq(version), &value)
            .await
            .map(|v| print_version(v, json)),
        Command::Get { key } => client.get(&key).await.map(|v| {
            if json {
                println!(
                    "{}",
                    json!({"key": key, "value": v.value, "version": v.version.0})
                );
            } else {
                println!("{}", v.value);
            }
        }),
        Command::Scan { prefix, limit } => client.scan(&prefix, limit).await.map(|items| {
            for kv in items {
                if json {
                    println!(
                        "{}",
                        json!({"key": kv.key, "value": kv.value, "version": kv.version.0})
                    );
                } else {
                    println!("{}\t{}\t{}", kv.key, kv.value, kv.version);
                }
            }
        }),
        Command::Status => {
            return match client.status().await {
                Ok(status) => {
                    print_status(&status, json);
                    if status.available {
                        0
                    } else {
                        2
                    }
                }
                Err(e) => fail(&e, json),
            }
        }
        Command::Watch {
            prefix,
            from,
            count,
        } => watch(client, &prefix, from, count, json).await,
        Command::Bench(_) => {
            eprintln!("error: bench runs only as a command-line subcommand, not at the prompt");
            return 2;
        }
        Command::Admin(Admin::RemoveNode { id }) => client.remove_node(&id).await.map(|()| {
            if json {
                println!("{}", json!({"removed": id}));
            } else {
                println!("OK removed {id}");
            }
        }),
    };
    match result {
        Ok(()) => 0,
        Err(e) => fail(&e, json),
    }
}

/// How long one watch poll waits at the frontend for news.
const WATCH_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
/// Most changes per watch poll.
const WATCH_BATCH: u32 = 1000;

async fn watch(
    client: &mut Client,
    prefix: &str,
    from: Option<u64>,
    count: Option<u64>,
    json: bool,
) -> Result<(), KvError> {
    use std::io::Write;
    let mut next = match from {
        Some(v) => Seq(v),
        None => client.status().await?.commit_seq.next(),
    };
    let mut printed = 0u64;
    loop {
        let batch = client.watch(prefix, next, WATCH_BATCH, WATCH_WAIT).await?;
        for c in &batch.changes {
            if count.is_some_and(|n| printed >= n) {
                return Ok(());
            }
            if json {
                println!("{}", serde_json::to_string(c).unwrap_or_default());
            } else {
                let op = match c.op {
                    walkv_shared::types::ChangeOp::Put => "put",
                    walkv_shared::types::ChangeOp::Delete => "delete",
                };
                match &c.value {
                    Some(v) => println!("{}\t{op}\t{}\t{v}", c.version, c.key),
                    None => println!("{}\t{op}\t{}", c.version, c.key),
                }
            }
            printed += 1;
        }
        // Each line reaches a pipe promptly, so `client watch | ...` streams.
        let _ = std::io::stdout().flush();
        if count.is_some_and(|n| printed >= n) {
            return Ok(());
        }
        next = batch.next;
    }
}

fn print_status(s: &ClusterStatus, json: bool) {
    if json {
        // ClusterStatus serialises to plain JSON; it cannot fail.
        println!("{}", serde_json::to_string(s).unwrap_or_default());
        return;
    }
    println!(
        "epoch {}  commit_seq {}  state {}  min_insync {}",
        s.epoch, s.commit_seq, s.state, s.min_insync
    );
    println!(
        "{:<12} {:<22} {:<12} {:>10} {:>8} {:>10}  catch-up",
        "node", "addr", "role", "applied", "lag", "heartbeat"
    );
    for n in &s.nodes {
        let hb = n
            .last_heartbeat_ms
            .map(|ms| format!("{ms}ms ago"))
            .unwrap_or_else(|| "-".into());
        let progress = match (&n.catch_up, n.role) {
            (Some(p), NodeRole::CatchingUp) => format!(
                "{} {}/{} ({:.0}%) {:.0}/s eta {:.1}s",
                p.phase,
                p.done,
                p.total,
                if p.total == 0 {
                    100.0
                } else {
                    100.0 * p.done as f64 / p.total as f64
                },
                p.rate_per_sec,
                p.eta_secs
            ),
            _ => String::new(),
        };
        println!(
            "{:<12} {:<22} {:<12} {:>10} {:>8} {:>10}  {}",
            n.id.0,
            n.addr,
            n.role.to_string(),
            n.applied_seq.0,
            n.lag,
            hb,
            progress
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_handles_quotes_and_escapes() {
        assert_eq!(
            split_words(r#"put k "hello world""#).unwrap(),
            vec!["put", "k", "hello world"]
        );
        assert_eq!(split_words(r"put k a\ b").unwrap(), vec!["put", "k", "a b"]);
        assert_eq!(split_words("put k ''").unwrap(), vec!["put", "k", ""]);
        assert!(split_words("put k \"open").is_err());
    }

    #[test]
    fn lines_parse_like_subcommands() {
        let words = split_words("cas k 3 v").unwrap();
        assert!(matches!(
            parse_line(&words),
            Ok(Command::Cas { version: 3, .. })
        ));
        assert!(parse_line(&split_words("frobnicate").unwrap()).is_err());
    }

    #[test]
    fn bench_flags_become_validated_options() {
        let parse = |line: &str| match Args::try_parse_from(
            ["client", "--id", "b", "bench"]
                .into_iter()
                .chain(line.split_whitespace()),
        ) {
            Ok(Args {
                command: Some(Command::Bench(b)),
                ..
            }) => b.to_opts(),
            other => panic!("not a bench command: {other:?}"),
        };
        let o = parse("--clients 64 --ops 1000 --read-ratio 0.5 --threads 1").unwrap();
        assert_eq!((o.clients, o.connections, o.ops), (64, 1, Some(1000)));
        assert_eq!(parse("--clients 64 --threads 3").unwrap().connections, 3);
        assert_eq!(parse("--clients 2 --threads 8").unwrap().connections, 2);
        assert_eq!(
            parse("--clients 64 --threads 1 --connections 16")
                .unwrap()
                .connections,
            16
        );
        assert!(parse("--duration 0").unwrap_err().contains("--duration"));
        assert!(parse("--duration 1 --ops 5")
            .unwrap_err()
            .contains("not both"));
        assert!(parse("--clients 0").unwrap_err().contains("--clients"));
        assert!(parse("--read-ratio 2")
            .unwrap_err()
            .contains("--read-ratio"));
    }

    #[test]
    fn bench_threads_must_be_positive() {
        let threads = |v: &str| {
            Args::try_parse_from(["client", "--id", "b", "bench", "--threads", v]).map(|a| match a
                .command
            {
                Some(Command::Bench(b)) => b.threads,
                other => panic!("not a bench command: {other:?}"),
            })
        };
        assert_eq!(threads("1").unwrap(), Some(1));
        assert!(threads("0").is_err(), "zero threads cannot run anything");
    }

    #[test]
    fn exit_codes_follow_the_contract() {
        assert_eq!(exit_code(&KvError::NotFound), 1);
        assert_eq!(exit_code(&KvError::VersionMismatch { current: Seq(3) }), 1);
        assert_eq!(exit_code(&KvError::Unavailable("x".into())), 2);
    }
}
