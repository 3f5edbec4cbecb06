//! End-to-end tests of the control plane in no-cluster mode (root; fail, not skip, when
//! CI=true): a `weft-controller --config-dir` on node 1 streams each node's view over TLS to
//! the agents, which authenticate with per-node bootstrap tokens.

use std::time::{Duration, Instant};

use serde_json::Value;
use weft_tests::mesh::{MeshConfig, wait_for};
use weft_tests::scenario::*;

fn dump(w: &World, node: usize) -> Value {
    w.mesh
        .agent(node)
        .get_json("/config_dump")
        .expect("config dump")
}

fn pods_enrolled(w: &World, node: usize) -> usize {
    dump(w, node)["pods"].as_array().map_or(0, Vec::len)
}

fn set_web(c: &mut MeshConfig, f: impl FnOnce(&mut weft_tests::mesh::WorkloadSpec)) {
    if let Some(wl) = c.workloads.iter_mut().find(|w| w.name == "web") {
        f(wl);
    }
}

#[test]
fn control_plane_namespace_label_enrols_and_unenrols_within_a_second() {
    let _g = serial();
    let Some(mut w) = world_with_controller(
        "control_plane_namespace_label_enrols_and_unenrols_within_a_second",
        |mut c| {
            c.set_meshed("shop", false);
            c
        },
    ) else {
        return;
    };
    let (web, api) = (w.web(), w.api());
    assert_eq!(pods_enrolled(&w, 0), 0);
    // The agents synced from the controller.
    assert_eq!(dump(&w, 0)["config"]["synced"], true, "{}", dump(&w, 0));

    w.mesh.config.set_meshed("shop", true);
    let start = Instant::now();
    w.mesh.write_config().expect("write");
    wait_for(
        Duration::from_secs(1),
        "web enrolled on node 1 within 1 s",
        || (pods_enrolled(&w, 0) == 1).then_some(()),
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}; controller log:\n{}",
            w.mesh
                .controller
                .as_ref()
                .map(|c| c.log_text())
                .unwrap_or_default()
        )
    });
    eprintln!("enrolled after {:?}", start.elapsed());
    wait_for(Duration::from_secs(1), "api enrolled on node 2", || {
        (pods_enrolled(&w, 1) == 1).then_some(())
    })
    .expect("enrolled");
    outbound(&w, &web, "shop/web", v4(&api, PORT), "redirected");

    w.mesh.config.set_meshed("shop", false);
    w.mesh.write_config().expect("write");
    wait_for(Duration::from_secs(1), "web unenrolled within 1 s", || {
        (pods_enrolled(&w, 0) == 0).then_some(())
    })
    .expect("unenrolled");
    let before = w
        .mesh
        .agent(0)
        .decision_count("connect4", "redirected")
        .expect("count");
    exchange(&web, v4(&api, PORT));
    assert_eq!(
        w.mesh
            .agent(0)
            .decision_count("connect4", "redirected")
            .expect("count"),
        before
    );
}

#[test]
fn control_plane_opt_out_label_and_exclusion_annotations_take_effect() {
    let _g = serial();
    let Some(mut w) = world_with_controller(
        "control_plane_opt_out_label_and_exclusion_annotations_take_effect",
        |c| c,
    ) else {
        return;
    };
    let (web, api) = (w.web(), w.api());
    outbound(&w, &web, "shop/web", v4(&api, PORT), "redirected");

    set_web(&mut w.mesh.config, |wl| {
        wl.labels.insert("weft.dev/mesh".into(), "disabled".into());
    });
    w.mesh.write_config().expect("write");
    wait_for(T, "web opted out", || {
        (dump(&w, 0)["pods"][0]["opted_out"] == true).then_some(())
    })
    .expect("opted out");
    outbound(&w, &web, "shop/web", v4(&api, PORT), "opted_out");

    set_web(&mut w.mesh.config, |wl| {
        wl.labels.clear();
        wl.annotations
            .insert("weft.dev/exclude-outbound-ports".into(), PORT.to_string());
    });
    w.mesh.write_config().expect("write");
    wait_for(T, "web's exclusion applied", || {
        (dump(&w, 0)["pods"][0]["exclusions"]["outbound_ports"][0] == PORT).then_some(())
    })
    .expect("exclusion");
    outbound(&w, &web, "shop/web", v4(&api, PORT), "excluded_port");
}

