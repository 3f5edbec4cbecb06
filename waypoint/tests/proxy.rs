//! The proxy in front of real loopback backends.

mod common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{
    Item, backend, client, data, echo_backend, exchange, fed_body, get, h1_connection, h2_client,
    loopback_server, proxy, send,
};

fn backends_yaml(list: &[(&str, Vec<std::net::SocketAddr>)]) -> String {
    let mut yaml = String::from("backends:\n");
    for (name, addrs) in list {
        let endpoints: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
        yaml.push_str(&format!(
            "  - name: {name}\n    endpoints: [{}]\n",
            endpoints.join(", ")
        ));
    }
    yaml
}

#[tokio::test]
async fn routes_by_path_header_and_answers_404_otherwise() {
    let (a, b, c) = (backend("a").await, backend("b").await, backend("c").await);
    let yaml = format!(
        r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    routes:
      - name: api
        matches: [{{ path: {{ type: PathPrefix, value: /api }} }}]
        backendRefs: [{{ name: a }}]
      - name: api-canary
        matches:
          - path: {{ type: PathPrefix, value: /api }}
            headers: [{{ name: x-canary, value: "yes" }}]
        backendRefs: [{{ name: b }}]
      - name: health
        matches: [{{ path: {{ type: Exact, value: /health }} }}]
        backendRefs: [{{ name: c }}]
{}"#,
        backends_yaml(&[
            ("a", vec![a.addr]),
            ("b", vec![b.addr]),
            ("c", vec![c.addr])
        ])
    );
    let proxy = proxy(&yaml).await;
    let http = client();
    assert_eq!(send(&http, proxy, "/api/users?id=1", &[]).await.body, "a");
    let answer = send(&http, proxy, "/api/users?id=1", &[("x-canary", "yes")]).await;
    assert_eq!(answer.body, "b");
    assert_eq!(answer.headers["x-path"], "/api/users?id=1");
    assert_eq!(answer.headers["x-seen-x-canary"], "yes");
    assert_eq!(answer.headers["x-seen-x-forwarded-for"], "127.0.0.1");
    assert_eq!(answer.headers["x-seen-x-forwarded-proto"], "http");
    let forwarded = send(&http, proxy, "/api", &[("x-forwarded-for", "10.1.1.1")]).await;
    assert_eq!(
        forwarded.headers["x-seen-x-forwarded-for"],
        "10.1.1.1, 127.0.0.1"
    );
    assert_eq!(send(&http, proxy, "/health", &[]).await.body, "c");
    let upgrade = send(
        &http,
        proxy,
        "/api",
        &[("connection", "upgrade"), ("upgrade", "websocket")],
    )
    .await;
    assert_eq!(upgrade.status, 501);
    assert!(upgrade.body.contains("upgrades"), "{}", upgrade.body);
    let missing = send(&http, proxy, "/health/deep", &[]).await;
    assert_eq!(missing.status, 404);
    assert!(
        missing.body.contains("no route matched GET"),
        "{}",
        missing.body
    );
}

#[tokio::test]
async fn weighted_split_follows_weights() {
    let (a, b) = (backend("a").await, backend("b").await);
    let yaml = format!(
        r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    routes:
      - backendRefs: [{{ name: a, weight: 80 }}, {{ name: b, weight: 20 }}]
{}"#,
        backends_yaml(&[("a", vec![a.addr]), ("b", vec![b.addr])])
    );
    let proxy = proxy(&yaml).await;
    let http = client();
    let mut counts: HashMap<String, usize> = HashMap::new();
    let n = 1000;
    for _ in 0..n {
        *counts
            .entry(send(&http, proxy, "/", &[]).await.body)
            .or_default() += 1;
    }
    let share_a = counts.get("a").copied().unwrap_or(0) as f64 / n as f64;
    assert!(
        (share_a - 0.8).abs() < 0.05,
        "a got {share_a} of traffic, expected 0.8: {counts:?}"
    );
    assert_eq!(counts.values().sum::<usize>(), n);
}

#[tokio::test]
async fn retry_on_503_succeeds() {
    let a = backend("a").await;
    let yaml = format!(
        r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    routes:
      - name: retried
        matches: [{{ path: {{ type: PathPrefix, value: /flaky/2 }} }}]
        backendRefs: [{{ name: a }}]
        retry: {{ attempts: 3, backoff: {{ base: 1ms, max: 5ms }}, retryOn: ["503"], budget: {{ ratio: 0.5, minRetriesPerSecond: 10 }} }}
      - name: not-retried
        backendRefs: [{{ name: a }}]
{}"#,
        backends_yaml(&[("a", vec![a.addr])])
    );
    let proxy = proxy(&yaml).await;
    let answer = get(proxy, "/flaky/2").await;
    assert_eq!(answer.status, 200);
    assert_eq!(a.calls.load(Ordering::SeqCst), 3, "two 503s then a 200");
    assert_eq!(
        get(proxy, "/flaky/1").await.status,
        503,
        "the route without retry passes the 503 on"
    );
}

