//! `weftctl waypoint ...`: deploys, removes and lists waypoints (docs/weftctl.md). The objects
//! are built here as plain Kubernetes JSON, printed (`--dry-run`) or applied with server-side
//! apply (field manager `weftctl`).

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Service, ServiceAccount};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use weft_api::labels;

/// Field manager of every write.
pub const FIELD_MANAGER: &str = "weftctl";
/// `app.kubernetes.io/managed-by` value on every object weftctl creates.
pub const MANAGED_BY: &str = "weftctl";
/// The controller's config stream and CA, as the waypoint reaches them in a cluster.
pub const CONTROLLER_URL: &str = "https://weft-controller.weft-system.svc:15010";
/// Where the waypoint's projected service-account token is mounted.
pub const TOKEN_PATH: &str = "/var/run/secrets/weft/token";

/// Why a weftctl command failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("`{0}` is not a valid {1} name (lowercase letters, digits and `-`, at most 63)")]
    BadName(String, &'static str),
    #[error(
        "`--for {0}`: expected `namespace`, `service:<name>` or `none` (what the waypoint serves)"
    )]
    BadFor(String),
    #[error("namespace {0} does not exist (create it, or check -n)")]
    NoNamespace(String),
    #[error("service {namespace}/{name} does not exist (check --for service:<name>)")]
    NoService { namespace: String, name: String },
    #[error(
        "cannot reach the Kubernetes API ({0}): check KUBECONFIG / --kubeconfig, or use --dry-run to print the objects"
    )]
    Api(#[from] kube::Error),
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

/// A waypoint to deploy.
#[derive(Clone, Debug)]
pub struct Waypoint {
    pub namespace: String,
    pub name: String,
    pub image: String,
    pub replicas: u32,
    pub binding: Binding,
}

/// Whether `s` is a DNS-1123 label (namespace, Service and waypoint names).
pub fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

impl Waypoint {
    /// Checks the names before any request.
    pub fn validate(&self) -> Result<(), CtlError> {
        if !dns_label(&self.namespace) {
            return Err(CtlError::BadName(self.namespace.clone(), "namespace"));
        }
        if !dns_label(&self.name) {
            return Err(CtlError::BadName(self.name.clone(), "waypoint"));
        }
        Ok(())
    }

    fn labels(&self) -> Value {
        json!({
            labels::WAYPOINT: self.name,
            "app.kubernetes.io/name": "weft-waypoint",
            "app.kubernetes.io/managed-by": MANAGED_BY,
        })
    }

    /// The ServiceAccount, Deployment and Service of the waypoint.
    pub fn objects(&self) -> Vec<Value> {
        let meta = json!({"name": self.name, "namespace": self.namespace, "labels": self.labels()});
        let service_account = json!({
            "apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta,
        });
        let container = json!({
            "name": "waypoint",
            "image": self.image,
            "args": [
                "--controller", CONTROLLER_URL,
                "--namespace", "$(POD_NAMESPACE)",
                "--service-account", self.name,
                "--node", "$(NODE_NAME)",
                "--token-file", TOKEN_PATH,
                "--metrics-address", "0.0.0.0:15090",
            ],
            "env": [
                {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            ],
            "ports": [
                {"name": "hbone", "containerPort": 15008, "protocol": "TCP"},
                {"name": "metrics", "containerPort": 15090, "protocol": "TCP"},
            ],
            "readinessProbe": {"httpGet": {"path": "/metrics", "port": 15090}, "periodSeconds": 5},
            "resources": {
                "requests": {"cpu": "50m", "memory": "32Mi"},
                "limits": {"cpu": "1", "memory": "128Mi"},
            },
            "securityContext": {
                "runAsNonRoot": true, "runAsUser": 65532, "readOnlyRootFilesystem": true,
                "allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]},
            },
            "volumeMounts": [{"name": "weft-token", "mountPath": "/var/run/secrets/weft", "readOnly": true}],
        });
        let deployment = json!({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
            "spec": {
                "replicas": self.replicas,
                "selector": {"matchLabels": {labels::WAYPOINT: self.name}},
                "template": {
                    "metadata": {"labels": self.labels()},
                    "spec": {
                        "serviceAccountName": self.name,
                        "containers": [container],
                        "volumes": [{
                            "name": "weft-token",
                            "projected": {"sources": [{"serviceAccountToken": {
                                "audience": "weft-controller", "expirationSeconds": 3600, "path": "token",
                            }}]},
                        }],
                    },
                },
            },
        });
        let service = json!({
            "apiVersion": "v1", "kind": "Service", "metadata": meta,
            "spec": {
                "selector": {labels::WAYPOINT: self.name},
                "ports": [{"name": "hbone", "port": 15008, "targetPort": 15008, "protocol": "TCP", "appProtocol": "weft.dev/hbone"}],
            },
        });
        vec![service_account, deployment, service]
    }

    /// The objects as a multi-document YAML stream (`--dry-run`), with the binding as a
    /// comment-free patch description at the end.
    pub fn yaml(&self) -> Result<String, serde_yaml::Error> {
        let mut out = String::new();
        for o in self.objects() {
            out.push_str("---\n");
            out.push_str(&serde_yaml::to_string(&o)?);
        }
        match &self.binding {
            Binding::Namespace => out.push_str(&format!(
                "# then: kubectl label namespace {} {}={}\n",
                self.namespace,
                labels::USE_WAYPOINT,
                self.name
            )),
            Binding::Service(s) => out.push_str(&format!(
                "# then: kubectl -n {} label service {s} {}={}\n",
                self.namespace,
                labels::USE_WAYPOINT,
                self.name
            )),
            Binding::None => {}
        }
        Ok(out)
    }
}

fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

/// Whether the namespace is labelled `weft.dev/mesh=enabled` (a waypoint serves only meshed
/// clients). Errors when it does not exist.
pub async fn namespace_meshed(client: &Client, namespace: &str) -> Result<bool, CtlError> {
    let ns = Api::<Namespace>::all(client.clone())
        .get_opt(namespace)
        .await?
        .ok_or_else(|| CtlError::NoNamespace(namespace.to_string()))?;
    Ok(ns.labels().get(labels::MESH).map(String::as_str) == Some(labels::MESH_ENABLED))
}

/// Creates or updates the waypoint's objects and its binding (server-side apply).
pub async fn deploy(client: &Client, w: &Waypoint) -> Result<(), CtlError> {
    w.validate()?;
    namespace_meshed(client, &w.namespace).await?;
    if let Binding::Service(s) = &w.binding {
        Api::<Service>::namespaced(client.clone(), &w.namespace)
            .get_opt(s)
            .await?
            .ok_or_else(|| CtlError::NoService {
                namespace: w.namespace.clone(),
                name: s.clone(),
            })?;
    }
    let [sa, deployment, service]: [Value; 3] = match w.objects().try_into() {
        Ok(a) => a,
        Err(_) => unreachable!("objects() returns three objects"),
    };
    let pp = apply_params();
    Api::<ServiceAccount>::namespaced(client.clone(), &w.namespace)
        .patch(&w.name, &pp, &Patch::Apply(sa))
        .await?;
    Api::<Deployment>::namespaced(client.clone(), &w.namespace)
        .patch(&w.name, &pp, &Patch::Apply(deployment))
        .await?;
    Api::<Service>::namespaced(client.clone(), &w.namespace)
        .patch(&w.name, &pp, &Patch::Apply(service))
        .await?;
    bind(client, w, Some(&w.name)).await
}

/// Sets (`Some`) or removes (`None`) the `weft.dev/use-waypoint` label per `w.binding`.
async fn bind(client: &Client, w: &Waypoint, value: Option<&str>) -> Result<(), CtlError> {
    let patch = Patch::Merge(json!({"metadata": {"labels": {labels::USE_WAYPOINT: value}}}));
    let pp = PatchParams::default();
    match &w.binding {
        Binding::Namespace => {
            Api::<Namespace>::all(client.clone())
                .patch(&w.namespace, &pp, &patch)
                .await?;
        }
        Binding::Service(s) => {
            Api::<Service>::namespaced(client.clone(), &w.namespace)
                .patch(s, &pp, &patch)
                .await?;
        }
        Binding::None => {}
    }
    Ok(())
}

/// Removes the waypoint's objects (only those weftctl created) and every binding to it in its
/// namespace (the namespace label and Service labels naming it).
pub async fn delete(client: &Client, namespace: &str, name: &str) -> Result<Vec<String>, CtlError> {
    for (n, what) in [(namespace, "namespace"), (name, "waypoint")] {
        if !dns_label(n) {
            return Err(CtlError::BadName(n.to_string(), what));
        }
    }
    let mut removed = Vec::new();
    let managed = |l: &std::collections::BTreeMap<String, String>| {
        l.get("app.kubernetes.io/managed-by").map(String::as_str) == Some(MANAGED_BY)
    };
    let dp = DeleteParams::default();
    let deployments = Api::<Deployment>::namespaced(client.clone(), namespace);
    if let Some(d) = deployments.get_opt(name).await?
        && managed(d.labels())
    {
        deployments.delete(name, &dp).await?;
        removed.push(format!("deployment {namespace}/{name}"));
    }
    let services = Api::<Service>::namespaced(client.clone(), namespace);
    if let Some(s) = services.get_opt(name).await?
        && managed(s.labels())
    {
        services.delete(name, &dp).await?;
        removed.push(format!("service {namespace}/{name}"));
    }
    let accounts = Api::<ServiceAccount>::namespaced(client.clone(), namespace);
    if let Some(s) = accounts.get_opt(name).await?
        && managed(s.labels())
    {
        accounts.delete(name, &dp).await?;
        removed.push(format!("serviceaccount {namespace}/{name}"));
    }
    let unlabel = Patch::Merge(json!({"metadata": {"labels": {labels::USE_WAYPOINT: null}}}));
    let pp = PatchParams::default();
    let namespaces = Api::<Namespace>::all(client.clone());
    if let Some(ns) = namespaces.get_opt(namespace).await?
        && ns.labels().get(labels::USE_WAYPOINT).map(String::as_str) == Some(name)
    {
        namespaces.patch(namespace, &pp, &unlabel).await?;
        removed.push(format!(
            "label {} on namespace {namespace}",
            labels::USE_WAYPOINT
        ));
    }
    for s in services.list(&ListParams::default()).await? {
        if s.labels().get(labels::USE_WAYPOINT).map(String::as_str) == Some(name) {
            let svc = s.name_any();
            services.patch(&svc, &pp, &unlabel).await?;
            removed.push(format!(
                "label {} on service {namespace}/{svc}",
                labels::USE_WAYPOINT
            ));
        }
    }
    Ok(removed)
}

/// One row of `weftctl waypoint list`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    pub namespace: String,
    pub name: String,
    pub ready: i32,
    pub desired: i32,
    /// `namespace`, the Services bound to it, or `-`.
    pub bound: String,
}

/// The waypoints (Deployments labelled `weft.dev/waypoint`) of `namespace`, or of every
/// namespace.
pub async fn list(client: &Client, namespace: Option<&str>) -> Result<Vec<Listed>, CtlError> {
    let lp = ListParams::default().labels(labels::WAYPOINT);
    let deployments = match namespace {
        Some(ns) => {
            Api::<Deployment>::namespaced(client.clone(), ns)
                .list(&lp)
                .await?
        }
        None => Api::<Deployment>::all(client.clone()).list(&lp).await?,
    };
    let mut rows = Vec::new();
    for d in deployments {
        let ns = d.namespace().unwrap_or_default();
        let name = d
            .labels()
            .get(labels::WAYPOINT)
            .cloned()
            .unwrap_or_default();
        let ns_bound = Api::<Namespace>::all(client.clone())
            .get_opt(&ns)
            .await?
            .is_some_and(|n| n.labels().get(labels::USE_WAYPOINT) == Some(&name));
        let bound = if ns_bound {
            "namespace".to_string()
        } else {
            let services: Vec<String> = Api::<Service>::namespaced(client.clone(), &ns)
                .list(&ListParams::default())
                .await?
                .into_iter()
                .filter(|s| s.labels().get(labels::USE_WAYPOINT) == Some(&name))
                .map(|s| s.name_any())
                .collect();
            if services.is_empty() {
                "-".into()
            } else {
                services.join(",")
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
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wp(binding: Binding) -> Waypoint {
        Waypoint {
            namespace: "shop".into(),
            name: "waypoint".into(),
            image: "weft/waypoint:test".into(),
            replicas: 2,
            binding,
        }
    }

    #[test]
    fn objects_carry_the_waypoint_label_selector_and_port() {
        let objs = wp(Binding::Namespace).objects();
        let kinds: Vec<&str> = objs.iter().filter_map(|o| o["kind"].as_str()).collect();
        assert_eq!(kinds, ["ServiceAccount", "Deployment", "Service"]);
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
        let s = &objs[2];
        assert_eq!(s["metadata"]["labels"]["weft.dev/waypoint"], "waypoint");
        assert_eq!(s["spec"]["selector"]["weft.dev/waypoint"], "waypoint");
        assert_eq!(s["spec"]["ports"][0]["port"], 15008);
    }

    #[test]
    fn names_and_bindings_are_checked() {
        assert!(matches!(
            "service:web".parse::<Binding>(),
            Ok(Binding::Service(s)) if s == "web"
        ));
        assert!("svc:web".parse::<Binding>().is_err());
        assert!("service:Web".parse::<Binding>().is_err());
        let mut w = wp(Binding::None);
        w.name = "Bad_Name".into();
        assert!(matches!(
            w.validate(),
            Err(CtlError::BadName(_, "waypoint"))
        ));
        let yaml = wp(Binding::Namespace).yaml().expect("yaml");
        let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&yaml)
            .map(|d| serde::Deserialize::deserialize(d).expect("document"))
            .collect();
        assert_eq!(docs.len(), 3);
        assert!(yaml.contains("kubectl label namespace shop weft.dev/use-waypoint=waypoint"));
    }
}
