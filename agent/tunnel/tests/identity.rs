//! Real TLS 1.3 handshakes (tokio-rustls over in-memory duplex pipes or loopback TCP) between
//! configurations built by `weft_tunnel::tls`, with certificates made here by rcgen.

use std::io;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, date_time_ymd,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use weft_tunnel::{
    Identity, TlsError, TrustBundle, VerifyError, certs_from_pem, client_config, identity_of,
    peer_identity, server_config,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type TestResult = Result<(), BoxError>;

const WEB: &str = "spiffe://cluster.local/ns/a/sa/web";
const API: &str = "spiffe://cluster.local/ns/b/sa/api";

/// A CA (root or intermediate) that signs leaves.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
    pem: String,
    /// What a leaf signed by this CA sends after itself: the intermediates, nearest first.
    chain_above: Vec<CertificateDer<'static>>,
}

impl Ca {
    fn root(cn: &str) -> Result<Self, BoxError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let params = ca_params(cn, BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert: cert.der().clone(),
            pem: cert.pem(),
            chain_above: Vec::new(),
        })
    }

    fn intermediate(&self, cn: &str) -> Result<Self, BoxError> {
        self.intermediate_with(cn, |_| {})
    }

    fn intermediate_with(
        &self,
        cn: &str,
        tweak: impl FnOnce(&mut CertificateParams),
    ) -> Result<Self, BoxError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = ca_params(cn, BasicConstraints::Constrained(0));
        tweak(&mut params);
        let cert = params.signed_by(&key, &self.issuer)?;
        let mut chain_above = vec![cert.der().clone()];
        chain_above.extend(self.chain_above.iter().cloned());
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert: cert.der().clone(),
            pem: cert.pem(),
            chain_above,
        })
    }

    fn bundle(&self) -> Result<TrustBundle, TlsError> {
        TrustBundle::from_der([self.cert.clone()])
    }

    /// A workload leaf with the given URI SANs (a SPIFFE workload certificate when one SPIFFE
    /// ID), adjusted by `tweak`.
    fn leaf_with(
        &self,
        sans: Vec<SanType>,
        tweak: impl FnOnce(&mut CertificateParams),
    ) -> Result<Leaf, BoxError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        tweak(&mut params);
        let cert = params.signed_by(&key, &self.issuer)?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.chain_above.iter().cloned());
        Ok(Leaf {
            chain,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        })
    }

    fn leaf(&self, spiffe_id: &str) -> Result<Leaf, BoxError> {
        self.leaf_with(vec![uri(spiffe_id)?], |_| {})
    }
}

fn ca_params(cn: &str, constraints: BasicConstraints) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Weft test");
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(constraints);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

fn uri(s: &str) -> Result<SanType, BoxError> {
    Ok(SanType::URI(s.try_into()?))
}

struct Leaf {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Leaf {
    fn server(&self, trust: &TrustBundle) -> Result<ServerConfig, TlsError> {
        server_config(self.chain.clone(), self.key.clone_key(), trust)
    }

    fn client(&self, trust: &TrustBundle, expected: &str) -> Result<ClientConfig, BoxError> {
        Ok(client_config(
            self.chain.clone(),
            self.key.clone_key(),
            trust,
            expected.parse()?,
        )?)
    }
}

fn id(s: &str) -> Result<Identity, BoxError> {
    Ok(s.parse()?)
}

/// Any name: it is neither sent nor verified.
fn server_name() -> ServerName<'static> {
    ServerName::try_from("weft.invalid")
        .unwrap_or(ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()))
}

