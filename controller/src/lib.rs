//! Weft's control plane. Sources (Kubernetes, or a directory of YAML) produce the validated
//! [`weft_api::MeshState`]; [`view`] keeps each node's view; [`server`] streams it to agents.

pub mod ca;
pub mod ca_secret;
pub mod certs;
pub mod crd;
pub mod dir;
pub mod k8s;
pub mod route_status;
pub mod server;
pub mod source;
pub mod tls;
pub mod tokenreview;
pub mod view;
pub mod weftctl;
