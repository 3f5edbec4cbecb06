//! The certificate-signing API over real gRPC (in process, loopback): who may obtain which
//! identity, and what is refused with which reason.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{CertificateParams, KeyPair};
use tokio::sync::watch;
use tonic::transport::Server;
use weft_api::MeshState;
use weft_api::wire::pb::SignRequest;
use weft_api::wire::pb::certificates_client::CertificatesClient;
use weft_api::wire::pb::certificates_server::CertificatesServer;
use weft_controller::ca::{Ca, DEFAULT_WORKLOAD_TTL};
use weft_controller::certs::CertificateService;
use weft_controller::server::{Auth, Authenticator, Tokens};

mod common;

use common::{Dir, workload};

const N1: &str = "token-for-node-one-0123456789";
const N2: &str = "token-for-node-two-0123456789";

async fn start() -> (String, Dir) {
    let tokens = HashMap::from([
        ("n1".to_string(), N1.to_string()),
        ("n2".to_string(), N2.to_string()),
    ]);
    start_with(Auth::Tokens(
        Tokens::from_nodes(tokens).expect("distinct tokens"),
    ))
    .await
}

/// The service with web on n1 and api on n2, on a loopback port.
async fn start_with(auth: Auth) -> (String, Dir) {
    let dir = Dir::new("weft-certs-test");
    let ca = Arc::new(Ca::load_or_generate(&dir.0, DEFAULT_WORKLOAD_TTL).expect("ca"));
    let mut state = MeshState::default();
    for w in [workload("web", "n1", 3), workload("api", "n2", 4)] {
        state.workloads.insert(w.key(), w);
    }
    let (tx, rx) = watch::channel(Arc::new(state));
    std::mem::forget(tx);
    let svc = CertificateService::new(ca, rx, Authenticator::new(auth, "cluster.local"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(
        Server::builder()
            .add_service(CertificatesServer::new(svc))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (format!("http://{addr}"), dir)
}

fn csr() -> String {
    let key = KeyPair::generate().expect("key");
    CertificateParams::new(Vec::<String>::new())
        .expect("params")
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem")
}

async fn sign(
    url: &str,
    token: Option<&str>,
    identity: &str,
    csr: String,
) -> Result<weft_api::wire::pb::SignResponse, tonic::Status> {
    let mut client = tokio::time::timeout(
        Duration::from_secs(5),
        CertificatesClient::connect(url.to_string()),
    )
    .await
    .expect("connect in time")
    .expect("connect");
    let mut req = tonic::Request::new(SignRequest {
        identity: identity.into(),
        csr_pem: csr,
        ttl_seconds: 0,
    });
    if let Some(t) = token {
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().expect("header"),
        );
    }
    client.sign(req).await.map(tonic::Response::into_inner)
}

#[tokio::test]
async fn identity_agent_obtains_certificates_for_its_own_pods() {
    let (url, _dir) = start().await;
    let id = "spiffe://cluster.local/ns/shop/sa/web";
    let r = sign(&url, Some(N1), id, csr()).await.expect("signed");
    assert_eq!(r.chain_pem.len(), 2, "leaf and intermediate");
    assert_eq!(r.trust_bundle_pem.len(), 1);
    let (_, pem) = x509_parser::pem::parse_x509_pem(r.chain_pem[0].as_bytes()).expect("pem");
    let (_, cert) = x509_parser::parse_x509_certificate(&pem.contents).expect("x509");
    let san = cert.subject_alternative_name().expect("ext").expect("san");
    assert_eq!(
        format!("{}", san.value.general_names[0]),
        format!("URI({id})")
    );
}

#[tokio::test]
async fn identity_request_for_a_pod_on_another_node_is_refused() {
    let (url, _dir) = start().await;
    let e = sign(
        &url,
        Some(N1),
        "spiffe://cluster.local/ns/shop/sa/api",
        csr(),
    )
    .await
    .expect_err("api runs on n2");
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(
        e.message()
            .contains("node n1 runs no workload with identity"),
        "{}",
        e.message()
    );
    // The rightful node gets it.
    sign(
        &url,
        Some(N2),
        "spiffe://cluster.local/ns/shop/sa/api",
        csr(),
    )
    .await
    .expect("n2 may");
}

#[tokio::test]
async fn identity_request_without_valid_node_credentials_is_refused() {
    let (url, _dir) = start().await;
    let id = "spiffe://cluster.local/ns/shop/sa/web";
    let e = sign(&url, None, id, csr()).await.expect_err("no token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(e.message().contains("no credentials"), "{}", e.message());
    let e = sign(&url, Some("not-a-token-at-all-123"), id, csr())
        .await
        .expect_err("bad token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(
        e.message().contains("unknown bootstrap token"),
        "{}",
        e.message()
    );
}

#[tokio::test]
async fn identity_bad_requests_say_what_is_wrong() {
    let (url, _dir) = start().await;
    let e = sign(
        &url,
        Some(N1),
        "spiffe://other.domain/ns/shop/sa/web",
        csr(),
    )
    .await
    .expect_err("foreign trust domain");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("other.domain"), "{}", e.message());
    let e = sign(
        &url,
        Some(N1),
        "spiffe://cluster.local/ns/shop/sa/web",
        "garbage".into(),
    )
    .await
    .expect_err("garbage csr");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message()
            .contains("certificate signing request is invalid"),
        "{}",
        e.message()
    );
}

#[test]
fn identity_duplicate_bootstrap_tokens_are_refused() {
    let tokens = HashMap::from([
        ("n1".to_string(), N1.to_string()),
        ("n2".to_string(), N1.to_string()),
    ]);
    let e = Tokens::from_nodes(tokens).expect_err("shared token");
    assert!(e.contains("n1") && e.contains("n2"), "{e}");
}

#[tokio::test]
async fn identity_no_certificates_without_node_authentication() {
    let (url, _dir) = start_with(Auth::Insecure).await;
    let e = sign(&url, None, "spiffe://cluster.local/ns/shop/sa/web", csr())
        .await
        .expect_err("insecure mode");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(
        e.message().contains("--insecure-no-auth"),
        "{}",
        e.message()
    );
}

#[tokio::test]
async fn identity_waypoint_token_obtains_only_its_own_certificate() {
    use weft_tests::fake_apiserver::{FakeApiServer, TokenUser};
    const AUD: &str = "weft-controller";
    let server = FakeApiServer::start().await;
    let pod = |name: &str, sa: &str, node: &str, labels: serde_json::Value| {
        server.apply(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop", "labels": labels},
            "spec": {"nodeName": node, "serviceAccountName": sa,
                     "containers": [{"name": "c", "image": "i"}]},
        }))["metadata"]["uid"]
            .as_str()
            .expect("uid")
            .to_string()
    };
    // The waypoint pod runs as service account `web` on n1 (the state has workload web there).
    let uid = pod(
        "web-wp",
        "web",
        "n1",
        serde_json::json!({"weft.dev/waypoint": "wp"}),
    );
    server.add_token(
        "wp-token",
        TokenUser::service_account("shop", "web", AUD).bound_to("web-wp", &uid, None),
    );
    // An ordinary pod's token: not a waypoint.
    let uid = pod("api-1", "api", "n2", serde_json::json!({}));
    server.add_token(
        "plain-token",
        TokenUser::service_account("shop", "api", AUD).bound_to("api-1", &uid, None),
    );
    let reviewer = weft_controller::tokenreview::TokenReviewer::new(
        server.client(),
        AUD,
        "weft-system/weft-agent",
    )
    .expect("reviewer");
    let (url, _dir) = start_with(Auth::Kubernetes(Arc::new(reviewer))).await;
    let own = "spiffe://cluster.local/ns/shop/sa/web";
    sign(&url, Some("wp-token"), own, csr())
        .await
        .expect("a waypoint obtains its own certificate");
    let e = sign(
        &url,
        Some("wp-token"),
        "spiffe://cluster.local/ns/shop/sa/api",
        csr(),
    )
    .await
    .expect_err("another identity");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(e.message().contains("only its own certificate"), "{e}");
    let e = sign(
        &url,
        Some("plain-token"),
        "spiffe://cluster.local/ns/shop/sa/api",
        csr(),
    )
    .await
    .expect_err("not a waypoint");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
    assert!(e.message().contains("weft.dev/waypoint"), "{e}");
    // A waypoint's token never becomes a node certificate.
    let mut client = CertificatesClient::connect(url.clone())
        .await
        .expect("connect");
    let mut req = tonic::Request::new(weft_api::wire::pb::SignNodeRequest {
        node: "n1".into(),
        csr_pem: csr(),
    });
    req.metadata_mut()
        .insert("authorization", "Bearer wp-token".parse().expect("header"));
    let e = client
        .sign_node(req)
        .await
        .expect_err("no node certificate");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
}
