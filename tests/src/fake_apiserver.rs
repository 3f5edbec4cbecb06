//! A fake Kubernetes API server over real HTTP (127.0.0.1, any port), for tests of code that
//! uses kube's real client, watcher, reflector and Controller (no cluster is available here:
//! see ../shared/notes/testing-without-a-cluster.md).
//!
//! Generic over kinds: objects live in memory keyed by (`apiVersion/plural`, namespace, name)
//! and any `/api/v1/...` or `/apis/GROUP/VERSION/...` path is served. Modelled: list (label and
//! field selectors, equality-based and existence), watch from a resourceVersion (ADDED, MODIFIED, DELETED,
//! BOOKMARK; an object entering or leaving a selector is ADDED or DELETED; the watch closes at
//! `timeoutSeconds`), 410 Gone for a resourceVersion older than the compaction horizon (for a
//! watch, like the real server: an ERROR event in a 200 response), get, create, replace (409
//! on a stale resourceVersion), delete, merge patch, server-side apply (approximated as a merge
//! patch; `fieldManager` required), the `status` subresource (main-resource writes keep the
//! stored status; status writes change only the status) and `metadata.generation`. A write
//! that changes nothing keeps the resourceVersion, as on the real server, so a controller
//! re-applying the same status does not loop. Not modelled: RBAC, admission, schemas, JSON
//! patch, set-based selectors, pagination, managedFields, finalizers. TokenReviews
//! (`POST /apis/authentication.k8s.io/v1/tokenreviews`) answer from the tokens given to
//! `add_token` (audiences checked; unknown tokens refused); they are not stored. Faults:
//! `inject_errors` (the next requests fail with 500), `fail_path` (requests to one collection
//! fail with a chosen status, e.g. 404 for a CRD that is not installed), `drop_watches`,
//! `compact`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

type Body = BoxBody<Bytes, std::io::Error>;
type Query = BTreeMap<String, String>;
type Reply = Result<(u16, Value), Fail>;
type FrameTx = mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>;

/// Creation timestamp of objects that do not bring their own.
const CREATED: &str = "2026-01-01T00:00:00Z";

/// A fake API server; dropping it stops it and cuts every open watch.
pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

/// One request the server answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    /// Decoded query parameters.
    pub query: Query,
    /// The HTTP status; for a watch answered with an ERROR event (410), that event's code.
    pub status: u16,
}

impl RequestRecord {
    /// A `?watch=true` request.
    pub fn is_watch(&self) -> bool {
        is_watch(&self.query)
    }
}

fn is_watch(q: &Query) -> bool {
    matches!(q.get("watch").map(String::as_str), Some("true" | "1"))
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    gvr: String, // "v1/pods", "weft.dev/v1alpha1/authorizationpolicies"
    ns: String,  // "" for cluster-scoped objects
    name: String,
}

struct Change {
    rv: u64,
    key: Key,
    deleted: bool,
    old: Option<Value>,
    new: Value,
}

#[derive(Default)]
struct Store {
    rv: u64,
    horizon: u64,
    drops: u64,
    uids: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<Change>,
    kinds: BTreeMap<String, String>, // gvr -> kind
}

struct Shared {
    store: Mutex<Store>,
    tick: watch::Sender<u64>,
    errors: AtomicUsize,
    /// Request path -> (HTTP status, how many more requests to fail).
    path_faults: Mutex<BTreeMap<String, (u16, usize)>>,
    log: Mutex<Vec<RequestRecord>>,
    bookmark_every: Mutex<Duration>,
    bookmarks: Mutex<Vec<(String, u64)>>,
    /// TokenReview: token -> who it authenticates.
    tokens: Mutex<BTreeMap<String, TokenUser>>,
}

/// The API path of TokenReviews (`create` only, like the real server).
pub const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// Who a token authenticates as in a TokenReview ([`FakeApiServer::add_token`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenUser {
    pub username: String,
    pub uid: String,
    /// The token's audiences; a review asking for none of them is refused, as on the real
    /// server.
    pub audiences: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

impl TokenUser {
    /// A projected token of service account `ns/name` with `audience`, bound to a pod.
    pub fn service_account(ns: &str, name: &str, audience: &str) -> Self {
        Self {
            username: format!("system:serviceaccount:{ns}:{name}"),
            uid: format!("uid-sa-{ns}-{name}"),
            audiences: vec![audience.into()],
            extra: BTreeMap::new(),
        }
    }

