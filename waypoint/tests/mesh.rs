//! Mesh mode on loopback: a test CA (rcgen) issues SPIFFE certificates to a client pod, the
//! waypoint and the backend pods; the waypoint terminates HBONE with a static mesh view; the
//! backend pods are HBONE servers on other 127.77.<test>.x addresses (port 15008) that answer
//! HTTP inside each tunnel with their name and what they saw. Each test uses its own
//! 127.77.<test>.0/24.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use tokio::sync::watch;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use weft_api::MeshState;
use weft_api::WorkloadInfo;
use weft_api::model::{EndpointInfo, ServiceInfo, ServicePort};
use weft_tunnel::hbone::{self, Client, ConnectRequest, HboneError, Tunnel};
use weft_tunnel::{
    TrustBundle, certs_from_pem, client_config, private_key_from_pem, server_config,
};
use weft_waypoint::config::{Config, Mode};
use weft_waypoint::layers::accesslog::AccessLog;
use weft_waypoint::mesh::server::{serve_hbone, serve_hbone_until};
use weft_waypoint::mesh::{Mesh, MeshContext, MeshView, StaticSvid, Svid};
use weft_waypoint::proxy::Waypoint;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const TD: &str = "cluster.local";

fn spiffe(sa: &str) -> String {
    format!("spiffe://{TD}/ns/shop/sa/{sa}")
}

/// A test CA.
struct Pki {
    root_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Self {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("root");
        Pki {
            root_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// (certificate PEM, key PEM) for a SPIFFE ID.
    fn leaf(&self, id: &str) -> (String, String) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.subject_alt_names = vec![SanType::URI(id.try_into().expect("uri"))];
        let cert = params.signed_by(&key, &self.issuer).expect("leaf");
        (cert.pem(), key.serialize_pem())
    }

    fn trust(&self) -> TrustBundle {
        TrustBundle::from_pem(self.root_pem.as_bytes()).expect("bundle")
    }
}

/// 127.77.<test>.<host>
fn ip(test: u8, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 77, test, host))
}

fn workload(name: &str, sa: &str, ip: IpAddr) -> WorkloadInfo {
    WorkloadInfo {
        name: name.into(),
        namespace: "shop".into(),
        service_account: sa.into(),
        node: "n1".into(),
        ip4: match ip {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        },
        ip6: None,
        netns: "/x".into(),
        labels: Default::default(),
        capture: Default::default(),
    }
}

fn service(
    name: &str,
    vip: IpAddr,
    port: u16,
    target: u16,
    endpoints: &[(&str, IpAddr)],
) -> ServiceInfo {
    ServiceInfo {
        name: name.into(),
        namespace: "shop".into(),
        hostname: format!("{name}.shop.svc.cluster.local"),
        vips: vec![vip],
        ports: vec![ServicePort {
            name: "http".into(),
            port,
            target_port: target,
            app_protocol: String::new(),
        }],
        endpoints: endpoints
            .iter()
            .map(|(w, ip)| EndpointInfo {
                workload: format!("shop/{w}"),
                ip4: match ip {
                    IpAddr::V4(v4) => Some(*v4),
                    IpAddr::V6(_) => None,
                },
                ip6: None,
                ready: true,
            })
            .collect(),
        waypoint: Some("shop/waypoint".into()),
    }
}

/// The mesh of test `t`: a client pod `web` (and `api`), the waypoint, two `reviews` pods and
/// one `ratings` pod; Services `frontend` (VIP .100, no endpoints), `reviews` (VIP .101, port
/// 9080 -> 8080, endpoint reviews-1) and `ratings` (VIP .102, port 9080 -> 8081).
fn state(t: u8, pki: &Pki) -> MeshState {
    let mut state = MeshState::default();
    state.namespaces.insert("shop".into(), true);
    for w in [
        workload("web", "web", ip(t, 10)),
        workload("api", "api", ip(t, 11)),
        workload("waypoint", "waypoint", ip(t, 1)),
        workload("reviews-1", "reviews", ip(t, 21)),
        workload("reviews-2", "reviews", ip(t, 22)),
        workload("ratings-1", "ratings", ip(t, 31)),
    ] {
        state.workloads.insert(w.key(), w);
    }
    for s in [
        service("frontend", ip(t, 100), 80, 8080, &[]),
        service(
            "reviews",
            ip(t, 101),
            9080,
            8080,
            &[("reviews-1", ip(t, 21))],
        ),
        service(
            "ratings",
            ip(t, 102),
            9080,
            8081,
            &[("ratings-1", ip(t, 31))],
        ),
    ] {
        state.services.insert(s.key(), s);
    }
    state.trust_bundle = vec![pki.root_pem.clone()];
    state
}

