//! Kubernetes mode: agents prove which node they run on with their projected service-account
//! token. The controller sends it to the API server in a TokenReview (`authentication.k8s.io/v1`,
//! audience `--token-audience`), requires the token's user to be the agents' service account
//! (`--agent-service-account`), and reads the node from the token's pod binding: the
//! `authentication.kubernetes.io/node-name` extra when the API server adds it (Kubernetes
//! 1.30+), else the bound pod's `spec.nodeName` (checked against the bound pod's UID, so a pod
//! re-created under the same name elsewhere does not inherit the token). Results are cached
//! briefly (accepted tokens 30 s, refused ones 5 s; API errors never).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::time::Instant;

/// Default audience agents request for their projected token.
pub const DEFAULT_AUDIENCE: &str = "weft-controller";
/// Default service account of the agents.
pub const DEFAULT_AGENT_SERVICE_ACCOUNT: &str = "weft-system/weft-agent";

const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const ACCEPTED_TTL: Duration = Duration::from_secs(30);
const REFUSED_TTL: Duration = Duration::from_secs(5);
const MAX_CACHE: usize = 4096;

/// Why a token does not authenticate a node.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ReviewError {
    #[error(
        "the Kubernetes API refused the service-account token: {0} (the agent must send its projected service-account token with audience `{1}`; check the agent's token volume and --service-account-token-file)"
    )]
    Refused(String, String),
    #[error(
        "the token belongs to `{got}`, not the agents' service account `{want}` (run the agent under that service account, or set the controller's --agent-service-account; a waypoint's token is accepted only from a pod labelled weft.dev/waypoint, and never for a node certificate)"
    )]
    WrongServiceAccount { got: String, want: String },
    #[error(
        "the token is not bound to a pod on a node ({0}): the agent must use a projected service-account token (a pod-bound token), not a long-lived Secret token"
    )]
    NotBound(String),
    #[error(
        "cannot review the token with the Kubernetes API: {0} (is the API server reachable, and may the controller create tokenreviews? see manifests/rbac.yaml)"
    )]
    Unavailable(String),
    #[error("`{0}` is not a service account of the form <namespace>/<name>")]
    BadServiceAccount(String),
}

/// Who an accepted token belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reviewed {
    /// A node agent (the agents' service account), on `node`.
    Agent { node: String },
    /// A waypoint pod (label `weft.dev/waypoint`) running as `namespace/service_account` on
    /// `node`: it may obtain its own workload certificate and follow its node's config
    /// stream, nothing else.
    Waypoint {
        node: String,
        namespace: String,
        service_account: String,
    },
}

impl Reviewed {
    pub fn node(&self) -> &str {
        match self {
            Self::Agent { node } | Self::Waypoint { node, .. } => node,
        }
    }
}

struct Cached {
    until: Instant,
    result: Result<Reviewed, ReviewError>,
}

/// Reviews agent tokens against the API server.
pub struct TokenReviewer {
    client: Client,
    audience: String,
    namespace: String,
    service_account: String,
    cache: Mutex<HashMap<String, Cached>>,
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("audience", &self.audience)
            .field("service_account", &self.username())
            .finish_non_exhaustive()
    }
}

impl TokenReviewer {
    /// `service_account` is `<namespace>/<name>`.
    pub fn new(client: Client, audience: &str, service_account: &str) -> Result<Self, ReviewError> {
        let (ns, name) = service_account
            .split_once('/')
            .filter(|(ns, n)| !ns.is_empty() && !n.is_empty() && !n.contains('/'))
            .ok_or_else(|| ReviewError::BadServiceAccount(service_account.to_string()))?;
        Ok(Self {
            client,
            audience: audience.to_string(),
            namespace: ns.to_string(),
            service_account: name.to_string(),
            cache: Mutex::new(HashMap::new()),
        })
    }

    fn username(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.service_account
        )
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cached>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The node of an agent's token. A waypoint's token is refused here: it never speaks for
    /// a node (no node certificate, no other workload's certificate).
    pub async fn node_of(&self, token: &str) -> Result<String, ReviewError> {
        match self.caller_of(token).await? {
            Reviewed::Agent { node } => Ok(node),
            Reviewed::Waypoint {
                namespace,
                service_account,
                ..
            } => Err(ReviewError::WrongServiceAccount {
                got: format!("system:serviceaccount:{namespace}:{service_account}"),
                want: self.username(),
            }),
        }
    }

