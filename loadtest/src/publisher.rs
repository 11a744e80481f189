//! The publisher: one thread, one keep-alive connection (REST `POST /publish` or a WebSocket with the
//! publish scope), publications spread round robin over the run's channels on an open-loop schedule,
//! or, in max-rate mode, as fast as a bounded window of undelivered publications allows.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cli::Peer;
use crate::client::Shared;
use crate::extract;
use crate::http::read_http_response;
use crate::net::Node;
use crate::schedule::{self, Schedule};
use crate::ws;

/// How publications reach the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub(crate) enum Via {
    /// `POST /publish` with the API key, HTTP/1.1 keep-alive.
    Rest,
    /// `publish` requests over a WebSocket authenticated with a publish-scope token.
    Ws,
}

/// What to publish.
#[derive(Clone)]
pub(crate) struct PublisherConfig {
    /// Where REST requests go (the admin listeners when the servers have one), one per node.
    pub(crate) rest_nodes: Vec<Node>,
    /// Where the WebSocket publisher connects, one per node.
    pub(crate) ws_nodes: Vec<Node>,
    /// Publish round robin over every node; otherwise to the first only.
    pub(crate) publish_all: bool,
    /// REST or WebSocket.
    pub(crate) via: Via,
    /// API key (REST).
    pub(crate) api_key: String,
    /// Token (WebSocket).
    pub(crate) token: String,
    /// Channels, published to round robin.
    pub(crate) channels: Arc<Vec<String>>,
    /// Publications per second; 0: max-rate mode.
    pub(crate) rate: f64,
    /// Stop after this many publications.
    pub(crate) count: Option<u64>,
    /// Stop after this long.
    pub(crate) duration: Option<Duration>,
    /// Max-rate mode: publications not yet delivered to every subscriber, at most.
    pub(crate) window: u64,
    /// Max-rate mode: requests sent before their answers are read, at most (1: one at a time).
    pub(crate) pipeline: u64,
    /// Deliveries each publication should cause (subscribers per channel), for the window.
    pub(crate) deliveries_per_publication: u64,
    /// Payload size in bytes.
    pub(crate) payload_bytes: usize,
    /// What fills the payload.
    pub(crate) payload_shape: crate::extract::PayloadShape,
    /// Source address to bind.
    pub(crate) source: Option<Ipv4Addr>,
    /// The server's protocol: Nchan takes `POST /pub/<channel>` with the payload as the body.
    pub(crate) peer: Peer,
}

/// What the publisher did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub(crate) struct PublishResult {
    /// Publications the server accepted.
    pub(crate) published: u64,
    /// Publications refused or failed.
    pub(crate) errors: u64,
    /// Per channel: the highest offset the server returned (0: none published). Nchan returns
    /// none: its publications' numbers within their channels stand for it
    /// ([`extract::channel_seq`], as the subscribers number what they receive).
    pub(crate) last_offsets: Vec<u64>,
    /// Per channel: publications accepted.
    pub(crate) counts: Vec<u64>,
    /// Seconds from the first scheduled publication to the last answer.
    pub(crate) elapsed_s: f64,
    /// How far the publisher fell behind its schedule at worst (a sign it, or the server, was the
    /// bottleneck), ms.
    pub(crate) max_behind_ms: f64,
    /// Round-trip time of publish requests: p50 and max, µs.
    pub(crate) rtt_p50_us: f64,
    /// Largest publish round trip, µs.
    pub(crate) rtt_max_us: f64,
}

/// A keep-alive connection that publishes; answers come back in the order requests were sent.
trait Conn {
    /// Sends one publication without waiting for its answer.
    fn send(&mut self, channel: &str, payload: &[u8]) -> Result<(), String>;
    /// Reads the answer to the oldest publication sent and not answered yet: its offset (None:
    /// the server gives none).
    fn recv(&mut self) -> Result<Option<u64>, String>;
}

