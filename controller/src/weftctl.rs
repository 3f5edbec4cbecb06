//! `weftctl waypoint ...`: deploys, removes and lists waypoints (docs/weftctl.md). The objects
//! are built here as plain Kubernetes JSON, printed (`--dry-run`) or applied with server-side
//! apply (field manager `weftctl`, forced). Every function takes a [`kube::Client`], so the
//! tests drive them against the fake API server; `src/bin/weftctl.rs` only parses flags.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use weft_api::labels;

/// Field manager of every write.
pub const FIELD_MANAGER: &str = "weftctl";
/// `app.kubernetes.io/managed-by` value on every object weftctl creates.
pub const MANAGED_BY: &str = "weftctl";
/// `app.kubernetes.io/name` of waypoint objects.
pub const APP_NAME: &str = "weft-waypoint";
/// Default waypoint image: the release matching this weftctl.
pub const DEFAULT_IMAGE: &str = concat!(
    "ghcr.io/weft-mesh/weft-waypoint:",
    env!("CARGO_PKG_VERSION")
);
/// The controller's config stream and CA as the waypoint reaches them in a cluster (the
/// controller's `--listen` default port, 15010).
pub const CONTROLLER_URL: &str = "https://weft-controller.weft-system.svc:15010";
/// Audience of the waypoint's projected service-account token (what the controller's
/// TokenReview asks for).
pub const TOKEN_AUDIENCE: &str = "weft-controller";
/// Directory of the projected token volume.
pub const TOKEN_DIR: &str = "/var/run/secrets/weft";
/// The waypoint's projected service-account token.
pub const TOKEN_PATH: &str = "/var/run/secrets/weft/token";
/// Where the waypoint keeps its last good mesh view (an emptyDir: the root is read-only).
pub const STATE_DIR: &str = "/var/lib/weft-waypoint";
/// The ConfigMap (in `weft-system`, copied into the waypoint's namespace) holding the CA of
/// the controller's serving certificate under the key [`CONTROLLER_CA_KEY`].
pub const CONTROLLER_CA_CONFIGMAP: &str = "weft-controller-ca";
/// The key of the CA in [`CONTROLLER_CA_CONFIGMAP`].
pub const CONTROLLER_CA_KEY: &str = "ca.pem";
/// The namespace of the control plane.
pub const SYSTEM_NAMESPACE: &str = "weft-system";
/// Where the waypoint container finds the controller's CA.
pub const CONTROLLER_CA_DIR: &str = "/var/run/secrets/weft-ca";
/// Where the waypoint's config file (`--config`, ConfigMap `<name>-config`) is mounted.
pub const CONFIG_DIR: &str = "/etc/weft-waypoint";
/// Key (file name) of the config file in its ConfigMap.
pub const CONFIG_KEY: &str = "waypoint.yaml";
/// HBONE port of waypoint pods and of the waypoint Service.
pub const HBONE_PORT: u16 = 15008;
/// Metrics (and readiness) port of waypoint pods.
pub const METRICS_PORT: u16 = 15090;
/// Most replicas `--replicas` accepts.
pub const MAX_REPLICAS: u32 = 100;
/// How long a waypoint pod goes on serving after SIGTERM while not ready
/// (`--shutdown-delay-seconds`): the time the node agents take to learn, through the
/// controller, that the pod is leaving the Service's endpoints.
pub const SHUTDOWN_DELAY_SECONDS: u64 = 5;
/// How long a waypoint pod's open connections may then take to finish (`--drain-seconds`).
pub const DRAIN_SECONDS: u64 = 10;
/// The pod's `terminationGracePeriodSeconds`: the delay, the drain, at most 5 s for the last
/// spans to be exported and 5 s to spare, so the kubelet never kills a draining waypoint.
pub const TERMINATION_GRACE_SECONDS: u64 = SHUTDOWN_DELAY_SECONDS + DRAIN_SECONDS + 10;

const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
const NAME_LABEL: &str = "app.kubernetes.io/name";