#[tokio::test]
async fn connect_failure_is_retried_and_the_dead_endpoint_ejected() {
    let a = backend("a").await;
    let dead = {
        let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        socket.local_addr().expect("addr")
    };
    let yaml = format!(
        r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    routes:
      - backendRefs: [{{ name: a }}]
        retry: {{ attempts: 3, backoff: {{ base: 1ms, max: 2ms }}, retryOn: [connect-failure], budget: {{ ratio: 1 }} }}
backends:
  - name: a
    endpoints: ["{dead}", "{}"]
    outlierDetection: {{ consecutiveConnectFailures: 1, baseEjectionTime: 60s }}
"#,
        a.addr
    );
    let proxy = proxy(&yaml).await;
    for _ in 0..20 {
        assert_eq!(get(proxy, "/").await.status, 200);
    }
    assert_eq!(a.calls.load(Ordering::SeqCst), 20);
}

#[tokio::test]
async fn request_timeout_answers_504() {
    let a = backend("a").await;
    let yaml = format!(
        r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    routes:
      - backendRefs: [{{ name: a }}]
        timeouts: {{ request: 150ms }}
{}"#,
        backends_yaml(&[("a", vec![a.addr])])
    );
    let proxy = proxy(&yaml).await;
    let start = Instant::now();
    let answer = get(proxy, "/slow").await;
    assert_eq!(answer.status, 504);
    assert!(answer.body.contains("timed out"), "{}", answer.body);
    assert!(start.elapsed() < Duration::from_millis(900));
    assert_eq!(get(proxy, "/fast").await.status, 200);
}

