//! Node identities over real gRPC with real TLS (in process, loopback): the bootstrap-token
//! exchange for a node certificate (SignNode), agent -> controller mTLS with it, and what a
//! node certificate may and may not do.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{CertificateParams, KeyPair, SanType};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Server};
use tonic::transport::{ServerTlsConfig, server::TcpIncoming};
use weft_api::MeshState;
use weft_api::wire::pb::{
    self, AgentMessage, SignNodeRequest, SignRequest, SignResponse, agent_message,
    certificates_client::CertificatesClient, certificates_server::CertificatesServer,
    discovery_client::DiscoveryClient, discovery_server::DiscoveryServer,
};
use weft_controller::ca::{Ca, DEFAULT_WORKLOAD_TTL};
use weft_controller::certs::CertificateService;
use weft_controller::server::{Auth, Authenticator, DiscoveryService, Tokens};
use weft_controller::view::Views;

mod common;

use common::{Dir, workload};

const N1: &str = "token-for-node-one-0123456789";
const N2: &str = "token-for-node-two-0123456789";
const TD: &str = "cluster.local";

struct Controller {
    addr: std::net::SocketAddr,
    server_ca: Vec<u8>,
    ca: Arc<Ca>,
    _dir: Dir,
}

async fn start(require_node_certificates: bool) -> Controller {
    start_with(
        Auth::Tokens(
            Tokens::from_nodes(HashMap::from([
                ("n1".to_string(), N1.to_string()),
                ("n2".to_string(), N2.to_string()),
            ]))
            .expect("distinct tokens"),
        ),
        require_node_certificates,
    )
    .await
}

async fn start_with(credentials: Auth, require_node_certificates: bool) -> Controller {
    start_with_ttl(
        credentials,
        require_node_certificates,
        Duration::from_secs(600),
    )
    .await
}

async fn start_with_ttl(
    credentials: Auth,
    require_node_certificates: bool,
    node_ttl: Duration,
) -> Controller {
    let dir = Dir::new("weft-node-id-test");
    let tls = weft_controller::tls::load_or_generate(&dir.0.join("tls"), &[]).expect("tls");
    let server_ca = std::fs::read(dir.0.join("tls/ca.pem")).expect("ca.pem");
    let ca = Arc::new(Ca::load_or_generate(&dir.0.join("ca"), DEFAULT_WORKLOAD_TTL).expect("ca"));
    let mut state = MeshState::default();
    for w in [workload("web", "n1", 11), workload("api", "n2", 12)] {
        state.namespaces.insert(w.namespace.clone(), true);
        state.workloads.insert(w.key(), w);
    }
    let state = Arc::new(state);
    let (state_tx, state_rx) = watch::channel(state.clone());
    std::mem::forget(state_tx);
    let views = Arc::new(Views::default());
    views.set_trust_bundle(ca.trust_bundle());
    views.apply(state);
    let (ready_tx, ready_rx) = watch::channel(true);
    std::mem::forget(ready_tx);
    let auth =
        Authenticator::new(credentials, TD).require_node_certificates(require_node_certificates);
    let certs = CertificateService::new(ca.clone(), state_rx, auth.clone()).with_node_ttl(node_ttl);
    let discovery = DiscoveryService::new(views, ready_rx, auth);
    let incoming = TcpIncoming::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let addr = incoming.local_addr().expect("addr");
    let server = Server::builder()
        .tls_config(
            ServerTlsConfig::new()
                .identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem))
                .client_ca_root(Certificate::from_pem(ca.trust_bundle().concat()))
                .client_auth_optional(true),
        )
        .expect("tls config")
        .add_service(DiscoveryServer::new(discovery))
        .add_service(CertificatesServer::new(certs))
        .serve_with_incoming(incoming);
    tokio::spawn(server);
    Controller {
        addr,
        server_ca,
        ca,
        _dir: dir,
    }
}

/// A key and the certificate the CA gave it (chain PEM, key PEM).
struct NodeCert {
    chain: String,
    key: String,
}

