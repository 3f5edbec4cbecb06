//! A connector that bounds the connections a backend's pool may hold open
//! (`circuitBreaker.maxConnections`). Each connection carries a semaphore permit released when
//! the connection closes. A request that needs a new connection while all are open waits (the
//! pool may hand it a connection freed meanwhile) for at most [`CONNECTION_WAIT`].

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::Service;

use crate::layers::BoxFuture;

/// Longest wait for a connection slot before the request fails.
pub const CONNECTION_WAIT: Duration = Duration::from_secs(3);

/// Every connection slot stayed taken for [`CONNECTION_WAIT`].
#[derive(Debug, thiserror::Error)]
#[error(
    "all {max} connections allowed by circuitBreaker.maxConnections are open and busy; raise maxConnections or add endpoints"
)]
pub struct MaxConnectionsReached {
    /// The limit.
    pub max: usize,
}

/// [`HttpConnector`] with an optional cap on open connections.
#[derive(Debug, Clone)]
pub struct LimitedConnector {
    inner: HttpConnector,
    slots: Option<(Arc<Semaphore>, usize)>,
}

impl LimitedConnector {
    /// Wraps `inner`, allowing at most `max` open connections (unbounded when `None`).
    pub fn new(inner: HttpConnector, max: Option<usize>) -> Self {
        LimitedConnector {
            inner,
            slots: max.map(|m| (Arc::new(Semaphore::new(m)), m)),
        }
    }
}

/// A connection holding its slot.
#[derive(Debug)]
pub struct LimitedIo<T> {
    io: T,
    _slot: Option<OwnedSemaphorePermit>,
}

impl Service<Uri> for LimitedConnector {
    type Response = LimitedIo<<HttpConnector as Service<Uri>>::Response>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let slots = self.slots.clone();
        Box::pin(async move {
            let slot = match slots {
                None => None,
                Some((semaphore, max)) => {
                    match tokio::time::timeout(CONNECTION_WAIT, semaphore.acquire_owned()).await {
                        Ok(Ok(permit)) => Some(permit),
                        _ => return Err(Box::new(MaxConnectionsReached { max }) as Self::Error),
                    }
                }
            };
            let io = connecting.await?;
            Ok(LimitedIo { io, _slot: slot })
        })
    }
}

impl<T: Read + Unpin> Read for LimitedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: Write + Unpin> Write for LimitedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}

impl<T: Connection> Connection for LimitedIo<T> {
    fn connected(&self) -> Connected {
        // Without the connector's `HttpInfo` extra, which the pool would otherwise copy into
        // every response's extensions (allocations per request; nothing here reads it).
        let inner = self.io.connected();
        let connected = Connected::new().proxy(inner.is_proxied());
        if inner.is_negotiated_h2() {
            connected.negotiated_h2()
        } else {
            connected
        }
    }
}

/// Whether `error`'s source chain holds a [`MaxConnectionsReached`].
pub fn is_max_connections(error: &(dyn std::error::Error + 'static)) -> Option<usize> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(reached) = e.downcast_ref::<MaxConnectionsReached>() {
            return Some(reached.max);
        }
        current = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn slots_are_held_by_open_connections() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                open.push(stream);
            }
        });
        let mut connector = LimitedConnector::new(HttpConnector::new(), Some(1));
        let uri: Uri = format!("http://{addr}/").parse().expect("uri");
        let first = connector.call(uri.clone()).await.expect("first connection");
        // The second waits for the slot: it completes once the first connection is dropped.
        let second = tokio::spawn(connector.call(uri.clone()));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !second.is_finished(),
            "the second connection waits for a slot"
        );
        drop(first);
        second
            .await
            .expect("join")
            .expect("second connection after the first closed");
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_too_long_fails_with_a_clear_error() {
        let mut connector = LimitedConnector::new(HttpConnector::new(), Some(0));
        let err = connector
            .call("http://127.0.0.1:9/".parse().expect("uri"))
            .await
            .expect_err("no slot");
        assert_eq!(is_max_connections(err.as_ref()), Some(0));
        assert!(err.to_string().contains("maxConnections"));
    }
}
