//! The controller's certificate authority: a root and an intermediate, generated on first start
//! and persisted (files with mode 0600 in no-cluster mode, a Secret in Kubernetes mode: see
//! [`crate::ca_secret`]), or supplied by the operator (an intermediate under a corporate root).
//! It signs X.509 SVIDs — certificates whose only subject alternative name is the workload's
//! SPIFFE ID — from CSRs made by node agents, whose private keys never leave the node, and node
//! certificates (client authentication only) for agent -> controller mutual TLS.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// Default lifetime of workload certificates.
pub const DEFAULT_WORKLOAD_TTL: Duration = Duration::from_secs(24 * 3600);
/// Lifetime of a generated root.
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Lifetime of a generated intermediate.
const INTERMEDIATE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Clock skew allowance: certificates are valid from a minute before issuance.
const BACKDATE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source} (is the CA directory writable?)")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the CA key or certificate in {path} is unusable: {detail}")]
    Material { path: PathBuf, detail: String },
    #[error(
        "the certificate signing request is invalid: {0} (the agent must send a PEM PKCS#10 CSR signed by its own key)"
    )]
    BadCsr(String),
    #[error("signing failed: {0}")]
    Sign(String),
}

/// A signed workload certificate.
#[derive(Clone, Debug)]
pub struct Signed {
    /// Leaf, then intermediate (PEM).
    pub chain_pem: Vec<String>,
    /// Unix seconds.
    pub not_after: i64,
}

