//! The route table: a listener's routes compiled once per config version, then looked up per
//! request without allocation-heavy work.
//!
//! Precedence follows Gateway API: the most specific hostname first (exact, then the longest
//! wildcard, then routes without hostnames), then the path (`Exact` before `PathPrefix`,
//! longer prefixes first, `RegularExpression` last), then matches with a method, then the
//! most header conditions, then the most query conditions; remaining ties go to the route
//! declared first.

use std::cmp::Reverse;

use http::{HeaderName, HeaderValue, Method};
use regex::Regex;

use crate::config::{MatchConfig, PathMatchType, RouteConfig};

/// A route table compile failure (config validation rejects all of these first).
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// A regular expression does not compile.
    #[error(
        "routes[{route}].matches[{index}].path.value: invalid regular expression: {source}; fix its syntax"
    )]
    Regex {
        /// Route index.
        route: usize,
        /// Match index.
        index: usize,
        /// The regex error.
        source: regex::Error,
    },
    /// A header name, header value or method is invalid.
    #[error(
        "routes[{route}].matches[{index}]: {what} is invalid; run config validation to see the field"
    )]
    Invalid {
        /// Route index.
        route: usize,
        /// Match index.
        index: usize,
        /// What is wrong.
        what: &'static str,
    },
}

#[derive(Debug)]
enum HostSpec {
    Any,
    Exact(String),
    /// `*.example.com` kept as `.example.com`.
    Suffix(String),
}

impl HostSpec {
    fn rank(&self) -> (u8, usize) {
        match self {
            HostSpec::Exact(h) => (2, h.len()),
            HostSpec::Suffix(s) => (1, s.len()),
            HostSpec::Any => (0, 0),
        }
    }

    fn matches(&self, host: &str) -> bool {
        match self {
            HostSpec::Any => true,
            HostSpec::Exact(h) => h.eq_ignore_ascii_case(host),
            HostSpec::Suffix(s) => {
                host.len() > s.len()
                    && host
                        .get(host.len() - s.len()..)
                        .is_some_and(|end| end.eq_ignore_ascii_case(s))
            }
        }
    }
}

#[derive(Debug)]
enum PathSpec {
    Exact(String),
    /// Stored without a trailing `/` (so `/` becomes the empty string).
    Prefix(String),
    Regex(Regex),
}

impl PathSpec {
    /// Sort key: lower sorts first.
    fn rank(&self) -> (u8, Reverse<usize>) {
        match self {
            PathSpec::Exact(p) => (0, Reverse(p.len())),
            PathSpec::Prefix(p) => (1, Reverse(p.len())),
            PathSpec::Regex(_) => (2, Reverse(0)),
        }
    }

    /// On a match, the length of the matched prefix (for `ReplacePrefixMatch`).
    fn matches(&self, path: &str) -> Option<usize> {
        match self {
            PathSpec::Exact(p) => (p == path).then_some(path.len()),
            PathSpec::Prefix(p) => {
                let rest = path.strip_prefix(p.as_str())?;
                (rest.is_empty() || rest.starts_with('/')).then_some(p.len())
            }
            PathSpec::Regex(re) => re.is_match(path).then_some(0),
        }
    }
}

#[derive(Debug)]
struct Entry {
    host: HostSpec,
    path: PathSpec,
    method: Option<Method>,
    headers: Vec<(HeaderName, HeaderValue)>,
    query: Vec<(String, String)>,
    route: usize,
}

impl Entry {
    fn matches(&self, host: &str, request: &http::request::Parts) -> Option<usize> {
        if !self.host.matches(host) {
            return None;
        }
        if self.method.as_ref().is_some_and(|m| m != request.method) {
            return None;
        }
        for (name, value) in &self.headers {
            if !request.headers.get_all(name).iter().any(|v| v == value) {
                return None;
            }
        }
        if !self.query.is_empty() {
            let query = request.uri.query().unwrap_or("");
            for (name, value) in &self.query {
                let found = query.split('&').any(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    percent_decode(k) == name.as_str() && percent_decode(v) == value.as_str()
                });
                if !found {
                    return None;
                }
            }
        }
        self.path.matches(request.uri.path())
    }
}

/// The outcome of a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteMatch {
    /// Index of the route in the listener's `routes`.
    pub route: usize,
    /// Length of the path prefix the match consumed (`PathPrefix` and `Exact`; 0 for regexes).
    pub matched_prefix_len: usize,
}