    /// Bound to pod `name` (UID `uid`) and, when given, node `node` (the node-name extra,
    /// Kubernetes 1.30+; without it a reviewer must look the pod up).
    pub fn bound_to(mut self, pod: &str, uid: &str, node: Option<&str>) -> Self {
        let mut put = |k: &str, v: &str| {
            self.extra
                .insert(format!("authentication.kubernetes.io/{k}"), vec![v.into()]);
        };
        put("pod-name", pod);
        put("pod-uid", uid);
        if let Some(n) = node {
            put("node-name", n);
        }
        self
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// Runs `f` on the store, then wakes every watch.
    fn write<R>(&self, f: impl FnOnce(&mut Store) -> R) -> R {
        let r = f(&mut lock(&self.store));
        self.tick.send_modify(|t| *t += 1);
        r
    }
}

impl FakeApiServer {
    /// Starts a server on 127.0.0.1 (any free port) on the current tokio runtime.
    ///
    /// # Panics
    /// When no local port can be bound.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await;
        let listener = listener.unwrap_or_else(|e| panic!("fake API server: cannot listen: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("fake API server: {e}"));
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            tick: watch::channel(0).0,
            errors: AtomicUsize::new(0),
            path_faults: Mutex::new(BTreeMap::new()),
            log: Mutex::new(Vec::new()),
            bookmark_every: Mutex::new(Duration::from_secs(60)),
            bookmarks: Mutex::new(Vec::new()),
            tokens: Mutex::new(BTreeMap::new()),
        });
        let sh = shared.clone();
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let sh = sh.clone();
                let svc = hyper::service::service_fn(move |req| handle(sh.clone(), req));
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
                tokio::spawn(conn);
            }
        });
        Self {
            addr,
            shared,
            accept,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client for this server.
    ///
    /// # Panics
    /// Never in practice (the URL is always valid).
    pub fn client(&self) -> kube::Client {
        let uri = self
            .url()
            .parse()
            .unwrap_or_else(|e| panic!("fake API server URL: {e}"));
        kube::Client::try_from(kube::Config::new(uri))
            .unwrap_or_else(|e| panic!("kube client for the fake API server: {e}"))
    }

    /// Creates or replaces an object, status included (as the kubelet or a controller would),
    /// and returns it as stored. The plural comes from `kind` (`Policy` -> `policies`).
    ///
    /// # Panics
    /// When `obj` lacks `apiVersion`, `kind` or `metadata.name` (a broken test).
    pub fn apply(&self, obj: Value) -> Value {
        let field = |p: &str| match obj.pointer(p).and_then(Value::as_str) {
            Some(s) => s.to_owned(),
            None => panic!("FakeApiServer::apply: object without {p}: {obj}"),
        };
        let (av, kind, name) = (
            field("/apiVersion"),
            field("/kind"),
            field("/metadata/name"),
        );
        let ns = obj["metadata"]["namespace"].as_str().unwrap_or_default();
        let key = key_for(&av, &kind, ns, &name);
        self.shared
            .write(|s| s.commit(&key, Some(obj)))
            .unwrap_or_default()
    }

    /// Deletes an object (`ns` "" for cluster-scoped kinds); returns it if it existed.
    pub fn delete(&self, api_version: &str, kind: &str, ns: &str, name: &str) -> Option<Value> {
        let key = key_for(api_version, kind, ns, name);
        self.shared.write(|s| s.commit(&key, None))
    }

    /// The stored object (`ns` "" for cluster-scoped kinds).
    pub fn get(&self, api_version: &str, kind: &str, ns: &str, name: &str) -> Option<Value> {
        let key = key_for(api_version, kind, ns, name);
        lock(&self.shared.store).objects.get(&key).cloned()
    }

    /// The next `n` requests (of any kind) fail with 500 Internal Server Error.
    pub fn inject_errors(&self, n: usize) {
        self.shared.errors.store(n, Ordering::SeqCst);
    }

    /// The next `n` requests to exactly `path` (list and watch of a collection share one path,
    /// e.g. `/apis/weft.dev/v1alpha1/authorizationpolicies`) fail with `code` (404: as if the
    /// kind were not served, e.g. a CRD not installed; 403: as if RBAC denied it; else 500).
    /// `n` 0 clears the fault; `usize::MAX` keeps it until cleared.
    pub fn fail_path(&self, path: &str, code: u16, n: usize) {
        let mut faults = lock(&self.shared.path_faults);
        if n == 0 {
            faults.remove(path);
        } else {
            faults.insert(path.to_owned(), (code, n));
        }
    }

    /// Cuts every open watch connection now (no clean end of stream).
    pub fn drop_watches(&self) {
        self.shared.write(|s| s.drops += 1);
    }

    /// Compacts history: every resourceVersion handed out so far expires (a watch from one
    /// gets 410 Gone) and open watches are cut, so every watcher must relist.
    pub fn compact(&self) {
        self.shared.write(|s| {
            s.rv += 1;
            s.horizon = s.rv;
            s.history.clear();
            s.drops += 1;
        });
    }

    /// How often watches that allow bookmarks get one (default 60 s, like the real server).
    /// Applies to watches opened afterwards.
    pub fn set_bookmark_interval(&self, every: Duration) {
        *lock(&self.shared.bookmark_every) = every;
    }

    /// Bookmarks sent so far: (`/apiVersion/plural` of the watch, resourceVersion).
    pub fn bookmarks(&self) -> Vec<(String, u64)> {
        lock(&self.shared.bookmarks).clone()
    }

    /// Every request answered so far, oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.shared.log).clone()
    }

    /// TokenReviews of `token` authenticate it as `user` (unknown tokens are refused).
    pub fn add_token(&self, token: &str, user: TokenUser) {
        lock(&self.shared.tokens).insert(token.into(), user);
    }

    /// Forgets `token` (as if it expired or its pod was deleted).
    pub fn revoke_token(&self, token: &str) {
        lock(&self.shared.tokens).remove(token);
    }

    /// The latest resourceVersion.
    pub fn resource_version(&self) -> u64 {
        lock(&self.shared.store).rv
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.accept.abort();
        self.drop_watches();
    }
}