/// A backend pod: HBONE on `<ip>:15008` with a certificate for `identity`, answering HTTP in
/// each tunnel with `name` and echoing what it saw: `x-hbone-dst` (the CONNECT authority),
/// `x-hbone-for` (`Forwarded: for`), `x-hbone-peer` (the SPIFFE ID of the tunnel's client),
/// `x-seen-xff`, `x-path`, `x-host`. Returns (TLS connections accepted, HTTP requests).
async fn backend_pod(
    pki: &Pki,
    at: IpAddr,
    name: &'static str,
    identity: &str,
) -> (Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let (cert, key) = pki.leaf(identity);
    let config = server_config(
        certs_from_pem(cert.as_bytes()).expect("cert"),
        private_key_from_pem(key.as_bytes()).expect("key"),
        &pki.trust(),
    )
    .expect("server config");
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let socket = tokio::net::TcpListener::bind(SocketAddr::new(at, 15008))
        .await
        .expect("bind a backend pod's 15008");
    let connections = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let (accepted, served) = (connections.clone(), requests.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = socket.accept().await {
            let acceptor = acceptor.clone();
            let accepted = accepted.clone();
            let served = served.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let peer = weft_tunnel::peer_identity(tls.get_ref().1)
                    .map(|i| i.to_string())
                    .unwrap_or_default();
                let handler = move |c: ConnectRequest, tunnel: Tunnel| {
                    let peer = peer.clone();
                    let served = served.clone();
                    async move { serve_http(name, c, peer, tunnel, served).await }
                };
                let _ = hbone::serve(tls, handler).await;
            });
        }
    });
    (connections, requests)
}

async fn serve_http(
    name: &'static str,
    c: ConnectRequest,
    peer: String,
    tunnel: Tunnel,
    served: Arc<AtomicUsize>,
) {
    let service =
        hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
            served.fetch_add(1, Ordering::SeqCst);
            let header = |n: &str| {
                request
                    .headers()
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string()
            };
            let response = http::Response::builder()
                .header("x-backend", name)
                .header("x-hbone-dst", c.dst.to_string())
                .header(
                    "x-hbone-for",
                    c.forwarded_for.map(|i| i.to_string()).unwrap_or_default(),
                )
                .header("x-hbone-peer", peer.clone())
                .header("x-seen-xff", header("x-forwarded-for"))
                .header("x-host", header("host"))
                .header(
                    "x-path",
                    request.uri().path_and_query().map_or("/", |p| p.as_str()),
                )
                .body(Full::new(Bytes::from(name)));
            async move { Ok::<_, Infallible>(response.expect("response")) }
        });
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(tunnel), service)
        .await;
}

/// The waypoint of test `t` in mesh mode with `yaml`, HBONE on 127.77.<t>.1:<any port>.
async fn waypoint(
    t: u8,
    pki: &Pki,
    state: &MeshState,
    yaml: &str,
) -> (SocketAddr, watch::Sender<Arc<MeshView>>) {
    waypoint_logged(t, pki, state, yaml, None).await
}

/// [`waypoint`] writing its access log to `log`.
async fn waypoint_logged(
    t: u8,
    pki: &Pki,
    state: &MeshState,
    yaml: &str,
    log: Option<AccessLog>,
) -> (SocketAddr, watch::Sender<Arc<MeshView>>) {
    let (socket, waypoint, tx) = mesh_waypoint(t, pki, state, yaml, log).await;
    let addr = socket.local_addr().expect("addr");
    tokio::spawn(serve_hbone(socket, waypoint));
    (addr, tx)
}

/// [`waypoint`] that stops when `stop` fires and drains for up to `drain`; the handle ends
/// when the HBONE server has.
async fn waypoint_until(
    t: u8,
    pki: &Pki,
    state: &MeshState,
    stop: tokio::sync::oneshot::Receiver<()>,
    drain: std::time::Duration,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let (socket, waypoint, tx) = mesh_waypoint(t, pki, state, "listeners: []\n", None).await;
    let addr = socket.local_addr().expect("addr");
    let served = tokio::spawn(async move {
        let _view = tx;
        let stop = async move {
            let _ = stop.await;
        };
        serve_hbone_until(socket, waypoint, stop, drain).await;
    });
    (addr, served)
}

/// The mesh-mode waypoint of test `t` and its HBONE socket (127.77.<t>.1:<any port>).
async fn mesh_waypoint(
    t: u8,
    pki: &Pki,
    state: &MeshState,
    yaml: &str,
    log: Option<AccessLog>,
) -> (
    tokio::net::TcpListener,
    Arc<Waypoint>,
    watch::Sender<Arc<MeshView>>,
) {
    let (tx, mesh) = Mesh::fixed(state, TD);
    let (cert, key) = pki.leaf(&spiffe("waypoint"));
    let svid = Svid::from_pem(&cert, &key, 1, Vec::new()).expect("svid");
    let ctx = Arc::new(MeshContext::new(
        "shop",
        mesh,
        Arc::new(StaticSvid(Arc::new(svid))),
    ));
    let config = Config::from_yaml_for(yaml, Mode::Mesh).expect("valid mesh config");
    let waypoint = Arc::new(
        Waypoint::new_mesh(&config, ctx)
            .expect("compile")
            .with_access_log(log),
    );
    let socket = tokio::net::TcpListener::bind(SocketAddr::new(ip(t, 1), 0))
        .await
        .expect("bind the waypoint's HBONE");
    (socket, waypoint, tx)
}