#[tokio::test]
async fn rate_limit_answers_429_with_retry_after() {
    let a = backend("a").await;
    let yaml = format!(
        r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    routes:
      - backendRefs: [{{ name: a }}]
        rateLimit: {{ route: {{ capacity: 2, refillPerSecond: 0.2 }} }}
{}"#,
        backends_yaml(&[("a", vec![a.addr])])
    );
    let proxy = proxy(&yaml).await;
    assert_eq!(get(proxy, "/").await.status, 200);
    assert_eq!(get(proxy, "/").await.status, 200);
    let limited = get(proxy, "/").await;
    assert_eq!(limited.status, 429);
    let retry_after: u64 = limited.headers["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=5).contains(&retry_after), "retry-after {retry_after}");
    assert_eq!(a.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn fault_abort_answers_without_calling_the_backend() {
    let a = backend("a").await;
    let yaml = format!(
        r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    routes:
      - backendRefs: [{{ name: a }}]
        fault: {{ abort: {{ httpStatus: 418, percentage: 100 }} }}
{}"#,
        backends_yaml(&[("a", vec![a.addr])])
    );
    let proxy = proxy(&yaml).await;
    let answer = get(proxy, "/").await;
    assert_eq!(answer.status, 418);
    assert!(answer.body.contains("fault injected"));
    assert_eq!(a.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn http2_prior_knowledge_clients_and_backends() {
    let (a, b) = (backend("a").await, backend("b").await);
    let yaml = format!(
        r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    routes:
      - matches: [{{ path: {{ type: PathPrefix, value: /h1 }} }}]
        backendRefs: [{{ name: a }}]
      - matches: [{{ path: {{ type: PathPrefix, value: /h2 }} }}]
        backendRefs: [{{ name: b }}]
backends:
  - name: a
    endpoints: ["{}"]
  - name: b
    endpoints: ["{}"]
    protocol: http2
"#,
        a.addr, b.addr
    );
    let proxy = proxy(&yaml).await;
    let h2 = h2_client();
    let answer = send(&h2, proxy, "/h1/x", &[]).await;
    assert_eq!((answer.status, answer.body.as_str()), (200, "a"));
    assert_eq!(
        answer.headers["x-version"], "HTTP/1.1",
        "HTTP/2 in, HTTP/1.1 to an http1 backend"
    );
    assert_eq!(
        answer.headers["x-host"],
        proxy.to_string(),
        "the :authority became the Host header"
    );
    let answer = send(&h2, proxy, "/h2/x", &[]).await;
    assert_eq!((answer.status, answer.body.as_str()), (200, "b"));
    assert_eq!(answer.headers["x-version"], "HTTP/2.0");
    assert_eq!(
        answer.headers["x-host"],
        proxy.to_string(),
        "the original host reaches h2 backends"
    );
    // Many concurrent streams on one connection.
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let h2 = h2.clone();
            tokio::spawn(async move { send(&h2, proxy, "/h2/y", &[]).await.status })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.expect("join"), 200);
    }
}

#[tokio::test]
async fn filters_rewrite_modify_headers_and_redirect() {
    let a = backend("a").await;
    let yaml = format!(
        r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    routes:
      - matches: [{{ path: {{ type: PathPrefix, value: /old }} }}]
        filters:
          - type: RequestRedirect
            requestRedirect: {{ scheme: https, hostname: example.com, path: {{ type: ReplacePrefixMatch, replacePrefixMatch: /new }}, statusCode: 301 }}
      - matches: [{{ path: {{ type: PathPrefix, value: /api }} }}]
        filters:
          - type: URLRewrite
            urlRewrite: {{ hostname: internal.svc, path: {{ type: ReplacePrefixMatch, replacePrefixMatch: /v2 }} }}
          - type: RequestHeaderModifier
            requestHeaderModifier: {{ set: [{{ name: x-env, value: prod }}], remove: [x-secret] }}
          - type: ResponseHeaderModifier
            responseHeaderModifier: {{ add: [{{ name: x-via, value: waypoint }}], remove: [x-backend] }}
        backendRefs: [{{ name: a }}]
{}"#,
        backends_yaml(&[("a", vec![a.addr])])
    );
    let proxy = proxy(&yaml).await;
    let http = client();
    let redirect = send(&http, proxy, "/old/page?q=1", &[]).await;
    assert_eq!(redirect.status, 301);
    assert_eq!(
        redirect.headers["location"],
        "https://example.com/new/page?q=1"
    );
    assert_eq!(a.calls.load(Ordering::SeqCst), 0);

    let answer = send(
        &http,
        proxy,
        "/api/users?id=7",
        &[("x-secret", "s"), ("x-env", "dev")],
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.headers["x-path"], "/v2/users?id=7");
    assert_eq!(answer.headers["x-host"], "internal.svc");
    assert_eq!(answer.headers["x-seen-x-env"], "prod");
    assert!(answer.headers.get("x-seen-x-secret").is_none());
    assert_eq!(answer.headers["x-via"], "waypoint");
    assert!(answer.headers.get("x-backend").is_none());
}

#[tokio::test]
async fn post_bodies_are_forwarded_and_limited() {
    let a = backend("a").await;
    let yaml = format!(
        r#"
maxRequestBodyBytes: 16
listeners:
  - name: web
    address: 127.0.0.1:0
    routes:
      - backendRefs: [{{ name: a }}]
{}"#,
        backends_yaml(&[("a", vec![a.addr])])
    );
    let proxy = proxy(&yaml).await;
    let http = client();
    let post = |body: &'static str| {
        http::Request::post(format!("http://{proxy}/"))
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .expect("request")
    };
    assert_eq!(
        http.request(post("small")).await.expect("answer").status(),
        200
    );
    // Larger than the buffer: forwarded all the same, the rest streamed (not retried).
    assert_eq!(
        http.request(post("far more than sixteen bytes"))
            .await
            .expect("answer")
            .status(),
        200
    );
}

#[tokio::test]
async fn a_request_body_that_goes_on_streams_both_ways_through_the_waypoint() {
    use http_body_util::BodyExt;
    // A bidirectional stream (as gRPC's): each message is answered before the client sends
    // the next, so a waypoint waiting for the end of the request body would never answer.
    let echo = echo_backend().await;
    let yaml = format!(
        r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    routes:
      - backendRefs: [{{ name: echo }}]
        retry: {{ attempts: 3, retryOn: [connect-failure, "503"] }}
backends:
  - name: echo
    endpoints: ["{echo}"]
    protocol: http2
"#
    );
    let proxy = proxy(&yaml).await;
    let tcp = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    let (frames, body) = fed_body();
    let request = http::Request::post(format!("http://{proxy}/chat"))
        .body(body)
        .expect("request");
    let step = Duration::from_secs(5);
    frames.send(data("ping 1")).await.expect("send");
    let response = tokio::time::timeout(step, sender.send_request(request))
        .await
        .expect("response headers before the request body ended")
        .expect("response");
    assert_eq!(response.status(), 200);
    let mut answer = response.into_body();
    let mut next = async || -> String {
        let frame = tokio::time::timeout(step, answer.frame())
            .await
            .expect("an echo before the request body ended")
            .expect("a frame")
            .expect("no error");
        String::from_utf8(frame.into_data().expect("data").to_vec()).expect("utf-8")
    };
    assert_eq!(next().await, "ping 1");
    for i in 2..=3 {
        let text = format!("ping {i}");
        frames.send(data(text.clone())).await.expect("send");
        assert_eq!(next().await, text);
    }
    // The client ends its side: so does the answer (perhaps after an empty frame carrying the
    // end of the stream).
    drop(frames);
    let rest = tokio::time::timeout(step, answer.collect())
        .await
        .expect("the end of the answer")
        .expect("no error");
    assert!(rest.to_bytes().is_empty());
}

#[tokio::test]
async fn an_upload_larger_than_the_buffer_arrives_whole() {
    let echo = echo_backend().await;
    let yaml = format!(
        r#"
maxRequestBodyBytes: 1024
listeners:
  - name: web
    address: 127.0.0.1:0
    routes:
      - backendRefs: [{{ name: echo }}]
backends:
  - name: echo
    endpoints: ["{echo}"]
"#
    );
    let proxy = proxy(&yaml).await;
    // 1 MiB in 64 KiB pieces, over HTTP/1.1 (chunked), against a 1 KiB buffer.
    let piece: Vec<u8> = (0..65_536u32).map(|i| (i % 251) as u8).collect();
    let chunks: Vec<Item> = (0..16).map(|_| data(piece.clone())).collect();
    let body = http_body_util::StreamBody::new(tokio_stream::iter(chunks));
    let mut sender = h1_connection(proxy).await;
    let request = http::Request::post("/upload")
        .header("host", "upload")
        .body(body)
        .expect("request");
    let (status, echoed) =
        tokio::time::timeout(Duration::from_secs(10), exchange(&mut sender, request))
            .await
            .expect("answered");
    assert_eq!(status, 200);
    assert_eq!(echoed.len(), 16 * 65_536);
    assert!(echoed.chunks(65_536).all(|c| c == piece.as_slice()));
}

#[tokio::test]
async fn reload_swaps_routes_atomically_and_refuses_listener_changes() {
    use weft_waypoint::config::Config;
    use weft_waypoint::proxy::{Waypoint, serve};
    let (a, b) = (backend("a").await, backend("b").await);
    let config = |target: &str, address: &str| {
        format!(
            r#"
listeners:
  - name: web
    address: {address}
    routes:
      - backendRefs: [{{ name: {target} }}]
{}"#,
            backends_yaml(&[("a", vec![a.addr]), ("b", vec![b.addr])])
        )
    };
    let waypoint = Waypoint::new(&Config::from_yaml(&config("a", "127.0.0.1:0")).expect("valid"))
        .expect("compile");
    let (socket, listener) = waypoint.bind().await.expect("bind").remove(0);
    let addr = socket.local_addr().expect("addr");
    tokio::spawn(serve(socket, listener));
    assert_eq!(get(addr, "/").await.body, "a");
    assert_eq!(waypoint.listeners()[0].version(), 1);

    let version = waypoint
        .reload(&Config::from_yaml(&config("b", "127.0.0.1:0")).expect("valid"))
        .expect("reload");
    assert_eq!(version, 2);
    assert_eq!(waypoint.listeners()[0].version(), 2);
    // The same client connection sees the new routes.
    let http = client();
    assert_eq!(send(&http, addr, "/", &[]).await.body, "b");

    let err = waypoint
        .reload(&Config::from_yaml(&config("a", "127.0.0.1:1")).expect("valid"))
        .expect_err("address change");
    assert!(err.to_string().contains("restart the waypoint"), "{err}");
    assert_eq!(
        send(&http, addr, "/", &[]).await.body,
        "b",
        "a refused reload keeps the running config"
    );
}

#[tokio::test]
async fn max_connections_bounds_the_backend_pool() {
    let (limited, free) = (backend("limited").await, backend("free").await);
    let yaml = format!(
        r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    routes:
      - matches: [{{ path: {{ type: PathPrefix, value: /delay }}, headers: [{{ name: x-free, value: "1" }}] }}]
        backendRefs: [{{ name: free }}]
      - backendRefs: [{{ name: limited }}]
backends:
  - name: limited
    endpoints: ["{}"]
    circuitBreaker: {{ maxConnections: 2 }}
  - name: free
    endpoints: ["{}"]
"#,
        limited.addr, free.addr
    );
    let proxy = proxy(&yaml).await;
    let run = |headers: &'static [(&'static str, &'static str)]| {
        let tasks: Vec<_> = (0..12)
            .map(|_| {
                tokio::spawn(
                    async move { send(&client(), proxy, "/delay/50", headers).await.status },
                )
            })
            .collect();
        async move {
            for task in tasks {
                assert_eq!(task.await.expect("join"), 200);
            }
        }
    };
    run(&[]).await;
    run(&[("x-free", "1")]).await;
    assert_eq!(limited.calls.load(Ordering::SeqCst), 12);
    assert!(
        limited.connections.load(Ordering::SeqCst) <= 2,
        "{} connections",
        limited.connections.load(Ordering::SeqCst)
    );
    assert!(
        free.connections.load(Ordering::SeqCst) > 2,
        "without the limit the pool opens more"
    );
}

/// A raw TCP endpoint that closes its first `broken` connections right after reading the
/// request, and answers 200 `ok` on the others.
async fn resetting_endpoint(broken: usize) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = socket.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut accepted = 0;
        while let Ok((mut stream, _)) = socket.accept().await {
            accepted += 1;
            let mut buf = vec![0u8; 4096];
            let _ = stream.read(&mut buf).await;
            if accepted > broken {
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    )
                    .await;
            }
        }
    });
    addr
}

