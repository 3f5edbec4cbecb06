//! The waypoint in the mesh, end to end in the lab (root; fail, not skip, when CI=true): the
//! node agents send traffic to Services bound to a waypoint (`weft.dev/use-waypoint`) through
//! HBONE to the waypoint pod, which routes it at L7 and opens its own HBONE tunnel to the
//! chosen backend.
//!
//! World (controller mode, namespace `shop` meshed and bound to waypoint `waypoint`):
//! - n1p1 `web` (the client), n1p2 `waypoint-1` (the waypoint pod, running `weft-waypoint`),
//!   n1p3 `batch` (namespace `legacy`, not meshed; a second waypoint pod `waypoint-2` in the
//!   tests of a crashed and of a replaced waypoint pod);
//! - n2p1 `api-v1`, n2p2 `api-v2`, n2p3 `other`: HTTP servers on 8080 answering their name.
//!
//! Services: `api` (→ api-v1), `api-v2`, `other` (label `weft.dev/use-waypoint: none`),
//! `tcp` (port 9000 → a [`TestServer`] on `other`: hello line first, then echo; not HTTP) and
//! the waypoint's own Service `waypoint` (port 15008).

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use weft_tests::grpc::{GrpcReply, GrpcServer, grpc_call};
use weft_tests::mesh::{
    CONTROLLER_PORT, MeshConfig, MeshLab, WorkloadSpec, metric_sum, wait_for, waypoint_binary,
};
use weft_tests::otlp::OtlpReceiver;
use weft_tests::scenario::{T, serial};
use weft_tests::{Lab, LabSpec, Pod, TestServer, ask, read_hello, require_root, tcp_connect_in};

const API_VIP: &str = "198.18.200.10";
const API_V2_VIP: &str = "198.18.200.11";
const OTHER_VIP: &str = "198.18.200.12";
const WAYPOINT_VIP: &str = "198.18.200.13";
const POOL_VIP: &str = "198.18.200.14";
/// Service `tcp` (port 9000): the echo server (hello first, then echo) on n2p3 `other`.
const TCP_VIP: &str = "198.18.200.15";
const TCP_PORT: u16 = 9000;
/// gRPC Services `greeter` (api-v1's pod) and `greeter-v2` (api-v2's pod), port 50051.
const GREETER_VIP: &str = "198.18.200.16";
const GREETER_V2_VIP: &str = "198.18.200.17";
const GRPC_PORT: u16 = 50051;
const WAYPOINT_ID: &str = "spiffe://cluster.local/ns/shop/sa/waypoint";
const WEB_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";
/// The waypoint's metrics, inside its pod.
const WAYPOINT_METRICS: &str = "127.0.0.1:15090";

/// The waypoint's backends: the services `api` (api-v1), `api-v2` and `pool` (api-v1 and
/// other), port 80.
const BACKENDS: &str = r#"
backends:
  - name: api
    service: api
    port: 80
  - name: api-v2
    service: api-v2
    port: 80
  - name: pool
    service: pool
    port: 80
  - name: solo
    service: other
    port: 80
    outlierDetection: {consecutive5xx: 3, baseEjectionTime: 1s, maxEjectionTime: 2s, maxEjectionPercent: 100, panicThreshold: 0}
  - name: limited
    service: api-v2
    port: 80
    circuitBreaker: {maxConcurrentRequests: 2, maxPendingRequests: 1}
  - name: greeter
    service: greeter
    port: 50051
    protocol: http2
  - name: greeter-v2
    service: greeter-v2
    port: 50051
    protocol: http2
"#;

/// The listener of the gRPC Service `greeter` (GRPCRoute-style method matches): `SayHello`
/// with `x-canary: true` to greeter-v2, `Broken` answered UNAVAILABLE by a fault abort, the
/// rest of `shop.Greeter` to greeter (retrying UNAVAILABLE), anything else unrouted.
const GREETER_LISTENER: &str = r#"  - name: greeter
    service: greeter
    port: 50051
    routes:
      - name: hello-canary
        matches:
          - grpc: {service: shop.Greeter, method: SayHello}
            headers: [{name: x-canary, value: "true"}]
        backendRefs: [{name: greeter-v2}]
      - name: broken
        matches:
          - grpc: {service: shop.Greeter, method: Broken}
        backendRefs: [{name: greeter}]
        fault: {abort: {grpcStatus: 14, percentage: 100}}
      - name: greeter
        matches:
          - grpc: {service: shop.Greeter}
        backendRefs: [{name: greeter}]
        retry: {attempts: 4, retryOn: [unavailable], backoff: {base: 5ms, max: 20ms}}
"#;

/// A waypoint configuration whose only listener is for service `api` port 80, with `routes`
/// (YAML, indented as list items under `routes:`).
fn waypoint_config(routes: &str) -> String {
    format!(
        "listeners:\n  - name: api\n    service: api\n    port: 80\n    routes:\n{routes}{GREETER_LISTENER}{BACKENDS}"
    )
}

/// `/v2...` to api-v2, everything else to api.
const ROUTING: &str = r#"      - name: v2
        matches:
          - path: {type: PathPrefix, value: /v2}
        backendRefs:
          - name: api-v2
      - name: default
        backendRefs:
          - name: api
"#;

fn service(name: &str, vip: &str, port: u16, target: u16, selector: Value, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "shop", "labels": labels},
        "spec": {"clusterIP": vip, "selector": selector,
                 "ports": [{"port": port, "targetPort": target}]},
    })
}

fn config(lab: &Lab) -> MeshConfig {
    let mut c = MeshConfig::default()
        .namespace("shop", true)
        .label_namespace("shop", weft_api::labels::USE_WAYPOINT, "waypoint")
        .namespace("legacy", false)
        .workload(WorkloadSpec::new("web", "shop", lab.pod(0, 0)))
        .workload(
            WorkloadSpec::new("waypoint-1", "shop", lab.pod(0, 1))
                .label(weft_api::labels::WAYPOINT, "waypoint"),
        )
        .workload(WorkloadSpec::new("batch", "legacy", lab.pod(0, 2)))
        .workload(
            WorkloadSpec::new("api-v1", "shop", lab.pod(1, 0))
                .label("app", "api")
                .label("pool", "a"),
        )
        .workload(WorkloadSpec::new("api-v2", "shop", lab.pod(1, 1)).label("app", "api-v2"))
        .workload(
            WorkloadSpec::new("other", "shop", lab.pod(1, 2))
                .label("app", "other")
                .label("pool", "a"),
        );
    for w in &mut c.workloads {
        if w.name == "waypoint-1" {
            w.service_account = "waypoint".into();
        }
        if w.name.starts_with("api-") {
            w.service_account = "api".into();
        }
    }
    c.raw = vec![
        service("api", API_VIP, 80, 8080, json!({"app": "api"}), json!({})),
        service(
            "api-v2",
            API_V2_VIP,
            80,
            8080,
            json!({"app": "api-v2"}),
            json!({}),
        ),
        service(
            "other",
            OTHER_VIP,
            80,
            8080,
            json!({"app": "other"}),
            json!({"weft.dev/use-waypoint": "none"}),
        ),
        service("pool", POOL_VIP, 80, 8080, json!({"pool": "a"}), json!({})),
        service(
            "tcp",
            TCP_VIP,
            TCP_PORT,
            TCP_PORT,
            json!({"app": "other"}),
            json!({}),
        ),
        service(
            "greeter",
            GREETER_VIP,
            GRPC_PORT,
            GRPC_PORT,
            json!({"app": "api"}),
            json!({}),
        ),
        service(
            "greeter-v2",
            GREETER_V2_VIP,
            GRPC_PORT,
            GRPC_PORT,
            json!({"app": "api-v2"}),
            json!({}),
        ),
        service(
            "waypoint",
            WAYPOINT_VIP,
            15008,
            15008,
            json!({"weft.dev/waypoint": "waypoint"}),
            json!({"weft.dev/waypoint": "waypoint"}),
        ),
    ];
    c
}

/// `weft-waypoint` in its pod, in mesh mode, streaming from the lab's controller.
struct WaypointProcess {
    child: Child,
    pod: Pod,
    log: PathBuf,
}

impl WaypointProcess {
    /// Starts it with `config_text` and `extra` arguments.
    fn start(mesh: &MeshLab, pod: &Pod, config_text: &str, extra: &[&str]) -> Self {
        Self::start_named(mesh, pod, "waypoint", config_text, extra)
    }