/// What each side saw of one handshake (plus one request/response exchange if it succeeded).
struct Outcome {
    /// The client's view: the server identity it verified, or its error.
    client: Result<Identity, io::Error>,
    /// The server's view: the client identity it verified, or its error.
    server: Result<Identity, io::Error>,
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    config: ServerConfig,
    stream: S,
) -> Result<Identity, io::Error> {
    let mut tls = TlsAcceptor::from(Arc::new(config)).accept(stream).await?;
    let (_, conn) = tls.get_ref();
    assert_eq!(
        conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let peer = peer_identity(conn).map_err(io::Error::other)?;
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await?;
    assert_eq!(&buf, b"ping");
    tls.write_all(b"pong").await?;
    tls.shutdown().await?;
    Ok(peer)
}

async fn call<S: AsyncRead + AsyncWrite + Unpin>(
    config: ClientConfig,
    stream: S,
) -> Result<Identity, io::Error> {
    let mut tls = TlsConnector::from(Arc::new(config))
        .connect(server_name(), stream)
        .await?;
    let (_, conn) = tls.get_ref();
    assert_eq!(
        conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let peer = peer_identity(conn).map_err(io::Error::other)?;
    tls.write_all(b"ping").await?;
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await?;
    assert_eq!(&buf, b"pong");
    Ok(peer)
}

/// A handshake over an in-memory pipe.
async fn duplex(server: ServerConfig, client: ClientConfig) -> Outcome {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let (server, client) = tokio::join!(serve(server, a), call(client, b));
    Outcome { client, server }
}

/// A handshake over loopback TCP.
async fn tcp(server: ServerConfig, client: ClientConfig) -> Result<Outcome, BoxError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server_side = async {
        let (stream, _) = listener.accept().await?;
        serve(server, stream).await
    };
    let client_side = async {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        call(client, stream).await
    };
    let (server, client) = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        tokio::join!(server_side, client_side)
    })
    .await?;
    Ok(Outcome { client, server })
}

/// The `VerifyError` a side failed with; panics with the error's text if it is not one.
fn verify_error(side: &str, res: &Result<Identity, io::Error>) -> VerifyError {
    match res {
        Ok(peer) => panic!("the {side} accepted the handshake (peer {peer})"),
        Err(e) => match VerifyError::from_io(e) {
            Some(v) => {
                // The handshake error's own text carries the VerifyError's message.
                let text = e.to_string();
                assert!(text.contains(&v.to_string()), "{text:?}");
                v.clone()
            }
            None => panic!("the {side} failed without a VerifyError: {e}"),
        },
    }
}

