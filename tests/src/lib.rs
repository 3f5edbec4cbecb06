//! Weft's test lab and end-to-end test helpers.
//!
//! - [`lab`]: a simulated multi-node cluster on one machine (network namespaces, bridges,
//!   routes, cgroups); [`Lab::up`] builds one, dropping it tears it down.
//! - [`net`]: TCP helpers that create sockets inside a namespace, and an echo [`TestServer`].
//!
//! Everything that touches the kernel needs root; tests call [`require_root`] first.

pub mod fake_apiserver;
pub mod grpc;
pub mod lab;
pub mod mesh;
pub mod net;
pub mod otlp;
pub mod pcap;
pub mod scenario;

pub use lab::{Lab, LabError, LabSpec, LabStatus, Node, Pod, cgroup2_mount, require_root};
pub use net::{ServerHello, TestServer, ask, read_hello, tcp_connect_in, tcp_listen_in};
