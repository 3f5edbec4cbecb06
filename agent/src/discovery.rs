//! The agent side of the config stream: one bidirectional gRPC stream to the controller,
//! updates validated and applied all-or-nothing (ACK) or rejected with the reason (NACK), the
//! last good set persisted so a restarted agent serves from it while the controller is away
//! (static stability), and reconnection with jittered exponential backoff.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message as _;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use weft_api::wire::pb::{self, agent_message, discovery_client::DiscoveryClient};
use weft_api::{MeshState, WorkloadInfo};

use crate::admin::ConfigStatus;
use crate::identity::{CertError, CertManager, Certified};

/// DNS name the controller's certificate must carry (the generated one does).
pub const CONTROLLER_SERVER_NAME: &str = "weft-controller";
const SNAPSHOT_FILE: &str = "snapshot.pb";
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(15);

/// Where and how to reach the controller.
#[derive(Clone, Debug)]
pub struct ControllerOptions {
    /// `https://host:port`.
    pub url: String,
    /// PEM CA that signed the controller's certificate.
    pub ca: PathBuf,
    /// File holding this node's credential: its bootstrap token, or (Kubernetes) its projected
    /// service-account token. Re-read on every use (projected tokens are rotated).
    pub token_file: Option<PathBuf>,
    pub node: String,
    /// Directory for the last-good snapshot.
    pub state_dir: PathBuf,
    /// This node's certificate for agent -> controller mTLS, obtained by exchanging the token
    /// (SignNode); `None` without a token (development against `--insecure-no-auth`).
    pub node_identity: Option<NodeIdentity>,
}

/// The node certificate: its SPIFFE ID and the manager that obtains and renews it.
#[derive(Clone)]
pub struct NodeIdentity {
    pub id: String,
    pub certs: Arc<CertManager>,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// A channel to the controller and how requests on it authenticate.
#[derive(Clone)]
pub struct Connection {
    pub channel: tonic::transport::Channel,
    /// The bearer credential to send; `None` when the node certificate authenticates.
    pub auth: AuthHeader,
    /// The node certificate the channel presents, if any.
    pub node_cert: Option<Arc<Certified>>,
}

/// Why the stream failed; each says what to check.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("controller address `{url}` is invalid: {detail}")]
    Url { url: String, detail: String },
    #[error(
        "cannot connect to the controller at {url}: {detail} (is it running and reachable? does --controller-ca match its certificate?)"
    )]
    Connect { url: String, detail: String },
    #[error("the controller refused the stream: {0}")]
    Refused(tonic::Status),
    #[error(
        "the token in {path} contains characters not allowed in an HTTP header (expected a single line of text)"
    )]
    BadToken { path: PathBuf },
    #[error("the stream to the controller ended: {0}")]
    Ended(String),
    #[error("cannot obtain this node's certificate for the controller: {0}")]
    NodeCertificate(CertError),
}

/// The resources the agent holds, by key.
#[derive(Clone, Debug, Default)]
pub struct Replica {
    resources: BTreeMap<String, pb::Resource>,
}

impl Replica {
    /// Keys and versions, for a resuming Hello.
    pub fn known(&self) -> BTreeMap<String, String> {
        self.resources
            .iter()
            .map(|(k, r)| (k.clone(), r.version.clone()))
            .collect()
    }

    /// Applies an update all-or-nothing: every upsert must convert into the model.
    pub fn apply(&self, msg: &pb::ControllerMessage) -> Result<(Replica, MeshState), String> {
        let mut next = self.clone();
        for k in &msg.removes {
            next.resources.remove(k);
        }
        for r in &msg.upserts {
            next.resources.insert(r.key.clone(), r.clone());
        }
        let state = next.state()?;
        Ok((next, state))
    }

