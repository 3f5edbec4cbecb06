//! Kubernetes-mode identity against the fake API server: agents authenticated by TokenReview of
//! their projected service-account token, and the CA kept in a Secret.

use std::time::Duration;

use serde_json::json;
use weft_controller::ca::DEFAULT_WORKLOAD_TTL;
use weft_controller::ca_secret::{self, CaSecretError};
use weft_controller::server::{Auth, Authenticator};
use weft_controller::tokenreview::{ReviewError, TokenReviewer};
use weft_tests::fake_apiserver::{FakeApiServer, TOKEN_REVIEWS, TokenUser};

const AUD: &str = "weft-controller";
const AGENT_SA: &str = "weft-system/weft-agent";

fn reviewer(server: &FakeApiServer) -> TokenReviewer {
    TokenReviewer::new(server.client(), AUD, AGENT_SA).expect("reviewer")
}

fn agent_pod(name: &str, node: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "weft-system"},
        "spec": {"nodeName": node, "serviceAccountName": "weft-agent",
                 "containers": [{"name": "agent", "image": "weft/agent"}]},
    })
}

#[tokio::test]
async fn identity_token_review_accepts_the_agents_projected_token() {
    let server = FakeApiServer::start().await;
    // Kubernetes 1.30+: the node is in the review itself.
    server.add_token(
        "tok-n1",
        TokenUser::service_account("weft-system", "weft-agent", AUD).bound_to(
            "weft-agent-abc",
            "uid-1",
            Some("n1"),
        ),
    );
    // Older API servers: only the pod; its node comes from the pod.
    let pod = server.apply(agent_pod("weft-agent-def", "n2"));
    let uid = pod["metadata"]["uid"]
        .as_str()
        .expect("the server assigns a UID");
    server.add_token(
        "tok-n2",
        TokenUser::service_account("weft-system", "weft-agent", AUD).bound_to(
            "weft-agent-def",
            uid,
            None,
        ),
    );
    let r = reviewer(&server);
    assert_eq!(r.node_of("tok-n1").await.expect("n1"), "n1");
    assert_eq!(r.node_of("tok-n2").await.expect("n2"), "n2");
    let reviews = || {
        server
            .requests()
            .iter()
            .filter(|q| q.path == TOKEN_REVIEWS && q.method == "POST")
            .count()
    };
    assert_eq!(reviews(), 2);
    // Cached briefly: asking again does not review again.
    r.node_of("tok-n1").await.expect("cached");
    assert_eq!(reviews(), 2, "the result is cached");

    // Through the authenticator, as the gRPC services use it.
    let auth = Authenticator::new(Auth::Kubernetes(std::sync::Arc::new(r)), "cluster.local");
    let mut md = tonic::metadata::MetadataMap::new();
    md.insert("authorization", "Bearer tok-n2".parse().expect("header"));
    assert_eq!(
        auth.node_for_bearer(&md).await.expect("n2"),
        Some("n2".to_string())
    );
}

#[tokio::test]
async fn identity_token_review_refuses_unknown_and_wrong_audience_tokens() {
    let server = FakeApiServer::start().await;
    server.add_token(
        "tok-api",
        TokenUser::service_account(
            "weft-system",
            "weft-agent",
            "https://kubernetes.default.svc",
        )
        .bound_to("weft-agent-abc", "uid-1", Some("n1")),
    );
    let r = reviewer(&server);
    let e = r.node_of("garbage").await.expect_err("unknown");
    assert!(matches!(e, ReviewError::Refused(..)), "{e}");
    assert!(e.to_string().contains("invalid bearer token"), "{e}");
    let e = r.node_of("tok-api").await.expect_err("wrong audience");
    assert!(e.to_string().contains("audience `weft-controller`"), "{e}");
    // Through the authenticator: UNAUTHENTICATED with the reason.
    let auth = Authenticator::new(
        Auth::Kubernetes(std::sync::Arc::new(reviewer(&server))),
        "cluster.local",
    );
    let mut md = tonic::metadata::MetadataMap::new();
    md.insert("authorization", "Bearer garbage".parse().expect("header"));
    let s = auth.node_for_bearer(&md).await.expect_err("refused");
    assert_eq!(s.code(), tonic::Code::Unauthenticated);
    // A token not bound to a pod (a legacy Secret token) has no node.
    server.add_token(
        "tok-unbound",
        TokenUser::service_account("weft-system", "weft-agent", AUD),
    );
    let e = r.node_of("tok-unbound").await.expect_err("unbound");
    assert!(matches!(e, ReviewError::NotBound(_)), "{e}");
    // Bound to a pod that was replaced (same name, new UID).
    server.apply(agent_pod("weft-agent-x", "n3"));
    server.add_token(
        "tok-stale",
        TokenUser::service_account("weft-system", "weft-agent", AUD).bound_to(
            "weft-agent-x",
            "uid-old",
            None,
        ),
    );
    let e = r.node_of("tok-stale").await.expect_err("stale pod");
    assert!(e.to_string().contains("was replaced"), "{e}");
}

