//! The HTTP task of one TCP connection: requests with keep-alive, until the connection closes
//! or becomes a WebSocket (then a session task takes the socket over and this task ends, so its
//! buffers go with it).

use super::routes::route;
use super::Role;
use crate::admission::{self, Client};
use crate::connection::Framing;
use crate::error::{err, Code};
use crate::io::socket::{write_all, HttpSock, RawSock, Transport};
use crate::io::tls;
use crate::shard::{Shard, Watched};
use crate::wire::http::{self, Head};
use crate::wire::{deflate, handshake};
use futures_lite::future;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::time::Instant;

/// Room for the envelope around a payload of `max_payload_bytes` in a REST body.
const BODY_ENVELOPE_BYTES: usize = 64 * 1024;

/// Serves one TCP connection: HTTP requests with keep-alive, until an upgrade or close.
/// `peer` is the client's address, which the anonymous caps count by (SPEC 14).
pub(super) async fn serve(shard: Rc<Shard>, fd: OwnedFd, peer: IpAddr, role: Role) {
    // The poller knows the socket by this id from now on, and so does the WebSocket connection
    // it may become.
    let id = shard.new_conn_id();
    let Some(stream) = open(&shard, fd, id).await else {
        return;
    };
    let sock = Rc::new(HttpSock::new(stream));
    shard.watch(id, Watched::Http(sock.clone()));
    let _unwatch = Unwatch(&shard, id);
    let mut buf: Vec<u8> = Vec::new();
    // Answers not written yet: held while the next request is already in `buf`, so pipelined
    // requests are answered with one send (see `send_answers`).
    let mut out = Vec::new();
    loop {
        let (head, body) = match next_request(&shard, &sock, &mut buf, &mut out, role).await {
            // The connection changes hands: what was answered on it goes first.
            Ok(Some(Next::Upgrade(head, forwarded))) => {
                if !send_answers(&shard, &sock, &mut out).await {
                    return;
                }
                let input = std::mem::take(&mut buf);
                let client = (peer, forwarded);
                return upgrade(shard.clone(), sock, id, head, client, input).await;
            }
            Ok(Some(Next::Sse(head, forwarded, last_event_id))) => {
                if !send_answers(&shard, &sock, &mut out).await {
                    return;
                }
                let client = (peer, forwarded);
                return crate::sse::serve(shard.clone(), sock, id, head, client, last_event_id)
                    .await;
            }
            Ok(Some(Next::Request(head, body))) => (head, body),
            Ok(None) => return,
            Err(answer) => {
                out.extend_from_slice(&answer);
                send_answers(&shard, &sock, &mut out).await;
                return;
            }
        };
        route(&shard, role, &head, &body, head.keep_alive, &mut out).await;
        if !head.keep_alive {
            send_answers(&shard, &sock, &mut out).await;
            return;
        }
    }
}

/// Writes the answers held in `out`, after the shard's flush pass wrote what their requests
/// queued (a publication's local fan-out: see `Flusher::written`). Called before the connection
/// reads, upgrades or closes, so answers wait only while the next request is already buffered.
/// False when the socket failed.
async fn send_answers(shard: &Shard, sock: &HttpSock, out: &mut Vec<u8>) -> bool {
    if out.is_empty() {
        return true;
    }
    shard.flusher().written().await;
    let sent = write_all(&sock.stream, out).await.is_ok();
    out.clear();
    sent
}

/// The connection's stream: a plain socket in the shard's epoll set, or TLS after its
/// handshake (within `http_head_timeout`). None when it cannot be served.
async fn open(shard: &Shard, fd: OwnedFd, id: u64) -> Option<Transport> {
    let Some(config) = shard.node.tls.clone() else {
        if let Err(e) = shard.poller.register(fd.as_raw_fd(), id) {
            // Out of memory or over fs.epoll.max_user_watches: refuse, as when out of
            // descriptors.
            tracing::warn!(error = %e, "cannot watch a new connection; refusing it");
            let out = closing_error(
                503,
                Code::Unavailable,
                "server cannot take more connections",
            );
            let _ = crate::sys::send_nonblocking(fd.as_raw_fd(), &out);
            return None;
        }
        return Some(Transport::Raw(RawSock::new(fd)));
    };
    let tcp = crate::sys::glommio_tcp_stream(fd);
    let timeout = shard.config().limits.http_head_timeout;
    future::or(async { tls::accept_tls(tcp, config).await.ok() }, async {
        glommio::timer::sleep(timeout).await;
        None
    })
    .await
}

