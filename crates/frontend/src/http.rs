//! The HTTP/JSON door (`http_listen`, default 127.0.0.1:7080): REST key-value API, the
//! WebSocket watch feed, `/metrics`, `/health` and the status page at `/`.
//!
//! Every handler is a thin adapter over [`Api`] (the same `Frontend` code path the tarpc
//! door serves); this module only translates HTTP to calls and `KvError` to statuses.
//!
//! # Routes
//!
//! | route | answer |
//! |---|---|
//! | `GET /v1/kv/{key}` | `{"key","value","version"}`, header `X-Walkv-Version` |
//! | `PUT /v1/kv/{key}[?cas=V]` | body = value; `{"key","version"}` |
//! | `DELETE /v1/kv/{key}` | `{"key","version"}` |
//! | `GET /v1/kv?prefix=P&limit=N` | `{"items":[{"key","value","version"}]}` |
//! | `GET /v1/status`, `GET /v1/nodes` | the cluster status / its node list |
//! | `GET /v1/watch?prefix=P&from=V` | WebSocket: one JSON change per message |
//! | `GET /health` | 200 `{"status":"ok"}`, 503 when reads and writes are not served |
//! | `GET /metrics` | Prometheus text |
//! | `GET /` | the status page (static HTML/JS in the binary) |
//!
//! Writes may carry `X-Walkv-Client` and `X-Walkv-Op` (both or neither): a retry with the
//! same pair is applied at most once. Without them the write uses an anonymous lane
//! ([`crate::api`]).
//!
//! # Errors and limits
//!
//! Errors are `{"error": <KvError::code>, "message": ...}` (plus `"current"` for a version
//! mismatch) with 400 (bad key/input), 404, 409 (version mismatch), 410 (watch history
//! compacted), 413 (too large, also for a body over `max_value_bytes`), 503 (unavailable),
//! 504 (timeout: outcome unknown). Connections are capped at `max_connections` (further
//! ones wait in the kernel backlog); WebSocket messages from clients are capped at
//! [`WS_MAX_MESSAGE`]. A watcher that falls more than the change ring behind, or cannot take
//! a message within [`WS_SEND_TIMEOUT`], is disconnected (with an error message when the
//! socket still takes one); writes never wait for watchers.

use crate::api::Api;
use crate::metrics;
use crate::watch::CHANGE_LOG_MAX;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::{SinkExt, StreamExt};
use serde_json::json;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};
use walkv_shared::types::WriteOp;
use walkv_shared::{KvError, Seq};

/// The status page, shipped inside the binary.
const STATUS_PAGE: &str = include_str!("../assets/status.html");
/// Header carrying a value's version.
pub const VERSION_HEADER: &str = "x-walkv-version";
/// Header naming the client id of a write (with [`OP_HEADER`]).
pub const CLIENT_HEADER: &str = "x-walkv-client";
/// Header carrying the client's operation number.
pub const OP_HEADER: &str = "x-walkv-op";
/// Largest WebSocket message or frame a client may send; watchers only send control
/// messages, so anything bigger is abuse.
pub const WS_MAX_MESSAGE: usize = 64 * 1024;
/// Longest one WebSocket send may take before the watcher counts as stuck.
pub const WS_SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one watch poll waits for news before polling again (and noticing a close).
const WS_POLL_WAIT: Duration = Duration::from_secs(5);
/// Most changes fetched per watch poll.
const WS_BATCH: u32 = 1000;

/// Serves the HTTP door on `listener` until `shutdown` resolves.
pub async fn serve(
    api: Api,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let max_conns = api.cluster.config.max_connections as usize;
    let body_limit = api.cluster.config.max_value_bytes as usize;
    let app = router(api).layer(DefaultBodyLimit::max(body_limit));
    let listener = CappedListener {
        inner: listener,
        slots: Arc::new(Semaphore::new(max_conns)),
    };
    if let Ok(addr) = listener.inner.local_addr() {
        info!(addr = %addr, "http door listening");
    }
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        warn!(error = %e, "http door stopped");
    }
}

/// The routes over `api`.
pub fn router(api: Api) -> Router {
    Router::new()
        .route("/", get(|| async { Html(STATUS_PAGE) }))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/v1/status", get(status))
        .route("/v1/nodes", get(nodes))
        .route("/v1/kv", get(scan))
        .route(
            "/v1/kv/{*key}",
            get(get_key).put(put_key).delete(delete_key),
        )
        .route("/v1/watch", get(watch))
        .fallback(|| async {
            error_response(StatusCode::NOT_FOUND, "not_found", "no such route".into())
        })
        .with_state(api)
}

