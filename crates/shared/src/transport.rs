//! Framing and connection helpers shared by every tarpc endpoint.
//!
//! Frames are length-delimited JSON (`tarpc::tokio_serde::formats::Json`). Every
//! connection sets `max_frame_length` explicitly (tarpc's example uses `usize::MAX`) and
//! every connect has a timeout.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};
use tarpc::serde_transport::Transport;
use tarpc::tokio_serde::formats::Json;
use tarpc::tokio_util::codec::LengthDelimitedCodec;
use tokio::net::TcpStream;

/// A tarpc transport over TCP with JSON frames.
pub type JsonTransport<In, Out> = Transport<TcpStream, In, Out, Json<In, Out>>;

/// Wraps an accepted or connected stream with a bounded length-delimited JSON codec.
pub fn json_transport<In, Out>(stream: TcpStream, max_frame: usize) -> JsonTransport<In, Out>
where
    In: for<'de> serde::Deserialize<'de>,
    Out: serde::Serialize,
{
    // Latency matters more than packet count for small RPCs.
    let _ = stream.set_nodelay(true);
    let framed = LengthDelimitedCodec::builder()
        .max_frame_length(max_frame)
        .new_framed(stream);
    tarpc::serde_transport::new(framed, Json::default())
}

/// Connects to `addr` within `timeout`.
pub async fn connect<In, Out>(
    addr: &str,
    timeout: Duration,
    max_frame: usize,
) -> std::io::Result<JsonTransport<In, Out>>
where
    In: for<'de> serde::Deserialize<'de>,
    Out: serde::Serialize,
{
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connect to {addr} timed out"),
            )
        })??;
    Ok(json_transport(stream, max_frame))
}

/// A tarpc context whose deadline is `timeout` from now (never tarpc's implicit 10 s).
pub fn context_with_timeout(timeout: Duration) -> tarpc::context::Context {
    let mut ctx = tarpc::context::current();
    ctx.deadline = Instant::now() + timeout;
    ctx
}

/// Parses `ip:port`, naming the flag or key in the error.
pub fn parse_addr(what: &str, s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|e| format!("{what}: expected ip:port such as 127.0.0.1:7000, got {s:?} ({e})"))
}

/// Milliseconds since the Unix epoch (for op numbers and diagnostics only).
pub fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}
