//! Workload identities end to end in the lab (root; fail, not skip, when CI=true): agents obtain
//! SVIDs from the controller's CA for the meshed pods of their own node, and only those.

use serde_json::Value;
use weft_tests::mesh::wait_for;
use weft_tests::scenario::*;

fn certificates(w: &World, node: usize) -> Vec<Value> {
    w.mesh
        .agent(node)
        .get_json("/config_dump")
        .ok()
        .and_then(|d| d["certificates"].as_array().cloned())
        .unwrap_or_default()
}

#[test]
fn identity_agents_obtain_certificates_for_their_own_meshed_pods() {
    let _g = serial();
    let Some(mut w) = world_with_controller(
        "identity_agents_obtain_certificates_for_their_own_meshed_pods",
        |c| c,
    ) else {
        return;
    };
    for (node, id) in [
        (0, "spiffe://cluster.local/ns/shop/sa/web"),
        (1, "spiffe://cluster.local/ns/shop/sa/api"),
    ] {
        let certs = wait_for(T, &format!("{id} on node {node}"), || {
            let c = certificates(&w, node);
            c.iter()
                .any(|c| c["identity"] == id && c["valid"] == true)
                .then_some(c)
        })
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", w.mesh.agent(node).log_tail(20)));
        // Only this node's meshed pods: legacy/batch and legacy/db are not in the mesh.
        assert_eq!(certs.len(), 1, "{certs:?}");
        let not_after = certs[0]["not_after"].as_i64().unwrap_or(0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        assert!(
            (now + 23 * 3600..=now + 24 * 3600 + 60).contains(&not_after),
            "24 h TTL: {not_after}"
        );
    }
    // The trust bundle arrived over the config stream.
    for node in 0..2 {
        let d = w.mesh.agent(node).get_json("/config_dump").expect("dump");
        assert_eq!(d["trust_bundle_roots"], 1, "{d}");
    }
    let log = w
        .mesh
        .controller
        .as_ref()
        .map(|c| c.log_text())
        .unwrap_or_default();
    assert!(log.contains("issued a workload certificate"), "{log}");

    // Meshing `legacy` makes node 1 ask for batch's identity too.
    w.mesh.config.set_meshed("legacy", true);
    w.mesh.write_config().expect("write");
    wait_for(T, "batch's certificate", || {
        certificates(&w, 0)
            .iter()
            .any(|c| {
                c["identity"] == "spiffe://cluster.local/ns/legacy/sa/batch" && c["valid"] == true
            })
            .then_some(())
    })
    .expect("batch certificate");
}

fn node_certificate(w: &World, node: usize) -> Option<Value> {
    w.mesh
        .agent(node)
        .get_json("/config_dump")
        .ok()
        .map(|d| d["node_certificate"].clone())
        .filter(|c| c["valid"] == true)
}

#[test]
fn identity_config_stream_uses_mtls_with_renewed_node_certificates() {
    let _g = serial();
    let Some(mut w) = world_with_controller(
        "identity_config_stream_uses_mtls_with_renewed_node_certificates",
        |c| c,
    ) else {
        return;
    };
    // Every agent exchanged its bootstrap token for a node certificate at startup.
    for (node, name) in [(0, "n1"), (1, "n2")] {
        let c = wait_for(T, &format!("node {name}'s certificate"), || {
            node_certificate(&w, node)
        })
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", w.mesh.agent(node).log_tail(20)));
        assert_eq!(
            c["identity"],
            format!("spiffe://cluster.local/weft/node/{name}"),
            "{c}"
        );
    }
    // From now on the controller refuses bearer tokens on the stream and for workload
    // certificates, and issues one-minute node certificates.
    w.mesh
        .set_controller_args(&["--require-node-certificates", "--node-cert-ttl", "60"]);
    w.mesh.kill_controller();
    w.mesh.start_controller().expect("controller restart");
    // Node 1's agent keeps its one-hour certificate (same CA) and reconnects with it; node 2's
    // agent is restarted and exchanges its token for a one-minute one.
    w.mesh.restart_agent(1).expect("agent restart");
    let short = |c: &Value| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        c["not_after"].as_i64().is_some_and(|t| t <= now + 61)
    };
    let first = wait_for(
        std::time::Duration::from_secs(30),
        "a one-minute node certificate",
        || node_certificate(&w, 1).filter(short),
    )
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", w.mesh.agent(1).log_tail(30)));
    let synced = |w: &World| {
        (0..2).all(|n| {
            w.mesh
                .agent(n)
                .get_json("/config_dump")
                .is_ok_and(|d| d["config"]["synced"] == true && d["config"]["connected"] == true)
        })
    };
    wait_for(
        std::time::Duration::from_secs(30),
        "both agents back on the stream",
        || synced(&w).then_some(()),
    )
    .unwrap_or_else(|e| {
        let log = w
            .mesh
            .controller
            .as_ref()
            .map(|c| c.log_text())
            .unwrap_or_default();
        panic!("{e}; controller log:\n{log}")
    });
    // The stream works over mTLS: a change reaches node 1's agent, and it obtains the new
    // workload's certificate over the same mutual TLS.
    w.mesh.config.set_meshed("legacy", true);
    w.mesh.write_config().expect("write");
    wait_for(
        std::time::Duration::from_secs(20),
        "batch's certificate over mTLS",
        || {
            certificates(&w, 0)
                .iter()
                .any(|c| {
                    c["identity"] == "spiffe://cluster.local/ns/legacy/sa/batch"
                        && c["valid"] == true
                })
                .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", w.mesh.agent(0).log_tail(30)));
    // Renewed at half-life (30 s ± 6 s): a later expiry. (The controller closes a stream when
    // the certificate it was opened with expires; the agent reopens it with the renewed one.)
    let renewed = wait_for(
        std::time::Duration::from_secs(45),
        "the node certificate renewed",
        || {
            node_certificate(&w, 1)
                .filter(|c| c["not_after"].as_i64() > first["not_after"].as_i64())
        },
    )
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", w.mesh.agent(1).log_tail(30)));
    assert!(short(&renewed), "{renewed}");
    // Past the first certificate's expiry the agents are on the stream again, with the renewed
    // certificate (the stream's first certificate has expired by then).
    let expired_at = first["not_after"].as_i64().unwrap_or(0);
    wait_for(
        std::time::Duration::from_secs(60),
        "the agents back on the stream after the first node certificate expired",
        || {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            (now > expired_at + 2 && synced(&w)).then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", w.mesh.agent(1).log_tail(30)));
    // A change still arrives over the reopened stream.
    w.mesh.config.set_meshed("legacy", false);
    w.mesh.write_config().expect("write");
    wait_for(
        std::time::Duration::from_secs(20),
        "batch's certificate dropped",
        || {
            (!certificates(&w, 0)
                .iter()
                .any(|c| c["identity"] == "spiffe://cluster.local/ns/legacy/sa/batch"))
            .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", w.mesh.agent(0).log_tail(30)));
    let log = w
        .mesh
        .controller
        .as_ref()
        .map(|c| c.log_text())
        .unwrap_or_default();
    assert!(log.contains("issued a node certificate"), "{log}");
}
