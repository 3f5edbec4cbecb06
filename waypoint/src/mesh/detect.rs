//! Protocol selection for a tunnel: declared by the Service port's `appProtocol`, else detected
//! from the client's first bytes.
//!
//! | `appProtocol` (case-insensitive)                                      | served as  |
//! |-----------------------------------------------------------------------|------------|
//! | `http`, `http1`                                                       | HTTP       |
//! | `http2`, `h2c`, `kubernetes.io/h2c`, `grpc`, `grpc-web`               | HTTP       |
//! | `tcp`, `tls`, `https`, `kubernetes.io/wss`, and known non-HTTP protocols (`mysql`, `redis`, `mongo`, `mongodb`, `postgres`, `postgresql`, `kafka`, `amqp`, `mqtt`, `nats`, `zookeeper`, `cassandra`, `memcached`, `smtp`, `ldap`) | opaque TCP |
//! | empty or anything else                                                | detected   |
//!
//! Detection waits up to the detection timeout for the client's first bytes: the HTTP/2
//! connection preface (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`) is HTTP/2, a known HTTP method token
//! followed by a space is HTTP/1.x, anything else is opaque TCP. A client that sends nothing
//! within the wait (a server-first protocol such as MySQL, SMTP or SSH, which waits for the
//! server's greeting) is served as opaque TCP once the wait expires: such connections pay the
//! wait once, at their start. Declare `appProtocol: tcp` on such ports to skip it.
//!
//! The bytes read while detecting are replayed to whoever serves the tunnel ([`Rewind`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The default `--protocol-detect-timeout`.
pub const DEFAULT_DETECT_TIMEOUT: Duration = Duration::from_millis(100);

/// The HTTP/2 client connection preface.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// HTTP/1.x method tokens recognized at the start of a tunnel (each followed by a space).
const METHODS: &[&[u8]] = &[
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"CONNECT ",
    b"OPTIONS ",
    b"TRACE ",
    b"PATCH ",
];

/// How a tunnel is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.x.
    Http1,
    /// HTTP/2 (prior knowledge).
    Http2,
    /// Opaque bytes, proxied to an endpoint as they are.
    Tcp,
}

impl Protocol {
    /// The `protocol` label of `weft_waypoint_protocol_detected_total`.
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
            Protocol::Tcp => "tcp",
        }
    }
}

/// How the protocol was chosen (the `by` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetectedBy {
    /// The Service port's `appProtocol`.
    Declared,
    /// The client's first bytes.
    Detected,
    /// No (or too few) bytes within the detection timeout, or the client closed first.
    Timeout,
}

impl DetectedBy {
    /// The `by` label of `weft_waypoint_protocol_detected_total`.
    pub fn label(self) -> &'static str {
        match self {
            DetectedBy::Declared => "declared",
            DetectedBy::Detected => "detected",
            DetectedBy::Timeout => "timeout",
        }
    }
}

/// The protocol a Service port's `appProtocol` declares (see the module's table); `None` means
/// detect.
pub fn declared(app_protocol: &str) -> Option<Protocol> {
    match app_protocol.trim().to_ascii_lowercase().as_str() {
        "http" | "http1" => Some(Protocol::Http1),
        "http2" | "h2c" | "kubernetes.io/h2c" | "grpc" | "grpc-web" => Some(Protocol::Http2),
        "tcp" | "tls" | "https" | "kubernetes.io/wss" | "mysql" | "redis" | "mongo" | "mongodb"
        | "postgres" | "postgresql" | "kafka" | "amqp" | "mqtt" | "nats" | "zookeeper"
        | "cassandra" | "memcached" | "smtp" | "ldap" => Some(Protocol::Tcp),
        _ => None,
    }
}

/// What the first bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniff {
    /// Decided.
    Is(Protocol),
    /// The bytes so far are a prefix of an HTTP start; more are needed.
    NeedMore,
}

