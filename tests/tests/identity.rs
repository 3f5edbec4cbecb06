//! Workload identities end to end in the lab (root; fail, not skip, when CI=true): agents obtain
//! SVIDs from the controller's CA for the meshed pods of their own node, and only those.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use weft_tests::mesh::wait_for;
use weft_tests::scenario::*;
use weft_tests::{ask, tcp_connect_in};

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

/// An operator's CA made with the openssl CLI: a root and an intermediate under it (ECDSA
/// P-256, PKCS#8 keys, as `--ca-cert/--ca-key/--trust-bundle` expect).
struct OperatorCa {
    root: PathBuf,
    intermediate: PathBuf,
    intermediate_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("running openssl (is it installed?): {e}"));
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn operator_ca(dir: &Path, name: &str) -> OperatorCa {
    let dir = dir.join(format!("ca-{name}"));
    std::fs::create_dir_all(&dir).expect("CA directory");
    let ec = ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"];
    openssl(
        &dir,
        &[&["genpkey"][..], &ec, &["-out", "root-key.pem"]].concat(),
    );
    openssl(
        &dir,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "root-key.pem",
            "-subj",
            &format!("/CN=Weft test root {name}"),
            "-days",
            "3650",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-out",
            "root.pem",
        ],
    );
    openssl(
        &dir,
        &[&["genpkey"][..], &ec, &["-out", "intermediate-key.pem"]].concat(),
    );
    openssl(
        &dir,
        &[
            "req",
            "-new",
            "-key",
            "intermediate-key.pem",
            "-subj",
            &format!("/CN=Weft test intermediate {name}"),
            "-out",
            "intermediate.csr",
        ],
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "[v3]\nbasicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid:always\n",
    )
    .expect("extensions file");
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "intermediate.csr",
            "-CA",
            "root.pem",
            "-CAkey",
            "root-key.pem",
            "-set_serial",
            "2",
            "-days",
            "365",
            "-extfile",
            "ext.cnf",
            "-extensions",
            "v3",
            "-out",
            "intermediate.pem",
        ],
    );
    OperatorCa {
        root: dir.join("root.pem"),
        intermediate: dir.join("intermediate.pem"),
        intermediate_key: dir.join("intermediate-key.pem"),
    }
}

/// The certificate chain node `node`'s agent stored for `identity` (leaf first), and its expiry.
fn stored_chain(w: &World, node: usize, identity: &str) -> Option<(Vec<String>, i64)> {
    let name: String = identity
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let path = w
        .mesh
        .dir()
        .join(format!("agent-state-n{}/certs/{name}.json", node + 1));
    let v: Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    let chain = v["chain_pem"]
        .as_array()?
        .iter()
        .filter_map(|p| p.as_str().map(str::to_string))
        .collect();
    Some((chain, v["not_after"].as_i64()?))
}

/// The served (valid) certificate's expiry of `identity` on `node`, from `/config_dump`.
fn served_not_after(w: &World, node: usize, identity: &str) -> Option<i64> {
    certificates(w, node)
        .into_iter()
        .find(|c| c["identity"] == identity && c["valid"] == true)
        .and_then(|c| c["not_after"].as_i64())
}

/// Each connection's outcome, with the phase it started in.
type Outcomes = Arc<Mutex<Vec<(usize, Result<(), String>)>>>;

