//! Accept loops and HTTP/1.1 serving: REST endpoints (SPEC section 3) and the WebSocket upgrade.

use crate::auth;
use crate::error::{Code, Error};
use crate::http::{self, Head};
use crate::io::listener::Listener;
use crate::io::socket::{self as transport, write_all, HttpSock, Transport};
use crate::io::tls;
use crate::metrics::{self, ShardMetrics};
use crate::protocol;
use crate::shard::Shard;
use crate::shard::Watched;
use futures_lite::future;
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// What a listener serves.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Role {
    /// Clients and, unless `admin_listen` is set, the backend endpoints too.
    Public { backend: bool },
    /// Backend endpoints only (`admin_listen`).
    Admin,
}

impl Role {
    fn backend(self) -> bool {
        matches!(self, Role::Admin | Role::Public { backend: true })
    }
}

/// The playground page (SPEC section 11), embedded: no build step, no CDN.
const PLAYGROUND_HTML: &str = include_str!("playground/index.html");
/// The reusable browser client the page runs on.
const CLIENT_JS: &str = include_str!("playground/client.js");

/// Most channels one `/broadcast` may name.
const BROADCAST_CHANNELS_MAX: usize = 1024;
/// Room for the envelope around a payload of `max_payload_bytes` in a REST body.
const BODY_ENVELOPE_BYTES: usize = 64 * 1024;
/// Pause after a failed accept (out of file descriptors), so the loop never spins.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

