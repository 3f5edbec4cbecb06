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
