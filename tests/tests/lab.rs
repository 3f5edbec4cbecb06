//! Root-only tests of the lab itself: shape, connectivity, isolation between concurrent labs,
//! processes in pods, and teardown. Every test calls `require_root` first.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use weft_netns::NetNs;
use weft_tests::{Lab, LabSpec, Pod, TestServer, ask, require_root, tcp_connect_in};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Namespaces whose name carries `run_id`.
fn netns_of(run_id: &str) -> Vec<String> {
    let prefix = format!("weft-{run_id}-");
    let mut names: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn cgroup_of(run_id: &str) -> std::path::PathBuf {
    weft_tests::cgroup2_mount()
        .expect("cgroup2")
        .join(format!("weft-{run_id}"))
}

fn assert_gone(run_id: &str) {
    assert_eq!(netns_of(run_id), Vec::<String>::new(), "netns left behind");
    let cg = cgroup_of(run_id);
    assert!(!cg.exists(), "cgroup {} left behind", cg.display());
    let state = Path::new("/run/weft-lab").join(format!("{run_id}.json"));
    assert!(
        !state.exists(),
        "state file {} left behind",
        state.display()
    );
}

/// One TestServer exchange from `from` to `to`; checks the hello and the echo.
fn exchange(from: &Pod, to: SocketAddr, payload: &[u8]) {
    let ns = from.netns().expect("client netns");
    let mut stream = tcp_connect_in(&ns, to, CONNECT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{} -> {to}: {e}", from.name));
    let (hello, echoed) = ask(&mut stream, payload).expect("ask");
    let expected_peer: IpAddr = if to.is_ipv4() {
        from.ip4.into()
    } else {
        from.ip6.into()
    };
    assert_eq!(hello.peer.ip(), expected_peer, "no NAT between pods");
    assert_eq!(hello.local, to);
    assert_eq!(echoed, payload);
}

/// Waits for a child to exit, for at most `limit`; kills it if it does not.
fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn lab_up_two_nodes_two_pods_has_the_documented_shape() {
    if !require_root("lab_up_two_nodes_two_pods_has_the_documented_shape") {
        return;
    }
    let started = Instant::now();
    let lab = Lab::up(LabSpec::default()).expect("lab up");
    eprintln!("lab {} up in {:?}", lab.run_id(), started.elapsed());
    let id = lab.run_id().to_owned();
    assert_eq!(id.len(), 6);

    assert_eq!(lab.nodes().len(), 2);
    assert_eq!(lab.pods().count(), 4);
    assert_eq!(lab.fabric_netns(), format!("weft-{id}-fab"));
    let n2 = lab.node(1);
    assert_eq!((n2.index, n2.name.as_str()), (2, "n2"));
    assert_eq!(n2.netns, format!("weft-{id}-n2"));
    assert_eq!(n2.ip4.to_string(), "198.19.0.2");
    assert_eq!(n2.ip6.to_string(), "fd77:6566:ff::2");
    let p = lab.pod(1, 0);
    assert_eq!(p.name, "n2p1");
    assert_eq!(p.netns, format!("weft-{id}-n2p1"));
    assert_eq!(p.ip4.to_string(), "198.18.2.11");
    assert_eq!(p.ip6.to_string(), "fd77:6566:2::b");
    assert_eq!(p.cgroup, cgroup_of(&id).join("n2p1"));

    let mut expected: Vec<String> = ["fab", "n1", "n1p1", "n1p2", "n2", "n2p1", "n2p2"]
        .iter()
        .map(|m| format!("weft-{id}-{m}"))
        .collect();
    expected.sort();
    assert_eq!(netns_of(&id), expected);
    for pod in lab.pods() {
        assert!(pod.cgroup.is_dir(), "{}", pod.cgroup.display());
        assert!(pod.netns_path().exists());
        pod.netns().expect("pod netns opens");
    }

    // The node namespace has its fabric address, its pod bridge, and forwards.
    let out = lab
        .node(0)
        .command("ip")
        .args(["-br", "address", "show"])
        .output()
        .expect("ip in node netns");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("198.19.0.1/24"), "{text}");
    assert!(text.contains("fd77:6566:1::1/64"), "{text}");
    let out = lab
        .node(0)
        .command("cat")
        .arg("/proc/sys/net/ipv4/ip_forward")
        .output()
        .expect("cat");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");

    // Status sees it (no state file: it is not kept).
    let status = Lab::status().expect("status");
    let mine = status
        .iter()
        .find(|s| s.run_id == id)
        .expect("status lists the lab");
    assert!(!mine.kept());
    assert!(mine.is_complete(), "{mine:?}");
    assert_eq!(mine.nodes, lab.nodes());
    assert_eq!(mine.pods, lab.pods().cloned().collect::<Vec<_>>());

    let started = Instant::now();
    drop(lab);
    eprintln!("lab {id} down in {:?}", started.elapsed());
    assert_gone(&id);
}

#[test]
fn lab_cross_node_pod_tcp_works_over_v4_and_v6() {
    if !require_root("lab_cross_node_pod_tcp_works_over_v4_and_v6") {
        return;
    }
    let lab = Lab::up(LabSpec::default()).expect("lab up");
    let server_pod = lab.pod(1, 1);
    let ns = server_pod.netns().expect("server netns");
    let v4 = TestServer::start(&ns, SocketAddr::new(server_pod.ip4.into(), 8080)).expect("v4");
    let v6 = TestServer::start(&ns, SocketAddr::new(server_pod.ip6.into(), 8080)).expect("v6");
    // Cross-node, and same-node for good measure.
    for client in [lab.pod(0, 0), lab.pod(0, 1), lab.pod(1, 0)] {
        exchange(client, v4.local_addr(), b"over IPv4");
        exchange(client, v6.local_addr(), &vec![0x5a; 64 * 1024]);
    }
    assert_eq!(v4.accepted(), 3);
    assert_eq!(v6.accepted(), 3);
    // Nothing listens on another port: refused, not hanging.
    let client = lab.pod(0, 0).netns().expect("client netns");
    let err = tcp_connect_in(
        &client,
        SocketAddr::new(server_pod.ip6.into(), 9),
        CONNECT_TIMEOUT,
    )
    .expect_err("nothing listens on port 9");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
}

#[test]
fn lab_two_concurrent_labs_do_not_collide() {
    if !require_root("lab_two_concurrent_labs_do_not_collide") {
        return;
    }
    let spec = LabSpec {
        nodes: 2,
        pods_per_node: 1,
    };
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| Lab::up(spec));
        let b = s.spawn(|| Lab::up(spec));
        (
            a.join().expect("thread a").expect("lab a"),
            b.join().expect("thread b").expect("lab b"),
        )
    });
    assert_ne!(a.run_id(), b.run_id());
    let (na, nb) = (netns_of(a.run_id()), netns_of(b.run_id()));
    assert_eq!(na.len(), 5);
    assert_eq!(nb.len(), 5);
    assert!(na.iter().all(|n| !nb.contains(n)));
    // Same addresses in both labs, yet each lab only reaches its own pods: a server in lab A's
    // n2p1 is seen by lab A's n1p1, while lab B's n2p1 has nothing listening.
    let target = SocketAddr::new(a.pod(1, 0).ip4.into(), 7000);
    let _server = TestServer::start(&a.pod(1, 0).netns().expect("netns"), target).expect("srv");
    exchange(a.pod(0, 0), target, b"lab a");
    let err = tcp_connect_in(
        &b.pod(0, 0).netns().expect("netns"),
        target,
        CONNECT_TIMEOUT,
    )
    .expect_err("lab b must not reach lab a");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");

    let (ida, idb) = (a.run_id().to_owned(), b.run_id().to_owned());
    drop(a);
    assert_gone(&ida);
    assert_eq!(netns_of(&idb).len(), 5, "dropping lab a touched lab b");
    drop(b);
    assert_gone(&idb);
}

