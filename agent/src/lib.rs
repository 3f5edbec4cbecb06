//! The Weft node agent: loads the capture programs, enrols this node's meshed pods, and proxies
//! their TCP. See docs/architecture.md for the packet path.

pub mod admin;
pub mod app;
pub mod capture;
pub mod certstore;
pub mod conns;
pub mod discovery;
pub mod events;
pub mod identity;
pub mod lb;
pub mod mesh;
pub mod metrics;
pub mod pods;
pub mod policy;
pub mod pool;
pub mod proxy;