#[tokio::test]
async fn reset_is_502_and_retried_when_configured() {
    let (once, always) = (
        resetting_endpoint(1).await,
        resetting_endpoint(usize::MAX).await,
    );
    let yaml = format!(
        r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    routes:
      - matches: [{{ path: {{ type: PathPrefix, value: /retried }} }}]
        backendRefs: [{{ name: once }}]
        retry: {{ attempts: 2, backoff: {{ base: 1ms, max: 1ms }}, retryOn: [reset] }}
      - backendRefs: [{{ name: always }}]
backends:
  - name: once
    endpoints: ["{once}"]
  - name: always
    endpoints: ["{always}"]
"#
    );
    let proxy = proxy(&yaml).await;
    let answer = get(proxy, "/retried").await;
    assert_eq!((answer.status, answer.body.as_str()), (200, "ok"));
    let broken = get(proxy, "/other").await;
    assert_eq!(broken.status, 502);
    assert!(broken.body.contains("reset the request"), "{}", broken.body);
}

#[tokio::test]
async fn per_source_rate_limit_keys_on_the_identity_header() {
    let a = backend("a").await;
    let yaml = format!(
        r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    routes:
      - backendRefs: [{{ name: a }}]
        rateLimit: {{ perSource: {{ capacity: 1, refillPerSecond: 0.1, identityHeader: x-weft-identity }} }}
{}"#,
        backends_yaml(&[("a", vec![a.addr])])
    );
    let proxy = proxy(&yaml).await;
    let http = client();
    let alice = [("x-weft-identity", "spiffe://weft/ns/a/sa/alice")];
    let bob = [("x-weft-identity", "spiffe://weft/ns/a/sa/bob")];
    assert_eq!(send(&http, proxy, "/", &alice).await.status, 200);
    let limited = send(&http, proxy, "/", &alice).await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.headers["retry-after"], "10");
    assert!(
        limited.body.contains("rateLimit.perSource"),
        "{}",
        limited.body
    );
    assert_eq!(send(&http, proxy, "/", &bob).await.status, 200);
    // Without the header the peer address is the key: one shared bucket for this test's client.
    assert_eq!(send(&http, proxy, "/", &[]).await.status, 200);
    assert_eq!(send(&http, proxy, "/", &[]).await.status, 429);
}

