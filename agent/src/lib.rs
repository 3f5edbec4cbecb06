//! The Weft node agent: loads the capture programs, enrols this node's meshed pods, and proxies
//! their TCP. See docs/architecture.md for the packet path.

pub mod admin;
pub mod app;
pub mod capture;
pub mod discovery;
pub mod events;
pub mod identity;
pub mod metrics;
pub mod pods;
pub mod proxy;
