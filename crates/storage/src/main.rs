//! `storage`: a walkv storage node.
//!
//! Keeps a full copy of the data in a JSON write-ahead log under `--data-dir`, serves the
//! frontend's replication and read RPCs on `--listen`, and registers with the frontend at
//! `--frontend`. `storage wal verify|dump|bench|store-bench --data-dir D` inspect a data
//! directory offline or measure the WAL and the in-memory store; `storage wal sync-bench
//! --dir D` measures the disk's parallel-fdatasync floor. Exit codes: 0 ok, 1
//! refused to start (config, lock, corruption), 3 stopped by a disk error (fail-stop) or
//! refused by the frontend.

use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use walkv_storage::{tools, Config};

/// mimalloc instead of glibc malloc: the request paths allocate many small, short-lived
/// buffers (JSON frames, keys, values) and glibc's malloc/free showed up at ~16% of CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Default config file; silently skipped when absent (an explicit `--config` must exist).
const DEFAULT_CONFIG: &str = "config/storage.toml";

#[derive(Parser, Debug)]
#[command(
    name = "storage",
    version,
    about = "walkv storage node: durable JSON WAL, snapshots, replication target of the frontend"
)]
struct Cli {
    /// Node id (stable across restarts; the frontend tracks the in-sync set by id).
    #[arg(long)]
    id: Option<String>,
    /// Address to listen on for the frontend, ip:port.
    #[arg(long)]
    listen: Option<String>,
    /// Address the frontend should dial (default: --listen).
    #[arg(long)]
    advertise: Option<String>,
    /// Prometheus `GET /metrics` address, ip:port (default: off) [config: metrics_listen].
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Frontend's storage/registry address (default 127.0.0.1:7001).
    #[arg(long)]
    frontend: Option<String>,
    /// Data directory (default data/ID).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Config file (default config/storage.toml, skipped if missing).
    #[arg(long)]
    config: Option<PathBuf>,
    /// At start, cut the WAL at the first corrupt record (keeping a copy) and rely on
    /// catch-up from peers instead of refusing to start.
    #[arg(long)]
    discard_corrupt_tail: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Offline WAL tools.
    #[command(subcommand)]
    Wal(WalCommand),
}

#[derive(Subcommand, Debug)]
enum WalCommand {
    /// Check snapshot and WAL checksums and seq continuity; exit 1 naming file, offset, seq.
    Verify(DirArg),
    /// Print the snapshot header and every record as JSON lines (for jq).
    Dump(DirArg),
    /// Measure group-commit append throughput with N concurrent writers (fsync on).
    Bench {
        #[command(flatten)]
        dir: DirArg,
        /// Concurrent writers.
        #[arg(long, default_value_t = 64)]
        writers: usize,
        /// Total records to append.
        #[arg(long, default_value_t = 200_000)]
        records: u64,
        /// Bytes per value.
        #[arg(long, default_value_t = 100)]
        value_size: usize,
        /// Distinct keys the puts cycle through (16 bytes each).
        #[arg(long, default_value_t = 100_000)]
        keys: u64,
        /// Snapshot every N records, as a node does (default: never).
        #[arg(long)]
        snapshot_every: Option<u64>,
    },
    /// Measure the disk's floor under a replicated write: 1..=N preallocated files, each
    /// written and fdatasynced by its own thread, all at once, round after round (N = 3 is
    /// one group commit of three storage nodes sharing this disk).
    SyncBench {
        /// Directory for the temporary files (on the disk to measure).
        #[arg(long)]
        dir: PathBuf,
        /// Most files synced in parallel; every count from 1 up is measured.
        #[arg(long, default_value_t = 3)]
        files: usize,
        /// Rounds per file count.
        #[arg(long, default_value_t = 2000)]
        rounds: u64,
        /// Bytes written per file per round (one small group commit).
        #[arg(long, default_value_t = 300)]
        bytes: usize,
        /// Grow the files with every write instead of overwriting preallocated zeros (how
        /// WAL segments were written before preallocation), to compare the two.
        #[arg(long)]
        append: bool,
        /// Keep the CPUs awake for this many µs after each round, as servers with
        /// `idle_poll_us` do (0 = let them halt, which on a virtual machine adds the cost
        /// of waking them to every round).
        #[arg(long, default_value_t = 0)]
        idle_poll_us: u64,
    },
    /// Load N keys into an in-memory store and report RSS per key, the writer's stall
    /// when it takes a snapshot, apply latency with and without one, and recovery time.
    StoreBench {
        #[command(flatten)]
        dir: DirArg,
        /// Keys to load (16 bytes each).
        #[arg(long, default_value_t = 1_000_000)]
        keys: u64,
        /// Bytes per value.
        #[arg(long, default_value_t = 100)]
        value_size: usize,
        /// Overwrites applied with the snapshot alive, and as many after: recovery replays
        /// twice this many WAL records (default: one `snapshot_every`'s worth).
        #[arg(long, default_value_t = 50_000)]
        updates: u64,
        /// Only recover the directory an earlier run left, in this fresh process.
        #[arg(long)]
        recover_only: bool,
    },
}