/// How opening a tunnel failed.
#[derive(Debug)]
enum Failure {
    /// The waypoint answered the CONNECT with this status and reason.
    Refused(http::StatusCode, String),
    /// TLS or HTTP/2 failed before any answer (the error, shown by `Debug` on failure).
    Transport(#[allow(dead_code)] String),
}

/// A client pod's HBONE connection to the waypoint, with a certificate for `identity` from
/// `pki` (which may not be the mesh's CA).
async fn connect(
    waypoint: SocketAddr,
    pki: &Pki,
    mesh_pki: &Pki,
    identity: &str,
) -> Result<Client, Failure> {
    let (cert, key) = pki.leaf(identity);
    let config = client_config(
        certs_from_pem(cert.as_bytes()).expect("cert"),
        private_key_from_pem(key.as_bytes()).expect("key"),
        &mesh_pki.trust(),
        spiffe("waypoint").parse().expect("id"),
    )
    .expect("client config");
    let tcp = tokio::net::TcpStream::connect(waypoint)
        .await
        .map_err(|e| Failure::Transport(e.to_string()))?;
    let name = rustls::pki_types::ServerName::try_from("waypoint.invalid").expect("name");
    let tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| Failure::Transport(e.to_string()))?;
    Client::handshake(tls)
        .await
        .map_err(|e| Failure::Transport(e.to_string()))
}

async fn tunnel(client: &Client, dst: SocketAddr, from: IpAddr) -> Result<Tunnel, Failure> {
    match client.clone().connect(dst, Some(from), None).await {
        Ok(t) => Ok(t),
        Err(HboneError::Refused { status, reason, .. }) => Err(Failure::Refused(status, reason)),
        Err(e) => Err(Failure::Transport(e.to_string())),
    }
}

struct Answer {
    status: u16,
    headers: http::HeaderMap,
    body: String,
}

/// One HTTP/1.1 request in a new tunnel to `dst` from client address `from`.
async fn get(client: &Client, dst: SocketAddr, from: IpAddr, host: &str, path: &str) -> Answer {
    let t = tunnel(client, dst, from).await.expect("tunnel admitted");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(t))
        .await
        .expect("HTTP/1.1 in the tunnel");
    tokio::spawn(connection);
    let request = http::Request::builder()
        .uri(path)
        .header("host", host)
        .body(Empty::<Bytes>::new())
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
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

fn vip(t: u8, host: u8, port: u16) -> SocketAddr {
    SocketAddr::new(ip(t, host), port)
}

#[tokio::test]
async fn mesh_routes_by_path_to_two_services_through_hbone() -> Result<(), BoxError> {
    let t = 1;
    let pki = Pki::new();
    let (reviews_tls, _) = backend_pod(&pki, ip(t, 21), "reviews-1", &spiffe("reviews")).await;
    let (ratings_tls, _) = backend_pod(&pki, ip(t, 31), "ratings-1", &spiffe("ratings")).await;
    let yaml = r#"
listeners:
  - name: frontend
    service: frontend
    port: 80
    routes:
      - name: reviews
        hostnames: [www.example.com]
        matches: [{ path: { type: PathPrefix, value: /reviews } }]
        backendRefs: [{ name: reviews }]
      - name: ratings
        matches: [{ path: { type: PathPrefix, value: /ratings } }]
        backendRefs: [{ name: ratings }]
backends:
  - name: reviews
    service: reviews
    port: 9080
  - name: ratings
    service: ratings
    port: 9080
"#;
    let (wp, _view) = waypoint(t, &pki, &state(t, &pki), yaml).await;
    let web = connect(wp, &pki, &pki, &spiffe("web")).await.expect("mTLS");
    let frontend = vip(t, 100, 80);

    // The route's hostnames also match the Service's own names.
    let a = get(
        &web,
        frontend,
        ip(t, 10),
        "frontend.shop.svc.cluster.local:80",
        "/reviews/1",
    )
    .await;
    assert_eq!(
        (a.status, a.body.as_str()),
        (200, "reviews-1"),
        "{}",
        a.body
    );
    // The endpoint's target port, the original client, the waypoint's identity.
    assert_eq!(a.headers["x-hbone-dst"], format!("{}:8080", ip(t, 21)));
    assert_eq!(a.headers["x-hbone-for"], ip(t, 10).to_string());
    assert_eq!(a.headers["x-hbone-peer"], spiffe("waypoint"));
    assert_eq!(a.headers["x-seen-xff"], ip(t, 10).to_string());
    assert_eq!(a.headers["x-path"], "/reviews/1");
    let b = get(&web, frontend, ip(t, 10), "frontend", "/ratings?stars=5").await;
    assert_eq!(
        (b.status, b.body.as_str()),
        (200, "ratings-1"),
        "{}",
        b.body
    );
    assert_eq!(b.headers["x-hbone-dst"], format!("{}:8081", ip(t, 31)));
    assert_eq!(b.headers["x-path"], "/ratings?stars=5");
    // Another host name is not the Service's: the reviews route does not match.
    let c = get(&web, frontend, ip(t, 10), "elsewhere.example", "/reviews/1").await;
    assert_eq!(c.status, 404, "{}", c.body);

    // More requests, in new tunnels and from a second client connection: the waypoint's HBONE
    // connection to each backend pod is reused.
    let api = connect(wp, &pki, &pki, &spiffe("api")).await.expect("mTLS");
    for _ in 0..5 {
        assert_eq!(
            get(&web, frontend, ip(t, 10), "frontend", "/reviews/x")
                .await
                .status,
            200
        );
        assert_eq!(
            get(&api, frontend, ip(t, 11), "frontend", "/reviews/x")
                .await
                .status,
            200
        );
    }
    assert_eq!(
        reviews_tls.load(Ordering::SeqCst),
        1,
        "one pooled HBONE connection"
    );
    assert_eq!(ratings_tls.load(Ordering::SeqCst), 1);
    Ok(())
}