#[test]
fn control_plane_bad_yaml_is_reported_precisely_and_changes_nothing() {
    let _g = serial();
    let Some(w) = world_with_controller(
        "control_plane_bad_yaml_is_reported_precisely_and_changes_nothing",
        |c| c,
    ) else {
        return;
    };
    let (web, api) = (w.web(), w.api());
    let applied = dump(&w, 0)["config"]["applied"].as_u64().unwrap_or(0);
    let bad = w.mesh.config_path().with_file_name("broken.yaml");
    std::fs::write(
        &bad,
        "apiVersion: weft.dev/v1alpha1\nkind: Workload\nmetadata: {name: x, namespace: shop}\nspec: {node: n1, ips: [not-an-ip], netns: /x}\n",
    )
    .expect("write bad file");
    let controller = w.mesh.controller.as_ref().expect("controller");
    let msg = wait_for(T, "the controller to report the bad file", || {
        controller
            .log_text()
            .lines()
            .find(|l| l.contains("broken.yaml"))
            .map(str::to_string)
    })
    .expect("reported");
    assert!(
        msg.contains("document 0") && msg.contains("spec.ips[0]"),
        "{msg}"
    );
    // Nothing changed on the agents, and traffic is still captured.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        dump(&w, 0)["config"]["applied"].as_u64().unwrap_or(0),
        applied
    );
    assert_eq!(pods_enrolled(&w, 0), 1);
    outbound(&w, &web, "shop/web", v4(&api, PORT), "redirected");
}

#[test]
fn control_plane_controller_outage_interrupts_nothing_and_agents_converge() {
    let _g = serial();
    let Some(mut w) = world_with_controller(
        "control_plane_controller_outage_interrupts_nothing_and_agents_converge",
        |c| c,
    ) else {
        return;
    };
    let (web, api) = (w.web(), w.api());
    // A long-lived connection across the outage.
    let ns = web.netns().expect("netns");
    let mut live = weft_tests::tcp_connect_in(&ns, v4(&api, PORT), T).expect("connect");
    live.set_read_timeout(Some(T)).expect("timeout");
    weft_tests::read_hello(&mut live).expect("hello");

    w.mesh.kill_controller();
    wait_for(T, "agents to notice the controller is gone", || {
        (dump(&w, 0)["config"]["connected"] == false).then_some(())
    })
    .expect("disconnected");
    // Enrolment and capture go on.
    assert_eq!(pods_enrolled(&w, 0), 1);
    outbound(&w, &web, "shop/web", v4(&api, PORT), "redirected");
    use std::io::{Read, Write};
    live.write_all(b"still here")
        .expect("write on the live connection");
    let mut buf = [0u8; 10];
    live.read_exact(&mut buf)
        .expect("echo on the live connection");
    assert_eq!(&buf, b"still here");

    // A change made while the controller is down reaches the agents once it is back.
    w.mesh.config.set_meshed("shop", false);
    w.mesh.write_config().expect("write");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(pods_enrolled(&w, 0), 1, "nobody applied the change yet");
    w.mesh.start_controller().expect("controller restart");
    wait_for(
        Duration::from_secs(20),
        "agents to converge after the restart",
        || (pods_enrolled(&w, 0) == 0 && pods_enrolled(&w, 1) == 0).then_some(()),
    )
    .expect("converged");
    assert_eq!(dump(&w, 0)["config"]["connected"], true);
}

#[test]
fn control_plane_agent_restarted_while_controller_down_recovers_from_snapshot() {
    let _g = serial();
    let Some(mut w) = world_with_controller(
        "control_plane_agent_restarted_while_controller_down_recovers_from_snapshot",
        |c| c,
    ) else {
        return;
    };
    let (web, api) = (w.web(), w.api());
    w.mesh.kill_controller();
    w.mesh
        .restart_agent(0)
        .expect("agent restarts and becomes ready without a controller");
    wait_for(T, "web enrolled from the snapshot", || {
        (pods_enrolled(&w, 0) == 1).then_some(())
    })
    .expect("enrolled");
    assert_eq!(dump(&w, 0)["config"]["connected"], false);
    outbound(&w, &web, "shop/web", v4(&api, PORT), "redirected");
}

#[test]
fn control_plane_refuses_agents_without_valid_node_credentials() {
    let _g = serial();
    let Some(w) = world_with_controller(
        "control_plane_refuses_agents_without_valid_node_credentials",
        |c| c,
    ) else {
        return;
    };
    let node = w.mesh.lab.node(0).clone();
    let dir = w.mesh.dir().join("intruder");
    std::fs::create_dir_all(&dir).expect("dir");
    let mut source = w.mesh.agent_source(0);
    // A wrong token, then node 2's token used by node 1.
    let wrong = dir.join("wrong-token");
    std::fs::write(&wrong, "0123456789abcdef0123456789abcdef").expect("token");
    let cases = [
        (wrong, "unknown bootstrap token"),
        (w.mesh.dir().join("token-n2"), "belongs to node n2"),
    ];
    for (token, expected) in cases {
        if let Some(i) = source.iter().position(|a| a == "--bootstrap-token-file") {
            source[i + 1] = token.display().to_string();
        }
        if let Some(i) = source.iter().position(|a| a == "--state-dir") {
            source[i + 1] = dir.join("state").display().to_string();
        }
        // A second agent on node 1 with another admin port.
        let agent = weft_tests::mesh::AgentProcess::start_with_source(
            &node,
            &source,
            &dir,
            &["--admin-addr", "127.0.0.1:15100"],
        )
        .expect("start");
        let log = wait_for(T, &format!("the agent to log `{expected}`"), || {
            let text = std::fs::read_to_string(agent.log_path()).unwrap_or_default();
            text.contains(expected).then_some(text)
        })
        .expect("refused");
        assert!(!log.contains("connected to the controller"), "{log}");
        drop(agent);
        let _ = std::fs::remove_file(dir.join("agent-n1.log"));
    }
}