/// Classifies the first bytes of a tunnel.
pub fn classify(buf: &[u8]) -> Sniff {
    if buf.is_empty() {
        return Sniff::NeedMore;
    }
    let mut maybe = false;
    for (start, protocol) in std::iter::once((H2_PREFACE, Protocol::Http2))
        .chain(METHODS.iter().map(|m| (*m, Protocol::Http1)))
    {
        if buf.starts_with(start) {
            return Sniff::Is(protocol);
        }
        if start.starts_with(buf) {
            maybe = true;
        }
    }
    if maybe {
        Sniff::NeedMore
    } else {
        Sniff::Is(Protocol::Tcp)
    }
}

/// Reads the first bytes of `io` for at most `wait` and decides its protocol; returns the
/// decision and `io` with the bytes read put back in front.
pub async fn detect<T>(mut io: T, wait: Duration) -> io::Result<(Protocol, DetectedBy, Rewind<T>)>
where
    T: AsyncRead + Unpin,
{
    let mut buf = BytesMut::with_capacity(1024);
    let decided = tokio::time::timeout(wait, async {
        loop {
            if let Sniff::Is(protocol) = classify(&buf) {
                return Ok((protocol, DetectedBy::Detected));
            }
            // Classification needs at most the preface's 24 bytes; `buf` holds 1024.
            if io.read_buf(&mut buf).await? == 0 {
                // The client closed its side before saying anything decisive.
                return Ok((Protocol::Tcp, DetectedBy::Timeout));
            }
        }
    })
    .await;
    let (protocol, by) = match decided {
        Ok(Ok(decided)) => decided,
        Ok(Err(e)) => return Err(e),
        Err(_) => (Protocol::Tcp, DetectedBy::Timeout),
    };
    Ok((protocol, by, Rewind::new(buf.freeze(), io)))
}