/// Why a weftctl command failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error(
        "`{0}` is not a valid {1} name: use lowercase letters, digits and `-` (at most 63, starting and ending with a letter or digit)"
    )]
    BadName(String, &'static str),
    #[error("`--for {0}`: expected `namespace`, `service:<name>` (a valid Service name) or `none`")]
    BadFor(String),
    #[error("--replicas {0}: expected 1 to {MAX_REPLICAS}")]
    BadReplicas(u32),
    #[error("--image `{0}`: expected an image reference without spaces, e.g. {DEFAULT_IMAGE}")]
    BadImage(String),
    #[error(
        "--config {path}: {reason}; give the waypoint's YAML config (listeners, routes, backends: docs/waypoint.md)"
    )]
    BadConfig { path: String, reason: String },
    #[error("-o {0}: expected `yaml` or `json`")]
    BadFormat(String),
    #[error("namespace {0} does not exist: create it (kubectl create namespace {0}) or check -n")]
    NoNamespace(String),
    #[error(
        "ConfigMap {SYSTEM_NAMESPACE}/{CONTROLLER_CA_CONFIGMAP} with key {CONTROLLER_CA_KEY} (the CA of the controller's serving certificate) does not exist: create it (kubectl -n {SYSTEM_NAMESPACE} create configmap {CONTROLLER_CA_CONFIGMAP} --from-file={CONTROLLER_CA_KEY}=<the controller's ca.pem>); waypoints verify the controller with it"
    )]
    NoControllerCa,
    #[error(
        "service {namespace}/{name} does not exist: check `--for service:<name>` (kubectl -n {namespace} get services)"
    )]
    NoService { namespace: String, name: String },
    #[error(
        "service {namespace}/{name} is a waypoint's own Service and cannot be bound to a waypoint: name an application Service in `--for service:<name>`"
    )]
    WaypointService { namespace: String, name: String },
    #[error("reading kubeconfig {path}: {source}: check --kubeconfig and --context")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no Kubernetes configuration ({0}): set KUBECONFIG or --kubeconfig (and --context), or use --dry-run to print the objects"
    )]
    NoConfig(String),
    #[error(
        "cannot reach the Kubernetes API ({0}): check KUBECONFIG / --kubeconfig, or use --dry-run to print the objects"
    )]
    Unreachable(String),
    #[error("the Kubernetes API refused to {action}: {message} (HTTP {code}){hint}")]
    Refused {
        action: String,
        code: u16,
        message: String,
        hint: &'static str,
    },
    #[error("rendering the objects: {0}")]
    Render(String),
}

/// Maps a kube error of `action` to an unreachable API or a refusal (with a hint for the
/// usual causes).
fn api_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> CtlError {
    move |e| match e {
        kube::Error::Api(status) => CtlError::Refused {
            action: action.into(),
            code: status.code,
            hint: match status.code {
                401 => {
                    ": the kubeconfig's credentials were rejected; log in again or check --context"
                }
                403 => {
                    ": your user lacks RBAC permission for this (docs/weftctl.md lists what weftctl needs)"
                }
                _ => "",
            },
            message: status.message.clone(),
        },
        other => unreachable_err(&other),
    }
}

/// The error and its causes on one line (`client error (Connect): tcp connect error: Connection
/// refused`), for [`CtlError::Unreachable`].
fn unreachable_err(e: &(dyn std::error::Error + 'static)) -> CtlError {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    CtlError::Unreachable(text)
}

/// The kube client configuration: `kubeconfig` (with `context`) when given; otherwise
/// `$KUBECONFIG` or `~/.kube/config` (with `context`), and with neither file nor `context`
/// the in-cluster service account.
pub async fn config(
    kubeconfig: Option<&Path>,
    context: Option<&str>,
) -> Result<kube::Config, CtlError> {
    let options = KubeConfigOptions {
        context: context.map(String::from),
        ..Default::default()
    };
    if let Some(path) = kubeconfig {
        let kc = Kubeconfig::read_from(path).map_err(|source| CtlError::Kubeconfig {
            path: path.to_path_buf(),
            source,
        })?;
        return kube::Config::from_custom_kubeconfig(kc, &options)
            .await
            .map_err(|source| CtlError::Kubeconfig {
                path: path.to_path_buf(),
                source,
            });
    }
    match kube::Config::from_kubeconfig(&options).await {
        Ok(c) => Ok(c),
        Err(e) if context.is_some() => Err(CtlError::NoConfig(e.to_string())),
        Err(kubeconfig) => kube::Config::incluster().map_err(|incluster| {
            CtlError::NoConfig(format!("kubeconfig: {kubeconfig}; in-cluster: {incluster}"))
        }),
    }
}

/// A client for [`config`].
pub async fn client(kubeconfig: Option<&Path>, context: Option<&str>) -> Result<Client, CtlError> {
    let config = config(kubeconfig, context).await?;
    tracing::debug!(server = %config.cluster_url, namespace = %config.default_namespace, "kube config");
    Client::try_from(config).map_err(|e| unreachable_err(&e))
}

/// What a waypoint serves: every Service of its namespace, one Service, or nothing yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Binding {
    Namespace,
    Service(String),
    None,
}

impl std::str::FromStr for Binding {
    type Err = CtlError;

    fn from_str(s: &str) -> Result<Self, CtlError> {
        match s {
            "namespace" => Ok(Self::Namespace),
            "none" => Ok(Self::None),
            _ => match s.strip_prefix("service:") {
                Some(name) if dns_label(name) => Ok(Self::Service(name.to_string())),
                _ => Err(CtlError::BadFor(s.to_string())),
            },
        }
    }
}