#[tokio::test]
async fn shutdown_drains_requests_in_flight_and_refuses_new_connections() {
    use weft_waypoint::config::Config;
    use weft_waypoint::proxy::{Waypoint, serve_until};
    let a = backend("a").await;
    let yaml = format!(
        r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    routes:
      - backendRefs: [{{ name: a }}]
{}"#,
        backends_yaml(&[("a", vec![a.addr])])
    );
    let waypoint = Waypoint::new(&Config::from_yaml(&yaml).expect("valid")).expect("compile");
    let (socket, listener) = waypoint.bind().await.expect("bind").remove(0);
    let addr = socket.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_until(
        socket,
        listener,
        async move {
            let _ = stopped.await;
        },
        Duration::from_secs(5),
    ));
    let in_flight = tokio::spawn(async move { get(addr, "/delay/300").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = stop.send(());
    let answer = in_flight.await.expect("join");
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (200, "a"),
        "the request in flight finished"
    );
    tokio::time::timeout(Duration::from_secs(2), server)
        .await
        .expect("drained in time")
        .expect("join");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
}

#[tokio::test]
async fn black_hole_endpoint_times_out_per_attempt_is_retried_and_ejected() {
    let good = backend("good").await;
    let black_hole = {
        let socket = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = socket.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = socket.accept().await {
                held.push(stream);
            }
        });
        addr
    };
    let yaml = format!(
        r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    routes:
      - backendRefs: [{{ name: pool }}]
        timeouts: {{ request: 3s, backendRequest: 100ms }}
        retry: {{ attempts: 3, backoff: {{ base: 1ms, max: 1ms }}, retryOn: [5xx], budget: {{ ratio: 1 }} }}
backends:
  - name: pool
    endpoints: ["{black_hole}", "{}"]
    outlierDetection: {{ consecutive5xx: 1, baseEjectionTime: 60s }}
"#,
        good.addr
    );
    let proxy = proxy(&yaml).await;
    let start = std::time::Instant::now();
    for _ in 0..10 {
        let answer = get(proxy, "/").await;
        assert_eq!((answer.status, answer.body.as_str()), (200, "good"));
    }
    // At most one attempt waited 100 ms for the black hole before it was ejected.
    assert!(
        start.elapsed() < Duration::from_millis(900),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(good.calls.load(Ordering::SeqCst), 10);
}

