//! End-to-end capture tests in the lab (root; they fail, not skip, when CI=true).
//!
//! Standard layout: two nodes, two pods each.
//! - namespace `shop` (meshed): `web` on n1p1, `api` on n2p1
//! - namespace `legacy` (not meshed): `batch` on n1p2, `db` on n2p2
//!
//! Every pod runs echo servers on port 8080 (IPv4 and IPv6). The tests are serialised: some
//! count programs loaded machine-wide.

use std::net::IpAddr;
use std::time::Duration;

use serde_json::Value;
use weft_tests::mesh::wait_for;
use weft_tests::scenario::*;
use weft_tests::tcp_connect_in;

#[test]
fn capture_outbound_cross_node_recovers_original_destination() {
    let _g = serial();
    let Some(w) = world(
        "capture_outbound_cross_node_recovers_original_destination",
        &[],
        |c| c,
        &[],
    ) else {
        return;
    };
    let (web, api) = (w.web(), w.api());
    let hello = exchange(&web, v4(&api, PORT));
    assert_eq!(
        hello.local,
        v4(&api, PORT),
        "the server saw the connection on its real address"
    );
    // The kernel redirected the connect and the agent forwarded it to the true destination.
    wait_event(
        &w,
        0,
        "connect4",
        "redirected",
        Some("shop/web"),
        v4(&api, PORT),
    );
    let line = wait_access(&w, 0, "outbound", v4(&api, PORT));
    assert_eq!(line["pod"], "shop/web");
    assert_eq!(line["close_reason"], "eof");
    let payload_len = format!("hello from {} to {}", web.name, v4(&api, PORT)).len() as u64;
    assert_eq!(line["bytes_sent"].as_u64(), Some(payload_len), "{line}");
    assert!(
        line["bytes_received"].as_u64().unwrap_or(0) > payload_len,
        "hello + echo: {line}"
    );
    // The original-destination entry was consumed, not leaked.
    let dump = w
        .mesh
        .agent(0)
        .get_json("/config_dump")
        .expect("config dump");
    assert_eq!(dump["original_destinations_pending"], 0, "{dump}");
}

#[test]
fn capture_unenrolled_pod_is_not_captured() {
    let _g = serial();
    let Some(w) = world(
        "capture_unenrolled_pod_is_not_captured",
        &[],
        |c| c,
        &["--trace-unenrolled"],
    ) else {
        return;
    };
    let (batch, db) = (w.batch(), w.db());
    let hello = exchange(&batch, v4(&db, PORT));
    // Nobody touched it: the server sees the client's own address and port.
    assert_eq!(hello.peer.ip(), IpAddr::V4(batch.ip4));
    wait_event(&w, 0, "connect4", "not_enrolled", None, v4(&db, PORT));
    assert!(
        !has_event(
            &events(&w, 0),
            "connect4",
            "redirected",
            None,
            v4(&db, PORT)
        ),
        "an unenrolled pod's connect was redirected"
    );
    assert!(access_lines(&w, 0, "outbound", v4(&db, PORT)).is_empty());
    assert!(access_lines(&w, 1, "inbound", v4(&db, PORT)).is_empty());
}