#[tokio::test]
async fn mesh_service_without_listener_gets_the_default_route() -> Result<(), BoxError> {
    let t = 2;
    let pki = Pki::new();
    backend_pod(&pki, ip(t, 21), "reviews-1", &spiffe("reviews")).await;
    // No listener at all: every Service bound to the waypoint still works.
    let (wp, _view) = waypoint(t, &pki, &state(t, &pki), "listeners: []\n").await;
    let web = connect(wp, &pki, &pki, &spiffe("web")).await.expect("mTLS");
    let a = get(
        &web,
        vip(t, 101, 9080),
        ip(t, 10),
        "reviews:9080",
        "/any/path",
    )
    .await;
    assert_eq!(
        (a.status, a.body.as_str()),
        (200, "reviews-1"),
        "{}",
        a.body
    );
    assert_eq!(a.headers["x-hbone-dst"], format!("{}:8080", ip(t, 21)));
    assert_eq!(a.headers["x-path"], "/any/path");
    assert_eq!(a.headers["x-host"], "reviews:9080");
    // A Service without ready endpoints: 503 naming the problem.
    let f = get(&web, vip(t, 100, 80), ip(t, 10), "frontend", "/").await;
    assert_eq!(f.status, 503);
    assert!(f.body.contains("no ready endpoint"), "{}", f.body);
    Ok(())
}

#[tokio::test]
async fn mesh_connect_to_an_unknown_authority_is_400() -> Result<(), BoxError> {
    let t = 3;
    let pki = Pki::new();
    let (wp, _view) = waypoint(t, &pki, &state(t, &pki), "listeners: []\n").await;
    let web = connect(wp, &pki, &pki, &spiffe("web")).await.expect("mTLS");
    match tunnel(&web, vip(t, 199, 80), ip(t, 10)).await {
        Err(Failure::Refused(status, reason)) => {
            assert_eq!(status, 400);
            assert!(
                reason.contains(&ip(t, 199).to_string()) && reason.contains("not the virtual IP"),
                "{reason}"
            );
        }
        other => panic!("expected a 400, got {:?}", other.map(|_| "a tunnel")),
    }
    match tunnel(&web, vip(t, 101, 81), ip(t, 10)).await {
        Err(Failure::Refused(status, reason)) => {
            assert_eq!(status, 400);
            assert!(
                reason.contains("shop/reviews") && reason.contains("no port 81"),
                "{reason}"
            );
        }
        other => panic!("expected a 400, got {:?}", other.map(|_| "a tunnel")),
    }
    // The connection is still usable for a good authority.
    assert!(tunnel(&web, vip(t, 101, 9080), ip(t, 10)).await.is_ok());
    Ok(())
}

#[tokio::test]
async fn mesh_client_certificate_outside_the_trust_bundle_is_refused_at_handshake()
-> Result<(), BoxError> {
    let t = 4;
    let pki = Pki::new();
    let (_, requests) = backend_pod(&pki, ip(t, 21), "reviews-1", &spiffe("reviews")).await;
    let (wp, _view) = waypoint(t, &pki, &state(t, &pki), "listeners: []\n").await;
    let rogue = Pki::new();
    // TLS 1.3: the client's certificate is checked after the client's side of the handshake
    // completes, so the refusal shows on the first exchange, before any CONNECT is answered.
    let failure = match connect(wp, &rogue, &pki, &spiffe("web")).await {
        Err(f) => f,
        Ok(client) => match tunnel(&client, vip(t, 101, 9080), ip(t, 10)).await {
            Err(f) => f,
            Ok(_) => panic!("a client certificate from another CA opened a tunnel"),
        },
    };
    assert!(matches!(failure, Failure::Transport(_)), "{failure:?}");
    assert_eq!(requests.load(Ordering::SeqCst), 0);
    // The mesh's own client still gets through.
    let web = connect(wp, &pki, &pki, &spiffe("web")).await.expect("mTLS");
    assert_eq!(
        get(&web, vip(t, 101, 9080), ip(t, 10), "reviews", "/")
            .await
            .status,
        200
    );
    Ok(())
}

