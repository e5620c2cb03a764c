//! Framing and connection helpers shared by every tarpc endpoint.
//!
//! Frames are length-delimited JSON, byte for byte what `tarpc::tokio_serde::formats::Json`
//! reads and writes, through [`SliceJson`]: it decodes each frame with
//! `serde_json::from_slice` instead of tokio-serde's `from_reader`, which goes byte by
//! byte through `io::Read` (the slice parser was 1.2–2.7× faster on our messages). Every
//! connection sets `max_frame_length` explicitly (tarpc's example uses `usize::MAX`) and
//! every connect has a timeout.

use std::marker::PhantomData;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::{Duration, Instant, SystemTime};
use tarpc::serde_transport::Transport;
use tarpc::tokio_serde::{Deserializer, Serializer};
use tarpc::tokio_util::bytes::{Bytes, BytesMut};
use tarpc::tokio_util::codec::LengthDelimitedCodec;
use tokio::net::TcpStream;

/// A tarpc transport over TCP with JSON frames.
pub type JsonTransport<In, Out> = Transport<TcpStream, In, Out, SliceJson<In, Out>>;

/// The JSON frame codec: the same wire format as tokio-serde's `Json`, decoded from the
/// frame's bytes in one pass.
pub struct SliceJson<In, Out> {
    ghost: PhantomData<fn(Out) -> In>,
}

impl<In, Out> Default for SliceJson<In, Out> {
    fn default() -> Self {
        SliceJson { ghost: PhantomData }
    }
}

impl<In, Out> std::fmt::Debug for SliceJson<In, Out> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SliceJson")
    }
}

impl<In, Out> Deserializer<In> for SliceJson<In, Out>
where
    for<'a> In: serde::Deserialize<'a>,
{
    type Error = serde_json::Error;

    fn deserialize(self: Pin<&mut Self>, src: &BytesMut) -> Result<In, Self::Error> {
        serde_json::from_slice(src)
    }
}

impl<In, Out> Serializer<Out> for SliceJson<In, Out>
where
    Out: serde::Serialize,
{
    type Error = serde_json::Error;

    fn serialize(self: Pin<&mut Self>, item: &Out) -> Result<Bytes, Self::Error> {
        serde_json::to_vec(item).map(Into::into)
    }
}

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
    tarpc::serde_transport::new(framed, SliceJson::default())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::AppendRequest;
    use crate::types::WriteOp;
    use crate::{Epoch, Record, Seq};
    use tarpc::tokio_serde::formats::Json;

    fn sample() -> AppendRequest {
        AppendRequest {
            epoch: Epoch(3),
            commit_seq: Seq(9),
            records: vec![Record {
                seq: Seq(10),
                epoch: Epoch(3),
                client: "c\"1".into(),
                op_no: 4,
                op: WriteOp::Put {
                    key: "k ü".into(),
                    value: "v\n".into(),
                },
            }]
            .into(),
        }
    }

    /// The wire format must stay exactly tokio-serde's `Json`, so old and new processes
    /// (and other tarpc JSON peers) interoperate.
    #[test]
    fn slice_json_is_byte_compatible_with_tokio_serde_json() {
        let mut ours = SliceJson::<AppendRequest, AppendRequest>::default();
        let mut theirs = Json::<AppendRequest, AppendRequest>::default();
        let a = Pin::new(&mut ours).serialize(&sample()).unwrap();
        let b = Pin::new(&mut theirs).serialize(&sample()).unwrap();
        assert_eq!(a, b);
        let frame = BytesMut::from(&b[..]);
        let back: AppendRequest = Pin::new(&mut ours).deserialize(&frame).unwrap();
        assert_eq!(back.records, sample().records);
        let bad = BytesMut::from(&b"{\"epoch\":"[..]);
        assert!(Pin::new(&mut ours).deserialize(&bad).is_err());
    }
}