#[test]
fn capture_excluded_port_and_cidr_are_not_captured() {
    let _g = serial();
    let mut db_ip = String::new();
    let Some(w) = world(
        "capture_excluded_port_and_cidr_are_not_captured",
        &[9090, 7070],
        |c| {
            let mut c = c;
            let lab_db = c
                .workloads
                .iter()
                .find(|w| w.name == "db")
                .map(|w| w.pod.ip4);
            db_ip = lab_db.map(|i| format!("{i}/32")).unwrap_or_default();
            for wl in &mut c.workloads {
                if wl.name == "web" {
                    *wl = wl
                        .clone()
                        .annotate("weft.dev/exclude-outbound-ports", "9090")
                        .annotate("weft.dev/exclude-outbound-cidrs", &db_ip);
                }
                if wl.name == "api" {
                    *wl = wl
                        .clone()
                        .annotate("weft.dev/exclude-inbound-ports", "7070");
                }
            }
            c
        },
        &[],
    ) else {
        return;
    };
    let (web, api, db, batch) = (w.web(), w.api(), w.db(), w.batch());
    // Outbound port exclusion.
    let hello = exchange(&web, v4(&api, 9090));
    assert_eq!(hello.local, v4(&api, 9090));
    wait_event(
        &w,
        0,
        "connect4",
        "excluded_port",
        Some("shop/web"),
        v4(&api, 9090),
    );
    // Outbound CIDR exclusion.
    outbound(&w, &web, "shop/web", v4(&db, PORT), "excluded_cidr");
    assert!(access_lines(&w, 0, "outbound", v4(&db, PORT)).is_empty());
    // Inbound port exclusion: the connection reaches the app directly.
    let hello = exchange(&batch, v4(&api, 7070));
    assert_eq!(
        hello.peer.ip(),
        IpAddr::V4(batch.ip4),
        "not proxied: the app sees the real client"
    );
    wait_event(
        &w,
        1,
        "sk_lookup",
        "excluded_port",
        Some("shop/api"),
        v4(&api, 7070),
    );
    // The same pod's other ports are still captured.
    outbound(&w, &web, "shop/web", v4(&api, PORT), "redirected");
}

#[test]
fn capture_opted_out_pod_is_not_captured() {
    let _g = serial();
    let Some(mut w) = world(
        "capture_opted_out_pod_is_not_captured",
        &[],
        |c| {
            let mut c = c;
            for wl in &mut c.workloads {
                if wl.name == "web" {
                    *wl = wl.clone().label("weft.dev/mesh", "disabled");
                }
            }
            c
        },
        &[],
    ) else {
        return;
    };
    let (web, api) = (w.web(), w.api());
    outbound(&w, &web, "shop/web", v4(&api, PORT), "opted_out");
    assert!(access_lines(&w, 0, "outbound", v4(&api, PORT)).is_empty());
    // Opting back in is a map update: no reload, the next connect is captured.
    let before = w.mesh.applied_counts();
    for wl in &mut w.mesh.config.workloads {
        if wl.name == "web" {
            wl.labels.clear();
        }
    }
    w.mesh.write_config().expect("write config");
    w.mesh.wait_applied(&before, T).expect("applied");
    outbound(&w, &web, "shop/web", v4(&api, PORT), "redirected");
}

#[test]
fn capture_inbound_any_port_keeps_original_port() {
    let _g = serial();
    let Some(w) = world(
        "capture_inbound_any_port_keeps_original_port",
        &[31337],
        |c| c,
        &[],
    ) else {
        return;
    };
    let (batch, api) = (w.batch(), w.api());
    for port in [PORT, 31337] {
        let hello = exchange(&batch, v4(&api, port));
        assert_eq!(
            hello.local,
            v4(&api, port),
            "the app got the connection on its own port"
        );
        wait_event(
            &w,
            1,
            "sk_lookup",
            "redirected",
            Some("shop/api"),
            v4(&api, port),
        );
        let line = wait_access(&w, 1, "inbound", v4(&api, port));
        assert_eq!(
            line["src"]
                .as_str()
                .map(|s| s.starts_with(&batch.ip4.to_string())),
            Some(true),
            "{line}"
        );
    }
}