/// A publication sent and not answered yet.
struct Sent {
    channel: usize,
    /// Its number within its channel, from 1: the offset when the server answers none.
    nth: u64,
    conn: usize,
    at: Instant,
}

/// Runs the publisher until its count or duration is reached, or `shared.stop`.
pub(crate) fn run(cfg: &PublisherConfig, shared: &Shared) -> PublishResult {
    let mut res = PublishResult {
        last_offsets: vec![0; cfg.channels.len()],
        counts: vec![0; cfg.channels.len()],
        ..Default::default()
    };
    let mut conns = match connect_all(cfg) {
        Ok(c) => c,
        Err(e) => {
            shared.error(e);
            res.errors += 1;
            return res;
        }
    };
    schedule::precise_timers();
    let sched = Schedule::new(cfg.rate);
    let deadline = cfg.duration.map(|d| sched.start() + d);
    let mut payload = Vec::with_capacity(cfg.payload_bytes + 64);
    let mut flight = InFlight::new(shared);
    let mut k: u64 = 0;
    let mut max_behind = Duration::ZERO;
    // On a schedule each publication waits for its answer; at max rate up to `pipeline` go out
    // before the first answer is read, so the server can take several in one read.
    let depth = if sched.paced() {
        1
    } else {
        cfg.pipeline.max(1) as usize
    };
    loop {
        if cfg.count.is_some_and(|c| k >= c)
            || shared.stop.load(Ordering::Relaxed)
            || (res.errors >= 10 && res.published == 0)
        {
            break;
        }
        let Some(sent_ns) = pace(cfg, shared, &sched, deadline, k, &mut max_behind) else {
            break;
        };
        payload.clear();
        extract::build_shaped_payload(
            &mut payload,
            sent_ns,
            k,
            cfg.payload_bytes,
            cfg.payload_shape,
        );
        let ch = (k % cfg.channels.len() as u64) as usize;
        let at = Instant::now();
        let ci = (k % conns.len() as u64) as usize;
        match conns[ci].send(&cfg.channels[ch], &payload) {
            Ok(()) => flight.sent.push_back(Sent {
                channel: ch,
                nth: extract::channel_seq(k, cfg.channels.len() as u64),
                conn: ci,
                at,
            }),
            Err(e) => {
                res.errors += 1;
                shared.error(format!("publish {k} failed: {e}"));
            }
        }
        while flight.sent.len() >= depth {
            flight.complete_oldest(&mut conns, &mut res);
        }
        k += 1;
    }
    while !flight.sent.is_empty() {
        flight.complete_oldest(&mut conns, &mut res);
    }
    res.elapsed_s = sched.start().elapsed().as_secs_f64();
    res.max_behind_ms = max_behind.as_secs_f64() * 1e3;
    res.rtt_p50_us = flight.rtt.value_at_quantile(0.5) as f64;
    res.rtt_max_us = flight.rtt.max() as f64;
    res
}

/// One keep-alive connection per node published to (every node with `publish_all`, else the
/// first).
fn connect_all(cfg: &PublisherConfig) -> Result<Vec<Box<dyn Conn>>, String> {
    let nodes = match cfg.via {
        Via::Rest => &cfg.rest_nodes,
        Via::Ws => &cfg.ws_nodes,
    };
    if cfg.peer == Peer::Nchan && cfg.via != Via::Rest {
        return Err(
            "publisher: Nchan is published to over HTTP only (POST /pub/<channel>): \
                    --via ws needs --peer broadcaster"
                .into(),
        );
    }
    let used = if cfg.publish_all { nodes.len() } else { 1 };
    let mut conns: Vec<Box<dyn Conn>> = Vec::with_capacity(used);
    for node in nodes.iter().take(used) {
        let conn: Result<Box<dyn Conn>, String> = match cfg.via {
            Via::Rest if cfg.peer == Peer::Nchan => {
                NchanConn::connect(cfg, node).map(|c| Box::new(c) as Box<dyn Conn>)
            }
            Via::Rest => RestConn::connect(cfg, node).map(|c| Box::new(c) as Box<dyn Conn>),
            Via::Ws => WsConn::connect(cfg, node).map(|c| Box::new(c) as Box<dyn Conn>),
        };
        conns.push(conn.map_err(|e| format!("publisher: {e}"))?);
    }
    if conns.is_empty() {
        return Err("publisher: no server to publish to".into());
    }
    Ok(conns)
}

