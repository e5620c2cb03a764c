//! The Redis-protocol door (`resp_listen`, default 127.0.0.1:6380): RESP2 and inline text
//! commands over TCP, so `redis-cli`, `redis-benchmark` and `nc` work against walkv.
//!
//! Each connection is one task: it reads bytes, lets the pure parser ([`crate::resp`]) cut
//! commands, runs each through [`Api`] (the same code path as every other door) in order,
//! and writes the replies; pipelined commands are answered in order.
//!
//! # Commands
//!
//! `GET k`, `SET k v [NX]` (NX is a cas on "absent"), `PUT k v...` (inline alias; the
//! remaining words are joined with spaces), `DEL k...` / `DELETE k...`, `EXISTS k...`,
//! `MGET k...`, `KEYS prefix*`, `SCAN cursor [MATCH prefix*] [COUNT n]` (one pass: the
//! cursor returned is always 0), `PING [msg]`, `ECHO msg`, `INFO [section]` (server and a
//! replication-like section: epoch, commit index, nodes with role, seq and lag), `COMMAND`
//! (empty reply, so redis-cli starts), `CONFIG GET` (empty), `SELECT 0`, `CLIENT ...`,
//! `QUIT`. Anything else gets `-ERR unknown command`, and the connection stays open.
//!
//! # Limits and bad input
//!
//! At most `max_connections` connections (more wait in the backlog); bulk strings up to
//! `max_value_bytes`, [`MAX_ARGS`] arguments, [`MAX_LINE`] per line; a command that breaks
//! a limit or is not RESP gets `-ERR Protocol error: ...` and that connection is closed,
//! since the stream cannot be re-synchronised. A command left half-sent for
//! [`PARTIAL_COMMAND_TIMEOUT`] closes the connection, so slow clients cannot pin slots
//! forever with partial frames. Nothing a client sends affects another connection.

use crate::api::Api;
use crate::resp::{self, Limits};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};
use walkv_shared::types::{NodeRole, WriteOp};
use walkv_shared::{KvError, Seq};

/// Most arguments in one command (MGET / DEL / EXISTS of many keys).
pub const MAX_ARGS: usize = 4096;
/// Longest header or inline line.
pub const MAX_LINE: usize = 64 * 1024;
/// How long the rest of a partly received command may take.
pub const PARTIAL_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 16 * 1024;

