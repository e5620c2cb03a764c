//! One child process of a test: spawn, crash, pause, restart, read its log.
//!
//! - [`bin_path`] finds a workspace binary next to the test executable
//!   (`target/<profile>/<name>`), or in `WALKV_BIN_DIR`.
//! - [`free_addr`] picks a port by binding `127.0.0.1:0` and dropping the listener; the
//!   port stays fixed for the test so restarts rebind it (tokio sets `SO_REUSEADDR`).
//! - [`wait_until`] / [`wait_until_async`] poll a condition until a deadline: tests never
//!   sleep to synchronise.
//! - [`NodeProcess`] owns a `Child`; stdout and stderr go to `<dir>/<name>.log` (appended
//!   across restarts). `kill` is SIGKILL (the crash under test), `terminate` SIGTERM,
//!   `pause`/`resume` SIGSTOP/SIGCONT, each sent to the child's own process group (so a
//!   node under `strace -f` goes with its tracer). `Drop` kills and reaps, also when a
//!   test panics. A test binary killed outright (Ctrl-C on `cargo test`, SIGKILL) runs no
//!   destructors, and since its children are not in its process group the terminal's
//!   SIGINT does not reach them either: they keep running until killed by hand
//!   (`pkill -f 'target/debug/(frontend|storage) --config /tmp/'`). Tying them to the test
//!   process (`PR_SET_PDEATHSIG`) would take `unsafe` `pre_exec`, which the workspace
//!   denies, and fires when the spawning *thread* exits, not the process.
//! - [`TestDir`] is a `TempDir` that is kept (and its path printed) with `WALKV_KEEP_TMP=1`.

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How often `wait_until` re-checks its condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Bytes of a log file `log_tail` reads from the end (enough for the last ~100 lines).
const LOG_TAIL_BYTES: u64 = 64 * 1024;

/// Path of workspace binary `name`: `$WALKV_BIN_DIR/<name>`, or the `target/<profile>/`
/// directory that holds the running test executable (`target/<profile>/deps/...`).
/// Panics with "run `make build` first" when it does not exist.
pub fn bin_path(name: &str) -> PathBuf {
    let dir = match std::env::var_os("WALKV_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let exe = std::env::current_exe().expect("current_exe is available on Linux");
            let mut dir = exe
                .parent()
                .expect("test executable has a directory")
                .to_path_buf();
            if dir.ends_with("deps") {
                dir.pop();
            }
            dir
        }
    };
    let path = dir.join(name);
    assert!(path.is_file(), "binary {} not found: run `make build` first (or `cargo build -p walkv-{name}`, or set WALKV_BIN_DIR)", path.display());
    path
}

/// Ports this test process has handed out already. The kernel may give the same free
/// port to two quick `bind(:0)` calls once the first listener is dropped, and two
/// processes of one cluster must never be told the same port.
static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());

/// Most attempts at finding a port not handed out before.
const FREE_PORT_ATTEMPTS: usize = 1000;

/// A free TCP port on 127.0.0.1, never the same one twice in this test process.
///
/// Taken below the kernel's ephemeral range (`ip_local_port_range`) where it can: a port
/// from `bind(:0)` is released before the child binds it, and in between an outgoing
/// connection of any process on the machine may take it as its local port (seen: a storage
/// node's "Address already in use" while another test's cluster was busy). Ports below the
/// range are only ever taken by listeners.
pub fn free_port() -> u16 {
    let below = ephemeral_start().unwrap_or(0);
    for attempt in 0..FREE_PORT_ATTEMPTS {
        let port = if below > LOWEST_PORT + 1000 && attempt < FREE_PORT_ATTEMPTS / 2 {
            let port = rand::Rng::gen_range(&mut rand::thread_rng(), LOWEST_PORT..below);
            match TcpListener::bind(("127.0.0.1", port)) {
                Ok(_) => port,
                Err(_) => continue,
            }
        } else {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
            l.local_addr().expect("bound socket has an address").port()
        };
        // A poisoned lock only means another test panicked; the list is still valid.
        let mut seen = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if !seen.contains(&port) {
            seen.push(port);
            return port;
        }
    }
    panic!("no fresh free port after {FREE_PORT_ATTEMPTS} attempts");
}

/// Lowest port [`free_port`] hands out.
const LOWEST_PORT: u16 = 10_000;

/// First port of the kernel's ephemeral range, if it can be read.
fn ephemeral_start() -> Option<u16> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    range.split_whitespace().next()?.parse().ok()
}