/// Waits until publication `k` may go: its scheduled time, or (max rate) room in the window.
/// Returns the send time it carries, or None when the run's duration is over.
fn pace(
    cfg: &PublisherConfig,
    shared: &Shared,
    sched: &Schedule,
    deadline: Option<Instant>,
    k: u64,
    max_behind: &mut Duration,
) -> Option<u64> {
    if sched.paced() {
        let due = sched.due(k);
        if deadline.is_some_and(|d| due >= d) {
            return None;
        }
        schedule::sleep_until(due);
        *max_behind = (*max_behind).max(Instant::now().saturating_duration_since(due));
        Some(sched.due_unix_ns(k))
    } else {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return None;
        }
        wait_for_window(cfg, shared, k);
        Some(schedule::now_unix_ns())
    }
}

/// Publications sent and not answered yet, oldest first, and their round trips.
struct InFlight<'a> {
    sent: VecDeque<Sent>,
    rtt: hdrhistogram::Histogram<u64>,
    shared: &'a Shared,
}

impl<'a> InFlight<'a> {
    fn new(shared: &'a Shared) -> Self {
        InFlight {
            sent: VecDeque::new(),
            rtt: hdrhistogram::Histogram::<u64>::new(3).expect("constant sigfig"),
            shared,
        }
    }

    /// Reads the answer to the oldest publication in flight.
    fn complete_oldest(&mut self, conns: &mut [Box<dyn Conn>], res: &mut PublishResult) {
        let Some(s) = self.sent.pop_front() else {
            return;
        };
        match conns[s.conn].recv() {
            Ok(offset) => {
                let offset = offset.unwrap_or(s.nth);
                res.published += 1;
                self.shared.published.fetch_add(1, Ordering::Relaxed);
                res.counts[s.channel] += 1;
                res.last_offsets[s.channel] = res.last_offsets[s.channel].max(offset);
            }
            Err(e) => {
                res.errors += 1;
                self.shared.error(format!("publish failed: {e}"));
            }
        }
        let _ = self.rtt.record(s.at.elapsed().as_micros() as u64);
    }
}

/// Max-rate mode: publication `k` may go once at most `window` earlier publications are still
/// undelivered, counting undelivered as outstanding deliveries divided by deliveries per publication.
fn wait_for_window(cfg: &PublisherConfig, shared: &Shared, k: u64) {
    let per = cfg.deliveries_per_publication.max(1);
    let allowed = |delivered: u64| k.saturating_mul(per) < delivered + cfg.window.max(1) * per;
    if allowed(shared.deliveries.load(Ordering::Relaxed)) {
        return;
    }
    shared.window_wait.store(true, Ordering::Relaxed);
    let Ok(mut guard) = shared.window_mutex.lock() else {
        return;
    };
    while !allowed(shared.deliveries.load(Ordering::Relaxed))
        && !shared.stop.load(Ordering::Relaxed)
    {
        guard = match shared
            .window_cv
            .wait_timeout(guard, Duration::from_millis(5))
        {
            Ok((g, _)) => g,
            Err(_) => return,
        };
    }
    shared.window_wait.store(false, Ordering::Relaxed);
}

/// The publisher's connection to `node`, a read bounded so a dead server fails the run.
fn keep_alive_stream(cfg: &PublisherConfig, node: &Node) -> Result<std::net::TcpStream, String> {
    let stream = crate::net::connect_blocking(node.addr, cfg.source)
        .map_err(|e| format!("connect to {} failed: {e}", node.addr))?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    Ok(stream)
}

struct RestConn {
    stream: std::net::TcpStream,
    head: Vec<u8>,
    buf: Vec<u8>,
    req: Vec<u8>,
}

