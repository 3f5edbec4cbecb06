//! A minimal gRPC server and client for lab tests (HTTP/2 without TLS, prior knowledge), so
//! waypoint tests can route real gRPC calls without generated code: messages are opaque bytes
//! in gRPC's length-prefixed framing, the status travels in `grpc-status` trailers.
//!
//! [`GrpcServer`] answers every call to `/<service>/<method>` with one message
//! `<name> /<service>/<method>` and `grpc-status: 0` in trailers, except methods named `Fail`
//! (a trailers-only answer with `grpc-status: 14`, UNAVAILABLE), and methods named `Chat`: a
//! bidirectional stream answering each message `<name> echo <message>` as it arrives, then
//! `grpc-status: 0` when the client ends its side. [`grpc_call`] makes one unary call and
//! [`grpc_chat`] a bidirectional stream, from inside a namespace.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use weft_netns::NetNs;

use crate::net::{tcp_connect_in, tcp_listen_in};

/// gRPC's framing: a compression flag byte, a 4-byte big-endian length, the message.
pub fn frame(message: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + message.len());
    b.put_u8(0);
    b.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
    b.put_slice(message);
    b.freeze()
}

/// The first message of a framed body, if complete.
pub fn unframe(mut body: Bytes) -> Option<Bytes> {
    if body.len() < 5 {
        return None;
    }
    body.advance(1);
    let len = body.get_u32() as usize;
    (body.len() >= len).then(|| body.split_to(len))
}

/// An async server on a thread of its own (a current-thread runtime), listening on a socket
/// created in a namespace; told to stop and joined on drop.
pub struct ServerThread {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServerThread {
    /// Runs `serve(listener, stopped)` on a new thread; `serve` returns when `stopped` fires.
    pub fn spawn<F, Fut>(
        name: String,
        listener: std::net::TcpListener,
        serve: F,
    ) -> io::Result<Self>
    where
        F: FnOnce(tokio::net::TcpListener, tokio::sync::oneshot::Receiver<()>) -> Fut
            + Send
            + 'static,
        Fut: std::future::Future<Output = ()>,
    {
        listener.set_nonblocking(true)?;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(listener) = tokio::net::TcpListener::from_std(listener) {
                    serve(listener, stopped).await;
                }
            });
        })?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A gRPC server in a namespace (its own thread and runtime), stopped on drop.
pub struct GrpcServer {
    calls: Arc<AtomicUsize>,
    _thread: ServerThread,
}

impl GrpcServer {
    /// Listens on `addr` inside `ns`; `name` goes into every answer.
    pub fn start(ns: &NetNs, addr: SocketAddr, name: &str) -> io::Result<Self> {
        let listener = tcp_listen_in(ns, addr)?;
        let calls = Arc::new(AtomicUsize::new(0));
        let name: Arc<str> = name.into();
        let counter = calls.clone();
        let thread = ServerThread::spawn(
            format!("grpc-server-{addr}"),
            listener,
            move |listener, stopped| async move {
                tokio::pin!(stopped);
                loop {
                    let stream = tokio::select! {
                        accepted = listener.accept() => match accepted {
                            Ok((s, _)) => s,
                            Err(_) => continue,
                        },
                        _ = &mut stopped => return,
                    };
                    let name = name.clone();
                    let counter = counter.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            answer(req, name.clone(), counter.clone())
                        });
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            },
        )?;
        Ok(Self {
            calls,
            _thread: thread,
        })
    }

    /// Calls answered so far.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

/// A response: unary ([`GrpcBody`]) or a bidirectional stream ([`ChatBody`]).
type Answer = http_body_util::Either<GrpcBody, ChatBody>;

async fn answer(
    req: Request<Incoming>,
    name: Arc<str>,
    calls: Arc<AtomicUsize>,
) -> Result<Response<Answer>, Infallible> {
    calls.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_string();
    if path.ends_with("/Chat") {
        let body = ChatBody {
            incoming: req.into_body(),
            pending: BytesMut::new(),
            name,
            ended: false,
        };
        return Ok(Response::builder()
            .header("content-type", "application/grpc")
            .body(http_body_util::Either::Right(body))
            .unwrap_or_else(|_| Response::new(http_body_util::Either::Left(GrpcBody::default()))));
    }
    Ok(unary(req, name, &path)
        .await
        .map(http_body_util::Either::Left))
}

