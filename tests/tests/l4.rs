//! The L4 mesh end to end in the lab (root; fail, not skip, when CI=true): captured TCP between
//! meshed pods travels inside HBONE mutual-TLS tunnels, is authorized by identity and measured.
//! Standard world (controller mode): shop/web n1p1 and shop/api n2p1 meshed; legacy/batch n1p2
//! and legacy/db n2p2 not.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Instant;

use serde_json::{Value, json};
use weft_tests::mesh::wait_for;
use weft_tests::pcap::{PacketCapture, contains};
use weft_tests::scenario::*;
use weft_tests::{Pod, ask, read_hello, tcp_connect_in};

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

/// A connection through the mesh, kept open: hello read, read timeout set.
fn open(from: &Pod, to: SocketAddr) -> TcpStream {
    let ns = from.netns().expect("netns");
    let mut s = tcp_connect_in(&ns, to, T).unwrap_or_else(|e| panic!("connect {to}: {e}"));
    s.set_read_timeout(Some(T)).expect("timeout");
    read_hello(&mut s).unwrap_or_else(|e| panic!("hello from {to}: {e}"));
    s
}

/// Sends `msg` and reads its echo on an open connection.
fn ping(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    s.write_all(msg)?;
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got)?;
    if got != msg {
        return Err(std::io::Error::other("echo differs"));
    }
    Ok(())
}

/// Whether a connection from `from` to `to` is refused (reset or closed before the echo).
fn is_refused(from: &Pod, to: SocketAddr) -> bool {
    let ns = from.netns().expect("netns");
    match tcp_connect_in(&ns, to, T) {
        Err(_) => true,
        Ok(mut s) => {
            let _ = s.set_read_timeout(Some(T));
            match ask(&mut s, b"are you there") {
                Ok((_, echo)) => echo != b"are you there",
                Err(_) => true,
            }
        }
    }
}

fn policy(name: &str, action: &str, rules: Value) -> Value {
    json!({
        "apiVersion": "weft.dev/v1alpha1", "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"action": action, "selector": {"matchLabels": {"app": "api"}}, "rules": rules},
    })
}

fn label_api(mut c: weft_tests::mesh::MeshConfig) -> weft_tests::mesh::MeshConfig {
    if let Some(api) = c.workloads.iter_mut().find(|w| w.name == "api") {
        api.labels.insert("app".into(), "api".into());
    }
    c
}

/// Waits for an access-log line on `node` matching `pred`.
fn wait_log(w: &World, node: usize, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    wait_for(T, what, || {
        w.mesh
            .agent(node)
            .access_log()
            .into_iter()
            .find(|l| pred(l))
    })
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", w.mesh.agent(node).log_tail(30)))
}

#[test]
fn l4_pod_to_pod_across_nodes_is_mtls_and_no_plaintext_crosses_the_wire() {
    let _g = serial();
    let Some(w) = world_with_controller(
        "l4_pod_to_pod_across_nodes_is_mtls_and_no_plaintext_crosses_the_wire",
        |c| c,
    ) else {
        return;
    };
    let mut cap = PacketCapture::start(&w.mesh.lab, w.mesh.dir()).expect("tcpdump");
    let secret = b"MESHED-SECRET-7f3a9c".repeat(500);
    let visible = b"PLAINTEXT-CONTROL-5e1d".repeat(50);
    // Meshed: web -> api, across nodes.
    let ns = w.web().netns().expect("netns");
    let mut s = tcp_connect_in(&ns, v4(&w.api(), PORT), T).expect("connect");
    let (hello, echo) = ask(&mut s, &secret).expect("exchange through the mesh");
    assert_eq!(
        echo, secret,
        "the server got (and echoed) exactly the bytes sent"
    );
    assert_eq!(
        hello.local,
        v4(&w.api(), PORT),
        "delivered to api's own address and port"
    );
    // Control: legacy (not meshed) traffic on the same link is visible in the capture.
    let ns = w.batch().netns().expect("netns");
    let mut s = tcp_connect_in(&ns, v4(&w.db(), PORT), T).expect("connect");
    let (_, echo) = ask(&mut s, &visible).expect("plaintext exchange");
    assert_eq!(echo, visible);
    let pcap = cap.finish();
    assert!(
        contains(&pcap, b"PLAINTEXT-CONTROL-5e1d"),
        "the capture sees plaintext on the fabric ({} bytes captured; tcpdump: {})",
        pcap.len(),
        cap.log()
    );
    assert!(
        !contains(&pcap, b"MESHED-SECRET-7f3a9c"),
        "meshed payload crossed the inter-node link in plaintext"
    );
    assert!(
        cap.count("tcp port 15008") > 0,
        "the meshed traffic went over port 15008"
    );
    assert_eq!(
        cap.count("tcp port 8080 and host 198.18.2.11 and host 198.18.1.11"),
        0,
        "no direct web->api:8080 packets"
    );

    // Both agents say so: mutual TLS, with the peer's identity.
    let line = wait_log(&w, 1, "inbound access log", |l| {
        l["direction"] == "inbound"
            && l["message"] == "connection closed"
            && l["dst"] == v4(&w.api(), PORT).to_string()
    });
    assert_eq!(line["security"], "mutual_tls", "{line}");
    assert_eq!(line["src_principal"], WEB, "{line}");
    assert_eq!(line["src_workload"], "shop/web", "{line}");
    assert_eq!(line["bytes_sent"], secret.len() as u64, "{line}");
    let m = w.mesh.agent(0).metric(
        "weft_tcp_connections_opened_total",
        &[
            ("reporter", "source"),
            ("source_workload", "shop/web"),
            ("destination_workload", "shop/api"),
            (
                "destination_principal",
                "spiffe://cluster.local/ns/shop/sa/api",
            ),
            ("connection_security_policy", "mutual_tls"),
        ],
    );
    assert_eq!(m, 1.0, "{}", w.mesh.agent(0).metrics_text());
    let m = w.mesh.agent(1).metric(
        "weft_tcp_sent_bytes_total",
        &[("reporter", "destination"), ("source_principal", WEB)],
    );
    assert_eq!(m, secret.len() as f64);
}