#[test]
fn capture_direct_connections_to_agent_ports_are_refused() {
    let _g = serial();
    let Some(w) = world(
        "capture_direct_connections_to_agent_ports_are_refused",
        &[],
        |c| c,
        &[],
    ) else {
        return;
    };
    let (batch, api) = (w.batch(), w.api());
    // From another pod, straight to the agent's ports on a meshed pod: refused, never looped.
    for port in [15001u16, 15006] {
        let ns = batch.netns().expect("netns");
        // The agent resets the connection: either at once, or on the first read.
        let n = match tcp_connect_in(&ns, v4(&api, port), T) {
            Ok(mut s) => {
                s.set_read_timeout(Some(T)).expect("timeout");
                let mut buf = [0u8; 16];
                std::io::Read::read(&mut s, &mut buf).unwrap_or(0)
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
            Err(e) => panic!("connect to agent port {port}: {e}"),
        };
        assert_eq!(n, 0, "port {port} must not serve a direct connection");
    }
    let rejected = wait_for(T, "two rejections in the access log", || {
        let lines: Vec<Value> = w
            .mesh
            .agent(1)
            .access_log()
            .into_iter()
            .filter(|l| l["result"] == "foreign_peer" || l["result"] == "agent_port")
            .collect();
        (lines.len() >= 2).then_some(lines)
    })
    .expect("rejections logged");
    assert!(
        rejected.iter().any(|l| l["result"] == "foreign_peer"),
        "{rejected:?}"
    );
    assert!(
        rejected.iter().any(|l| l["result"] == "agent_port"),
        "{rejected:?}"
    );
    // The pod still works normally afterwards.
    exchange(&batch, v4(&api, PORT));
}

#[test]
fn capture_agent_connections_are_not_recaptured() {
    let _g = serial();
    let Some(w) = world(
        "capture_agent_connections_are_not_recaptured",
        &[],
        |c| c,
        &[],
    ) else {
        return;
    };
    let (web, api) = (w.web(), w.api());
    let before_redirected = w
        .mesh
        .agent(0)
        .decision_count("connect4", "redirected")
        .expect("count");
    const N: u64 = 5;
    for _ in 0..N {
        exchange(&web, v4(&api, PORT));
    }
    wait_for(T, "5 outbound access lines", || {
        (access_lines(&w, 0, "outbound", v4(&api, PORT)).len() as u64 >= N).then_some(())
    })
    .expect("access lines");
    let a0 = w.mesh.agent(0);
    // Exactly one redirect per application connection: the agent's own upstream connects were
    // seen (agent_socket) and passed, never redirected again.
    assert_eq!(
        a0.decision_count("connect4", "redirected").expect("count") - before_redirected,
        N
    );
    assert!(
        a0.decision_count("connect4", "agent_socket")
            .expect("count")
            >= N
    );
    // On the destination node, the agent's delivery to the app is recognised as the pod's own.
    assert!(
        w.mesh
            .agent(1)
            .decision_count("sk_lookup", "self")
            .expect("count")
            >= N
    );
    assert_eq!(
        access_lines(&w, 0, "outbound", v4(&api, PORT)).len() as u64,
        N
    );
}

#[test]
fn capture_ipv6_works_like_ipv4() {
    let _g = serial();
    let Some(w) = world("capture_ipv6_works_like_ipv4", &[], |c| c, &[]) else {
        return;
    };
    let (web, api, batch) = (w.web(), w.api(), w.batch());
    let hello = exchange(&web, v6(&api, PORT));
    assert_eq!(hello.local, v6(&api, PORT));
    wait_event(
        &w,
        0,
        "connect6",
        "redirected",
        Some("shop/web"),
        v6(&api, PORT),
    );
    let line = wait_access(&w, 0, "outbound", v6(&api, PORT));
    assert_eq!(line["pod"], "shop/web");
    // Inbound over IPv6 from an unmeshed pod.
    let hello = exchange(&batch, v6(&api, PORT));
    assert_eq!(hello.local, v6(&api, PORT));
    wait_event(
        &w,
        1,
        "sk_lookup",
        "redirected",
        Some("shop/api"),
        v6(&api, PORT),
    );
}

#[test]
fn capture_unenrol_stops_capture_immediately() {
    let _g = serial();
    let Some(mut w) = world("capture_unenrol_stops_capture_immediately", &[], |c| c, &[]) else {
        return;
    };
    let (web, api) = (w.web(), w.api());
    outbound(&w, &web, "shop/web", v4(&api, PORT), "redirected");
    let redirected = w
        .mesh
        .agent(0)
        .decision_count("connect4", "redirected")
        .expect("count");

    let before = w.mesh.applied_counts();
    w.mesh.config.set_meshed("shop", false);
    w.mesh.write_config().expect("write config");
    w.mesh.wait_applied(&before, T).expect("applied");
    // The very next connection is not captured.
    exchange(&web, v4(&api, PORT));
    assert_eq!(
        w.mesh
            .agent(0)
            .decision_count("connect4", "redirected")
            .expect("count"),
        redirected,
        "a connect was redirected after the namespace left the mesh"
    );
    let dump = w.mesh.agent(0).get_json("/config_dump").expect("dump");
    assert_eq!(dump["pods"].as_array().map(Vec::len), Some(0), "{dump}");
    assert_eq!(dump["maps"]["NETNS_PODS"], 0, "{dump}");
    assert_eq!(dump["maps"]["IP_PODS"], 0, "{dump}");

    // And enrolling again resumes capture.
    let before = w.mesh.applied_counts();
    w.mesh.config.set_meshed("shop", true);
    w.mesh.write_config().expect("write config");
    w.mesh.wait_applied(&before, T).expect("applied");
    exchange(&web, v4(&api, PORT));
    assert_eq!(
        w.mesh
            .agent(0)
            .decision_count("connect4", "redirected")
            .expect("count"),
        redirected + 1
    );
}

/// Programs named `weft_*` loaded in the kernel right now (machine-wide).
fn weft_programs() -> usize {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str().is_some_and(|n| n.starts_with("weft_")))
        .count()
}

