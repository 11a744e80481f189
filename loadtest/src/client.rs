//! The subscriber side: worker threads, each running one mio (epoll, edge-triggered) loop over many
//! connections. A connection goes connect → upgrade → `auth` + `subscribe` (pipelined in one write) →
//! live, where every broadcast is checked (`seq`, `offset`) and timed (the payload's send time).
//!
//! Cost per delivered message is one short `read()` that usually carries several frames, one frame
//! header decode and a few byte searches; receive buffers are per worker, not per connection, so an
//! idle connection costs the load generator a socket and ~200 bytes of state.

use std::collections::{BinaryHeap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::{Events, Interest, Poll, Token};

use crate::checker::{Anomalies, SeqChecker};
use crate::extract::{self, Message};
use crate::hist;
use crate::net::Node;
use crate::schedule::now_unix_ns;
use crate::ws::{self, Upgrade};

/// Bytes read per `read()`: one worker-wide buffer, large enough to take a burst of frames at once.
const READ_BUF_BYTES: usize = 256 * 1024;
/// Leftover (partial frame) bytes kept per connection before it is judged broken.
const PARTIAL_BYTES_MAX: usize = 32 << 20;
/// Request ids of the two setup requests.
const AUTH_ID: u64 = 1;
const SUBSCRIBE_ID: u64 = 2;

/// State shared by the workers, the publisher and the main thread.
#[derive(Default)]
pub struct Shared {
    /// Set to end the run; workers return their results.
    pub stop: AtomicBool,
    /// Connections that have completed the WebSocket upgrade (first time only).
    pub upgraded: AtomicU64,
    /// Connections whose first `subscribe` succeeded.
    pub subscribed: AtomicU64,
    /// Connections that failed during setup or were dropped by the server.
    pub failed: AtomicU64,
    /// Broadcasts received, all connections.
    pub deliveries: AtomicU64,
    /// Publications accepted by the server so far (the publisher's count).
    pub published: AtomicU64,
    /// Broadcasts whose seq was not the expected one (progress line only).
    pub anomalies: AtomicU64,
    /// Recovery: reconnects done.
    pub reconnects: AtomicU64,
    /// Recovery: `subscribe` with `since` that answered `recovered: false`.
    pub unrecovered: AtomicU64,
    /// Largest latency seen since the progress line last read it, ns.
    pub interval_max_ns: AtomicU64,
    /// First error messages (a handful), for the report.
    pub errors: Mutex<Vec<String>>,
    /// Rung when deliveries advance and a windowed publisher waits.
    pub window_wait: AtomicBool,
    pub window_mutex: Mutex<()>,
    pub window_cv: Condvar,
}

impl Shared {
    /// Records an error message (the first 20 are kept).
    pub fn error(&self, msg: String) {
        if let Ok(mut e) = self.errors.lock() {
            if e.len() < 20 {
                e.push(msg);
            }
        }
    }
}

/// What every connection of a run needs to know.
#[derive(Clone)]
pub struct ClientConfig {
    /// The servers' WebSocket listeners; subscriber `i` connects to `nodes[spec.node]`.
    pub nodes: Arc<Vec<Node>>,
    /// The client token (one for all connections; subscriptions are per connection).
    pub token: String,
    /// Channel names; subscriber `i` subscribes to `channels[channel_of[i]]`.
    pub channels: Arc<Vec<String>>,
    /// Setups in progress per worker, at most.
    pub concurrency: usize,
    /// Recovery scenario: mean time between a subscriber's disconnects.
    pub reconnect_every: Option<Duration>,
    /// Record the time from connect to subscribed into the histogram instead of broadcast latency
    /// (the storm scenario).
    pub record_setup_latency: bool,
    /// After a wake-up that found fewer than [`COALESCE_EVENTS`] ready connections, sleep this long
    /// before waiting again, so the next wake-up finds more: fewer wake-ups and fewer reads per
    /// delivered message for the load generator, at the price of up to this much added to measured
    /// latency. Zero (the default) measures latency exactly.
    pub coalesce: Duration,
}

/// See [`ClientConfig::coalesce`].
pub const COALESCE_EVENTS: usize = 64;

/// One subscriber to create.
#[derive(Debug, Clone, Copy)]
pub struct SubSpec {
    /// Index of its channel in [`ClientConfig::channels`].
    pub channel: u32,
    /// Index of its server in [`ClientConfig::nodes`].
    pub node: u16,
    /// Source address to bind.
    pub source: Option<Ipv4Addr>,
}

/// A subscriber's final state, for the tail checks once the publisher's last offsets are known.
#[derive(Debug, Clone)]
pub struct SubFinal {
    /// Channel index.
    pub channel: u32,
    /// Whether it ever subscribed.
    pub subscribed: bool,
    /// Seq anomalies of subscriptions that ended (recovery), without tail checks.
    pub seq_closed: Anomalies,
    /// The live subscription's seq checker.
    pub seq: SeqChecker,
    /// The offset that seq 0 of the live subscription stands for.
    pub seq_base: u64,
    /// Offsets across all of the subscriber's subscriptions.
    pub offsets: SeqChecker,
}

impl SubFinal {
    /// Anomalies by seq and by offset, requiring every offset up to `channel_last_offset`.
    pub fn finish(&self, channel_last_offset: u64) -> (Anomalies, Anomalies) {
        let mut seq = self.seq_closed;
        seq.add(
            &self
                .seq
                .finish(channel_last_offset.saturating_sub(self.seq_base)),
        );
        (seq, self.offsets.finish(channel_last_offset))
    }
}

/// What a worker hands back.
pub struct WorkerResult {
    /// Latency histogram (ns).
    pub hist: Histogram<u64>,
    /// Per subscriber, in the order given.
    pub subs: Vec<SubFinal>,
    /// Broadcasts whose offset disagreed with seq (offset != base + seq).
    pub seq_offset_mismatch: u64,
    /// Broadcast frames and their total size (header included), for the floor comparison.
    pub frames: u64,
    /// Sum of broadcast frame sizes.
    pub frame_bytes: u64,
    /// Broadcasts without a readable send time.
    pub untimed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    Connecting,
    Upgrading,
    Subscribing,
    Live,
    Dead,
}

struct Conn {
    spec: SubSpec,
    stream: Option<mio::net::TcpStream>,
    phase: Phase,
    /// Unparsed bytes (a partial frame, or the upgrade response head); empty most of the time.
    partial: Vec<u8>,
    /// Unwritten bytes.
    pending: Vec<u8>,
    /// A fragmented message being reassembled.
    fragments: Vec<u8>,
    seq: SeqChecker,
    seq_base: u64,
    seq_closed: Anomalies,
    offsets: Option<SeqChecker>,
    epoch: Option<String>,
    /// The `since` offset sent with the current subscribe, if any.
    since: Option<u64>,
    setup_started: Instant,
    ever_subscribed: bool,
}

struct Counters {
    deliveries: u64,
    anomalies: u64,
    interval_max_ns: u64,
    seq_offset_mismatch: u64,
    frames: u64,
    frame_bytes: u64,
    untimed: u64,
}

/// Runs one worker until `shared.stop`. `subs` are its subscribers; `seed` varies mask keys.
pub fn run_worker(
    cfg: ClientConfig,
    subs: Vec<SubSpec>,
    shared: Arc<Shared>,
    seed: u64,
) -> WorkerResult {
    let mut w = Worker::new(cfg, subs, shared, seed);
    w.run();
    w.finish()
}

struct Worker {
    cfg: ClientConfig,
    shared: Arc<Shared>,
    conns: Vec<Conn>,
    poll: Option<Poll>,
    rbuf: Vec<u8>,
    hist: Histogram<u64>,
    rng: ws::MaskRng,
    counters: Counters,
    to_start: VecDeque<usize>,
    in_setup: usize,
    reconnects: BinaryHeap<std::cmp::Reverse<(Instant, usize)>>,
    jitter: u64,
}

impl Worker {
    fn new(cfg: ClientConfig, subs: Vec<SubSpec>, shared: Arc<Shared>, seed: u64) -> Self {
        let now = Instant::now();
        let conns: Vec<Conn> = subs
            .into_iter()
            .map(|spec| Conn {
                spec,
                stream: None,
                phase: Phase::Idle,
                partial: Vec::new(),
                pending: Vec::new(),
                fragments: Vec::new(),
                seq: SeqChecker::new(1),
                seq_base: 0,
                seq_closed: Anomalies::default(),
                offsets: None,
                epoch: None,
                since: None,
                setup_started: now,
                ever_subscribed: false,
            })
            .collect();
        let to_start = (0..conns.len()).collect();
        let poll = match Poll::new() {
            Ok(p) => Some(p),
            Err(e) => {
                shared.error(format!("epoll_create failed: {e}"));
                None
            }
        };
        Worker {
            cfg,
            shared,
            conns,
            poll,
            rbuf: vec![0; READ_BUF_BYTES],
            hist: hist::new_histogram(),
            rng: ws::MaskRng::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xDEAD_BEEF),
            counters: Counters {
                deliveries: 0,
                anomalies: 0,
                interval_max_ns: 0,
                seq_offset_mismatch: 0,
                frames: 0,
                frame_bytes: 0,
                untimed: 0,
            },
            to_start,
            in_setup: 0,
            reconnects: BinaryHeap::new(),
            jitter: seed | 1,
        }
    }

    fn run(&mut self) {
        let Some(mut poll) = self.poll.take() else {
            self.shared
                .failed
                .fetch_add(self.conns.len() as u64, Ordering::Relaxed);
            return;
        };
        let mut events = Events::with_capacity(1024);
        while !self.shared.stop.load(Ordering::Relaxed) {
            self.start_more(&poll);
            self.due_reconnects(&poll);
            let timeout = if self.in_setup > 0 || !self.reconnects.is_empty() {
                Duration::from_millis(2)
            } else {
                Duration::from_millis(20)
            };
            if let Err(e) = poll.poll(&mut events, Some(timeout)) {
                if e.kind() != ErrorKind::Interrupted {
                    self.shared.error(format!("epoll_wait failed: {e}"));
                    break;
                }
            }
            let mut ready = 0usize;
            for ev in events.iter() {
                ready += 1;
                let idx = ev.token().0;
                if idx >= self.conns.len() {
                    continue;
                }
                self.on_event(
                    idx,
                    ev.is_readable() || ev.is_read_closed() || ev.is_error(),
                    ev.is_writable(),
                );
            }
            self.flush_counters();
            if !self.cfg.coalesce.is_zero() && ready > 0 && ready < COALESCE_EVENTS {
                std::thread::sleep(self.cfg.coalesce);
            }
        }
        self.flush_counters();
        // Close every socket now, while the worker still owns the registry.
        for c in &mut self.conns {
            if let Some(mut s) = c.stream.take() {
                let _ = poll.registry().deregister(&mut s);
            }
        }
        self.poll = Some(poll);
    }

    fn flush_counters(&mut self) {
        let c = &mut self.counters;
        if c.deliveries > 0 {
            self.shared
                .deliveries
                .fetch_add(c.deliveries, Ordering::Relaxed);
            c.deliveries = 0;
            if self.shared.window_wait.load(Ordering::Relaxed) {
                let _g = self.shared.window_mutex.lock();
                self.shared.window_cv.notify_all();
            }
        }
        if c.anomalies > 0 {
            self.shared
                .anomalies
                .fetch_add(c.anomalies, Ordering::Relaxed);
            c.anomalies = 0;
        }
        if c.interval_max_ns > 0 {
            self.shared
                .interval_max_ns
                .fetch_max(c.interval_max_ns, Ordering::Relaxed);
            c.interval_max_ns = 0;
        }
    }

    fn start_more(&mut self, poll: &Poll) {
        while self.in_setup < self.cfg.concurrency {
            let Some(idx) = self.to_start.pop_front() else {
                return;
            };
            self.in_setup += 1;
            self.connect(poll, idx);
        }
    }

    fn due_reconnects(&mut self, poll: &Poll) {
        let now = Instant::now();
        while let Some(std::cmp::Reverse((at, idx))) = self.reconnects.peek().copied() {
            if at > now {
                return;
            }
            self.reconnects.pop();
            if self.conns[idx].phase != Phase::Live {
                continue;
            }
            self.reconnect(poll, idx);
        }
    }

    /// Recovery: drop the connection (close frame, best effort) and start a new one (on the next
    /// node when there are several) that will subscribe with `since` the last offset seen.
    fn reconnect(&mut self, poll: &Poll, idx: usize) {
        let key = self.rng.next_key();
        let c = &mut self.conns[idx];
        if let Some(mut s) = c.stream.take() {
            let mut close = Vec::with_capacity(8);
            ws::encode_close(&mut close, 1000, key);
            let _ = s.write(&close);
            let _ = poll.registry().deregister(&mut s);
        }
        c.seq_closed.add(&c.seq.counts());
        c.since = c.offsets.as_ref().map(|o| o.high());
        // Several nodes (a cluster): come back on the next one, so recovery crosses nodes.
        c.spec.node = ((c.spec.node as usize + 1) % self.cfg.nodes.len()) as u16;
        self.shared.reconnects.fetch_add(1, Ordering::Relaxed);
        self.connect(poll, idx);
    }

    fn connect(&mut self, poll: &Poll, idx: usize) {
        let c = &mut self.conns[idx];
        c.partial.clear();
        c.pending.clear();
        c.fragments.clear();
        c.setup_started = Instant::now();
        let target = self.cfg.nodes[c.spec.node as usize % self.cfg.nodes.len()].addr;
        match crate::net::connect_nonblocking(target, c.spec.source) {
            Ok(mut s) => {
                if let Err(e) = poll.registry().register(
                    &mut s,
                    Token(idx),
                    Interest::READABLE | Interest::WRITABLE,
                ) {
                    self.fail(idx, format!("epoll register failed: {e}"));
                    return;
                }
                c.stream = Some(s);
                c.phase = Phase::Connecting;
            }
            Err(e) => {
                let hint = if e.raw_os_error() == Some(libc::EMFILE) {
                    " (open-files limit reached: raise `ulimit -n` or use fewer connections)"
                } else if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) {
                    " (ephemeral ports exhausted: use more --source-ips)"
                } else {
                    ""
                };
                self.fail(idx, format!("connect failed: {e}{hint}"));
            }
        }
    }

    fn fail(&mut self, idx: usize, msg: String) {
        let c = &mut self.conns[idx];
        let was_setting_up = matches!(
            c.phase,
            Phase::Idle | Phase::Connecting | Phase::Upgrading | Phase::Subscribing
        ) && !c.ever_subscribed;
        // Closing the descriptor removes it from the epoll set.
        c.stream = None;
        c.phase = Phase::Dead;
        if was_setting_up {
            self.in_setup = self.in_setup.saturating_sub(1);
        }
        if !self.shared.stop.load(Ordering::Relaxed) {
            self.shared.failed.fetch_add(1, Ordering::Relaxed);
            self.shared.error(msg);
        }
    }

    fn on_event(&mut self, idx: usize, readable: bool, writable: bool) {
        match self.conns[idx].phase {
            Phase::Connecting => {
                let c = &mut self.conns[idx];
                let Some(s) = c.stream.as_ref() else { return };
                match s.take_error() {
                    Ok(Some(e)) | Err(e) => {
                        self.fail(idx, format!("connect failed: {e}"));
                        return;
                    }
                    Ok(None) => {}
                }
                match s.peer_addr() {
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::NotConnected => return,
                    Err(e) => {
                        self.fail(idx, format!("connect failed: {e}"));
                        return;
                    }
                }
                let node = &self.cfg.nodes[c.spec.node as usize % self.cfg.nodes.len()];
                c.pending
                    .extend_from_slice(&ws::upgrade_request(&node.host));
                c.phase = Phase::Upgrading;
                self.flush(idx);
                // The answer may already be there.
                self.on_readable(idx);
            }
            Phase::Dead | Phase::Idle => {}
            _ => {
                if writable && !self.conns[idx].pending.is_empty() {
                    self.flush(idx);
                }
                if readable {
                    self.on_readable(idx);
                }
            }
        }
    }

    fn flush(&mut self, idx: usize) {
        let c = &mut self.conns[idx];
        let Some(s) = c.stream.as_mut() else { return };
        while !c.pending.is_empty() {
            match s.write(&c.pending) {
                Ok(0) => {
                    self.fail(idx, "write returned 0".into());
                    return;
                }
                Ok(n) => {
                    c.pending.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    self.fail(idx, format!("write failed: {e}"));
                    return;
                }
            }
        }
    }

    fn on_readable(&mut self, idx: usize) {
        loop {
            let c = &mut self.conns[idx];
            let Some(s) = c.stream.as_mut() else { return };
            let n = match s.read(&mut self.rbuf) {
                Ok(0) => {
                    let phase = c.phase;
                    self.fail(
                        idx,
                        format!("server closed the connection (phase {phase:?})"),
                    );
                    return;
                }
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.fail(idx, format!("read failed: {e}"));
                    return;
                }
            };
            let now_ns = now_unix_ns();
            // Parse in place from the worker buffer when nothing is left over (the common case);
            // only a partial frame is copied into the connection.
            let mut data = std::mem::take(&mut self.rbuf);
            let result = if self.conns[idx].partial.is_empty() {
                let r = self.process(idx, &data[..n], now_ns);
                if let Ok(used) = r {
                    if used < n {
                        self.conns[idx].partial.extend_from_slice(&data[used..n]);
                    }
                }
                r.map(|_| ())
            } else {
                let mut partial = std::mem::take(&mut self.conns[idx].partial);
                partial.extend_from_slice(&data[..n]);
                let r = self.process(idx, &partial, now_ns);
                if let Ok(used) = r {
                    partial.drain(..used);
                    if partial.len() > PARTIAL_BYTES_MAX {
                        self.rbuf = data;
                        self.fail(idx, "partial frame over 32 MiB".into());
                        return;
                    }
                    if self.conns[idx].stream.is_some() {
                        self.conns[idx].partial = partial;
                    }
                }
                r.map(|_| ())
            };
            data.truncate(READ_BUF_BYTES);
            self.rbuf = data;
            if let Err(msg) = result {
                self.fail(idx, msg);
                return;
            }
            if !self.conns[idx].pending.is_empty() {
                self.flush(idx);
            }
            // A short read drained the socket: with edge-triggered epoll a new arrival raises a new
            // event, so the extra read() that would return EAGAIN is skipped (half the syscalls).
            if n < READ_BUF_BYTES {
                return;
            }
        }
    }

    /// Consumes complete units from `data`; returns the bytes used.
    fn process(&mut self, idx: usize, data: &[u8], now_ns: u64) -> Result<usize, String> {
        let mut pos = 0;
        if self.conns[idx].phase == Phase::Upgrading {
            match ws::parse_upgrade_response(data) {
                Upgrade::Incomplete => return Ok(0),
                Upgrade::Refused(status) => return Err(format!("upgrade refused: {status}")),
                Upgrade::Switched(used) => {
                    pos = used;
                    self.on_upgraded(idx);
                }
            }
        }
        while pos < data.len() {
            let f = match ws::decode_server_frame(&data[pos..]) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return Err(e.to_string()),
            };
            let payload = &data[pos + f.payload_start..pos + f.end];
            let frame_len = f.end as u64;
            pos += f.end;
            match f.opcode {
                ws::OP_TEXT if f.fin => self.on_text(idx, payload, frame_len, now_ns)?,
                ws::OP_TEXT | ws::OP_BINARY => {
                    let c = &mut self.conns[idx];
                    c.fragments.clear();
                    c.fragments.extend_from_slice(payload);
                }
                ws::OP_CONTINUATION => {
                    let c = &mut self.conns[idx];
                    c.fragments.extend_from_slice(payload);
                    if c.fragments.len() > PARTIAL_BYTES_MAX {
                        return Err("fragmented message over 32 MiB".into());
                    }
                    if f.fin {
                        let msg = std::mem::take(&mut c.fragments);
                        self.on_text(idx, &msg, msg.len() as u64, now_ns)?;
                    }
                }
                ws::OP_PING => {
                    let key = self.rng.next_key();
                    ws::encode_client_frame(
                        &mut self.conns[idx].pending,
                        ws::OP_PONG,
                        payload,
                        key,
                    );
                }
                ws::OP_CLOSE => {
                    let code = if payload.len() >= 2 {
                        u16::from_be_bytes([payload[0], payload[1]])
                    } else {
                        1005
                    };
                    let reason =
                        String::from_utf8_lossy(payload.get(2..).unwrap_or(&[])).into_owned();
                    return Err(format!("server sent close {code} {reason}"));
                }
                _ => {}
            }
        }
        Ok(pos)
    }

    fn on_upgraded(&mut self, idx: usize) {
        let k1 = self.rng.next_key();
        let k2 = self.rng.next_key();
        let c = &mut self.conns[idx];
        if !c.ever_subscribed {
            self.shared.upgraded.fetch_add(1, Ordering::Relaxed);
        }
        let mut req = Vec::with_capacity(512);
        req.extend_from_slice(b"{\"id\":1,\"method\":\"auth\",\"params\":{\"token\":");
        extract::push_json_str(&mut req, &self.cfg.token);
        req.extend_from_slice(b"}}");
        ws::encode_client_frame(&mut c.pending, ws::OP_TEXT, &req, k1);
        req.clear();
        req.extend_from_slice(b"{\"id\":2,\"method\":\"subscribe\",\"params\":{\"channel\":");
        extract::push_json_str(&mut req, &self.cfg.channels[c.spec.channel as usize]);
        if let (Some(since), Some(epoch)) = (c.since, c.epoch.as_ref()) {
            req.extend_from_slice(b",\"since\":{\"offset\":");
            extract::push_u64(&mut req, since);
            req.extend_from_slice(b",\"epoch\":");
            extract::push_json_str(&mut req, epoch);
            req.push(b'}');
        }
        req.extend_from_slice(b"}}");
        // auth and subscribe leave in one write: the server handles a connection's frames in order,
        // so the subscribe is authorized, and the setup costs one round trip instead of two.
        ws::encode_client_frame(&mut c.pending, ws::OP_TEXT, &req, k2);
        c.phase = Phase::Subscribing;
    }

    fn on_text(
        &mut self,
        idx: usize,
        text: &[u8],
        frame_len: u64,
        now_ns: u64,
    ) -> Result<(), String> {
        match extract::parse_message(text) {
            Message::Broadcast(b) => {
                let c = &mut self.conns[idx];
                if c.phase != Phase::Live {
                    return Err(format!(
                        "broadcast before the subscribe result (seq {})",
                        b.seq
                    ));
                }
                let k = &mut self.counters;
                k.deliveries += 1;
                k.frames += 1;
                k.frame_bytes += frame_len;
                if b.seq != c.seq.next_expected() {
                    k.anomalies += 1;
                }
                c.seq.observe(b.seq);
                if let Some(o) = c.offsets.as_mut() {
                    o.observe(b.offset);
                }
                if b.offset != c.seq_base + b.seq {
                    k.seq_offset_mismatch += 1;
                }
                if b.sent_unix_ns > 0 {
                    let lat = now_ns.saturating_sub(b.sent_unix_ns);
                    if !self.cfg.record_setup_latency {
                        hist::record(&mut self.hist, lat);
                    }
                    if lat > k.interval_max_ns {
                        k.interval_max_ns = lat;
                    }
                } else {
                    k.untimed += 1;
                }
                Ok(())
            }
            Message::Response(r) => self.on_response(idx, r),
            Message::Other => Ok(()),
        }
    }

    fn on_response(&mut self, idx: usize, r: extract::Response) -> Result<(), String> {
        let c = &mut self.conns[idx];
        match r.request_id {
            Some(AUTH_ID) => {
                if let Some(code) = r.error_code {
                    return Err(format!("auth failed: {code} (check --secret)"));
                }
                Ok(())
            }
            Some(SUBSCRIBE_ID) => {
                if let Some(code) = r.error_code {
                    return Err(format!("subscribe failed: {code}"));
                }
                let top = r.offset.ok_or("subscribe result without offset")?;
                let recovered = r.recovered == Some(true);
                if c.since.is_some() && !recovered {
                    self.shared.unrecovered.fetch_add(1, Ordering::Relaxed);
                    self.shared.error(format!(
                        "subscribe with since offset {} answered recovered: false",
                        c.since.unwrap_or(0)
                    ));
                }
                c.seq_base = match c.since {
                    Some(since) if recovered => since,
                    _ => top,
                };
                c.seq = SeqChecker::new(1);
                if c.offsets.is_none() {
                    c.offsets = Some(SeqChecker::new(top + 1));
                }
                if r.epoch.is_some() {
                    c.epoch = r.epoch;
                }
                c.phase = Phase::Live;
                if !c.ever_subscribed {
                    c.ever_subscribed = true;
                    self.in_setup = self.in_setup.saturating_sub(1);
                    self.shared.subscribed.fetch_add(1, Ordering::Relaxed);
                    if self.cfg.record_setup_latency {
                        hist::record(&mut self.hist, c.setup_started.elapsed().as_nanos() as u64);
                    }
                }
                if let Some(every) = self.cfg.reconnect_every {
                    // Spread disconnects uniformly over [0.5, 1.5) x every so they do not synchronize.
                    self.jitter ^= self.jitter << 13;
                    self.jitter ^= self.jitter >> 7;
                    self.jitter ^= self.jitter << 17;
                    let frac = 0.5 + (self.jitter % 1000) as f64 / 1000.0;
                    let at = Instant::now() + every.mul_f64(frac);
                    self.reconnects.push(std::cmp::Reverse((at, idx)));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn finish(self) -> WorkerResult {
        let subs = self
            .conns
            .iter()
            .map(|c| SubFinal {
                channel: c.spec.channel,
                subscribed: c.ever_subscribed,
                seq_closed: c.seq_closed,
                seq: c.seq.clone(),
                seq_base: c.seq_base,
                offsets: c.offsets.clone().unwrap_or_else(|| SeqChecker::new(1)),
            })
            .collect();
        WorkerResult {
            hist: self.hist,
            subs,
            seq_offset_mismatch: self.counters.seq_offset_mismatch,
            frames: self.counters.frames,
            frame_bytes: self.counters.frame_bytes,
            untimed: self.counters.untimed,
        }
    }
}
