//! The mutual TLS layer of the data path: TLS 1.3 only, ring as the crypto provider (installed
//! per configuration, no process-wide default needed), peers authenticated by X.509-SVIDs that
//! chain to a [`TrustBundle`].
//!
//! - [`server_config`] requires a client certificate, verifies its chain with rustls'
//!   `WebPkiClientVerifier`, then checks it carries exactly one SPIFFE ID; read the verified
//!   identity with [`peer_identity`] once the handshake is done.
//! - [`client_config`] verifies the server's chain with webpki (no host name: SVIDs carry only a
//!   URI SAN) and checks that its SPIFFE ID is the expected one.
//!
//! Failures are [`VerifyError`]s. During a handshake they reach rustls as `Error::Other`, so the
//! handshake error's text is the `VerifyError`'s; [`VerifyError::from_rustls`] and
//! [`VerifyError::from_io`] get the value back.

use std::fmt;
use std::io;
use std::sync::Arc;

use rustls::client::Resumption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName,
    OtherError, RootCertStore, ServerConfig, SignatureScheme,
};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::identity::Identity;

/// A point in time, in seconds since the Unix epoch; `Display` is RFC 3339 UTC
/// (`2024-05-01T12:00:00Z`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    pub fn from_unix(secs: i64) -> Self {
        Self(secs)
    }

    pub fn unix(self) -> i64 {
        self.0
    }

    fn from_unix_time(t: UnixTime) -> Self {
        Self(i64::try_from(t.as_secs()).unwrap_or(i64::MAX))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Days to civil date (H. Hinnant's algorithm), proleptic Gregorian calendar.
        let days = self.0.div_euclid(86_400);
        let secs = self.0.rem_euclid(86_400);
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
            secs / 3600,
            secs % 3600 / 60,
            secs % 60
        )
    }
}

/// Why a peer's (or our own) certificate was rejected. Each message says what to check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    #[error(
        "certificate expired at {not_after} ({certificate}; this node's clock reads {now}): it was \
         not renewed in time; check that the peer's agent can reach the mesh CA and renews its \
         certificates (or, for an intermediate, the mesh CA's own), and that the nodes' clocks are \
         synchronised"
    )]
    Expired {
        not_after: Timestamp,
        now: Timestamp,
        /// Which certificate of the chain: the leaf (with its SPIFFE ID) or an intermediate.
        certificate: String,
    },
    #[error(
        "certificate is not valid before {not_before} ({certificate}; this node's clock reads \
         {now}): check for clock skew between this node, the peer's node and the mesh CA"
    )]
    NotYetValid {
        not_before: Timestamp,
        now: Timestamp,
        certificate: String,
    },
    #[error(
        "certificate chain is not signed by any root in the trust bundle (issuer {issuer:?}{}): \
         check that the peer's certificate comes from the mesh CA and that this node's trust \
         bundle holds that CA's root; during a root rotation both the old and the new root must \
         be in the bundle",
        if *issuer_name_trusted {
            "; a root of that name is in the bundle, but its key did not sign this chain: was the \
             CA re-created under the same name?"
        } else {
            ""
        }
    )]
    Untrusted {
        /// The issuer named by the top of the presented chain.
        issuer: String,
        /// Whether a root of the bundle has that name (so the key, not the name, differs).
        issuer_name_trusted: bool,
    },
    #[error(
        "peer identity mismatch: expected {expected}, but the peer's certificate is for {got}: the \
         connection reached a workload running under another identity (service account, \
         namespace or trust domain); check the endpoint data this node routes by and the \
         destination's service account"
    )]
    WrongIdentity { expected: Identity, got: Identity },
    #[error(
        "certificate carries no SPIFFE ID (no spiffe:// URI SAN), so it is not a mesh workload \
         certificate: check that the peer uses a certificate issued by the mesh CA"
    )]
    NoSpiffeId,
    #[error(
        "certificate carries {} SPIFFE IDs ({}) where an X.509-SVID carries exactly one: check how \
         the issuing CA fills in subjectAltName",
        ids.len(),
        ids.join(", ")
    )]
    MultipleSpiffeIds { ids: Vec<String> },
    #[error(
        "certificate is not valid for this use ({0}): mesh workload certificates must allow both \
         TLS server and client authentication (extended key usage serverAuth and clientAuth); \
         check how the issuing CA fills in extendedKeyUsage"
    )]
    InvalidUsage(String),
    #[error(
        "the peer presented no certificate: mutual TLS is required; check that the peer is a mesh \
         workload with a certificate"
    )]
    NoCertificate,
    #[error("malformed certificate: {0}")]
    Malformed(String),
    #[error("certificate rejected: {0}")]
    Rejected(String),
}