#[tokio::test]
async fn mesh_backend_with_the_wrong_identity_is_a_connect_failure() -> Result<(), BoxError> {
    let t = 5;
    let pki = Pki::new();
    // The ratings pod presents another workload's certificate.
    let (_, requests) = backend_pod(&pki, ip(t, 31), "ratings-1", &spiffe("impostor")).await;
    let yaml = r#"
listeners:
  - name: ratings
    service: ratings
    port: 9080
    routes:
      - backendRefs: [{ name: ratings }]
backends:
  - name: ratings
    service: ratings
    port: 9080
    outlierDetection:
      consecutiveConnectFailures: 1
      maxEjectionPercent: 100
      panicThreshold: 0
"#;
    let (wp, _view) = waypoint(t, &pki, &state(t, &pki), yaml).await;
    let web = connect(wp, &pki, &pki, &spiffe("web")).await.expect("mTLS");
    let a = get(&web, vip(t, 102, 9080), ip(t, 10), "ratings", "/").await;
    assert_eq!(a.status, 503, "{}", a.body);
    assert!(
        a.body.contains("could not connect") && a.body.contains(&spiffe("ratings")),
        "{}",
        a.body
    );
    // Counted as a connect failure: outlier detection ejected the endpoint.
    let b = get(&web, vip(t, 102, 9080), ip(t, 10), "ratings", "/").await;
    assert_eq!(b.status, 503);
    assert!(b.body.contains("no healthy endpoint"), "{}", b.body);
    assert_eq!(
        requests.load(Ordering::SeqCst),
        0,
        "no request reached the impostor"
    );
    Ok(())
}

#[tokio::test]
async fn mesh_per_source_rate_limit_keys_by_spiffe_id() -> Result<(), BoxError> {
    let t = 6;
    let pki = Pki::new();
    backend_pod(&pki, ip(t, 21), "reviews-1", &spiffe("reviews")).await;
    let yaml = r#"
listeners:
  - name: reviews
    service: reviews
    port: 9080
    routes:
      - backendRefs: [{ name: reviews }]
        rateLimit:
          perSource: { capacity: 2, refillPerSecond: 0.001, identityHeader: x-client }
backends:
  - name: reviews
    service: reviews
    port: 9080
"#;
    let (wp, _view) = waypoint(t, &pki, &state(t, &pki), yaml).await;
    let reviews = vip(t, 101, 9080);
    let web = connect(wp, &pki, &pki, &spiffe("web")).await.expect("mTLS");
    let api = connect(wp, &pki, &pki, &spiffe("api")).await.expect("mTLS");
    assert_eq!(
        get(&web, reviews, ip(t, 10), "reviews", "/").await.status,
        200
    );
    assert_eq!(
        get(&web, reviews, ip(t, 10), "reviews", "/").await.status,
        200
    );
    let limited = get(&web, reviews, ip(t, 10), "reviews", "/").await;
    assert_eq!(limited.status, 429, "{}", limited.body);
    // The same identity from another address (and another connection) shares the bucket.
    let web2 = connect(wp, &pki, &pki, &spiffe("web")).await.expect("mTLS");
    assert_eq!(
        get(&web2, reviews, ip(t, 12), "reviews", "/").await.status,
        429
    );
    // Another identity from the same address has its own.
    assert_eq!(
        get(&api, reviews, ip(t, 10), "reviews", "/").await.status,
        200
    );
    Ok(())
}

#[tokio::test]
async fn mesh_backend_endpoints_follow_the_view() -> Result<(), BoxError> {
    let t = 7;
    let pki = Pki::new();
    backend_pod(&pki, ip(t, 21), "reviews-1", &spiffe("reviews")).await;
    backend_pod(&pki, ip(t, 22), "reviews-2", &spiffe("reviews")).await;
    let yaml = r#"
listeners:
  - name: reviews
    service: reviews
    port: 9080
    routes:
      - backendRefs: [{ name: reviews }]
backends:
  - name: reviews
    service: reviews
    port: 9080
"#;
    let mut mesh = state(t, &pki);
    let (wp, view) = waypoint(t, &pki, &mesh, yaml).await;
    let web = connect(wp, &pki, &pki, &spiffe("web")).await.expect("mTLS");
    let reviews = vip(t, 101, 9080);
    for _ in 0..3 {
        assert_eq!(
            get(&web, reviews, ip(t, 10), "reviews", "/").await.body,
            "reviews-1"
        );
    }
    // reviews-1 goes unready, reviews-2 joins.
    mesh.services.insert(
        "shop/reviews".into(),
        service(
            "reviews",
            ip(t, 101),
            9080,
            8080,
            &[("reviews-1", ip(t, 21)), ("reviews-2", ip(t, 22))],
        ),
    );
    if let Some(s) = mesh.services.get_mut("shop/reviews") {
        s.endpoints[0].ready = false;
    }
    view.send_replace(Arc::new(MeshView::build(&mesh, TD)));
    for _ in 0..3 {
        assert_eq!(
            get(&web, reviews, ip(t, 10), "reviews", "/").await.body,
            "reviews-2"
        );
    }
    Ok(())
}

