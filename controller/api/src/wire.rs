//! The wire protocol (protobuf, `proto/weft/discovery/v1/discovery.proto`) and its conversion
//! to and from the internal model. Wire types never travel further than the stream handlers:
//! they are converted once, here, with every problem named.

use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use prost::Message as _;

use crate::model::{CaptureSettings, Exclusions, WorkloadInfo};

/// Generated protobuf types and gRPC stubs.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("weft.discovery.v1");
}

/// A wire resource that cannot be turned into the model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("resource {key}: field `{field}`: {problem}")]
pub struct WireError {
    pub key: String,
    pub field: &'static str,
    pub problem: String,
}

/// Resource key of a workload: `Workload/<namespace>/<name>`.
pub fn workload_key(namespace: &str, name: &str) -> String {
    format!("Workload/{namespace}/{name}")
}

impl From<&WorkloadInfo> for pb::Workload {
    fn from(w: &WorkloadInfo) -> Self {
        let e = &w.capture.exclusions;
        Self {
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            service_account: w.service_account.clone(),
            node: w.node.clone(),
            ips: w
                .ip4
                .map(IpAddr::V4)
                .into_iter()
                .chain(w.ip6.map(IpAddr::V6))
                .map(|ip| ip.to_string())
                .collect(),
            netns: w.netns.display().to_string(),
            labels: w.labels.clone(),
            namespace_meshed: w.capture.namespace_meshed,
            opted_out: w.capture.opted_out,
            exclude_outbound_ports: e.outbound_ports.iter().map(|p| u32::from(*p)).collect(),
            exclude_inbound_ports: e.inbound_ports.iter().map(|p| u32::from(*p)).collect(),
            exclude_outbound_cidrs: e.outbound_cidrs.iter().map(ToString::to_string).collect(),
            exclude_inbound_cidrs: e.inbound_cidrs.iter().map(ToString::to_string).collect(),
        }
    }
}

impl TryFrom<pb::Workload> for WorkloadInfo {
    type Error = WireError;

    fn try_from(w: pb::Workload) -> Result<Self, WireError> {
        let key = workload_key(&w.namespace, &w.name);
        let err = |field: &'static str, problem: String| WireError {
            key: key.clone(),
            field,
            problem,
        };
        if w.name.is_empty() || w.namespace.is_empty() || w.node.is_empty() {
            return Err(err("name/namespace/node", "must not be empty".into()));
        }
        let mut ip4 = None;
        let mut ip6 = None;
        for ip in &w.ips {
            match ip.parse::<IpAddr>() {
                Ok(IpAddr::V4(a)) if ip4.is_none() => ip4 = Some(a),
                Ok(IpAddr::V6(a)) if ip6.is_none() => ip6 = Some(a),
                Ok(_) => return Err(err("ips", "more than one address of a family".into())),
                Err(e) => return Err(err("ips", format!("`{ip}`: {e}"))),
            }
        }
        if ip4.is_none() && ip6.is_none() {
            return Err(err("ips", "no address".into()));
        }
        let ports = |field: &'static str, v: &[u32]| -> Result<Vec<u16>, WireError> {
            v.iter()
                .map(|p| {
                    u16::try_from(*p)
                        .ok()
                        .filter(|p| *p != 0)
                        .ok_or_else(|| err(field, format!("{p} is not a port")))
                })
                .collect()
        };
        let cidrs = |field: &'static str, v: &[String]| -> Result<Vec<IpNet>, WireError> {
            v.iter()
                .map(|c| {
                    c.parse::<IpNet>()
                        .map_err(|e| err(field, format!("`{c}`: {e}")))
                })
                .collect()
        };
        let exclusions = Exclusions {
            outbound_ports: ports("exclude_outbound_ports", &w.exclude_outbound_ports)?,
            inbound_ports: ports("exclude_inbound_ports", &w.exclude_inbound_ports)?,
            outbound_cidrs: cidrs("exclude_outbound_cidrs", &w.exclude_outbound_cidrs)?,
            inbound_cidrs: cidrs("exclude_inbound_cidrs", &w.exclude_inbound_cidrs)?,
        };
        Ok(WorkloadInfo {
            name: w.name,
            namespace: w.namespace,
            service_account: if w.service_account.is_empty() {
                "default".into()
            } else {
                w.service_account
            },
            node: w.node,
            ip4,
            ip6,
            netns: PathBuf::from(w.netns),
            labels: w.labels,
            capture: CaptureSettings {
                namespace_meshed: w.namespace_meshed,
                opted_out: w.opted_out,
                exclusions,
            },
        })
    }
}

/// A workload as a versioned wire resource. The version is a hash of the encoded content, so
/// equal versions mean equal content (maps are ordered, so encoding is deterministic).
pub fn workload_resource(w: &WorkloadInfo) -> pb::Resource {
    let wire = pb::Workload::from(w);
    let version = content_version(&wire.encode_to_vec());
    pb::Resource {
        key: workload_key(&w.namespace, &w.name),
        version,
        kind: Some(pb::resource::Kind::Workload(wire)),
    }
}

/// FNV-1a 64 of the bytes, as 16 hex digits.
pub fn content_version(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> WorkloadInfo {
        WorkloadInfo {
            name: "web".into(),
            namespace: "shop".into(),
            service_account: "web".into(),
            node: "n1".into(),
            ip4: "198.18.1.11".parse().ok(),
            ip6: "fd77:6566:1::b".parse().ok(),
            netns: "/run/netns/x".into(),
            labels: [("app".to_string(), "web".to_string())].into(),
            capture: CaptureSettings {
                namespace_meshed: true,
                opted_out: false,
                exclusions: Exclusions {
                    outbound_ports: vec![5432],
                    inbound_ports: vec![],
                    outbound_cidrs: vec!["10.0.0.0/8".parse().expect("cidr")],
                    inbound_cidrs: vec![],
                },
            },
        }
    }

    #[test]
    fn workloads_round_trip_and_versions_are_stable() {
        let w = sample();
        let r1 = workload_resource(&w);
        let r2 = workload_resource(&w.clone());
        assert_eq!(r1.version, r2.version);
        let Some(pb::resource::Kind::Workload(wire)) = r1.kind else {
            panic!("not a workload")
        };
        assert_eq!(WorkloadInfo::try_from(wire).expect("valid"), w);
        let mut changed = sample();
        changed.capture.opted_out = true;
        assert_ne!(workload_resource(&changed).version, r2.version);
    }

    #[test]
    fn bad_wire_workloads_name_the_field() {
        let mut wire = pb::Workload::from(&sample());
        wire.ips = vec!["nope".into()];
        let e = WorkloadInfo::try_from(wire).expect_err("bad ip");
        assert_eq!(e.field, "ips");
        assert!(e.to_string().contains("Workload/shop/web"), "{e}");
        let mut wire = pb::Workload::from(&sample());
        wire.exclude_inbound_ports = vec![70000];
        assert_eq!(
            WorkloadInfo::try_from(wire).expect_err("port").field,
            "exclude_inbound_ports"
        );
        let mut wire = pb::Workload::from(&sample());
        wire.exclude_outbound_cidrs = vec!["10.0.0.0/99".into()];
        assert_eq!(
            WorkloadInfo::try_from(wire).expect_err("cidr").field,
            "exclude_outbound_cidrs"
        );
    }
}