/// `127.0.0.1:<free port>`.
pub fn free_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// Polls `cond` every [`POLL_INTERVAL`] until it returns true (→ true) or `timeout`
/// passes (→ false). Blocking: use [`wait_until_async`] inside async tests.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Async [`wait_until`]: polls `cond().await` until true or `timeout`.
pub async fn wait_until_async<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if tokio::time::timeout_at(deadline, cond()).await == Ok(true) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// A temporary directory, removed on drop unless `WALKV_KEEP_TMP=1`.
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl TestDir {
    /// Creates a directory named after `label` under the system temp dir.
    pub fn new(label: &str) -> TestDir {
        let dir = tempfile::Builder::new()
            .prefix(&format!("walkv-{label}-"))
            .tempdir()
            .expect("create temp dir");
        let path = dir.path().to_path_buf();
        TestDir {
            dir: Some(dir),
            path,
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var("WALKV_KEEP_TMP").as_deref() == Ok("1") {
            if let Some(d) = self.dir.take() {
                eprintln!("WALKV_KEEP_TMP=1: keeping {}", d.keep().display());
            }
        }
    }
}

/// A child process with its log file. Killed and reaped on drop.
pub struct NodeProcess {
    /// Name used for the log file and messages.
    pub name: String,
    /// The running child (replaced by `restart`).
    pub child: Child,
    /// Where stdout and stderr go.
    pub log_path: PathBuf,
    bin: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    exited: Option<ExitStatus>,
}

impl NodeProcess {
    /// Starts `bin args...` with its output appended to `<dir>/<name>.log`.
    pub fn spawn(name: &str, bin: &Path, args: &[String], dir: &Path) -> NodeProcess {
        Self::spawn_with_env(name, bin, args, &[], dir)
    }

    /// Like [`NodeProcess::spawn`] with extra environment variables (`RUST_LOG` defaults to `info`).
    pub fn spawn_with_env(
        name: &str,
        bin: &Path,
        args: &[String],
        env: &[(&str, &str)],
        dir: &Path,
    ) -> NodeProcess {
        let log_path = dir.join(format!("{name}.log"));
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let child = start(bin, args, &env, &log_path);
        NodeProcess {
            name: name.to_string(),
            child,
            log_path,
            bin: bin.to_path_buf(),
            args: args.to_vec(),
            env,
            exited: None,
        }
    }

    /// The log file path.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL and reap: the crash every durability test is about. The whole process
    /// group goes: a node run under `strace -f` (the chaos disk-error fault) would
    /// otherwise outlive its tracer, detached, and keep running after the test.
    pub fn kill(&mut self) {
        if self.exited.is_none() {
            self.signal_group("-KILL");
            // The child may already have exited; kill then fails and wait reaps it.
            let _ = self.child.kill();
            self.exited = self.child.wait().ok();
        }
    }

    /// SIGTERM (graceful shutdown); does not wait. See [`NodeProcess::wait_exit`].
    pub fn terminate(&self) {
        self.signal("-TERM");
    }

    /// SIGSTOP: the process freezes (a long GC pause or a hung VM, as the cluster sees it).
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`NodeProcess::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// Sends `sig` to the child's process group (the child and, under `strace`, the
    /// traced node), so a pause or a shutdown reaches the node itself.
    fn signal(&self, sig: &str) {
        if self.is_alive() {
            assert!(self.signal_group(sig), "kill {sig} {} failed", self.pid());
        }
    }

    /// `kill(1)` on the child's process group (its pid: see [`start`]); false if nothing
    /// was signalled.
    fn signal_group(&self, sig: &str) -> bool {
        Command::new("kill")
            .args([sig, "--", &format!("-{}", self.pid())])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Kills the process if it runs, then starts it again with the same binary and args.
    pub fn restart(&mut self) {
        self.kill();
        self.child = start(&self.bin, &self.args, &self.env, &self.log_path);
        self.exited = None;
    }

    /// Whether the process is still running. Takes `&self`, so it does not reap: an exited
    /// but unreaped child (a zombie) counts as dead.
    pub fn is_alive(&self) -> bool {
        if self.exited.is_some() {
            return false;
        }
        match std::fs::read_to_string(format!("/proc/{}/stat", self.pid())) {
            // The state is the first field after the parenthesised command name.
            Ok(stat) => stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z" && state != "X"),
            Err(_) => false,
        }
    }

    /// Reaps the child if it has exited; true while it runs.
    fn poll_exit(&mut self) -> bool {
        if self.exited.is_some() {
            return false;
        }
        match self.child.try_wait() {
            Ok(Some(status)) => {
                self.exited = Some(status);
                false
            }
            Ok(None) => true,
            Err(_) => false,
        }
    }

    /// Waits up to `timeout` for the process to exit; its status, or `None` if still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_until(timeout, || !self.poll_exit());
        self.exited
    }

    /// Exit status, once the process has exited.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.poll_exit();
        self.exited
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(&self.log_path) {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = f.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)));
            let mut bytes = Vec::new();
            let _ = f.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The whole log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Panics with the log tail if the process has died.
    pub fn assert_alive(&mut self) {
        if !self.poll_exit() {
            panic!(
                "{} exited with {:?}; log {}:\n{}",
                self.name,
                self.exited,
                self.log_path.display(),
                self.log_tail(30)
            );
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        // A paused child ignores nothing: SIGKILL works on stopped processes too.
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- {} log {}:\n{}",
                self.name,
                self.log_path.display(),
                self.log_tail(20)
            );
        }
    }
}

fn start(bin: &Path, args: &[String], env: &[(String, String)], log_path: &Path) -> Child {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .expect("open log file");
    let err = log.try_clone().expect("clone log file handle");
    let mut cmd = Command::new(bin);
    cmd.args(args).stdin(Stdio::null()).stdout(log).stderr(err);
    // Its own process group, so `NodeProcess` can signal everything it started.
    cmd.process_group(0);
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    cmd.env("NO_COLOR", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Property: `kill` takes the child's own children with it (a node under `strace -f`
    /// is the tracer's child). Fails if only the direct child is signalled: the `sleep`
    /// is then orphaned and lives on.
    #[test]
    fn kill_takes_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let args = ["-c".to_string(), "sleep 60 & echo $!; wait".to_string()];
        let mut p = NodeProcess::spawn("sh", Path::new("sh"), &args, dir.path());
        let mut grandchild = None;
        assert!(
            wait_until(Duration::from_secs(10), || {
                grandchild = p.log().trim().parse::<u32>().ok();
                grandchild.is_some()
            }),
            "the shell printed its child's pid"
        );
        let proc_dir = format!("/proc/{}", grandchild.unwrap());
        assert!(Path::new(&proc_dir).exists(), "the sleep runs");
        p.kill();
        assert!(
            wait_until(Duration::from_secs(10), || !Path::new(&proc_dir).exists()),
            "the sleep was killed with its parent"
        );
    }
}
