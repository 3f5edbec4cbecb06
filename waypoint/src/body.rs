//! The body types the proxy moves around.
//!
//! Requests are buffered ([`Bytes`]) so that retries can resend them; responses stream
//! ([`Body`]) from the endpoint to the client.

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};

/// A streaming response body.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// A request as the L7 layers see it: buffered body.
pub type Request = http::Request<Bytes>;

/// A response as the L7 layers see it.
pub type Response = http::Response<Body>;

/// A body holding `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A plain-text response.
pub fn text_response(status: http::StatusCode, text: impl Into<Bytes>) -> Response {
    let mut response = http::Response::new(full(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// A response body that holds `guard` until the body ends or is dropped (e.g. a backend's
/// concurrency slot for the whole stream, not just until the headers).
pub struct Guarded<G> {
    inner: Body,
    guard: Option<G>,
}

impl<G: Send + Sync + Unpin + 'static> Guarded<G> {
    /// `response` whose body holds `guard`.
    pub fn wrap(response: Response, guard: G) -> Response {
        response.map(|inner| {
            Guarded {
                inner,
                guard: Some(guard),
            }
            .boxed()
        })
    }
}

impl<G: Unpin> http_body::Body for Guarded<G> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(
            polled,
            std::task::Poll::Ready(None) | std::task::Poll::Ready(Some(Err(_)))
        ) {
            this.guard = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A copy of `request` (method, URI, version, headers, extensions, body) for a retry.
pub fn clone_request(request: &Request) -> Request {
    let mut copy = clone_without_extensions(request);
    *copy.extensions_mut() = request.extensions().clone();
    copy
}

/// A copy of `request` without its extensions (method, URI, version, headers, body).
pub fn clone_without_extensions(request: &Request) -> Request {
    let mut copy = http::Request::new(request.body().clone());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    copy
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn guard_lives_until_the_body_ends() {
        let guard = std::sync::Arc::new(());
        let response = Guarded::wrap(text_response(http::StatusCode::OK, "body"), guard.clone());
        assert_eq!(std::sync::Arc::strong_count(&guard), 2);
        let collected = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(collected.as_ref(), b"body");
        assert_eq!(
            std::sync::Arc::strong_count(&guard),
            1,
            "released at the end of the body"
        );
        let response = Guarded::wrap(text_response(http::StatusCode::OK, "body"), guard.clone());
        drop(response);
        assert_eq!(
            std::sync::Arc::strong_count(&guard),
            1,
            "released when the body is dropped"
        );
    }

    #[test]
    fn clone_keeps_everything() {
        let mut request = http::Request::builder()
            .method("POST")
            .uri("/a?b=c")
            .header("x-k", "v")
            .body(Bytes::from_static(b"hello"))
            .expect("request");
        request.extensions_mut().insert(7u32);
        let copy = clone_request(&request);
        assert_eq!(copy.method(), "POST");
        assert_eq!(copy.uri(), "/a?b=c");
        assert_eq!(copy.headers()["x-k"], "v");
        assert_eq!(copy.body().as_ref(), b"hello");
        assert_eq!(copy.extensions().get::<u32>(), Some(&7));
    }
}