impl VerifyError {
    /// The `VerifyError` a handshake failed with, if it was one of ours.
    pub fn from_rustls(err: &rustls::Error) -> Option<&VerifyError> {
        match err {
            rustls::Error::Other(OtherError(inner))
            | rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
                inner.downcast_ref::<VerifyError>()
            }
            _ => None,
        }
    }

    /// The `VerifyError` inside an I/O error from a TLS stream (tokio-rustls reports handshake
    /// failures as `io::Error`s wrapping the `rustls::Error`).
    pub fn from_io(err: &io::Error) -> Option<&VerifyError> {
        let inner = err.get_ref()?;
        if let Some(e) = inner.downcast_ref::<rustls::Error>() {
            return Self::from_rustls(e);
        }
        inner.downcast_ref::<VerifyError>()
    }

    fn into_rustls(self) -> rustls::Error {
        rustls::Error::Other(OtherError(Arc::new(self)))
    }
}

/// Why a TLS configuration or trust bundle could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("the trust bundle is empty: at least one root certificate is required")]
    EmptyTrustBundle,
    #[error("trust bundle: {0}")]
    TrustBundle(VerifyError),
    #[error("this workload's certificate chain is empty")]
    EmptyCertChain,
    #[error("this workload's certificate: {0}")]
    Certificate(VerifyError),
    #[error("this workload's private key: {0}")]
    PrivateKey(String),
    #[error(
        "cannot use this workload's certificate and key: {0}; check that the key belongs to the \
         certificate"
    )]
    Config(rustls::Error),
    #[error("cannot build the certificate verifier: {0}")]
    Verifier(String),
}

impl TlsError {
    /// The certificate problem behind this error, if there is one.
    pub fn verify_error(&self) -> Option<&VerifyError> {
        match self {
            Self::TrustBundle(e) | Self::Certificate(e) => Some(e),
            _ => None,
        }
    }
}

/// The root certificates peers' chains must end at. Several roots may be trusted at once (for a
/// root rotation, both the old and the new root during the overlap).
#[derive(Clone)]
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
    subjects: Vec<String>,
    store: Arc<RootCertStore>,
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustBundle")
            .field("roots", &self.subjects)
            .finish()
    }
}

impl TrustBundle {
    /// A bundle of DER root certificates. Each must be a CA certificate.
    pub fn from_der(
        roots: impl IntoIterator<Item = CertificateDer<'static>>,
    ) -> Result<Self, TlsError> {
        let mut store = RootCertStore::empty();
        let mut kept = Vec::new();
        let mut subjects = Vec::new();
        for (i, der) in roots.into_iter().enumerate() {
            let n = i + 1;
            let cert = parse_x509(&der).map_err(|e| {
                TlsError::TrustBundle(VerifyError::Malformed(format!("root #{n}: {e}")))
            })?;
            let subject = cert.subject().to_string();
            if !cert.is_ca() {
                return Err(TlsError::TrustBundle(VerifyError::Malformed(format!(
                    "root #{n} ({subject:?}) is not a CA certificate (no basicConstraints cA=TRUE); \
                     the bundle must hold the mesh CA's root certificates, not workload certificates"
                ))));
            }
            store.add(der.clone()).map_err(|e| {
                TlsError::TrustBundle(VerifyError::Malformed(format!(
                    "root #{n} ({subject:?}) cannot be used as a trust anchor: {e}"
                )))
            })?;
            kept.push(der);
            subjects.push(subject);
        }
        if kept.is_empty() {
            return Err(TlsError::EmptyTrustBundle);
        }
        Ok(Self {
            roots: kept,
            subjects,
            store: Arc::new(store),
        })
    }

    /// A bundle of PEM root certificates: one text with one or more `CERTIFICATE` blocks.
    pub fn from_pem(pem: &[u8]) -> Result<Self, TlsError> {
        Self::from_der(certs_from_pem(pem).map_err(TlsError::TrustBundle)?)
    }

    /// A bundle from several PEM texts (each with one or more `CERTIFICATE` blocks), such as
    /// one text per root.
    pub fn from_pems<I, P>(pems: I) -> Result<Self, TlsError>
    where
        I: IntoIterator<Item = P>,
        P: AsRef<[u8]>,
    {
        let mut all = Vec::new();
        for pem in pems {
            all.extend(certs_from_pem(pem.as_ref()).map_err(TlsError::TrustBundle)?);
        }
        Self::from_der(all)
    }