/// How `--dry-run` prints the objects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    /// A multi-document YAML stream.
    #[default]
    Yaml,
    /// A `v1` `List`.
    Json,
}

impl std::str::FromStr for Format {
    type Err = CtlError;

    fn from_str(s: &str) -> Result<Self, CtlError> {
        match s {
            "yaml" => Ok(Self::Yaml),
            "json" => Ok(Self::Json),
            _ => Err(CtlError::BadFormat(s.to_string())),
        }
    }
}

/// Whether `s` is a DNS-1123 label (namespace, Service and waypoint names).
pub fn dns_label(s: &str) -> bool {
    weft_api::labels::is_dns_label(s)
}

/// Refuses `name` unless it is a DNS label.
pub fn check_name(name: &str, what: &'static str) -> Result<(), CtlError> {
    if dns_label(name) {
        Ok(())
    } else {
        Err(CtlError::BadName(name.to_string(), what))
    }
}

/// A waypoint to deploy.
#[derive(Clone, Debug)]
pub struct Waypoint {
    pub namespace: String,
    pub name: String,
    pub image: String,
    pub replicas: u32,
    pub binding: Binding,
    /// The waypoint's config file (YAML), shipped as ConfigMap `<name>-config`: retries,
    /// timeouts, faults, rate limits, circuit breakers for the Services it serves.
    pub config: Option<String>,
}

