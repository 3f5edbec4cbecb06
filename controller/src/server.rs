//! The Discovery gRPC service: one bidirectional stream per agent.
//!
//! Protocol (docs/control-plane.md): the agent sends `Hello{node, known}`; once the controller
//! has a complete state it answers with a `sync` update that makes the agent's set equal to its
//! node's view (sending only what differs from `known`), then incremental updates whenever the
//! node's view changes. Every update is acknowledged or rejected (NACK with the reason); after a
//! NACK the controller falls back to what the agent last acknowledged.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use weft_api::wire::pb::{
    self, AgentMessage, ControllerMessage, agent_message, discovery_server::Discovery,
};

use crate::tokenreview::{ReviewError, Reviewed, TokenReviewer};
use crate::view::Views;

/// Updates an agent may leave unacknowledged before its stream is closed.
const MAX_UNACKED: usize = 64;
/// How long an agent has to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Node credentials: bootstrap token -> node name.
#[derive(Clone, Debug, Default)]
pub struct Tokens(HashMap<String, String>);

impl Tokens {
    /// From a `node: token` map. Two nodes with one token would let each speak for the other:
    /// refused, naming both.
    pub fn from_nodes(nodes: HashMap<String, String>) -> Result<Self, String> {
        let mut by_token: HashMap<String, String> = HashMap::new();
        for (node, token) in nodes {
            if let Some(other) = by_token.insert(token, node.clone()) {
                return Err(format!(
                    "nodes {other} and {node} have the same bootstrap token; give every node its own"
                ));
            }
        }
        Ok(Self(by_token))
    }

    fn node_of(&self, token: &str) -> Option<&str> {
        self.0.get(token).map(String::as_str)
    }
}

/// How agents prove which node they are before they hold a node certificate (and, unless
/// node certificates are required, on every call).
#[derive(Clone, Debug)]
pub enum Auth {
    /// Per-node bootstrap tokens (`authorization: Bearer <token>`).
    Tokens(Tokens),
    /// Kubernetes mode: the agent's projected service-account token, checked with a TokenReview.
    Kubernetes(Arc<TokenReviewer>),
    /// Anyone may claim any node (development only; the controller warns at startup).
    Insecure,
}

/// Who a caller is: its node credentials ([`Auth`]) and, preferred, a verified node
/// certificate (`spiffe://<trust-domain>/weft/node/<node>`, chained to the mesh CA; the TLS
/// layer has already checked the chain and validity).
#[derive(Clone, Debug)]
pub struct Authenticator {
    credentials: Auth,
    trust_domain: String,
    require_node_certificates: bool,
}

/// `spiffe://<trust-domain>/weft/node/<node>`: the identity in a node certificate.
pub fn node_spiffe_id(trust_domain: &str, node: &str) -> String {
    format!("spiffe://{trust_domain}/weft/node/{node}")
}

/// Whether `node` can be a node name in a SPIFFE ID (Kubernetes node names are DNS subdomains).
pub fn valid_node_name(node: &str) -> bool {
    !node.is_empty()
        && node.len() <= 253
        && node
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        && node != "."
        && node != ".."
}