/// The HTTP status for an error. Pure.
pub fn status_of(e: &KvError) -> StatusCode {
    match e {
        KvError::NotFound => StatusCode::NOT_FOUND,
        KvError::VersionMismatch { .. } => StatusCode::CONFLICT,
        KvError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        KvError::InvalidKey(_) | KvError::InvalidInput(_) => StatusCode::BAD_REQUEST,
        KvError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        KvError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        KvError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
        KvError::Compacted { .. } => StatusCode::GONE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The JSON body for an error. Pure.
pub fn error_json(e: &KvError) -> serde_json::Value {
    let mut body = json!({"error": e.code(), "message": e.to_string()});
    match e {
        KvError::VersionMismatch { current } => body["current"] = json!(current.0),
        KvError::Compacted { current, .. } => body["current"] = json!(current.0),
        _ => {}
    }
    body
}

fn error_response(status: StatusCode, code: &str, message: String) -> Response {
    (status, Json(json!({"error": code, "message": message}))).into_response()
}

fn kv_error(e: KvError) -> Response {
    (status_of(&e), Json(error_json(&e))).into_response()
}

fn bad_request(message: impl Into<String>) -> Response {
    kv_error(KvError::InvalidInput(message.into()))
}

fn with_version(version: Seq, body: serde_json::Value) -> Response {
    let mut resp = Json(body).into_response();
    if let Ok(v) = HeaderValue::from_str(&version.0.to_string()) {
        resp.headers_mut().insert(VERSION_HEADER, v);
    }
    resp
}

async fn health(State(api): State<Api>) -> Response {
    let s = api.status().await;
    let code = if s.available {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let status = if s.available { "ok" } else { "unavailable" };
    (code, Json(json!({"status": status, "state": s.state, "epoch": s.epoch, "commit_seq": s.commit_seq}))).into_response()
}

async fn metrics_text(State(api): State<Api>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics::render(&api.cluster),
    )
        .into_response()
}

async fn status(State(api): State<Api>) -> Response {
    Json(api.status().await).into_response()
}

async fn nodes(State(api): State<Api>) -> Response {
    Json(json!({"nodes": api.status().await.nodes})).into_response()
}

async fn scan(State(api): State<Api>, Query(q): Query<HashMap<String, String>>) -> Response {
    let prefix = q.get("prefix").cloned().unwrap_or_default();
    let limit = match q.get("limit").map(|l| l.parse::<u32>()) {
        None => 0,
        Some(Ok(l)) => l,
        Some(Err(_)) => return bad_request("limit must be a non-negative integer"),
    };
    match api.scan(prefix, limit).await {
        Ok(items) => Json(json!({"items": items})).into_response(),
        Err(e) => kv_error(e),
    }
}

async fn get_key(State(api): State<Api>, Path(key): Path<String>) -> Response {
    match api.get(key.clone()).await {
        Ok(v) => with_version(
            v.version,
            json!({"key": key, "value": v.value, "version": v.version}),
        ),
        Err(e) => kv_error(e),
    }
}

/// The `(client, op_no)` from the headers: both, neither, or an error. Pure.
pub fn client_headers(headers: &HeaderMap) -> Result<Option<(String, u64)>, KvError> {
    let text = |name: &str| {
        headers
            .get(name)
            .map(|v| {
                v.to_str()
                    .map(str::to_string)
                    .map_err(|_| KvError::InvalidInput(format!("{name} must be ASCII")))
            })
            .transpose()
    };
    match (text(CLIENT_HEADER)?, text(OP_HEADER)?) {
        (None, None) => Ok(None),
        (Some(c), Some(op)) => {
            let op_no = op.trim().parse::<u64>().map_err(|_| {
                KvError::InvalidInput(format!("{OP_HEADER} must be a positive integer"))
            })?;
            Ok(Some((c, op_no)))
        }
        _ => Err(KvError::InvalidInput(format!(
            "give both {CLIENT_HEADER} and {OP_HEADER}, or neither"
        ))),
    }
}

async fn put_key(
    State(api): State<Api>,
    Path(key): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return kv_error(KvError::TooLarge {
                what: "value".into(),
                limit: api.cluster.config.max_value_bytes.into(),
            })
        }
        Err(r) => return bad_request(format!("cannot read the body: {r}")),
    };
    let Ok(value) = String::from_utf8(body.to_vec()) else {
        return bad_request("the value must be UTF-8 text");
    };
    let op = match q.get("cas").map(|v| v.parse::<u64>()) {
        None => WriteOp::Put {
            key: key.clone(),
            value,
        },
        Some(Ok(expected)) => WriteOp::Cas {
            key: key.clone(),
            expected: Seq(expected),
            value,
        },
        Some(Err(_)) => {
            return bad_request("cas must be a version number (0 = key must be absent)")
        }
    };
    write(api, key, op, &headers).await
}