async fn unary(req: Request<Incoming>, name: Arc<str>, path: &str) -> Response<GrpcBody> {
    // Read the request to its end, as a real server does.
    let _ = req.into_body().collect().await;
    if path.ends_with("/Fail") {
        // Trailers-only, as gRPC servers answer errors before any message.
        return Response::builder()
            .header("content-type", "application/grpc")
            .header("grpc-status", "14")
            .header("grpc-message", format!("{name} fails on purpose"))
            .body(GrpcBody::default())
            .unwrap_or_else(|_| Response::new(GrpcBody::default()));
    }
    let message = frame(format!("{name} {path}").as_bytes());
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let body = GrpcBody {
        data: Some(message),
        trailers: Some(trailers),
    };
    Response::builder()
        .header("content-type", "application/grpc")
        .body(body)
        .unwrap_or_else(|_| Response::new(GrpcBody::default()))
}

/// The answer of a `Chat` call: `<name> echo <message>` for each request message as soon as it
/// is complete, then `grpc-status: 0` in trailers after the request's end.
pub struct ChatBody {
    incoming: Incoming,
    pending: BytesMut,
    name: Arc<str>,
    ended: bool,
}

impl hyper::body::Body for ChatBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        use std::task::Poll;
        let this = &mut *self;
        loop {
            if this.pending.len() >= 5 {
                let len = u32::from_be_bytes([
                    this.pending[1],
                    this.pending[2],
                    this.pending[3],
                    this.pending[4],
                ]) as usize;
                if this.pending.len() >= 5 + len {
                    let message = this.pending.split_to(5 + len).freeze().slice(5..);
                    let reply = format!("{} echo {}", this.name, String::from_utf8_lossy(&message));
                    return Poll::Ready(Some(Ok(hyper::body::Frame::data(frame(
                        reply.as_bytes(),
                    )))));
                }
            }
            if this.ended {
                return Poll::Ready(None);
            }
            match std::pin::Pin::new(&mut this.incoming).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(f))) => {
                    if let Ok(data) = f.into_data() {
                        this.pending.extend_from_slice(&data);
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => {
                    this.ended = true;
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                    return Poll::Ready(Some(Ok(hyper::body::Frame::trailers(trailers))));
                }
            }
        }
    }
}

/// A response body: one data frame, then trailers.
#[derive(Default)]
pub struct GrpcBody {
    data: Option<Bytes>,
    trailers: Option<http::HeaderMap>,
}

impl hyper::body::Body for GrpcBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        if let Some(d) = self.data.take() {
            return std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(d))));
        }
        std::task::Poll::Ready(
            self.trailers
                .take()
                .map(|t| Ok(hyper::body::Frame::trailers(t))),
        )
    }
}

/// The outcome of a gRPC call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcReply {
    /// The HTTP status.
    pub http_status: u16,
    /// `grpc-status` from the trailers (or from the headers, for trailers-only answers).
    pub grpc_status: Option<String>,
    /// The first message, as text.
    pub message: String,
}