/// The node of a node certificate (DER), or why it is not one.
pub fn node_of_certificate(der: &[u8], trust_domain: &str) -> Result<String, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("the client certificate is not X.509 ({e})"))?;
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| format!("the client certificate's subjectAltName is malformed ({e})"))?;
    let uris: Vec<&str> = sans
        .iter()
        .flat_map(|s| s.value.general_names.iter())
        .filter_map(|g| match g {
            x509_parser::extensions::GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    let [uri] = uris.as_slice() else {
        return Err(format!(
            "the client certificate carries {} URI SANs where a node certificate carries exactly one",
            uris.len()
        ));
    };
    let prefix = format!("spiffe://{trust_domain}/weft/node/");
    match uri.strip_prefix(&prefix) {
        Some(node) if valid_node_name(node) => Ok(node.to_string()),
        _ => Err(format!(
            "the client certificate is for `{uri}`, not a node of this mesh ({prefix}<node>): agents authenticate with the node certificate SignNode issued them, never a workload certificate"
        )),
    }
}

/// When the caller's client certificate expires (as a tokio instant), if it presented one.
pub fn peer_certificate_expiry<T>(req: &Request<T>) -> Option<tokio::time::Instant> {
    let certs = req.peer_certs()?;
    let (_, cert) = x509_parser::parse_x509_certificate(certs.first()?).ok()?;
    let not_after = cert.validity().not_after.timestamp();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let left = u64::try_from(not_after.saturating_sub(now)).unwrap_or(0);
    Some(tokio::time::Instant::now() + Duration::from_secs(left))
}

impl Authenticator {
    pub fn new(credentials: Auth, trust_domain: impl Into<String>) -> Self {
        Self {
            credentials,
            trust_domain: trust_domain.into(),
            require_node_certificates: false,
        }
    }

    /// Refuse bearer credentials on the config stream and `Sign` (only `SignNode` takes them).
    pub fn require_node_certificates(mut self, yes: bool) -> Self {
        self.require_node_certificates = yes;
        self
    }

    pub fn credentials(&self) -> &Auth {
        &self.credentials
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn is_insecure(&self) -> bool {
        matches!(self.credentials, Auth::Insecure)
    }

    /// The node a caller may speak for (`None`: any node, insecure mode): from its node
    /// certificate when it presented one, else (unless node certificates are required) from
    /// its bearer credential. A waypoint's token (Kubernetes mode) speaks for its own node's
    /// config stream; see [`Authenticator::caller_for`] for what else it may do.
    pub async fn node_for<T>(&self, req: &Request<T>) -> Result<Option<String>, Status> {
        self.caller_for(req).await.map(|c| c.node)
    }

    /// Who the caller is: the node it speaks for and, for a waypoint, the one workload identity
    /// it may obtain a certificate for.
    pub async fn caller_for<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        if let Some(certs) = req.peer_certs()
            && let Some(leaf) = certs.first()
        {
            return node_of_certificate(leaf, &self.trust_domain)
                .map(|node| Caller {
                    node: Some(node),
                    only_identity: None,
                })
                .map_err(Status::unauthenticated);
        }
        let refuse_agent_tokens = self.require_node_certificates && !self.is_insecure();
        if let Auth::Kubernetes(reviewer) = &self.credentials {
            let token = bearer(req.metadata(), "projected service-account token")?;
            let who = reviewer.caller_of(token).await.map_err(review_status)?;
            return match who {
                Reviewed::Waypoint {
                    node,
                    namespace,
                    service_account,
                } => Ok(Caller {
                    node: Some(node),
                    only_identity: Some(format!(
                        "spiffe://{}/ns/{namespace}/sa/{service_account}",
                        self.trust_domain
                    )),
                }),
                Reviewed::Agent { .. } if refuse_agent_tokens => Err(require_certificates()),
                Reviewed::Agent { node } => Ok(Caller {
                    node: Some(node),
                    only_identity: None,
                }),
            };
        }
        if refuse_agent_tokens {
            return Err(require_certificates());
        }
        self.node_for_bearer(req.metadata())
            .await
            .map(|node| Caller {
                node,
                only_identity: None,
            })
    }

    /// The node of the caller's bearer credential (bootstrap token or service-account token),
    /// ignoring any certificate: what `SignNode` accepts.
    pub async fn node_for_bearer(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<Option<String>, Status> {
        let hint = match &self.credentials {
            Auth::Insecure => return Ok(None),
            Auth::Tokens(_) => "bootstrap token (check --bootstrap-token-file)",
            Auth::Kubernetes(_) => {
                "projected service-account token (check --service-account-token-file)"
            }
        };
        let token = bearer(metadata, hint)?;
        match &self.credentials {
            Auth::Insecure => Ok(None),
            Auth::Tokens(tokens) => tokens
                .node_of(token.trim())
                .map(|n| Some(n.to_string()))
                .ok_or_else(|| Status::unauthenticated("unknown bootstrap token (check the agent's --bootstrap-token-file against the controller's --bootstrap-tokens)")),
            Auth::Kubernetes(reviewer) => reviewer
                .node_of(token)
                .await
                .map(Some)
                .map_err(review_status),
        }
    }
}

/// Who a caller is ([`Authenticator::caller_for`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The node it speaks for (`None`: any, insecure mode).
    pub node: Option<String>,
    /// A waypoint: the only workload identity it may obtain a certificate for (its own).
    pub only_identity: Option<String>,
}

/// The bearer token of a request (trimmed).
fn bearer<'a>(metadata: &'a tonic::metadata::MetadataMap, hint: &str) -> Result<&'a str, Status> {
    let header = metadata.get("authorization").ok_or_else(|| {
        Status::unauthenticated(format!(
            "no credentials: the agent must present its node certificate or send `authorization: Bearer <{hint}>`"
        ))
    })?;
    let value = header
        .to_str()
        .map_err(|_| Status::unauthenticated("authorization header is not text"))?;
    value
        .strip_prefix("Bearer ")
        .map(str::trim)
        .ok_or_else(|| Status::unauthenticated("authorization header must be `Bearer <token>`"))
}

fn review_status(e: ReviewError) -> Status {
    match e {
        ReviewError::Unavailable(_) => Status::unavailable(e.to_string()),
        _ => Status::unauthenticated(e.to_string()),
    }
}

fn require_certificates() -> Status {
    Status::unauthenticated(
        "this controller requires a node certificate (--require-node-certificates): the agent must first exchange its token for one with SignNode and connect with it (upgrade the agent)",
    )
}

/// The service.
#[derive(Clone)]
pub struct DiscoveryService {
    views: Arc<Views>,
    /// True once the source published its first complete state; no agent is synced before
    /// (a restarting controller must not tell agents to forget everything).
    ready: watch::Receiver<bool>,
    auth: Authenticator,
}

impl DiscoveryService {
    pub fn new(views: Arc<Views>, ready: watch::Receiver<bool>, auth: Authenticator) -> Self {
        Self { views, ready, auth }
    }