/// Serves the RESP door on `listener` until `shutdown` resolves; then closes every
/// connection (RESP clients reconnect).
pub async fn serve(api: Api, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    let slots = Arc::new(Semaphore::new(api.cluster.config.max_connections as usize));
    let limits = Limits {
        max_args: MAX_ARGS,
        max_bulk: api.cluster.config.max_value_bytes as usize,
        max_line: MAX_LINE,
    };
    let started = Instant::now();
    if let Ok(addr) = listener.local_addr() {
        info!(addr = %addr, "resp door listening");
    }
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            slot = slots.clone().acquire_owned() => {
                // The semaphore is never closed.
                let Ok(slot) = slot else { continue };
                tokio::select! {
                    _ = &mut shutdown => break,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, peer)) => {
                            debug!(peer = %peer, "resp connection");
                            let api = api.clone();
                            conns.spawn(async move {
                                let _slot = slot;
                                connection(api, stream, limits, started).await;
                            });
                        }
                        Err(e) => {
                            warn!(error = %e, "resp accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}

async fn connection(api: Api, mut stream: TcpStream, limits: Limits, started: Instant) {
    let port = stream.local_addr().map(|a| a.port()).unwrap_or(0);
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut chunk = vec![0u8; READ_CHUNK];
    loop {
        // Answer every complete command already buffered, then read more.
        let mut out = Vec::new();
        let mut used = 0;
        let mut close = false;
        loop {
            match resp::parse(&buf[used..], &limits) {
                Ok(Some((args, n))) => {
                    used += n;
                    if args.is_empty() {
                        continue;
                    }
                    if execute(&api, &args, &mut out, port, started).await == Flow::Quit {
                        close = true;
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    resp::error(&mut out, &format!("ERR {e}"));
                    close = true;
                    break;
                }
            }
        }
        buf.drain(..used);
        if !out.is_empty() && stream.write_all(&out).await.is_err() {
            return;
        }
        if close {
            let _ = stream.shutdown().await;
            return;
        }
        let read = if buf.is_empty() {
            stream.read(&mut chunk).await
        } else {
            match tokio::time::timeout(PARTIAL_COMMAND_TIMEOUT, stream.read(&mut chunk)).await {
                Ok(r) => r,
                Err(_) => {
                    let mut out = Vec::new();
                    resp::error(&mut out, "ERR timeout waiting for the rest of the command");
                    let _ = stream.write_all(&out).await;
                    return;
                }
            }
        };
        match read {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Whether the connection continues.
#[derive(PartialEq, Eq)]
enum Flow {
    Continue,
    Quit,
}

fn text(b: &[u8]) -> Result<String, KvError> {
    String::from_utf8(b.to_vec())
        .map_err(|_| KvError::InvalidInput("keys and values must be UTF-8 text".into()))
}

fn kv_err(out: &mut Vec<u8>, e: &KvError) {
    resp::error(out, &format!("ERR {e}"));
}

fn wrong_args(out: &mut Vec<u8>, cmd: &str) {
    resp::error(
        out,
        &format!(
            "ERR wrong number of arguments for '{}' command",
            cmd.to_lowercase()
        ),
    );
}

/// Runs one command and appends its reply.
async fn execute(
    api: &Api,
    args: &[Vec<u8>],
    out: &mut Vec<u8>,
    port: u16,
    started: Instant,
) -> Flow {
    let cmd = String::from_utf8_lossy(&args[0]).to_uppercase();
    let argc = args.len();
    match cmd.as_str() {
        "PING" if argc == 1 => resp::simple(out, "PONG"),
        "PING" | "ECHO" if argc == 2 => resp::bulk(out, Some(&args[1])),
        "GET" if argc == 2 => match get(api, &args[1]).await {
            Ok(v) => resp::bulk(out, v.as_ref().map(|s| s.as_bytes())),
            Err(e) => kv_err(out, &e),
        },
        "SET" if argc >= 3 => set(api, args, out).await,
        "PUT" if argc >= 3 => {
            let value = args[2..].join(&b' ');
            match put(api, &args[1], &value, false).await {
                Ok(_) => resp::simple(out, "OK"),
                Err(e) => kv_err(out, &e),
            }
        }
        "DEL" | "DELETE" if argc >= 2 => match del(api, &args[1..]).await {
            Ok(n) => resp::integer(out, n),
            Err(e) => kv_err(out, &e),
        },
        "EXISTS" if argc >= 2 => {
            let mut n = 0;
            for k in &args[1..] {
                match get(api, k).await {
                    Ok(Some(_)) => n += 1,
                    Ok(None) => {}
                    Err(e) => {
                        kv_err(out, &e);
                        return Flow::Continue;
                    }
                }
            }
            resp::integer(out, n);
        }
        "MGET" if argc >= 2 => mget(api, &args[1..], out).await,
        "KEYS" if argc == 2 => match resp::pattern_prefix(&args[1]) {
            Some(p) => keys(api, p, out).await,
            None => resp::error(out, "ERR only 'prefix*' patterns are supported"),
        },
        "SCAN" if argc >= 2 => scan(api, &args[1..], out).await,
        "INFO" => info(api, out, port, started).await,
        "COMMAND" => resp::array_header(out, 0),
        "CONFIG" if argc == 3 && args[1].eq_ignore_ascii_case(b"GET") => config_get(&args[2], out),
        "SELECT" if argc == 2 => {
            if args[1] == b"0" {
                resp::simple(out, "OK")
            } else {
                resp::error(out, "ERR DB index is out of range")
            }
        }
        "CLIENT" => resp::simple(out, "OK"),
        "QUIT" => {
            resp::simple(out, "OK");
            return Flow::Quit;
        }
        "PING" | "ECHO" | "GET" | "SET" | "PUT" | "DEL" | "DELETE" | "EXISTS" | "MGET" | "KEYS"
        | "SCAN" | "SELECT" | "CONFIG" => wrong_args(out, &cmd),
        _ => {
            let shown: String = cmd.chars().take(64).collect();
            resp::error(out, &format!("ERR unknown command '{shown}'"));
        }
    }
    Flow::Continue
}

/// `CONFIG GET`: what redis-benchmark asks at start (`save`, `appendonly`), answered with
/// what describes walkv (every write is durable before it is acknowledged); other
/// parameters are unknown (empty array, as redis answers for a parameter it lacks).
fn config_get(param: &[u8], out: &mut Vec<u8>) {
    let value: &[u8] = match param.to_ascii_lowercase().as_slice() {
        b"save" => b"",
        b"appendonly" => b"yes",
        b"appendfsync" => b"always",
        _ => return resp::array_header(out, 0),
    };
    resp::array_header(out, 2);
    resp::bulk(out, Some(param));
    resp::bulk(out, Some(value));
}

async fn get(api: &Api, key: &[u8]) -> Result<Option<String>, KvError> {
    match api.get(text(key)?).await {
        Ok(v) => Ok(Some(v.value)),
        Err(KvError::NotFound) => Ok(None),
        Err(e) => Err(e),
    }
}

async fn put(api: &Api, key: &[u8], value: &[u8], nx: bool) -> Result<Seq, KvError> {
    let key = text(key)?;
    let value = text(value)?;
    let op = if nx {
        WriteOp::Cas {
            key,
            expected: Seq(0),
            value,
        }
    } else {
        WriteOp::Put { key, value }
    };
    api.write(op, None).await.map(|r| r.version)
}

async fn set(api: &Api, args: &[Vec<u8>], out: &mut Vec<u8>) {
    let nx = match &args[3..] {
        [] => false,
        [o] if o.eq_ignore_ascii_case(b"NX") => true,
        _ => return resp::error(out, "ERR syntax error (walkv supports SET key value [NX])"),
    };
    match put(api, &args[1], &args[2], nx).await {
        Ok(_) => resp::simple(out, "OK"),
        // Redis answers a SET NX on an existing key with nil.
        Err(KvError::VersionMismatch { .. }) if nx => resp::bulk(out, None),
        Err(e) => kv_err(out, &e),
    }
}

async fn del(api: &Api, keys: &[Vec<u8>]) -> Result<i64, KvError> {
    let mut n = 0;
    for k in keys {
        match api.write(WriteOp::Delete { key: text(k)? }, None).await {
            Ok(_) => n += 1,
            Err(KvError::NotFound) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

async fn mget(api: &Api, keys: &[Vec<u8>], out: &mut Vec<u8>) {
    let mut values = Vec::with_capacity(keys.len());
    for k in keys {
        match get(api, k).await {
            Ok(v) => values.push(v),
            Err(e) => return kv_err(out, &e),
        }
    }
    resp::array_header(out, values.len());
    for v in values {
        resp::bulk(out, v.as_ref().map(|s| s.as_bytes()));
    }
}

async fn scan_keys(api: &Api, prefix: &[u8], count: u32) -> Result<Vec<String>, KvError> {
    let items = api.scan(text(prefix)?, count).await?;
    Ok(items.into_iter().map(|kv| kv.key).collect())
}

async fn keys(api: &Api, prefix: &[u8], out: &mut Vec<u8>) {
    match scan_keys(api, prefix, 0).await {
        Ok(keys) => {
            resp::array_header(out, keys.len());
            for k in keys {
                resp::bulk(out, Some(k.as_bytes()));
            }
        }
        Err(e) => kv_err(out, &e),
    }
}

/// `SCAN cursor [MATCH p] [COUNT n]`: one pass over the prefix (cursor must be 0).
async fn scan(api: &Api, args: &[Vec<u8>], out: &mut Vec<u8>) {
    if args[0] != b"0" {
        return resp::error(
            out,
            "ERR invalid cursor (walkv SCAN returns everything at cursor 0)",
        );
    }
    let mut prefix: &[u8] = b"";
    let mut count = 0u32;
    let mut rest = args[1..].chunks(2);
    for pair in rest.by_ref() {
        match pair {
            [k, v] if k.eq_ignore_ascii_case(b"MATCH") => match resp::pattern_prefix(v) {
                Some(p) => prefix = p,
                None => return resp::error(out, "ERR only 'prefix*' patterns are supported"),
            },
            [k, v] if k.eq_ignore_ascii_case(b"COUNT") => {
                match std::str::from_utf8(v).ok().and_then(|s| s.parse().ok()) {
                    Some(n) => count = n,
                    None => return resp::error(out, "ERR value is not an integer or out of range"),
                }
            }
            _ => return resp::error(out, "ERR syntax error"),
        }
    }
    match scan_keys(api, prefix, count).await {
        Ok(keys) => {
            resp::array_header(out, 2);
            resp::bulk(out, Some(b"0"));
            resp::array_header(out, keys.len());
            for k in keys {
                resp::bulk(out, Some(k.as_bytes()));
            }
        }
        Err(e) => kv_err(out, &e),
    }
}

async fn info(api: &Api, out: &mut Vec<u8>, port: u16, started: Instant) {
    let s = api.status().await;
    let mut t = String::new();
    t.push_str("# Server\r\n");
    t.push_str("redis_version:7.0.0\r\n");
    t.push_str(&format!("walkv_version:{}\r\n", env!("CARGO_PKG_VERSION")));
    t.push_str("redis_mode:standalone\r\n");
    t.push_str(&format!("tcp_port:{port}\r\n"));
    t.push_str(&format!(
        "uptime_in_seconds:{}\r\n",
        started.elapsed().as_secs()
    ));
    t.push_str("\r\n# Replication\r\n");
    t.push_str("role:master\r\n");
    t.push_str(&format!("walkv_state:{}\r\n", s.state));
    t.push_str(&format!("walkv_available:{}\r\n", s.available as u8));
    t.push_str(&format!("walkv_epoch:{}\r\n", s.epoch));
    t.push_str(&format!("walkv_commit_seq:{}\r\n", s.commit_seq));
    t.push_str(&format!("master_repl_offset:{}\r\n", s.commit_seq));
    let in_sync = s
        .nodes
        .iter()
        .filter(|n| n.role == NodeRole::InSync)
        .count();
    t.push_str(&format!("connected_slaves:{in_sync}\r\n"));
    for (i, n) in s.nodes.iter().enumerate() {
        let progress = n
            .catch_up
            .as_ref()
            .map(|c| format!(",catchup={}/{}", c.done, c.total))
            .unwrap_or_default();
        t.push_str(&format!(
            "slave{i}:id={},addr={},state={},offset={},lag={}{progress}\r\n",
            n.id, n.addr, n.role, n.applied_seq, n.lag
        ));
    }
    resp::bulk(out, Some(t.as_bytes()));
}