#[tokio::test]
async fn identity_token_review_refuses_another_service_account() {
    let server = FakeApiServer::start().await;
    // A workload's projected token, with the right audience and a node: still not an agent.
    server.add_token(
        "tok-web",
        TokenUser::service_account("shop", "web", AUD).bound_to("web-1", "uid-w", Some("n1")),
    );
    let e = reviewer(&server)
        .node_of("tok-web")
        .await
        .expect_err("not the agent's service account");
    assert!(
        matches!(&e, ReviewError::WrongServiceAccount { got, want }
            if got == "system:serviceaccount:shop:web"
            && want == "system:serviceaccount:weft-system:weft-agent"),
        "{e}"
    );
    assert!(e.to_string().contains("--agent-service-account"), "{e}");
    assert!(TokenReviewer::new(server.client(), AUD, "no-slash").is_err());
}

#[tokio::test]
async fn identity_token_review_api_errors_are_not_cached() {
    let server = FakeApiServer::start().await;
    server.add_token(
        "tok-n1",
        TokenUser::service_account("weft-system", "weft-agent", AUD).bound_to("p", "u", Some("n1")),
    );
    let r = reviewer(&server);
    server.fail_path(TOKEN_REVIEWS, 403, 1);
    let e = r.node_of("tok-n1").await.expect_err("forbidden");
    assert!(matches!(e, ReviewError::Unavailable(_)), "{e}");
    assert!(e.to_string().contains("manifests/rbac.yaml"), "{e}");
    assert_eq!(r.node_of("tok-n1").await.expect("retried"), "n1");
}

fn bundle(ca: &weft_controller::ca::Ca) -> Vec<String> {
    ca.trust_bundle().to_vec()
}

#[tokio::test]
async fn identity_ca_secret_persists_across_controller_restarts() {
    let server = FakeApiServer::start().await;
    let first =
        ca_secret::load_or_create(server.client(), "weft-system/weft-ca", DEFAULT_WORKLOAD_TTL)
            .await
            .expect("created");
    let stored = server
        .get("v1", "Secret", "weft-system", "weft-ca")
        .expect("the Secret exists");
    for key in ["root.crt", "root.key", "ca.crt", "ca.key"] {
        assert!(stored["data"][key].is_string(), "{key} in {stored}");
    }
    // A "restarted" controller (a new client, nothing in memory) gets the same CA, and what it
    // signs verifies under the first one's roots.
    let again =
        ca_secret::load_or_create(server.client(), "weft-system/weft-ca", DEFAULT_WORKLOAD_TTL)
            .await
            .expect("loaded");
    assert_eq!(bundle(&again), bundle(&first));
    let key = rcgen::KeyPair::generate().expect("key");
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .expect("params")
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem");
    let a = first
        .sign(&csr, "spiffe://cluster.local/ns/a/sa/b", None)
        .expect("a");
    let b = again
        .sign(&csr, "spiffe://cluster.local/ns/a/sa/b", None)
        .expect("b");
    assert_eq!(a.chain_pem[1], b.chain_pem[1], "same intermediate");
    let creates = server
        .requests()
        .iter()
        .filter(|r| r.method == "POST")
        .count();
    assert_eq!(creates, 1, "the second start created nothing");

    // An incomplete Secret is an error, never replaced.
    let mut broken = stored.clone();
    if let Some(d) = broken["data"].as_object_mut() {
        d.remove("ca.key");
    }
    server.apply(broken);
    let e = ca_secret::load_or_create(server.client(), "weft-system/weft-ca", DEFAULT_WORKLOAD_TTL)
        .await
        .expect_err("incomplete");
    assert!(
        matches!(&e, CaSecretError::Incomplete { missing, .. } if missing == "ca.key"),
        "{e}"
    );
    assert!(e.to_string().contains("restore the missing keys"), "{e}");
    // Without root.key (moved offline) the CA still loads.
    let mut offline = stored;
    if let Some(d) = offline["data"].as_object_mut() {
        d.remove("root.key");
    }
    server.apply(offline);
    let loaded =
        ca_secret::load_or_create(server.client(), "weft-system/weft-ca", DEFAULT_WORKLOAD_TTL)
            .await
            .expect("root key offline");
    assert_eq!(bundle(&loaded), bundle(&first));
}

