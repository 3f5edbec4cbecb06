//! The body types the proxy moves around.
//!
//! Requests are buffered ([`Bytes`]) so that retries can resend them, unless their body goes
//! on arriving (a gRPC client or bidirectional stream, a slow or large upload): then the bytes
//! buffered so far travel as the body and the rest follows as it arrives ([`Streaming`]);
//! responses stream ([`Body`]) from the endpoint to the client.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};

/// A streaming response body.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// A request as the L7 layers see it: buffered body.
pub type Request = http::Request<Bytes>;

/// A response as the L7 layers see it.
pub type Response = http::Response<Body>;

/// Request extension: the rest of a request body still arriving from the client, for a request
/// forwarded before its body ended (see `crate::proxy`). The forwarder takes it when the
/// request goes out (and puts it back when the request never left); such a request is not
/// retried, as the rest can be sent only once.
#[derive(Clone)]
pub struct Streaming(Arc<Mutex<Option<hyper::body::Incoming>>>);

impl Streaming {
    /// The rest of the body, `rest`.
    pub fn new(rest: hyper::body::Incoming) -> Self {
        Streaming(Arc::new(Mutex::new(Some(rest))))
    }

    /// Takes the rest (once).
    pub fn take(&self) -> Option<hyper::body::Incoming> {
        match self.0.lock() {
            Ok(mut rest) => rest.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        }
    }

    /// Puts back a rest taken by [`Streaming::take`] and not polled (the request never left).
    pub fn put_back(&self, rest: hyper::body::Incoming) {
        match self.0.lock() {
            Ok(mut slot) => *slot = Some(rest),
            Err(poisoned) => *poisoned.into_inner() = Some(rest),
        }
    }
}

impl std::fmt::Debug for Streaming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Streaming")
    }
}

/// The body of a request to an endpoint: the bytes the waypoint buffered, then, for a streamed
/// request ([`Streaming`]), the rest as the client sends it.
#[derive(Debug)]
pub struct UpstreamBody {
    buffered: Option<Bytes>,
    rest: Option<hyper::body::Incoming>,
    /// Where the rest's bytes are counted as they go out (the golden metrics and the access
    /// log read the request's size there).
    counted: Option<crate::layers::RequestContext>,
}

impl UpstreamBody {
    /// `buffered`, then `rest` if any, its bytes counted in `counted`.
    pub fn new(
        buffered: Bytes,
        rest: Option<hyper::body::Incoming>,
        counted: Option<crate::layers::RequestContext>,
    ) -> Self {
        UpstreamBody {
            buffered: (!buffered.is_empty()).then_some(buffered),
            rest,
            counted,
        }
    }

    /// Whether the body streams (has a rest still arriving from the client).
    pub fn is_streamed(&self) -> bool {
        self.rest.is_some()
    }

    /// The buffered bytes not sent yet and the rest, untouched when the body was never polled.
    pub fn into_parts(self) -> (Bytes, Option<hyper::body::Incoming>) {
        (self.buffered.unwrap_or_default(), self.rest)
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        use std::task::Poll;
        if let Some(bytes) = self.buffered.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(bytes))));
        }
        let this = &mut *self;
        let Some(rest) = this.rest.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = std::pin::Pin::new(rest).poll_frame(cx);
        if let (Poll::Ready(Some(Ok(frame))), Some(counted)) = (&polled, &this.counted)
            && let Some(data) = frame.data_ref()
        {
            counted.add_request_bytes(data.len() as u64);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.buffered.is_none() && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let buffered = self.buffered.as_ref().map_or(0, |b| b.len() as u64);
        match &self.rest {
            None => http_body::SizeHint::with_exact(buffered),
            Some(rest) => {
                let rest = rest.size_hint();
                let mut hint = http_body::SizeHint::new();
                hint.set_lower(buffered + rest.lower());
                if let Some(upper) = rest.upper() {
                    hint.set_upper(buffered + upper);
                }
                hint
            }
        }
    }
}

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

/// How a [`Watched`] body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Its last frame went out.
    Complete,
    /// The inner body failed (the connection to the endpoint broke).
    Failed,
    /// It was dropped before its end (the client went away).
    Dropped,
}

/// What a [`Watched`] body reports to: each frame, then its end, once.
pub trait Watch {
    /// A frame passing through.
    fn frame(&mut self, _frame: &http_body::Frame<Bytes>) {}
    /// The body ended (called once; also from `Drop`).
    fn end(self, how: End);
}

/// A response body that passes `inner` through and tells a [`Watch`] about it: the one place
/// that knows when a streaming body has ended (a frame that leaves it at its end, the end of
/// the stream, an error, or a drop before the end).
pub struct Watched<B, W: Watch> {
    inner: B,
    watch: Option<W>,
}

impl<B: http_body::Body, W: Watch> Watched<B, W> {
    /// `inner` watched by `watch`.
    pub fn new(inner: B, watch: W) -> Self {
        Watched {
            inner,
            watch: Some(watch),
        }
    }