impl Store {
    /// Stores `obj` under `key` (create or replace) or deletes the object (`None`), records
    /// the change and returns the stored or deleted object. A write that changes nothing is a
    /// no-op.
    fn commit(&mut self, key: &Key, obj: Option<Value>) -> Option<Value> {
        let old = self.objects.get(key).cloned();
        let Some(mut new) = obj else {
            let mut gone = self.objects.remove(key)?;
            self.rv += 1;
            gone["metadata"]["resourceVersion"] = json!(self.rv.to_string());
            self.record(key, true, old, gone.clone());
            return Some(gone);
        };
        if !new["metadata"].is_object() {
            new["metadata"] = json!({});
        }
        let m = &mut new["metadata"];
        m["name"] = json!(key.name);
        if !key.ns.is_empty() {
            m["namespace"] = json!(key.ns);
        }
        if let Some(o) = &old {
            for f in ["uid", "creationTimestamp", "generation", "resourceVersion"] {
                m[f] = o["metadata"][f].clone();
            }
            if new == *o {
                return old;
            }
            if strip(new.clone(), &["metadata", "status"])
                != strip(o.clone(), &["metadata", "status"])
            {
                new["metadata"]["generation"] =
                    json!(o["metadata"]["generation"].as_i64().unwrap_or(0) + 1);
            }
        } else {
            self.uids += 1;
            m["uid"] = json!(format!("00000000-0000-4000-8000-{:012x}", self.uids));
            if !m["creationTimestamp"].is_string() {
                m["creationTimestamp"] = json!(CREATED);
            }
            m["generation"] = json!(1);
        }
        self.rv += 1;
        new["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        if let Some(kind) = new["kind"].as_str() {
            self.kinds.insert(key.gvr.clone(), kind.to_owned());
        }
        self.objects.insert(key.clone(), new.clone());
        self.record(key, false, old, new.clone());
        Some(new)
    }

    fn record(&mut self, key: &Key, deleted: bool, old: Option<Value>, new: Value) {
        let change = Change {
            rv: self.rv,
            key: key.clone(),
            deleted,
            old,
            new,
        };
        self.history.push(change);
    }
}

/// `v` without the given top-level fields.
fn strip(mut v: Value, fields: &[&str]) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.retain(|k, _| !fields.contains(&k.as_str()));
    }
    v
}

fn key_for(api_version: &str, kind: &str, ns: &str, name: &str) -> Key {
    let k = kind.to_ascii_lowercase();
    let plural = match k.strip_suffix('y') {
        Some(stem) => format!("{stem}ies"),
        None if k.ends_with('s') || k.ends_with('x') => format!("{k}es"),
        None => format!("{k}s"),
    };
    Key {
        gvr: format!("{api_version}/{plural}"),
        ns: ns.into(),
        name: name.into(),
    }
}

/// A parsed request path: a collection (`key.name` empty; `key.ns` empty: all namespaces or
/// cluster-scoped) or an object, maybe a subresource of it.
#[derive(Debug, PartialEq)]
struct Target {
    key: Key,
    named: bool,
    sub: Option<String>,
}

impl Target {
    fn parse(path: &str) -> Option<Self> {
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (gv, rest) = match segs.as_slice() {
            ["api", v, rest @ ..] => ((*v).to_owned(), rest),
            ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
            _ => return None,
        };
        let (ns, rest) = match rest {
            ["namespaces", ns, r @ ..] if !r.is_empty() && r[0] != "status" => (*ns, r),
            _ => ("", rest),
        };
        let (plural, name, sub) = match rest {
            [p] => (p, None, None),
            [p, n] => (p, Some(*n), None),
            [p, n, sub] => (p, Some(*n), Some((*sub).to_owned())),
            _ => return None,
        };
        let (gvr, named) = (format!("{gv}/{plural}"), name.is_some());
        let key = Key {
            gvr,
            ns: ns.into(),
            name: name.unwrap_or_default().into(),
        };
        Some(Self { key, named, sub })
    }

    /// Whether the collection holds `key`.
    fn holds(&self, key: &Key) -> bool {
        key.gvr == self.key.gvr && (self.key.ns.is_empty() || self.key.ns == key.ns)
    }

    /// `apiVersion` of the kind.
    fn api_version(&self) -> &str {
        self.key.gvr.rsplit_once('/').map_or("", |(av, _)| av)
    }
}

/// An equality-based selector requirement.
#[derive(Debug, PartialEq)]
enum Req {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    Absent(String),
}

#[derive(Debug, Default)]
struct Selectors {
    labels: Vec<Req>,
    fields: Vec<Req>,
}

fn parse_selector(s: &str) -> Result<Vec<Req>, Fail> {
    if s.contains('(') {
        return fail(
            400,
            "BadRequest",
            format!("set-based selectors are not supported: {s}"),
        );
    }
    let terms = s.split(',').map(str::trim).filter(|t| !t.is_empty());
    Ok(terms
        .map(|t| {
            let pair = |sep| {
                t.split_once(sep)
                    .map(|(k, v)| (k.trim().into(), v.trim().into()))
            };
            if let Some(k) = t.strip_prefix('!') {
                Req::Absent(k.trim().into())
            } else if let Some((k, v)) = pair("!=") {
                Req::Ne(k, v)
            } else if let Some((k, v)) = pair("==").or_else(|| pair("=")) {
                Req::Eq(k, v)
            } else {
                Req::Exists(t.into())
            }
        })
        .collect())
}

