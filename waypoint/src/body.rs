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

/// A copy of `request` (method, URI, version, headers, extensions, body) for a retry.
pub fn clone_request(request: &Request) -> Request {
    let mut copy = http::Request::new(request.body().clone());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    *copy.extensions_mut() = request.extensions().clone();
    copy
}

#[cfg(test)]
mod tests {
    use super::*;

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