/// A listener's compiled routes, sorted by precedence.
#[derive(Debug)]
pub struct RouteTable {
    entries: Vec<Entry>,
    /// Whether an entry matches on the host (else the host is not read per request).
    by_host: bool,
}

impl RouteTable {
    /// A table that matches nothing.
    pub fn empty() -> RouteTable {
        RouteTable {
            entries: Vec::new(),
            by_host: false,
        }
    }

    /// Compiles routes (already validated) into a table sorted by precedence.
    pub fn compile(routes: &[RouteConfig]) -> Result<RouteTable, RouteError> {
        let mut entries = Vec::new();
        for (r, route) in routes.iter().enumerate() {
            let hosts: Vec<HostSpec> = if route.hostnames.is_empty() {
                vec![HostSpec::Any]
            } else {
                route
                    .hostnames
                    .iter()
                    .map(|h| match h.strip_prefix('*') {
                        Some(suffix) => HostSpec::Suffix(suffix.to_ascii_lowercase()),
                        None => HostSpec::Exact(h.to_ascii_lowercase()),
                    })
                    .collect()
            };
            let default_match = [MatchConfig::default()];
            let matches: &[MatchConfig] = if route.matches.is_empty() {
                &default_match
            } else {
                &route.matches
            };
            for host in &hosts {
                for (m, matching) in matches.iter().enumerate() {
                    entries.push(compile_entry(r, m, host, matching)?);
                }
            }
        }
        // Stable sort: ties keep declaration order.
        entries.sort_by_key(|e| {
            let (host_kind, host_len) = e.host.rank();
            (
                Reverse(host_kind),
                Reverse(host_len),
                e.path.rank(),
                e.method.is_none(),
                Reverse(e.headers.len()),
                Reverse(e.query.len()),
            )
        });
        let by_host = entries.iter().any(|e| !matches!(e.host, HostSpec::Any));
        Ok(RouteTable { entries, by_host })
    }

    /// The highest-precedence route matching the request, if any.
    pub fn lookup(&self, request: &http::request::Parts) -> Option<RouteMatch> {
        let host = if self.by_host {
            request_host(request)
        } else {
            ""
        };
        self.entries.iter().find_map(|entry| {
            entry.matches(host, request).map(|len| RouteMatch {
                route: entry.route,
                matched_prefix_len: len,
            })
        })
    }

    /// Number of compiled (hostname, match) entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table has no entry (nothing can match).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Decodes `%XX` escapes (invalid escapes and non-UTF-8 results stay as written).
pub fn percent_decode(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains('%') {
        return std::borrow::Cow::Borrowed(text);
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    match String::from_utf8(out) {
        Ok(decoded) => std::borrow::Cow::Owned(decoded),
        Err(_) => std::borrow::Cow::Borrowed(text),
    }
}

/// The request's host without port: `Host` header (HTTP/1.1) or URI authority (HTTP/2).
pub fn request_host(request: &http::request::Parts) -> &str {
    let raw = request
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| request.uri.authority().map(|a| a.as_str()))
        .unwrap_or("");
    strip_port(raw)
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host
            .split_once(']')
            .map_or(host, |(h, _)| h.trim_start_matches('['));
    }
    host.rsplit_once(':').map_or(host, |(h, port)| {
        if port.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            host
        }
    })
}