    /// The model built from the resources.
    pub fn state(&self) -> Result<MeshState, String> {
        let mut state = MeshState::default();
        for (key, r) in &self.resources {
            match &r.kind {
                Some(pb::resource::Kind::Workload(w)) => {
                    let w = WorkloadInfo::try_from(w.clone()).map_err(|e| e.to_string())?;
                    state
                        .namespaces
                        .insert(w.namespace.clone(), w.capture.namespace_meshed);
                    // A workload of this node arrives twice: in full (`Workload/`) and as a peer;
                    // the full one wins.
                    if key.starts_with(weft_api::wire::PEER_PREFIX)
                        && state.workloads.contains_key(&w.key())
                    {
                        continue;
                    }
                    state.workloads.insert(w.key(), w);
                }
                Some(pb::resource::Kind::TrustBundle(b)) => {
                    state.trust_bundle = b.roots_pem.clone();
                }
                Some(pb::resource::Kind::AuthorizationPolicy(p)) => {
                    let p = weft_api::model::PolicyInfo::try_from(p.clone())
                        .map_err(|e| e.to_string())?;
                    state.policies.insert(p.key(), p);
                }
                Some(pb::resource::Kind::Service(s)) => {
                    let s = weft_api::model::ServiceInfo::try_from(s.clone())
                        .map_err(|e| e.to_string())?;
                    state.services.insert(s.key(), s);
                }
                Some(pb::resource::Kind::Route(r)) => {
                    let r = weft_api::routes::RouteInfo::try_from(r.clone())
                        .map_err(|e| e.to_string())?;
                    state.routes.insert(r.key(), r);
                }
                // A kind this agent does not know (a newer controller): ignored, so that an
                // upgrade of the control plane never stops older agents from applying updates.
                None => {
                    tracing::debug!(
                        key,
                        "ignoring a resource of a kind this agent does not know"
                    );
                }
            }
        }
        Ok(state)
    }

    fn encode(&self) -> Vec<u8> {
        pb::ControllerMessage {
            nonce: String::new(),
            upserts: self.resources.values().cloned().collect(),
            removes: Vec::new(),
            sync: true,
        }
        .encode_to_vec()
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        let msg = pb::ControllerMessage::decode(bytes).map_err(|e| e.to_string())?;
        let (r, _) = Replica::default().apply(&msg)?;
        Ok(r)
    }
}

/// Loads the last-good snapshot, if any.
pub fn load_snapshot(dir: &Path) -> Option<Replica> {
    let path = dir.join(SNAPSHOT_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "cannot read the last-good snapshot; starting without it (check --state-dir permissions)");
            return None;
        }
    };
    match Replica::decode(&bytes) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "ignoring a corrupt snapshot");
            None
        }
    }
}

fn save_snapshot(dir: &Path, r: &Replica) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{SNAPSHOT_FILE}.tmp"));
    std::fs::write(&tmp, r.encode())?;
    std::fs::rename(&tmp, dir.join(SNAPSHOT_FILE))
}