#[tokio::test]
async fn identity_ca_secret_concurrent_creators_converge() {
    for _ in 0..3 {
        let server = FakeApiServer::start().await;
        let (a, b) = tokio::join!(
            ca_secret::load_or_create(server.client(), "weft-system/weft-ca", DEFAULT_WORKLOAD_TTL),
            ca_secret::load_or_create(server.client(), "weft-system/weft-ca", DEFAULT_WORKLOAD_TTL),
        );
        let (a, b) = (a.expect("a"), b.expect("b"));
        assert_eq!(bundle(&a), bundle(&b), "both controllers use one CA");
        let stored = server
            .get("v1", "Secret", "weft-system", "weft-ca")
            .expect("secret");
        let root = stored["data"]["root.crt"].as_str().expect("root");
        use base64_check::decode;
        assert_eq!(decode(root), bundle(&a)[0]);
        let creates: Vec<u16> = server
            .requests()
            .iter()
            .filter(|r| r.method == "POST")
            .map(|r| r.status)
            .collect();
        // Both looked, found nothing and created; the loser got 409 and took the winner's.
        assert_eq!(creates.len(), 2, "{creates:?}");
        assert!(
            creates.contains(&201) && creates.contains(&409),
            "{creates:?}"
        );
    }
    // A malformed Secret name says so.
    let server = FakeApiServer::start().await;
    let e = ca_secret::load_or_create(server.client(), "weft-ca", Duration::from_secs(60))
        .await
        .expect_err("bad name");
    assert!(matches!(e, CaSecretError::BadName(_)), "{e}");
}

/// Standard base64 (what the API server stores Secret data as), for one check.
mod base64_check {
    pub fn decode(s: &str) -> String {
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut bits = 0u32;
        let mut n = 0;
        let mut out = Vec::new();
        for c in s.bytes().filter(|c| *c != b'=') {
            let v = A.iter().position(|a| *a == c).expect("base64") as u32;
            bits = (bits << 6) | v;
            n += 6;
            if n >= 8 {
                n -= 8;
                out.push((bits >> n) as u8);
                bits &= (1 << n) - 1;
            }
        }
        String::from_utf8(out).expect("utf-8")
    }
}