    /// The root certificates, in the order given.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The roots' subject names, in the order given.
    pub fn subjects(&self) -> &[String] {
        &self.subjects
    }

    pub fn len(&self) -> usize {
        self.roots.len()
    }

    /// Always false: a bundle holds at least one root.
    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }
}

/// All `CERTIFICATE` blocks of a PEM text, in order. Blocks of other types are skipped; a text
/// with no certificate, a broken block or a block that is not an X.509 certificate is
/// [`VerifyError::Malformed`].
pub fn certs_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, VerifyError> {
    let mut certs = Vec::new();
    for (i, item) in CertificateDer::pem_slice_iter(pem).enumerate() {
        let n = i + 1;
        let der = item.map_err(|e| {
            VerifyError::Malformed(format!("PEM certificate #{n} cannot be decoded: {e}"))
        })?;
        parse_x509(&der)
            .map_err(|e| VerifyError::Malformed(format!("PEM certificate #{n}: {e}")))?;
        certs.push(der);
    }
    if certs.is_empty() {
        return Err(VerifyError::Malformed(
            "no PEM CERTIFICATE block found (expected \"-----BEGIN CERTIFICATE-----\")".into(),
        ));
    }
    Ok(certs)
}

/// The first private key (PKCS#8, SEC1 or PKCS#1) of a PEM text.
pub fn private_key_from_pem(pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| TlsError::PrivateKey(format!("cannot read a PEM private key: {e}")))
}

/// The SPIFFE ID of an X.509-SVID: its one URI SAN, which must be a workload identity
/// (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`). This reads the certificate only; it does not
/// verify it.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<Identity, VerifyError> {
    let x509 = parse_x509(cert).map_err(VerifyError::Malformed)?;
    let uris = uri_sans(&x509)?;
    let spiffe: Vec<&str> = uris
        .iter()
        .copied()
        .filter(|u| {
            u.get(..9)
                .is_some_and(|scheme| scheme.eq_ignore_ascii_case("spiffe://"))
        })
        .collect();
    let id = match spiffe.as_slice() {
        [] => return Err(VerifyError::NoSpiffeId),
        [one] => *one,
        many => {
            return Err(VerifyError::MultipleSpiffeIds {
                ids: many.iter().map(|s| (*s).to_owned()).collect(),
            });
        }
    };
    if uris.len() > 1 {
        return Err(VerifyError::Malformed(format!(
            "the certificate carries {} URI SANs ({}) where an X.509-SVID carries exactly one, its \
             SPIFFE ID",
            uris.len(),
            uris.join(", ")
        )));
    }
    id.parse::<Identity>().map_err(|e| {
        VerifyError::Malformed(format!(
            "its URI SAN is not a workload identity (spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>): {e}"
        ))
    })
}

/// The identity of the peer of a completed handshake made with [`server_config`] or
/// [`client_config`] (whose verifiers have already checked the chain and the SPIFFE ID).
pub fn peer_identity(conn: &CommonState) -> Result<Identity, VerifyError> {
    let leaf = conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or(VerifyError::NoCertificate)?;
    identity_of(leaf)
}

/// When the peer's certificate of a completed handshake expires (Unix seconds). A connection
/// outliving it should take no new work.
pub fn peer_not_after(conn: &CommonState) -> Result<Timestamp, VerifyError> {
    let leaf = conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or(VerifyError::NoCertificate)?;
    let cert = parse_x509(leaf).map_err(VerifyError::Malformed)?;
    Ok(Timestamp(cert.validity().not_after.timestamp()))
}