#[tokio::test]
async fn reload_keeps_the_state_of_unchanged_backends_and_limits() {
    use weft_waypoint::config::Config;
    use weft_waypoint::proxy::{Waypoint, serve};
    let a = backend("a").await;
    let config = |path: &str, capacity: u32| {
        format!(
            r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    routes:
      - name: limited
        matches: [{{ path: {{ type: PathPrefix, value: {path} }} }}]
        backendRefs: [{{ name: a }}]
        rateLimit: {{ route: {{ capacity: {capacity}, refillPerSecond: 0.01 }} }}
{}"#,
            backends_yaml(&[("a", vec![a.addr])])
        )
    };
    let waypoint =
        Waypoint::new(&Config::from_yaml(&config("/", 2)).expect("valid")).expect("compile");
    let (socket, listener) = waypoint.bind().await.expect("bind").remove(0);
    let addr = socket.local_addr().expect("addr");
    tokio::spawn(serve(socket, listener));
    let http = client();
    assert_eq!(send(&http, addr, "/x", &[]).await.status, 200);
    assert_eq!(send(&http, addr, "/x", &[]).await.status, 200);
    assert_eq!(send(&http, addr, "/x", &[]).await.status, 429);

    // Another match, same limit and backend: the bucket stays empty, the pooled connection stays.
    waypoint
        .reload(&Config::from_yaml(&config("/x", 2)).expect("valid"))
        .expect("reload");
    assert_eq!(send(&http, addr, "/x", &[]).await.status, 429);
    assert_eq!(
        a.connections.load(Ordering::SeqCst),
        1,
        "the backend's pool survived the reload"
    );

    // A changed limit starts a fresh bucket.
    waypoint
        .reload(&Config::from_yaml(&config("/x", 3)).expect("valid"))
        .expect("reload");
    assert_eq!(send(&http, addr, "/x", &[]).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_load_through_every_layer_h1_and_h2() {
    let (a, b) = (backend("a").await, backend("b").await);
    let yaml = format!(
        r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    routes:
      - name: everything
        filters:
          - type: RequestHeaderModifier
            requestHeaderModifier: {{ add: [{{ name: x-load, value: "1" }}] }}
        backendRefs: [{{ name: a, weight: 1 }}, {{ name: b, weight: 1 }}]
        timeouts: {{ request: 5s, backendRequest: 2s }}
        retry: {{ attempts: 2, retryOn: [connect-failure, "503"] }}
        fault: {{ delay: {{ fixedDelay: 1ms, percentage: 10 }} }}
        rateLimit: {{ route: {{ capacity: 100000, refillPerSecond: 100000 }} }}
backends:
  - name: a
    endpoints: ["{}"]
    circuitBreaker: {{ maxConcurrentRequests: 16, maxPendingRequests: 1000, maxConnections: 8 }}
    outlierDetection: {{}}
  - name: b
    endpoints: ["{}"]
    protocol: http2
"#,
        a.addr, b.addr
    );
    let proxy = proxy(&yaml).await;
    let (h1, h2) = (client(), h2_client());
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let http = if i % 2 == 0 { h1.clone() } else { h2.clone() };
            tokio::spawn(async move {
                let mut ok = 0;
                for _ in 0..25 {
                    if send(&http, proxy, "/delay/2", &[]).await.status == 200 {
                        ok += 1;
                    }
                }
                ok
            })
        })
        .collect();
    let mut ok = 0;
    for task in tasks {
        ok += task.await.expect("join");
    }
    assert_eq!(ok, 1000);
    let (to_a, to_b) = (
        a.calls.load(Ordering::SeqCst),
        b.calls.load(Ordering::SeqCst),
    );
    assert_eq!(to_a + to_b, 1000, "no retries were needed");
    assert!(to_a > 350 && to_b > 350, "1:1 split: {to_a} / {to_b}");
    assert!(a.connections.load(Ordering::SeqCst) <= 8);
}

