//! The HTTPRoute filters that change where a request goes: `URLRewrite` (path and host before
//! forwarding) and `RequestRedirect` (answer a 301/302 instead of forwarding). Header
//! modifiers are a layer ([`crate::layers::headers`]).

use http::uri::PathAndQuery;
use http::{HeaderValue, Uri};

use crate::body::{Response, text_response};
use crate::config::{PathModifier, RedirectConfig, UrlRewriteConfig};

/// A rewrite or redirect that produced an invalid URI or header.
#[derive(Debug, thiserror::Error)]
#[error(
    "the route's {filter} produced an invalid {what} `{value}`; fix the filter's hostname or path"
)]
pub struct FilterError {
    filter: &'static str,
    what: &'static str,
    value: String,
}

fn new_path(modifier: &PathModifier, path: &str, matched_prefix_len: usize) -> String {
    match modifier {
        PathModifier::ReplaceFullPath { replace_full_path } => replace_full_path.clone(),
        PathModifier::ReplacePrefixMatch {
            replace_prefix_match,
        } => {
            let rest = path.get(matched_prefix_len..).unwrap_or("");
            let prefix = replace_prefix_match.trim_end_matches('/');
            match (prefix.is_empty(), rest.is_empty()) {
                (true, true) => "/".to_string(),
                (true, false) => rest.to_string(),
                (false, _) => format!("{prefix}{rest}"),
            }
        }
    }
}

/// Applies a `URLRewrite` to `request` (path keeps its query string).
pub fn rewrite<B>(
    config: &UrlRewriteConfig,
    request: &mut http::Request<B>,
    matched_prefix_len: usize,
) -> Result<(), FilterError> {
    if let Some(modifier) = &config.path {
        let path = new_path(modifier, request.uri().path(), matched_prefix_len);
        let path_and_query = match request.uri().query() {
            Some(query) => format!("{path}?{query}"),
            None => path,
        };
        let mut parts = request.uri().clone().into_parts();
        parts.path_and_query = Some(PathAndQuery::try_from(path_and_query.as_str()).map_err(
            |_| FilterError {
                filter: "urlRewrite.path",
                what: "path",
                value: path_and_query.clone(),
            },
        )?);
        *request.uri_mut() = Uri::from_parts(parts).map_err(|_| FilterError {
            filter: "urlRewrite.path",
            what: "URI",
            value: path_and_query.clone(),
        })?;
    }
    if let Some(hostname) = &config.hostname {
        let value = HeaderValue::from_str(hostname).map_err(|_| FilterError {
            filter: "urlRewrite.hostname",
            what: "host",
            value: hostname.clone(),
        })?;
        request.headers_mut().insert(http::header::HOST, value);
        // An HTTP/2 authority would otherwise win over the Host header.
        if request.uri().authority().is_some() {
            let mut parts = request.uri().clone().into_parts();
            parts.authority = hostname.parse().ok();
            if let Ok(uri) = Uri::from_parts(parts) {
                *request.uri_mut() = uri;
            }
        }
    }
    Ok(())
}

/// The redirect answer for `request` under `config`.
pub fn redirect(
    config: &RedirectConfig,
    parts: &http::request::Parts,
    matched_prefix_len: usize,
) -> Result<Response, FilterError> {
    let scheme = config
        .scheme
        .clone()
        .or_else(|| parts.uri.scheme_str().map(str::to_string))
        .unwrap_or_else(|| "http".into());
    let host = config
        .hostname
        .clone()
        .unwrap_or_else(|| crate::route::request_host(parts).to_string());
    let path = match &config.path {
        Some(modifier) => new_path(modifier, parts.uri.path(), matched_prefix_len),
        None => parts.uri.path().to_string(),
    };
    // Gateway API: the Location leaves out the scheme's well-known port.
    let port = config
        .port
        .filter(|p| !matches!((scheme.as_str(), p), ("http", 80) | ("https", 443)))
        .map(|p| format!(":{p}"))
        .unwrap_or_default();
    let query = parts
        .uri
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let location = format!("{scheme}://{host}{port}{path}{query}");
    let value = HeaderValue::from_str(&location).map_err(|_| FilterError {
        filter: "requestRedirect",
        what: "Location",
        value: location.clone(),
    })?;
    let status = http::StatusCode::from_u16(config.status_code).unwrap_or(http::StatusCode::FOUND);
    let mut response = text_response(status, format!("redirecting to {location}\n"));
    response.headers_mut().insert(http::header::LOCATION, value);
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(uri: &str) -> http::Request<()> {
        http::Request::builder()
            .uri(uri)
            .header("host", "example.com")
            .body(())
            .expect("request")
    }

    #[test]
    fn prefix_rewrite_keeps_the_rest_and_query() {
        let config = UrlRewriteConfig {
            hostname: Some("internal.svc".into()),
            path: Some(PathModifier::ReplacePrefixMatch {
                replace_prefix_match: "/v2".into(),
            }),
        };
        let mut r = request("/api/users?id=1");
        rewrite(&config, &mut r, 4).expect("rewrite");
        assert_eq!(r.uri(), "/v2/users?id=1");
        assert_eq!(r.headers()["host"], "internal.svc");

        let to_root = UrlRewriteConfig {
            hostname: None,
            path: Some(PathModifier::ReplacePrefixMatch {
                replace_prefix_match: "/".into(),
            }),
        };
        let mut r = request("/api");
        rewrite(&to_root, &mut r, 4).expect("rewrite");
        assert_eq!(r.uri(), "/");
        let mut r = request("/api/x");
        rewrite(&to_root, &mut r, 4).expect("rewrite");
        assert_eq!(r.uri(), "/x");
    }

    #[test]
    fn full_path_rewrite() {
        let config = UrlRewriteConfig {
            hostname: None,
            path: Some(PathModifier::ReplaceFullPath {
                replace_full_path: "/health".into(),
            }),
        };
        let mut r = request("/anything/else");
        rewrite(&config, &mut r, 0).expect("rewrite");
        assert_eq!(r.uri(), "/health");
    }

    #[test]
    fn redirect_builds_location() {
        let config = RedirectConfig {
            scheme: Some("https".into()),
            hostname: None,
            port: Some(8443),
            path: Some(PathModifier::ReplacePrefixMatch {
                replace_prefix_match: "/new".into(),
            }),
            status_code: 301,
        };
        let (parts, ()) = request("/old/page?x=1").into_parts();
        let response = redirect(&config, &parts, 4).expect("redirect");
        assert_eq!(response.status(), 301);
        assert_eq!(
            response.headers()["location"],
            "https://example.com:8443/new/page?x=1"
        );
    }

    #[test]
    fn redirect_leaves_out_the_schemes_well_known_port() {
        let (parts, ()) = request("/a").into_parts();
        for (scheme, port, location) in [
            (None, Some(80), "http://example.com/a"),
            (Some("https"), Some(443), "https://example.com/a"),
            (Some("http"), Some(443), "http://example.com:443/a"),
            (None, Some(8080), "http://example.com:8080/a"),
        ] {
            let config = RedirectConfig {
                scheme: scheme.map(str::to_string),
                port,
                status_code: 302,
                ..Default::default()
            };
            let response = redirect(&config, &parts, 0).expect("redirect");
            assert_eq!(response.headers()["location"], location);
        }
    }
}
