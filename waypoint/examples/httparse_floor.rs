//! The floor of an HTTP/1.1 reverse proxy on tokio without hyper: `httparse` for the heads,
//! nothing else. An experiment for `cargo xtask bench waypoint`, not product code: it answers
//! "would an HTTP/1.1 codec of our own (option (b) in docs/waypoint.md, Benchmark) let a
//! tokio-based proxy reach nginx on this machine?".
//!
//! Like `hyper_floor`: each downstream connection gets one upstream connection of its own,
//! driven by the same task; `threads` current-thread runtimes each accept on their own
//! `SO_REUSEPORT` listener. Each request head is parsed and written anew (request line,
//! headers but `Connection`), as a proxy must; bodies must have a `Content-Length` (anything
//! else closes the connection), which is all the benchmark sends.
//!
//! With `http` after THREADS, each head also goes through the `http` crate's types (a
//! `HeaderMap` built from the parsed headers, the new head written from it), as a codec of
//! our own under the waypoint's tower layers would have to.
//!
//! `cargo run --release -p weft-waypoint --example httparse_floor -- LISTEN UPSTREAM [THREADS [http]]`

use std::net::SocketAddr;

use anyhow::{Context as _, bail};
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod floor;

const MAX_HEADERS: usize = 64;

/// Whether heads go through `http::HeaderMap` (the `http` argument).
static THROUGH_HTTP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Appends `headers` (but `Connection`) to `out`; returns the `Content-Length`, if any.
fn copy_headers(headers: &[httparse::Header<'_>], out: &mut Vec<u8>) -> anyhow::Result<usize> {
    if THROUGH_HTTP.load(std::sync::atomic::Ordering::Relaxed) {
        return copy_through_header_map(headers, out);
    }
    let mut length = 0;
    for h in headers {
        if h.name.eq_ignore_ascii_case("connection") {
            continue;
        }
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            bail!("transfer-encoding is not supported by this floor");
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            length = std::str::from_utf8(h.value)?.trim().parse()?;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(length)
}

/// Like [`copy_headers`], through an `http::HeaderMap`.
fn copy_through_header_map(
    headers: &[httparse::Header<'_>],
    out: &mut Vec<u8>,
) -> anyhow::Result<usize> {
    let mut map = http::HeaderMap::with_capacity(headers.len());
    for h in headers {
        map.append(
            http::HeaderName::from_bytes(h.name.as_bytes())?,
            http::HeaderValue::from_bytes(h.value)?,
        );
    }
    map.remove(http::header::CONNECTION);
    if map.contains_key(http::header::TRANSFER_ENCODING) {
        bail!("transfer-encoding is not supported by this floor");
    }
    let length = match map.get(http::header::CONTENT_LENGTH) {
        Some(v) => v.to_str()?.trim().parse()?,
        None => 0,
    };
    for (name, value) in &map {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(length)
}

/// Reads from `from` into `buf` until `buf` holds `n` bytes; false at end of stream.
async fn fill(from: &mut TcpStream, buf: &mut BytesMut, n: usize) -> anyhow::Result<bool> {
    while buf.len() < n {
        if from.read_buf(buf).await? == 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Reads one message (head parsed by `parse`, which writes the new head into `out` and
/// returns the head's length and the body's) from `from` and writes it to `to`.
async fn relay<F>(
    from: &mut TcpStream,
    to: &mut TcpStream,
    buf: &mut BytesMut,
    out: &mut Vec<u8>,
    parse: F,
) -> anyhow::Result<bool>
where
    F: Fn(&[u8], &mut Vec<u8>) -> anyhow::Result<Option<(usize, usize)>>,
{
    out.clear();
    let (head, body) = loop {
        if let Some(parsed) = parse(buf, out)? {
            break parsed;
        }
        out.clear();
        if from.read_buf(buf).await? == 0 {
            return Ok(false);
        }
    };
    if !fill(from, buf, head + body).await? {
        return Ok(false);
    }
    out.extend_from_slice(&buf[head..head + body]);
    buf.advance(head + body);
    to.write_all(out).await?;
    Ok(true)
}

fn request(buf: &[u8], out: &mut Vec<u8>) -> anyhow::Result<Option<(usize, usize)>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(head) = request.parse(buf)? else {
        return Ok(None);
    };
    out.extend_from_slice(request.method.unwrap_or("GET").as_bytes());
    out.push(b' ');
    out.extend_from_slice(request.path.unwrap_or("/").as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let body = copy_headers(request.headers, out)?;
    Ok(Some((head, body)))
}

fn response(buf: &[u8], out: &mut Vec<u8>) -> anyhow::Result<Option<(usize, usize)>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(head) = response.parse(buf)? else {
        return Ok(None);
    };
    let code = response.code.context("status")?;
    out.extend_from_slice(format!("HTTP/1.1 {code} ").as_bytes());
    out.extend_from_slice(response.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let body = copy_headers(response.headers, out)?;
    Ok(Some((head, body)))
}

async fn connection(mut down: TcpStream, upstream: SocketAddr) -> anyhow::Result<()> {
    let mut up = TcpStream::connect(upstream)
        .await
        .with_context(|| format!("connecting to {upstream}"))?;
    up.set_nodelay(true)?;
    down.set_nodelay(true)?;
    let (mut from_down, mut from_up) =
        (BytesMut::with_capacity(8192), BytesMut::with_capacity(8192));
    let mut out = Vec::with_capacity(8192);
    loop {
        if !relay(&mut down, &mut up, &mut from_down, &mut out, request).await? {
            return Ok(());
        }
        if !relay(&mut up, &mut down, &mut from_up, &mut out, response).await? {
            return Ok(());
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = floor::args("usage: httparse_floor LISTEN UPSTREAM [THREADS [http]]")?;
    if args.option.as_deref() == Some("http") {
        THROUGH_HTTP.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let (listen, upstream) = (args.listen, args.upstream);
    floor::on_threads(args.threads, move || {
        floor::runtime()?.block_on(async move {
            let listener = floor::reuseport_listener(listen)?;
            loop {
                let (stream, _) = listener.accept().await?;
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, upstream).await {
                        eprintln!("{e:#}");
                    }
                });
            }
        })
    })
}