#[tokio::test]
async fn grpc_unavailable_is_retried_over_h2() {
    let a = backend("a").await;
    let yaml = format!(
        r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    routes:
      - backendRefs: [{{ name: a }}]
        retry: {{ attempts: 3, backoff: {{ base: 1ms, max: 1ms }}, retryOn: [unavailable], budget: {{ ratio: 1 }} }}
backends:
  - name: a
    endpoints: ["{}"]
    protocol: http2
"#,
        a.addr
    );
    let proxy = proxy(&yaml).await;
    let h2 = h2_client();
    let answer = send(
        &h2,
        proxy,
        "/grpc-flaky/2",
        &[("content-type", "application/grpc"), ("te", "trailers")],
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.headers["grpc-status"], "0");
    assert_eq!(a.calls.load(Ordering::SeqCst), 3);
    assert_eq!(answer.headers["x-seen-x-weft-attempt"], "3");
}

/// A writer collecting the access log in memory.
#[derive(Clone, Default)]
struct Lines(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lines").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn access_log_writes_one_json_line_per_request() {
    use weft_waypoint::config::Config;
    use weft_waypoint::layers::accesslog::AccessLog;
    use weft_waypoint::proxy::{Waypoint, serve_logged_until};

    let a = backend("a").await;
    let yaml = format!(
        r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    routes:
      - name: api
        matches: [{{ path: {{ type: PathPrefix, value: /api }} }}]
        backendRefs: [{{ name: a }}]
{}"#,
        backends_yaml(&[("a", vec![a.addr])])
    );
    let lines = Lines::default();
    let log = AccessLog::to_writer(Box::new(lines.clone()), 64).expect("log");
    let waypoint = Waypoint::new(&Config::from_yaml(&yaml).expect("valid"))
        .expect("compile")
        .with_access_log(Some(log));
    let (socket, listener) = waypoint.bind().await.expect("bind").remove(0);
    let proxy = socket.local_addr().expect("addr");
    tokio::spawn(serve_logged_until(
        socket,
        listener,
        waypoint.access_log().cloned(),
        std::future::pending(),
        Duration::ZERO,
    ));
    let http = client();
    assert_eq!(send(&http, proxy, "/api/x?y=1", &[]).await.body, "a");
    assert_eq!(send(&http, proxy, "/nowhere", &[]).await.status, 404);
    let parsed = |text: &[u8]| -> Vec<serde_json::Value> {
        String::from_utf8_lossy(text)
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is one JSON object"))
            .collect()
    };
    // The writer thread is asynchronous: a bounded wait for both lines.
    let mut got = Vec::new();
    for _ in 0..500 {
        got = parsed(&lines.0.lock().expect("lines"));
        if got.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(got.len(), 2, "{got:?}");
    let ok = &got[0];
    assert_eq!(ok["method"], "GET");
    assert_eq!(ok["path"], "/api/x?y=1");
    assert_eq!(ok["authority"], proxy.to_string());
    assert_eq!(ok["protocol"], "HTTP/1.1");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["route"], "api");
    assert_eq!(ok["backend"], "a");
    assert_eq!(ok["upstream"], a.addr.to_string());
    assert_eq!(ok["response_bytes"], 1);
    assert_eq!(ok["source_ip"], "127.0.0.1");
    assert!(ok["source_principal"].is_null());
    let missed = &got[1];
    assert_eq!(missed["status"], 404);
    assert!(missed["route"].is_null());
    assert!(missed["response_bytes"].as_u64().is_some_and(|n| n > 0));
}