pub async fn accept_loop(shard: Rc<Shard>, listener: Rc<Listener>, role: Role) {
    let mut last_logged: Option<Instant> = None;
    loop {
        match listener.accept().await {
            Ok(fd) => {
                glommio::spawn_local(serve(shard.clone(), fd, role)).detach();
                // A full backlog (4,096) is taken in one go otherwise: let the others run.
                glommio::yield_if_needed().await;
            }
            Err(e) => {
                ShardMetrics::add(&shard.metrics().accept_errors_total, 1);
                // Log once a minute at most: out of descriptors repeats every backoff.
                if last_logged.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                    tracing::warn!(shard = shard.id, error = %e, "accept failed; backing off (raise the open-files limit if this is EMFILE)");
                    last_logged = Some(Instant::now());
                }
                glommio::timer::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Serves one TCP connection: HTTP requests with keep-alive, until an upgrade or close.
async fn serve(shard: Rc<Shard>, fd: OwnedFd, role: Role) {
    let limits = shard.config().limits.clone();
    // The poller knows the socket by this id from now on, and so does the WebSocket connection
    // it may become.
    let id = shard.new_conn_id();
    let stream = match shard.node.tls.clone() {
        None => {
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
                return;
            }
            Transport::Raw(transport::RawSock::new(fd))
        }
        Some(config) => {
            let tcp = crate::sys::glommio_tcp_stream(fd);
            let handshake = future::or(async { tls::accept_tls(tcp, config).await.ok() }, async {
                glommio::timer::sleep(limits.http_head_timeout).await;
                None
            });
            match handshake.await {
                Some(t) => t,
                None => return,
            }
        }
    };
    let sock = Rc::new(HttpSock::new(stream));
    shard.watch(id, Watched::Http(sock.clone()));
    let _unwatch = Unwatch(&shard, id);
    let stream = &sock.stream;
    let mut buf: Vec<u8> = Vec::new();
    let (head, input) = loop {
        let deadline = Instant::now() + limits.http_head_timeout;
        let head = loop {
            match http::parse_head(&buf, limits.http_head_bytes_max) {
                Ok(Some(head)) => break head,
                Ok(None) => {}
                Err(e) => {
                    let out = closing_error(e.status, Code::InvalidArgument, e.message);
                    let _ = write_all(stream, &out).await;
                    return;
                }
            }
            if !read_until(&sock, &mut buf, deadline).await {
                return;
            }
        };
        buf.drain(..head.len);
        if shard.config().dev_mode
            && head
                .host
                .as_deref()
                .is_some_and(|h| !http::is_loopback_host(h))
        {
            let out = closing_error(
                403,
                Code::PermissionDenied,
                "dev mode answers only loopback Host names",
            );
            let _ = write_all(stream, &out).await;
            return;
        }
        if head.path == "/ws" && matches!(role, Role::Public { .. }) {
            break (head, std::mem::take(&mut buf));
        }
        if head.chunked {
            let out = closing_error(
                411,
                Code::InvalidArgument,
                "chunked bodies are not supported; send Content-Length",
            );
            let _ = write_all(stream, &out).await;
            return;
        }
        let len = head.content_length.unwrap_or(0);
        if len > limits.max_payload_bytes + BODY_ENVELOPE_BYTES {
            // Refused unread (SPEC 13.8), so the connection cannot be reused.
            let out = closing_error(413, Code::ResourceExhausted, "request body too large");
            let _ = write_all(stream, &out).await;
            return;
        }
        let deadline = Instant::now() + limits.http_head_timeout;
        while buf.len() < len {
            if !read_until(&sock, &mut buf, deadline).await {
                return;
            }
        }
        let body: Vec<u8> = buf.drain(..len).collect();
        let keep_alive = head.keep_alive;
        let mut out = Vec::new();
        route(&shard, role, &head, &body, keep_alive, &mut out).await;
        if write_all(stream, &out).await.is_err() || !keep_alive {
            return;
        }
    };
    upgrade(shard.clone(), sock, id, head, input).await;
}

/// An error answer after which the connection closes.
fn closing_error(status: u16, code: Code, message: &str) -> Vec<u8> {
    let mut out = Vec::new();
    http::write_error(&mut out, status, code.as_str(), message, false);
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

async fn upgrade(shard: Rc<Shard>, sock: Rc<HttpSock>, id: u64, head: Head, input: Vec<u8>) {
    let config = shard.config();
    let stream = &sock.stream;
    let mut out = Vec::new();
    if head.method != "GET" {
        out = closing_error(405, Code::InvalidArgument, "a WebSocket upgrade is a GET");
    } else if !head.upgrade_websocket || !head.connection_upgrade {
        out = closing_error(
            400,
            Code::InvalidArgument,
            "expected Upgrade: websocket and Connection: Upgrade",
        );
    } else if head.ws_version.as_deref() != Some("13") {
        out.extend_from_slice(b"HTTP/1.1 426 Upgrade Required\r\nsec-websocket-version: 13\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
    } else if head.ws_key.as_deref().is_none_or(|k| k.len() != 24) {
        out = closing_error(
            400,
            Code::InvalidArgument,
            "missing or malformed Sec-WebSocket-Key",
        );
    } else if !origin_allowed(config, head.origin.as_deref()) {
        out = closing_error(403, Code::PermissionDenied, "origin not allowed");
    } else if shard.node.is_shutting_down() {
        out = closing_error(503, Code::Unavailable, "server is shutting down");
    } else if !shard.node.admit_connection() {
        out = closing_error(
            503,
            Code::Unavailable,
            "max_connections reached; try another node",
        );
    } else {
        http::write_upgrade(&mut out, head.ws_key.as_deref().unwrap_or_default());
        if write_all(stream, &out).await.is_err() {
            shard.node.connection_ended();
            return;
        }
        // From here the poller finds the socket as a connection (`run` puts it in the shard's
        // table under the same id before anything can wait).
        shard.unwatch(id);
        let Ok(sock) = Rc::try_unwrap(sock) else {
            // Nothing else holds it once unwatched; if something did, the socket is dropped.
            shard.node.connection_ended();
            return;
        };
        // A task of its own, so this HTTP task (its head, its buffers) ends here and an idle
        // WebSocket holds only what the session needs.
        glommio::spawn_local(crate::session::run(
            shard,
            id,
            sock.stream.into_inner(),
            input,
        ))
        .detach();
        return;
    }
    let _ = write_all(stream, &out).await;
}

/// SPEC 13.15: no list (or dev mode) allows all; a handshake without Origin is allowed; exact match.
fn origin_allowed(config: &crate::config::Config, origin: Option<&str>) -> bool {
    if config.dev_mode || config.allowed_origins.is_empty() {
        return true;
    }
    match origin {
        None => true,
        Some(o) => config.allowed_origins.iter().any(|a| a == o),
    }
}

fn json(out: &mut Vec<u8>, status: u16, body: &[u8], keep_alive: bool) {
    http::write_response(out, status, "application/json", body, keep_alive);
}

fn error(shard: &Shard, out: &mut Vec<u8>, status: u16, e: &Error, keep_alive: bool) {
    shard.metrics().rejected(e.code);
    http::write_error(out, status, e.code.as_str(), &e.message, keep_alive);
}

async fn route(
    shard: &Rc<Shard>,
    role: Role,
    head: &Head,
    body: &[u8],
    keep_alive: bool,
    out: &mut Vec<u8>,
) {
    let backend_path = matches!(
        head.path.as_str(),
        "/publish" | "/broadcast" | "/history" | "/channels" | "/metrics"
    );
    let playground = shard.config().playground || shard.config().dev_mode;
    let expected = match head.path.as_str() {
        "/health" => Some("GET"),
        "/" | "/client.js" if playground && matches!(role, Role::Public { .. }) => Some("GET"),
        "/publish" | "/broadcast" => Some("POST"),
        "/history" | "/channels" | "/metrics" => Some("GET"),
        _ => None,
    };
    let Some(expected) = expected.filter(|_| !backend_path || role.backend()) else {
        let e = crate::error::err(Code::NotFound, format!("no endpoint at {}", head.path));
        return error(shard, out, 404, &e, keep_alive);
    };
    if head.method != expected && !(expected == "GET" && head.method == "HEAD") {
        let e = crate::error::err(
            Code::InvalidArgument,
            format!("{} takes {expected}", head.path),
        );
        return error(shard, out, 405, &e, keep_alive);
    }
    match head.path.as_str() {
        "/health" => {
            if shard.node.is_shutting_down() {
                json(out, 503, br#"{"status":"shutting_down"}"#, keep_alive);
            } else if shard.node.bridge.as_ref().is_some_and(|b| !b.is_up()) {
                // Still 200: existing connections work, so a load balancer must keep the node.
                json(out, 200, br#"{"status":"degraded"}"#, keep_alive);
            } else {
                json(out, 200, br#"{"status":"ok"}"#, keep_alive);
            }
            return;
        }
        "/" => {
            // Dev mode pre-fills its token: dev mode only ever listens on loopback.
            let token = shard.config().dev_token.as_deref().unwrap_or("");
            let page = PLAYGROUND_HTML.replace("{{DEV_TOKEN}}", token);
            http::write_response(
                out,
                200,
                "text/html; charset=utf-8",
                page.as_bytes(),
                keep_alive,
            );
            return;
        }
        "/client.js" => {
            http::write_response(
                out,
                200,
                "text/javascript; charset=utf-8",
                CLIENT_JS.as_bytes(),
                keep_alive,
            );
            return;
        }
        "/metrics" => {
            let text = shard.node.exposition.render();
            http::write_response(out, 200, metrics::CONTENT_TYPE, text.as_bytes(), keep_alive);
            return;
        }
        _ => {}
    }
    let keys = &shard.config().auth.api_keys;
    if !head
        .bearer
        .as_deref()
        .is_some_and(|k| auth::api_key_matches(keys, k))
    {
        ShardMetrics::add(&shard.metrics().auth_failures_total, 1);
        let e = crate::error::err(
            Code::Unauthenticated,
            "missing or unknown API key (Authorization: Bearer KEY)",
        );
        return error(shard, out, 401, &e, keep_alive);
    }
    let result = match head.path.as_str() {
        "/publish" => rest_publish(shard, body).await,
        "/broadcast" => rest_broadcast(shard, body).await,
        "/history" => rest_history(shard, &head.query).await,
        _ => rest_channels(shard).await,
    };
    match result {
        Ok(body) => json(out, 200, &body, keep_alive),
        Err(e) => {
            let status = e.code.http_status();
            error(shard, out, status, &e, keep_alive)
        }
    }
}

async fn rest_publish(shard: &Rc<Shard>, body: &[u8]) -> Result<Vec<u8>, Error> {
    let params = protocol::parse_publish_body(body, shard.config().limits.max_payload_bytes)?;
    let ack = shard.publish(params).await?;
    Ok(protocol::ack_json(&ack))
}

async fn rest_broadcast(shard: &Rc<Shard>, body: &[u8]) -> Result<Vec<u8>, Error> {
    let (channels, event, payload) = protocol::parse_broadcast_body(
        body,
        shard.config().limits.max_payload_bytes,
        BROADCAST_CHANNELS_MAX,
    )?;
    // Submit every publication first: one shard's submissions keep their order, and the owners
    // work on them in parallel instead of one round trip after another.
    let submitted: Vec<_> = channels
        .iter()
        .map(|channel| {
            shard.submit(protocol::PublishParams {
                channel: channel.clone(),
                event: event.clone(),
                payload: payload.clone(),
            })
        })
        .collect();
    let mut out = b"{\"results\":[".to_vec();
    for (i, (channel, pending)) in channels.iter().zip(submitted).enumerate() {
        let ack = pending.wait().await?;
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"channel\":");
        protocol::write_json_string(&mut out, channel);
        out.extend_from_slice(b",\"id\":");
        protocol::write_json_string(&mut out, &ack.id);
        out.extend_from_slice(b",\"offset\":");
        out.extend_from_slice(itoa::Buffer::new().format(ack.offset).as_bytes());
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
    Ok(out)
}

async fn rest_history(shard: &Rc<Shard>, query: &str) -> Result<Vec<u8>, Error> {
    let channel = http::query_param(query, "channel")
        .ok_or_else(|| crate::error::err(Code::InvalidArgument, "channel is required"))?;
    protocol::check_channel(&channel)?;
    let size = shard.config().history.size;
    let limit = match http::query_param(query, "limit") {
        None => size,
        Some(l) => l.parse::<usize>().map_err(|_| {
            crate::error::err(Code::InvalidArgument, "limit must be a whole number")
        })?,
    };
    let (items, offset, epoch) = shard.history(channel, limit).await?;
    let mut out = b"{\"publications\":[".to_vec();
    for (i, p) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"id\":");
        protocol::write_json_string(&mut out, &p.id);
        out.extend_from_slice(b",\"offset\":");
        out.extend_from_slice(itoa::Buffer::new().format(p.offset).as_bytes());
        out.extend_from_slice(b",\"createTime\":");
        protocol::write_json_string(&mut out, &p.create_time);
        out.extend_from_slice(b",\"event\":");
        protocol::write_json_string(&mut out, &p.event);
        out.extend_from_slice(b",\"payload\":");
        out.extend_from_slice(p.payload());
        out.push(b'}');
    }
    out.extend_from_slice(b"],\"offset\":");
    out.extend_from_slice(itoa::Buffer::new().format(offset).as_bytes());
    out.extend_from_slice(b",\"epoch\":");
    protocol::write_json_string(&mut out, &epoch);
    out.push(b'}');
    Ok(out)
}

async fn rest_channels(shard: &Rc<Shard>) -> Result<Vec<u8>, Error> {
    let counts = shard.channel_counts().await?;
    let mut list: Vec<_> = counts.into_iter().collect();
    list.sort();
    let mut out = b"{\"channels\":[".to_vec();
    for (i, (c, n)) in list.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"channel\":");
        protocol::write_json_string(&mut out, c);
        out.extend_from_slice(b",\"subscribers\":");
        out.extend_from_slice(itoa::Buffer::new().format(*n).as_bytes());
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
    Ok(out)
}