fn err_text(res: &Result<Identity, io::Error>) -> String {
    match res {
        Ok(peer) => format!("accepted {peer}"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn identity_mutual_handshake_sees_both_identities() -> TestResult {
    let root = Ca::root("Weft Root CA")?;
    let trust = root.bundle()?;
    let web = root.leaf(WEB)?;
    let api = root.leaf(API)?;

    let out = duplex(web.server(&trust)?, api.client(&trust, WEB)?).await;
    assert_eq!(out.client?, id(WEB)?, "client sees the server's identity");
    assert_eq!(out.server?, id(API)?, "server sees the client's identity");
    Ok(())
}

#[tokio::test]
async fn identity_mutual_handshake_over_tcp_through_an_intermediate() -> TestResult {
    let root = Ca::root("Weft Root CA")?;
    let inter = root.intermediate("Weft Intermediate CA")?;
    let trust = TrustBundle::from_pem(root.pem.clone().as_bytes())?;
    let web = inter.leaf(WEB)?;
    let api = inter.leaf(API)?;
    assert_eq!(web.chain.len(), 2);

    let out = tcp(web.server(&trust)?, api.client(&trust, WEB)?).await?;
    assert_eq!(out.client?, id(WEB)?);
    assert_eq!(out.server?, id(API)?);

    // Without the intermediate in the chain, the leaf does not reach the root.
    let bare = Leaf {
        chain: vec![web.chain[0].clone()],
        key: web.key.clone_key(),
    };
    let out = duplex(bare.server(&trust)?, api.client(&trust, WEB)?).await;
    assert!(matches!(
        verify_error("client", &out.client),
        VerifyError::Untrusted { .. }
    ));
    Ok(())
}

#[tokio::test]
async fn identity_expired_certificates_are_rejected_with_their_expiry() -> TestResult {
    let root = Ca::root("Weft Root CA")?;
    let trust = root.bundle()?;
    let expired = |ca: &Ca, spiffe_id: &str| {
        ca.leaf_with(vec![uri(spiffe_id)?], |p| {
            p.not_before = date_time_ymd(2019, 1, 1);
            p.not_after = date_time_ymd(2020, 1, 1);
        })
    };

    // The client rejects an expired server certificate.
    let out = duplex(
        expired(&root, WEB)?.server(&trust)?,
        root.leaf(API)?.client(&trust, WEB)?,
    )
    .await;
    let err = verify_error("client", &out.client);
    match &err {
        VerifyError::Expired {
            not_after,
            certificate,
            ..
        } => {
            assert_eq!(not_after.to_string(), "2020-01-01T00:00:00Z");
            assert!(certificate.contains(WEB), "{certificate}");
        }
        other => panic!("expected Expired, got {other:?}"),
    }
    let text = err_text(&out.client);
    assert!(
        text.contains("certificate expired at 2020-01-01T00:00:00Z"),
        "{text}"
    );
    assert!(text.contains("renew"), "{text}");
    assert!(out.server.is_err(), "the server saw the client's alert");

    // The server rejects an expired client certificate.
    let out = duplex(
        root.leaf(WEB)?.server(&trust)?,
        expired(&root, API)?.client(&trust, WEB)?,
    )
    .await;
    assert!(matches!(
        verify_error("server", &out.server),
        VerifyError::Expired { .. }
    ));
    assert!(err_text(&out.server).contains("certificate expired at 2020-01-01T00:00:00Z"));

    // An expired intermediate is named as such.
    let stale = root.intermediate_with("Stale Intermediate", |p| {
        p.not_before = date_time_ymd(2019, 1, 1);
        p.not_after = date_time_ymd(2020, 6, 1);
    })?;
    let out = duplex(
        stale.leaf(WEB)?.server(&trust)?,
        root.leaf(API)?.client(&trust, WEB)?,
    )
    .await;
    match verify_error("client", &out.client) {
        VerifyError::Expired {
            not_after,
            certificate,
            ..
        } => {
            assert_eq!(not_after.to_string(), "2020-06-01T00:00:00Z");
            assert!(certificate.contains("Stale Intermediate"), "{certificate}");
        }
        other => panic!("expected Expired, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn identity_not_yet_valid_certificate_is_rejected() -> TestResult {
    let root = Ca::root("Weft Root CA")?;
    let trust = root.bundle()?;
    let future = root.leaf_with(vec![uri(WEB)?], |p| {
        p.not_before = date_time_ymd(2099, 1, 1);
        p.not_after = date_time_ymd(2100, 1, 1);
    })?;
    let out = duplex(future.server(&trust)?, root.leaf(API)?.client(&trust, WEB)?).await;
    match verify_error("client", &out.client) {
        VerifyError::NotYetValid { not_before, .. } => {
            assert_eq!(not_before.to_string(), "2099-01-01T00:00:00Z");
        }
        other => panic!("expected NotYetValid, got {other:?}"),
    }
    assert!(err_text(&out.client).contains("clock skew"));
    Ok(())
}

#[tokio::test]
async fn identity_certificate_from_another_ca_is_untrusted() -> TestResult {
    let root = Ca::root("Weft Root CA")?;
    let trust = root.bundle()?;
    let other = Ca::root("Some Other CA")?;
    // A CA with the same name as ours but another key (a regenerated root, say).
    let impostor = Ca::root("Weft Root CA")?;

    for (rogue, same_name) in [(&other, false), (&impostor, true)] {
        // The client rejects a server certificate from the other CA.
        let out = duplex(
            rogue.leaf(WEB)?.server(&trust)?,
            root.leaf(API)?.client(&trust, WEB)?,
        )
        .await;
        let err = verify_error("client", &out.client);
        assert!(
            matches!(err, VerifyError::Untrusted { issuer_name_trusted, .. } if issuer_name_trusted == same_name),
            "{err:?}"
        );
        let text = err_text(&out.client);
        assert!(
            text.contains("not signed by any root in the trust bundle"),
            "{text}"
        );
        assert_eq!(
            text.contains("re-created under the same name"),
            same_name,
            "{text}"
        );

        // The server rejects a client certificate from the other CA.
        let out = duplex(
            root.leaf(WEB)?.server(&trust)?,
            rogue.leaf(API)?.client(&trust, WEB)?,
        )
        .await;
        let err = verify_error("server", &out.server);
        assert!(matches!(err, VerifyError::Untrusted { .. }), "{err:?}");
    }

    // The issuer named in the error is the other CA.
    let out = duplex(
        other.leaf(WEB)?.server(&trust)?,
        root.leaf(API)?.client(&trust, WEB)?,
    )
    .await;
    assert!(err_text(&out.client).contains("Some Other CA"));
    Ok(())
}

#[tokio::test]
async fn identity_wrong_spiffe_id_names_both_identities() -> TestResult {
    let root = Ca::root("Weft Root CA")?;
    let trust = root.bundle()?;
    let intruder = "spiffe://cluster.local/ns/a/sa/intruder";

    let out = duplex(
        root.leaf(intruder)?.server(&trust)?,
        root.leaf(API)?.client(&trust, WEB)?,
    )
    .await;
    match verify_error("client", &out.client) {
        VerifyError::WrongIdentity { expected, got } => {
            assert_eq!(expected, id(WEB)?);
            assert_eq!(got, id(intruder)?);
        }
        other => panic!("expected WrongIdentity, got {other:?}"),
    }
    let text = err_text(&out.client);
    assert!(text.contains(WEB) && text.contains(intruder), "{text}");
    assert!(text.contains("identity mismatch"), "{text}");

    // Another trust domain is another identity too.
    let foreign = "spiffe://other.domain/ns/a/sa/web";
    let out = duplex(
        root.leaf(foreign)?.server(&trust)?,
        root.leaf(API)?.client(&trust, WEB)?,
    )
    .await;
    assert!(matches!(
        verify_error("client", &out.client),
        VerifyError::WrongIdentity { .. }
    ));
    Ok(())
}

#[tokio::test]
async fn identity_certificate_without_spiffe_id_is_rejected() -> TestResult {
    let root = Ca::root("Weft Root CA")?;
    let trust = root.bundle()?;
    let dns_only = root.leaf_with(vec![SanType::DnsName("web.a.svc".try_into()?)], |_| {})?;
    let https_uri = root.leaf_with(vec![uri("https://web.a.svc/")?], |_| {})?;

    for leaf in [&dns_only, &https_uri] {
        // Our own configuration refuses it up front.
        let err = leaf.server(&trust).err();
        assert!(
            matches!(err, Some(TlsError::Certificate(VerifyError::NoSpiffeId))),
            "{err:?}"
        );
        assert_eq!(identity_of(&leaf.chain[0]), Err(VerifyError::NoSpiffeId));

        // A peer presenting it is refused by the server...
        let mut client = root.leaf(API)?.client(&trust, WEB)?;
        client.client_auth_cert_resolver = Arc::new(FixedClientCert(certified(leaf)?));
        let out = duplex(root.leaf(WEB)?.server(&trust)?, client).await;
        assert_eq!(verify_error("server", &out.server), VerifyError::NoSpiffeId);
        assert!(err_text(&out.server).contains("no SPIFFE ID"));

        // ...and by the client.
        let mut server = root.leaf(WEB)?.server(&trust)?;
        server.cert_resolver = Arc::new(FixedServerCert(certified(leaf)?));
        let out = duplex(server, root.leaf(API)?.client(&trust, WEB)?).await;
        assert_eq!(verify_error("client", &out.client), VerifyError::NoSpiffeId);
    }
    Ok(())
}

#[tokio::test]
async fn identity_certificate_with_two_spiffe_ids_is_rejected() -> TestResult {
    let root = Ca::root("Weft Root CA")?;
    let trust = root.bundle()?;
    let two = root.leaf_with(vec![uri(WEB)?, uri(API)?], |_| {})?;
    let err = identity_of(&two.chain[0]);
    assert!(
        matches!(&err, Err(VerifyError::MultipleSpiffeIds { ids }) if ids.len() == 2),
        "{err:?}"
    );

    let mut client = root.leaf(API)?.client(&trust, WEB)?;
    client.client_auth_cert_resolver = Arc::new(FixedClientCert(certified(&two)?));
    let out = duplex(root.leaf(WEB)?.server(&trust)?, client).await;
    assert!(matches!(
        verify_error("server", &out.server),
        VerifyError::MultipleSpiffeIds { .. }
    ));
    let text = err_text(&out.server);
    assert!(text.contains(WEB) && text.contains(API), "{text}");

    // A SPIFFE ID next to another URI SAN is no X.509-SVID either.
    let extra = root.leaf_with(vec![uri(WEB)?, uri("https://web.a.svc/")?], |_| {})?;
    assert!(matches!(
        identity_of(&extra.chain[0]),
        Err(VerifyError::Malformed(_))
    ));
    // Nor is a SPIFFE ID that is not a workload identity.
    let odd = root.leaf_with(vec![uri("spiffe://cluster.local/web")?], |_| {})?;
    assert!(matches!(
        identity_of(&odd.chain[0]),
        Err(VerifyError::Malformed(_))
    ));
    Ok(())
}

#[tokio::test]
async fn identity_garbage_certificate_is_malformed() -> TestResult {
    let root = Ca::root("Weft Root CA")?;
    let trust = root.bundle()?;
    let garbage = CertificateDer::from(b"definitely not a certificate".to_vec());
    let real = root.leaf(API)?;
    let bogus = Leaf {
        chain: vec![garbage.clone()],
        key: real.key.clone_key(),
    };

    // A client presenting garbage as its certificate.
    let mut client = real.client(&trust, WEB)?;
    client.client_auth_cert_resolver = Arc::new(FixedClientCert(certified(&bogus)?));
    let out = duplex(root.leaf(WEB)?.server(&trust)?, client).await;
    assert!(matches!(
        verify_error("server", &out.server),
        VerifyError::Malformed(_)
    ));
    assert!(err_text(&out.server).contains("malformed certificate"));

    // A server presenting garbage.
    let mut server = root.leaf(WEB)?.server(&trust)?;
    server.cert_resolver = Arc::new(FixedServerCert(certified(&bogus)?));
    let out = duplex(server, real.client(&trust, WEB)?).await;
    assert!(matches!(
        verify_error("client", &out.client),
        VerifyError::Malformed(_)
    ));

    // Our own configuration and the trust bundle refuse it up front.
    let err = bogus.server(&trust).err();
    assert!(
        matches!(err, Some(TlsError::Certificate(VerifyError::Malformed(_)))),
        "{err:?}"
    );
    let err = TrustBundle::from_der([garbage]).err();
    assert!(
        matches!(err, Some(TlsError::TrustBundle(VerifyError::Malformed(_)))),
        "{err:?}"
    );
    Ok(())
}

#[test]
fn identity_malformed_pem_is_malformed() -> TestResult {
    let root = Ca::root("Weft Root CA")?;
    let good = root.pem.clone();
    let b64_start = good.find('\n').map_or(0, |i| i + 1);
    let cases: Vec<(String, &str)> = vec![
        (String::new(), "no PEM CERTIFICATE block"),
        ("hello world\n".into(), "no PEM CERTIFICATE block"),
        (
            "-----BEGIN CERTIFICATE-----\n!!!! not base64 !!!!\n-----END CERTIFICATE-----\n".into(),
            "cannot be decoded",
        ),
        (
            good.replace("-----END CERTIFICATE-----", ""),
            "cannot be decoded",
        ),
        (
            // Valid base64, but not DER.
            "-----BEGIN CERTIFICATE-----\nZ2FyYmFnZSBieXRlcw==\n-----END CERTIFICATE-----\n".into(),
            "not a DER X.509 certificate",
        ),
        (
            // A truncated certificate.
            format!(
                "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
                &good[b64_start..b64_start + 64]
            ),
            "not a DER X.509 certificate",
        ),
        (
            // The second of two blocks is broken.
            format!(
                "{good}-----BEGIN CERTIFICATE-----\nZ2FyYmFnZSBieXRlcw==\n-----END CERTIFICATE-----\n"
            ),
            "#2",
        ),
    ];
    for (input, want) in &cases {
        match certs_from_pem(input.as_bytes()) {
            Err(VerifyError::Malformed(detail)) => {
                assert!(
                    detail.contains(want),
                    "{input:?}: {detail:?} lacks {want:?}"
                )
            }
            other => panic!("{input:?}: expected Malformed, got {other:?}"),
        }
        match TrustBundle::from_pem(input.as_bytes()) {
            Err(TlsError::TrustBundle(VerifyError::Malformed(_))) => {}
            other => panic!("{input:?}: expected a malformed trust bundle, got {other:?}"),
        }
    }
    Ok(())
}

#[tokio::test]
async fn identity_root_rotation_overlap_trusts_both_roots() -> TestResult {
    let old = Ca::root("Weft Root CA 2024")?;
    let new = Ca::root("Weft Root CA 2025")?;
    let both = TrustBundle::from_pems([old.pem.clone(), new.pem.clone()])?;
    assert_eq!(both.len(), 2);
    let also_both =
        TrustBundle::from_pem(format!("{}{}", old.pem.clone(), new.pem.clone()).as_bytes())?;
    assert_eq!(also_both.len(), 2);
    let new_only = new.bundle()?;

    // During the overlap, every mix of old and new leaves works in both directions.
    for server_ca in [&old, &new] {
        for client_ca in [&old, &new] {
            let out = duplex(
                server_ca.leaf(WEB)?.server(&both)?,
                client_ca.leaf(API)?.client(&both, WEB)?,
            )
            .await;
            assert_eq!(out.client?, id(WEB)?);
            assert_eq!(out.server?, id(API)?);
        }
    }

    // Once the old root is removed, its leaves are refused on either side...
    let out = duplex(
        old.leaf(WEB)?.server(&new_only)?,
        new.leaf(API)?.client(&new_only, WEB)?,
    )
    .await;
    assert!(matches!(
        verify_error("client", &out.client),
        VerifyError::Untrusted { .. }
    ));
    let out = duplex(
        new.leaf(WEB)?.server(&new_only)?,
        old.leaf(API)?.client(&new_only, WEB)?,
    )
    .await;
    assert!(matches!(
        verify_error("server", &out.server),
        VerifyError::Untrusted { .. }
    ));
    assert!(err_text(&out.server).contains("Weft Root CA 2024"));

    // ...while new leaves still work.
    let out = duplex(
        new.leaf(WEB)?.server(&new_only)?,
        new.leaf(API)?.client(&new_only, WEB)?,
    )
    .await;
    assert_eq!(out.client?, id(WEB)?);
    assert_eq!(out.server?, id(API)?);
    Ok(())
}

#[tokio::test]
async fn identity_tls12_only_peer_is_refused() -> TestResult {
    let root = Ca::root("Weft Root CA")?;
    let trust = root.bundle()?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.cert.clone())?;
    let api = root.leaf(API)?;
    let tls12 =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS12])?
            .with_root_certificates(roots)
            .with_client_auth_cert(api.chain.clone(), api.key.clone_key())?;
    let out = duplex(root.leaf(WEB)?.server(&trust)?, tls12).await;
    assert!(out.server.is_err(), "the server accepted TLS 1.2");
    assert!(out.client.is_err());
    Ok(())
}

#[tokio::test]
async fn identity_client_without_certificate_is_refused() -> TestResult {
    let root = Ca::root("Weft Root CA")?;
    let trust = root.bundle()?;
    let mut client = root.leaf(API)?.client(&trust, WEB)?;
    client.client_auth_cert_resolver = Arc::new(NoClientCert);
    let out = duplex(root.leaf(WEB)?.server(&trust)?, client).await;
    let text = err_text(&out.server);
    assert!(text.contains("no certificates"), "{text}");
    Ok(())
}

#[tokio::test]
async fn identity_wrong_key_usage_and_ca_leaves_are_refused() -> TestResult {
    let root = Ca::root("Weft Root CA")?;
    let trust = root.bundle()?;

    // A server-only certificate presented by a client.
    let server_only = root.leaf_with(vec![uri(API)?], |p| {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    })?;
    let out = duplex(
        root.leaf(WEB)?.server(&trust)?,
        server_only.client(&trust, WEB)?,
    )
    .await;
    assert!(matches!(
        verify_error("server", &out.server),
        VerifyError::InvalidUsage(_)
    ));
    assert!(err_text(&out.server).contains("serverAuth and clientAuth"));

    // A CA certificate (with a SPIFFE ID) used as a workload certificate.
    let ca_leaf = root.leaf_with(vec![uri(WEB)?], |p| {
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    })?;
    let out = duplex(
        ca_leaf.server(&trust)?,
        root.leaf(API)?.client(&trust, WEB)?,
    )
    .await;
    match verify_error("client", &out.client) {
        VerifyError::Rejected(detail) => {
            assert!(detail.contains("is a CA certificate"), "{detail}")
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    Ok(())
}

#[test]
fn identity_configuration_errors_are_specific() -> TestResult {
    let root = Ca::root("Weft Root CA")?;
    let trust = root.bundle()?;
    let web = root.leaf(WEB)?;

    assert!(matches!(
        TrustBundle::from_der(Vec::new()),
        Err(TlsError::EmptyTrustBundle)
    ));
    // A workload certificate is not a root.
    let err = TrustBundle::from_der([web.chain[0].clone()]).err();
    assert!(
        matches!(&err, Some(TlsError::TrustBundle(VerifyError::Malformed(d))) if d.contains("not a CA")),
        "{err:?}"
    );
    assert!(matches!(
        server_config(Vec::new(), web.key.clone_key(), &trust),
        Err(TlsError::EmptyCertChain)
    ));
    // Someone else's key.
    let other = root.leaf(API)?;
    let err = server_config(web.chain.clone(), other.key.clone_key(), &trust).err();
    assert!(matches!(err, Some(TlsError::Config(_))), "{err:?}");
    let err = client_config(web.chain.clone(), other.key.clone_key(), &trust, id(WEB)?).err();
    assert!(matches!(err, Some(TlsError::Config(_))), "{err:?}");
    Ok(())
}

/// The leaf's chain and key as rustls signs with them, without any consistency check (to
/// present certificates our own builders refuse).
fn certified(leaf: &Leaf) -> Result<Arc<CertifiedKey>, BoxError> {
    let provider = rustls::crypto::ring::default_provider();
    let key = provider
        .key_provider
        .load_private_key(leaf.key.clone_key())?;
    Ok(Arc::new(CertifiedKey::new(leaf.chain.clone(), key)))
}

#[derive(Debug)]
struct FixedClientCert(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for FixedClientCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[derive(Debug)]
struct NoClientCert;

impl rustls::client::ResolvesClientCert for NoClientCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        None
    }

    fn has_certs(&self) -> bool {
        false
    }
}

#[derive(Debug)]
struct FixedServerCert(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for FixedServerCert {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}
