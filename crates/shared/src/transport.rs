//! Framing and connection helpers shared by every tarpc endpoint.
//!
//! Frames are length-delimited JSON, byte for byte what `tarpc::tokio_serde::formats::Json`
//! reads and writes, through [`SliceJson`]: it decodes each frame with
//! `serde_json::from_slice` instead of tokio-serde's `from_reader`, which goes byte by
//! byte through `io::Read` (the slice parser was 1.2–2.7× faster on our messages). Every
//! connection sets `max_frame_length` explicitly (tarpc's example uses `usize::MAX`) and
//! every connect has a timeout.
//!
//! Writes are coalesced ([`CoalescingStream`]): a flush first yields once to the runtime, so
//! the other answers and requests that are ready on this connection join the same write.
//! One `writev` per message was the largest single cost of a loaded frontend.

use std::future::Future;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll, Wake, Waker};
use std::time::{Duration, Instant, SystemTime};
use tarpc::serde_transport::Transport;
use tarpc::tokio_serde::{Deserializer, Serializer};
use tarpc::tokio_util::bytes::{Bytes, BytesMut};
use tarpc::tokio_util::codec::LengthDelimitedCodec;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A tarpc transport over TCP with JSON frames.
pub type JsonTransport<In, Out> = Transport<CoalescingStream, In, Out, SliceJson<In, Out>>;

/// A TCP stream whose writes wait one scheduler turn before going out.
///
/// tarpc flushes as soon as no further message is ready *at that instant*; under load the
/// task that answers the next request is usually runnable but has not run yet, so every
/// message cost a syscall (and, on loopback, the peer's receive path too). Before each
/// write this stream yields once: the runtime first runs every other ready task, then
/// wakes the writer, and the write carries whatever was buffered meanwhile. A lone
/// message is delayed by one scheduler turn (microseconds); nothing is reordered and no
/// timer is involved. Reads pass straight through.
#[derive(Debug)]
pub struct CoalescingStream<S = TcpStream> {
    inner: S,
    /// Set while a write waits for its scheduler turn.
    turn: Option<Arc<Turn>>,
}

/// The waker handed to the deferred wake-up: it records that the turn came, so a wake for
/// another reason (say, one more answer queued) does not end the wait early.
#[derive(Debug)]
struct Turn {
    came: AtomicBool,
    task: Waker,
}

impl Wake for Turn {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.came.store(true, Ordering::Release);
        self.task.wake_by_ref();
    }
}

impl<S> CoalescingStream<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> CoalescingStream<S> {
        CoalescingStream { inner, turn: None }
    }

    /// `Ready` once this write's scheduler turn came; until then `Pending`.
    fn poll_turn(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match &self.turn {
            Some(turn) if turn.came.load(Ordering::Acquire) => Poll::Ready(()),
            Some(_) => Poll::Pending,
            None => {
                let turn = Arc::new(Turn {
                    came: AtomicBool::new(false),
                    task: cx.waker().clone(),
                });
                let waker = Waker::from(turn.clone());
                // tokio's yield_now defers the wake until the worker has run the other ready
                // tasks; one poll registers it, and it fires although the future is dropped.
                let yielded = std::pin::pin!(tokio::task::yield_now());
                let _ = yielded.poll(&mut Context::from_waker(&waker));
                self.turn = Some(turn);
                Poll::Pending
            }
        }
    }

    fn wrote<T>(&mut self, r: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        if r.is_ready() {
            self.turn = None;
        }
        r
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for CoalescingStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CoalescingStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_turn(cx));
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.wrote(r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_turn(cx));
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.wrote(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

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
        .new_framed(CoalescingStream::new(stream));
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

    /// An `AsyncWrite` that records each write call.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl AsyncWrite for Writes {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.get_mut().0.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Sends `i..5` one per task, each task spawning the next after its send, so a writer
    /// woken by one message runs before the next message exists.
    fn send_chain(tx: futures::channel::mpsc::UnboundedSender<Bytes>, i: u8) {
        if i < 5 {
            tokio::spawn(async move {
                tx.unbounded_send(Bytes::from(vec![i])).unwrap();
                send_chain(tx, i + 1);
            });
        }
    }

    /// A writer fed like tarpc's (send what is ready, flush when nothing is) writes the
    /// messages that become ready within one scheduler turn together, in order. Without the
    /// yield, the chain below makes one write per message.
    #[tokio::test(flavor = "current_thread")]
    async fn messages_ready_in_the_same_turn_share_one_write() {
        use futures::StreamExt;
        use tarpc::tokio_util::codec::{FramedWrite, LengthDelimitedCodec};
        let (tx, rx) = futures::channel::mpsc::unbounded::<Bytes>();
        let writer = tokio::spawn(async move {
            let mut sink = FramedWrite::new(
                CoalescingStream::new(Writes::default()),
                LengthDelimitedCodec::new(),
            );
            rx.map(Ok).forward(&mut sink).await.unwrap();
            sink.into_inner().inner.0
        });
        send_chain(tx, 0);
        let writes = writer.await.unwrap();
        let expected: Vec<u8> = (0u8..5).flat_map(|i| [0, 0, 0, 1, i]).collect();
        assert_eq!(writes.concat(), expected, "every message, in order");
        assert_eq!(writes.len(), 1, "5 messages ready in one turn: {writes:?}");
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