/// The controller binary in Kubernetes mode against the fake API server (KUBECONFIG): the CA
/// is created in its Secret, an agent's projected token is exchanged for a node certificate,
/// the stream and `Sign` work over mTLS with it, and after a restart the same CA is used (the
/// old node certificate still opens the stream).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_kubernetes_mode_controller_end_to_end() {
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    use weft_api::wire::pb::{
        self, certificates_client::CertificatesClient, discovery_client::DiscoveryClient,
    };

    let server = FakeApiServer::start().await;
    server.apply(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "shop", "labels": {"weft.dev/mesh": "enabled"}}}));
    server.apply(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"nodeName": "n1", "serviceAccountName": "web",
                 "containers": [{"name": "main", "image": "example/app"}]},
        "status": {"phase": "Running", "podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}]}}));
    server.add_token(
        "agent-n1",
        TokenUser::service_account("weft-system", "weft-agent", AUD).bound_to(
            "weft-agent-1",
            "uid-1",
            Some("n1"),
        ),
    );
    server.add_token(
        "web-token",
        TokenUser::service_account("shop", "web", AUD).bound_to("web", "uid-w", Some("n1")),
    );
    let dir = std::env::temp_dir().join(format!("weft-k8s-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\nusers:\n- name: u\n  user: {{}}\ncontexts:\n- name: c\n  context:\n    cluster: fake\n    user: u\ncurrent-context: c\n",
            server.url()
        ),
    )
    .expect("kubeconfig");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let start = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_weft-controller"))
            .args(["--kubernetes", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--state-dir")
            .arg(dir.join("state"))
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("controller.log")).expect("log"))
            .spawn()
            .expect("start weft-controller")
    };
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let log = || std::fs::read_to_string(dir.join("controller.log")).unwrap_or_default();
    let wait_listening = || async {
        for _ in 0..500 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the controller did not listen; log:\n{}", log());
    };
    let mut controller = Kill(start());
    wait_listening().await;
    let stored = server
        .get("v1", "Secret", "weft-system", "weft-ca")
        .expect("the CA Secret was created");
    let server_ca = std::fs::read(dir.join("state/ca.pem")).expect("ca.pem");
    let channel = |identity: Option<(String, String)>| {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&server_ca))
            .domain_name("weft-controller");
        if let Some((chain, key)) = identity {
            tls = tls.identity(Identity::from_pem(chain, key));
        }
        let endpoint = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
            .expect("url")
            .tls_config(tls)
            .expect("tls");
        async move { endpoint.connect().await.expect("connect") }
    };
    let csr = |id: &str| {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        p.subject_alt_names = vec![rcgen::SanType::URI(id.to_string().try_into().expect("uri"))];
        let csr = p.serialize_request(&key).expect("csr").pem().expect("pem");
        (key.serialize_pem(), csr)
    };
    let sign_node = |token: &'static str| {
        let channel = channel(None);
        let (key, csr) = csr("spiffe://cluster.local/weft/node/n1");
        async move {
            let mut req = tonic::Request::new(pb::SignNodeRequest {
                node: "n1".into(),
                csr_pem: csr,
            });
            req.metadata_mut().insert(
                "authorization",
                format!("Bearer {token}").parse().expect("header"),
            );
            CertificatesClient::new(channel.await)
                .sign_node(req)
                .await
                .map(|r| (r.into_inner().chain_pem.concat(), key))
        }
    };
    // A workload's token buys nothing; the agent's does.
    let e = sign_node("web-token").await.expect_err("workload token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("weft-system:weft-agent"), "{e:?}");
    let node_cert = sign_node("agent-n1").await.expect("node certificate");
    let stream_first = |cert: (String, String)| {
        let channel = channel(Some(cert));
        async move {
            let (tx, rx) = mpsc::channel(2);
            tx.send(pb::AgentMessage {
                msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
                    node: "n1".into(),
                    known: Default::default(),
                    agent_version: "test".into(),
                })),
            })
            .await
            .expect("hello");
            let mut inbound = DiscoveryClient::new(channel.await)
                .stream(ReceiverStream::new(rx))
                .await
                .expect("stream over mTLS")
                .into_inner();
            let first = tokio::time::timeout(Duration::from_secs(20), inbound.message())
                .await
                .expect("an update in time")
                .expect("no error")
                .expect("an update");
            drop(tx);
            first
        }
    };
    let first = stream_first(node_cert.clone()).await;
    let keys: Vec<&str> = first.upserts.iter().map(|r| r.key.as_str()).collect();
    assert!(
        keys.contains(&"Workload/shop/web"),
        "{keys:?}; log:\n{}",
        log()
    );
    let (_, web_csr) = csr("spiffe://cluster.local/ns/shop/sa/web");
    CertificatesClient::new(channel(Some(node_cert.clone())).await)
        .sign(pb::SignRequest {
            identity: "spiffe://cluster.local/ns/shop/sa/web".into(),
            csr_pem: web_csr,
            ttl_seconds: 0,
        })
        .await
        .expect("a workload certificate over mTLS");

    // Restart: the CA comes from the Secret, so the node certificate still verifies.
    drop(controller);
    controller = Kill(start());
    wait_listening().await;
    let first = stream_first(node_cert).await;
    assert!(first.sync, "log:\n{}", log());
    assert_eq!(
        server.get("v1", "Secret", "weft-system", "weft-ca"),
        Some(stored),
        "the Secret is unchanged"
    );
    drop(controller);
    let _ = std::fs::remove_dir_all(&dir);
}
