//! Header modification (Gateway API `RequestHeaderModifier` / `ResponseHeaderModifier`):
//! `set` replaces, `add` appends, `remove` deletes.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderMap, HeaderName, HeaderValue};
use tower::{Layer, Service};

use super::{BoxFuture, Inner, ProxyResult};
use crate::body::Request;
use crate::config::HeaderModifierConfig;
use crate::error::ProxyError;

/// A header modifier config with invalid names or values.
#[derive(Debug, thiserror::Error)]
#[error(
    "header modifier: `{name}` {problem}; use a valid header name and a value without control characters"
)]
pub struct HeaderModifierError {
    name: String,
    problem: &'static str,
}

/// A compiled [`HeaderModifierConfig`].
#[derive(Debug, Clone, Default)]
pub struct HeaderModifier {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl HeaderModifier {
    /// Compiles `config`.
    pub fn new(config: &HeaderModifierConfig) -> Result<Self, HeaderModifierError> {
        let pair = |name: &str,
                    value: &str|
         -> Result<(HeaderName, HeaderValue), HeaderModifierError> {
            let n = HeaderName::from_bytes(name.as_bytes()).map_err(|_| HeaderModifierError {
                name: name.into(),
                problem: "is not a valid header name",
            })?;
            let v = HeaderValue::from_str(value).map_err(|_| HeaderModifierError {
                name: name.into(),
                problem: "has an invalid value",
            })?;
            Ok((n, v))
        };
        Ok(HeaderModifier {
            set: config
                .set
                .iter()
                .map(|h| pair(&h.name, &h.value))
                .collect::<Result<_, _>>()?,
            add: config
                .add
                .iter()
                .map(|h| pair(&h.name, &h.value))
                .collect::<Result<_, _>>()?,
            remove: config
                .remove
                .iter()
                .map(|n| {
                    HeaderName::from_bytes(n.as_bytes()).map_err(|_| HeaderModifierError {
                        name: n.clone(),
                        problem: "is not a valid header name",
                    })
                })
                .collect::<Result<_, _>>()?,
        })
    }

    /// Applies set, then add, then remove (the Gateway API order).
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
        for name in &self.remove {
            headers.remove(name);
        }
    }
}

/// Modifies request headers before the inner service and response headers after it.
#[derive(Debug, Clone, Default)]
pub struct HeaderModifierLayer {
    request: Arc<Vec<HeaderModifier>>,
    response: Arc<Vec<HeaderModifier>>,
}

impl HeaderModifierLayer {
    /// A layer applying `request` modifiers (in order) and `response` modifiers (in order).
    pub fn new(request: Vec<HeaderModifier>, response: Vec<HeaderModifier>) -> Self {
        HeaderModifierLayer {
            request: Arc::new(request),
            response: Arc::new(response),
        }
    }

    /// Whether the layer changes nothing.
    pub fn is_empty(&self) -> bool {
        self.request.is_empty() && self.response.is_empty()
    }
}

impl<S> Layer<S> for HeaderModifierLayer {
    type Service = HeaderModification<S>;
    fn layer(&self, inner: S) -> HeaderModification<S> {
        HeaderModification {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of [`HeaderModifierLayer`].
#[derive(Debug, Clone)]
pub struct HeaderModification<S> {
    inner: S,
    layer: HeaderModifierLayer,
}

impl<S: Inner> Service<Request> for HeaderModification<S> {
    type Response = crate::body::Response;
    type Error = ProxyError;
    type Future = BoxFuture<ProxyResult>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        for modifier in self.layer.request.iter() {
            modifier.apply(request.headers_mut());
        }
        // Always ready (see the module docs): called now, no clone of the inner service.
        let future = self.inner.call(request);
        let response_modifiers = self.layer.response.clone();
        Box::pin(async move {
            let mut response = future.await?;
            for modifier in response_modifiers.iter() {
                modifier.apply(response.headers_mut());
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NameValue;
    use crate::layers::ProxyService;
    use crate::layers::testing::request;
    use tower::ServiceExt;

    fn nv(name: &str, value: &str) -> NameValue {
        NameValue {
            name: name.into(),
            value: value.into(),
        }
    }

    #[tokio::test]
    async fn modifies_request_and_response_headers() {
        let echo = ProxyService::new(tower::service_fn(|request: Request| async move {
            let mut response = crate::body::text_response(http::StatusCode::OK, "x");
            for (name, value) in request.headers() {
                response.headers_mut().append(
                    HeaderName::from_bytes(format!("echo-{name}").as_bytes()).expect("name"),
                    value.clone(),
                );
            }
            response
                .headers_mut()
                .insert("server", HeaderValue::from_static("backend"));
            Ok::<_, ProxyError>(response)
        }));
        let request_modifier = HeaderModifier::new(&HeaderModifierConfig {
            set: vec![nv("x-set", "new")],
            add: vec![nv("x-add", "2")],
            remove: vec!["x-remove".into()],
        })
        .expect("valid");
        let response_modifier = HeaderModifier::new(&HeaderModifierConfig {
            set: vec![],
            add: vec![nv("x-served-by", "weft")],
            remove: vec!["server".into()],
        })
        .expect("valid");
        let service =
            HeaderModifierLayer::new(vec![request_modifier], vec![response_modifier]).layer(echo);
        let mut req = request("/");
        req.headers_mut()
            .insert("x-set", HeaderValue::from_static("old"));
        req.headers_mut()
            .insert("x-add", HeaderValue::from_static("1"));
        req.headers_mut()
            .insert("x-remove", HeaderValue::from_static("gone"));
        let response = service.oneshot(req).await.expect("response");
        let headers = response.headers();
        assert_eq!(
            headers.get_all("echo-x-set").iter().collect::<Vec<_>>(),
            ["new"]
        );
        assert_eq!(
            headers.get_all("echo-x-add").iter().collect::<Vec<_>>(),
            ["1", "2"]
        );
        assert!(headers.get("echo-x-remove").is_none());
        assert_eq!(headers["x-served-by"], "weft");
        assert!(headers.get("server").is_none());
    }

    #[test]
    fn invalid_names_are_rejected() {
        let err = HeaderModifier::new(&HeaderModifierConfig {
            set: vec![nv("bad name", "v")],
            ..Default::default()
        })
        .expect_err("bad");
        assert!(err.to_string().contains("bad name"));
    }
}
