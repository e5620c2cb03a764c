//! `client`: the walkv command-line client.
//!
//! ```text
//! ./client --id alice put colour red      # one command
//! ./client --id alice                     # interactive prompt
//! printf 'put a 1\nget a\n' | ./client --id alice   # commands from stdin
//! ./client --id b bench --clients 64 --duration 10    # load test (see walkv_client::bench)
//! ```
//!
//! Results go to stdout, diagnostics to stderr. Exit codes: 0 success, 1 key not found or
//! version mismatch, 2 any other error (unavailable, timeout, bad usage). With several
//! commands (prompt or stdin) the exit code is the highest one seen.

mod cli;

use clap::Parser;
use std::io::{BufRead, IsTerminal, Write};
use walkv_client::{Client, ClientConfig};

/// mimalloc instead of glibc malloc: the request paths allocate many small, short-lived
/// buffers (JSON frames, keys, values) and glibc's malloc/free showed up at ~16% of CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    walkv_shared::telemetry::init_with_default("warn");
    let args = cli::Args::parse();
    walkv_shared::memory::disable_transparent_huge_pages();
    // One thread is plenty for one command. The bench gets a worker per core for encoding
    // and decoding (see `BenchArgs::threads`); 1 runs it on the current-thread scheduler.
    let runtime = match &args.command {
        Some(cli::Command::Bench(b)) => walkv_shared::runtime::build(b.threads(), 0),
        _ => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
    };
    let code = match runtime {
        Ok(rt) => rt.block_on(run(args)),
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            2
        }
    };
    std::process::exit(code);
}

fn load_config(args: &cli::Args) -> Result<ClientConfig, String> {
    let mut config = match &args.config {
        Some(path) => ClientConfig::load(path)?,
        None => {
            let default = std::path::Path::new(cli::DEFAULT_CONFIG);
            if default.exists() {
                ClientConfig::load(default)?
            } else {
                ClientConfig::default()
            }
        }
    };
    if let Some(f) = &args.frontend {
        config.frontend = f.clone();
    }
    if let Some(ms) = args.timeout_ms {
        config.retry_deadline_ms = ms;
    }
    config
        .validate()
        .map_err(|e| format!("command line: {e}"))?;
    Ok(config)
}

async fn run(args: cli::Args) -> i32 {
    let config = match load_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    if let Some(cli::Command::Bench(bench)) = &args.command {
        return run_bench(config, bench, args.json).await;
    }
    let mut client = match Client::connect(args.id.clone(), config).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    match args.command {
        Some(cmd) => cli::execute(&mut client, cmd, args.json).await,
        None => repl(&mut client, args.json).await,
    }
}

/// Runs `client bench` and prints its report; exit 2 when any operation failed.
async fn run_bench(config: ClientConfig, args: &cli::BenchArgs, json: bool) -> i32 {
    let opts = match args.to_opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    match walkv_client::bench::run(config, opts.clone()).await {
        Ok(report) => {
            if json {
                println!("{}", report.to_json(&opts));
            } else {
                println!("{}", report.to_text(&opts));
            }
            if report.error_count() == 0 {
                0
            } else {
                2
            }
        }
        Err(e) => {
            eprintln!("error: bench: {e}");
            2
        }
    }
}

/// Reads commands line by line: a prompt on a terminal, plain lines otherwise.
async fn repl(client: &mut Client, json: bool) -> i32 {
    let interactive = std::io::stdin().is_terminal();
    let mut worst = 0;
    let mut lines = std::io::stdin().lock().lines();
    loop {
        if interactive {
            print!("walkv({})> ", client.id());
            let _ = std::io::stdout().flush();
        }
        // Blocking stdin on the current-thread runtime is fine: nothing else runs meanwhile.
        let line = match lines.next() {
            Some(Ok(line)) => line,
            Some(Err(e)) => {
                eprintln!("error: reading stdin: {e}");
                return 2;
            }
            None => break,
        };
        let words = match cli::split_words(&line) {
            Ok(w) => w,
            Err(e) => {
                eprintln!("error: {e}");
                worst = worst.max(2);
                continue;
            }
        };
        match words.first().map(String::as_str) {
            None => continue,
            Some("quit" | "exit") => break,
            Some("help") => {
                println!("{}", cli::REPL_HELP);
                continue;
            }
            _ => {}
        }
        match cli::parse_line(&words) {
            Ok(cmd) => worst = worst.max(cli::execute(client, cmd, json).await),
            Err(e) => {
                eprintln!("{e}");
                worst = worst.max(2);
            }
        }
    }
    worst
}