/// A backend pod speaking a server-first, non-HTTP protocol: HBONE on `<ip>:15008` for
/// `identity`; each tunnel first gets `hello <name> dst=<CONNECT authority> for=<Forwarded
/// for>\n`, then everything it sends is echoed until it closes its side, then the pod closes.
async fn tcp_pod(pki: &Pki, at: IpAddr, name: &'static str, identity: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (cert, key) = pki.leaf(identity);
    let config = server_config(
        certs_from_pem(cert.as_bytes()).expect("cert"),
        private_key_from_pem(key.as_bytes()).expect("key"),
        &pki.trust(),
    )
    .expect("server config");
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let socket = tokio::net::TcpListener::bind(SocketAddr::new(at, 15008))
        .await
        .expect("bind a TCP pod's 15008");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = socket.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let handler = move |c: ConnectRequest, mut tunnel: Tunnel| async move {
                    let hello = format!(
                        "hello {name} dst={} for={}\n",
                        c.dst,
                        c.forwarded_for.map(|i| i.to_string()).unwrap_or_default()
                    );
                    if tunnel.write_all(hello.as_bytes()).await.is_err() {
                        return;
                    }
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = tunnel.read(&mut buf).await {
                        if n == 0 || tunnel.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = tunnel.shutdown().await;
                };
                let _ = hbone::serve(tls, handler).await;
            });
        }
    });
}

/// Reads `tunnel` until `want` bytes arrived (bounded by the test's own timeout).
async fn read_n(tunnel: &mut Tunnel, want: usize) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = vec![0u8; want];
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tunnel.read_exact(&mut got),
    )
    .await
    .expect("bytes within 10 s")
    .expect("read");
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn mesh_non_http_tunnel_is_proxied_as_opaque_tcp() -> Result<(), BoxError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = 20;
    let pki = Pki::new();
    tcp_pod(&pki, ip(t, 41), "tcp-1", &spiffe("tcp")).await;
    backend_pod(&pki, ip(t, 21), "reviews-1", &spiffe("reviews")).await;
    let mut state = state(t, &pki);
    let w = workload("tcp-1", "tcp", ip(t, 41));
    state.workloads.insert(w.key(), w);
    // `tcp`: no declared protocol (detected); `cache`: declared `redis` (opaque without wait).
    for (name, host, app_protocol) in [("tcp", 103, ""), ("cache", 104, "redis")] {
        let mut s = service(name, ip(t, host), 7000, 7001, &[("tcp-1", ip(t, 41))]);
        s.ports[0].app_protocol = app_protocol.into();
        state.services.insert(s.key(), s);
    }
    let (wp, _view) = waypoint(t, &pki, &state, "listeners: []\n").await;
    let web = connect(wp, &pki, &pki, &spiffe("web")).await.expect("mTLS");
    let hello = format!("hello tcp-1 dst={}:7001 for={}\n", ip(t, 41), ip(t, 10));

    // Client first, not HTTP: proxied byte for byte (binary included) to the endpoint's
    // target port, naming the original client.
    let mut a = tunnel(&web, vip(t, 103, 7000), ip(t, 10))
        .await
        .expect("tunnel");
    let payload: &[u8] = b"\x00\x01\xffnot http at all\r\n";
    a.write_all(payload).await?;
    assert_eq!(read_n(&mut a, hello.len()).await, hello);
    let mut echoed = vec![0u8; payload.len()];
    a.read_exact(&mut echoed).await?;
    assert_eq!(echoed, payload);
    // Half-close: our end of input reaches the endpoint, which closes in turn.
    a.shutdown().await?;
    let mut rest = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), a.read_to_end(&mut rest))
        .await
        .expect("the endpoint closes after our half-close")?;
    assert!(rest.is_empty(), "{rest:?}");

    // Server first: the client says nothing; after the detection wait the endpoint's greeting
    // arrives, then the exchange goes on.
    let mut b = tunnel(&web, vip(t, 103, 7000), ip(t, 10))
        .await
        .expect("tunnel");
    assert_eq!(read_n(&mut b, hello.len()).await, hello);
    b.write_all(b"PING\r\n").await?;
    assert_eq!(read_n(&mut b, 6).await, "PING\r\n");

    // Declared non-HTTP: even bytes that look like HTTP are proxied as they are.
    let mut c = tunnel(&web, vip(t, 104, 7000), ip(t, 10))
        .await
        .expect("tunnel");
    c.write_all(b"GET / HTTP/1.1\r\n\r\n").await?;
    assert_eq!(read_n(&mut c, hello.len()).await, hello);
    assert_eq!(read_n(&mut c, 18).await, "GET / HTTP/1.1\r\n\r\n");

    // HTTP is still served as HTTP (detected from the request line).
    let h = get(&web, vip(t, 101, 9080), ip(t, 10), "reviews", "/x").await;
    assert_eq!(
        (h.status, h.body.as_str()),
        (200, "reviews-1"),
        "{}",
        h.body
    );
    Ok(())
}