/// An IO whose reads first return `prefix` (bytes already read from `inner`), then `inner`'s.
/// Writes go to `inner`. (hyper-util has one, but private to its server; tokio's `chain` is
/// read-only.)
#[derive(Debug)]
pub struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    /// `inner` with `prefix` replayed first.
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Rewind { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(out.remaining());
            out.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, out)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn classifies_prefaces_methods_and_garbage() {
        assert_eq!(classify(H2_PREFACE), Sniff::Is(Protocol::Http2));
        for method in METHODS {
            let line = [*method, b"/ HTTP/1.1\r\n".as_slice()].concat();
            assert_eq!(classify(&line), Sniff::Is(Protocol::Http1), "{method:?}");
            // Every strict prefix of the token waits for more.
            for n in 1..method.len() {
                assert_eq!(classify(&method[..n]), Sniff::NeedMore, "{method:?}[..{n}]");
            }
        }
        for n in 1..H2_PREFACE.len() {
            assert_eq!(classify(&H2_PREFACE[..n]), Sniff::NeedMore);
        }
        assert_eq!(classify(b""), Sniff::NeedMore);
        assert_eq!(classify(b"\x16\x03\x01"), Sniff::Is(Protocol::Tcp), "TLS");
        assert_eq!(
            classify(b"*1\r\n$4\r\nPING"),
            Sniff::Is(Protocol::Tcp),
            "RESP"
        );
        assert_eq!(classify(b"GETX"), Sniff::Is(Protocol::Tcp), "no space");
        assert_eq!(
            classify(b"get /"),
            Sniff::Is(Protocol::Tcp),
            "methods are uppercase"
        );
        assert_eq!(classify(b"PRI * HTTP/1.1"), Sniff::Is(Protocol::Tcp));
    }

    #[test]
    fn declared_protocols() {
        for http1 in ["http", "HTTP", " http1 "] {
            assert_eq!(declared(http1), Some(Protocol::Http1), "{http1}");
        }
        for http2 in [
            "http2",
            "h2c",
            "kubernetes.io/h2c",
            "grpc",
            "gRPC",
            "grpc-web",
        ] {
            assert_eq!(declared(http2), Some(Protocol::Http2), "{http2}");
        }
        for tcp in ["tcp", "TCP", "mysql", "redis", "https", "tls", "postgresql"] {
            assert_eq!(declared(tcp), Some(Protocol::Tcp), "{tcp}");
        }
        for unknown in ["", "example.com/custom", "kubernetes.io/ws"] {
            assert_eq!(declared(unknown), None, "{unknown}");
        }
    }

    /// Detects over a duplex pipe fed by `chunks`, each written after the detector asked for
    /// more; returns the decision and everything read back through the rewind.
    async fn detect_chunks(
        chunks: &[&'static [u8]],
        close: bool,
    ) -> (Protocol, DetectedBy, Vec<u8>) {
        let (mut client, server) = tokio::io::duplex(4096);
        let chunks: Vec<&'static [u8]> = chunks.to_vec();
        let writer = tokio::spawn(async move {
            for chunk in chunks {
                client.write_all(chunk).await.expect("write");
                client.flush().await.expect("flush");
                tokio::task::yield_now().await;
            }
            if close {
                client.shutdown().await.expect("shutdown");
            }
            client
        });
        let (protocol, by, mut io) = detect(server, DEFAULT_DETECT_TIMEOUT)
            .await
            .expect("detect");
        let client = writer.await.expect("writer");
        drop(client);
        let mut all = Vec::new();
        io.read_to_end(&mut all).await.expect("read back");
        (protocol, by, all)
    }

    #[tokio::test(start_paused = true)]
    async fn detection_in_pieces_replays_every_byte() {
        let (p, by, bytes) =
            detect_chunks(&[b"PRI * HTTP", b"/2.0\r\n\r\nSM", b"\r\n\r\nxyz"], false).await;
        assert_eq!((p, by), (Protocol::Http2, DetectedBy::Detected));
        assert_eq!(bytes, [H2_PREFACE, b"xyz"].concat());

        let (p, by, bytes) = detect_chunks(&[b"P", b"O", b"ST /a HTTP/1.1\r\n\r\n"], false).await;
        assert_eq!((p, by), (Protocol::Http1, DetectedBy::Detected));
        assert_eq!(bytes, b"POST /a HTTP/1.1\r\n\r\n");

        let (p, by, bytes) = detect_chunks(&[b"\x00\x01garbage"], false).await;
        assert_eq!((p, by), (Protocol::Tcp, DetectedBy::Detected));
        assert_eq!(bytes, b"\x00\x01garbage");
    }

    #[tokio::test(start_paused = true)]
    async fn silence_or_an_early_close_is_tcp() {
        // Nothing within the wait (a server-first protocol): TCP, by timeout, nothing lost.
        let (client, server) = tokio::io::duplex(64);
        let (p, by, mut io) = detect(server, Duration::from_millis(100))
            .await
            .expect("detect");
        assert_eq!((p, by), (Protocol::Tcp, DetectedBy::Timeout));
        drop(client);
        let mut all = Vec::new();
        io.read_to_end(&mut all).await.expect("read");
        assert!(all.is_empty());

        // A partial method and then silence: TCP after the wait, the partial bytes replayed.
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b"GE").await.expect("write");
        let (p, by, mut io) = detect(server, Duration::from_millis(100))
            .await
            .expect("detect");
        assert_eq!((p, by), (Protocol::Tcp, DetectedBy::Timeout));
        drop(client);
        let mut all = Vec::new();
        io.read_to_end(&mut all).await.expect("read");
        assert_eq!(all, b"GE");

        // The client closes after a partial method.
        let (p, by, bytes) = detect_chunks(&[b"PU"], true).await;
        assert_eq!((p, by), (Protocol::Tcp, DetectedBy::Timeout));
        assert_eq!(bytes, b"PU");
    }

    #[tokio::test]
    async fn rewind_replays_then_reads_and_writes_through() {
        let (mut far, near) = tokio::io::duplex(64);
        let mut io = Rewind::new(Bytes::from_static(b"hello "), near);
        far.write_all(b"world").await.expect("write");
        drop(far.shutdown().await);
        let mut small = [0u8; 4];
        let n = io.read(&mut small).await.expect("read");
        assert_eq!(
            &small[..n],
            b"hell",
            "a small buffer takes part of the prefix"
        );
        io.write_all(b"back").await.expect("write through");
        let mut rest = Vec::new();
        io.read_to_end(&mut rest).await.expect("rest");
        assert_eq!(rest, b"o world");
        let mut back = [0u8; 4];
        far.read_exact(&mut back).await.expect("far reads");
        assert_eq!(&back, b"back");
    }
}