fn compile_entry(
    r: usize,
    m: usize,
    host: &HostSpec,
    matching: &MatchConfig,
) -> Result<Entry, RouteError> {
    let invalid = |what| RouteError::Invalid {
        route: r,
        index: m,
        what,
    };
    let grpc_path = matching.grpc.as_ref().and_then(|g| g.to_path());
    let path = match matching.path.as_ref().or(grpc_path.as_ref()) {
        None => PathSpec::Prefix(String::new()),
        Some(p) => match p.kind {
            PathMatchType::Exact => PathSpec::Exact(p.value.clone()),
            PathMatchType::PathPrefix => {
                PathSpec::Prefix(p.value.trim_end_matches('/').to_string())
            }
            PathMatchType::RegularExpression => {
                PathSpec::Regex(Regex::new(&format!("^(?:{})$", p.value)).map_err(|source| {
                    RouteError::Regex {
                        route: r,
                        index: m,
                        source,
                    }
                })?)
            }
        },
    };
    let method = match &matching.method {
        None => None,
        Some(method) => {
            Some(Method::from_bytes(method.as_bytes()).map_err(|_| invalid("the method"))?)
        }
    };
    let mut headers = Vec::new();
    for header in &matching.headers {
        let name =
            HeaderName::from_bytes(header.name.as_bytes()).map_err(|_| invalid("a header name"))?;
        let value = HeaderValue::from_str(&header.value).map_err(|_| invalid("a header value"))?;
        headers.push((name, value));
    }
    let query = matching
        .query_params
        .iter()
        .map(|q| (q.name.clone(), q.value.clone()))
        .collect();
    let host = match host {
        HostSpec::Any => HostSpec::Any,
        HostSpec::Exact(h) => HostSpec::Exact(h.clone()),
        HostSpec::Suffix(s) => HostSpec::Suffix(s.clone()),
    };
    Ok(Entry {
        host,
        path,
        method,
        headers,
        query,
        route: r,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{NameValue, PathMatch};

    fn route(hostnames: &[&str], matches: Vec<MatchConfig>) -> RouteConfig {
        RouteConfig {
            hostnames: hostnames.iter().map(|h| h.to_string()).collect(),
            matches,
            ..Default::default()
        }
    }

    fn path(kind: PathMatchType, value: &str) -> MatchConfig {
        MatchConfig {
            path: Some(PathMatch {
                kind,
                value: value.into(),
            }),
            ..Default::default()
        }
    }

    fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut builder = http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        builder.body(()).expect("request").into_parts().0
    }

    fn lookup(table: &RouteTable, uri: &str, headers: &[(&str, &str)]) -> Option<usize> {
        table.lookup(&parts("GET", uri, headers)).map(|m| m.route)
    }

    #[test]
    fn exact_beats_prefix_beats_regex_regardless_of_order() {
        let table = RouteTable::compile(&[
            route(&[], vec![path(PathMatchType::RegularExpression, "/api/.*")]),
            route(&[], vec![path(PathMatchType::PathPrefix, "/api")]),
            route(&[], vec![path(PathMatchType::PathPrefix, "/api/v1")]),
            route(&[], vec![path(PathMatchType::Exact, "/api/v1/users")]),
        ])
        .expect("compile");
        assert_eq!(lookup(&table, "/api/v1/users", &[]), Some(3));
        assert_eq!(lookup(&table, "/api/v1/users/7", &[]), Some(2));
        assert_eq!(lookup(&table, "/api/v2", &[]), Some(1));
        assert_eq!(lookup(&table, "/other", &[]), None);
    }

    #[test]
    fn regex_is_anchored_and_used_last() {
        let table = RouteTable::compile(&[
            route(
                &[],
                vec![path(PathMatchType::RegularExpression, "/img/[0-9]+\\.png")],
            ),
            route(&[], vec![path(PathMatchType::PathPrefix, "/static")]),
        ])
        .expect("compile");
        assert_eq!(lookup(&table, "/img/42.png", &[]), Some(0));
        assert_eq!(lookup(&table, "/x/img/42.png", &[]), None);
        assert_eq!(lookup(&table, "/img/42.pngx", &[]), None);
    }

    fn grpc(service: Option<&str>, method: Option<&str>) -> MatchConfig {
        MatchConfig {
            grpc: Some(crate::config::GrpcMethodMatch {
                service: service.map(Into::into),
                method: method.map(Into::into),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn grpc_method_matches_are_paths() {
        let table = RouteTable::compile(&[
            route(&[], vec![grpc(Some("shop.Greeter"), None)]),
            route(&[], vec![grpc(Some("shop.Greeter"), Some("SayHello"))]),
            route(&[], vec![grpc(None, Some("Watch"))]),
        ])
        .expect("compile");
        assert_eq!(lookup(&table, "/shop.Greeter/SayHello", &[]), Some(1));
        assert_eq!(lookup(&table, "/shop.Greeter/SayBye", &[]), Some(0));
        assert_eq!(lookup(&table, "/shop.Other/Watch", &[]), Some(2));
        assert_eq!(lookup(&table, "/shop.Other/Watch2", &[]), None);
        assert_eq!(lookup(&table, "/shop.GreeterX/SayHello", &[]), None);
    }

    #[test]
    fn prefix_is_element_wise() {
        let table =
            RouteTable::compile(&[route(&[], vec![path(PathMatchType::PathPrefix, "/foo/")])])
                .expect("compile");
        assert_eq!(lookup(&table, "/foo", &[]), Some(0));
        assert_eq!(lookup(&table, "/foo/bar", &[]), Some(0));
        assert_eq!(lookup(&table, "/foobar", &[]), None);
        let m = table.lookup(&parts("GET", "/foo/bar", &[])).expect("match");
        assert_eq!(m.matched_prefix_len, 4);
    }

    #[test]
    fn more_headers_then_more_query_params_win() {
        let mut one_header = path(PathMatchType::PathPrefix, "/");
        one_header.headers = vec![NameValue {
            name: "x-a".into(),
            value: "1".into(),
        }];
        let mut two_headers = one_header.clone();
        two_headers.headers.push(NameValue {
            name: "x-b".into(),
            value: "2".into(),
        });
        let mut query = path(PathMatchType::PathPrefix, "/");
        query.query_params = vec![NameValue {
            name: "q".into(),
            value: "1".into(),
        }];
        let table = RouteTable::compile(&[
            route(&[], vec![path(PathMatchType::PathPrefix, "/")]),
            route(&[], vec![query]),
            route(&[], vec![one_header]),
            route(&[], vec![two_headers]),
        ])
        .expect("compile");
        assert_eq!(lookup(&table, "/", &[]), Some(0));
        assert_eq!(lookup(&table, "/?q=1", &[]), Some(1));
        assert_eq!(lookup(&table, "/?q=1", &[("x-a", "1")]), Some(2));
        assert_eq!(
            lookup(&table, "/?q=1", &[("x-a", "1"), ("x-b", "2")]),
            Some(3)
        );
        assert_eq!(
            lookup(&table, "/?q=2", &[("X-A", "1"), ("x-b", "3")]),
            Some(2)
        );
    }

    #[test]
    fn method_match_beats_no_method() {
        let mut post = path(PathMatchType::PathPrefix, "/");
        post.method = Some("POST".into());
        let table = RouteTable::compile(&[
            route(&[], vec![path(PathMatchType::PathPrefix, "/")]),
            route(&[], vec![post]),
        ])
        .expect("compile");
        assert_eq!(
            table.lookup(&parts("POST", "/", &[])).map(|m| m.route),
            Some(1)
        );
        assert_eq!(
            table.lookup(&parts("GET", "/", &[])).map(|m| m.route),
            Some(0)
        );
    }

    #[test]
    fn hostnames_exact_then_wildcard_then_any() {
        let table = RouteTable::compile(&[
            route(&[], vec![]),
            route(&["*.example.com"], vec![]),
            route(&["api.example.com"], vec![]),
        ])
        .expect("compile");
        assert_eq!(
            lookup(&table, "/", &[("host", "api.example.com:8080")]),
            Some(2)
        );
        assert_eq!(lookup(&table, "/", &[("host", "www.Example.com")]), Some(1));
        assert_eq!(lookup(&table, "/", &[("host", "example.com")]), Some(0));
        // HTTP/2: the authority carries the host.
        assert_eq!(lookup(&table, "http://api.example.com/x", &[]), Some(2));
    }

    #[test]
    fn first_declared_wins_ties() {
        let table = RouteTable::compile(&[
            route(&[], vec![path(PathMatchType::PathPrefix, "/a")]),
            route(&[], vec![path(PathMatchType::PathPrefix, "/a")]),
        ])
        .expect("compile");
        assert_eq!(lookup(&table, "/a", &[]), Some(0));
    }

    #[test]
    fn query_values_are_percent_decoded() {
        let mut m = path(PathMatchType::PathPrefix, "/");
        m.query_params = vec![NameValue {
            name: "user name".into(),
            value: "a&b/c".into(),
        }];
        let table = RouteTable::compile(&[route(&[], vec![m])]).expect("compile");
        assert_eq!(lookup(&table, "/?user%20name=a%26b%2Fc", &[]), Some(0));
        assert_eq!(lookup(&table, "/?user%20name=a%26b", &[]), None);
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%41"), "%zzA");
        assert_eq!(percent_decode("%ff"), "%ff", "not UTF-8: kept as written");
    }

    #[test]
    fn strip_port_handles_ipv6() {
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("host:80"), "host");
        assert_eq!(strip_port("host"), "host");
    }
}