impl Controller {
    /// A TLS channel, presenting `client` as the client certificate when given.
    async fn channel(&self, client: Option<&NodeCert>) -> Channel {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.server_ca))
            .domain_name(weft_controller::tls::SERVER_NAME);
        if let Some(c) = client {
            tls = tls.identity(Identity::from_pem(&c.chain, &c.key));
        }
        let endpoint = Endpoint::from_shared(format!("https://{}", self.addr))
            .expect("url")
            .tls_config(tls)
            .expect("tls");
        tokio::time::timeout(Duration::from_secs(5), endpoint.connect())
            .await
            .expect("connect in time")
            .expect("connect")
    }

    async fn sign_node(
        &self,
        token: Option<&str>,
        node: &str,
    ) -> Result<(SignResponse, NodeCert), tonic::Status> {
        let (key, csr) = csr(&format!("spiffe://{TD}/weft/node/{node}"));
        let req = with_token(
            SignNodeRequest {
                node: node.into(),
                csr_pem: csr,
            },
            token,
        );
        let r = CertificatesClient::new(self.channel(None).await)
            .sign_node(req)
            .await?
            .into_inner();
        let cert = NodeCert {
            chain: r.chain_pem.concat(),
            key: key.serialize_pem(),
        };
        Ok((r, cert))
    }

    async fn sign(
        &self,
        client: Option<&NodeCert>,
        token: Option<&str>,
        identity: &str,
    ) -> Result<SignResponse, tonic::Status> {
        let (_, csr) = csr(identity);
        let req = with_token(
            SignRequest {
                identity: identity.into(),
                csr_pem: csr,
                ttl_seconds: 0,
            },
            token,
        );
        CertificatesClient::new(self.channel(client).await)
            .sign(req)
            .await
            .map(tonic::Response::into_inner)
    }

    /// Opens the config stream as `node`; returns the first update.
    async fn stream(
        &self,
        client: Option<&NodeCert>,
        token: Option<&str>,
        node: &str,
    ) -> Result<pb::ControllerMessage, tonic::Status> {
        let (tx, rx) = mpsc::channel(4);
        tx.send(AgentMessage {
            msg: Some(agent_message::Msg::Hello(pb::Hello {
                node: node.into(),
                known: Default::default(),
                agent_version: "test".into(),
            })),
        })
        .await
        .expect("send hello");
        let req = with_token(ReceiverStream::new(rx), token);
        let mut inbound = DiscoveryClient::new(self.channel(client).await)
            .stream(req)
            .await?
            .into_inner();
        let first = tokio::time::timeout(Duration::from_secs(5), inbound.message())
            .await
            .expect("an update in time")?
            .expect("an update");
        drop(tx);
        Ok(first)
    }

    /// Opens the config stream as `node` with `client`, acknowledges the sync, and returns
    /// how the stream ended and after how long.
    async fn stream_until_closed(
        &self,
        client: &NodeCert,
        node: &str,
    ) -> (Result<(), tonic::Status>, Duration) {
        let (tx, rx) = mpsc::channel(4);
        let hello = pb::Hello {
            node: node.into(),
            known: Default::default(),
            agent_version: "test".into(),
        };
        tx.send(AgentMessage {
            msg: Some(agent_message::Msg::Hello(hello)),
        })
        .await
        .expect("send hello");
        let started = std::time::Instant::now();
        let mut inbound = DiscoveryClient::new(self.channel(Some(client)).await)
            .stream(ReceiverStream::new(rx))
            .await
            .expect("stream opens")
            .into_inner();
        loop {
            match tokio::time::timeout(Duration::from_secs(30), inbound.message())
                .await
                .expect("the stream ends in time")
            {
                Ok(Some(m)) => {
                    let ack = pb::Ack {
                        nonce: m.nonce,
                        error: String::new(),
                    };
                    let _ = tx
                        .send(AgentMessage {
                            msg: Some(agent_message::Msg::Ack(ack)),
                        })
                        .await;
                }
                Ok(None) => return (Ok(()), started.elapsed()),
                Err(s) => return (Err(s), started.elapsed()),
            }
        }
    }
}

fn with_token<T>(msg: T, token: Option<&str>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(t) = token {
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().expect("header"),
        );
    }
    req
}

fn csr(san: &str) -> (KeyPair, String) {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.subject_alt_names = vec![SanType::URI(san.to_string().try_into().expect("uri"))];
    let csr = params
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem");
    (key, csr)
}

