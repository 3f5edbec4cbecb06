//! HBONE over real mutual TLS 1.3 (tokio-rustls on an in-memory pipe), with certificates made
//! by an rcgen CA: the composition the agents use between nodes.

use std::net::SocketAddr;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use weft_tunnel::hbone::{Client, ConnectRequest, Tunnel, serve};
use weft_tunnel::{
    TrustBundle, certs_from_pem, client_config, peer_identity, private_key_from_pem, server_config,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

struct Pki {
    root_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Result<Self, BoxError> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = p.self_signed(&key)?;
        Ok(Self {
            root_pem: cert.pem(),
            issuer: Issuer::new(p, key),
        })
    }

    /// (chain PEM, key PEM) for a SPIFFE ID.
    fn leaf(&self, id: &str) -> Result<(String, String), BoxError> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.subject_alt_names = vec![SanType::URI(id.try_into()?)];
        let cert = p.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

async fn echo(c: ConnectRequest, mut t: Tunnel) {
    let _ = t.write_all(format!("to {}\n", c.dst).as_bytes()).await;
    let mut buf = vec![0u8; 4096];
    while let Ok(n) = t.read(&mut buf).await {
        if n == 0 || t.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = t.shutdown().await;
}

async fn run(expected_server: &str) -> Result<String, BoxError> {
    let pki = Pki::new()?;
    let trust = TrustBundle::from_pem(pki.root_pem.as_bytes())?;
    let (scert, skey) = pki.leaf("spiffe://cluster.local/ns/shop/sa/api")?;
    let (ccert, ckey) = pki.leaf("spiffe://cluster.local/ns/shop/sa/web")?;
    let server = server_config(
        certs_from_pem(scert.as_bytes())?,
        private_key_from_pem(skey.as_bytes())?,
        &trust,
    )?;
    let client = client_config(
        certs_from_pem(ccert.as_bytes())?,
        private_key_from_pem(ckey.as_bytes())?,
        &trust,
        expected_server.parse()?,
    )?;
    let (c, s) = tokio::io::duplex(256 * 1024);
    let acceptor = TlsAcceptor::from(Arc::new(server));
    tokio::spawn(async move {
        if let Ok(tls) = acceptor.accept(s).await {
            let peer = peer_identity(tls.get_ref().1)
                .map(|i| i.to_string())
                .unwrap_or_default();
            assert_eq!(peer, "spiffe://cluster.local/ns/shop/sa/web");
            let _ = serve(tls, echo).await;
        }
    });
    let tls = TlsConnector::from(Arc::new(client))
        .connect(rustls::pki_types::ServerName::try_from("weft.invalid")?, c)
        .await?;
    let mut hbone = Client::handshake(tls).await?;
    let dst: SocketAddr = "198.18.2.11:8080".parse()?;
    let mut t = hbone.connect(dst, None, None).await?;
    t.write_all(b"secret payload").await?;
    t.shutdown().await?;
    let mut got = String::new();
    t.read_to_string(&mut got).await?;
    Ok(got)
}

#[tokio::test]
async fn hbone_over_mutual_tls_carries_a_connection() -> Result<(), BoxError> {
    let got = run("spiffe://cluster.local/ns/shop/sa/api").await?;
    assert_eq!(got, "to 198.18.2.11:8080\nsecret payload");
    Ok(())
}

#[tokio::test]
async fn hbone_to_the_wrong_identity_never_opens() {
    let e = run("spiffe://cluster.local/ns/shop/sa/db")
        .await
        .expect_err("server is api, client expects db");
    assert!(
        e.to_string()
            .contains("spiffe://cluster.local/ns/shop/sa/db"),
        "{e}"
    );
}