#[test]
fn l4_pod_to_service_reaches_a_ready_endpoint_through_mtls() {
    let _g = serial();
    let Some(mut w) = world_with_controller(
        "l4_pod_to_service_reaches_a_ready_endpoint_through_mtls",
        label_api,
    ) else {
        return;
    };
    w.mesh.config.raw.push(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "api", "namespace": "shop"},
        "spec": {"clusterIP": "198.18.100.1", "selector": {"app": "api"},
                 "ports": [{"name": "http", "port": 80, "targetPort": PORT}]},
    }));
    w.mesh.write_config().expect("write");
    wait_for(T, "service on node 1", || {
        let d = w.mesh.agent(0).get_json("/config_dump").ok()?;
        (d["services"].as_array()?.len() == 1).then_some(())
    })
    .expect("service");
    let vip: SocketAddr = "198.18.100.1:80".parse().expect("addr");
    for _ in 0..3 {
        let hello = exchange(&w.web(), vip);
        assert_eq!(
            hello.local,
            v4(&w.api(), PORT),
            "the VIP became api's endpoint"
        );
    }
    let line = wait_log(&w, 0, "outbound access log", |l| {
        l["direction"] == "outbound" && l["message"] == "connection closed"
    });
    assert_eq!(line["dst_service"], "api.shop.svc.cluster.local", "{line}");
    assert_eq!(line["security"], "mutual_tls", "{line}");
    assert_eq!(line["dst"], v4(&w.api(), PORT).to_string(), "{line}");
    // A port the service does not have is refused, with a reason.
    let bad: SocketAddr = "198.18.100.1:81".parse().expect("addr");
    assert!(is_refused(&w.web(), bad));
    wait_log(&w, 0, "no_service_port", |l| {
        l["result"] == "no_service_port"
    });
}