    /// Like [`Watched::new`], but an `inner` that is already at its end (an empty body, which
    /// hyper may never poll) ends at once.
    pub fn ending_if_empty(inner: B, watch: W) -> Self {
        let mut body = Watched::new(inner, watch);
        if body.inner.is_end_stream() {
            body.end(End::Complete);
        }
        body
    }

    fn end(&mut self, how: End) {
        if let Some(watch) = self.watch.take() {
            watch.end(how);
        }
    }
}

impl<B, W> http_body::Body for Watched<B, W>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    W: Watch + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        use std::task::Poll;
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(watch) = this.watch.as_mut() {
                    watch.frame(frame);
                }
                if this.inner.is_end_stream() {
                    this.end(End::Complete);
                }
            }
            Poll::Ready(None) => this.end(End::Complete),
            Poll::Ready(Some(Err(_))) => this.end(End::Failed),
            Poll::Pending => {}
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

impl<B, W: Watch> Drop for Watched<B, W> {
    fn drop(&mut self) {
        if let Some(watch) = self.watch.take() {
            watch.end(End::Dropped);
        }
    }
}

/// What the golden metrics and the access log count of a response body: its data bytes and
/// the `grpc-status` of its trailers.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    /// Data bytes so far.
    pub bytes: u64,
    /// `grpc-status` from the trailers, when they had one.
    pub grpc_status: Option<Box<str>>,
}

impl Tally {
    /// Counts `frame`.
    pub fn frame(&mut self, frame: &http_body::Frame<Bytes>) {
        if let Some(data) = frame.data_ref() {
            self.bytes += data.len() as u64;
        } else if let Some(status) = frame
            .trailers_ref()
            .and_then(|t| t.get(GRPC_STATUS))
            .and_then(|v| v.to_str().ok())
        {
            self.grpc_status = Some(Box::from(status));
        }
    }
}

/// The `grpc-status` header (a gRPC response's headers, or its trailers).
pub const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

/// Holds a guard (e.g. a backend's concurrency slot) for the whole response stream, not just
/// until the headers: released when the body ends or is dropped.
struct Hold<G>(G);

impl<G> Watch for Hold<G> {
    fn end(self, _how: End) {}
}

/// `response` whose body holds `guard` until it ends or is dropped.
pub fn guarded<G: Send + Sync + Unpin + 'static>(response: Response, guard: G) -> Response {
    response.map(|inner| Watched::new(inner, Hold(guard)).boxed())
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
        let response = guarded(text_response(http::StatusCode::OK, "body"), guard.clone());
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
        let response = guarded(text_response(http::StatusCode::OK, "body"), guard.clone());
        drop(response);
        assert_eq!(
            std::sync::Arc::strong_count(&guard),
            1,
            "released when the body is dropped"
        );
    }

    /// A body whose first frame is an error.
    struct Failing;

    impl http_body::Body for Failing {
        type Data = Bytes;
        type Error = &'static str;
        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, &'static str>>> {
            std::task::Poll::Ready(Some(Err("broken")))
        }
    }

    /// Records how a watched body ended.
    struct Ends(std::sync::Arc<std::sync::Mutex<Vec<End>>>, u64);

    impl Watch for Ends {
        fn frame(&mut self, frame: &http_body::Frame<Bytes>) {
            self.1 += frame.data_ref().map_or(0, |d| d.len() as u64);
        }
        fn end(self, how: End) {
            self.0.lock().expect("ends").push(how);
        }
    }

    #[tokio::test]
    async fn a_watched_body_ends_once_and_says_how() {
        let ends = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = || ends.lock().expect("ends").clone();
        // Its last frame: complete at once, before the body is dropped.
        let mut body = Watched::new(full("abc"), Ends(ends.clone(), 0));
        let frame = body.frame().await.expect("a frame").expect("data");
        assert_eq!(frame.data_ref().map(|d| d.len()), Some(3));
        assert_eq!(seen(), [End::Complete]);
        drop(body);
        assert_eq!(seen(), [End::Complete], "once");
        // Dropped before its end.
        ends.lock().expect("ends").clear();
        drop(Watched::new(full("abc"), Ends(ends.clone(), 0)));
        assert_eq!(seen(), [End::Dropped]);
        // An error from the inner body.
        ends.lock().expect("ends").clear();
        let _ = Watched::new(Failing, Ends(ends.clone(), 0)).frame().await;
        assert_eq!(seen(), [End::Failed]);
        // Empty: ends at once when asked to.
        ends.lock().expect("ends").clear();
        let empty =
            Watched::ending_if_empty(http_body_util::Empty::<Bytes>::new(), Ends(ends.clone(), 0));
        assert_eq!(seen(), [End::Complete]);
        drop(empty);
        assert_eq!(seen(), [End::Complete]);
    }

    #[test]
    fn a_tally_counts_data_and_reads_grpc_status_from_trailers() {
        let mut tally = Tally::default();
        tally.frame(&http_body::Frame::data(Bytes::from_static(b"hello")));
        let mut trailers = http::HeaderMap::new();
        trailers.insert(GRPC_STATUS, http::HeaderValue::from_static("14"));
        tally.frame(&http_body::Frame::trailers(trailers));
        assert_eq!(tally.bytes, 5);
        assert_eq!(tally.grpc_status.as_deref(), Some("14"));
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