impl Waypoint {
    /// A waypoint with the defaults of `weftctl waypoint deploy`.
    pub fn new(namespace: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            name: "waypoint".into(),
            image: DEFAULT_IMAGE.into(),
            replicas: 1,
            binding: Binding::Namespace,
            config: None,
        }
    }

    /// The ConfigMap holding the config file.
    pub fn config_map_name(&self) -> String {
        format!("{}-config", self.name)
    }

    /// Reads the config file at `path` for [`Waypoint::config`], refusing what is not YAML
    /// (the waypoint checks the rest when it loads it; `weft-waypoint --check --config FILE
    /// --controller URL` checks it all before deploying).
    pub fn read_config(path: &Path) -> Result<String, CtlError> {
        let bad = |reason: String| CtlError::BadConfig {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        serde_yaml::from_str::<serde_yaml::Value>(&text).map_err(|e| bad(e.to_string()))?;
        if text.len() > 900 * 1024 {
            return Err(bad(format!(
                "{} bytes is more than a ConfigMap holds (1 MiB)",
                text.len()
            )));
        }
        Ok(text)
    }

    /// Checks names, replicas and image before any request.
    pub fn validate(&self) -> Result<(), CtlError> {
        check_name(&self.namespace, "namespace")?;
        check_name(&self.name, "waypoint")?;
        if let Binding::Service(s) = &self.binding {
            check_name(s, "service")?;
        }
        if !(1..=MAX_REPLICAS).contains(&self.replicas) {
            return Err(CtlError::BadReplicas(self.replicas));
        }
        if self.image.is_empty() || self.image.contains(char::is_whitespace) {
            return Err(CtlError::BadImage(self.image.clone()));
        }
        Ok(())
    }

    fn labels(&self) -> Value {
        json!({
            labels::WAYPOINT: self.name,
            NAME_LABEL: APP_NAME,
            MANAGED_BY_LABEL: MANAGED_BY,
        })
    }

    /// The ServiceAccount, Deployment, PodDisruptionBudget and Service of the waypoint, in that
    /// order, after its config ConfigMap when it has a config file.
    pub fn objects(&self) -> Vec<Value> {
        let meta = json!({"name": self.name, "namespace": self.namespace, "labels": self.labels()});
        let service_account = json!({
            "apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta,
        });
        let mut container = json!({
            "name": "waypoint",
            "image": self.image,
            "args": [
                "--controller", CONTROLLER_URL,
                "--namespace", "$(POD_NAMESPACE)",
                "--service-account", self.name,
                "--node", "$(NODE_NAME)",
                "--service-account-token-file", TOKEN_PATH,
                "--controller-ca", format!("{CONTROLLER_CA_DIR}/{CONTROLLER_CA_KEY}"),
                "--metrics-address", format!("0.0.0.0:{METRICS_PORT}"),
                "--state-dir", STATE_DIR,
                "--shutdown-delay-seconds", SHUTDOWN_DELAY_SECONDS.to_string(),
                "--drain-seconds", DRAIN_SECONDS.to_string(),
            ],
            "env": [
                {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            ],
            "ports": [
                {"name": "hbone", "containerPort": HBONE_PORT, "protocol": "TCP"},
                {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
            ],
            // Ready once the waypoint has its certificate and the mesh view; not ready from
            // SIGTERM on.
            "readinessProbe": {
                "httpGet": {"path": "/ready", "port": METRICS_PORT},
                "periodSeconds": 2,
            },
            "resources": {
                "requests": {"cpu": "50m", "memory": "32Mi"},
                "limits": {"cpu": "1", "memory": "128Mi"},
            },
            "securityContext": {
                "runAsNonRoot": true,
                "runAsUser": 65532,
                "readOnlyRootFilesystem": true,
                "allowPrivilegeEscalation": false,
                "capabilities": {"drop": ["ALL"]},
            },
            "volumeMounts": [
                {"name": "weft-token", "mountPath": TOKEN_DIR, "readOnly": true},
                {"name": "controller-ca", "mountPath": CONTROLLER_CA_DIR, "readOnly": true},
                {"name": "state", "mountPath": STATE_DIR},
            ],
        });
        let mut volumes = vec![
            json!({
                "name": "weft-token",
                "projected": {"sources": [{"serviceAccountToken": {
                    "audience": TOKEN_AUDIENCE,
                    "expirationSeconds": 3600,
                    "path": "token",
                }}]},
            }),
            json!({"name": "controller-ca", "configMap": {"name": CONTROLLER_CA_CONFIGMAP}}),
            json!({"name": "state", "emptyDir": {}}),
        ];
        let mut objects = Vec::new();
        if let Some(config) = &self.config {
            objects.push(json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": self.config_map_name(), "namespace": self.namespace,
                             "labels": self.labels()},
                "data": {CONFIG_KEY: config},
            }));
            // Changes reach the mounted file in place; the waypoint reloads it (no restart).
            if let Some(args) = container["args"].as_array_mut() {
                args.push(json!("--config"));
                args.push(json!(format!("{CONFIG_DIR}/{CONFIG_KEY}")));
            }
            if let Some(mounts) = container["volumeMounts"].as_array_mut() {
                mounts.push(json!({"name": "config", "mountPath": CONFIG_DIR, "readOnly": true}));
            }
            volumes.push(json!({"name": "config", "configMap": {"name": self.config_map_name()}}));
        }
        let selector = json!({"matchLabels": {labels::WAYPOINT: self.name}});
        let deployment = json!({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
            "spec": {
                "replicas": self.replicas,
                "selector": selector,
                // A rollout starts a new pod and waits for it to be ready before stopping an
                // old one: the waypoint's capacity never drops.
                "strategy": {
                    "type": "RollingUpdate",
                    "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
                },
                "template": {
                    "metadata": {
                        "labels": self.labels(),
                        "annotations": {
                            "prometheus.io/scrape": "true",
                            "prometheus.io/port": METRICS_PORT.to_string(),
                            "prometheus.io/path": "/metrics",
                        },
                    },
                    "spec": {
                        "serviceAccountName": self.name,
                        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
                        // Replicas on different nodes where the cluster allows it: one node
                        // going down does not take the whole waypoint with it.
                        "topologySpreadConstraints": [{
                            "maxSkew": 1,
                            "topologyKey": "kubernetes.io/hostname",
                            "whenUnsatisfiable": "ScheduleAnyway",
                            "labelSelector": selector,
                        }],
                        "containers": [container],
                        "volumes": volumes,
                    },
                },
            },
        });
        // Voluntary disruptions (node drains) take one replica at a time; with one replica
        // the drain still proceeds (never blocked).
        let disruption_budget = json!({
            "apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": meta,
            "spec": {"maxUnavailable": 1, "selector": selector},
        });
        let service = json!({
            "apiVersion": "v1", "kind": "Service", "metadata": meta,
            "spec": {
                "selector": {labels::WAYPOINT: self.name},
                "ports": [{
                    "name": "hbone",
                    "port": HBONE_PORT,
                    "targetPort": HBONE_PORT,
                    "protocol": "TCP",
                    "appProtocol": "weft.dev/hbone",
                }],
            },
        });
        objects.extend([service_account, deployment, disruption_budget, service]);
        objects
    }

    /// The objects as `format` would print them: a multi-document YAML stream, or a `v1`
    /// `List` in JSON. The binding is not an object: see [`Waypoint::binding_command`].
    pub fn render(&self, format: Format) -> Result<String, CtlError> {
        match format {
            Format::Yaml => {
                let mut out = String::new();
                for o in self.objects() {
                    out.push_str("---\n");
                    out.push_str(
                        &serde_yaml::to_string(&o).map_err(|e| CtlError::Render(e.to_string()))?,
                    );
                }
                Ok(out)
            }
            Format::Json => {
                let list = json!({"apiVersion": "v1", "kind": "List", "items": self.objects()});
                serde_json::to_string_pretty(&list)
                    .map(|s| s + "\n")
                    .map_err(|e| CtlError::Render(e.to_string()))
            }
        }
    }

    /// The `kubectl` command that makes the binding `deploy` would set, if any.
    pub fn binding_command(&self) -> Option<String> {
        let label = format!("{}={}", labels::USE_WAYPOINT, self.name);
        match &self.binding {
            Binding::Namespace => Some(format!(
                "kubectl label --overwrite namespace {} {label}",
                self.namespace
            )),
            Binding::Service(s) => Some(format!(
                "kubectl -n {} label --overwrite service {s} {label}",
                self.namespace
            )),
            Binding::None => None,
        }
    }
}