impl Selectors {
    fn from_query(q: &Query) -> Result<Self, Fail> {
        let get = |k: &str| parse_selector(q.get(k).map(String::as_str).unwrap_or_default());
        Ok(Self {
            labels: get("labelSelector")?,
            fields: get("fieldSelector")?,
        })
    }

    fn matches(&self, obj: &Value) -> bool {
        let labels = &obj["metadata"]["labels"];
        let field = |path: &str| match obj.pointer(&format!("/{}", path.replace('.', "/"))) {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
        };
        self.labels.iter().all(|r| match r {
            Req::Eq(k, v) => labels[k].as_str() == Some(v),
            Req::Ne(k, v) => labels[k].as_str() != Some(v),
            Req::Exists(k) => labels.get(k).is_some(),
            Req::Absent(k) => labels.get(k).is_none(),
        }) && self.fields.iter().all(|r| match r {
            Req::Eq(k, v) => field(k) == *v,
            Req::Ne(k, v) => field(k) != *v,
            Req::Exists(_) | Req::Absent(_) => true,
        })
    }
}

/// An API error (code, reason, message), answered as a `Status` object.
#[derive(Debug)]
struct Fail(u16, &'static str, String);

fn fail<T>(code: u16, reason: &'static str, msg: impl Into<String>) -> Result<T, Fail> {
    Err(Fail(code, reason, msg.into()))
}

impl Fail {
    fn status(&self) -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": self.2, "reason": self.1, "code": self.0})
    }
}

fn respond(code: u16, body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn full(v: &Value) -> Body {
    Full::new(Bytes::from(v.to_string()))
        .map_err(|never| match never {})
        .boxed()
}

async fn handle(sh: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let query: Query = (req.uri().query().unwrap_or_default().split('&'))
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect();
    let ctype = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let ctype = ctype.unwrap_or_default().to_owned();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let errors = &sh.errors;
    let path_fault = {
        let mut faults = lock(&sh.path_faults);
        let fault = faults.get_mut(&path).map(|(code, left)| {
            *left = left.saturating_sub(1);
            (*code, *left == 0)
        });
        match fault {
            Some((code, true)) => {
                faults.remove(&path);
                Some(code)
            }
            Some((code, false)) => Some(code),
            None => None,
        }
    };
    let (resp, code) = if let Some(code) = path_fault {
        let reason = match code {
            404 => "NotFound",
            403 => "Forbidden",
            _ => "InternalError",
        };
        let f = Fail(code, reason, "injected fault".into());
        (respond(code, full(&f.status())), code)
    } else if errors
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        let f = Fail(500, "InternalError", "injected fault".into());
        (respond(500, full(&f.status())), 500)
    } else {
        route(&sh, &method, &path, &query, &ctype, &body)
    };
    let record = RequestRecord {
        method: method.to_string(),
        path,
        query,
        status: code,
    };
    lock(&sh.log).push(record);
    Ok(resp)
}

fn route(
    sh: &Arc<Shared>,
    m: &Method,
    path: &str,
    q: &Query,
    ctype: &str,
    body: &[u8],
) -> (Response<Body>, u16) {
    let reply = match Target::parse(path) {
        _ if path == TOKEN_REVIEWS && *m == Method::POST => token_review(sh, body),
        _ if path.starts_with(TOKEN_REVIEWS) => fail(
            405,
            "MethodNotAllowed",
            format!("{m} {path}: tokenreviews are create-only"),
        ),
        None => fail(404, "NotFound", format!("no such resource: {path}")),
        Some(t) if *m == Method::GET && !t.named && is_watch(q) => {
            return start_watch(sh, t, q);
        }
        Some(t) => match (m, t.named) {
            (&Method::GET, false) => list(sh, &t, q),
            (&Method::GET, true) => {
                let found = lock(&sh.store).objects.get(&t.key).cloned();
                found.map(|o| (200, o)).ok_or_else(|| not_found(&t.key))
            }
            (&Method::DELETE, true) => {
                let gone = sh.write(|s| s.commit(&t.key, None));
                gone.map(|o| (200, o)).ok_or_else(|| not_found(&t.key))
            }
            (&Method::POST, false) | (&Method::PUT | &Method::PATCH, true) => {
                write(sh, &t, m, q, ctype, body)
            }
            _ => fail(405, "MethodNotAllowed", format!("{m} {path}")),
        },
    };
    let (code, v) = reply.unwrap_or_else(|f| (f.0, f.status()));
    (respond(code, full(&v)), code)
}

/// A TokenReview: the request echoed with its status, as the real server answers (201).
fn token_review(sh: &Shared, body: &[u8]) -> Reply {
    let mut review: Value = serde_json::from_slice(body)
        .map_err(|e| Fail(400, "BadRequest", format!("body is not JSON: {e}")))?;
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let wanted: Vec<String> = match review["spec"]["audiences"].as_array() {
        Some(a) if !a.is_empty() => a
            .iter()
            .filter_map(|v| v.as_str().map(Into::into))
            .collect(),
        _ => vec!["https://kubernetes.default.svc".into()],
    };
    let user = lock(&sh.tokens).get(token).cloned();
    let status = match user {
        None => json!({"user": {}, "error": "invalid bearer token"}),
        Some(u) => {
            let common: Vec<&String> = wanted.iter().filter(|a| u.audiences.contains(a)).collect();
            if common.is_empty() {
                json!({"user": {}, "error": format!("token audiences {:?} is invalid for the target audiences {:?}", u.audiences, wanted)})
            } else {
                json!({"authenticated": true, "audiences": common,
                       "user": {"username": u.username, "uid": u.uid,
                                "groups": ["system:serviceaccounts", "system:authenticated"],
                                "extra": u.extra}})
            }
        }
    };
    review["status"] = status;
    if let Some(spec) = review["spec"].as_object_mut() {
        spec.remove("token");
    }
    Ok((201, review))
}