/// Continuous new connections web -> api:8080 (each one an echo check), on a thread, each
/// outcome recorded with the phase it started in; stops when told or after `max`.
struct Traffic {
    stop: Arc<AtomicBool>,
    phase: Arc<AtomicUsize>,
    outcomes: Outcomes,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(w: &World, every: Duration, max: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let phase = Arc::new(AtomicUsize::new(1));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let (web, api) = (w.web(), v4(&w.api(), PORT));
        let thread = std::thread::spawn({
            let (stop, phase, outcomes) = (stop.clone(), phase.clone(), outcomes.clone());
            move || {
                let ns = web.netns().expect("web netns");
                let start = Instant::now();
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) && start.elapsed() < max {
                    let p = phase.load(Ordering::SeqCst);
                    n += 1;
                    let payload = format!("rotation probe {n}");
                    let result = tcp_connect_in(&ns, api, T)
                        .and_then(|mut s| ask(&mut s, payload.as_bytes()))
                        .map_err(|e| e.to_string())
                        .and_then(|(_, echo)| {
                            (echo == payload.as_bytes())
                                .then_some(())
                                .ok_or_else(|| format!("wrong echo: {echo:?}"))
                        })
                        .map_err(|e| format!("connection {n} at {:?}: {e}", start.elapsed()));
                    outcomes
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((p, result));
                    std::thread::sleep(every);
                }
            }
        });
        Self {
            stop,
            phase,
            outcomes,
            thread: Some(thread),
        }
    }

    fn set_phase(&self, phase: usize) {
        self.phase.store(phase, Ordering::SeqCst);
    }

    /// Stops the thread; returns (successes per phase 1..=3, failures).
    fn finish(mut self) -> ([usize; 3], Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("traffic thread");
        }
        let mut ok = [0; 3];
        let mut failed = Vec::new();
        for (phase, r) in self
            .outcomes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            match r {
                Ok(()) => ok[phase - 1] += 1,
                Err(e) => failed.push(format!("phase {phase}: {e}")),
            }
        }
        (ok, failed)
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn identity_root_rotation_under_continuous_connections_loses_none() {
    let _g = serial();
    let Some(mut w) = world_with_controller(
        "identity_root_rotation_under_continuous_connections_loses_none",
        |c| c,
    ) else {
        return;
    };
    let begun = Instant::now();
    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
    const API: &str = "spiffe://cluster.local/ns/shop/sa/api";
    let pods = [(0, WEB), (1, API)];
    // Root A: the CA the controller generated on its first start (<state-dir>/ca). Root B:
    // the operator's new root and intermediate.
    let root_a = w.mesh.dir().join("controller/ca/root.pem");
    let ca_b = operator_ca(w.mesh.dir(), "b");
    let read = |p: &Path| std::fs::read_to_string(p).expect("PEM");
    let inter_b = read(&ca_b.intermediate);
    let both = w.mesh.dir().join("bundle-a-b.pem");
    std::fs::write(&both, read(&root_a) + &read(&ca_b.root)).expect("bundle A+B");
    for (node, id) in pods {
        wait_for(T, &format!("{id}'s first certificate"), || {
            served_not_after(&w, node, id)
        })
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", w.mesh.agent(node).log_tail(20)));
    }
    let dump = |w: &World, node: usize| w.mesh.agent(node).get_json("/config_dump").ok();
    let node_not_after = |w: &World, node: usize| {
        dump(w, node).and_then(|d| d["node_certificate"]["not_after"].as_i64())
    };

    // Phase 1: CA A, continuous new connections web -> api.
    let traffic = Traffic::start(&w, Duration::from_millis(30), Duration::from_secs(90));
    std::thread::sleep(Duration::from_secs(3));
    let t1 = begun.elapsed();

    // Phase 2: issue from B, trust A and B. Agents see the bundle change and renew every
    // certificate (workload and node) within seconds, from B.
    traffic.set_phase(2);
    let before: Vec<(i64, i64)> = pods
        .iter()
        .map(|&(node, id)| {
            (
                served_not_after(&w, node, id).unwrap_or(0),
                node_not_after(&w, node).unwrap_or(0),
            )
        })
        .collect();
    let path = |p: &Path| p.display().to_string();
    let (inter_b_path, key_b_path) = (path(&ca_b.intermediate), path(&ca_b.intermediate_key));
    w.mesh.set_controller_args(&[
        "--ca-cert",
        &inter_b_path,
        "--ca-key",
        &key_b_path,
        "--trust-bundle",
        &path(&both),
    ]);
    w.mesh.kill_controller();
    w.mesh.start_controller().expect("controller with CA B");
    let phase2 = Instant::now();
    for (&(node, id), &(workload_before, node_before)) in pods.iter().zip(&before) {
        wait_for(
            Duration::from_secs(20),
            &format!("{id} renewed under intermediate B, with both roots trusted"),
            || {
                let (chain, stored) = stored_chain(&w, node, id)?;
                let served = served_not_after(&w, node, id)?;
                let d = dump(&w, node)?;
                (d["trust_bundle_roots"] == 2
                    && chain.get(1).is_some_and(|i| i.trim() == inter_b.trim())
                    && stored > workload_before
                    && served == stored
                    && node_not_after(&w, node)? > node_before)
                    .then_some(())
            },
        )
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", w.mesh.agent(node).log_tail(30)));
    }
    let renewed_in = phase2.elapsed();
    std::thread::sleep(Duration::from_secs(3));
    let t2 = begun.elapsed();

    // Phase 3: trust B only. Agents drop root A (and renew once more, from B).
    traffic.set_phase(3);
    let before: Vec<i64> = pods
        .iter()
        .map(|&(node, id)| served_not_after(&w, node, id).unwrap_or(0))
        .collect();
    let root_b_path = path(&ca_b.root);
    w.mesh.set_controller_args(&[
        "--ca-cert",
        &inter_b_path,
        "--ca-key",
        &key_b_path,
        "--trust-bundle",
        &root_b_path,
    ]);
    w.mesh.kill_controller();
    w.mesh
        .start_controller()
        .expect("controller with root B only");
    for (&(node, id), &workload_before) in pods.iter().zip(&before) {
        wait_for(
            Duration::from_secs(20),
            &format!("node {node} trusting root B only, {id} renewed again"),
            || {
                let d = dump(&w, node)?;
                (d["trust_bundle_roots"] == 1
                    && d["config"]["connected"] == true
                    && served_not_after(&w, node, id)? > workload_before)
                    .then_some(())
            },
        )
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", w.mesh.agent(node).log_tail(30)));
    }
    std::thread::sleep(Duration::from_secs(3));
    let (ok, failed) = traffic.finish();
    let t3 = begun.elapsed();
    eprintln!(
        "root rotation: phase 1 until {t1:?}, phase 2 until {t2:?} (certificates under B after {renewed_in:?}), phase 3 until {t3:?}; successful connections per phase {ok:?}"
    );
    assert!(
        failed.is_empty(),
        "{} of {} connections failed:\n{}\nnode 1 log:\n{}\nnode 2 log:\n{}",
        failed.len(),
        failed.len() + ok.iter().sum::<usize>(),
        failed.join("\n"),
        w.mesh.agent(0).log_tail(40),
        w.mesh.agent(1).log_tail(40)
    );
    assert!(
        ok.iter().all(|&n| n >= 10),
        "connections in every phase: {ok:?}"
    );
    for node in 0..2 {
        let m = w.mesh.agent(node).metrics_text();
        assert!(
            m.contains("weft_certificate_trust_bundle_renewals_total{result=\"ok\"}"),
            "node {node}:\n{m}"
        );
        let log = w.mesh.agent(node).log_tail(400);
        assert!(log.contains("trust bundle changed"), "node {node}:\n{log}");
    }
}