    /// The node the stream may be for (`None`: any, insecure mode).
    async fn authenticate(
        &self,
        req: &Request<Streaming<AgentMessage>>,
    ) -> Result<Option<String>, Status> {
        self.auth.node_for(req).await
    }
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<ControllerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type StreamStream = UpdateStream;

    async fn stream(
        &self,
        req: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let authorised_node = self.authenticate(&req).await?;
        // A stream opened with a node certificate lasts no longer than the certificate: the
        // agent reconnects with its renewed one (and a node whose token was revoked, unable
        // to renew, is cut off).
        let expires = peer_certificate_expiry(&req);
        let peer = req.remote_addr();
        let mut inbound = req.into_inner();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(AgentMessage {
                msg: Some(agent_message::Msg::Hello(h)),
            }))) => h,
            Ok(Ok(_)) => {
                return Err(Status::invalid_argument(
                    "the first message must be a Hello",
                ));
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(Status::deadline_exceeded("no Hello within 10 s")),
        };
        if hello.node.is_empty() {
            return Err(Status::invalid_argument(
                "Hello.node is empty (set the agent's --node)",
            ));
        }
        if let Some(n) = &authorised_node
            && *n != hello.node
        {
            return Err(Status::permission_denied(format!(
                "this credential belongs to node {n}, not {}",
                hello.node
            )));
        }
        let node = hello.node.clone();
        tracing::info!(%node, ?peer, known = hello.known.len(), agent = %hello.agent_version, "agent connected");
        let (tx, rx) = mpsc::channel(16);
        let views = self.views.clone();
        let ready = self.ready.clone();
        tokio::spawn(async move {
            let serving = serve(
                views,
                ready,
                node.clone(),
                hello.known.into_iter().collect(),
                inbound,
                tx.clone(),
            );
            match expires {
                None => serving.await,
                Some(at) => tokio::select! {
                    () = serving => {}
                    () = tokio::time::sleep_until(at) => {
                        tracing::info!(%node, "the stream's node certificate expired; closing the stream");
                        let _ = tx
                            .send(Err(Status::unauthenticated(
                                "the node certificate this stream was opened with expired; reconnect with the renewed certificate",
                            )))
                            .await;
                    }
                },
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

async fn serve(
    views: Arc<Views>,
    mut ready: watch::Receiver<bool>,
    node: String,
    mut known: HashMap<String, String>,
    mut inbound: Streaming<AgentMessage>,
    tx: mpsc::Sender<Result<ControllerMessage, Status>>,
) {
    // Wait for a complete state before the first sync (the agent keeps its own meanwhile),
    // but notice an agent that goes away in the meantime.
    tokio::select! {
        r = ready.wait_for(|r| *r) => {
            if r.is_err() {
                return;
            }
        }
        () = tx.closed() => return,
        _ = inbound.message() => {
            // Nothing but ACKs is expected, and nothing was sent yet: the stream ended or
            // misbehaved.
            tracing::info!(%node, "agent stream ended before the first sync");
            return;
        }
    }
    let mut generation = views.subscribe(&node);
    let mut acked = known.clone();
    let mut pending: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut nonce: u64 = 0;
    let mut first = true;
    loop {
        if !first {
            tokio::select! {
                changed = generation.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                msg = inbound.message() => {
                    match msg {
                        Ok(Some(AgentMessage { msg: Some(agent_message::Msg::Ack(a)) })) => {
                            let after = pending.remove(&a.nonce);
                            if a.error.is_empty() {
                                if let Some(after) = after {
                                    acked = after;
                                }
                            } else {
                                tracing::error!(%node, nonce = %a.nonce, error = %a.error, "agent rejected an update (NACK)");
                                known = acked.clone();
                                pending.clear();
                            }
                        }
                        Ok(Some(_)) => tracing::warn!(%node, "unexpected message on the stream; ignored"),
                        Ok(None) => {
                            tracing::info!(%node, "agent disconnected");
                            return;
                        }
                        Err(e) => {
                            tracing::info!(%node, error = %e, "agent stream ended");
                            return;
                        }
                    }
                    continue;
                }
            }
        }
        generation.borrow_and_update();
        let delta = views.delta(&node, &known);
        if delta.is_empty() && !first {
            continue;
        }
        for r in &delta.upserts {
            known.insert(r.key.clone(), r.version.clone());
        }
        for k in &delta.removes {
            known.remove(k);
        }
        nonce += 1;
        let msg = pb::ControllerMessage {
            nonce: nonce.to_string(),
            upserts: delta.upserts,
            removes: delta.removes,
            sync: first,
        };
        tracing::debug!(%node, nonce, upserts = msg.upserts.len(), removes = msg.removes.len(), sync = first, "sending update");
        if pending.len() >= MAX_UNACKED {
            tracing::error!(%node, unacked = pending.len(), "agent does not acknowledge updates; closing its stream");
            let _ = tx
                .send(Err(Status::resource_exhausted(format!(
                    "{MAX_UNACKED} updates were not acknowledged; reconnect"
                ))))
                .await;
            return;
        }
        pending.insert(nonce.to_string(), known.clone());
        if tx.send(Ok(msg)).await.is_err() {
            return;
        }
        first = false;
    }
}