fn leaf(chain_pem: &[String]) -> Vec<u8> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(chain_pem[0].as_bytes()).expect("pem");
    pem.contents
}

#[tokio::test]
async fn identity_node_certificate_exchange_succeeds_with_the_right_token() {
    let c = start(false).await;
    let (r, _) = c.sign_node(Some(N1), "n1").await.expect("exchanged");
    assert_eq!(r.chain_pem.len(), 2, "leaf and intermediate");
    assert_eq!(r.trust_bundle_pem, c.ca.trust_bundle());
    let der = leaf(&r.chain_pem);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("x509");
    let san = cert.subject_alternative_name().expect("ext").expect("san");
    assert_eq!(
        format!("{}", san.value.general_names[0]),
        "URI(spiffe://cluster.local/weft/node/n1)"
    );
    assert_eq!(san.value.general_names.len(), 1);
    // Client authentication only: a node certificate can never serve as a workload's.
    let eku = cert.extended_key_usage().expect("ext").expect("eku").value;
    assert!(eku.client_auth && !eku.server_auth, "{eku:?}");
    assert!(!cert.is_ca());
    // Short-lived: the configured 10 minutes (plus the one-minute backdate).
    let lifetime = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert!((600..=661).contains(&lifetime), "{lifetime}");
    assert_eq!(
        weft_controller::server::node_of_certificate(&der, TD),
        Ok("n1".to_string())
    );
}