async fn delete_key(
    State(api): State<Api>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> Response {
    write(api, key.clone(), WriteOp::Delete { key }, &headers).await
}

async fn write(api: Api, key: String, op: WriteOp, headers: &HeaderMap) -> Response {
    let id = match client_headers(headers) {
        Ok(id) => id,
        Err(e) => return kv_error(e),
    };
    match api.write(op, id).await {
        Ok(r) => with_version(r.version, json!({"key": key, "version": r.version})),
        Err(e) => kv_error(e),
    }
}

async fn watch(
    State(api): State<Api>,
    Query(q): Query<HashMap<String, String>>,
    ws: WebSocketUpgrade,
) -> Response {
    let prefix = q.get("prefix").cloned().unwrap_or_default();
    let from = match q.get("from").map(|v| v.parse::<u64>()) {
        // Without `from`, the feed starts with the next change.
        None => api.cluster.commit().next(),
        Some(Ok(v)) => Seq(v),
        Some(Err(_)) => return bad_request("from must be a version number"),
    };
    if prefix.len() > api.cluster.config.max_key_bytes as usize {
        return kv_error(KvError::TooLarge {
            what: "prefix".into(),
            limit: api.cluster.config.max_key_bytes.into(),
        });
    }
    ws.max_message_size(WS_MAX_MESSAGE)
        .max_frame_size(WS_MAX_MESSAGE)
        .on_upgrade(move |socket| watch_session(api, socket, prefix, from))
}

/// Why a watch session ended, if the client should hear it.
fn lag_error(next: Seq) -> serde_json::Value {
    json!({
        "error": "lagging",
        "message": format!("watcher fell more than {CHANGE_LOG_MAX} changes behind; reconnect with from={next}"),
        "next": next.0,
    })
}

async fn watch_session(api: Api, socket: WebSocket, prefix: String, from: Seq) {
    let _gauge = SessionGauge::open();
    let (mut tx, mut rx) = socket.split();
    let mut next = from;
    let mut live = false;
    loop {
        let polled = tokio::select! {
            msg = rx.next() => match msg {
                // Client messages carry nothing for us; a close, an error or a malformed
                // frame ends this session only.
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => continue,
            },
            polled = api.watch(prefix.clone(), next, WS_BATCH, WS_POLL_WAIT) => polled,
        };
        let batch = match polled {
            Ok(b) => b,
            Err(e) => {
                let _ = send(&mut tx, error_json(&e)).await;
                break;
            }
        };
        let covered = api.cluster.changes.covered_from();
        if live && covered > next {
            let _ = send(&mut tx, lag_error(next)).await;
            break;
        }
        live = covered != Seq(0) && next >= covered;
        let mut ok = true;
        for c in &batch.changes {
            if send(&mut tx, json!(c)).await.is_err() {
                ok = false;
                break;
            }
        }
        if !ok {
            break;
        }
        next = batch.next;
    }
    debug!(prefix = %prefix, next = %next, "watch session ended");
    let _ = tokio::time::timeout(WS_SEND_TIMEOUT, tx.close()).await;
}

async fn send(
    tx: &mut futures::stream::SplitSink<WebSocket, Message>,
    body: serde_json::Value,
) -> Result<(), ()> {
    match tokio::time::timeout(
        WS_SEND_TIMEOUT,
        tx.send(Message::Text(body.to_string().into())),
    )
    .await
    {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

/// Counts an open watch session in the metrics while alive.
struct SessionGauge;

impl SessionGauge {
    fn open() -> SessionGauge {
        metrics::METRICS.watch_sessions.inc();
        SessionGauge
    }
}

impl Drop for SessionGauge {
    fn drop(&mut self) {
        metrics::METRICS.watch_sessions.dec();
    }
}

/// A listener that admits at most `max_connections` connections at once: the next accept
/// waits for a slot, so excess clients queue in the kernel backlog instead of exhausting
/// file descriptors.
struct CappedListener {
    inner: TcpListener,
    slots: Arc<Semaphore>,
}

/// A connection holding its slot until it is dropped.
struct CappedStream {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl axum::serve::Listener for CappedListener {
    type Io = CappedStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        /// Pause after a failed accept so a persistent error does not spin.
        const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
        loop {
            // The semaphore is never closed, so acquiring only waits.
            let Ok(slot) = self.slots.clone().acquire_owned().await else {
                continue;
            };
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    return (
                        CappedStream {
                            stream,
                            _slot: slot,
                        },
                        addr,
                    )
                }
                Err(e) => {
                    warn!(error = %e, "http accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

impl AsyncRead for CappedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for CappedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_fitting_statuses() {
        assert_eq!(status_of(&KvError::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(
            status_of(&KvError::VersionMismatch { current: Seq(3) }),
            StatusCode::CONFLICT
        );
        assert_eq!(
            error_json(&KvError::VersionMismatch { current: Seq(3) })["current"],
            3
        );
        assert_eq!(
            status_of(&KvError::TooLarge {
                what: "value".into(),
                limit: 1
            }),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert_eq!(
            status_of(&KvError::Unavailable("x".into())),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            status_of(&KvError::InvalidKey("x".into())),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(error_json(&KvError::NotFound)["error"], "not_found");
    }

    #[test]
    fn client_headers_need_both_or_neither() {
        let mut h = HeaderMap::new();
        assert_eq!(client_headers(&h).unwrap(), None);
        h.insert(CLIENT_HEADER, HeaderValue::from_static("app"));
        assert!(client_headers(&h).is_err());
        h.insert(OP_HEADER, HeaderValue::from_static("7"));
        assert_eq!(client_headers(&h).unwrap(), Some(("app".into(), 7)));
        h.insert(OP_HEADER, HeaderValue::from_static("x"));
        assert!(client_headers(&h).is_err());
    }
}