/// Follows the controller forever, publishing every applied state on `out`.
pub async fn run(
    opts: ControllerOptions,
    out: watch::Sender<Option<Arc<MeshState>>>,
    status: Arc<Mutex<ConfigStatus>>,
) {
    let mut replica = Replica::default();
    if let Some(r) = load_snapshot(&opts.state_dir) {
        match r.state() {
            Ok(state) => {
                tracing::info!(
                    resources = r.resources.len(),
                    "serving the last-good snapshot until the controller answers"
                );
                out.send_replace(Some(Arc::new(state)));
                replica = r;
            }
            Err(e) => tracing::error!(error = %e, "snapshot unusable"),
        }
    }
    let mut backoff = BACKOFF_MIN;
    loop {
        let mut reached_sync = false;
        let result = stream_once(&opts, &mut replica, &out, &status, &mut reached_sync).await;
        // A stream that synced found a healthy controller: reconnect quickly.
        let synced = reached_sync;
        let msg = match result {
            Ok(_) => "stream closed by the controller".to_string(),
            Err(e) => e.to_string(),
        };
        set_status(&status, |s| {
            s.connected = false;
            s.last_error = Some(msg.clone());
        });
        if synced {
            backoff = BACKOFF_MIN;
        }
        if !reached_sync && let Some(n) = &opts.node_identity {
            // The stream failed before it synced: the controller may no longer accept this
            // certificate (its CA was replaced, say). Exchange the token for a new one on the
            // next attempt. (A stream closed later, e.g. because the certificate it was opened
            // with expired, just reconnects with the current, renewed certificate.)
            n.certs.forget(&n.id);
        }
        // Full jitter: sleep a random time up to the current bound.
        let sleep = backoff
            .mul_f64(rand::random::<f64>())
            .max(Duration::from_millis(20));
        tracing::warn!(error = %msg, retry_in_ms = sleep.as_millis() as u64, "controller unavailable; keeping the last good configuration");
        metrics::counter!("weft_controller_reconnects_total").increment(1);
        tokio::time::sleep(sleep).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

fn set_status(status: &Mutex<ConfigStatus>, f: impl FnOnce(&mut ConfigStatus)) {
    match status.lock() {
        Ok(mut s) => f(&mut s),
        Err(p) => f(&mut p.into_inner()),
    }
}

/// Credentials to attach to controller requests (`authorization: Bearer <token>`).
pub type AuthHeader = Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>;

/// Opens a channel to the controller: mutual TLS with this node's certificate (obtained now
/// if there is none yet), or, without one, TLS with the bearer credential.
pub async fn connect(opts: &ControllerOptions) -> Result<Connection, StreamError> {
    let cert = match &opts.node_identity {
        None => None,
        Some(n) => match n.certs.get(&n.id).await {
            Ok(c) => Some(c),
            Err(CertError::Unsupported { detail, .. }) => {
                tracing::warn!(%detail, "the controller issues no node certificates; authenticating with the token only");
                None
            }
            Err(e) => return Err(StreamError::NodeCertificate(e)),
        },
    };
    connect_with(opts, cert).await
}

/// Opens a channel presenting `cert` (mutual TLS; no bearer credential is sent), or, without
/// it, TLS with the bearer credential from `token_file`.
pub async fn connect_with(
    opts: &ControllerOptions,
    cert: Option<Arc<Certified>>,
) -> Result<Connection, StreamError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| StreamError::Read {
            path: p.to_path_buf(),
            source,
        })
    };
    let ca = read(&opts.ca)?;
    let url_err = |detail: String| StreamError::Url {
        url: opts.url.clone(),
        detail,
    };
    let auth = match (&opts.token_file, &cert) {
        (Some(p), None) => {
            let t = String::from_utf8_lossy(&read(p)?).trim().to_string();
            Some(
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| StreamError::BadToken { path: p.clone() })?,
            )
        }
        _ => None,
    };
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name(CONTROLLER_SERVER_NAME);
    if let Some(c) = &cert {
        tls = tls.identity(Identity::from_pem(c.chain_pem.concat(), &c.key_pem));
    }
    let endpoint = Endpoint::from_shared(opts.url.clone())
        .map_err(|e| url_err(e.to_string()))?
        .tls_config(tls)
        .map_err(|e| url_err(e.to_string()))?
        .connect_timeout(Duration::from_secs(3))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5));
    let channel = endpoint.connect().await.map_err(|e| StreamError::Connect {
        url: opts.url.clone(),
        detail: error_chain(&e),
    })?;
    Ok(Connection {
        channel,
        auth,
        node_cert: cert,
    })
}

