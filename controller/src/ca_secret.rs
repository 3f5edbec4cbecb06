//! Kubernetes mode: the CA lives in a Secret (`--ca-secret`, default `weft-system/weft-ca`)
//! instead of files, so every controller replica and every restart signs with the same CA.
//!
//! Keys: `root.crt` (the root), `ca.crt` and `ca.key` (the intermediate the controller signs
//! with), optionally `root.key` (written on generation; delete it from the Secret to keep the
//! root key offline) and `trust-bundle.crt` (extra roots to trust, for a rotation). The Secret
//! is created if absent; when two controllers start together and both generate a CA, the API
//! server accepts one `create` and the other gets `409 AlreadyExists`, discards what it
//! generated and loads the winner's, so both converge on one CA. A Secret with some keys
//! missing is an error, never replaced (a new root would cut off every agent).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

use crate::ca::{self, Ca, CaError};

/// Default Secret holding the CA.
pub const DEFAULT_CA_SECRET: &str = "weft-system/weft-ca";

const ROOT_CERT: &str = "root.crt";
const ROOT_KEY: &str = "root.key";
const CERT: &str = "ca.crt";
const KEY: &str = "ca.key";
const EXTRA_ROOTS: &str = "trust-bundle.crt";

#[derive(Debug, thiserror::Error)]
pub enum CaSecretError {
    #[error("`{0}` is not a Secret of the form <namespace>/<name>")]
    BadName(String),
    #[error(
        "cannot {action} the CA Secret {secret}: {detail} (may the controller get and create secrets in that namespace? see manifests/rbac.yaml)"
    )]
    Api {
        action: &'static str,
        secret: String,
        detail: String,
    },
    #[error(
        "the CA Secret {secret} is incomplete (missing {missing}): restore the missing keys; only delete the Secret to start a new CA if you accept that every agent must then trust a new root"
    )]
    Incomplete { secret: String, missing: String },
    #[error("the CA in Secret {secret} is unusable: {detail}")]
    Material { secret: String, detail: String },
    #[error(transparent)]
    Generate(#[from] CaError),
}

/// Loads the CA from the Secret `namespace/name`, or generates one and creates the Secret.
pub async fn load_or_create(
    client: Client,
    secret: &str,
    workload_ttl: Duration,
) -> Result<Ca, CaSecretError> {
    let (ns, name) = secret
        .split_once('/')
        .filter(|(ns, n)| !ns.is_empty() && !n.is_empty() && !n.contains('/'))
        .ok_or_else(|| CaSecretError::BadName(secret.to_string()))?;
    let api: Api<Secret> = Api::namespaced(client, ns);
    let api_err = |action: &'static str| {
        move |e: kube::Error| CaSecretError::Api {
            action,
            secret: secret.to_string(),
            detail: e.to_string(),
        }
    };
    if let Some(s) = api.get_opt(name).await.map_err(api_err("read"))? {
        tracing::info!(%secret, "loaded the mesh CA from its Secret");
        return from_secret(&s, secret, workload_ttl);
    }
    let g = ca::generate()?;
    let mut data = BTreeMap::new();
    for (k, v) in [
        (ROOT_CERT, &g.root_pem),
        (ROOT_KEY, &g.root_key_pem),
        (CERT, &g.intermediate_pem),
        (KEY, &g.intermediate_key_pem),
    ] {
        data.insert(k.to_string(), ByteString(v.as_bytes().to_vec()));
    }
    let new = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(ns.to_string()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_string(),
                "weft-controller".to_string(),
            )])),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &new).await {
        Ok(created) => {
            tracing::info!(%secret, "generated the mesh root and intermediate CA into a Secret");
            from_secret(&created, secret, workload_ttl)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {
            // Another controller created it first: use its CA, drop ours.
            tracing::info!(%secret, "another controller created the CA Secret first; using it");
            let s = api
                .get_opt(name)
                .await
                .map_err(api_err("read"))?
                .ok_or_else(|| CaSecretError::Api {
                    action: "read",
                    secret: secret.to_string(),
                    detail: "it was created by another controller and deleted again".into(),
                })?;
            from_secret(&s, secret, workload_ttl)
        }
        Err(e) => Err(api_err("create")(e)),
    }
}

/// The CA held in a Secret.
pub fn from_secret(s: &Secret, secret: &str, workload_ttl: Duration) -> Result<Ca, CaSecretError> {
    let empty = BTreeMap::new();
    let data = s.data.as_ref().unwrap_or(&empty);
    let text = |k: &str| -> Result<Option<String>, CaSecretError> {
        data.get(k)
            .map(|b| {
                String::from_utf8(b.0.clone()).map_err(|_| CaSecretError::Material {
                    secret: secret.to_string(),
                    detail: format!("key {k} is not PEM text"),
                })
            })
            .transpose()
    };
    let (root, cert, key) = (text(ROOT_CERT)?, text(CERT)?, text(KEY)?);
    let (Some(root), Some(cert), Some(key)) = (root.clone(), cert.clone(), key.clone()) else {
        let missing: Vec<&str> = [(ROOT_CERT, &root), (CERT, &cert), (KEY, &key)]
            .iter()
            .filter(|(_, v)| v.is_none())
            .map(|(k, _)| *k)
            .collect();
        return Err(CaSecretError::Incomplete {
            secret: secret.to_string(),
            missing: missing.join(", "),
        });
    };
    let mut roots = vec![root];
    if let Some(extra) = text(EXTRA_ROOTS)? {
        roots.extend(ca::split_pem(&extra));
    }
    Ca::from_pem(&cert, &key, roots, workload_ttl).map_err(|detail| CaSecretError::Material {
        secret: secret.to_string(),
        detail,
    })
}