/// Maps of the Weft object (one set per agent), by a name only Weft uses.
fn weft_maps() -> usize {
    aya::maps::loaded_maps()
        .filter_map(Result::ok)
        .filter(|m| m.name_as_str() == Some("ORIG_BY_TUPLE"))
        .count()
}

/// bpf links whose program is a `weft_*` program.
fn weft_links() -> usize {
    let ids: std::collections::HashSet<u32> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str().is_some_and(|n| n.starts_with("weft_")))
        .map(|p| p.id())
        .collect();
    aya::programs::loaded_links()
        .filter_map(Result::ok)
        .filter(|l| ids.contains(&l.program_id()))
        .count()
}

#[test]
fn capture_agent_restart_leaks_no_attachments() {
    let _g = serial();
    let Some(mut w) = world(
        "capture_agent_restart_leaks_no_attachments",
        &[],
        |c| c,
        &[],
    ) else {
        return;
    };
    let (web, api) = (w.web(), w.api());
    // Two agents: 4 programs each; links: 3 cgroup links each + 1 sk_lookup link per meshed pod.
    let programs_running = weft_programs();
    let links_running = weft_links();
    let maps_running = weft_maps();
    assert!(
        maps_running >= 2,
        "{maps_running} ORIG_BY_TUPLE maps with two agents"
    );
    assert!(
        programs_running >= 8,
        "{programs_running} weft programs with two agents"
    );

    // Crash (SIGKILL) the agent of node 1: everything it attached must go with it.
    w.mesh.agents[0].kill();
    let after_crash = wait_for(T, "node 1's programs to be released", || {
        let n = weft_programs();
        (n == programs_running - 4).then_some(n)
    });
    assert!(
        after_crash.is_ok(),
        "programs after crash: {} (was {programs_running})",
        weft_programs()
    );
    assert_eq!(
        weft_links(),
        links_running - 4,
        "3 cgroup links + 1 sk_lookup link released"
    );

    // Without its agent, node 1's pod is not captured (no stale redirect to a dead listener).
    let hello = exchange(&web, v4(&api, PORT));
    assert_eq!(hello.local, v4(&api, PORT));

    // Restart: the new agent captures again, and the totals are back where they were.
    let config_path = w.mesh.config_path().to_path_buf();
    let dir = w.mesh.dir().to_path_buf();
    let node = w.mesh.lab.node(0).clone();
    let mut agent =
        weft_tests::mesh::AgentProcess::start(&node, &config_path, &dir, &[]).expect("restart");
    agent
        .wait_ready(Duration::from_secs(20))
        .expect("ready after restart");
    w.mesh.agents[0] = agent;
    wait_for(T, "node 1's pod to be enrolled again", || {
        let d = w.mesh.agent(0).get_json("/config_dump").ok()?;
        (d["pods"].as_array()?.len() == 1).then_some(())
    })
    .expect("enrolled");
    assert_eq!(weft_programs(), programs_running);
    assert_eq!(weft_links(), links_running);
    assert_eq!(weft_maps(), maps_running);
    outbound(&w, &web, "shop/web", v4(&api, PORT), "redirected");

    // A clean stop releases everything too.
    w.mesh.agents[0].stop(Duration::from_secs(5));
    wait_for(T, "programs released after SIGTERM", || {
        (weft_programs() == programs_running - 4).then_some(())
    })
    .expect("released");
}