/// One unary call to `path` (`/<service>/<method>`) at `addr` from inside `ns`, over a new
/// HTTP/2 connection, with `authority` as `:authority` and extra request `headers` (metadata);
/// gives up after `timeout`.
pub fn grpc_call(
    ns: &NetNs,
    addr: SocketAddr,
    authority: &str,
    path: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> io::Result<GrpcReply> {
    let uri = format!("http://{authority}{path}");
    on_h2_connection(ns, addr, timeout, "gRPC call", async move |mut sender| {
        let mut req = Request::post(uri)
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(frame(b"ping")))
            .map_err(io::Error::other)?;
        let resp = sender.send_request(req).await.map_err(io::Error::other)?;
        let http_status = resp.status().as_u16();
        let header_status = resp
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let collected = resp.into_body().collect().await.map_err(io::Error::other)?;
        let trailer_status = collected
            .trailers()
            .and_then(|t| t.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let message = unframe(collected.to_bytes())
            .map(|m| String::from_utf8_lossy(&m).to_string())
            .unwrap_or_default();
        Ok(GrpcReply {
            http_status,
            grpc_status: trailer_status.or(header_status),
            message,
        })
    })
}

/// Runs `call` with a new HTTP/2 connection (prior knowledge) to `addr` from inside `ns`, on a
/// runtime of its own; `what` names it when `timeout` runs out.
fn on_h2_connection<B, T, F>(
    ns: &NetNs,
    addr: SocketAddr,
    timeout: Duration,
    what: &str,
    call: F,
) -> io::Result<T>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    F: AsyncFnOnce(hyper::client::conn::http2::SendRequest<B>) -> io::Result<T>,
{
    let stream = tcp_connect_in(ns, addr, timeout)?;
    stream.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let run = async {
            let stream = tokio::net::TcpStream::from_std(stream)?;
            let (sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                    .await
                    .map_err(io::Error::other)?;
            tokio::spawn(conn);
            call(sender).await
        };
        tokio::time::timeout(timeout, run)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("{what} timed out")))?
    })
}

/// What a bidirectional stream got back: one reply per message sent, and the final status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatReply {
    /// The replies, in order, as text.
    pub replies: Vec<String>,
    /// `grpc-status` from the trailers.
    pub grpc_status: Option<String>,
}

/// A bidirectional stream to `path` (a `Chat` method) at `addr` from inside `ns`: sends each of
/// `messages` only after the reply to the one before has come back (so a proxy that waited for
/// the end of the request would stall it), then ends its side; gives up after `timeout`.
pub fn grpc_chat(
    ns: &NetNs,
    addr: SocketAddr,
    authority: &str,
    path: &str,
    messages: &[&str],
    timeout: Duration,
) -> io::Result<ChatReply> {
    let uri = format!("http://{authority}{path}");
    let messages: Vec<Bytes> = messages.iter().map(|m| frame(m.as_bytes())).collect();
    on_h2_connection(ns, addr, timeout, "gRPC stream", async move |mut sender| {
        let (frames, body) =
            tokio::sync::mpsc::channel::<Result<hyper::body::Frame<Bytes>, Infallible>>(4);
        let body =
            http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(body));
        let req = Request::post(uri)
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body)
            .map_err(io::Error::other)?;
        let mut messages = messages.into_iter();
        // Dropped after the last message: the end of our side.
        let mut frames = match messages.next() {
            Some(first) => {
                let _ = frames.send(Ok(hyper::body::Frame::data(first))).await;
                Some(frames)
            }
            None => None,
        };
        let resp = sender.send_request(req).await.map_err(io::Error::other)?;
        let mut body = resp.into_body();
        let mut replies = Vec::new();
        let mut grpc_status = None;
        let mut pending = BytesMut::new();
        loop {
            // The reply to the last message sent, then the next message.
            while let Some(message) = unframe(pending.clone().freeze()) {
                pending.advance(5 + message.len());
                replies.push(String::from_utf8_lossy(&message).to_string());
                match (messages.next(), &frames) {
                    (Some(next), Some(frames)) => {
                        let _ = frames.send(Ok(hyper::body::Frame::data(next))).await;
                    }
                    // Our side ends; the server's follows.
                    _ => frames = None,
                }
            }
            match body.frame().await {
                None => break,
                Some(Err(e)) => return Err(io::Error::other(e)),
                Some(Ok(f)) => match f.into_data() {
                    Ok(data) => pending.extend_from_slice(&data),
                    Err(f) => {
                        grpc_status = f
                            .trailers_ref()
                            .and_then(|t| t.get("grpc-status"))
                            .and_then(|v| v.to_str().ok())
                            .map(String::from);
                    }
                },
            }
        }
        Ok(ChatReply {
            replies,
            grpc_status,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_round_trips() {
        assert_eq!(unframe(frame(b"hello")).as_deref(), Some(&b"hello"[..]));
        assert_eq!(unframe(Bytes::from_static(&[0, 0, 0, 0, 9, 1])), None);
    }
}
