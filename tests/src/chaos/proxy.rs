//! A fault-injecting TCP proxy, run in-process on the test's tokio runtime.
//!
//! One [`Proxy`] sits in front of each storage node's listen address; the node advertises
//! the proxy's address (`--advertise`), so every frontend → storage connection (writes,
//! reads, catch-up) passes through it, while the node's own heartbeats go straight to the
//! frontend. The [`Mode`] can change at any time and applies to bytes already in flight:
//!
//! - `Pass`: forward both ways.
//! - `Blackhole`: forward nothing (bytes are held, as TCP retransmits across a partition)
//!   until the mode changes; new connections are accepted and held too.
//! - `DropReplies`: requests reach the node, but the first reply bytes close the
//!   connection: the write happened and the frontend cannot know.
//! - `Delay(ms)`: every chunk waits `ms` before it is forwarded, both ways.
//! - `Bandwidth(bytes/s)`: chunks are forwarded at most at this rate, each way.
//!
//! Bounds: chunks are at most [`CHUNK_BYTES`]; a connection is two tasks aborted with it.

use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Largest chunk read and forwarded at once.
pub const CHUNK_BYTES: usize = 16 * 1024;

/// Proxies listen on this loopback address, not 127.0.0.1: the harness picks the nodes'
/// ports on 127.0.0.1 by binding and releasing them, and a proxy bound in between could
/// otherwise take a port a node is about to listen on (seen in a soak run). It also makes
/// the advertised address differ from the listen address in its IP, as behind NAT.
pub const PROXY_IP: &str = "127.0.0.2";

/// Deadline to connect to the upstream node.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// What the proxy does to traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward both ways.
    Pass,
    /// Hold everything until the mode changes.
    Blackhole,
    /// Close a connection when the node replies.
    DropReplies,
    /// Delay every chunk by this many ms.
    Delay(u64),
    /// Cap each direction at this many bytes per second.
    Bandwidth(u64),
}

/// A running proxy; stops when dropped.
pub struct Proxy {
    /// Address the proxy listens on (what the node advertises).
    pub addr: String,
    mode: Arc<watch::Sender<Mode>>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Binds [`PROXY_IP`]`:0` and forwards to `upstream`. Must be called inside a runtime.
    pub fn start(upstream: &str) -> Proxy {
        let std_listener = std::net::TcpListener::bind((PROXY_IP, 0))
            .unwrap_or_else(|e| panic!("bind proxy on {PROXY_IP}:0: {e}"));
        std_listener
            .set_nonblocking(true)
            .expect("set proxy listener nonblocking");
        let addr = std_listener
            .local_addr()
            .expect("bound socket has an address")
            .to_string();
        let listener = TcpListener::from_std(std_listener).expect("register proxy listener");
        let (tx, _) = watch::channel(Mode::Pass);
        let mode = Arc::new(tx);
        let upstream = upstream.to_string();
        let mode2 = mode.clone();
        // Joined by nothing: aborted in `Drop`, which also ends every connection task.
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((down, _)) = listener.accept().await {
                let (up, rx) = (upstream.clone(), mode2.subscribe());
                conns.spawn(connection(down, up, rx));
                while conns.try_join_next().is_some() {}
            }
        });
        Proxy { addr, mode, task }
    }

    /// Changes the mode; applies to open connections too.
    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn connection(down: TcpStream, upstream: String, mode: watch::Receiver<Mode>) {
    let Ok(Ok(up)) = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&upstream)).await
    else {
        return;
    };
    let _ = down.set_nodelay(true);
    let _ = up.set_nodelay(true);
    let (dr, dw) = down.into_split();
    let (ur, uw) = up.into_split();
    // Either direction ending (EOF, error, dropped reply) closes both sockets.
    tokio::select! {
        _ = pump(dr, uw, mode.clone(), false) => {}
        _ = pump(ur, dw, mode, true) => {}
    }
}

async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
    is_reply: bool,
) {
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        loop {
            let m = *mode.borrow_and_update();
            match m {
                Mode::Blackhole => {
                    if mode.changed().await.is_err() {
                        return;
                    }
                    continue;
                }
                Mode::DropReplies if is_reply => return,
                Mode::Delay(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                Mode::Bandwidth(bps) => {
                    let micros = n as u64 * 1_000_000 / bps.max(1);
                    tokio::time::sleep(Duration::from_micros(micros)).await;
                }
                Mode::Pass | Mode::DropReplies => {}
            }
            break;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> String {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 1024];
                    while let Ok(n) = s.read(&mut b).await {
                        if n == 0 || s.write_all(&b[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn roundtrip(addr: &str, timeout: Duration) -> Option<Vec<u8>> {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(b"ping").await.ok()?;
        let mut b = [0u8; 4];
        match tokio::time::timeout(timeout, s.read_exact(&mut b)).await {
            Ok(Ok(_)) => Some(b.to_vec()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn modes_pass_hold_and_drop() {
        let proxy = Proxy::start(&echo_server().await);
        let t = Duration::from_millis(500);
        assert_eq!(
            roundtrip(&proxy.addr, t).await.as_deref(),
            Some(&b"ping"[..])
        );
        proxy.set(Mode::Blackhole);
        assert_eq!(roundtrip(&proxy.addr, t).await, None, "blackhole holds");
        proxy.set(Mode::DropReplies);
        assert_eq!(roundtrip(&proxy.addr, t).await, None, "reply dropped");
        proxy.set(Mode::Delay(50));
        assert!(roundtrip(&proxy.addr, t).await.is_some());
        proxy.set(Mode::Bandwidth(1000));
        assert!(roundtrip(&proxy.addr, t).await.is_some());
        proxy.set(Mode::Pass);
        assert_eq!(proxy.mode(), Mode::Pass);
    }
}