#[derive(Args, Debug)]
struct DirArg {
    /// The node's data directory.
    #[arg(long)]
    data_dir: PathBuf,
}

fn load_config(cli: &Cli) -> Result<Config, String> {
    let (mut config, source) = match &cli.config {
        Some(p) => (
            Config::load(p).map_err(|e| e.to_string())?,
            p.display().to_string(),
        ),
        None if Path::new(DEFAULT_CONFIG).exists() => (
            Config::load(Path::new(DEFAULT_CONFIG)).map_err(|e| e.to_string())?,
            DEFAULT_CONFIG.to_string(),
        ),
        None => (Config::default(), "built-in defaults".to_string()),
    };
    let source = format!("{source} (with command-line flags)");
    if let Some(v) = &cli.id {
        config.id = v.clone();
    }
    if let Some(v) = &cli.listen {
        config.listen = v.clone();
    }
    if let Some(v) = &cli.advertise {
        config.advertise = Some(v.clone());
    }
    if let Some(v) = &cli.frontend {
        config.frontend = v.clone();
    }
    if let Some(v) = &cli.metrics_listen {
        config.metrics_listen = v.clone();
    }
    if let Some(v) = &cli.data_dir {
        config.data_dir = Some(v.clone());
    }
    config.discard_corrupt_tail |= cli.discard_corrupt_tail;
    config.validate(&source).map_err(|e| e.to_string())?;
    Ok(config)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    walkv_shared::telemetry::init();
    walkv_shared::memory::disable_transparent_huge_pages();
    if let Some(Command::Wal(cmd)) = &cli.command {
        return match walkv_shared::runtime::build(0, 0) {
            Ok(r) => r.block_on(wal_tool(cmd)),
            Err(e) => {
                eprintln!("error: cannot start the async runtime: {e}");
                ExitCode::from(1)
            }
        };
    }
    let config = match load_config(&cli) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(1);
        }
    };
    match walkv_shared::runtime::build(config.worker_threads, config.idle_poll_us) {
        Ok(r) => r.block_on(serve(config)),
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            ExitCode::from(1)
        }
    }
}

async fn serve(config: Config) -> ExitCode {
    let listener = match tokio::net::TcpListener::bind(&config.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(listen = %config.listen, "cannot listen: {e}");
            return ExitCode::from(1);
        }
    };
    if !config.metrics_listen.is_empty() {
        match tokio::net::TcpListener::bind(&config.metrics_listen).await {
            // Not joined: the endpoint holds no state and ends with the process.
            Ok(l) => drop(tokio::spawn(walkv_storage::metrics::serve(
                l,
                std::future::pending(),
            ))),
            Err(e) => {
                tracing::error!(metrics_listen = %config.metrics_listen, "cannot listen: {e}");
                return ExitCode::from(1);
            }
        }
    }
    match walkv_storage::run(config, listener, walkv_shared::shutdown::signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

async fn wal_tool(cmd: &WalCommand) -> ExitCode {
    let result = match cmd {
        WalCommand::Verify(d) => tools::verify(&d.data_dir).map(|s| println!("{s}")),
        WalCommand::Dump(d) => tools::dump(&d.data_dir, &mut std::io::stdout().lock()),
        WalCommand::Bench {
            dir,
            writers,
            records,
            value_size,
            keys,
            snapshot_every,
        } => tools::bench(
            &dir.data_dir,
            *writers,
            *records,
            *value_size,
            *keys,
            *snapshot_every,
        )
        .await
        .map(|r| println!("writers {writers}: {r}")),
        WalCommand::SyncBench {
            dir,
            files,
            rounds,
            bytes,
            append,
            idle_poll_us,
        } => {
            tools::sync_bench(dir, *files, *rounds, *bytes, *append, *idle_poll_us).map(|reports| {
                for r in reports {
                    println!("{r}");
                }
            })
        }
        WalCommand::StoreBench {
            dir,
            recover_only: true,
            ..
        } => tools::recover_bench(&dir.data_dir).map(|r| println!("{r}")),
        WalCommand::StoreBench {
            dir,
            keys,
            value_size,
            updates,
            recover_only: false,
        } => {
            tools::store_bench(&dir.data_dir, *keys, *value_size, *updates).map(|r| println!("{r}"))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
