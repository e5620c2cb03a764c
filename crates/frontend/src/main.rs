//! `frontend`: the walkv coordinator process.
//!
//! Clients connect to `--client-listen` (default 127.0.0.1:7000); storage nodes register at
//! `--storage-listen` (default 127.0.0.1:7001). The HTTP door (REST, WebSocket watch,
//! `/metrics`, status page) listens on `--http-listen` (default 127.0.0.1:7080) and the
//! Redis-protocol door on `--resp-listen` (default 127.0.0.1:6380); each is off when its
//! address is empty or `http_enabled` / `resp_enabled` is false. State (epoch, in-sync set, epoch table) lives
//! in `--data-dir` (default `data/frontend`), which is locked while the process runs.
//!
//! ```text
//! ./frontend --config config/frontend.toml
//! RUST_LOG=debug ./frontend --data-dir /tmp/fe --client-listen 127.0.0.1:7100
//! ```
//!
//! Exits non-zero with the reason on any start error (bad config, locked data dir, port in
//! use); stops gracefully on SIGINT/SIGTERM.

use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;
use walkv_frontend::Config;
use walkv_shared::transport::parse_addr;

/// mimalloc instead of glibc malloc: the request paths allocate many small, short-lived
/// buffers (JSON frames, keys, values) and glibc's malloc/free showed up at ~16% of CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Default config path; when it does not exist, built-in defaults apply.
const DEFAULT_CONFIG: &str = "config/frontend.toml";

/// walkv frontend: sequences writes, keeps the in-sync set of storage nodes, serves clients.
#[derive(Parser, Debug)]
#[command(name = "frontend", version, about, long_about = None)]
struct Args {
    /// Config file (TOML). If the default path is missing, built-in defaults are used; an
    /// explicitly given file must exist.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Address for clients [config: client_listen, default 127.0.0.1:7000].
    #[arg(long, value_name = "ADDR")]
    client_listen: Option<String>,
    /// Address where storage nodes register [config: storage_listen, default 127.0.0.1:7001].
    #[arg(long, value_name = "ADDR")]
    storage_listen: Option<String>,
    /// Directory for state.json and the LOCK file [config: data_dir, default data/frontend].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// HTTP/JSON, WebSocket watch, /metrics and status page address [config: http_listen,
    /// default 127.0.0.1:7080]; an empty string turns the door off.
    #[arg(long, value_name = "ADDR")]
    http_listen: Option<String>,
    /// RESP (redis protocol and inline text) address [config: resp_listen, default
    /// 127.0.0.1:6380]; an empty string turns the door off.
    #[arg(long, value_name = "ADDR")]
    resp_listen: Option<String>,
    /// DANGEROUS: if no member of the last in-sync set can be reached, take the most
    /// up-to-date reachable storage node as the truth. Acknowledged writes it lacks are lost;
    /// the seq range is logged at error level. Applies to the recovery at this start only:
    /// once the frontend serves, a later recovery waits for in-sync nodes again.
    #[arg(long)]
    unsafe_recover: bool,
}

fn load(args: &Args) -> Result<Config, String> {
    let mut config = match &args.config {
        Some(path) => Config::load(path).map_err(|e| e.to_string())?,
        None if std::path::Path::new(DEFAULT_CONFIG).exists() => {
            Config::load(std::path::Path::new(DEFAULT_CONFIG)).map_err(|e| e.to_string())?
        }
        None => Config::default(),
    };
    let flag_addr = |flag: &str, v: &Option<String>, slot: &mut String| -> Result<(), String> {
        if let Some(v) = v {
            // Only the door flags may be empty (door off); validate() checks that.
            if !v.is_empty() {
                parse_addr(flag, v)?;
            }
            *slot = v.clone();
        }
        Ok(())
    };
    flag_addr(
        "--client-listen",
        &args.client_listen,
        &mut config.client_listen,
    )?;
    flag_addr(
        "--storage-listen",
        &args.storage_listen,
        &mut config.storage_listen,
    )?;
    flag_addr("--http-listen", &args.http_listen, &mut config.http_listen)?;
    flag_addr("--resp-listen", &args.resp_listen, &mut config.resp_listen)?;
    if let Some(d) = &args.data_dir {
        config.data_dir = d.clone();
    }
    config.unsafe_recover = args.unsafe_recover;
    config
        .validate()
        .map_err(|e| format!("command line: {e}"))?;
    Ok(config)
}

async fn start(config: Config) -> Result<(), String> {
    let bind = |what: &'static str, addr: String| async move {
        tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| format!("{what}: cannot listen on {addr}: {e}"))
    };
    let clients = bind("client_listen", config.client_listen.clone()).await?;
    let storage = bind("storage_listen", config.storage_listen.clone()).await?;
    let mut doors = walkv_frontend::Doors::default();
    if let Some(addr) = config.http_addr() {
        doors.http = Some(bind("http_listen", addr.to_string()).await?);
    }
    if let Some(addr) = config.resp_addr() {
        doors.resp = Some(bind("resp_listen", addr.to_string()).await?);
    }
    walkv_frontend::run_with_doors(
        config,
        clients,
        storage,
        doors,
        walkv_shared::shutdown::signal(),
    )
    .await
    .map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let args = Args::parse();
    walkv_shared::telemetry::init();
    walkv_shared::memory::disable_transparent_huge_pages();
    let config = match load(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("frontend: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match walkv_shared::runtime::build(config.worker_threads, config.idle_poll_us) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("frontend: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(start(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "frontend failed to start");
            eprintln!("frontend: {e}");
            ExitCode::FAILURE
        }
    }
}
