//! Loopback harness: tiny backends, the proxy in front, and clients.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use weft_waypoint::config::Config;
use weft_waypoint::proxy::{Waypoint, serve};

/// A backend answering with its name; behaviour by path:
/// `/slow` sleeps 1 s, `/delay/<ms>` sleeps that long, `/flaky/<n>` answers 503 to its first n
/// requests, `/grpc-flaky/<n>` answers `grpc-status: 14` to its first n requests then `0`,
/// anything else 200.
/// Response headers echo what it saw: `x-backend`, `x-path`, `x-version`, `x-host`, and
/// `x-seen-<name>` for request headers starting with `x-`.
pub struct Backend {
    pub addr: SocketAddr,
    pub calls: Arc<AtomicUsize>,
    /// Connections accepted.
    pub connections: Arc<AtomicUsize>,
}

pub async fn backend(name: &'static str) -> Backend {
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let addr = socket.local_addr().expect("addr");
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let connections = Arc::new(AtomicUsize::new(0));
    let accepted = connections.clone();
    let flaky: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = socket.accept().await else {
                continue;
            };
            accepted.fetch_add(1, Ordering::SeqCst);
            let counter = counter.clone();
            let flaky = flaky.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |request: http::Request<hyper::body::Incoming>| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let flaky = flaky.clone();
                        async move {
                            let path = request.uri().path().to_string();
                            let mut status = 200;
                            if path == "/slow" {
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                            if let Some(ms) = path
                                .strip_prefix("/delay/")
                                .and_then(|n| n.parse::<u64>().ok())
                            {
                                tokio::time::sleep(Duration::from_millis(ms)).await;
                            }
                            // gRPC trailers-only errors: `grpc-status: 14` (UNAVAILABLE) n times.
                            let mut grpc_status = None;
                            if let Some(n) = path
                                .strip_prefix("/grpc-flaky/")
                                .and_then(|n| n.parse::<usize>().ok())
                            {
                                let mut seen = flaky.lock().expect("lock");
                                let count = seen.entry(path.clone()).or_default();
                                *count += 1;
                                grpc_status = Some(if *count <= n { "14" } else { "0" });
                            }
                            if let Some(n) = path
                                .strip_prefix("/flaky/")
                                .and_then(|n| n.parse::<usize>().ok())
                            {
                                let mut seen = flaky.lock().expect("lock");
                                let count = seen.entry(path.clone()).or_default();
                                *count += 1;
                                if *count <= n {
                                    status = 503;
                                }
                            }
                            let mut response = http::Response::builder()
                                .status(status)
                                .header("x-backend", name)
                                .header(
                                    "x-path",
                                    request.uri().path_and_query().map_or("/", |p| p.as_str()),
                                )
                                .header("x-version", format!("{:?}", request.version()));
                            if let Some(code) = grpc_status {
                                response = response
                                    .header("grpc-status", code)
                                    .header("content-type", "application/grpc");
                            }
                            // Host, or HTTP/2's :authority.
                            if let Some(host) = request.headers().get("host") {
                                response = response.header("x-host", host);
                            } else if let Some(authority) = request.uri().authority() {
                                response = response.header("x-host", authority.as_str());
                            }
                            for (key, value) in request.headers() {
                                if key.as_str().starts_with("x-") {
                                    response = response.header(format!("x-seen-{key}"), value);
                                }
                            }
                            Ok::<_, Infallible>(
                                response
                                    .body(Full::new(Bytes::from(name)))
                                    .expect("response"),
                            )
                        }
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Backend {
        addr,
        calls,
        connections,
    }
}

/// A loopback listener handing each connection it accepts to `serve`, on a task of its own.
pub async fn loopback_server<F, Fut>(serve: F) -> std::net::SocketAddr
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = socket.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = socket.accept().await {
            tokio::spawn(serve(stream));
        }
    });
    addr
}

/// A backend answering each request with its own body, streamed back as it arrives
/// (HTTP/1.1 and HTTP/2).
pub async fn echo_backend() -> std::net::SocketAddr {
    loopback_server(|stream| async move {
        let service = hyper::service::service_fn(
            |request: http::Request<hyper::body::Incoming>| async move {
                Ok::<_, std::convert::Infallible>(http::Response::new(request.into_body()))
            },
        );
        let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
            .await;
    })
    .await
}

/// Sends `request` on `sender` and reads the answer to its end: its status and body.
pub async fn exchange<B>(
    sender: &mut hyper::client::conn::http1::SendRequest<B>,
    request: http::Request<B>,
) -> (u16, Bytes)
where
    B: http_body::Body + Send + 'static,
{
    let response = sender.send_request(request).await.expect("response");
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, body)
}

pub type Item = Result<http_body::Frame<bytes::Bytes>, std::convert::Infallible>;
pub type Fed = http_body_util::StreamBody<tokio_stream::wrappers::ReceiverStream<Item>>;

/// A request body fed frame by frame through the returned sender.
pub fn fed_body() -> (tokio::sync::mpsc::Sender<Item>, Fed) {
    let (frames, body) = tokio::sync::mpsc::channel::<Item>(4);
    let body = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(body));
    (frames, body)
}

/// A data frame holding `text`.
pub fn data(text: impl Into<bytes::Bytes>) -> Item {
    Ok(http_body::Frame::data(text.into()))
}

/// A new HTTP/1.1 connection to `proxy`, for requests with a body `B`.
pub async fn h1_connection<B>(
    proxy: std::net::SocketAddr,
) -> hyper::client::conn::http1::SendRequest<B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("HTTP/1.1 handshake");
    tokio::spawn(connection);
    sender
}

/// Starts the proxy with `yaml` (its single listener on 127.0.0.1:0) and returns its address.
pub async fn proxy(yaml: &str) -> SocketAddr {
    let config = Config::from_yaml(yaml).expect("valid config");
    let waypoint = Waypoint::new(&config).expect("compile");
    let mut bound = waypoint.bind().await.expect("bind");
    let (socket, listener) = bound.remove(0);
    let addr = socket.local_addr().expect("addr");
    tokio::spawn(serve(socket, listener));
    addr
}

pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

pub async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    proxy: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Answer {
    let mut request = http::Request::builder().uri(format!("http://{proxy}{path}"));
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = client
        .request(request.body(Full::new(Bytes::new())).expect("request"))
        .await
        .expect("proxy answers");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

pub async fn get(proxy: SocketAddr, path: &str) -> Answer {
    send(&client(), proxy, path, &[]).await
}