/// The CA.
pub struct Ca {
    intermediate_pem: String,
    /// Expiry of the intermediate (Unix seconds): no leaf outlives it.
    intermediate_not_after: i64,
    intermediate_key: KeyPair,
    /// Roots agents must trust (more than one during a root rotation).
    trust_bundle: Vec<String>,
    workload_ttl: Duration,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("roots", &self.trust_bundle.len())
            .field("workload_ttl", &self.workload_ttl)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Reuses the CA in `dir` (`root.pem`, `intermediate.pem`, `intermediate-key.pem`, and any
    /// extra trusted roots in `trust-bundle.pem`), or generates a root and an intermediate there.
    /// The root's private key is written too (`root-key.pem`, 0600) so the operator can move it
    /// offline and sign future intermediates.
    pub fn load_or_generate(dir: &Path, workload_ttl: Duration) -> Result<Self, CaError> {
        let inter_path = dir.join("intermediate.pem");
        let key_path = dir.join("intermediate-key.pem");
        let root_path = dir.join("root.pem");
        let present = [&inter_path, &key_path, &root_path]
            .iter()
            .filter(|p| p.exists())
            .count();
        if present != 0 && present != 3 {
            return Err(CaError::Material {
                path: dir.to_path_buf(),
                detail: "incomplete CA (root.pem, intermediate.pem and intermediate-key.pem must all be there): restore the missing file; only move the directory away to start a new CA if you accept that every agent must then trust a new root".into(),
            });
        }
        if present == 3 {
            let mut roots = vec![read(&root_path)?];
            let extra = dir.join("trust-bundle.pem");
            if extra.exists() {
                roots.extend(split_pem(&read(&extra)?));
            }
            return Self::from_pem(&read(&inter_path)?, &read(&key_path)?, roots, workload_ttl)
                .map_err(|detail| CaError::Material {
                    path: dir.to_path_buf(),
                    detail,
                });
        }
        std::fs::create_dir_all(dir).map_err(|source| CaError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        let g = generate()?;
        write_file(&dir.join("root-key.pem"), &g.root_key_pem, true)?;
        write_file(&key_path, &g.intermediate_key_pem, true)?;
        write_file(&root_path, &g.root_pem, false)?;
        write_file(&inter_path, &g.intermediate_pem, false)?;
        tracing::info!(dir = %dir.display(), "generated the mesh root and intermediate CA");
        Self::from_pem(
            &g.intermediate_pem,
            &g.intermediate_key_pem,
            vec![g.root_pem],
            workload_ttl,
        )
        .map_err(|detail| CaError::Material {
            path: dir.to_path_buf(),
            detail,
        })
    }

    /// An operator-supplied intermediate (PEM certificate and key) and the roots to trust.
    pub fn from_pem(
        intermediate_pem: &str,
        intermediate_key_pem: &str,
        roots: Vec<String>,
        workload_ttl: Duration,
    ) -> Result<Self, String> {
        let key = KeyPair::from_pem(intermediate_key_pem).map_err(|e| format!("key: {e}"))?;
        // Check the pair is usable for signing before accepting it.
        Issuer::from_ca_cert_pem(intermediate_pem, &key)
            .map_err(|e| format!("certificate: {e}"))?;
        if roots.is_empty() {
            return Err("no root certificate to trust".into());
        }
        let intermediate_not_after = not_after_of(intermediate_pem)?;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        if intermediate_not_after <= now {
            return Err(format!(
                "the intermediate expired at Unix time {intermediate_not_after}: issue a new intermediate under the root"
            ));
        }
        if intermediate_not_after - now < 30 * 24 * 3600 {
            tracing::warn!(
                expires = intermediate_not_after,
                "the CA's intermediate expires within 30 days: issue a new one under the root"
            );
        }
        Ok(Self {
            intermediate_not_after,
            intermediate_pem: intermediate_pem.to_string(),
            intermediate_key: key,
            trust_bundle: roots,
            workload_ttl,
        })
    }

    /// The roots agents must trust.
    pub fn trust_bundle(&self) -> &[String] {
        &self.trust_bundle
    }

    /// Signs a CSR for `spiffe_id`. Whatever names the CSR asks for, the certificate carries
    /// exactly one SAN: the SPIFFE ID the caller was authorised for.
    pub fn sign(
        &self,
        csr_pem: &str,
        spiffe_id: &str,
        ttl: Option<Duration>,
    ) -> Result<Signed, CaError> {
        let ttl = ttl.unwrap_or(self.workload_ttl).min(self.workload_ttl);
        self.sign_leaf(
            csr_pem,
            spiffe_id,
            ttl,
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )
    }

    /// Signs a node certificate (`spiffe://<trust-domain>/weft/node/<node>`): client
    /// authentication only, so it can authenticate an agent to the controller but can never
    /// serve as a workload's (server) certificate.
    pub fn sign_node(
        &self,
        csr_pem: &str,
        spiffe_id: &str,
        ttl: Duration,
    ) -> Result<Signed, CaError> {
        self.sign_leaf(
            csr_pem,
            spiffe_id,
            ttl,
            vec![ExtendedKeyUsagePurpose::ClientAuth],
        )
    }

    fn sign_leaf(
        &self,
        csr_pem: &str,
        spiffe_id: &str,
        ttl: Duration,
        usages: Vec<ExtendedKeyUsagePurpose>,
    ) -> Result<Signed, CaError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        let uri = spiffe_id
            .to_string()
            .try_into()
            .map_err(|e: rcgen::Error| CaError::Sign(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = usages;
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, ttl);
        // Never past the intermediate: a chain with an expired intermediate fails everywhere.
        if let Ok(cap) = time::OffsetDateTime::from_unix_timestamp(self.intermediate_not_after)
            && params.not_after > cap
        {
            params.not_after = cap;
        }
        let not_after = params.not_after.unix_timestamp();
        csr.params = params;
        let issuer = Issuer::from_ca_cert_pem(&self.intermediate_pem, &self.intermediate_key)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        let cert = csr
            .signed_by(&issuer)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        Ok(Signed {
            chain_pem: vec![cert.pem(), self.intermediate_pem.clone()],
            not_after,
        })
    }
}

/// A freshly generated root and intermediate (PEM), before they are persisted.
pub struct Generated {
    pub root_pem: String,
    pub root_key_pem: String,
    pub intermediate_pem: String,
    pub intermediate_key_pem: String,
}

impl std::fmt::Debug for Generated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generated").finish_non_exhaustive()
    }
}