    /// Who the token belongs to: an agent, or a waypoint pod.
    pub async fn caller_of(&self, token: &str) -> Result<Reviewed, ReviewError> {
        let now = Instant::now();
        if let Some(c) = self.cache().get(token)
            && c.until > now
        {
            return c.result.clone();
        }
        let result = self.review(token).await;
        let ttl = match &result {
            Ok(_) => Some(ACCEPTED_TTL),
            Err(ReviewError::Unavailable(_)) => None,
            Err(_) => Some(REFUSED_TTL),
        };
        if let Some(ttl) = ttl {
            let mut cache = self.cache();
            if cache.len() >= MAX_CACHE {
                cache.retain(|_, c| c.until > now);
            }
            if cache.len() < MAX_CACHE {
                cache.insert(
                    token.to_string(),
                    Cached {
                        until: now + ttl,
                        result: result.clone(),
                    },
                );
            }
        }
        match &result {
            Ok(who) => tracing::debug!(?who, "service-account token accepted"),
            Err(e) => tracing::warn!(error = %e, "service-account token refused"),
        }
        result
    }

    async fn review(&self, token: &str) -> Result<Reviewed, ReviewError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                audiences: Some(vec![self.audience.clone()]),
                token: Some(token.to_string()),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answer = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| ReviewError::Unavailable(e.to_string()))?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status
                .error
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "not authenticated".into());
            return Err(ReviewError::Refused(why, self.audience.clone()));
        }
        if let Some(auds) = &status.audiences
            && !auds.contains(&self.audience)
        {
            return Err(ReviewError::Refused(
                format!("the token is for audiences {auds:?}"),
                self.audience.clone(),
            ));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let want = self.username();
        let extra = user.extra.unwrap_or_default();
        let first = |k: &str| {
            extra
                .get(k)
                .and_then(|v| v.first())
                .filter(|v| !v.is_empty())
                .cloned()
        };
        if username == want {
            if let Some(node) = first(EXTRA_NODE_NAME) {
                return Ok(Reviewed::Agent { node });
            }
            let pod = self
                .bound_pod(&self.namespace, first(EXTRA_POD_NAME), first(EXTRA_POD_UID))
                .await?;
            return Ok(Reviewed::Agent {
                node: scheduled_node(&pod, &self.namespace)?,
            });
        }
        // Another service account: only a waypoint pod's, bound to that pod.
        let wrong = || ReviewError::WrongServiceAccount {
            got: username.clone(),
            want: want.clone(),
        };
        let (ns, sa) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
            .ok_or_else(wrong)?;
        // Not provably a waypoint pod: refused as another service account (API errors stay
        // errors, so they are not cached).
        let pod = match self
            .bound_pod(ns, first(EXTRA_POD_NAME), first(EXTRA_POD_UID))
            .await
        {
            Ok(pod) => pod,
            Err(e @ ReviewError::Unavailable(_)) => return Err(e),
            Err(_) => return Err(wrong()),
        };
        let is_waypoint = pod
            .metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key(weft_api::labels::WAYPOINT));
        let runs_as = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.as_deref())
            .unwrap_or("default");
        if !is_waypoint || runs_as != sa {
            return Err(wrong());
        }
        Ok(Reviewed::Waypoint {
            node: scheduled_node(&pod, ns)?,
            namespace: ns.to_string(),
            service_account: sa.to_string(),
        })
    }

    /// The pod a token is bound to (pod-name and pod-uid extras), checked to be the same pod.
    async fn bound_pod(
        &self,
        namespace: &str,
        pod_name: Option<String>,
        uid: Option<String>,
    ) -> Result<Pod, ReviewError> {
        let pod_name =
            pod_name.ok_or_else(|| ReviewError::NotBound("no pod-name in the review".into()))?;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let pod = pods
            .get_opt(&pod_name)
            .await
            .map_err(|e| ReviewError::Unavailable(e.to_string()))?
            .ok_or_else(|| {
                ReviewError::NotBound(format!("its pod {namespace}/{pod_name} no longer exists"))
            })?;
        if let Some(uid) = uid
            && pod.metadata.uid.as_deref() != Some(uid.as_str())
        {
            return Err(ReviewError::NotBound(format!(
                "its pod {namespace}/{pod_name} was replaced (UID {uid} is gone)"
            )));
        }
        Ok(pod)
    }
}

/// The node a bound pod is scheduled on.
fn scheduled_node(pod: &Pod, namespace: &str) -> Result<String, ReviewError> {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            ReviewError::NotBound(format!(
                "its pod {namespace}/{} is not scheduled",
                pod.metadata.name.as_deref().unwrap_or("?")
            ))
        })
}