    /// [`WaypointProcess::start`] with its files (config, log, state) named after `name`, so
    /// that two can run side by side.
    fn start_named(
        mesh: &MeshLab,
        pod: &Pod,
        name: &str,
        config_text: &str,
        extra: &[&str],
    ) -> Self {
        let dir = mesh.dir();
        let config = dir.join(format!("{name}.yaml"));
        std::fs::write(&config, config_text).expect("write waypoint config");
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("waypoint log");
        let err = out.try_clone().expect("log handle");
        let controller = mesh.lab.node(0);
        let node = mesh.lab.node(pod.node_index - 1);
        let bin = waypoint_binary().expect("weft-waypoint binary (cargo build -p weft-waypoint)");
        let child = pod
            .command(&bin)
            .arg("--config")
            .arg(&config)
            .arg("--controller")
            .arg(format!("https://{}:{CONTROLLER_PORT}", controller.ip4))
            .arg("--controller-ca")
            .arg(dir.join("controller/ca.pem"))
            .arg("--node")
            .arg(&node.name)
            .arg("--token-file")
            .arg(dir.join(format!("token-{}", node.name)))
            .arg("--namespace")
            .arg("shop")
            .arg("--service-account")
            .arg("waypoint")
            .arg("--metrics-address")
            .arg(WAYPOINT_METRICS)
            .arg("--state-dir")
            .arg(dir.join(format!("{name}-state")))
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("WAYPOINT_LOG").unwrap_or("info".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start weft-waypoint");
        let mut w = Self {
            child,
            pod: pod.clone(),
            log,
        };
        w.wait_serving();
        w
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Until HBONE (15008) accepts connections on the pod's address.
    fn wait_serving(&mut self) {
        let ns = self.pod.netns().expect("netns");
        let hbone = SocketAddr::new(IpAddr::V4(self.pod.ip4), 15008);
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("weft-waypoint exited ({status}):\n{}", self.log_text());
            }
            if tcp_connect_in(&ns, hbone, Duration::from_millis(200)).is_ok() {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "weft-waypoint does not listen on {hbone} after 20 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn metrics(&self) -> String {
        let ns = self.pod.netns().expect("netns");
        let addr: SocketAddr = WAYPOINT_METRICS.parse().expect("addr");
        let (code, body) = http(&ns, addr, "GET", "/metrics", "localhost").expect("metrics");
        assert_eq!(code, 200, "{body}");
        body
    }

    fn requests(&self) -> f64 {
        metric_sum(&self.metrics(), "weft_waypoint_requests_total", &[])
    }

    /// Its `/ready` status code.
    fn ready(&self) -> u16 {
        let ns = self.pod.netns().expect("netns");
        let addr: SocketAddr = WAYPOINT_METRICS.parse().expect("addr");
        http(&ns, addr, "GET", "/ready", "localhost").map_or(0, |(code, _)| code)
    }

    /// Sends SIGTERM and returns at once.
    fn terminate(&self) {
        weft_tests::mesh::sigterm(&self.child);
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for WaypointProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

struct World {
    waypoint: Option<WaypointProcess>,
    /// api-v1, api-v2, other.
    servers: Vec<TestServer>,
    /// gRPC servers greeter-v1 (api-v1's pod), greeter-v2 (api-v2's pod).
    grpc: Vec<GrpcServer>,
    mesh: MeshLab,
}

impl World {
    /// Changes the controller's directory with `edit` and waits until the agents and the
    /// waypoint have applied it.
    fn change(&mut self, edit: impl FnOnce(&mut MeshConfig)) {
        let before = self.mesh.applied_counts();
        edit(&mut self.mesh.config);
        self.mesh.write_config().expect("write config");
        self.mesh.wait_applied(&before, T).expect("config applied");
    }
    fn pod(&self, node: usize, pod: usize) -> Pod {
        self.mesh.lab.pod(node, pod).clone()
    }
    fn web(&self) -> Pod {
        self.pod(0, 0)
    }
    /// The waypoint's and both agents' logs, for failure messages.
    fn logs(&self) -> String {
        format!(
            "waypoint:\n{}\nagent n1:\n{}\nagent n2:\n{}",
            self.waypoint
                .as_ref()
                .map(|w| w.log_text())
                .unwrap_or_default(),
            self.mesh.agent(0).log_tail(15),
            self.mesh.agent(1).log_tail(15)
        )
    }
    fn waypoint(&self) -> &WaypointProcess {
        self.waypoint.as_ref().expect("waypoint running")
    }
    /// An HTTP request from `web` through the mesh.
    fn get(&self, vip: &str, path: &str) -> std::io::Result<(u16, String)> {
        self.request(vip, "GET", path, &[])
            .map(|r| (r.code, r.body))
    }
    fn request(
        &self,
        vip: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> std::io::Result<Resp> {
        let ns = self.web().netns().expect("netns");
        let addr = SocketAddr::new(vip.parse().expect("vip"), 80);
        http_with(&ns, addr, method, path, &format!("{vip}:80"), headers)
    }
    /// A gRPC call from `web` to the `greeter` Service through the mesh.
    fn grpc(&self, path: &str, headers: &[(&str, &str)]) -> GrpcReply {
        let ns = self.web().netns().expect("netns");
        let addr = SocketAddr::new(GREETER_VIP.parse().expect("vip"), GRPC_PORT);
        grpc_call(
            &ns,
            addr,
            &format!("greeter.shop:{GRPC_PORT}"),
            path,
            headers,
            T,
        )
        .unwrap_or_else(|e| panic!("gRPC {path}: {e}\n{}", self.logs()))
    }
    /// The waypoint's metric `name` summed over series with `labels`.
    fn wp_metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_sum(&self.waypoint().metrics(), name, labels)
    }
}

/// An HTTPRoute `name` of namespace `shop` attached to Service api-v2 port 80 (GAMMA), with
/// `rules`.
fn api_v2_route(name: &str, rules: Value) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "api-v2", "port": 80}],
            "rules": rules
        }
    })
}

fn world(test: &str, waypoint_routes: &str) -> Option<World> {
    world_with(test, waypoint_routes, &[])
}

