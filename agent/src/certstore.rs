//! Workload certificates and keys on the node's disk (`<state-dir>/certs`, directory 0700,
//! files 0600), so an agent restarted while the CA is unreachable keeps serving its pods until
//! their certificates expire. Keys never leave the node; a file that does not parse is ignored
//! (and replaced by the next issuance).

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::identity::Certified;

/// A stored certificate.
#[derive(Debug, Serialize, Deserialize)]
pub struct Persisted {
    pub identity: String,
    pub chain_pem: Vec<String>,
    pub key_pem: String,
    pub trust_bundle_pem: Vec<String>,
    pub not_after: i64,
}

/// The directory.
#[derive(Clone, Debug)]
pub struct CertStore {
    dir: PathBuf,
}

impl CertStore {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    fn path(&self, identity: &str) -> PathBuf {
        let name: String = identity
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.dir.join(format!("{name}.json"))
    }

    /// Every readable certificate (expired ones included: the caller decides).
    pub fn load(&self) -> Vec<Persisted> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let text = std::fs::read(e.path()).ok()?;
                match serde_json::from_slice::<Persisted>(&text) {
                    Ok(p) => Some(p),
                    Err(err) => {
                        tracing::warn!(file = %e.path().display(), error = %err, "ignoring an unreadable stored certificate");
                        None
                    }
                }
            })
            .collect()
    }

    /// Writes a certificate (atomically: temporary file, then rename). Failures are logged: the
    /// certificate still works, it just will not survive a restart.
    pub fn save(&self, c: &Certified) {
        let p = Persisted {
            identity: c.identity.clone(),
            chain_pem: c.chain_pem.clone(),
            key_pem: c.key_pem.clone(),
            trust_bundle_pem: c.trust_bundle_pem.clone(),
            not_after: c.not_after,
        };
        let path = self.path(&c.identity);
        let tmp = path.with_extension("tmp");
        let result = (|| -> std::io::Result<()> {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.dir)?;
            let bytes = serde_json::to_vec(&p).map_err(std::io::Error::other)?;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        if let Err(e) = result {
            tracing::warn!(file = %path.display(), error = %e, "cannot store a workload certificate (it will not survive an agent restart); check that the state directory is writable");
        }
    }

    pub fn remove(&self, identity: &str) {
        let _ = std::fs::remove_file(self.path(identity));
    }
}
