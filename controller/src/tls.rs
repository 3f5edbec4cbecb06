//! The config stream's server certificate, which agents verify. (Agents authenticate
//! themselves with node certificates from the mesh CA, see `server::Authenticator`.) The
//! certificate is either the operator's (`--tls-cert/--tls-key`) or generated on first start
//! into `--state-dir` (a private CA, `ca.pem`, that agents trust with `--controller-ca`), and
//! reused afterwards.

use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};

/// DNS name in the generated server certificate; agents verify it.
pub const SERVER_NAME: &str = "weft-controller";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source} (is --state-dir writable?)")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("generating the controller certificate failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// PEM server certificate chain and key, plus the CA agents should trust.
pub struct ServerTls {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_path: Option<PathBuf>,
}

/// Loads the operator's certificate and key.
pub fn load(cert: &Path, key: &Path) -> Result<ServerTls, TlsError> {
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|source| TlsError::Read {
            path: p.to_path_buf(),
            source,
        })
    };
    Ok(ServerTls {
        cert_pem: read(cert)?,
        key_pem: read(key)?,
        ca_path: None,
    })
}

/// Reuses or generates a private CA and server certificate in `dir`.
pub fn load_or_generate(dir: &Path, extra_ips: &[IpAddr]) -> Result<ServerTls, TlsError> {
    let ca_path = dir.join("ca.pem");
    let cert_path = dir.join("server.pem");
    let key_path = dir.join("server-key.pem");
    if cert_path.exists() && key_path.exists() && ca_path.exists() {
        let mut tls = load(&cert_path, &key_path)?;
        tls.ca_path = Some(ca_path);
        return Ok(tls);
    }
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Weft controller CA");
    let ca = ca_params.self_signed(&ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![SERVER_NAME.to_string()])?;
    params
        .distinguished_name
        .push(DnType::CommonName, SERVER_NAME);
    for ip in extra_ips {
        params.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let cert = params.signed_by(&key, &issuer)?;
    write_private(&key_path, &key.serialize_pem())?;
    write_private(&dir.join("ca-key.pem"), &ca_key.serialize_pem())?;
    write_public(&cert_path, &cert.pem())?;
    write_public(&ca_path, &ca.pem())?;
    tracing::info!(dir = %dir.display(), "generated a private CA and server certificate for the config stream");
    Ok(ServerTls {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        ca_path: Some(ca_path),
    })
}

fn write_private(path: &Path, text: &str) -> Result<(), TlsError> {
    let err = |source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)
}

fn write_public(path: &Path, text: &str) -> Result<(), TlsError> {
    std::fs::write(path, text).map_err(|source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_then_reuses_with_private_keys() {
        let dir = std::env::temp_dir().join(format!("weft-tls-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = load_or_generate(&dir, &["198.19.0.1".parse().expect("ip")]).expect("generate");
        let b = load_or_generate(&dir, &[]).expect("reuse");
        assert_eq!(a.cert_pem, b.cert_pem);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.join("server-key.pem"))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