#[test]
fn lab_pod_command_runs_in_the_pod_and_drop_kills_it() {
    if !require_root("lab_pod_command_runs_in_the_pod_and_drop_kills_it") {
        return;
    }
    let lab = Lab::up(LabSpec::default()).expect("lab up");
    let id = lab.run_id().to_owned();
    let pod = lab.pod(1, 0).clone();
    let mut child = pod
        .command("sleep")
        .arg("600")
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn in pod");
    let pid = child.id();

    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
    let line = cgroup
        .lines()
        .find(|l| l.starts_with("0::"))
        .expect("cgroup2 line");
    assert_eq!(line, format!("0::/weft-{id}/n2p1"));
    let procs = std::fs::read_to_string(pod.cgroup.join("cgroup.procs")).expect("procs");
    assert!(procs.lines().any(|l| l == pid.to_string()), "{procs}");

    let child_ns = std::fs::metadata(format!("/proc/{pid}/ns/net")).expect("child netns");
    let pod_ns = std::fs::metadata(pod.netns_path()).expect("pod netns");
    assert_eq!(child_ns.ino(), pod_ns.ino(), "child is in the pod netns");
    let own_ns = std::fs::metadata("/proc/self/ns/net").expect("own netns");
    assert_ne!(own_ns.ino(), pod_ns.ino());

    // A command that fails to join its pod reports it at spawn time.
    let mut gone = pod.clone();
    gone.cgroup = gone.cgroup.with_file_name("does-not-exist");
    let err = gone.command("true").spawn().expect_err("no such cgroup");
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{err}");

    drop(lab);
    let status = wait_exit(&mut child, Duration::from_secs(5)).expect("teardown kills pods");
    assert!(!status.success(), "{status:?}");
    assert_gone(&id);
}