/// The server side of the data path's mutual TLS: TLS 1.3 only, a client certificate required,
/// chained to `trust` and carrying exactly one SPIFFE ID. `cert_chain` (leaf first) and `key` are
/// this workload's; the leaf must carry a SPIFFE ID. Session resumption is off, so every
/// connection verifies the peer's certificate afresh.
pub fn server_config(
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    trust: &TrustBundle,
) -> Result<ServerConfig, TlsError> {
    check_own_chain(&cert_chain)?;
    let provider = provider();
    let inner = WebPkiClientVerifier::builder_with_provider(trust.store.clone(), provider.clone())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let verifier = Arc::new(SpiffeClientVerifier {
        inner,
        root_subjects: trust.subjects.clone(),
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert_chain, key)
        .map_err(TlsError::Config)?;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// The client side of the data path's mutual TLS: TLS 1.3 only, presents `cert_chain` (leaf
/// first, must carry a SPIFFE ID) with `key`, and accepts only a server whose chain ends at a
/// root of `trust` and whose SPIFFE ID is `expected`.
///
/// The `ServerName` given to the connector is not used for verification and SNI is not sent
/// (SVIDs carry no DNS names); any name will do. Session resumption is off.
pub fn client_config(
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    trust: &TrustBundle,
    expected: Identity,
) -> Result<ClientConfig, TlsError> {
    check_own_chain(&cert_chain)?;
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        roots: trust.store.clone(),
        root_subjects: trust.subjects.clone(),
        algs: provider.signature_verification_algorithms,
        expected,
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(cert_chain, key)
        .map_err(TlsError::Config)?;
    config.resumption = Resumption::disabled();
    config.enable_sni = false;
    Ok(config)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn check_own_chain(chain: &[CertificateDer<'static>]) -> Result<(), TlsError> {
    let leaf = chain.first().ok_or(TlsError::EmptyCertChain)?;
    identity_of(leaf).map_err(TlsError::Certificate)?;
    for (i, cert) in chain.iter().enumerate().skip(1) {
        parse_x509(cert).map_err(|e| {
            TlsError::Certificate(VerifyError::Malformed(format!(
                "chain certificate #{}: {e}",
                i + 1
            )))
        })?;
    }
    Ok(())
}

fn parse_x509<'a>(der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, String> {
    match x509_parser::parse_x509_certificate(der.as_ref()) {
        Ok(([], cert)) => Ok(cert),
        Ok((rest, _)) => Err(format!(
            "{} bytes of trailing data after the X.509 certificate",
            rest.len()
        )),
        Err(e) => Err(format!("not a DER X.509 certificate ({e})")),
    }
}

fn uri_sans<'a>(x509: &X509Certificate<'a>) -> Result<Vec<&'a str>, VerifyError> {
    let san = x509
        .subject_alternative_name()
        .map_err(|e| VerifyError::Malformed(format!("invalid subjectAltName extension: {e}")))?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Describes a chain certificate for messages: the leaf by its SPIFFE ID (or subject), others
/// by subject.
fn describe(x509: &X509Certificate<'_>, is_leaf: bool) -> String {
    if is_leaf {
        match uri_sans(x509)
            .ok()
            .and_then(|u| u.first().map(|s| (*s).to_owned()))
        {
            Some(uri) => format!("the peer's certificate for {uri}"),
            None => format!("the peer's certificate {:?}", x509.subject().to_string()),
        }
    } else {
        format!(
            "intermediate CA certificate {:?}",
            x509.subject().to_string()
        )
    }
}

/// Turns a webpki failure into a [`VerifyError`], reading the presented certificates for detail.
fn classify(
    err: rustls::Error,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    root_subjects: &[String],
) -> VerifyError {
    use CertificateError as C;
    let now_ts = Timestamp::from_unix_time(now);
    let chain = || {
        std::iter::once(end_entity)
            .chain(intermediates)
            .enumerate()
            .filter_map(|(i, der)| parse_x509(der).ok().map(|c| (i == 0, c)))
    };
    let cert = match err {
        rustls::Error::InvalidCertificate(c) => c,
        rustls::Error::NoCertificatesPresented => return VerifyError::NoCertificate,
        other => return VerifyError::Rejected(other.to_string()),
    };
    match cert {
        C::Expired | C::ExpiredContext { .. } => {
            let found = chain().find(|(_, c)| c.validity().not_after.timestamp() < now_ts.0);
            let (not_after, certificate) = match (found, &cert) {
                (Some((leaf, c)), _) => (
                    Timestamp(c.validity().not_after.timestamp()),
                    describe(&c, leaf),
                ),
                (None, C::ExpiredContext { not_after, .. }) => (
                    Timestamp::from_unix_time(*not_after),
                    "a certificate of the peer's chain".to_owned(),
                ),
                (None, _) => (now_ts, "a certificate of the peer's chain".to_owned()),
            };
            VerifyError::Expired {
                not_after,
                now: now_ts,
                certificate,
            }
        }
        C::NotValidYet | C::NotValidYetContext { .. } => {
            let found = chain().find(|(_, c)| c.validity().not_before.timestamp() > now_ts.0);
            let (not_before, certificate) = match (found, &cert) {
                (Some((leaf, c)), _) => (
                    Timestamp(c.validity().not_before.timestamp()),
                    describe(&c, leaf),
                ),
                (None, C::NotValidYetContext { not_before, .. }) => (
                    Timestamp::from_unix_time(*not_before),
                    "a certificate of the peer's chain".to_owned(),
                ),
                (None, _) => (now_ts, "a certificate of the peer's chain".to_owned()),
            };
            VerifyError::NotYetValid {
                not_before,
                now: now_ts,
                certificate,
            }
        }
        #[allow(deprecated)]
        C::UnknownIssuer | C::BadSignature => {
            let top = intermediates.last().unwrap_or(end_entity);
            let issuer = parse_x509(top)
                .map(|c| c.issuer().to_string())
                .unwrap_or_else(|_| "unreadable".to_owned());
            let issuer_name_trusted = root_subjects.contains(&issuer);
            VerifyError::Untrusted {
                issuer,
                issuer_name_trusted,
            }
        }
        C::BadEncoding => {
            let detail = std::iter::once(end_entity)
                .chain(intermediates)
                .enumerate()
                .find_map(|(i, der)| {
                    parse_x509(der).err().map(|e| {
                        if i == 0 {
                            format!("the peer's certificate: {e}")
                        } else {
                            format!("chain certificate #{}: {e}", i + 1)
                        }
                    })
                })
                .unwrap_or_else(|| "the peer's certificate chain is not valid DER".to_owned());
            VerifyError::Malformed(detail)
        }
        C::UnhandledCriticalExtension => VerifyError::Malformed(
            "the certificate has a critical extension this verifier does not understand".into(),
        ),
        c @ (C::InvalidPurpose | C::InvalidPurposeContext { .. }) => {
            VerifyError::InvalidUsage(c.to_string())
        }
        // webpki errors rustls has no variant for (their text is the variant's name).
        C::Other(OtherError(inner)) => {
            let what = inner.to_string();
            VerifyError::Rejected(match what.as_str() {
                "CaUsedAsEndEntity" => format!(
                    "the peer's certificate is a CA certificate, not a workload certificate \
                     (webpki: {what})"
                ),
                "EndEntityUsedAsCa" => format!(
                    "a workload certificate appears as an issuer in the peer's chain (webpki: \
                     {what})"
                ),
                _ => format!("webpki: {what}"),
            })
        }
        other => VerifyError::Rejected(other.to_string()),
    }
}

/// Client side: verifies the server's chain against the roots, then its SPIFFE ID.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    root_subjects: Vec<String>,
    algs: WebPkiSupportedAlgorithms,
    expected: Identity,
}

impl SpiffeServerVerifier {
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), VerifyError> {
        let parsed = ParsedCertificate::try_from(end_entity)
            .map_err(|e| classify(e, end_entity, intermediates, now, &self.root_subjects))?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )
        .map_err(|e| classify(e, end_entity, intermediates, now, &self.root_subjects))?;
        let got = identity_of(end_entity)?;
        if got != self.expected {
            return Err(VerifyError::WrongIdentity {
                expected: self.expected.clone(),
                got,
            });
        }
        Ok(())
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verify(end_entity, intermediates, now)
            .map_err(VerifyError::into_rustls)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Server side: rustls' webpki client verifier, then the SPIFFE ID check.
#[derive(Debug)]
struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    root_subjects: Vec<String>,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|e| {
                classify(e, end_entity, intermediates, now, &self.root_subjects).into_rustls()
            })?;
        identity_of(end_entity).map_err(VerifyError::into_rustls)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_timestamps_format_as_rfc3339() {
        assert_eq!(Timestamp(0).to_string(), "1970-01-01T00:00:00Z");
        assert_eq!(Timestamp(951_782_400).to_string(), "2000-02-29T00:00:00Z");
        assert_eq!(Timestamp(1_714_564_800).to_string(), "2024-05-01T12:00:00Z");
        assert_eq!(Timestamp(1_735_689_599).to_string(), "2024-12-31T23:59:59Z");
        assert_eq!(Timestamp(-1).to_string(), "1969-12-31T23:59:59Z");
        assert_eq!(Timestamp(4_102_444_800).to_string(), "2100-01-01T00:00:00Z");
    }

    #[test]
    fn identity_garbage_is_malformed() {
        let garbage = CertificateDer::from(vec![0x30, 0x03, 0x01, 0x02, 0x03]);
        assert!(matches!(
            identity_of(&garbage),
            Err(VerifyError::Malformed(_))
        ));
        let err = certs_from_pem(b"not pem at all").err();
        assert!(matches!(err, Some(VerifyError::Malformed(_))), "{err:?}");
    }
}