#[tokio::test]
async fn identity_node_certificate_exchange_is_refused_with_a_wrong_token() {
    let c = start(false).await;
    let e = c
        .sign_node(Some("not-a-token-at-all-123"), "n1")
        .await
        .err()
        .expect("unknown token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(
        e.message().contains("unknown bootstrap token"),
        "{}",
        e.message()
    );
    let e = c.sign_node(None, "n1").await.err().expect("no token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(e.message().contains("no credentials"), "{}", e.message());
    // n2's token does not buy n1's certificate.
    let e = c.sign_node(Some(N2), "n1").await.err().expect("other node");
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(
        e.message()
            .contains("this credential belongs to node n2, not n1"),
        "{}",
        e.message()
    );
    // A bad node name or CSR says what is wrong.
    let e = c.sign_node(Some(N1), "").await.err().expect("empty node");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    // A node certificate cannot renew itself: SignNode takes the token only.
    let (_, n1) = c.sign_node(Some(N1), "n1").await.expect("n1");
    let (_, csr) = csr("spiffe://cluster.local/weft/node/n1");
    let e = CertificatesClient::new(c.channel(Some(&n1)).await)
        .sign_node(SignNodeRequest {
            node: "n1".into(),
            csr_pem: csr,
        })
        .await
        .expect_err("certificate without token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
}

#[tokio::test]
async fn identity_node_certificate_for_node_a_cannot_act_as_node_b() {
    let c = start(false).await;
    let (_, n1) = c.sign_node(Some(N1), "n1").await.expect("n1");
    // Its own pods' identities: yes.
    c.sign(Some(&n1), None, "spiffe://cluster.local/ns/shop/sa/web")
        .await
        .expect("web runs on n1");
    // Node B's pods: no, even with B's token alongside (the certificate wins).
    for token in [None, Some(N2)] {
        let e = c
            .sign(Some(&n1), token, "spiffe://cluster.local/ns/shop/sa/api")
            .await
            .expect_err("api runs on n2");
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(
            e.message()
                .contains("node n1 runs no workload with identity"),
            "{}",
            e.message()
        );
        // Nor B's stream.
        let e = c
            .stream(Some(&n1), token, "n2")
            .await
            .expect_err("n1's certificate as n2");
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(
            e.message()
                .contains("this credential belongs to node n1, not n2"),
            "{}",
            e.message()
        );
    }
    // A workload certificate (same CA) is not a node certificate.
    let (key, csr) = csr("spiffe://cluster.local/ns/shop/sa/web");
    let svid =
        c.ca.sign(&csr, "spiffe://cluster.local/ns/shop/sa/web", None)
            .expect("svid");
    let svid = NodeCert {
        chain: svid.chain_pem.concat(),
        key: key.serialize_pem(),
    };
    let e = c
        .stream(Some(&svid), Some(N1), "n1")
        .await
        .expect_err("workload certificate");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(
        e.message().contains("not a node of this mesh"),
        "{}",
        e.message()
    );
}

#[tokio::test]
async fn identity_config_stream_works_over_mtls_with_the_node_certificate() {
    // Tokens refused after the exchange: only the certificate opens the stream.
    let c = start(true).await;
    let (_, n1) = c.sign_node(Some(N1), "n1").await.expect("exchange");
    let first = c.stream(Some(&n1), None, "n1").await.expect("stream");
    assert!(first.sync);
    let keys: Vec<&str> = first.upserts.iter().map(|r| r.key.as_str()).collect();
    assert!(keys.contains(&"Workload/shop/web"), "{keys:?}");
    assert!(!keys.contains(&"Workload/shop/api"), "{keys:?}");
    assert!(keys.contains(&"TrustBundle/mesh"), "{keys:?}");
    c.sign(Some(&n1), None, "spiffe://cluster.local/ns/shop/sa/web")
        .await
        .expect("workload certificate over mTLS");
    // --require-node-certificates: the bootstrap token alone no longer opens the stream.
    let e = c
        .stream(None, Some(N1), "n1")
        .await
        .expect_err("token only");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(
        e.message().contains("--require-node-certificates"),
        "{}",
        e.message()
    );
    // A certificate from another CA fails the handshake.
    let other = Dir::new("weft-node-id-test");
    let foreign = Ca::load_or_generate(&other.0, DEFAULT_WORKLOAD_TTL).expect("ca");
    let (key, csr) = csr("spiffe://cluster.local/weft/node/n1");
    let forged = foreign
        .sign_node(
            &csr,
            "spiffe://cluster.local/weft/node/n1",
            Duration::from_secs(600),
        )
        .expect("forged");
    let forged = NodeCert {
        chain: forged.chain_pem.concat(),
        key: key.serialize_pem(),
    };
    let endpoint = Endpoint::from_shared(format!("https://{}", c.addr))
        .expect("url")
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&c.server_ca))
                .domain_name(weft_controller::tls::SERVER_NAME)
                .identity(Identity::from_pem(&forged.chain, &forged.key)),
        )
        .expect("tls");
    let refused = match endpoint.connect().await {
        Err(_) => true,
        Ok(ch) => {
            let (_, csr) = self::csr("spiffe://cluster.local/ns/shop/sa/web");
            CertificatesClient::new(ch)
                .sign(SignRequest {
                    identity: "spiffe://cluster.local/ns/shop/sa/web".into(),
                    csr_pem: csr,
                    ttl_seconds: 0,
                })
                .await
                .is_err()
        }
    };
    assert!(refused, "a certificate of another CA must not be accepted");
}

#[tokio::test]
async fn identity_token_use_after_the_exchange_still_works_by_default() {
    let c = start(false).await;
    c.sign_node(Some(N1), "n1").await.expect("exchange");
    let first = c.stream(None, Some(N1), "n1").await.expect("token stream");
    assert!(first.sync);
}

#[tokio::test]
async fn identity_no_node_certificates_without_node_authentication() {
    let c = start_with(Auth::Insecure, false).await;
    let e = c.sign_node(None, "n1").await.err().expect("insecure");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(
        e.message().contains("--insecure-no-auth"),
        "{}",
        e.message()
    );
    // The stream still works for development, with and without a client certificate.
    c.stream(None, None, "n1").await.expect("insecure stream");
}

#[tokio::test]
async fn identity_stream_lasts_no_longer_than_its_node_certificate() {
    let tokens =
        Tokens::from_nodes(HashMap::from([("n1".to_string(), N1.to_string())])).expect("tokens");
    let c = start_with_ttl(Auth::Tokens(tokens), false, Duration::from_secs(3)).await;
    let (_, n1) = c.sign_node(Some(N1), "n1").await.expect("exchange");
    let (end, after) = c.stream_until_closed(&n1, "n1").await;
    let e = end.expect_err("closed by the controller");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(e.message().contains("expired"), "{}", e.message());
    assert!(after <= Duration::from_secs(5), "{after:?}");
}