#[tokio::test]
async fn a_streamed_request_is_not_retried_but_a_whole_one_is() {
    let a = backend("a").await;
    let yaml = format!(
        r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    routes:
      - backendRefs: [{{ name: a }}]
        retry: {{ attempts: 3, retryOn: ["503"], backoff: {{ base: 1ms, max: 2ms }} }}
{}"#,
        backends_yaml(&[("a", vec![a.addr])])
    );
    let proxy = proxy(&yaml).await;
    // `/flaky/N` answers 503 N times (counted per path).
    let streamed = async |path: &str, pause: Duration| {
        let (frames, body) = fed_body();
        let mut sender = h1_connection(proxy).await;
        let request = http::Request::post(path)
            .header("host", "a")
            .body(body)
            .expect("request");
        // The second part may find the request gone: the backend answers 503 without
        // reading the body, which ends the exchange.
        let feeder = tokio::spawn(async move {
            let _ = frames.send(data("part")).await;
            tokio::time::sleep(pause).await;
            let _ = frames.send(data("part")).await;
        });
        let response = sender.send_request(request).await.expect("response");
        feeder.await.expect("feeder");
        response.status()
    };
    let before = a.calls.load(Ordering::SeqCst);
    // Whole (Content-Length, sent at once): three attempts, all 503.
    let whole = http::Request::post(format!("http://{proxy}/flaky/7"))
        .body(http_body_util::Full::new(bytes::Bytes::from("part part")))
        .expect("request");
    let answer = client().request(whole).await.expect("answer");
    assert_eq!(answer.status(), 503);
    assert_eq!(a.calls.load(Ordering::SeqCst) - before, 3);
    // A pause longer than STREAM_AFTER: forwarded as it comes, one attempt.
    let before = a.calls.load(Ordering::SeqCst);
    let pause = weft_waypoint::proxy::STREAM_AFTER * 25;
    assert_eq!(streamed("/flaky/9", pause).await, 503);
    assert_eq!(a.calls.load(Ordering::SeqCst) - before, 1);
}

#[tokio::test]
async fn a_streamed_get_keeps_its_body_and_an_early_answer_does_not_hold_the_pool() {
    use http_body_util::BodyExt;
    let echo = echo_backend().await;
    // Answers at once and reads the request body afterwards, keeping the connection open.
    let early = loopback_server(|stream| async move {
        let service = hyper::service::service_fn(
            |request: http::Request<hyper::body::Incoming>| async move {
                tokio::spawn(request.into_body().collect());
                Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                    bytes::Bytes::from("early"),
                )))
            },
        );
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
            .await;
    })
    .await;
    let yaml = format!(
        r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    routes:
      - name: echo
        matches: [{{ path: {{ type: PathPrefix, value: /echo }} }}]
        backendRefs: [{{ name: echo }}]
      - backendRefs: [{{ name: early }}]
backends:
  - name: echo
    endpoints: ["{echo}"]
  - name: early
    endpoints: ["{early}"]
"#
    );
    let proxy = proxy(&yaml).await;
    let pause = weft_waypoint::proxy::STREAM_AFTER * 5;
    // A GET whose body streams (no Content-Length): it reaches the endpoint whole, chunked
    // (hyper would send a GET of unknown length without its body).
    let (frames, body) = fed_body();
    let mut sender = h1_connection(proxy).await;
    let request = http::Request::get("/echo")
        .header("host", "echo")
        .header("transfer-encoding", "chunked")
        .body(body)
        .expect("request");
    let feeder = tokio::spawn(async move {
        frames.send(data("first ")).await.expect("send");
        tokio::time::sleep(pause).await;
        frames.send(data("second")).await.expect("send");
    });
    let (_, echoed) = exchange(&mut sender, request).await;
    feeder.await.expect("feeder");
    assert_eq!(echoed, "first second");

    // An upload the endpoint answers at once, without reading it, and that goes on: its
    // connection to the endpoint must not serve the next request meanwhile.
    let (frames, body) = fed_body();
    let mut sender = h1_connection(proxy).await;
    let request = http::Request::post("/upload")
        .header("host", "early")
        .body(body)
        .expect("request");
    frames.send(data("start")).await.expect("send");
    assert_eq!(exchange(&mut sender, request).await.0, 200);
    let next = tokio::time::timeout(Duration::from_secs(3), get(proxy, "/next"))
        .await
        .expect("the next request is not held behind the unfinished upload");
    assert_eq!(next.status, 200);
    drop(frames);
}