#[test]
fn control_plane_services_and_policies_reach_every_agent() {
    let _g = serial();
    let Some(mut w) = world_with_controller(
        "control_plane_services_and_policies_reach_every_agent",
        |mut c| {
            if let Some(api) = c.workloads.iter_mut().find(|w| w.name == "api") {
                api.labels.insert("app".into(), "api".into());
            }
            c
        },
    ) else {
        return;
    };
    let service = |vip: &str| {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "api", "namespace": "shop"},
            "spec": {"clusterIP": vip, "selector": {"app": "api"},
                     "ports": [{"name": "http", "port": 80, "targetPort": PORT}]},
        })
    };
    w.mesh.config.raw.push(service("198.18.100.1"));
    w.mesh.write_config().expect("write");
    let api_ip = w.api().ip4.to_string();
    for node in 0..2 {
        let svc = wait_for(T, &format!("service on node {node}"), || {
            let d = dump(&w, node);
            d["services"].as_array()?.first().cloned()
        })
        .expect("service streamed");
        assert_eq!(svc["hostname"], "api.shop.svc.cluster.local", "{svc}");
        assert_eq!(svc["vips"][0], "198.18.100.1");
        assert_eq!(svc["ports"][0]["target_port"], PORT);
        assert_eq!(svc["endpoints"][0]["ip4"], api_ip.as_str(), "{svc}");
    }
    // A change to the service reaches both nodes; removing it removes it everywhere.
    w.mesh.config.raw = vec![service("198.18.100.2")];
    w.mesh.write_config().expect("write");
    for node in 0..2 {
        wait_for(T, "updated VIP", || {
            (dump(&w, node)["services"][0]["vips"][0] == "198.18.100.2").then_some(())
        })
        .expect("updated");
    }
    // Policies travel the same way (enforcement is the L4 issue's).
    w.mesh.config.raw.push(serde_json::json!({
        "apiVersion": "weft.dev/v1alpha1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "only-web", "namespace": "shop"},
        "spec": {"action": "ALLOW", "selector": {"matchLabels": {"app": "api"}},
                 "rules": [{"from": [{"namespaces": ["shop"]}], "to": [{"ports": [PORT]}]}]},
    }));
    w.mesh.write_config().expect("write");
    for node in 0..2 {
        let p = wait_for(T, "policy streamed", || {
            dump(&w, node)["policies"].as_array()?.first().cloned()
        })
        .expect("policy");
        assert_eq!(p["action"], "Allow", "{p}");
        assert_eq!(p["rules"][0]["to"][0]["ports"][0], PORT, "{p}");
    }
    w.mesh.config.raw.clear();
    w.mesh.write_config().expect("write");
    for node in 0..2 {
        wait_for(T, "policy removed", || {
            (dump(&w, node)["policies"].as_array().map(Vec::len) == Some(0)).then_some(())
        })
        .expect("removed");
        wait_for(T, "service removed", || {
            (dump(&w, node)["services"].as_array().map(Vec::len) == Some(0)).then_some(())
        })
        .expect("removed");
    }
}

#[test]
fn control_plane_reconnecting_agent_resumes_without_a_full_resend() {
    let _g = serial();
    let Some(mut w) = world_with_controller(
        "control_plane_reconnecting_agent_resumes_without_a_full_resend",
        |c| c,
    ) else {
        return;
    };
    let syncs = |w: &World| -> Vec<Value> {
        w.mesh
            .agent(0)
            .log_lines()
            .into_iter()
            .filter(|l| l["message"] == "synced with the controller")
            .collect()
    };
    let first = syncs(&w);
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(
        first[0]["upserts"], 7,
        "the first sync: node 1's two workloads, the four peers and the trust bundle"
    );
    w.mesh.kill_controller();
    w.mesh.start_controller().expect("controller restart");
    let again = wait_for(Duration::from_secs(20), "a second sync", || {
        let s = syncs(&w);
        (s.len() == 2).then_some(s)
    })
    .expect("resynced");
    assert_eq!(
        again[1]["upserts"], 0,
        "nothing changed, nothing resent: {:?}",
        again[1]
    );
    assert_eq!(again[1]["removes"], 0);
    assert_eq!(again[1]["resources"], 7);
}