/// What `deploy` found on the way, for warnings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Deployed {
    /// Whether the namespace is labelled `weft.dev/mesh=enabled` (the waypoint only receives
    /// traffic from meshed namespaces).
    pub meshed: bool,
    /// The `weft.dev/use-waypoint` value the bound namespace or Service had before, when it
    /// named something else (another waypoint, or `none`).
    pub rebound_from: Option<String>,
}

fn use_waypoint(l: &BTreeMap<String, String>) -> Option<&str> {
    l.get(labels::USE_WAYPOINT).map(String::as_str)
}

fn managed(l: &BTreeMap<String, String>) -> bool {
    l.get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY)
}

/// Creates or updates the waypoint's objects (server-side apply, forced, field manager
/// `weftctl`) and its binding. Fails before any write when the namespace (or the Service of
/// `--for service:<svc>`) does not exist.
pub async fn deploy(client: &Client, w: &Waypoint) -> Result<Deployed, CtlError> {
    w.validate()?;
    let ns_name = &w.namespace;
    let ns = Api::<Namespace>::all(client.clone())
        .get_opt(ns_name)
        .await
        .map_err(api_err(format!("get namespace {ns_name}")))?
        .ok_or_else(|| CtlError::NoNamespace(ns_name.clone()))?;
    let mut out = Deployed {
        meshed: ns.labels().get(labels::MESH).map(String::as_str) == Some(labels::MESH_ENABLED),
        rebound_from: None,
    };
    let services = Api::<Service>::namespaced(client.clone(), ns_name);
    let previous = match &w.binding {
        Binding::Namespace => use_waypoint(ns.labels()).map(String::from),
        Binding::Service(s) => {
            let svc = services
                .get_opt(s)
                .await
                .map_err(api_err(format!("get service {ns_name}/{s}")))?
                .ok_or_else(|| CtlError::NoService {
                    namespace: ns_name.clone(),
                    name: s.clone(),
                })?;
            if svc.labels().contains_key(labels::WAYPOINT) || s == &w.name {
                return Err(CtlError::WaypointService {
                    namespace: ns_name.clone(),
                    name: s.clone(),
                });
            }
            use_waypoint(svc.labels()).map(String::from)
        }
        Binding::None => None,
    };
    out.rebound_from = previous.filter(|p| p != &w.name);

    // The controller's CA, copied next to the waypoint (a pod mounts ConfigMaps of its own
    // namespace only).
    let ca = Api::<ConfigMap>::namespaced(client.clone(), SYSTEM_NAMESPACE)
        .get_opt(CONTROLLER_CA_CONFIGMAP)
        .await
        .map_err(api_err(format!(
            "get configmap {SYSTEM_NAMESPACE}/{CONTROLLER_CA_CONFIGMAP}"
        )))?
        .and_then(|c| c.data.and_then(|mut d| d.remove(CONTROLLER_CA_KEY)))
        .filter(|pem| pem.contains("BEGIN CERTIFICATE"))
        .ok_or(CtlError::NoControllerCa)?;
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let copy = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": CONTROLLER_CA_CONFIGMAP, "namespace": ns_name,
                     "labels": {MANAGED_BY_LABEL: MANAGED_BY}},
        "data": {CONTROLLER_CA_KEY: ca},
    });
    Api::<ConfigMap>::namespaced(client.clone(), ns_name)
        .patch(CONTROLLER_CA_CONFIGMAP, &pp, &Patch::Apply(copy))
        .await
        .map_err(api_err(format!(
            "apply configmap {ns_name}/{CONTROLLER_CA_CONFIGMAP}"
        )))?;
    for obj in w.objects() {
        let kind = obj["kind"].as_str().unwrap_or_default().to_string();
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or(&w.name)
            .to_string();
        let action = format!("apply {kind} {ns_name}/{name}");
        tracing::debug!("{action}");
        let patch = Patch::Apply(obj);
        match kind.as_str() {
            "ConfigMap" => {
                Api::<ConfigMap>::namespaced(client.clone(), ns_name)
                    .patch(&name, &pp, &patch)
                    .await
                    .map_err(api_err(action))?;
            }
            "ServiceAccount" => {
                Api::<ServiceAccount>::namespaced(client.clone(), ns_name)
                    .patch(&w.name, &pp, &patch)
                    .await
                    .map_err(api_err(action))?;
            }
            "Deployment" => {
                Api::<Deployment>::namespaced(client.clone(), ns_name)
                    .patch(&w.name, &pp, &patch)
                    .await
                    .map_err(api_err(action))?;
            }
            "PodDisruptionBudget" => {
                Api::<PodDisruptionBudget>::namespaced(client.clone(), ns_name)
                    .patch(&w.name, &pp, &patch)
                    .await
                    .map_err(api_err(action))?;
            }
            _ => {
                services
                    .patch(&w.name, &pp, &patch)
                    .await
                    .map_err(api_err(action))?;
            }
        }
    }

    let label = Patch::Merge(json!({"metadata": {"labels": {labels::USE_WAYPOINT: w.name}}}));
    let pp = PatchParams::default();
    match &w.binding {
        Binding::Namespace => {
            tracing::debug!("label namespace {ns_name}");
            Api::<Namespace>::all(client.clone())
                .patch(ns_name, &pp, &label)
                .await
                .map_err(api_err(format!("label namespace {ns_name}")))?;
        }
        Binding::Service(s) => {
            tracing::debug!("label service {ns_name}/{s}");
            services
                .patch(s, &pp, &label)
                .await
                .map_err(api_err(format!("label service {ns_name}/{s}")))?;
        }
        Binding::None => {}
    }
    Ok(out)
}