/// What a connection asks next.
enum Next {
    /// With the handshake headers `[proxy] forward_headers` names.
    Upgrade(Head, Vec<(String, String)>),
    /// An event stream (SPEC 19), with the forwarded headers and its `Last-Event-ID`.
    Sse(Head, Vec<(String, String)>, Option<String>),
    Request(Head, Vec<u8>),
}

/// Reads the next request, head and body, from `buf` and the socket; the answers held in `out`
/// are written before it waits to read.
/// `Ok(None)`: the connection ended or timed out; `Err(answer)`: answer this (after `out`) and
/// close.
async fn next_request(
    shard: &Shard,
    sock: &HttpSock,
    buf: &mut Vec<u8>,
    out: &mut Vec<u8>,
    role: Role,
) -> Result<Option<Next>, Vec<u8>> {
    let limits = &shard.config().limits;
    let deadline = Instant::now() + limits.http_head_timeout;
    let head = loop {
        match http::parse_head(buf, limits.http_head_bytes_max) {
            Ok(Some(head)) => break head,
            Ok(None) => {}
            Err(e) => return Err(closing_error(e.status, Code::InvalidArgument, e.message)),
        }
        if !send_answers(shard, sock, out).await || !read_until(sock, buf, deadline).await {
            return Ok(None);
        }
    };
    let sse =
        role.public() && shard.config().sse.enabled && is_event_stream(&head, &buf[..head.len]);
    let forwarded = if (head.path == "/ws" || sse) && shard.node.keeps_handshake_headers() {
        http::headers_named(&buf[..head.len], &shard.config().proxy.forward_headers)
    } else {
        Vec::new()
    };
    let last_event_id = sse.then(|| last_event_id(&buf[..head.len])).flatten();
    buf.drain(..head.len);
    let dev = shard.config().dev_mode;
    if dev
        && head
            .host
            .as_deref()
            .is_some_and(|h| !http::is_loopback_host(h))
    {
        let message = "dev mode answers only loopback Host names";
        return Err(closing_error(403, Code::PermissionDenied, message));
    }
    if sse {
        return Ok(Some(Next::Sse(head, forwarded, last_event_id)));
    }
    if head.path == "/ws" && role.public() {
        return Ok(Some(Next::Upgrade(head, forwarded)));
    }
    if head.chunked {
        let message = "chunked bodies are not supported; send Content-Length";
        return Err(closing_error(411, Code::InvalidArgument, message));
    }
    let len = head.content_length.unwrap_or(0);
    if len > limits.max_payload_bytes + BODY_ENVELOPE_BYTES {
        // Refused unread (SPEC 13.8), so the connection cannot be reused.
        return Err(closing_error(
            413,
            Code::ResourceExhausted,
            "request body too large",
        ));
    }
    let deadline = Instant::now() + limits.http_head_timeout;
    while buf.len() < len {
        if !send_answers(shard, sock, out).await || !read_until(sock, buf, deadline).await {
            return Ok(None);
        }
    }
    let body: Vec<u8> = buf.drain(..len).collect();
    Ok(Some(Next::Request(head, body)))
}

/// `GET /sse`, or `GET /ws` without `Upgrade` whose `Accept` names `text/event-stream` (an
/// EventSource pointed at the WebSocket URL).
fn is_event_stream(head: &Head, raw: &[u8]) -> bool {
    match head.path.as_str() {
        "/sse" => true,
        "/ws" if !head.upgrade_websocket => {
            let accept = http::headers_named(raw, &["Accept".to_string()]);
            accept.iter().any(|(_, v)| {
                v.split(',').any(|t| {
                    t.trim()
                        .to_ascii_lowercase()
                        .starts_with("text/event-stream")
                })
            })
        }
        _ => false,
    }
}

/// The `Last-Event-ID` header, if any.
fn last_event_id(raw: &[u8]) -> Option<String> {
    let found = http::headers_named(raw, &["Last-Event-ID".to_string()]);
    found.into_iter().next().map(|(_, v)| v)
}