impl RestConn {
    fn connect(cfg: &PublisherConfig, node: &Node) -> Result<Self, String> {
        let stream = keep_alive_stream(cfg, node)?;
        let head = format!(
            "POST /publish HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: ",
            node.host, cfg.api_key
        )
        .into_bytes();
        Ok(RestConn {
            stream,
            head,
            buf: Vec::with_capacity(4096),
            req: Vec::with_capacity(1024),
        })
    }
}

impl Conn for RestConn {
    fn send(&mut self, channel: &str, payload: &[u8]) -> Result<(), String> {
        let mut body = Vec::with_capacity(payload.len() + channel.len() + 48);
        body.extend_from_slice(b"{\"channel\":");
        extract::push_json_str(&mut body, channel);
        body.extend_from_slice(b",\"event\":\"m\",\"payload\":");
        body.extend_from_slice(payload);
        body.push(b'}');
        self.req.clear();
        self.req.extend_from_slice(&self.head);
        extract::push_u64(&mut self.req, body.len() as u64);
        self.req.extend_from_slice(b"\r\n\r\n");
        self.req.extend_from_slice(&body);
        self.stream
            .write_all(&self.req)
            .map_err(|e| format!("write: {e}"))
    }

    fn recv(&mut self) -> Result<Option<u64>, String> {
        let (status, body) = read_http_response(&mut self.stream, &mut self.buf)?;
        if status != 200 {
            return Err(format!("HTTP {status}: {}", String::from_utf8_lossy(&body)));
        }
        extract::u64_field(&body, b"\"offset\":")
            .map(Some)
            .ok_or_else(|| {
                format!(
                    "publish answer without offset: {}",
                    String::from_utf8_lossy(&body)
                )
            })
    }
}

/// Nchan's publisher endpoint over HTTP/1.1 keep-alive: `POST /pub/<channel>`, the payload as the
/// body, no credentials (the peer is configured open, loadtest/nchan/).
struct NchanConn {
    stream: std::net::TcpStream,
    host: String,
    buf: Vec<u8>,
    req: Vec<u8>,
}

impl NchanConn {
    fn connect(cfg: &PublisherConfig, node: &Node) -> Result<Self, String> {
        let stream = keep_alive_stream(cfg, node)?;
        Ok(NchanConn {
            stream,
            host: node.host.clone(),
            buf: Vec::with_capacity(4096),
            req: Vec::with_capacity(1024),
        })
    }
}