/// One stream; returns Ok(true) if it synced before ending. `reached_sync` is set when the
/// stream synced, however it ended.
async fn stream_once(
    opts: &ControllerOptions,
    replica: &mut Replica,
    out: &watch::Sender<Option<Arc<MeshState>>>,
    status: &Mutex<ConfigStatus>,
    reached_sync: &mut bool,
) -> Result<bool, StreamError> {
    let Connection { channel, auth, .. } = connect(opts).await?;
    let mut client = DiscoveryClient::new(channel);
    let (tx, rx) = mpsc::channel(16);
    let hello = pb::AgentMessage {
        msg: Some(agent_message::Msg::Hello(pb::Hello {
            node: opts.node.clone(),
            known: replica.known(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
        })),
    };
    let _ = tx.send(hello).await;
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(v) = auth {
        req.metadata_mut().insert("authorization", v);
    }
    let mut inbound = client
        .stream(req)
        .await
        .map_err(StreamError::Refused)?
        .into_inner();
    set_status(status, |s| s.connected = true);
    tracing::info!(url = %opts.url, known = replica.resources.len(), "connected to the controller");
    let mut synced = false;
    loop {
        let msg = match inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(synced),
            Err(status) if synced => return Err(StreamError::Ended(status.to_string())),
            Err(status)
                if status.code() == tonic::Code::Unavailable
                    || status.code() == tonic::Code::Unknown =>
            {
                return Err(StreamError::Ended(status.to_string()));
            }
            Err(status) => return Err(StreamError::Refused(status)),
        };
        let ack = match replica.apply(&msg) {
            Ok((next, state)) => {
                *replica = next;
                if msg.sync {
                    synced = true;
                    *reached_sync = true;
                    tracing::info!(
                        upserts = msg.upserts.len(),
                        removes = msg.removes.len(),
                        resources = replica.resources.len(),
                        "synced with the controller"
                    );
                }
                if let Err(e) = save_snapshot(&opts.state_dir, replica) {
                    tracing::error!(dir = %opts.state_dir.display(), error = %e, "cannot persist the snapshot; a restart while the controller is down would start empty");
                }
                out.send_replace(Some(Arc::new(state)));
                set_status(status, |s| {
                    s.applied += 1;
                    s.last_error = None;
                    s.synced = synced;
                });
                pb::Ack {
                    nonce: msg.nonce.clone(),
                    error: String::new(),
                }
            }
            Err(e) => {
                tracing::error!(nonce = %msg.nonce, error = %e, "rejecting an update (NACK); keeping the previous configuration");
                metrics::counter!("weft_config_rejected_total").increment(1);
                set_status(status, |s| s.last_error = Some(e.clone()));
                pb::Ack {
                    nonce: msg.nonce.clone(),
                    error: e,
                }
            }
        };
        let _ = tx
            .send(pb::AgentMessage {
                msg: Some(agent_message::Msg::Ack(ack)),
            })
            .await;
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_api::wire;

    fn workload(name: &str, ip: &str) -> WorkloadInfo {
        WorkloadInfo {
            name: name.into(),
            namespace: "shop".into(),
            service_account: "sa".into(),
            node: "n1".into(),
            ip4: ip.parse().ok(),
            ip6: None,
            netns: "/x".into(),
            labels: Default::default(),
            capture: Default::default(),
        }
    }

    #[test]
    fn updates_apply_all_or_nothing() {
        let good = wire::workload_resource(&workload("a", "198.18.1.11"));
        let msg = pb::ControllerMessage {
            nonce: "1".into(),
            upserts: vec![good.clone()],
            removes: vec![],
            sync: true,
        };
        let (r, state) = Replica::default().apply(&msg).expect("valid");
        assert_eq!(state.workloads.len(), 1);
        let mut bad = wire::workload_resource(&workload("b", "198.18.1.12"));
        if let Some(pb::resource::Kind::Workload(w)) = &mut bad.kind {
            w.ips = vec!["garbage".into()];
        }
        let msg = pb::ControllerMessage {
            nonce: "2".into(),
            upserts: vec![bad],
            removes: vec![good.key.clone()],
            sync: false,
        };
        let e = r.apply(&msg).expect_err("NACK");
        assert!(e.contains("Workload/shop/b") && e.contains("ips"), "{e}");
        // The replica is untouched by a rejected update.
        assert_eq!(r.known().len(), 1);
    }

    #[test]
    fn snapshots_round_trip_and_corruption_is_ignored() {
        let dir = std::env::temp_dir().join(format!("weft-snap-{}", std::process::id()));
        let msg = pb::ControllerMessage {
            nonce: "1".into(),
            upserts: vec![wire::workload_resource(&workload("a", "198.18.1.11"))],
            removes: vec![],
            sync: true,
        };
        let (r, _) = Replica::default().apply(&msg).expect("valid");
        save_snapshot(&dir, &r).expect("save");
        let back = load_snapshot(&dir).expect("load");
        assert_eq!(back.known(), r.known());
        std::fs::write(dir.join(SNAPSHOT_FILE), b"\xff\xff not protobuf").expect("write");
        assert!(load_snapshot(&dir).is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