#[test]
fn lab_drop_leaves_nothing_behind() {
    if !require_root("lab_drop_leaves_nothing_behind") {
        return;
    }
    let lab = Lab::up(LabSpec {
        nodes: 3,
        pods_per_node: 1,
    })
    .expect("lab up");
    let id = lab.run_id().to_owned();
    assert_eq!(netns_of(&id).len(), 7);
    // Keep something busy inside the lab: a process in a pod (with a child of its own) and
    // an open namespace handle.
    let mut child = lab
        .pod(2, 0)
        .command("sh")
        .args(["-c", "sleep 600 & wait"])
        .spawn()
        .expect("spawn");
    let handle = lab.node(0).netns().expect("node netns");
    drop(lab);
    assert!(wait_exit(&mut child, Duration::from_secs(5)).is_some());
    assert_gone(&id);
    // The open handle keeps the namespace itself alive, but nothing names it any more.
    handle.run(|| ()).expect("still enterable");
}

#[test]
fn lab_keep_leaves_it_running_until_down() {
    if !require_root("lab_keep_leaves_it_running_until_down") {
        return;
    }
    let lab = Lab::up(LabSpec {
        nodes: 2,
        pods_per_node: 1,
    })
    .expect("lab up");
    let nodes = lab.nodes().to_vec();
    let id = lab.keep();
    assert_eq!(netns_of(&id).len(), 5, "kept lab survives");
    let status = Lab::status().expect("status");
    let mine = status.iter().find(|s| s.run_id == id).expect("listed");
    assert!(mine.kept());
    assert!(mine.is_complete(), "{mine:?}");
    assert_eq!(mine.nodes, nodes);

    let removed = Lab::down(&id).expect("down");
    assert!(
        removed.iter().any(|r| r.contains("state file")),
        "{removed:?}"
    );
    assert_eq!(
        removed.iter().filter(|r| r.starts_with("netns ")).count(),
        5
    );
    assert_gone(&id);
    assert!(Lab::down(&id).expect("down again").is_empty(), "idempotent");
    assert!(matches!(
        Lab::down("../etc"),
        Err(weft_tests::LabError::InvalidRunId(_))
    ));
}

#[test]
fn lab_left_by_a_dead_process_is_removed_by_the_next_lab() {
    if !require_root("lab_left_by_a_dead_process_is_removed_by_the_next_lab") {
        return;
    }
    let lab = Lab::up(LabSpec {
        nodes: 1,
        pods_per_node: 1,
    })
    .expect("lab up");
    let id = lab.run_id().to_string();
    let owner = std::path::Path::new(weft_tests::lab::STATE_DIR).join(format!("{id}.owner"));
    assert!(owner.exists(), "a running lab records its owner");
    // As if its process had been killed: no destructor, and the recorded owner is gone.
    std::mem::forget(lab);
    std::fs::write(&owner, "4194303 1").expect("owner file");
    assert_eq!(netns_of(&id).len(), 3, "leaked");
    let next = Lab::up(LabSpec {
        nodes: 1,
        pods_per_node: 1,
    })
    .expect("next lab up");
    assert_gone(&id);
    assert!(!owner.exists());
    // A live owner's lab is never touched.
    assert_eq!(netns_of(next.run_id()).len(), 3);
    drop(next);
}

#[test]
fn lab_other_shapes_come_up() {
    if !require_root("lab_other_shapes_come_up") {
        return;
    }
    // One node (pods talk through cni0 only, or to their gateway), and nodes without pods
    // (node to node).
    for (nodes, pods_per_node) in [(1, 2), (1, 1), (3, 0)] {
        let lab = Lab::up(LabSpec {
            nodes,
            pods_per_node,
        })
        .unwrap_or_else(|e| panic!("{nodes}x{pods_per_node}: {e}"));
        assert_eq!(lab.pods().count(), nodes * pods_per_node);
        let id = lab.run_id().to_owned();
        drop(lab);
        assert_gone(&id);
    }
    let err = Lab::up(LabSpec {
        nodes: 0,
        pods_per_node: 1,
    })
    .expect_err("zero nodes");
    assert!(matches!(err, weft_tests::LabError::InvalidSpec(_)), "{err}");
}

#[test]
fn lab_netns_run_switches_back_after_a_panic() {
    if !require_root("lab_netns_run_switches_back_after_a_panic") {
        return;
    }
    let lab = Lab::up(LabSpec {
        nodes: 1,
        pods_per_node: 1,
    })
    .expect("lab up");
    let pod_ns = lab.pod(0, 0).netns().expect("pod netns");
    let home = NetNs::current()
        .and_then(|n| n.cookie())
        .expect("own cookie");
    assert_ne!(pod_ns.cookie().expect("pod cookie"), home);
    let caught = std::panic::catch_unwind(|| {
        pod_ns
            .run(|| panic!("intentional panic inside the pod (this test expects it)"))
            .expect("entered")
    });
    assert!(caught.is_err());
    let now = NetNs::current()
        .and_then(|n| n.cookie())
        .expect("own cookie");
    assert_eq!(
        now, home,
        "thread left in the pod's namespace after a panic"
    );
}
