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