/// An error answer after which the connection closes.
fn closing_error(status: u16, code: Code, message: &str) -> Vec<u8> {
    let mut out = Vec::new();
    http::write_error(&mut out, status, &err(code, message), false);
    out
}

/// Takes a socket out of the poller's reach when its HTTP task ends.
struct Unwatch<'a>(&'a Shard, u64);

impl Drop for Unwatch<'_> {
    fn drop(&mut self) {
        self.0.unwatch(self.1);
    }
}

/// Reads more into `buf`; false on end of stream, error, or `deadline`.
async fn read_until(sock: &HttpSock, buf: &mut Vec<u8>, deadline: Instant) -> bool {
    let left = deadline.saturating_duration_since(Instant::now());
    future::or(
        async { matches!(sock.read_some(buf).await, Ok(n) if n > 0) },
        async {
            glommio::timer::sleep(left).await;
            false
        },
    )
    .await
}

/// The WebSocket upgrade: checked (`wire::handshake`), counted against `max_connections` and
/// the anonymous caps, answered 101, and the socket handed to a session task of its own.
async fn upgrade(
    shard: Rc<Shard>,
    sock: Rc<HttpSock>,
    id: u64,
    head: Head,
    (peer, headers): (IpAddr, Vec<(String, String)>),
    input: Vec<u8>,
) {
    let config = shard.config();
    let origins: &[String] = if config.dev_mode {
        &[]
    } else {
        &config.allowed_origins
    };
    let mut out = Vec::new();
    if let Err(r) = handshake::check(&head, origins) {
        if r.status == 426 {
            http::write_upgrade_required(&mut out);
        } else {
            out = closing_error(r.status, r.error.code, &r.error.message);
        }
    } else if shard.node.is_shutting_down() {
        out = closing_error(503, Code::Unavailable, "server is shutting down");
    } else if !shard.node.admit_connection() {
        let message = "max_connections reached; try another node";
        out = closing_error(503, Code::Unavailable, message);
    } else {
        let forwarded_for = head.forwarded_for.as_deref();
        let ip = admission::client_addr(peer, forwarded_for, &shard.node.trusted_proxies);
        match shard.node.anonymous.admit(ip) {
            Ok(permit) => {
                let client = Client {
                    headers,
                    anonymous: Some(permit),
                };
                return accept(shard, sock, id, &head, client, input).await;
            }
            Err(refused) => {
                shard.node.connection_ended();
                shard.metrics().anonymous_refused(&refused);
                let message = match refused {
                    admission::Refused::Node => "anonymous_connections_max reached on this node; authenticate promptly or try another node",
                    admission::Refused::Address => "too many connections from this address are not authenticated (anonymous_connections_per_ip_max)",
                };
                out = closing_error(503, Code::Unavailable, message);
            }
        }
    }
    let _ = write_all(&sock.stream, &out).await;
}

/// Answers 101 and starts the session on the socket.
async fn accept(
    shard: Rc<Shard>,
    sock: Rc<HttpSock>,
    id: u64,
    head: &Head,
    client: Client,
    input: Vec<u8>,
) {
    let mut out = Vec::new();
    let deflate = match head.ws_extensions.as_deref() {
        Some(offers) if shard.config().compression.enabled => deflate::negotiate(offers),
        _ => None,
    };
    handshake::write_accept(
        &mut out,
        head.ws_key.as_deref().unwrap_or_default(),
        deflate,
    );
    if write_all(&sock.stream, &out).await.is_err() {
        shard.node.connection_ended();
        return;
    }
    // From here the poller finds the socket as a connection (`session::run` puts it in the
    // shard's table under the same id before anything can wait).
    shard.unwatch(id);
    let Ok(sock) = Rc::try_unwrap(sock) else {
        // Nothing else holds it once unwatched; if something did, the socket is dropped.
        shard.node.connection_ended();
        return;
    };
    // A task of its own, so this HTTP task (its head, its buffers) ends here and an idle
    // WebSocket holds only what the session needs.
    let framing = match deflate {
        Some(accepted) if accepted.compresses() => Framing::Deflate,
        Some(_) => Framing::InflateOnly,
        None => Framing::WebSocket,
    };
    let stream = sock.stream.into_inner();
    let session = crate::session::run(shard, id, stream, (client, framing), input);
    glommio::spawn_local(session).detach();
}