/// What `delete` did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Deleted {
    /// What was deleted or unlabelled, e.g. `deployment shop/waypoint`.
    pub removed: Vec<String>,
    /// Objects of the waypoint's name left alone because weftctl did not create them.
    pub kept: Vec<String>,
}

/// Removes the waypoint's Deployment, PodDisruptionBudget, Service, ServiceAccount and config
/// ConfigMap (only those labelled `app.kubernetes.io/managed-by: weftctl`) and every binding to
/// it in its namespace: the namespace label and the Service labels naming it (JSON merge patch
/// to null).
pub async fn delete(client: &Client, namespace: &str, name: &str) -> Result<Deleted, CtlError> {
    check_name(namespace, "namespace")?;
    check_name(name, "waypoint")?;
    let mut out = Deleted::default();
    let dp = DeleteParams::default();

    macro_rules! delete_managed {
        ($ty:ty, $what:literal, $name:expr) => {{
            let name: &str = $name;
            let api = Api::<$ty>::namespaced(client.clone(), namespace);
            let what = format!(concat!($what, " {}/{}"), namespace, name);
            if let Some(o) = api
                .get_opt(name)
                .await
                .map_err(api_err(format!("get {what}")))?
            {
                if managed(o.labels()) {
                    tracing::debug!("delete {what}");
                    api.delete(name, &dp)
                        .await
                        .map_err(api_err(format!("delete {what}")))?;
                    out.removed.push(what);
                } else {
                    out.kept.push(what);
                }
            }
        }};
    }
    delete_managed!(Deployment, "deployment", name);
    delete_managed!(PodDisruptionBudget, "poddisruptionbudget", name);
    delete_managed!(Service, "service", name);
    delete_managed!(ServiceAccount, "serviceaccount", name);
    delete_managed!(ConfigMap, "configmap", &format!("{name}-config"));

    let unlabel = Patch::Merge(json!({"metadata": {"labels": {labels::USE_WAYPOINT: null}}}));
    let pp = PatchParams::default();
    let namespaces = Api::<Namespace>::all(client.clone());
    if let Some(ns) = namespaces
        .get_opt(namespace)
        .await
        .map_err(api_err(format!("get namespace {namespace}")))?
        && use_waypoint(ns.labels()) == Some(name)
    {
        namespaces
            .patch(namespace, &pp, &unlabel)
            .await
            .map_err(api_err(format!("unlabel namespace {namespace}")))?;
        out.removed.push(format!(
            "label {} from namespace {namespace}",
            labels::USE_WAYPOINT
        ));
    }
    let services = Api::<Service>::namespaced(client.clone(), namespace);
    let selector = format!("{}={name}", labels::USE_WAYPOINT);
    for s in services
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(api_err(format!("list services of {namespace}")))?
    {
        let svc = s.name_any();
        services
            .patch(&svc, &pp, &unlabel)
            .await
            .map_err(api_err(format!("unlabel service {namespace}/{svc}")))?;
        out.removed.push(format!(
            "label {} from service {namespace}/{svc}",
            labels::USE_WAYPOINT
        ));
    }
    Ok(out)
}