#[test]
fn l4_allow_and_deny_policies_decide_with_metric_and_log_line() {
    let _g = serial();
    let Some(mut w) = world_with_controller(
        "l4_allow_and_deny_policies_decide_with_metric_and_log_line",
        label_api,
    ) else {
        return;
    };
    let api = v4(&w.api(), PORT);
    // Without policies both the meshed web and the plaintext batch get in.
    exchange(&w.web(), api);
    exchange(&w.batch(), api);
    // ALLOW from namespace shop: default deny for everything else.
    w.mesh.config.raw = vec![policy(
        "allow-shop",
        "ALLOW",
        json!([{"from": [{"namespaces": ["shop"]}], "to": [{"ports": [PORT]}]}]),
    )];
    w.mesh.write_config().expect("write");
    wait_for(T, "batch denied", || {
        is_refused(&w.batch(), api).then_some(())
    })
    .expect("ALLOW applied");
    exchange(&w.web(), api);
    let denied = wait_log(&w, 1, "denial log line", |l| l["result"] == "policy_denied");
    assert_eq!(denied["direction"], "inbound", "{denied}");
    assert_eq!(denied["src_workload"], "legacy/batch", "{denied}");
    assert!(
        denied["error"]
            .as_str()
            .unwrap_or("")
            .contains("shop/allow-shop"),
        "{denied}"
    );
    assert!(
        w.mesh.agent(1).metric(
            "weft_authorization_decisions_total",
            &[("decision", "deny")]
        ) >= 1.0
    );
    assert!(
        w.mesh.agent(1).metric(
            "weft_tcp_connection_failures_total",
            &[
                ("reason", "policy_denied"),
                ("source_workload", "legacy/batch"),
                ("response_flags", "RBAC")
            ]
        ) >= 1.0
    );
    // DENY web's principal: DENY wins over the ALLOW.
    w.mesh.config.raw.push(policy(
        "deny-web",
        "DENY",
        json!([{"from": [{"principals": [WEB]}]}]),
    ));
    w.mesh.write_config().expect("write");
    wait_for(T, "web denied", || is_refused(&w.web(), api).then_some(())).expect("DENY applied");
    // A refusal seen while the change lands may have been a transient one: keep trying until
    // the destination logs the policy's denial.
    let denied = wait_for(T, "DENY log line", || {
        let _ = is_refused(&w.web(), api);
        w.mesh
            .agent(1)
            .access_log()
            .into_iter()
            .find(|l| l["result"] == "policy_denied" && l["src_principal"] == WEB)
    })
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", w.mesh.agent(1).log_tail(30)));
    assert!(
        denied["error"]
            .as_str()
            .unwrap_or("")
            .contains("shop/deny-web"),
        "{denied}"
    );
    // The source side logs the refusal it got from the peer.
    wait_log(&w, 0, "source-side refusal", |l| {
        l["direction"] == "outbound"
            && l["result"] == "denied_by_destination"
            && l["error"].as_str().unwrap_or("").contains("403")
    });
    // Dry run: the same DENY in dry-run mode only logs.
    w.mesh.config.raw[1]["spec"]["dryRun"] = json!(true);
    w.mesh.write_config().expect("write");
    wait_for(T, "web allowed again", || {
        (!is_refused(&w.web(), api)).then_some(())
    })
    .expect("dry run");
    wait_log(&w, 1, "dry-run line", |l| l["policy"] == "shop/deny-web");
}

#[test]
fn l4_policy_change_closes_a_live_connection_that_became_denied() {
    let _g = serial();
    let Some(mut w) = world_with_controller(
        "l4_policy_change_closes_a_live_connection_that_became_denied",
        label_api,
    ) else {
        return;
    };
    let api = v4(&w.api(), PORT);
    let mut web_conn = open(&w.web(), api);
    let mut batch_conn = open(&w.batch(), api);
    ping(&mut web_conn, b"one").expect("web live");
    ping(&mut batch_conn, b"one").expect("batch live");
    // Only shop may talk to api now: batch's live (plaintext) connection must go, web's stays.
    w.mesh.config.raw = vec![policy(
        "allow-shop",
        "ALLOW",
        json!([{"from": [{"namespaces": ["shop"]}]}]),
    )];
    w.mesh.write_config().expect("write");
    let start = Instant::now();
    let mut buf = [0u8; 16];
    let closed = loop {
        match batch_conn.read(&mut buf) {
            Ok(0) | Err(_) => break true,
            Ok(_) => {}
        }
        if start.elapsed() > T {
            break false;
        }
    };
    assert!(closed, "the live connection that became denied was closed");
    ping(&mut web_conn, b"two").expect("the allowed live connection is untouched");
    assert_eq!(
        w.mesh
            .agent(1)
            .metric("weft_tcp_connections_closed_by_policy_total", &[]),
        1.0
    );
    let line = wait_log(&w, 1, "close line", |l| l["close_reason"] == "policy");
    assert_eq!(line["src_workload"], "legacy/batch", "{line}");
}

#[test]
fn l4_strict_destination_refuses_plaintext_and_accepts_mtls() {
    let _g = serial();
    let Some(w) = world_with_controller(
        "l4_strict_destination_refuses_plaintext_and_accepts_mtls",
        |mut c| {
            if let Some(api) = c.workloads.iter_mut().find(|w| w.name == "api") {
                api.annotations
                    .insert("weft.dev/mtls".into(), "strict".into());
            }
            c
        },
    ) else {
        return;
    };
    let api = v4(&w.api(), PORT);
    assert!(
        is_refused(&w.batch(), api),
        "plaintext from outside the mesh is refused"
    );
    exchange(&w.web(), api);
    let line = wait_log(&w, 1, "strict refusal", |l| {
        l["result"] == "plaintext_refused"
    });
    assert_eq!(line["security"], "none", "{line}");
    assert!(
        w.mesh.agent(1).metric(
            "weft_tcp_connection_failures_total",
            &[("reason", "plaintext_refused")]
        ) >= 1.0
    );
    // Permissive (the default) lets the same plaintext in: db is not strict.
    exchange(&w.batch(), v4(&w.db(), PORT));
}