/// Appends Nchan's publish request for `payload` on `channel` to `out`.
fn nchan_publish_request(out: &mut Vec<u8>, host: &str, channel: &str, payload: &[u8]) {
    out.extend_from_slice(b"POST ");
    out.extend_from_slice(ws::nchan_path("/pub/", channel).as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\nContent-Type: application/json\r\nContent-Length: ");
    extract::push_u64(out, payload.len() as u64);
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(payload);
}

impl Conn for NchanConn {
    fn send(&mut self, channel: &str, payload: &[u8]) -> Result<(), String> {
        self.req.clear();
        nchan_publish_request(&mut self.req, &self.host, channel, payload);
        self.stream
            .write_all(&self.req)
            .map_err(|e| format!("write: {e}"))
    }

    /// Nchan answers 201 when the channel had subscribers, 202 when it had none (the message is
    /// queued either way), with a few lines of text (queued messages, subscribers, message id)
    /// that carry nothing the checks need.
    fn recv(&mut self) -> Result<Option<u64>, String> {
        let (status, body) = read_http_response(&mut self.stream, &mut self.buf)?;
        if status != 201 && status != 202 {
            return Err(format!(
                "Nchan answered HTTP {status}: {}",
                String::from_utf8_lossy(&body)
            ));
        }
        Ok(None)
    }
}

/// A blocking WebSocket connection that makes requests one at a time (or pipelined by id) and
/// reads their answers: the WebSocket publisher's, and the `proxy` scenario's subscribers'.
pub(crate) struct WsConn {
    stream: std::net::TcpStream,
    buf: Vec<u8>,
    out: Vec<u8>,
    rng: ws::MaskRng,
    next_id: u64,
    /// Ids of publications sent and not answered yet, oldest first.
    pending: VecDeque<u64>,
}

impl WsConn {
    fn connect(cfg: &PublisherConfig, node: &Node) -> Result<Self, String> {
        WsConn::open(node, cfg.source, &cfg.token, 0x5EED)?
            .map_err(|code| format!("publisher auth failed: {code}"))
    }

    /// Connects to `node` (from `source`, if any), upgrades, and sends `auth` with `token` as
    /// request 1; `Ok(Err(code))` when the server refused the token. `seed` varies the mask keys.
    pub(crate) fn open(
        node: &Node,
        source: Option<Ipv4Addr>,
        token: &str,
        seed: u64,
    ) -> Result<Result<Self, String>, String> {
        let mut c = WsConn::upgrade(node, source, seed)?;
        let mut req = b"{\"id\":1,\"method\":\"auth\",\"params\":{\"token\":".to_vec();
        extract::push_json_str(&mut req, token);
        req.extend_from_slice(b"}}");
        let r = c.request(&req, 1)?;
        c.next_id = 2;
        Ok(match r.error_code {
            Some(code) => Err(code),
            None => Ok(c),
        })
    }

    /// Connects to `node` (from `source`, if any) and upgrades, nothing sent yet; requests are
    /// numbered from 1.
    pub(crate) fn upgrade(
        node: &Node,
        source: Option<Ipv4Addr>,
        seed: u64,
    ) -> Result<Self, String> {
        let mut stream = crate::net::connect_blocking(node.addr, source)
            .map_err(|e| format!("connect to {} failed: {e}", node.addr))?;
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        stream
            .write_all(&ws::upgrade_request(&node.host))
            .map_err(|e| format!("write: {e}"))?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match ws::parse_upgrade_response(&buf) {
                ws::Upgrade::Incomplete => {
                    let n = stream.read(&mut chunk).map_err(|e| format!("read: {e}"))?;
                    if n == 0 {
                        return Err("closed during upgrade".into());
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                ws::Upgrade::Refused(s) => return Err(format!("upgrade refused: {s}")),
                ws::Upgrade::Switched(used) => {
                    buf.drain(..used);
                    break;
                }
            }
        }
        Ok(WsConn {
            stream,
            buf,
            out: Vec::with_capacity(1024),
            rng: ws::MaskRng::new(seed),
            next_id: 1,
            pending: VecDeque::new(),
        })
    }

    /// The id for the next request (from 2 after [`WsConn::open`]'s `auth`).
    pub(crate) fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Sends `text` and reads frames (answering pings, skipping others) until the response to
    /// request `id`.
    pub(crate) fn request(&mut self, text: &[u8], id: u64) -> Result<extract::Response, String> {
        self.send_text(text)?;
        self.response(id)
    }

    /// Sends one text frame (several requests go out in one write when the caller joins them:
    /// see [`WsConn::send_texts`]).
    pub(crate) fn send_text(&mut self, text: &[u8]) -> Result<(), String> {
        self.send_texts(&[text])
    }

    /// Sends one text frame per item, all in one write.
    pub(crate) fn send_texts(&mut self, texts: &[&[u8]]) -> Result<(), String> {
        self.out.clear();
        for text in texts {
            let key = self.rng.next_key();
            ws::encode_client_frame(&mut self.out, ws::OP_TEXT, text, key);
        }
        self.stream
            .write_all(&self.out)
            .map_err(|e| format!("write: {e}"))
    }

    /// How long a read may wait (None: forever); [`WsConn::next_text`] gives `Ok(None)` past it.
    pub(crate) fn set_read_timeout(&mut self, t: Option<Duration>) {
        let _ = self.stream.set_read_timeout(t);
    }

    /// Non-blocking reads: [`WsConn::next_text`] gives `Ok(None)` at once when nothing is there.
    pub(crate) fn set_nonblocking(&mut self, on: bool) -> Result<(), String> {
        self.stream
            .set_nonblocking(on)
            .map_err(|e| format!("set_nonblocking: {e}"))
    }

    /// Reads frames (answering pings) until the response to request `id`.
    fn response(&mut self, id: u64) -> Result<extract::Response, String> {
        loop {
            let Some(text) = self.next_text()? else {
                return Err("read: timed out".into());
            };
            if let extract::Message::Response(r) = extract::parse_message(&text) {
                if r.request_id == Some(id) {
                    return Ok(r);
                }
            }
        }
    }

    /// The next text frame (pings answered, other frames skipped); `Ok(None)` when the read
    /// timeout passed first (a frame cut short stays buffered for the next call); an error when
    /// the server closed the WebSocket or the connection.
    pub(crate) fn next_text(&mut self) -> Result<Option<Vec<u8>>, String> {
        let mut chunk = [0u8; 8192];
        loop {
            while let Some(f) = ws::decode_server_frame(&self.buf).map_err(|e| e.to_string())? {
                let payload = self.buf[f.payload_start..f.end].to_vec();
                self.buf.drain(..f.end);
                match f.opcode {
                    ws::OP_TEXT => return Ok(Some(payload)),
                    ws::OP_PING => self.pong(&payload)?,
                    ws::OP_CLOSE => return Err(close_error(&payload)),
                    _ => {}
                }
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err("server closed the WebSocket connection".into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Ok(None)
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }

    fn pong(&mut self, payload: &[u8]) -> Result<(), String> {
        self.out.clear();
        let key = self.rng.next_key();
        ws::encode_client_frame(&mut self.out, ws::OP_PONG, payload, key);
        self.stream
            .write_all(&self.out)
            .map_err(|e| format!("write: {e}"))
    }

    /// The WebSocket closing handshake: sends close 1000 and reads (discarding text) until the
    /// server's close frame, then until the server ends the connection, at most `timeout`; then
    /// the socket is dropped. The server closing TCP first (RFC 6455 7.1.1) leaves the TIME_WAIT
    /// on its side, so a churn does not use up this side's ports.
    pub(crate) fn close(mut self, timeout: Duration) -> Result<(), String> {
        self.out.clear();
        let key = self.rng.next_key();
        ws::encode_close(&mut self.out, 1000, key);
        self.stream
            .write_all(&self.out)
            .map_err(|e| format!("write close: {e}"))?;
        self.set_read_timeout(Some(timeout));
        loop {
            match self.next_text() {
                Ok(Some(_)) => {}
                Ok(None) => {
                    return Err(format!("no close frame from the server within {timeout:?}"))
                }
                // The server's close frame, or the connection's end: the handshake is over.
                Err(_) => break,
            }
        }
        let mut chunk = [0u8; 1024];
        while let Ok(n) = self.stream.read(&mut chunk) {
            if n == 0 {
                break;
            }
        }
        Ok(())
    }
}

/// What a close frame from the server says.
fn close_error(payload: &[u8]) -> String {
    match (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]])) {
        Some(code) => format!("server closed the WebSocket with code {code}"),
        None => "server closed the WebSocket".into(),
    }
}

impl Conn for WsConn {
    fn send(&mut self, channel: &str, payload: &[u8]) -> Result<(), String> {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = Vec::with_capacity(payload.len() + channel.len() + 80);
        req.extend_from_slice(b"{\"id\":");
        extract::push_u64(&mut req, id);
        req.extend_from_slice(b",\"method\":\"publish\",\"params\":{\"channel\":");
        extract::push_json_str(&mut req, channel);
        req.extend_from_slice(b",\"event\":\"m\",\"payload\":");
        req.extend_from_slice(payload);
        req.extend_from_slice(b"}}");
        self.send_text(&req)?;
        self.pending.push_back(id);
        Ok(())
    }

    fn recv(&mut self) -> Result<Option<u64>, String> {
        let id = self
            .pending
            .pop_front()
            .ok_or_else(|| "no publication waiting for an answer".to_string())?;
        let r = self.response(id)?;
        if let Some(code) = r.error_code {
            return Err(format!(
                "{code} (a WebSocket publisher is rate limited per connection: raise \
                 BROADCASTER_LIMITS_REQUESTS_PER_SECOND / _REQUEST_BURST on the server, or use --via rest)"
            ));
        }
        r.offset
            .map(Some)
            .ok_or_else(|| "publish result without offset".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(window: u64, per: u64) -> PublisherConfig {
        let a = Node {
            addr: "127.0.0.1:1".parse().unwrap(),
            host: String::new(),
        };
        PublisherConfig {
            rest_nodes: vec![a.clone()],
            ws_nodes: vec![a],
            publish_all: false,
            via: Via::Rest,
            api_key: String::new(),
            token: String::new(),
            channels: Arc::new(vec!["c".into()]),
            rate: 0.0,
            count: None,
            duration: None,
            window,
            pipeline: 1,
            deliveries_per_publication: per,
            payload_bytes: 64,
            payload_shape: crate::extract::PayloadShape::Pad,
            source: None,
            peer: Peer::Broadcaster,
        }
    }

    #[test]
    fn window_bounds_undelivered_publications() {
        let shared = Shared::default();
        let c = cfg(4, 10);
        // Publications 0..3 may go with nothing delivered; the 5th (k = 4) must wait for 10 deliveries.
        for k in 0..4 {
            wait_for_window(&c, &shared, k);
        }
        let waiter = std::thread::scope(|s| {
            let h = s.spawn(|| {
                let t = Instant::now();
                wait_for_window(&c, &shared, 4);
                t.elapsed()
            });
            std::thread::sleep(Duration::from_millis(30));
            shared.deliveries.store(10, Ordering::Relaxed);
            h.join().unwrap()
        });
        assert!(waiter >= Duration::from_millis(25), "{waiter:?}");
        // Stopping releases a waiter too.
        shared.stop.store(true, Ordering::Relaxed);
        wait_for_window(&c, &shared, 1000);
    }

    /// A fake REST node: answers every request with the next offset of a shared counter, counts
    /// the requests it got.
    fn fake_rest_node(
        counter: Arc<std::sync::atomic::AtomicU64>,
    ) -> (Node, std::thread::JoinHandle<u64>) {
        fake_node(counter, false)
    }

    /// A fake REST node, Broadcaster's (`POST /publish`, answers an offset) or Nchan's (`POST
    /// /pub/<channel>`, answers 201 and text as Nchan 1.3 does).
    fn fake_node(
        counter: Arc<std::sync::atomic::AtomicU64>,
        nchan: bool,
    ) -> (Node, std::thread::JoinHandle<u64>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let node = Node {
            addr: l.local_addr().unwrap(),
            host: "fake".into(),
        };
        let h = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut got = 0;
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                // One request: a head with Content-Length, then the body.
                let (head_end, len) = loop {
                    if let Some(p) = ws::find(&buf, b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..p]).to_ascii_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map(|v| v.trim().parse().unwrap())
                            .unwrap_or(0);
                        break (p + 4, len);
                    }
                    let n = c.read(&mut chunk).unwrap_or(0);
                    if n == 0 {
                        return got;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                };
                while buf.len() < head_end + len {
                    let n = c.read(&mut chunk).unwrap();
                    buf.extend_from_slice(&chunk[..n]);
                }
                let line = String::from_utf8_lossy(&buf[..head_end]).into_owned();
                let expected = if nchan {
                    "POST /pub/"
                } else {
                    "POST /publish "
                };
                assert!(line.starts_with(expected), "{line}");
                if nchan {
                    assert!(!line.contains("Authorization"), "{line}");
                    let body = &buf[head_end..head_end + len];
                    assert!(body.starts_with(b"{\"t\":"), "the raw payload is the body");
                }
                buf.drain(..head_end + len);
                got += 1;
                let off = counter.fetch_add(1, Ordering::Relaxed) + 1;
                if nchan {
                    let body = format!(
                        "queued messages: {off}\r\nlast requested: 0 sec. ago\r\n\
                         active subscribers: 1\r\nlast message id: 1796618739:{off}"
                    );
                    let _ = write!(
                        c,
                        "HTTP/1.1 201 Created\r\nServer: nginx/1.22.1\r\nContent-Type: text/plain\r\n\
                         Content-Length: {}\r\nConnection: keep-alive\r\n\r\n{body}",
                        body.len()
                    );
                    continue;
                }
                let body = format!("{{\"id\":\"x\",\"offset\":{off}}}");
                let _ = write!(
                    c,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        (node, h)
    }

    #[test]
    fn nchan_publish_request_posts_the_raw_payload() {
        let mut out = Vec::new();
        nchan_publish_request(&mut out, "127.0.0.1:9", "lt-1/chat/3", br#"{"t":1,"n":2}"#);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /pub/lt-1/chat/3 HTTP/1.1\r\nHost: 127.0.0.1:9\r\nContent-Type: \
             application/json\r\nContent-Length: 13\r\n\r\n{\"t\":1,\"n\":2}"
        );
    }

    #[test]
    fn nchan_answers_count_publications_per_channel() {
        let (a, ha) = fake_node(Arc::new(std::sync::atomic::AtomicU64::new(0)), true);
        let mut c = cfg(4, 1);
        c.rest_nodes = vec![a];
        c.peer = Peer::Nchan;
        c.channels = Arc::new(vec!["a".into(), "b".into(), "c".into()]);
        c.rate = 1000.0;
        c.count = Some(7);
        let shared = Shared::default();
        let r = run(&c, &shared);
        assert_eq!((r.published, r.errors), (7, 0), "{:?}", shared.errors);
        // Round robin: a gets 0, 3, 6; b 1, 4; c 2, 5. Nchan gives no offset: each channel's
        // last is its count, as its subscribers number them.
        assert_eq!(r.counts, vec![3, 2, 2]);
        assert_eq!(r.last_offsets, vec![3, 2, 2]);
        drop(c);
        assert_eq!(ha.join().unwrap(), 7);

        let mut c = cfg(4, 1);
        c.peer = Peer::Nchan;
        c.via = Via::Ws;
        c.count = Some(1);
        let shared = Shared::default();
        let r = run(&c, &shared);
        assert_eq!(r.published, 0);
        let errors = shared.errors.lock().unwrap().join("\n");
        assert!(
            errors.contains("--via ws needs --peer broadcaster"),
            "{errors}"
        );
    }

    #[test]
    fn publish_all_goes_round_robin_over_the_nodes() {
        let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (a, ha) = fake_rest_node(counter.clone());
        let (b, hb) = fake_rest_node(counter.clone());
        let mut c = cfg(4, 1);
        c.rest_nodes = vec![a, b];
        c.publish_all = true;
        c.rate = 1000.0;
        c.count = Some(6);
        let shared = Shared::default();
        let r = run(&c, &shared);
        assert_eq!((r.published, r.errors), (6, 0), "{:?}", shared.errors);
        assert_eq!(r.last_offsets, vec![6], "offsets are the cluster's, shared");
        drop(c);
        assert_eq!((ha.join().unwrap(), hb.join().unwrap()), (3, 3));

        // Without --publish-all everything goes to the first node.
        let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (a, ha) = fake_rest_node(counter.clone());
        let (b, _hb) = fake_rest_node(counter.clone());
        let mut c = cfg(4, 1);
        c.rest_nodes = vec![a, b];
        c.rate = 1000.0;
        c.count = Some(4);
        let r = run(&c, &Shared::default());
        assert_eq!(r.published, 4);
        assert_eq!(ha.join().unwrap(), 4);
    }
}