/// One row of `weftctl waypoint list`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    pub namespace: String,
    pub name: String,
    pub ready: i32,
    pub desired: i32,
    /// `namespace` (with `(except a,b)` for Services labelled otherwise), the Services bound
    /// to it, or `-`.
    pub bound: String,
}

/// The waypoints (Deployments labelled `weft.dev/waypoint`) of `namespace`, or of every
/// namespace, sorted by namespace and name.
pub async fn list(client: &Client, namespace: Option<&str>) -> Result<Vec<Listed>, CtlError> {
    if let Some(ns) = namespace {
        check_name(ns, "namespace")?;
    }
    let lp = ListParams::default();
    let (deployments, services) = match namespace {
        Some(ns) => (
            Api::<Deployment>::namespaced(client.clone(), ns),
            Api::<Service>::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let deployments = deployments
        .list(&lp.clone().labels(labels::WAYPOINT))
        .await
        .map_err(api_err("list waypoint deployments"))?;
    if deployments.items.is_empty() {
        return Ok(Vec::new());
    }
    let services = services.list(&lp).await.map_err(api_err("list services"))?;
    let namespaces = Api::<Namespace>::all(client.clone());
    let mut ns_binding: BTreeMap<String, Option<String>> = BTreeMap::new();
    let mut rows = Vec::new();
    for d in deployments {
        let ns = d.namespace().unwrap_or_default();
        let name = d
            .labels()
            .get(labels::WAYPOINT)
            .cloned()
            .unwrap_or_else(|| d.name_any());
        if !ns_binding.contains_key(&ns) {
            let bound = namespaces
                .get_opt(&ns)
                .await
                .map_err(api_err(format!("get namespace {ns}")))?
                .and_then(|n| use_waypoint(n.labels()).map(String::from));
            ns_binding.insert(ns.clone(), bound);
        }
        let app_services = services
            .iter()
            .filter(|s| s.namespace().as_deref() == Some(ns.as_str()))
            .filter(|s| !s.labels().contains_key(labels::WAYPOINT));
        let bound = if ns_binding.get(&ns).and_then(Option::as_deref) == Some(name.as_str()) {
            let except: Vec<String> = app_services
                .filter(|s| use_waypoint(s.labels()).is_some_and(|v| v != name))
                .map(|s| s.name_any())
                .collect();
            if except.is_empty() {
                "namespace".to_string()
            } else {
                format!("namespace (except {})", except.join(","))
            }
        } else {
            let bound: Vec<String> = app_services
                .filter(|s| use_waypoint(s.labels()) == Some(name.as_str()))
                .map(|s| s.name_any())
                .collect();
            if bound.is_empty() {
                "-".to_string()
            } else {
                bound.join(",")
            }
        };
        rows.push(Listed {
            namespace: ns,
            name,
            ready: d
                .status
                .as_ref()
                .and_then(|s| s.ready_replicas)
                .unwrap_or(0),
            desired: d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
            bound,
        });
    }
    rows.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Ok(rows)
}

/// `rows` as the table `weftctl waypoint list` prints (a header line, then one per row).
pub fn table(rows: &[Listed]) -> String {
    let w_ns = rows
        .iter()
        .map(|r| r.namespace.len())
        .chain([9])
        .max()
        .unwrap_or(9);
    let w_name = rows
        .iter()
        .map(|r| r.name.len())
        .chain([4])
        .max()
        .unwrap_or(4);
    let mut out = format!(
        "{:<w_ns$}  {:<w_name$}  {:<7}  BOUND\n",
        "NAMESPACE", "NAME", "READY"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<w_ns$}  {:<w_name$}  {:<7}  {}\n",
            r.namespace,
            r.name,
            format!("{}/{}", r.ready, r.desired),
            r.bound
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wp(binding: Binding) -> Waypoint {
        Waypoint {
            replicas: 2,
            binding,
            ..Waypoint::new("shop")
        }
    }

    #[test]
    fn a_config_file_ships_as_a_configmap_mounted_and_passed() {
        assert_eq!(
            wp(Binding::Namespace).objects().len(),
            4,
            "no config: no ConfigMap"
        );
        let w = Waypoint {
            config: Some("listeners: []\n".into()),
            ..wp(Binding::Namespace)
        };
        let objs = w.objects();
        assert_eq!(objs.len(), 5);
        assert_eq!(objs[0]["kind"], "ConfigMap");
        assert_eq!(objs[0]["metadata"]["name"], "waypoint-config");
        assert_eq!(objs[0]["data"][CONFIG_KEY], "listeners: []\n");
        let pod = &objs[2]["spec"]["template"]["spec"];
        let args: Vec<&str> = pod["containers"][0]["args"]
            .as_array()
            .expect("args")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let at = args
            .iter()
            .position(|a| *a == "--config")
            .expect("--config");
        assert_eq!(args[at + 1], format!("{CONFIG_DIR}/{CONFIG_KEY}"));
        assert!(
            pod["volumes"]
                .as_array()
                .expect("volumes")
                .iter()
                .any(|v| v["configMap"]["name"] == "waypoint-config")
        );
        assert!(
            pod["containers"][0]["volumeMounts"]
                .as_array()
                .expect("mounts")
                .iter()
                .any(|m| m["mountPath"] == CONFIG_DIR)
        );
    }

    #[test]
    fn config_files_that_are_not_yaml_are_refused_naming_the_file() {
        let dir = std::env::temp_dir().join(format!("weftctl-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let good = dir.join("good.yaml");
        std::fs::write(&good, "listeners: []\n").expect("write");
        assert_eq!(
            Waypoint::read_config(&good).expect("yaml"),
            "listeners: []\n"
        );
        let bad = dir.join("bad.yaml");
        std::fs::write(&bad, "listeners: [").expect("write");
        let e = Waypoint::read_config(&bad)
            .expect_err("not yaml")
            .to_string();
        assert!(
            e.contains("bad.yaml") && e.contains("docs/waypoint.md"),
            "{e}"
        );
        let e = Waypoint::read_config(&dir.join("missing.yaml"))
            .expect_err("missing")
            .to_string();
        assert!(e.contains("missing.yaml"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn objects_carry_the_waypoint_label_selector_and_port() {
        let objs = wp(Binding::Namespace).objects();
        let kinds: Vec<&str> = objs.iter().filter_map(|o| o["kind"].as_str()).collect();
        assert_eq!(
            kinds,
            [
                "ServiceAccount",
                "Deployment",
                "PodDisruptionBudget",
                "Service"
            ]
        );
        let d = &objs[1];
        assert_eq!(
            d["spec"]["template"]["metadata"]["labels"]["weft.dev/waypoint"],
            "waypoint"
        );
        assert_eq!(d["spec"]["replicas"], 2);
        let args = d["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_array()
            .expect("args");
        assert!(args.iter().any(|a| a == "--service-account"));
        let s = &objs[3];
        assert_eq!(s["metadata"]["labels"]["weft.dev/waypoint"], "waypoint");
        assert_eq!(s["spec"]["selector"]["weft.dev/waypoint"], "waypoint");
        assert_eq!(s["spec"]["ports"][0]["port"], 15008);
    }

    #[test]
    fn pods_leave_without_failing_requests_and_spread_over_nodes() {
        let objs = wp(Binding::Namespace).objects();
        let d = &objs[1];
        let pod = &d["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        // Ready only with certificate and mesh view; still serving for 5 s after SIGTERM,
        // then 10 s of drain, all within the grace period.
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/ready");
        let args: Vec<&str> = c["args"]
            .as_array()
            .expect("args")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(
            args.windows(2)
                .any(|w| w == ["--shutdown-delay-seconds", "5"])
        );
        assert!(args.windows(2).any(|w| w == ["--drain-seconds", "10"]));
        assert_eq!(pod["terminationGracePeriodSeconds"], 25);
        // A rollout never lowers the ready replicas.
        assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
        let spread = &pod["topologySpreadConstraints"][0];
        assert_eq!(spread["topologyKey"], "kubernetes.io/hostname");
        assert_eq!(spread["whenUnsatisfiable"], "ScheduleAnyway");
        assert_eq!(spread["labelSelector"], d["spec"]["selector"]);
        let annotations = &d["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(annotations["prometheus.io/port"], "15090");
        // One replica at a time in a node drain.
        let pdb = &objs[2];
        assert_eq!(pdb["spec"]["maxUnavailable"], 1);
        assert_eq!(pdb["spec"]["selector"], d["spec"]["selector"]);
        assert_eq!(
            pdb["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "weftctl"
        );
    }

    #[test]
    fn names_bindings_and_formats_are_checked() {
        assert!(matches!(
            "service:web".parse::<Binding>(),
            Ok(Binding::Service(s)) if s == "web"
        ));
        assert!("svc:web".parse::<Binding>().is_err());
        assert!("service:Web".parse::<Binding>().is_err());
        assert!("xml".parse::<Format>().is_err());
        let mut w = wp(Binding::None);
        w.name = "Bad_Name".into();
        assert!(matches!(
            w.validate(),
            Err(CtlError::BadName(_, "waypoint"))
        ));
        let mut w = wp(Binding::None);
        w.replicas = 0;
        assert!(matches!(w.validate(), Err(CtlError::BadReplicas(0))));
        assert_eq!(
            wp(Binding::Namespace).binding_command().as_deref(),
            Some("kubectl label --overwrite namespace shop weft.dev/use-waypoint=waypoint")
        );
        assert_eq!(wp(Binding::None).binding_command(), None);
    }
}
