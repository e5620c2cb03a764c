//! Running external clients (curl, redis-cli, redis-benchmark, nc, chromium) from tests.
//!
//! Every run goes through coreutils `timeout`, so a hung tool fails the test instead of
//! hanging it. [`have`] tells whether a tool is installed; tests skip (printing why) only
//! when one is missing locally; `.ci/run` installs them all.

use std::process::Command;

/// Whether `tool` is on the PATH.
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool} >/dev/null 2>&1")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Returns false (after printing the reason) when any of `tools` is missing.
pub fn require(test: &str, tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !have(t)).collect();
    if missing.is_empty() {
        return true;
    }
    eprintln!(
        "SKIP {test}: {} not installed (apt-get install redis-tools curl netcat-openbsd chromium; .ci/run does)",
        missing.join(", ")
    );
    false
}

/// Output of one tool run.
#[derive(Debug)]
pub struct Output {
    /// Exit code (-1 when killed by a signal).
    pub code: i32,
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
}

/// Runs `tool args...` with at most `secs` seconds, feeding `stdin` when given.
pub fn run(secs: u32, tool: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut cmd = Command::new("timeout");
    cmd.arg("-k")
        .arg("5")
        .arg(secs.to_string())
        .arg(tool)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn timeout (coreutils)");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        // A tool that exits early closes the pipe; that is its answer, not ours to judge.
        let _ = pipe.write_all(input);
    }
    let out = child.wait_with_output().expect("wait for tool");
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `curl` with a 20 s cap: returns (HTTP status, body). Extra args come first.
pub fn curl(args: &[&str], url: &str) -> (u16, String) {
    let mut all = vec!["-sS", "--max-time", "20", "-w", "\n%{http_code}"];
    all.extend_from_slice(args);
    all.push(url);
    let out = run(30, "curl", &all, None);
    let (body, code) = out
        .stdout
        .rsplit_once('\n')
        .unwrap_or(("", out.stdout.as_str()));
    let code = code.trim().parse().unwrap_or_else(|_| {
        panic!("curl {url} gave no status: {out:?}");
    });
    (code, body.to_string())
}

/// Splits `ip:port` into its parts.
pub fn host_port(addr: &str) -> (&str, &str) {
    addr.rsplit_once(':').expect("address is ip:port")
}

/// `redis-cli -h H -p P args...` (30 s cap): its stdout.
pub fn redis_cli(addr: &str, args: &[&str]) -> String {
    let (h, p) = host_port(addr);
    let mut all = vec!["-h", h, "-p", p];
    all.extend_from_slice(args);
    let out = run(30, "redis-cli", &all, None);
    assert_eq!(out.code, 0, "redis-cli {args:?}: {out:?}");
    out.stdout
}
