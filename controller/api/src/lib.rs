//! Weft's resource model, shared by the controller, the node agent and the waypoint.
//!
//! Two layers, as in ztunnel: the *document* types ([`resource`]) mirror the Kubernetes-style
//! YAML users write (Namespaces, Workloads), and the *internal* model ([`model`]) is what the
//! data path uses, converted once and validated (`TryFrom`), with every problem reported by
//! file, document and field path.

pub mod duration;
pub mod labels;
pub mod local;
pub mod model;
pub mod resource;
pub mod routes;
pub mod wire;

pub use model::{CaptureSettings, Exclusions, MeshState, ModelError, WorkloadInfo};
pub use resource::{ParseError, Resource, parse_documents};