#[test]
fn l4_passthrough_to_a_destination_outside_the_mesh_and_its_deny_switch() {
    let _g = serial();
    let Some(w) = world_with_controller(
        "l4_passthrough_to_a_destination_outside_the_mesh_and_its_deny_switch",
        |c| c,
    ) else {
        return;
    };
    // db is known to the mesh but not meshed: plaintext passthrough.
    let hello = exchange(&w.web(), v4(&w.db(), PORT));
    assert_eq!(hello.local, v4(&w.db(), PORT));
    let line = wait_log(&w, 0, "passthrough line", |l| {
        l["direction"] == "outbound" && l["message"] == "connection closed"
    });
    assert_eq!(line["security"], "none", "{line}");
    assert_eq!(line["dst_workload"], "legacy/db", "{line}");
    drop(w);
    // With passthrough denied, an address the mesh does not know is refused.
    let Some(w) = world_with_controller_args(
        "l4_passthrough_to_a_destination_outside_the_mesh_and_its_deny_switch",
        |mut c| {
            c.workloads.retain(|w| w.name != "db");
            c
        },
        &["--outbound-passthrough", "deny"],
    ) else {
        return;
    };
    assert!(is_refused(&w.web(), v4(&w.db(), PORT)));
    wait_log(&w, 0, "passthrough_denied", |l| {
        l["result"] == "passthrough_denied"
    });
    exchange(&w.web(), v4(&w.api(), PORT));
}

#[test]
fn l4_ipv6_pod_to_pod_is_mtls() {
    let _g = serial();
    let Some(w) = world_with_controller("l4_ipv6_pod_to_pod_is_mtls", |c| c) else {
        return;
    };
    let dst = v6(&w.api(), PORT);
    let hello = exchange(&w.web(), dst);
    assert_eq!(hello.local, dst);
    let line = wait_log(&w, 1, "v6 inbound line", |l| {
        l["direction"] == "inbound"
            && l["message"] == "connection closed"
            && l["dst"] == dst.to_string()
    });
    assert_eq!(line["security"], "mutual_tls", "{line}");
    assert_eq!(line["src_principal"], WEB, "{line}");
}

#[test]
fn l4_pooling_reuses_one_tunnel_for_many_connections() {
    let _g = serial();
    let Some(w) = world_with_controller("l4_pooling_reuses_one_tunnel_for_many_connections", |c| c)
    else {
        return;
    };
    let api = v4(&w.api(), PORT);
    for _ in 0..20 {
        exchange(&w.web(), api);
    }
    // 20 concurrent ones too.
    let handles: Vec<_> = (0..20)
        .map(|_| {
            let web = w.web();
            std::thread::spawn(move || exchange(&web, api))
        })
        .collect();
    for h in handles {
        h.join().expect("exchange");
    }
    let a = w.mesh.agent(0);
    assert_eq!(
        a.metric("weft_hbone_connections_opened_total", &[]),
        1.0,
        "{}",
        a.metrics_text()
    );
    assert_eq!(a.metric("weft_hbone_pool_connections", &[]), 1.0);
    assert_eq!(
        a.metric(
            "weft_tcp_connections_closed_total",
            &[("connection_security_policy", "mutual_tls")]
        ),
        40.0
    );
}

#[test]
fn l4_sigterm_drains_live_connections() {
    let _g = serial();
    let Some(mut w) = world_with_controller("l4_sigterm_drains_live_connections", |c| c) else {
        return;
    };
    let api = v4(&w.api(), PORT);
    let mut live = open(&w.web(), api);
    ping(&mut live, b"before").expect("live");
    w.mesh.agents[0].terminate();
    wait_for(T, "drain started", || {
        w.mesh.agents[0]
            .log_tail(50)
            .contains("draining: waiting for live connections to finish")
            .then_some(())
    })
    .expect("drain log");
    // New connections are refused, the live one keeps working.
    assert!(
        is_refused(&w.web(), api),
        "no new connections while draining"
    );
    ping(&mut live, b"during").expect("the live connection still works");
    assert!(
        w.mesh.agents[0].is_running(),
        "waits for the live connection"
    );
    live.shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    let mut rest = Vec::new();
    let _ = live.read_to_end(&mut rest);
    drop(live);
    wait_for(T, "agent exit", || {
        (!w.mesh.agents[0].is_running()).then_some(())
    })
    .expect("the agent exits once drained");
    assert!(
        w.mesh.agents[0]
            .log_tail(20)
            .contains("drained: every connection finished"),
        "{}",
        w.mesh.agents[0].log_tail(20)
    );
}