/// Generates a root (10 years) and an intermediate under it (1 year), ECDSA P-256.
pub fn generate() -> Result<Generated, CaError> {
    let sign_err = |e: rcgen::Error| CaError::Sign(e.to_string());
    let root_key = KeyPair::generate().map_err(sign_err)?;
    let mut root_params = CertificateParams::new(Vec::<String>::new()).map_err(sign_err)?;
    root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root_params
        .distinguished_name
        .push(DnType::CommonName, "Weft root CA");
    root_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    set_validity(&mut root_params, ROOT_TTL);
    let root = root_params.self_signed(&root_key).map_err(sign_err)?;
    let inter_key = KeyPair::generate().map_err(sign_err)?;
    let mut inter_params = CertificateParams::new(Vec::<String>::new()).map_err(sign_err)?;
    inter_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    inter_params
        .distinguished_name
        .push(DnType::CommonName, "Weft intermediate CA");
    inter_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    set_validity(&mut inter_params, INTERMEDIATE_TTL);
    let issuer = Issuer::from_params(&root_params, &root_key);
    let inter = inter_params
        .signed_by(&inter_key, &issuer)
        .map_err(sign_err)?;
    Ok(Generated {
        root_pem: root.pem(),
        root_key_pem: root_key.serialize_pem(),
        intermediate_pem: inter.pem(),
        intermediate_key_pem: inter_key.serialize_pem(),
    })
}

fn not_after_of(pem: &str) -> Result<i64, String> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| format!("certificate PEM: {e}"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&p.contents)
        .map_err(|e| format!("certificate: {e}"))?;
    Ok(cert.validity().not_after.timestamp())
}

fn set_validity(p: &mut CertificateParams, ttl: Duration) {
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - BACKDATE;
    p.not_after = now + ttl;
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn write_file(path: &Path, text: &str, private: bool) -> Result<(), CaError> {
    let err = |source| CaError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)
}

/// Splits a PEM bundle into single certificates.
pub fn split_pem(bundle: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in bundle.lines() {
        cur.push_str(line);
        cur.push('\n');
        if line.starts_with("-----END ") {
            out.push(std::mem::take(&mut cur));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr(san: &str) -> (KeyPair, String) {
        let key = KeyPair::generate().expect("key");
        let params = CertificateParams::new(vec![san.to_string()]).expect("params");
        let csr = params
            .serialize_request(&key)
            .expect("csr")
            .pem()
            .expect("pem");
        (key, csr)
    }

    #[test]
    fn signs_only_the_authorised_spiffe_id_with_the_configured_ttl() {
        let dir = std::env::temp_dir().join(format!("weft-ca-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ca = Ca::load_or_generate(&dir, DEFAULT_WORKLOAD_TTL).expect("ca");
        // The CSR asks for a DNS name; the certificate gets only the SPIFFE ID.
        let (_key, csr) = csr("evil.example.com");
        let id = "spiffe://cluster.local/ns/shop/sa/web";
        let signed = ca
            .sign(&csr, id, Some(Duration::from_secs(7 * 24 * 3600)))
            .expect("signed");
        assert_eq!(signed.chain_pem.len(), 2);
        let der = pem_der(&signed.chain_pem[0]);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("x509");
        let sans: Vec<String> = cert
            .subject_alternative_name()
            .expect("ext")
            .expect("san")
            .value
            .general_names
            .iter()
            .map(|g| format!("{g}"))
            .collect();
        assert_eq!(sans, vec![format!("URI({id})")]);
        // TTL is capped at the CA's workload TTL (24 h), not the 7 days asked for.
        let lifetime =
            cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert!(lifetime <= 24 * 3600 + 60 + 1, "{lifetime}");
        // Reloading reuses the same CA; private keys are 0600.
        let again = Ca::load_or_generate(&dir, DEFAULT_WORKLOAD_TTL).expect("reload");
        assert_eq!(again.trust_bundle(), ca.trust_bundle());
        use std::os::unix::fs::PermissionsExt as _;
        for f in ["root-key.pem", "intermediate-key.pem"] {
            let mode = std::fs::metadata(dir.join(f))
                .expect("key")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        assert!(matches!(
            ca.sign("garbage", id, None),
            Err(CaError::BadCsr(_))
        ));
        // A partial CA directory is an error, never silently replaced.
        std::fs::remove_file(dir.join("intermediate.pem")).expect("remove");
        let e = Ca::load_or_generate(&dir, DEFAULT_WORKLOAD_TTL).expect_err("partial");
        assert!(e.to_string().contains("incomplete CA"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn pem_der(pem: &str) -> Vec<u8> {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("pem");
        p.contents
    }

    #[test]
    fn bundles_split_into_certificates() {
        let b = "-----BEGIN CERTIFICATE-----\nA\n-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\nB\n-----END CERTIFICATE-----\n";
        assert_eq!(split_pem(b).len(), 2);
    }
}