/// A writer collecting the access log in memory.
#[derive(Clone, Default)]
struct Lines(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lines").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Lines {
    /// The lines written so far, once there is one (the writer thread is asynchronous: a
    /// bounded wait).
    async fn wait_for_some(&self) -> Vec<serde_json::Value> {
        let mut parsed = Vec::new();
        for _ in 0..500 {
            parsed = self.parsed();
            if !parsed.is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        parsed
    }

    fn parsed(&self) -> Vec<serde_json::Value> {
        let text = String::from_utf8(self.0.lock().expect("lines").clone()).expect("utf-8");
        text.lines()
            .map(|l| serde_json::from_str(l).expect("each line is one JSON object"))
            .collect()
    }
}

#[tokio::test]
async fn mesh_request_writes_one_json_access_log_line() -> Result<(), BoxError> {
    let t = 21;
    let pki = Pki::new();
    backend_pod(&pki, ip(t, 21), "reviews-1", &spiffe("reviews")).await;
    let lines = Lines::default();
    let log = AccessLog::to_writer(Box::new(lines.clone()), 64)?;
    let (wp, _view) = waypoint_logged(t, &pki, &state(t, &pki), "listeners: []\n", Some(log)).await;
    let web = connect(wp, &pki, &pki, &spiffe("web")).await.expect("mTLS");
    let a = get(&web, vip(t, 101, 9080), ip(t, 10), "reviews:9080", "/r?x=1").await;
    assert_eq!(a.status, 200, "{}", a.body);
    let parsed = lines.wait_for_some().await;
    assert_eq!(parsed.len(), 1, "{parsed:?}");
    let l = &parsed[0];
    assert_eq!(l["method"], "GET");
    assert_eq!(l["authority"], "reviews:9080");
    assert_eq!(l["path"], "/r?x=1");
    assert_eq!(l["protocol"], "HTTP/1.1");
    assert_eq!(l["status"], 200);
    assert_eq!(l["response_bytes"], "reviews-1".len());
    assert_eq!(l["request_bytes"], 0);
    assert_eq!(l["route"], "default");
    assert_eq!(l["backend"], "shop/reviews:9080");
    assert_eq!(l["upstream"], format!("{}:8080", ip(t, 21)));
    assert_eq!(l["retries"], 0);
    assert_eq!(l["source_principal"], spiffe("web"));
    assert_eq!(l["source_workload"], "shop/web");
    assert_eq!(l["source_ip"], ip(t, 10).to_string());
    assert_eq!(l["destination_service"], "shop/reviews");
    assert_eq!(l["flags"], serde_json::json!([]));
    assert!(
        l["start_time"].as_str().is_some_and(|s| s.ends_with('Z')),
        "{l}"
    );
    Ok(())
}

#[tokio::test]
async fn mesh_opaque_tcp_tries_another_endpoint_and_closes_without_one() -> Result<(), BoxError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = 22;
    let pki = Pki::new();
    // tcp-1 answers; tcp-2 is in the view but nothing listens on its 15008.
    tcp_pod(&pki, ip(t, 41), "tcp-1", &spiffe("tcp")).await;
    let mut state = state(t, &pki);
    for w in [
        workload("tcp-1", "tcp", ip(t, 41)),
        workload("tcp-2", "tcp", ip(t, 42)),
    ] {
        state.workloads.insert(w.key(), w);
    }
    let mut s = service(
        "tcp",
        ip(t, 103),
        7000,
        7001,
        &[("tcp-1", ip(t, 41)), ("tcp-2", ip(t, 42))],
    );
    s.ports[0].app_protocol = "tcp".into();
    state.services.insert(s.key(), s);
    let mut empty = service("empty", ip(t, 104), 7000, 7001, &[]);
    empty.ports[0].app_protocol = "tcp".into();
    state.services.insert(empty.key(), empty);
    let (wp, _view) = waypoint(t, &pki, &state, "listeners: []\n").await;
    let web = connect(wp, &pki, &pki, &spiffe("web")).await.expect("mTLS");
    let hello = format!("hello tcp-1 dst={}:7001 for={}\n", ip(t, 41), ip(t, 10));

    // Whichever endpoint is tried first, every connection reaches tcp-1.
    for i in 0..6 {
        let mut c = tunnel(&web, vip(t, 103, 7000), ip(t, 10))
            .await
            .expect("tunnel");
        assert_eq!(read_n(&mut c, hello.len()).await, hello, "connection {i}");
        c.write_all(b"x").await?;
        assert_eq!(read_n(&mut c, 1).await, "x");
    }

    // No ready endpoint: the tunnel is admitted, then closed without a byte.
    let mut c = tunnel(&web, vip(t, 104, 7000), ip(t, 10))
        .await
        .expect("tunnel");
    let mut got = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), c.read_to_end(&mut got))
        .await
        .expect("the waypoint closes the tunnel");
    assert!(got.is_empty(), "{got:?} ({read:?})");
    Ok(())
}

/// The mesh of test `t` with `shop/cache` (VIP .104, port 7000, declared `redis`) served by
/// the TCP pod `tcp-1` (.41, target port 7001), which this starts.
async fn cache_state(t: u8, pki: &Pki) -> MeshState {
    tcp_pod(pki, ip(t, 41), "tcp-1", &spiffe("tcp")).await;
    let mut state = state(t, pki);
    let w = workload("tcp-1", "tcp", ip(t, 41));
    state.workloads.insert(w.key(), w);
    let mut s = service("cache", ip(t, 104), 7000, 7001, &[("tcp-1", ip(t, 41))]);
    s.ports[0].app_protocol = "redis".into();
    state.services.insert(s.key(), s);
    state
}