/// [`world`] with `extra` arguments for the waypoint.
fn world_with(test: &str, waypoint_routes: &str, extra: &[&str]) -> Option<World> {
    if !require_root(test) {
        return None;
    }
    let lab = Lab::up(LabSpec {
        nodes: 2,
        pods_per_node: 3,
    })
    .expect("lab up");
    let mut servers = Vec::new();
    for (pod, name) in [(1, "api-v1"), (2, "api-v2"), (3, "other")] {
        let p = lab.pod(1, pod - 1).clone();
        let ns = p.netns().expect("netns");
        let addr = SocketAddr::new("0.0.0.0".parse().expect("ip"), 8080);
        servers.push(TestServer::http(&ns, addr, name).expect("http server"));
    }
    // Service `tcp`: a server-first, non-HTTP protocol on `other`.
    let ns = lab.pod(1, 2).netns().expect("netns");
    let addr = SocketAddr::new("0.0.0.0".parse().expect("ip"), TCP_PORT);
    servers.push(TestServer::start(&ns, addr).expect("tcp echo server"));
    let mut grpc = Vec::new();
    for (pod, name) in [(0, "greeter-v1"), (1, "greeter-v2")] {
        let ns = lab.pod(1, pod).netns().expect("netns");
        let addr = SocketAddr::new("0.0.0.0".parse().expect("ip"), GRPC_PORT);
        grpc.push(GrpcServer::start(&ns, addr, name).expect("gRPC server"));
    }
    let cfg = config(&lab);
    let mesh = MeshLab::start_with_controller(lab, cfg, &[]).expect("controller and agents");
    // The client needs its certificate before the first request.
    wait_for(T, "web's certificate", || {
        let dump = mesh.agent(0).get_json("/config_dump").ok()?;
        dump["certificates"]
            .as_array()?
            .iter()
            .any(|c| c["identity"] == WEB_ID && c["valid"] == true)
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", mesh.agent(0).log_tail(30)));
    let waypoint_pod = mesh.lab.pod(0, 1).clone();
    let waypoint = WaypointProcess::start(
        &mesh,
        &waypoint_pod,
        &waypoint_config(waypoint_routes),
        extra,
    );
    let w = World {
        waypoint: Some(waypoint),
        servers,
        grpc,
        mesh,
    };
    // Listening comes first; the certificate and the mesh view follow within moments.
    wait_for(
        Duration::from_secs(10),
        "the waypoint to serve the api Service",
        || w.get(API_VIP, "/ready").ok().filter(|(c, _)| *c != 503),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", w.logs()));
    Some(w)
}

/// One HTTP/1.1 request (`Connection: close`) from inside `ns`: status and body.
fn http(
    ns: &weft_netns::NetNs,
    addr: SocketAddr,
    method: &str,
    path: &str,
    host: &str,
) -> std::io::Result<(u16, String)> {
    http_with(ns, addr, method, path, host, &[]).map(|r| (r.code, r.body))
}

/// An HTTP response.
#[derive(Debug)]
struct Resp {
    code: u16,
    /// Lowercase names.
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// [`http`] with extra request headers, and the response headers.
fn http_with(
    ns: &weft_netns::NetNs,
    addr: SocketAddr,
    method: &str,
    path: &str,
    host: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<Resp> {
    let mut s = tcp_connect_in(ns, addr, T)?;
    s.set_read_timeout(Some(T))?;
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: {host}\r\n{extra}connection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:?}")))?;
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in {head:?}")))?;
    let headers = head
        .split("\r\n")
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Resp {
        code,
        headers,
        body: body.to_string(),
    })
}

/// The newest inbound access-log line of node `node`'s agent for destination workload `dst`.
fn inbound_from(w: &World, node: usize, dst_workload: &str) -> Value {
    wait_for(T, &format!("inbound access log for {dst_workload}"), || {
        w.mesh
            .agent(node)
            .access_log()
            .into_iter()
            .rev()
            .find(|l| l["direction"] == "inbound" && l["dst_workload"] == dst_workload)
    })
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", w.mesh.agent(node).log_tail(30)))
}

#[test]
fn waypoint_routes_bound_services_and_unbound_traffic_does_not_touch_it() {
    let _g = serial();
    let Some(w) = world(
        "waypoint_routes_bound_services_and_unbound_traffic_does_not_touch_it",
        ROUTING,
    ) else {
        return;
    };
    // Routing by path, through agent -> waypoint -> agent, mutual TLS on both legs.
    let (code, body) = w
        .get(API_VIP, "/hello")
        .unwrap_or_else(|e| panic!("GET api: {e}\n{}", w.logs()));
    assert_eq!(code, 200, "{body}\n{}", w.logs());
    assert!(body.starts_with("api-v1 GET /hello"), "{body}");
    let (code, body) = w.get(API_VIP, "/v2/items").expect("GET api /v2");
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("api-v2 GET /v2/items"), "{body}");
    // The backend's agent saw the waypoint's identity, not the client's.
    let line = inbound_from(&w, 1, "shop/api-v2");
    assert_eq!(line["src_principal"], WAYPOINT_ID, "{line}");
    assert_eq!(line["security"], "mutual_tls", "{line}");
    // The client's agent tunnelled to the waypoint pod.
    let out = wait_for(T, "outbound access log to the api VIP", || {
        w.mesh
            .agent(0)
            .access_log()
            .into_iter()
            .find(|l| l["direction"] == "outbound" && l["dst"] == format!("{API_VIP}:80"))
    })
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", w.mesh.agent(0).log_tail(30)));
    assert_eq!(out["dst_workload"], "shop/waypoint-1", "{out}");
    assert_eq!(out["dst_principal"], WAYPOINT_ID, "{out}");
    let through_waypoint = w.waypoint().requests();
    assert!(through_waypoint >= 2.0, "{}", w.waypoint().metrics());

    // A service opted out (`none`) goes straight to its endpoint: the waypoint sees nothing.
    let (code, body) = w.get(OTHER_VIP, "/direct").expect("GET other");
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("other GET /direct"), "{body}");
    let line = inbound_from(&w, 1, "shop/other");
    assert_eq!(line["src_principal"], WEB_ID, "{line}");
    assert_eq!(
        w.waypoint().requests(),
        through_waypoint,
        "unbound traffic reached the waypoint"
    );
}

#[test]
fn waypoint_routes_grpc_by_service_and_method() {
    let _g = serial();
    let Some(w) = world("waypoint_routes_grpc_by_service_and_method", ROUTING) else {
        return;
    };
    // HTTP/2 from the client, through agent -> waypoint -> agent, HTTP/2 to the backend.
    let r = w.grpc("/shop.Greeter/SayHello", &[("x-canary", "true")]);
    assert_eq!(r.http_status, 200, "{r:?}");
    assert_eq!(r.grpc_status.as_deref(), Some("0"), "{r:?}");
    assert_eq!(r.message, "greeter-v2 /shop.Greeter/SayHello", "{r:?}");
    // The same method without the header, and another method of the service: greeter.
    let r = w.grpc("/shop.Greeter/SayHello", &[]);
    assert_eq!(r.message, "greeter-v1 /shop.Greeter/SayHello", "{r:?}");
    let r = w.grpc("/shop.Greeter/SayBye", &[("x-canary", "true")]);
    assert_eq!(r.message, "greeter-v1 /shop.Greeter/SayBye", "{r:?}");
    assert_eq!(r.grpc_status.as_deref(), Some("0"), "{r:?}");
    // UNAVAILABLE is retried (attempts: 4), then returned as the backend said it.
    let v1_before = w.grpc[0].calls();
    let retries_before = w.wp_metric("weft_waypoint_retries_total", &[("route", "greeter")]);
    let r = w.grpc("/shop.Greeter/Fail", &[]);
    assert_eq!(r.grpc_status.as_deref(), Some("14"), "{r:?}");
    assert_eq!(
        w.grpc[0].calls() - v1_before,
        4,
        "one call and three retries"
    );
    let retries = w.wp_metric("weft_waypoint_retries_total", &[("route", "greeter")]);
    assert_eq!(retries - retries_before, 3.0);
    // A fault abort with a gRPC status: UNAVAILABLE from the waypoint, no backend reached.
    let calls: usize = w.grpc.iter().map(GrpcServer::calls).sum();
    let r = w.grpc("/shop.Greeter/Broken", &[]);
    assert_eq!(r.http_status, 200, "{r:?}");
    assert_eq!(r.grpc_status.as_deref(), Some("14"), "{r:?}");
    assert_eq!(w.grpc.iter().map(GrpcServer::calls).sum::<usize>(), calls);
    // A service no route matches never reaches a backend.
    let calls: usize = w.grpc.iter().map(GrpcServer::calls).sum();
    let r = w.grpc("/shop.Inventory/List", &[]);
    assert_eq!(r.http_status, 404, "{r:?}");
    assert_eq!(w.grpc.iter().map(GrpcServer::calls).sum::<usize>(), calls);
    // Counted per route.
    assert_eq!(
        w.wp_metric("weft_waypoint_requests_total", &[("route", "hello-canary")]),
        1.0
    );
    assert!(w.wp_metric("weft_waypoint_requests_total", &[("route", "greeter")]) >= 3.0);
}

#[test]
fn waypoint_reports_golden_metrics_with_exact_values() {
    let _g = serial();
    let Some(w) = world("waypoint_reports_golden_metrics_with_exact_values", ROUTING) else {
        return;
    };
    // (The world's readiness request is in the counters already: compare with this.)
    let m0 = w.waypoint().metrics();
    let ok = 5;
    let mut body_bytes = 0;
    for i in 0..ok {
        let (code, body) = w.get(API_VIP, &format!("/golden/{i}")).expect("GET");
        assert_eq!(code, 200, "{body}");
        body_bytes += body.len();
    }
    for _ in 0..3 {
        let (code, _) = w.get(API_VIP, "/status/503").expect("GET 503");
        assert_eq!(code, 503);
    }
    // A request with a 100-byte body.
    let ns = w.web().netns().expect("netns");
    let mut s = tcp_connect_in(&ns, SocketAddr::new(API_VIP.parse().expect("vip"), 80), T)
        .expect("connect");
    s.set_read_timeout(Some(T)).expect("timeout");
    write!(
        s,
        "POST /upload HTTP/1.1\r\nhost: {API_VIP}\r\ncontent-length: 100\r\nconnection: close\r\n\r\n{}",
        "x".repeat(100)
    )
    .expect("write");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // A gRPC call that fails with UNAVAILABLE (after its retries: still one request).
    let r = w.grpc("/shop.Greeter/Fail", &[]);
    assert_eq!(r.grpc_status.as_deref(), Some("14"));

    let m = w.waypoint().metrics();
    let who = [
        ("reporter", "waypoint"),
        ("source_principal", WEB_ID),
        ("source_workload", "shop/web"),
        ("source_namespace", "shop"),
        ("destination_service", "api.shop.svc.cluster.local"),
        ("destination_workload", "shop/api-v1"),
        ("destination_namespace", "shop"),
        ("route", "default"),
        ("backend", "api"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut labels = who.to_vec();
        labels.extend_from_slice(extra);
        labels
    };
    let get = |name: &str, extra: &[(&'static str, &'static str)]| {
        metric_sum(&m, name, &with(extra)) - metric_sum(&m0, name, &with(extra))
    };
    assert_eq!(
        get("weft_waypoint_requests_total", &[("code", "200")]),
        f64::from(ok + 1),
        "{m}"
    );
    assert_eq!(get("weft_waypoint_requests_total", &[("code", "503")]), 3.0);
    assert_eq!(
        get("weft_waypoint_request_duration_seconds_count", &[]),
        f64::from(ok + 4)
    );
    assert!(get("weft_waypoint_request_duration_seconds_sum", &[]) > 0.0);
    // Sizes: exactly the bytes that crossed.
    assert_eq!(get("weft_waypoint_request_bytes_sum", &[]), 100.0, "{m}");
    assert_eq!(
        get("weft_waypoint_request_bytes_count", &[]),
        f64::from(ok + 4)
    );
    let post_answer = answer.split_once("\r\n\r\n").map_or(0, |(_, b)| b.len());
    let (_, status_body) = w.get(API_VIP, "/status/503").expect("GET 503");
    let m2 = w.waypoint().metrics();
    let response_bytes = metric_sum(&m2, "weft_waypoint_response_bytes_sum", &with(&[]))
        - metric_sum(&m0, "weft_waypoint_response_bytes_sum", &with(&[]));
    assert_eq!(
        response_bytes,
        (body_bytes + post_answer + 4 * status_body.len()) as f64,
        "{m2}"
    );
    // Sub-millisecond buckets exist for p50 of fast requests.
    assert!(
        m.contains("weft_waypoint_request_duration_seconds_bucket{") && m.contains("le=\"0.0005\""),
        "{m}"
    );
    // gRPC status from the answer, per route.
    assert_eq!(
        metric_sum(
            &m,
            "weft_waypoint_requests_total",
            &[
                ("route", "greeter"),
                ("grpc_status", "14"),
                ("destination_service", "greeter.shop.svc.cluster.local"),
                ("destination_workload", "shop/api-v1"),
            ]
        ),
        1.0,
        "{m}"
    );
}

#[test]
fn waypoint_circuit_breaker_caps_concurrent_and_pending_requests() {
    let _g = serial();
    let routes = r#"      - name: limited
        matches:
          - path: {type: PathPrefix, value: /sleep}
        backendRefs:
          - name: limited
      - name: default
        backendRefs:
          - name: api
"#;
    let Some(w) = world(
        "waypoint_circuit_breaker_caps_concurrent_and_pending_requests",
        routes,
    ) else {
        return;
    };
    let served_before = w.servers[1].accepted();
    let overflow_before = w.wp_metric("weft_waypoint_circuit_overflow_total", &[]);
    // Six slow requests at once against 2 concurrent + 1 pending: three are served (the
    // pending one after a slot frees), three are refused at once with 503.
    let codes: Vec<(u16, Duration)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..6)
            .map(|_| {
                scope.spawn(|| {
                    let start = Instant::now();
                    let (code, _) = w.get(API_VIP, "/sleep/1500").expect("GET /sleep");
                    (code, start.elapsed())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("request thread"))
            .collect()
    });
    let ok = codes.iter().filter(|(c, _)| *c == 200).count();
    let refused: Vec<_> = codes.iter().filter(|(c, _)| *c == 503).collect();
    assert_eq!(ok, 3, "{codes:?}\n{}", w.logs());
    assert_eq!(refused.len(), 3, "{codes:?}");
    assert!(
        refused
            .iter()
            .all(|(_, took)| *took < Duration::from_millis(1000)),
        "overflow is refused at once, not after waiting: {codes:?}"
    );
    assert_eq!(
        w.wp_metric("weft_waypoint_circuit_overflow_total", &[]) - overflow_before,
        3.0
    );
    assert_eq!(
        w.servers[1].accepted() - served_before,
        3,
        "only admitted requests reach the backend"
    );
    // Capacity is back once they finished.
    let (code, body) = w.get(API_VIP, "/sleep/1").expect("GET");
    assert_eq!(code, 200, "{body}");
}

#[test]
fn waypoint_serves_httproutes_from_the_controller_live() {
    let _g = serial();
    let Some(mut w) = world(
        "waypoint_serves_httproutes_from_the_controller_live",
        ROUTING,
    ) else {
        return;
    };
    // No listener of the file serves api-v2: its default route goes to api-v2 itself.
    let (code, body) = w.get(API_V2_VIP, "/hello").expect("GET api-v2");
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("api-v2 GET /hello"), "{body}");
    // An HTTPRoute attached to the Service (GAMMA), from the controller's directory.
    let route = api_v2_route(
        "api-v2-canary",
        json!([
            {"name": "gamma",
             "matches": [{"headers": [{"name": "x-gamma", "value": "yes"}]}],
             "filters": [{"type": "RequestHeaderModifier",
                          "requestHeaderModifier": {"set": [{"name": "x-route", "value": "gamma"}]}}],
             "backendRefs": [{"name": "api", "port": 80}]},
            {"backendRefs": [{"name": "api-v2", "port": 80}]}
        ]),
    );
    w.change(|c| {
        c.raw.push(route);
    });
    let (code, body) = wait_for(T, "the route to be served", || {
        w.request(API_V2_VIP, "GET", "/hello", &[("x-gamma", "yes")])
            .ok()
            .filter(|r| r.body.starts_with("api-v1 "))
            .map(|r| (r.code, r.body))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", w.logs()));
    assert_eq!(code, 200);
    assert!(body.contains("x-route=gamma"), "{body}");
    let (code, body) = w.get(API_V2_VIP, "/hello").expect("GET api-v2");
    assert_eq!(code, 200);
    assert!(body.starts_with("api-v2 GET /hello"), "{body}");
    assert_eq!(
        w.wp_metric(
            "weft_waypoint_requests_total",
            &[
                ("route", "api-v2-canary/gamma"),
                ("listener", "gamma:api-v2:80")
            ]
        ),
        1.0
    );
    // The file's listener of `api` is untouched.
    let (_, body) = w.get(API_VIP, "/v2/x").expect("GET api");
    assert!(body.starts_with("api-v2 GET /v2/x"), "{body}");
    // The route goes away: back to the default route, live.
    w.change(|c| {
        c.raw.retain(|d| d["kind"] != "HTTPRoute");
    });
    wait_for(T, "the route to be gone", || {
        w.request(API_V2_VIP, "GET", "/hello", &[("x-gamma", "yes")])
            .ok()
            .filter(|r| r.body.starts_with("api-v2 "))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", w.logs()));
}

#[test]
fn waypoint_httproute_retries_from_the_controller() {
    let _g = serial();
    let Some(mut w) = world("waypoint_httproute_retries_from_the_controller", ROUTING) else {
        return;
    };
    // Gateway API `retry` on an HTTPRoute attached to api-v2, sending to `api` (api-v1):
    // 2 retries on 503, at least 30 ms apart.
    let route = api_v2_route(
        "api-v2-retry",
        json!([
            {"name": "retried",
             "matches": [{"path": {"type": "PathPrefix", "value": "/status"}}],
             "backendRefs": [{"name": "api", "port": 80}],
             "retry": {"codes": [503], "attempts": 2, "backoff": "30ms"}},
            {"backendRefs": [{"name": "api-v2", "port": 80}]}
        ]),
    );
    w.change(|c| {
        c.raw.push(route);
    });
    wait_for(T, "the route to be served", || {
        w.get(API_V2_VIP, "/status/200")
            .ok()
            .filter(|(_, body)| body.starts_with("api-v1 "))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", w.logs()));
    let retries = || {
        w.wp_metric(
            "weft_waypoint_retries_total",
            &[("route", "api-v2-retry/retried")],
        )
    };
    // A 503 is tried three times, the backoff floor between each.
    let seen = w.servers[0].accepted();
    let started = std::time::Instant::now();
    let (code, _) = w.get(API_V2_VIP, "/status/503").expect("GET");
    let took = started.elapsed();
    assert_eq!(code, 503, "the last attempt's answer");
    assert_eq!(w.servers[0].accepted() - seen, 3, "1 attempt + 2 retries");
    assert_eq!(retries(), 2.0);
    assert!(
        took >= Duration::from_millis(60),
        "two backoffs of at least 30 ms each, took {took:?}"
    );
    // A code the route does not name is not retried.
    let seen = w.servers[0].accepted();
    let (code, _) = w.get(API_V2_VIP, "/status/500").expect("GET");
    assert_eq!(code, 500);
    assert_eq!(
        w.servers[0].accepted() - seen,
        1,
        "500 is not in retry.codes"
    );
    assert_eq!(retries(), 2.0);
}

#[test]
fn waypoint_httproute_rewrite_and_redirect_from_the_controller() {
    let _g = serial();
    let Some(mut w) = world(
        "waypoint_httproute_rewrite_and_redirect_from_the_controller",
        ROUTING,
    ) else {
        return;
    };
    // An HTTPRoute attached to api-v2 (no listener of the file serves it), from the
    // controller's directory: a prefix rewrite, a permanent redirect within the Service and a
    // redirect elsewhere.
    let route = api_v2_route(
        "api-v2-filters",
        json!([
            {"name": "rewrite",
             "matches": [{"path": {"type": "PathPrefix", "value": "/old"}}],
             "filters": [{"type": "URLRewrite",
                          "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"}}}],
             "backendRefs": [{"name": "api-v2", "port": 80}]},
            {"name": "moved",
             "matches": [{"path": {"type": "PathPrefix", "value": "/moved"}}],
             "filters": [{"type": "RequestRedirect",
                          "requestRedirect": {"statusCode": 301,
                                              "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/here"}}}]},
            {"name": "secure",
             "matches": [{"path": {"type": "Exact", "value": "/login"}}],
             "filters": [{"type": "RequestRedirect",
                          "requestRedirect": {"scheme": "https", "hostname": "login.example.com"}}]},
            {"backendRefs": [{"name": "api-v2", "port": 80}]}
        ]),
    );
    w.change(|c| {
        c.raw.push(route);
    });
    // The backend sees the rewritten path, the query kept.
    let body = wait_for(T, "the rewrite to be served", || {
        w.get(API_V2_VIP, "/old/page?x=1")
            .ok()
            .filter(|(code, _)| *code == 200)
            .map(|(_, body)| body)
            .filter(|b| b.starts_with("api-v2 GET /new/"))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", w.logs()));
    assert!(body.starts_with("api-v2 GET /new/page?x=1 "), "{body}");
    let (code, body) = w.get(API_V2_VIP, "/old").expect("GET /old");
    assert_eq!(code, 200);
    assert!(body.starts_with("api-v2 GET /new "), "{body}");
    // `/oldish` is not under the prefix `/old`: the default rule, unchanged.
    let (_, body) = w.get(API_V2_VIP, "/oldish").expect("GET /oldish");
    assert!(body.starts_with("api-v2 GET /oldish "), "{body}");
    // 301 within the Service: the request's host, the Service port (80, left out), the
    // prefix replaced, the query kept. The waypoint answers; no backend is asked.
    let r = w
        .request(API_V2_VIP, "GET", "/moved/a/b?q=1", &[])
        .expect("GET /moved");
    assert_eq!(r.code, 301, "{r:?}\n{}", w.logs());
    assert_eq!(
        r.header("location"),
        Some(format!("http://{API_V2_VIP}/here/a/b?q=1").as_str()),
        "{r:?}"
    );
    assert!(!r.body.starts_with("api-v2 "), "{r:?}");
    // 302 (the default) to another host and scheme.
    let r = w
        .request(API_V2_VIP, "GET", "/login", &[])
        .expect("GET /login");
    assert_eq!(r.code, 302, "{r:?}");
    assert_eq!(
        r.header("location"),
        Some("https://login.example.com/login"),
        "{r:?}"
    );
    assert_eq!(
        w.wp_metric(
            "weft_waypoint_requests_total",
            &[
                ("route", "api-v2-filters/moved"),
                ("listener", "gamma:api-v2:80"),
                ("code", "301")
            ]
        ),
        1.0
    );
}

/// An AuthorizationPolicy document of namespace `shop`.
fn authz_policy(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "weft.dev/v1alpha1", "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": spec,
    })
}

#[test]
fn waypoint_l7_authorization_allows_and_denies_by_method_path_header_and_principal() {
    let _g = serial();
    let Some(mut w) = world(
        "waypoint_l7_authorization_allows_and_denies_by_method_path_header_and_principal",
        ROUTING,
    ) else {
        return;
    };
    // Only web may GET /public*, and never with `x-block: yes`; at the waypoint of `api`.
    let allow = authz_policy(
        "api-allow",
        json!({"action": "ALLOW", "targetRefs": [{"kind": "Service", "name": "api"}],
               "rules": [{"from": [{"principals": [WEB_ID]}],
                          "to": [{"methods": ["GET"], "paths": ["/public*"]}]}]}),
    );
    let block = authz_policy(
        "api-block",
        json!({"action": "DENY", "targetRefs": [{"kind": "Service", "name": "api"}],
               "rules": [{"when": [{"key": "request.headers[x-block]", "values": ["yes"]}]}]}),
    );
    // Opaque TCP to `tcp`: a DENY whose rule needs HTTP denies on its L4 part (fail closed).
    let tcp_deny = authz_policy(
        "tcp-no-delete",
        json!({"action": "DENY", "targetRefs": [{"kind": "Service", "name": "tcp"}],
               "rules": [{"from": [{"principals": [WEB_ID]}], "to": [{"methods": ["DELETE"]}]}]}),
    );
    w.change(|c| {
        c.raw.extend([allow, block, tcp_deny]);
    });
    let served_before = w.servers[0].accepted();
    // Applied: POST is refused by the waypoint itself.
    let denied = wait_for(T, "the policies at the waypoint", || {
        w.request(API_VIP, "POST", "/public/x", &[])
            .ok()
            .filter(|r| r.code == 403)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", w.logs()));
    assert!(denied.body.starts_with("RBAC: access denied"), "{denied:?}");
    let ok = w
        .request(API_VIP, "GET", "/public/x", &[])
        .expect("GET /public");
    assert_eq!(ok.code, 200, "{ok:?}");
    assert!(ok.body.starts_with("api-v1 GET /public/x"), "{ok:?}");
    let private = w.request(API_VIP, "GET", "/private", &[]).expect("GET");
    assert_eq!(private.code, 403, "{private:?}");
    let blocked = w
        .request(API_VIP, "GET", "/public/x", &[("x-block", "yes")])
        .expect("GET");
    assert_eq!(blocked.code, 403, "{blocked:?}");
    assert!(blocked.body.contains("shop/api-block"), "{blocked:?}");
    // Only the allowed request reached the backend.
    assert_eq!(w.servers[0].accepted() - served_before, 1);
    // Decisions are counted per policy.
    let m = w.waypoint().metrics();
    let count = |decision: &str, policy: &str| {
        metric_sum(
            &m,
            "weft_waypoint_authz_decisions_total",
            &[
                ("service", "shop/api"),
                ("decision", decision),
                ("policy", policy),
            ],
        )
    };
    assert!(count("deny", "shop/api-block") >= 1.0, "{m}");
    assert!(count("deny", "") >= 2.0, "no ALLOW matched: {m}");
    assert!(count("allow", "") >= 1.0, "{m}");
    // Opaque TCP from web to `tcp` is denied (closed without reaching the endpoint).
    let ns = w.web().netns().expect("netns");
    let tcp = SocketAddr::new(TCP_VIP.parse().expect("vip"), TCP_PORT);
    let mut s = tcp_connect_in(&ns, tcp, T).expect("connect");
    s.set_read_timeout(Some(T)).expect("timeout");
    let _ = s.write_all(b"\x00binary");
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(got.is_empty(), "a denied connection got {got:?}");
    wait_for(T, "the TCP denial", || {
        let m = w.waypoint().metrics();
        (metric_sum(
            &m,
            "weft_waypoint_tcp_connections_total",
            &[("service", "shop/tcp"), ("result", "denied")],
        ) >= 1.0)
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", w.waypoint().metrics()));
    // Removing the policies opens the service again, live.
    w.change(|c| {
        c.raw.retain(|d| d["kind"] != "AuthorizationPolicy");
    });
    wait_for(T, "the policies to be gone", || {
        w.request(API_VIP, "POST", "/public/x", &[])
            .ok()
            .filter(|r| r.code == 200)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", w.logs()));
}

/// `traceparent=<value>` as the backend echoed it: (trace id, parent span id).
fn echoed_traceparent(body: &str) -> Option<(String, String)> {
    let value = body
        .split("traceparent=")
        .nth(1)?
        .split([',', ' ', '\r', '\n'])
        .next()?;
    let parts: Vec<&str> = value.split('-').collect();
    (parts.len() == 4).then(|| (parts[1].to_string(), parts[2].to_string()))
}

#[test]
fn waypoint_exports_spans_that_continue_the_callers_trace() {
    let _g = serial();
    let Some(w) = world_with(
        "waypoint_exports_spans_that_continue_the_callers_trace",
        ROUTING,
        &[
            "--otlp-endpoint",
            "http://127.0.0.1:4317",
            "--trace-sampling",
            "1",
            "--trace-batch-delay",
            "100ms",
        ],
    ) else {
        return;
    };
    // The collector, inside the waypoint's pod.
    let ns = w.pod(0, 1).netns().expect("netns");
    let receiver =
        OtlpReceiver::start(&ns, "127.0.0.1:4317".parse().expect("addr")).expect("receiver");
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let traceparent = format!("00-{trace_id}-{caller_span}-01");
    let resp = w
        .request(API_VIP, "GET", "/traced", &[("traceparent", &traceparent)])
        .unwrap_or_else(|e| panic!("GET: {e}\n{}", w.logs()));
    assert_eq!(resp.code, 200, "{resp:?}");
    // The backend continues the caller's trace, under a span that is not the caller's.
    let (backend_trace, backend_parent) =
        echoed_traceparent(&resp.body).unwrap_or_else(|| panic!("no traceparent: {resp:?}"));
    assert_eq!(backend_trace, trace_id);
    assert_ne!(backend_parent, caller_span);
    // The waypoint's span reached the collector: child of the caller's span, parent of the
    // backend's request.
    let span = wait_for(T, "the waypoint's span at the collector", || {
        receiver
            .spans()
            .into_iter()
            .find(|s| s.trace_id == trace_id)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", w.logs()));
    assert_eq!(span.parent_span_id, caller_span, "{span:?}");
    assert_eq!(span.span_id, backend_parent, "{span:?}");
    assert_eq!(span.kind, 2, "a server span: {span:?}");
    assert_eq!(span.attributes["weft.source.principal"], WEB_ID, "{span:?}");
    assert_eq!(span.attributes["http.response.status_code"], "200");
    assert_eq!(span.attributes["weft.route"], "default", "{span:?}");
    assert_eq!(span.attributes["url.path"], "/traced");

    // Without a caller's context the waypoint starts a trace; the backend is its child.
    let resp = w.request(API_VIP, "GET", "/v2/root", &[]).expect("GET");
    assert_eq!(resp.code, 200, "{resp:?}");
    let (root_trace, root_parent) =
        echoed_traceparent(&resp.body).unwrap_or_else(|| panic!("no traceparent: {resp:?}"));
    assert_ne!(root_trace, trace_id);
    let root = wait_for(T, "the new trace's span", || {
        receiver
            .spans()
            .into_iter()
            .find(|s| s.trace_id == root_trace)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", w.logs()));
    assert_eq!(root.parent_span_id, "", "{root:?}");
    assert_eq!(root.span_id, root_parent);
    assert_eq!(root.attributes["weft.route"], "v2");
}

#[test]
fn waypoint_down_means_bound_traffic_is_refused_never_bypassed() {
    let _g = serial();
    let Some(mut w) = world(
        "waypoint_down_means_bound_traffic_is_refused_never_bypassed",
        ROUTING,
    ) else {
        return;
    };
    let (code, _) = w.get(API_VIP, "/up").expect("GET through the waypoint");
    assert_eq!(code, 200);
    let served_before = w.servers[0].accepted();
    // The waypoint process dies: its pod is still an endpoint, but nothing answers on 15008.
    if let Some(mut p) = w.waypoint.take() {
        p.stop();
    }
    assert!(
        w.get(API_VIP, "/down").is_err(),
        "a bound service must not be reachable without its waypoint"
    );
    // The waypoint's pod goes away: no ready waypoint pod at all.
    w.change(|c| {
        c.workloads.retain(|x| x.name != "waypoint-1");
    });
    assert!(w.get(API_VIP, "/gone").is_err());
    let m = w.mesh.agent(0).metrics_text();
    assert!(
        metric_sum(
            &m,
            "weft_tcp_connection_failures_total",
            &[("reason", "no_waypoint")]
        ) >= 1.0,
        "{m}"
    );
    // Nothing reached the backend after the waypoint went down.
    assert_eq!(w.servers[0].accepted(), served_before, "api-v1 was reached");
    // Unbound traffic still flows.
    let (code, _) = w.get(OTHER_VIP, "/still").expect("GET other");
    assert_eq!(code, 200);
}

#[test]
fn waypoint_splits_traffic_by_weight_within_tolerance() {
    let _g = serial();
    let routes = r#"      - name: split
        backendRefs:
          - {name: api, weight: 75}
          - {name: api-v2, weight: 25}
"#;
    let Some(w) = world("waypoint_splits_traffic_by_weight_within_tolerance", routes) else {
        return;
    };
    let n = 200;
    let mut v2 = 0;
    let before = w.wp_metric("weft_waypoint_requests_total", &[("route", "split")]);
    for i in 0..n {
        let (code, body) = w.get(API_VIP, &format!("/split/{i}")).expect("GET");
        assert_eq!(code, 200, "{body}");
        if body.starts_with("api-v2 ") {
            v2 += 1;
        } else {
            assert!(body.starts_with("api-v1 "), "{body}");
        }
    }
    // 25% of 200 = 50; binomial sd ~6.1: allow ±3.5 sd.
    assert!(
        (29..=71).contains(&v2),
        "{v2} of {n} went to api-v2, want ~50"
    );
    let routed = w.wp_metric("weft_waypoint_requests_total", &[("route", "split")]) - before;
    assert_eq!(routed, f64::from(n), "every request counted on its route");
}

#[test]
fn waypoint_changes_request_and_response_headers() {
    let _g = serial();
    let routes = r#"      - name: headers
        filters:
          - type: RequestHeaderModifier
            requestHeaderModifier:
              add: [{name: x-added, value: by-waypoint}]
              set: [{name: x-replaced, value: new}]
              remove: [x-secret]
          - type: ResponseHeaderModifier
            responseHeaderModifier:
              set: [{name: x-served-by, value: waypoint}]
        backendRefs:
          - name: api
"#;
    let Some(w) = world("waypoint_changes_request_and_response_headers", routes) else {
        return;
    };
    let r = w
        .request(
            API_VIP,
            "GET",
            "/h",
            &[
                ("x-replaced", "old"),
                ("x-secret", "s3cr3t"),
                ("x-kept", "yes"),
            ],
        )
        .expect("GET");
    assert_eq!(r.code, 200, "{}", r.body);
    for want in ["x-added=by-waypoint", "x-kept=yes", "x-replaced=new"] {
        assert!(
            r.body.contains(want),
            "missing {want}; the backend saw: {}",
            r.body
        );
    }
    assert!(!r.body.contains("s3cr3t"), "{}", r.body);
    assert_eq!(r.header("x-served-by"), Some("waypoint"), "{:?}", r.headers);
}

#[test]
fn waypoint_times_out_slow_requests() {
    let _g = serial();
    let routes = r#"      - name: slow
        timeouts: {request: 300ms}
        backendRefs:
          - name: api
"#;
    let Some(w) = world("waypoint_times_out_slow_requests", routes) else {
        return;
    };
    let start = Instant::now();
    let (code, body) = w.get(API_VIP, "/sleep/3000").expect("GET");
    let took = start.elapsed();
    assert_eq!(code, 504, "{body}");
    assert!(
        took < Duration::from_millis(2500),
        "answered after {took:?}, the backend takes 3 s"
    );
    let (code, _) = w.get(API_VIP, "/sleep/10").expect("GET");
    assert_eq!(code, 200, "a fast request is not cut");
}

#[test]
fn waypoint_retries_5xx_within_the_budget() {
    let _g = serial();
    let routes = r#"      - name: retried
        retry:
          attempts: 3
          backoff: {base: 5ms, max: 20ms}
          retryOn: ["5xx"]
          budget: {ratio: 0.01, minRetriesPerSecond: 1, window: 2s}
        backendRefs:
          - name: api
"#;
    let Some(w) = world("waypoint_retries_5xx_within_the_budget", routes) else {
        return;
    };
    // Each request fails; the budget (1 retry/s over a 2 s window, plus 1% of requests) lets
    // about two retries through, then retries stop.
    let before = w.servers[0].accepted();
    for _ in 0..6 {
        let (code, _) = w.get(API_VIP, "/status/503").expect("GET");
        assert_eq!(code, 503, "the last attempt's answer");
    }
    let retries = w.wp_metric("weft_waypoint_retries_total", &[("route", "retried")]);
    let exhausted = w.wp_metric(
        "weft_waypoint_retry_budget_exhausted_total",
        &[("route", "retried")],
    );
    assert!(
        (2.0..=4.0).contains(&retries),
        "retries {retries}: the budget caps them (without it: 12)"
    );
    assert!(exhausted >= 1.0, "the budget ran out at least once");
    assert_eq!(
        w.servers[0].accepted() - before,
        6 + retries as usize,
        "api-v1 saw each request once plus each retry"
    );
}

#[test]
fn waypoint_ejects_a_failing_endpoint_and_probes_it_back() {
    let _g = serial();
    // One endpoint (`other`), so every request reaches it while its circuit is closed.
    let routes = r#"      - name: solo
        backendRefs:
          - name: solo
"#;
    let Some(w) = world(
        "waypoint_ejects_a_failing_endpoint_and_probes_it_back",
        routes,
    ) else {
        return;
    };
    let before = w.servers[2].accepted();
    // 3 consecutive 5xx eject it; the rest are answered by the waypoint without a backend.
    let mut codes = Vec::new();
    for _ in 0..8 {
        codes.push(w.get(API_VIP, "/fail-on/other/x").expect("GET").0);
    }
    assert_eq!(&codes[..3], [500, 500, 500], "{codes:?}");
    assert!(codes[3..].iter().all(|c| *c == 503), "{codes:?}");
    assert_eq!(
        w.servers[2].accepted() - before,
        3,
        "an ejected endpoint gets no traffic"
    );
    let transitions = |to: &str| {
        w.wp_metric(
            "weft_waypoint_circuit_transitions_total",
            &[("backend", "solo"), ("to", to)],
        )
    };
    assert!(transitions("open") >= 1.0, "{}", w.waypoint().metrics());
    // After the ejection time it is probed (half-open) and, healthy again, closed.
    wait_for(
        Duration::from_secs(10),
        "the circuit to close again",
        || {
            let (code, _) = w.get(API_VIP, "/ok").ok()?;
            (code == 200 && transitions("closed") >= 1.0).then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", w.waypoint().metrics()));
    assert!(
        transitions("half-open") >= 1.0,
        "{}",
        w.waypoint().metrics()
    );
}

#[test]
fn waypoint_injects_delays_and_aborts() {
    let _g = serial();
    let routes = r#"      - name: abort
        matches: [{path: {type: PathPrefix, value: /abort}}]
        fault: {abort: {httpStatus: 418, percentage: 100}}
        backendRefs:
          - name: api
      - name: delay
        matches: [{path: {type: PathPrefix, value: /delay}}]
        fault: {delay: {fixedDelay: 400ms, percentage: 100}}
        backendRefs:
          - name: api
"#;
    let Some(w) = world("waypoint_injects_delays_and_aborts", routes) else {
        return;
    };
    let before = w.servers[0].accepted();
    let (code, _) = w.get(API_VIP, "/abort").expect("GET");
    assert_eq!(code, 418);
    assert_eq!(
        w.servers[0].accepted(),
        before,
        "an aborted request never reaches the backend"
    );
    let start = Instant::now();
    let (code, body) = w.get(API_VIP, "/delay").expect("GET");
    assert_eq!(code, 200, "{body}");
    assert!(
        start.elapsed() >= Duration::from_millis(400),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(
        w.wp_metric("weft_waypoint_faults_total", &[("kind", "abort")]),
        1.0
    );
    assert_eq!(
        w.wp_metric("weft_waypoint_faults_total", &[("kind", "delay")]),
        1.0
    );
}

#[test]
fn waypoint_rate_limits_per_source_with_429() {
    let _g = serial();
    let routes = r#"      - name: limited
        rateLimit:
          perSource: {capacity: 3, refillPerSecond: 0.1}
        backendRefs:
          - name: api
"#;
    let Some(w) = world("waypoint_rate_limits_per_source_with_429", routes) else {
        return;
    };
    // The world's readiness probe (from web, too) may have taken a token: 2 or 3 get through,
    // then every request is limited.
    let codes: Vec<u16> = (0..5)
        .map(|_| w.request(API_VIP, "GET", "/r", &[]).expect("GET").code)
        .collect();
    let ok = codes.iter().take_while(|c| **c == 200).count();
    assert!((2..=3).contains(&ok), "{codes:?}");
    assert!(codes[ok..].iter().all(|c| *c == 429), "{codes:?}");
    let r = w.request(API_VIP, "GET", "/r", &[]).expect("GET");
    assert_eq!(r.code, 429);
    let retry_after: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Retry-After: {:?}", r.headers));
    assert!((1..=10).contains(&retry_after), "{retry_after}");
    assert!(w.wp_metric("weft_waypoint_rate_limited_total", &[("route", "limited")]) >= 3.0);
}

#[test]
fn waypoint_falls_back_to_opaque_tcp_for_non_http_traffic() {
    let _g = serial();
    let Some(w) = world(
        "waypoint_falls_back_to_opaque_tcp_for_non_http_traffic",
        ROUTING,
    ) else {
        return;
    };
    let ns = w.web().netns().expect("netns");
    let tcp = SocketAddr::new(TCP_VIP.parse().expect("vip"), TCP_PORT);
    let other_ip = w.pod(1, 2).ip4.to_string();

    // Client first, not HTTP: the bytes reach the endpoint through the waypoint as they are.
    let mut s =
        tcp_connect_in(&ns, tcp, T).unwrap_or_else(|e| panic!("connect: {e}\n{}", w.logs()));
    s.set_read_timeout(Some(T)).expect("timeout");
    let payload: &[u8] = b"\x00\x01\xfe binary, not HTTP\r\n";
    s.write_all(payload).expect("write");
    s.shutdown(std::net::Shutdown::Write).expect("half-close");
    let hello = read_hello(&mut s).unwrap_or_else(|e| panic!("hello: {e}\n{}", w.logs()));
    let mut echoed = Vec::new();
    s.read_to_end(&mut echoed).expect("echo");
    assert_eq!(echoed, payload, "{}", w.logs());
    // The endpoint's agent delivered it from the waypoint's tunnel to the pod's port.
    assert!(hello.local.to_string().starts_with(&other_ip), "{hello:?}");

    // Server first: the client waits for the greeting, which comes after the detection wait.
    let mut s = tcp_connect_in(&ns, tcp, T).expect("connect");
    let (hello, echoed) =
        ask(&mut s, b"after the hello").unwrap_or_else(|e| panic!("ask: {e}\n{}", w.logs()));
    assert_eq!(echoed, b"after the hello");
    assert!(hello.local.to_string().starts_with(&other_ip), "{hello:?}");

    // The waypoint proxied both as opaque TCP, one detected from its bytes, one on timeout.
    let opened = wait_for(T, "the waypoint's TCP connection metrics", || {
        let metrics = w.waypoint().metrics();
        let ok = metric_sum(
            &metrics,
            "weft_waypoint_tcp_connections_total",
            &[("service", "shop/tcp"), ("result", "ok")],
        );
        (ok >= 2.0).then_some(metrics)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", w.waypoint().metrics()));
    let detected = |by: &str| {
        metric_sum(
            &opened,
            "weft_waypoint_protocol_detected_total",
            &[("protocol", "tcp"), ("by", by)],
        )
    };
    assert!(detected("detected") >= 1.0, "{opened}");
    assert!(detected("timeout") >= 1.0, "{opened}");
    assert!(
        metric_sum(
            &opened,
            "weft_waypoint_tcp_received_bytes_total",
            &[("service", "shop/tcp")]
        ) >= (payload.len() + "after the hello".len()) as f64,
        "{opened}"
    );
    assert!(
        metric_sum(
            &opened,
            "weft_waypoint_tcp_sent_bytes_total",
            &[("service", "shop/tcp")]
        ) >= (payload.len() + "after the hello".len()) as f64,
        "{opened}"
    );

    // HTTP through the waypoint still routes.
    let (code, body) = w.get(API_VIP, "/v2/after-tcp").expect("GET api /v2");
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("api-v2 GET /v2/after-tcp"), "{body}");
    let (code, body) = w.get(API_VIP, "/after-tcp").expect("GET api");
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("api-v1 GET /after-tcp"), "{body}");
    assert!(
        metric_sum(
            &w.waypoint().metrics(),
            "weft_waypoint_protocol_detected_total",
            &[("protocol", "http1"), ("by", "detected")],
        ) >= 2.0
    );
}

#[test]
fn waypoint_writes_a_json_access_log_line_per_request() {
    let _g = serial();
    let Some(w) = world(
        "waypoint_writes_a_json_access_log_line_per_request",
        ROUTING,
    ) else {
        return;
    };
    let (code, body) = w
        .request(
            API_VIP,
            "GET",
            "/v2/logged?q=1",
            &[
                ("user-agent", "lab"),
                (
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ),
            ],
        )
        .map(|r| (r.code, r.body))
        .expect("GET");
    assert_eq!(code, 200, "{body}");
    // The waypoint writes its access log to stdout (the log file here), one JSON object a
    // line; its own logs are text.
    let line = wait_for(T, "the waypoint's access log line", || {
        w.waypoint()
            .log_text()
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str::<Value>(l).expect("an access log line is JSON"))
            .find(|l| l["path"] == "/v2/logged?q=1")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", w.logs()));
    assert_eq!(line["method"], "GET", "{line}");
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["protocol"], "HTTP/1.1", "{line}");
    assert_eq!(line["authority"], format!("{API_VIP}:80"), "{line}");
    assert_eq!(line["route"], "v2", "{line}");
    assert_eq!(line["backend"], "api-v2", "{line}");
    assert_eq!(line["source_principal"], WEB_ID, "{line}");
    assert_eq!(line["source_workload"], "shop/web", "{line}");
    assert_eq!(line["source_ip"], w.web().ip4.to_string(), "{line}");
    assert_eq!(line["destination_service"], "shop/api", "{line}");
    assert_eq!(
        line["upstream"],
        format!("{}:8080", w.pod(1, 1).ip4),
        "{line}"
    );
    assert_eq!(line["response_bytes"], body.len(), "{line}");
    // No exporter here: the waypoint passes trace context through and logs its trace id.
    assert_eq!(
        line["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736",
        "{line}"
    );
    assert!(line["duration_ms"].is_number(), "{line}");
    // One line per request.
    let n = w
        .waypoint()
        .log_text()
        .lines()
        .filter(|l| l.starts_with('{') && l.contains("/v2/logged?q=1"))
        .count();
    assert_eq!(n, 1);

    // gRPC over HTTP/2: the status from the trailers (or trailers-only headers) and the
    // retries (UNAVAILABLE is retried three times on route `greeter`).
    let r = w.grpc("/shop.Greeter/Fail", &[]);
    assert_eq!(r.grpc_status.as_deref(), Some("14"), "{r:?}");
    let line = wait_for(T, "the access log line of the gRPC call", || {
        w.waypoint()
            .log_text()
            .lines()
            .filter(|l| l.starts_with('{'))
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|l| l["path"] == "/shop.Greeter/Fail")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", w.logs()));
    assert_eq!(line["protocol"], "HTTP/2", "{line}");
    assert_eq!(line["method"], "POST", "{line}");
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["grpc_status"], "14", "{line}");
    assert_eq!(line["route"], "greeter", "{line}");
    assert_eq!(line["retries"], 3, "{line}");
    assert_eq!(line["destination_service"], "shop/greeter", "{line}");
}

/// A second waypoint pod, `waypoint-2`, serving `ROUTING`: n1p3 leaves `legacy` and joins
/// `shop` with the waypoint's ServiceAccount and the label `weft.dev/waypoint: <label>` (with
/// `waypoint`, a pod of the waypoint's Service; with another value, not yet). Returns once it
/// is ready.
fn second_waypoint_pod(w: &mut World, label: &str) -> WaypointProcess {
    let pod = w.pod(0, 2);
    w.change(|c| {
        c.workloads.retain(|x| x.name != "batch");
        let mut second =
            WorkloadSpec::new("waypoint-2", "shop", &pod).label(weft_api::labels::WAYPOINT, label);
        second.service_account = "waypoint".into();
        c.workloads.push(second);
    });
    let second =
        WaypointProcess::start_named(&w.mesh, &pod, "waypoint-2", &waypoint_config(ROUTING), &[]);
    wait_for(T, "waypoint-2 ready", || {
        (second.ready() == 200).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", second.log_text()));
    second
}

#[test]
fn waypoint_crashed_pod_hands_connections_to_another_pod_of_the_waypoint() {
    let _g = serial();
    let Some(mut w) = world(
        "waypoint_crashed_pod_hands_connections_to_another_pod_of_the_waypoint",
        ROUTING,
    ) else {
        return;
    };
    let mut second = second_waypoint_pod(&mut w, "waypoint");
    let failures = |w: &World| {
        metric_sum(
            &w.mesh.agent(0).metrics_text(),
            "weft_tcp_connection_failures_total",
            &[],
        )
    };
    let failed_before = failures(&w);
    let served_before = w.waypoint().requests();
    // waypoint-2 crashes before it served anything: nothing listens on its 15008, but its pod
    // is still an endpoint of the waypoint (Kubernetes has not noticed yet). Never measured,
    // it is the balancer's first choice (an endpoint never measured costs nothing): the first
    // request goes to it and must move to waypoint-1.
    second.stop();
    for i in 0..20 {
        let (code, body) = w
            .get(API_VIP, &format!("/crash/{i}"))
            .unwrap_or_else(|e| panic!("request {i} failed: {e}\n{}", w.logs()));
        assert_eq!(code, 200, "request {i}: {body}");
        assert!(body.starts_with("api-v1 "), "request {i}: {body}");
    }
    assert_eq!(
        w.waypoint().requests() - served_before,
        20.0,
        "waypoint-1 served them all"
    );
    let failovers = w.mesh.agent(0).metric(
        "weft_waypoint_failovers_total",
        &[("reason", "connect_failed")],
    );
    assert!(failovers >= 1.0, "no failover counted\n{}", w.logs());
    // Nothing was refused.
    assert_eq!(failures(&w), failed_before, "{}", w.logs());
}

#[test]
fn waypoint_pod_replaced_under_load_fails_no_request() {
    let _g = serial();
    // As `weftctl waypoint deploy` runs it: still serving for a while after SIGTERM.
    let Some(mut w) = world_with(
        "waypoint_pod_replaced_under_load_fails_no_request",
        ROUTING,
        &["--shutdown-delay-seconds", "5", "--drain-seconds", "2"],
    ) else {
        return;
    };
    // A rollout's new pod, ready but not yet in the agents' view of the waypoint's Service.
    let second = second_waypoint_pod(&mut w, "waypoint-next");

    // Steady load from `web`: one request after another, each on a new connection (a new
    // choice of waypoint endpoint each time), for at most 60 s.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let ns = w.web().netns().expect("netns");
        let addr = SocketAddr::new(API_VIP.parse().expect("vip"), 80);
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0u32, Vec::new());
            let start = Instant::now();
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && start.elapsed() < Duration::from_secs(60)
            {
                match http(&ns, addr, "GET", "/roll", &format!("{API_VIP}:80")) {
                    Ok((200, _)) => ok += 1,
                    other => failed.push(format!("{:?}: {other:?}", start.elapsed())),
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            (ok, failed)
        })
    };
    std::thread::sleep(Duration::from_millis(500));

    // The old pod is deleted: it gets SIGTERM at once, while the agents learn the new set of
    // waypoint pods a second later (the control plane's lag). Meanwhile waypoint-1 is the only
    // pod they know: it must go on serving (no other pod to fail over to).
    let mut first = w.waypoint.take().expect("waypoint-1");
    first.terminate();
    wait_for(T, "waypoint-1 not ready after SIGTERM", || {
        (first.ready() == 503).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", first.log_text()));
    std::thread::sleep(Duration::from_secs(1));
    w.change(|c| {
        c.workloads.retain(|x| x.name != "waypoint-1");
        for x in &mut c.workloads {
            if x.name == "waypoint-2" {
                x.labels
                    .insert(weft_api::labels::WAYPOINT.into(), "waypoint".into());
            }
        }
    });
    // A new mesh view reached the draining waypoint: it stays not ready.
    assert_eq!(first.ready(), 503, "ready again while draining");
    // It exits by itself: the delay (5 s), then the drain (at most 2 s).
    let exited = wait_for(Duration::from_secs(15), "waypoint-1 to exit", || {
        first.child.try_wait().ok().flatten()
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", first.log_text()));
    assert!(exited.success(), "{exited}\n{}", first.log_text());
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = load.join().expect("load thread");
    assert!(
        failed.is_empty(),
        "{} of {} requests failed while the waypoint pod was replaced: {failed:?}\nwaypoint-1:\n{}\nwaypoint-2:\n{}\n{}",
        failed.len(),
        ok as usize + failed.len(),
        first.log_text(),
        second.log_text(),
        w.logs()
    );
    assert!(ok >= 20, "only {ok} requests in the run");
    assert!(second.requests() >= 1.0, "waypoint-2 served nothing");
}

#[test]
fn waypoint_sends_a_request_its_dead_endpoint_refused_to_another_without_a_retry_policy() {
    let _g = serial();
    // Backend `pool`: api-v1 and other. No retry policy on the route.
    let routes = r#"      - name: pool
        backendRefs:
          - name: pool
"#;
    let Some(mut w) = world(
        "waypoint_sends_a_request_its_dead_endpoint_refused_to_another_without_a_retry_policy",
        routes,
    ) else {
        return;
    };
    // Both endpoints serve at first.
    wait_for(T, "both endpoints of `pool` to answer", || {
        let bodies: Vec<String> = (0..20)
            .filter_map(|_| w.get(API_VIP, "/x").ok().map(|(_, body)| body))
            .collect();
        (bodies.iter().any(|b| b.starts_with("api-v1"))
            && bodies.iter().any(|b| b.starts_with("other")))
        .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", w.logs()));

    // `other`'s server dies; its pod stays in the Service's endpoints (the control plane has
    // not noticed yet). Its node agent now answers the waypoint's tunnels with 503.
    drop(w.servers.remove(2));
    // Concurrent requests first, so the dead endpoint is chosen before the balancer has
    // seen it fail, then one after another.
    let ns = w.web().netns().expect("netns");
    let addr = SocketAddr::new(API_VIP.parse().expect("vip"), 80);
    let host = format!("{API_VIP}:80");
    let mut answers: Vec<std::io::Result<(u16, String)>> = std::thread::scope(|s| {
        let calls: Vec<_> = (0..12)
            .map(|i| {
                let (ns, host) = (&ns, &host);
                s.spawn(move || http(ns, addr, "GET", &format!("/c{i}"), host))
            })
            .collect();
        calls
            .into_iter()
            .map(|c| c.join().expect("request thread"))
            .collect()
    });
    for i in 0..20 {
        answers.push(http(&ns, addr, "GET", &format!("/s{i}"), &host));
    }
    let failed: Vec<_> = answers
        .iter()
        .filter(|a| !matches!(a, Ok((200, body)) if body.starts_with("api-v1")))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests not served by api-v1: {failed:?}\n{}",
        failed.len(),
        answers.len(),
        w.logs()
    );
    let failovers = w.wp_metric(
        "weft_waypoint_connect_failovers_total",
        &[("backend", "pool")],
    );
    assert!(
        failovers >= 1.0,
        "no request went to the dead endpoint first: {failovers}\n{}",
        w.waypoint().metrics()
    );
}

#[test]
fn waypoint_carries_a_grpc_bidirectional_stream_message_by_message() {
    let _g = serial();
    let Some(w) = world(
        "waypoint_carries_a_grpc_bidirectional_stream_message_by_message",
        ROUTING,
    ) else {
        return;
    };
    // Each message is sent only once the reply to the one before came back: a waypoint that
    // waited for the end of the request would stall the stream until the timeout.
    let ns = w.web().netns().expect("netns");
    let addr = SocketAddr::new(GREETER_VIP.parse().expect("vip"), GRPC_PORT);
    let started = Instant::now();
    let chat = weft_tests::grpc::grpc_chat(
        &ns,
        addr,
        &format!("greeter.shop:{GRPC_PORT}"),
        "/shop.Greeter/Chat",
        &["one", "two", "three"],
        T,
    )
    .unwrap_or_else(|e| panic!("stream through the waypoint: {e}\n{}", w.logs()));
    assert_eq!(
        chat.replies,
        [
            "greeter-v1 echo one",
            "greeter-v1 echo two",
            "greeter-v1 echo three"
        ],
        "{}",
        w.logs()
    );
    assert_eq!(chat.grpc_status.as_deref(), Some("0"));
    // Streamed (the first message waits 20 ms at most for more), not held for a timeout.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // Counted once in the golden metrics, with its gRPC status.
    let calls = w.wp_metric(
        "weft_waypoint_requests_total",
        &[("route", "greeter"), ("grpc_status", "0")],
    );
    assert!(calls >= 1.0, "{}", w.waypoint().metrics());
}