fn not_found(k: &Key) -> Fail {
    Fail(404, "NotFound", format!("{} {} not found", k.gvr, k.name))
}

fn list(sh: &Shared, t: &Target, q: &Query) -> Reply {
    let sel = Selectors::from_query(q)?;
    let s = lock(&sh.store);
    let exact = q.get("resourceVersionMatch").is_some_and(|m| m == "Exact");
    if let Some(rv) = q.get("resourceVersion").and_then(|v| v.parse::<u64>().ok())
        && exact
        && rv < s.horizon
    {
        return fail(410, "Expired", format!("too old resource version: {rv}"));
    }
    let items = s
        .objects
        .iter()
        .filter(|(k, o)| t.holds(k) && sel.matches(o));
    let items: Vec<&Value> = items.map(|(_, o)| o).collect();
    let (av, kind) = (t.api_version(), s.kinds.get(&t.key.gvr));
    let kind = kind.map_or("Object", String::as_str);
    let meta = json!({"resourceVersion": s.rv.to_string()});
    Ok((
        200,
        json!({"apiVersion": av, "kind": format!("{kind}List"), "metadata": meta, "items": items}),
    ))
}

/// POST (create), PUT (replace) and PATCH (merge, strategic merge, apply), on an object or its
/// `status` subresource.
fn write(sh: &Shared, t: &Target, m: &Method, q: &Query, ctype: &str, body: &[u8]) -> Reply {
    let apply = ctype.starts_with("application/apply-patch");
    if ctype.contains("json-patch") {
        return fail(415, "UnsupportedMediaType", "JSON patch is not supported");
    }
    if apply && q.get("fieldManager").is_none_or(String::is_empty) {
        return fail(
            400,
            "BadRequest",
            "fieldManager is required for apply requests",
        );
    }
    let mut p: Value = serde_json::from_slice(body)
        .or_else(|_| serde_yaml::from_slice(body))
        .map_err(|e| Fail(400, "BadRequest", format!("body is not JSON or YAML: {e}")))?;
    let status_only = t.sub.as_deref() == Some("status");
    let mut key = t.key.clone();
    if *m == Method::POST {
        let Some(name) = p["metadata"]["name"].as_str() else {
            return fail(422, "Invalid", "metadata.name: Required value");
        };
        key.name = name.to_owned();
    }
    sh.write(|s| {
        let new = match (s.objects.get(&key).cloned(), m) {
            (Some(_), &Method::POST) => {
                let msg = format!("{} \"{}\" already exists", key.gvr, key.name);
                return fail(409, "AlreadyExists", msg);
            }
            (None, &Method::POST) => strip(p, &["status"]),
            (None, _) if apply && !status_only => strip(p, &["status"]),
            (None, _) => return Err(not_found(&key)),
            (Some(old), _) => {
                if let Some(rv) = p["metadata"]["resourceVersion"].as_str()
                    && !rv.is_empty()
                    && Some(rv) != old["metadata"]["resourceVersion"].as_str()
                {
                    let msg = "the object has been modified; please apply your changes to the latest version and try again";
                    return fail(409, "Conflict", msg);
                }
                let (put, mut n) = (*m == Method::PUT, old);
                match (put, status_only) {
                    (true, true) => n["status"] = p["status"].take(),
                    (false, true) => merge(&mut n["status"], p["status"].take()),
                    (true, false) => n = json!({"status": n["status"].take()}),
                    (false, false) => {}
                }
                if !status_only {
                    merge(&mut n, strip(p, &["status"]));
                }
                n
            }
        };
        let new = if new["status"].is_null() { strip(new, &["status"]) } else { new };
        let code = if *m == Method::POST { 201 } else { 200 };
        Ok((code, s.commit(&key, Some(new)).unwrap_or_default()))
    })
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: Value) {
    let Value::Object(p) = patch else {
        *target = patch;
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    for (k, v) in p {
        match target.as_object_mut() {
            Some(t) if v.is_null() => {
                t.remove(&k);
            }
            _ => merge(&mut target[&k], v),
        }
    }
}

struct WatchReq {
    target: Target,
    sel: Selectors,
    bookmarks: bool,
    timeout: Duration,
}

fn start_watch(sh: &Arc<Shared>, target: Target, q: &Query) -> (Response<Body>, u16) {
    let sel = match Selectors::from_query(q) {
        Ok(s) => s,
        Err(f) => return (respond(f.0, full(&f.status())), f.0),
    };
    let from = q
        .get("resourceVersion")
        .filter(|v| !v.is_empty() && *v != "0");
    let from = from.map(|v| v.parse::<u64>().unwrap_or(0));
    let timeout = q.get("timeoutSeconds").and_then(|t| t.parse().ok());
    let timeout = Duration::from_secs(timeout.unwrap_or(1800));
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    let w = WatchReq {
        target,
        sel,
        bookmarks,
        timeout,
    };
    let (tx, rx) = mpsc::channel(64);
    let s = lock(&sh.store);
    let code = match from {
        Some(rv) if rv < s.horizon => {
            let f = Fail(
                410,
                "Expired",
                format!("too old resource version: {rv} ({})", s.horizon),
            );
            let _ = tx.try_send(Ok(event_frame("ERROR", &f.status())));
            410
        }
        _ => {
            let initial: Vec<Frame<Bytes>> = match from {
                Some(_) => Vec::new(),
                None => (s.objects.iter())
                    .filter(|(k, o)| w.target.holds(k) && w.sel.matches(o))
                    .map(|(_, o)| event_frame("ADDED", o))
                    .collect(),
            };
            tokio::spawn(watch_loop(
                sh.clone(),
                w,
                from.unwrap_or(s.rv),
                s.drops,
                initial,
                tx,
            ));
            200
        }
    };
    drop(s);
    let stream = futures::stream::unfold(rx, |mut rx| async move { Some((rx.recv().await?, rx)) });
    (respond(200, BodyExt::boxed(StreamBody::new(stream))), code)
}

fn event_frame(ty: &str, obj: &Value) -> Frame<Bytes> {
    Frame::data(Bytes::from(format!(
        "{}\n",
        json!({"type": ty, "object": obj})
    )))
}

/// Streams the changes after `cursor` that the watch can see, and bookmarks, until the
/// timeout, a drop or a disconnect.
async fn watch_loop(
    sh: Arc<Shared>,
    w: WatchReq,
    mut cursor: u64,
    drops: u64,
    mut frames: Vec<Frame<Bytes>>,
    tx: FrameTx,
) {
    let mut tick = sh.tick.subscribe();
    let deadline = tokio::time::Instant::now() + w.timeout;
    let every = *lock(&sh.bookmark_every);
    let mut next_bookmark = tokio::time::Instant::now() + every;
    let mut bookmark_due = false;
    loop {
        let (dropped, mark) = {
            let (mut mark, s) = (None, lock(&sh.store));
            let dropped = s.drops != drops;
            let first = s.history.partition_point(|c| c.rv <= cursor);
            for c in s.history[first..].iter().filter(|_| !dropped) {
                let visible = |o: &Value| w.target.holds(&c.key) && w.sel.matches(o);
                let before = c.old.as_ref().is_some_and(visible);
                let ty = match (c.deleted, before, visible(&c.new)) {
                    (true, _, true) | (false, true, false) => "DELETED",
                    (false, false, true) => "ADDED",
                    (false, true, true) => "MODIFIED",
                    _ => continue,
                };
                frames.push(event_frame(ty, &c.new));
            }
            cursor = s.rv;
            if bookmark_due {
                let (av, kind) = (w.target.api_version(), s.kinds.get(&w.target.key.gvr));
                let kind = kind.map_or("Object", String::as_str);
                let meta = json!({"resourceVersion": cursor.to_string()});
                frames.push(event_frame(
                    "BOOKMARK",
                    &json!({"apiVersion": av, "kind": kind, "metadata": meta}),
                ));
                mark = Some(cursor);
            }
            (dropped, mark)
        };
        if dropped {
            let _ = tx
                .send(Err(std::io::Error::other("watch cut by the test")))
                .await;
            return;
        }
        for f in frames.drain(..) {
            if tx.send(Ok(f)).await.is_err() {
                return;
            }
        }
        if let Some(rv) = mark {
            lock(&sh.bookmarks).push((format!("/{}", w.target.key.gvr), rv));
            bookmark_due = false;
        }
        tokio::select! {
            r = tick.changed() => if r.is_err() { return },
            () = tokio::time::sleep_until(deadline) => return,
            () = tokio::time::sleep_until(next_bookmark), if w.bookmarks => {
                bookmark_due = true;
                next_bookmark = tokio::time::Instant::now() + every;
            }
            () = tx.closed() => return,
        }
    }
}

/// Percent-decoding of a query component (`+` is a space).
fn decode(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while let Some(&c) = s.as_bytes().get(i) {
        let hex = s
            .get(i + 1..i + 3)
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (c, hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 2;
            }
            (b'+', _) => out.push(b' '),
            _ => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{StreamExt, TryStreamExt};
    use kube::api::{Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams};
    use kube::api::{WatchEvent, WatchParams};

    fn configmaps(server: &FakeApiServer) -> Api<DynamicObject> {
        let ar = ApiResource {
            group: String::new(),
            version: "v1".into(),
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            plural: "configmaps".into(),
        };
        Api::namespaced_with(server.client(), "ns", &ar)
    }

    fn cm(name: &str, x: &str) -> Value {
        let meta = json!({"name": name, "namespace": "ns", "labels": {"x": x}});
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"k": name}})
    }

    #[test]
    fn paths_selectors_and_decoding() {
        let t = Target::parse("/api/v1/namespaces/ns/pods/p/status").expect("path");
        let status = Some("status".to_owned());
        assert_eq!(
            t,
            Target {
                key: key_for("v1", "Pod", "ns", "p"),
                named: true,
                sub: status
            }
        );
        let t = Target::parse("/api/v1/namespaces/ns").expect("path");
        assert_eq!(t.key, key_for("v1", "Namespace", "", "ns"));
        let t = Target::parse("/apis/weft.dev/v1alpha1/authorizationpolicies").expect("path");
        let key = key_for("weft.dev/v1alpha1", "AuthorizationPolicy", "", "");
        assert_eq!((t.key, t.named), (key, false));
        assert!(Target::parse("/healthz").is_none());
        assert_eq!(decode("a%3Db%2Cc%21%3D+d%"), "a=b,c!= d%");
        let sel = Selectors {
            labels: parse_selector("app=web,tier!=db,!legacy").expect("labels"),
            fields: parse_selector("spec.nodeName!=,status.phase!=Failed").expect("fields"),
        };
        let pod = |labels: Value, node: &str| json!({"metadata": {"labels": labels}, "spec": {"nodeName": node}, "status": {}});
        assert!(sel.matches(&pod(json!({"app": "web"}), "n1")));
        assert!(!sel.matches(&pod(json!({"app": "web"}), "")));
        assert!(!sel.matches(&pod(json!({"app": "web", "legacy": "1"}), "n1")));
        assert!(!sel.matches(&pod(json!({"app": "web", "tier": "db"}), "n1")));
        assert!(parse_selector("env in (a,b)").is_err());
    }

    #[tokio::test]
    async fn crud_conflicts_status_and_faults() {
        let server = FakeApiServer::start().await;
        let api = configmaps(&server);
        let obj: DynamicObject = serde_json::from_value(cm("a", "1")).expect("object");
        let created = api
            .create(&PostParams::default(), &obj)
            .await
            .expect("create");
        assert_eq!(created.metadata.generation, Some(1));
        assert!(
            api.create(&PostParams::default(), &created).await.is_err(),
            "exists"
        );
        let merge = Patch::Merge(json!({"data": {"k": "v2"}}));
        api.patch("a", &PatchParams::default(), &merge)
            .await
            .expect("merge");
        let e = api
            .replace("a", &PostParams::default(), &created)
            .await
            .expect_err("stale");
        assert!(
            matches!(e, kube::Error::Api(ref s) if s.code == 409),
            "{e:?}"
        );
        let status = json!({"apiVersion": "v1", "kind": "ConfigMap", "status": {"ok": true}});
        let pp = PatchParams::apply("t");
        let applied = api
            .patch_status("a", &pp, &Patch::Apply(&status))
            .await
            .expect("status");
        assert_eq!(
            (
                applied.data["status"]["ok"].clone(),
                applied.data["data"]["k"].clone()
            ),
            (json!(true), json!("v2"))
        );
        assert_eq!(
            applied.metadata.generation,
            Some(2),
            "status writes keep the generation"
        );
        let rv = server.resource_version();
        api.patch_status("a", &pp, &Patch::Apply(&status))
            .await
            .expect("no-op");
        assert_eq!(
            server.resource_version(),
            rv,
            "a no-op write keeps the resourceVersion"
        );
        assert_eq!(
            api.list(&ListParams::default().labels("x=1"))
                .await
                .expect("list")
                .items
                .len(),
            1
        );
        assert_eq!(
            api.list(&ListParams::default().labels("x!=1"))
                .await
                .expect("list")
                .items
                .len(),
            0
        );
        server.inject_errors(1);
        assert!(api.get("a").await.is_err());
        assert!(api.get("a").await.is_ok());
        api.delete("a", &Default::default()).await.expect("delete");
        assert!(server.get("v1", "ConfigMap", "ns", "a").is_none());
        let codes: Vec<u16> = server.requests().iter().map(|r| r.status).collect();
        assert_eq!(
            codes,
            [201, 409, 200, 409, 200, 200, 200, 200, 500, 200, 200]
        );
    }

    #[tokio::test]
    async fn watch_replays_transitions_bookmarks_and_expires_after_compaction() {
        let server = FakeApiServer::start().await;
        server.set_bookmark_interval(Duration::from_millis(20));
        let api = configmaps(&server);
        server.apply(cm("b", "0"));
        let rv0 = server.resource_version().to_string();
        server.apply(cm("a", "1"));
        server.apply(cm("a", "2"));
        server.delete("v1", "ConfigMap", "ns", "a");
        let wp = WatchParams::default().labels("x=1").timeout(5);
        let mut events = api.watch(&wp, &rv0).await.expect("watch").boxed();
        let mut seen = Vec::new();
        while seen.len() < 3 {
            seen.push(
                match events.try_next().await.expect("event").expect("open") {
                    WatchEvent::Added(_) => "ADDED",
                    WatchEvent::Deleted(_) => "DELETED",
                    WatchEvent::Bookmark(_) => "BOOKMARK",
                    other => panic!("unexpected {other:?}"),
                },
            );
        }
        assert_eq!(
            seen,
            ["ADDED", "DELETED", "BOOKMARK"],
            "leaving the selector is DELETED"
        );
        server.compact();
        let end = loop {
            match events.next().await {
                Some(Ok(WatchEvent::Bookmark(_))) => continue,
                other => break other,
            }
        };
        // kube reports a cut chunked stream as the end of the watch.
        assert!(
            matches!(end, None | Some(Err(_))),
            "compaction ends the watch: {end:?}"
        );
        let mut events = api.watch(&wp, &rv0).await.expect("watch").boxed();
        match events.try_next().await.expect("event") {
            Some(WatchEvent::Error(s)) => assert_eq!((s.code, s.reason.as_str()), (410, "Expired")),
            other => panic!("expected 410, got {other:?}"),
        }
        let last = server.requests().last().map(|r| (r.is_watch(), r.status));
        assert_eq!(last, Some((true, 410)));
    }

    #[tokio::test]
    async fn services_and_endpoint_slices_with_label_selectors_and_path_faults() {
        use k8s_openapi::api::core::v1::Service;
        use k8s_openapi::api::discovery::v1::EndpointSlice;
        let server = FakeApiServer::start().await;
        server.apply(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80, "targetPort": "http"}]}}));
        let slice = |name: &str, labels: Value| {
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": name, "namespace": "shop", "labels": labels},
                "addressType": "IPv4", "endpoints": [{"addresses": ["10.0.0.1"]}]})
        };
        server.apply(slice("web-1", json!({"kubernetes.io/service-name": "web"})));
        server.apply(slice("api-1", json!({"kubernetes.io/service-name": "api"})));
        server.apply(slice("manual", json!({})));
        let services = Api::<Service>::all(server.client());
        let listed = services.list(&ListParams::default()).await.expect("list");
        assert_eq!(listed.items.len(), 1);
        let svc = &listed.items[0];
        assert_eq!(
            svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()),
            Some("10.96.0.10")
        );
        let slices = Api::<EndpointSlice>::all(server.client());
        let names = |l: kube::core::ObjectList<EndpointSlice>| -> Vec<String> {
            l.items
                .iter()
                .filter_map(|s| s.metadata.name.clone())
                .collect()
        };
        let lp = ListParams::default().labels("kubernetes.io/service-name");
        assert_eq!(
            names(slices.list(&lp).await.expect("list")),
            ["api-1", "web-1"]
        );
        let lp = ListParams::default().labels("kubernetes.io/service-name=web");
        assert_eq!(names(slices.list(&lp).await.expect("list")), ["web-1"]);
        let wp = WatchParams::default()
            .labels("kubernetes.io/service-name")
            .timeout(5);
        let rv = server.resource_version().to_string();
        let mut events = slices.watch(&wp, &rv).await.expect("watch").boxed();
        server.apply(slice("manual-2", json!({})));
        server.apply(slice("web-2", json!({"kubernetes.io/service-name": "web"})));
        match events.try_next().await.expect("event") {
            Some(WatchEvent::Added(s)) => assert_eq!(s.metadata.name.as_deref(), Some("web-2")),
            other => panic!("expected web-2, got {other:?}"),
        }
        let path = "/apis/discovery.k8s.io/v1/endpointslices";
        server.fail_path(path, 404, 2);
        for _ in 0..2 {
            match slices.list(&ListParams::default()).await {
                Err(kube::Error::Api(s)) => assert_eq!(s.code, 404),
                other => panic!("expected 404, got {other:?}"),
            }
        }
        assert_eq!(
            services
                .list(&ListParams::default())
                .await
                .expect("other paths")
                .items
                .len(),
            1
        );
        assert_eq!(
            slices
                .list(&ListParams::default())
                .await
                .expect("fault over")
                .items
                .len(),
            5
        );
        server.fail_path(path, 403, usize::MAX);
        assert!(slices.list(&ListParams::default()).await.is_err());
        server.fail_path(path, 403, 0);
        assert!(slices.list(&ListParams::default()).await.is_ok());
    }

    #[tokio::test]
    async fn token_reviews_answer_from_configured_tokens() {
        use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
        let server = FakeApiServer::start().await;
        server.add_token(
            "t1",
            TokenUser::service_account("weft-system", "weft-agent", "aud").bound_to(
                "p",
                "u",
                Some("n1"),
            ),
        );
        let api: Api<TokenReview> = Api::all(server.client());
        let review = |token: &str, aud: &str| TokenReview {
            spec: TokenReviewSpec {
                audiences: Some(vec![aud.into()]),
                token: Some(token.into()),
            },
            ..Default::default()
        };
        let pp = PostParams::default();
        let ok = api.create(&pp, &review("t1", "aud")).await.expect("review");
        let status = ok.status.expect("status");
        assert_eq!(status.authenticated, Some(true));
        let user = status.user.expect("user");
        assert_eq!(
            user.username.as_deref(),
            Some("system:serviceaccount:weft-system:weft-agent")
        );
        let extra = user.extra.expect("extra");
        assert_eq!(
            extra["authentication.kubernetes.io/node-name"],
            vec!["n1".to_string()]
        );
        for (token, aud, why) in [
            ("t1", "other", "audiences"),
            ("nope", "aud", "invalid bearer token"),
        ] {
            let r = api.create(&pp, &review(token, aud)).await.expect("review");
            let status = r.status.expect("status");
            assert_ne!(status.authenticated, Some(true));
            assert!(status.error.unwrap_or_default().contains(why), "{why}");
        }
        server.revoke_token("t1");
        let r = api.create(&pp, &review("t1", "aud")).await.expect("review");
        assert_ne!(r.status.expect("status").authenticated, Some(true));
        // Reviews are not stored.
        let e = Api::<TokenReview>::all(server.client())
            .get("anything")
            .await
            .expect_err("no GET");
        assert!(matches!(&e, kube::Error::Api(s) if s.code == 405), "{e:?}");
    }
}