#[tokio::test]
async fn mesh_shutdown_lets_opaque_tcp_tunnels_run_until_they_close_or_the_drain_ends()
-> Result<(), BoxError> {
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = 23;
    let pki = Pki::new();
    let state = cache_state(t, &pki).await;
    let hello = format!("hello tcp-1 dst={}:7001 for={}\n", ip(t, 41), ip(t, 10));

    // A waypoint draining for `drain` once stopped, and an opaque TCP tunnel through it to the
    // echo pod, greeted and sent "one".
    let open = |drain: Duration| {
        let (pki, state, hello) = (&pki, &state, &hello);
        async move {
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let (wp, served) = waypoint_until(t, pki, state, stopped, drain).await;
            let web = connect(wp, pki, pki, &spiffe("web")).await.expect("mTLS");
            let mut tcp = tunnel(&web, vip(t, 104, 7000), ip(t, 10))
                .await
                .expect("tunnel");
            tcp.write_all(b"one\n").await.expect("write");
            assert_eq!(read_n(&mut tcp, hello.len()).await, *hello);
            (stop, served, web, tcp)
        }
    };

    // A tunnel open at shutdown keeps working, and the waypoint waits for it to close.
    let (stop, served, web, mut a) = open(Duration::from_secs(60)).await;
    assert_eq!(read_n(&mut a, 4).await, "one\n");
    let _ = stop.send(());
    // New tunnels are refused once draining (the answer is the proof that it started).
    let refused = tunnel(&web, vip(t, 104, 7000), ip(t, 10)).await;
    assert!(
        matches!(&refused, Err(Failure::Refused(status, _)) if status.as_u16() == 503),
        "{:?}",
        refused.err()
    );
    a.write_all(b"two\n").await?;
    assert_eq!(read_n(&mut a, 4).await, "two\n");
    assert!(
        !served.is_finished(),
        "the waypoint stopped with an opaque TCP tunnel open"
    );
    // Our half-close reaches the pod, which closes: the tunnel ends, and so does the drain.
    a.shutdown().await?;
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), a.read_to_end(&mut rest))
        .await
        .expect("the pod closes after our half-close")?;
    tokio::time::timeout(Duration::from_secs(10), served)
        .await
        .expect("the waypoint stops once its last tunnel closed")?;

    // A tunnel still open when the drain time is up does not hold the waypoint any longer.
    let (stop, served, _web, _b) = open(Duration::from_millis(300)).await;
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), served)
        .await
        .expect("the drain time bounds the wait")?;
    Ok(())
}

#[tokio::test]
async fn mesh_opaque_tcp_connection_writes_one_access_log_line() -> Result<(), BoxError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = 24;
    let pki = Pki::new();
    let state = cache_state(t, &pki).await;
    let lines = Lines::default();
    let log = AccessLog::to_writer(Box::new(lines.clone()), 64)?;
    let (wp, _view) = waypoint_logged(t, &pki, &state, "listeners: []\n", Some(log)).await;
    let web = connect(wp, &pki, &pki, &spiffe("web")).await.expect("mTLS");
    let hello = format!("hello tcp-1 dst={}:7001 for={}\n", ip(t, 41), ip(t, 10));
    let mut a = tunnel(&web, vip(t, 104, 7000), ip(t, 10))
        .await
        .expect("tunnel");
    a.write_all(b"PING\r\n").await?;
    assert_eq!(read_n(&mut a, hello.len()).await, hello);
    assert_eq!(read_n(&mut a, 6).await, "PING\r\n");
    // No line while the connection is open.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(lines.parsed().is_empty(), "{:?}", lines.parsed());
    a.shutdown().await?;
    let mut rest = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), a.read_to_end(&mut rest))
        .await
        .expect("the pod closes after our half-close")?;
    let parsed = lines.wait_for_some().await;
    assert_eq!(parsed.len(), 1, "{parsed:?}");
    let l = &parsed[0];
    assert_eq!(l["protocol"], "TCP");
    assert_eq!(l["destination_service"], "shop/cache");
    assert_eq!(l["destination_port"], 7000);
    assert_eq!(l["result"], "ok");
    assert_eq!(l["upstream"], format!("{}:7001", ip(t, 41)));
    assert_eq!(l["received_bytes"], 6);
    assert_eq!(l["sent_bytes"], hello.len() + 6);
    assert_eq!(l["source_principal"], spiffe("web"));
    assert_eq!(l["source_workload"], "shop/web");
    assert_eq!(l["source_ip"], ip(t, 10).to_string());
    assert!(l.get("error").is_none(), "{l}");
    assert!(l["duration_ms"].as_f64().is_some_and(|d| d >= 100.0), "{l}");
    assert!(
        l["start_time"].as_str().is_some_and(|s| s.ends_with('Z')),
        "{l}"
    );
    Ok(())
}
