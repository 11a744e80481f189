//! The subscriber side: worker threads, each running one mio (epoll, edge-triggered) loop over many
//! connections. A connection goes connect → upgrade → `auth` + `subscribe` (pipelined in one write;
//! `subscribe` alone for an anonymous viewer of a public channel) → live, where every broadcast is
//! checked (`seq`, `offset`) and timed (the payload's send time). Publications a subscribe rewinds
//! (`rewound` in its result) are checked like the others but counted apart, untimed: they were
//! published before the subscriber came. Against Nchan (`--peer nchan`) the upgrade's URL
//! subscribes, and each message, our raw payload, is checked on its number within its channel.
//!
//! Cost per delivered message is one short `read()` that usually carries several frames, one frame
//! header decode and a few byte searches; receive buffers are per worker, not per connection, so an
//! idle connection costs the load generator a socket and ~200 bytes of state.

use std::collections::{BinaryHeap, VecDeque};
use std::io::{ErrorKind, Write};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::{Events, Interest, Poll, Token};

use crate::checker::{Anomalies, SeqChecker};
use crate::cli::Peer;
use crate::extract::{self, Message};
use crate::hist;
use crate::net::Node;
use crate::recv::{self, End, Inbound, Receiver};
use crate::ws;

/// Request ids of the two setup requests.
const AUTH_ID: u64 = 1;
const SUBSCRIBE_ID: u64 = 2;

/// State shared by the workers, the publisher and the main thread.
#[derive(Default)]
pub(crate) struct Shared {
    /// Set to end the run; workers return their results.
    pub(crate) stop: AtomicBool,
    /// Connections that have completed the WebSocket upgrade (first time only).
    pub(crate) upgraded: AtomicU64,
    /// Connections whose first `subscribe` succeeded.
    pub(crate) subscribed: AtomicU64,
    /// Connections that failed during setup or were dropped by the server.
    pub(crate) failed: AtomicU64,
    /// Broadcasts received, all connections (the rewound ones apart: [`Shared::replayed`]).
    pub(crate) deliveries: AtomicU64,
    /// Publications the subscribe results said were rewound (`rewound`), all connections.
    pub(crate) rewound: AtomicU64,
    /// Rewound publications received (replayed right after the subscribe result).
    pub(crate) replayed: AtomicU64,
    /// Publications accepted by the server so far (the publisher's count).
    pub(crate) published: AtomicU64,
    /// Broadcasts whose seq was not the expected one (progress line only).
    pub(crate) anomalies: AtomicU64,
    /// Recovery: reconnects done.
    pub(crate) reconnects: AtomicU64,
    /// Recovery: `subscribe` with `since` that answered `recovered: false`.
    pub(crate) unrecovered: AtomicU64,
    /// Largest latency seen since the progress line last read it, ns.
    pub(crate) interval_max_ns: AtomicU64,
    /// First error messages (a handful), for the report.
    pub(crate) errors: Mutex<Vec<String>>,
    /// Rung when deliveries advance and a windowed publisher waits.
    pub(crate) window_wait: AtomicBool,
    pub(crate) window_mutex: Mutex<()>,
    pub(crate) window_cv: Condvar,
}

impl Shared {
    /// Records an error message (the first 20 are kept).
    pub(crate) fn error(&self, msg: String) {
        if let Ok(mut e) = self.errors.lock() {
            if e.len() < 20 {
                e.push(msg);
            }
        }
    }
}

/// What every connection of a run needs to know.
#[derive(Clone)]
pub(crate) struct ClientConfig {
    /// The servers' WebSocket listeners; subscriber `i` connects to `nodes[spec.node]`.
    pub(crate) nodes: Arc<Vec<Node>>,
    /// The client token (one for all connections; subscriptions are per connection).
    pub(crate) token: String,
    /// Anonymous viewers: no `auth`, the `subscribe` alone (a public channel, SPEC 14).
    pub(crate) anonymous: bool,
    /// Channel names; subscriber `i` subscribes to `channels[channel_of[i]]`.
    pub(crate) channels: Arc<Vec<String>>,
    /// Setups in progress per worker, at most.
    pub(crate) concurrency: usize,
    /// Recovery scenario: mean time between a subscriber's disconnects.
    pub(crate) reconnect_every: Option<Duration>,
    /// Record the time from connect to subscribed into the histogram instead of broadcast latency
    /// (the storm scenario).
    pub(crate) record_setup_latency: bool,
    /// After a wake-up that found fewer than [`COALESCE_EVENTS`] ready connections, sleep this long
    /// before waiting again, so the next wake-up finds more: fewer wake-ups and fewer reads per
    /// delivered message for the load generator, at the price of up to this much added to measured
    /// latency. Zero (the default) measures latency exactly.
    pub(crate) coalesce: Duration,
    /// Offer permessage-deflate and inflate compressed messages.
    pub(crate) compress: bool,
    /// Subscribe over SSE (`GET /sse?channel=..`) instead of a WebSocket.
    pub(crate) sse: bool,
    /// The server's protocol: Nchan subscribes by the upgrade's URL and sends raw payloads.
    pub(crate) peer: Peer,
}

/// See [`ClientConfig::coalesce`].
const COALESCE_EVENTS: usize = 64;

/// One subscriber to create.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SubSpec {
    /// Index of its channel in [`ClientConfig::channels`].
    pub(crate) channel: u32,
    /// Index of its server in [`ClientConfig::nodes`].
    pub(crate) node: u16,
    /// Source address to bind.
    pub(crate) source: Option<Ipv4Addr>,
}

/// A subscriber's final state, for the tail checks once the publisher's last offsets are known.
#[derive(Debug, Clone)]
pub(crate) struct SubFinal {
    /// Channel index.
    pub(crate) channel: u32,
    /// Whether it ever subscribed.
    pub(crate) subscribed: bool,
    /// Seq anomalies of subscriptions that ended (recovery), without tail checks.
    pub(crate) seq_closed: Anomalies,
    /// The live subscription's seq checker.
    pub(crate) seq: SeqChecker,
    /// The offset that seq 0 of the live subscription stands for.
    pub(crate) seq_base: u64,
    /// Offsets across all of the subscriber's subscriptions.
    pub(crate) offsets: SeqChecker,
}

impl SubFinal {
    /// Anomalies by seq and by offset, requiring every offset up to `channel_last_offset`.
    pub(crate) fn finish(&self, channel_last_offset: u64) -> (Anomalies, Anomalies) {
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
pub(crate) struct WorkerResult {
    /// Latency histogram (ns).
    pub(crate) hist: Histogram<u64>,
    /// Per subscriber, in the order given.
    pub(crate) subs: Vec<SubFinal>,
    /// Broadcasts whose offset disagreed with seq (offset != base + seq).
    pub(crate) seq_offset_mismatch: u64,
    /// Broadcast frames and their total size (header included), for the floor comparison.
    pub(crate) frames: u64,
    /// Sum of broadcast frame sizes.
    pub(crate) frame_bytes: u64,
    /// Broadcasts without a readable send time.
    pub(crate) untimed: u64,
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
    inbound: Inbound,
    /// Unwritten bytes.
    pending: Vec<u8>,
    seq: SeqChecker,
    seq_base: u64,
    seq_closed: Anomalies,
    offsets: Option<SeqChecker>,
    epoch: Option<String>,
    /// The `since` offset sent with the current subscribe, if any.
    since: Option<u64>,
    /// Broadcasts at or below this offset are the current subscribe's rewound publications (0:
    /// none rewound).
    rewound_upto: u64,
    setup_started: Instant,
    ever_subscribed: bool,
}

struct Counters {
    deliveries: u64,
    replayed: u64,
    anomalies: u64,
    interval_max_ns: u64,
    seq_offset_mismatch: u64,
    frames: u64,
    frame_bytes: u64,
    untimed: u64,
}

/// Runs one worker until `shared.stop`. `subs` are its subscribers; `seed` varies mask keys.
pub(crate) fn run_worker(
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
                inbound: Inbound::default(),
                pending: Vec::new(),
                seq: SeqChecker::new(1),
                seq_base: 0,
                seq_closed: Anomalies::default(),
                offsets: None,
                epoch: None,
                since: None,
                rewound_upto: 0,
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
            rbuf: vec![0; recv::READ_BUF_BYTES],
            hist: hist::new_histogram(),
            rng: ws::MaskRng::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xDEAD_BEEF),
            counters: Counters {
                deliveries: 0,
                replayed: 0,
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
        if c.replayed > 0 {
            self.shared
                .replayed
                .fetch_add(c.replayed, Ordering::Relaxed);
            c.replayed = 0;
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
        c.inbound.clear();
        c.pending.clear();
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
                let channel = &self.cfg.channels[c.spec.channel as usize];
                let request = if self.cfg.peer == Peer::Nchan {
                    ws::nchan_upgrade_request(&node.host, channel)
                } else if self.cfg.sse {
                    let token = (!self.cfg.anonymous).then_some(self.cfg.token.as_str());
                    ws::event_stream_request(&node.host, channel, token)
                } else {
                    ws::upgrade_request_offering(&node.host, self.cfg.compress)
                };
                c.pending.extend_from_slice(&request);
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
        let result = recv::read_ready(self, idx, |w| {
            if !w.conns[idx].pending.is_empty() {
                w.flush(idx);
            }
        });
        let msg = match result {
            Ok(()) => return,
            Err(End::Eof | End::Closed) => format!(
                "server closed the connection (phase {:?})",
                self.conns[idx].phase
            ),
            Err(End::ReadFailed(e)) => format!("read failed: {e}"),
            Err(End::Failed(msg)) => msg,
        };
        self.fail(idx, msg);
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
                    let hint = if self.cfg.anonymous {
                        " (an anonymous subscribe needs a public channel: a [[channels]] rule with \
                         access = \"public\" matching it in the server's config file)"
                    } else {
                        ""
                    };
                    return Err(format!("subscribe failed: {code}{hint}"));
                }
                let top = r.offset.ok_or("subscribe result without offset")?;
                let recovered = r.recovered == Some(true);
                // The last `rewound` publications, up to `top`, follow the result with seq 1..;
                // the live ones carry on from there.
                let rewound = r.rewound.unwrap_or(0).min(top);
                if rewound > 0 {
                    self.shared.rewound.fetch_add(rewound, Ordering::Relaxed);
                }
                c.rewound_upto = if rewound > 0 { top } else { 0 };
                if c.since.is_some() && !recovered {
                    self.shared.unrecovered.fetch_add(1, Ordering::Relaxed);
                    self.shared.error(format!(
                        "subscribe with since offset {} answered recovered: false",
                        c.since.unwrap_or(0)
                    ));
                }
                c.seq_base = match c.since {
                    Some(since) if recovered => since,
                    _ => top - rewound,
                };
                c.seq = SeqChecker::new(1);
                if c.offsets.is_none() {
                    c.offsets = Some(SeqChecker::new(top - rewound + 1));
                }
                if r.epoch.is_some() {
                    c.epoch = r.epoch;
                }
                self.live(idx);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Connection `idx` is subscribed (the subscribe result came, or Nchan's upgrade, whose URL
    /// subscribes): broadcasts count from now, the setup is done.
    fn live(&mut self, idx: usize) {
        let c = &mut self.conns[idx];
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

impl Receiver for Worker {
    fn read_buf(&mut self) -> &mut Vec<u8> {
        &mut self.rbuf
    }

    fn stream(&mut self, idx: usize) -> Option<&mut mio::net::TcpStream> {
        self.conns[idx].stream.as_mut()
    }

    fn inbound(&mut self, idx: usize) -> &mut Inbound {
        &mut self.conns[idx].inbound
    }

    fn upgrading(&self, idx: usize) -> bool {
        self.conns[idx].phase == Phase::Upgrading
    }

    /// A subscriber never waits for the answer to its close frame: a reconnect drops the socket.
    fn closing(&self, _idx: usize) -> bool {
        false
    }

    fn inflates(&self) -> bool {
        self.cfg.compress
    }

    fn event_stream(&self) -> bool {
        self.cfg.sse
    }

    fn on_upgraded(&mut self, idx: usize) {
        let k1 = self.rng.next_key();
        let k2 = self.rng.next_key();
        let c = &mut self.conns[idx];
        if !c.ever_subscribed {
            self.shared.upgraded.fetch_add(1, Ordering::Relaxed);
        }
        if self.cfg.sse {
            // The URL subscribed it: the `subscribed` event is the answer.
            c.phase = Phase::Subscribing;
            return;
        }
        if self.cfg.peer == Peer::Nchan {
            // The URL subscribed it and Nchan says nothing more: live at once, each channel's
            // publications expected from the first (the subscribers all come before publishing,
            // and `nchan_subscriber_first_message newest` replays nothing older).
            c.seq = SeqChecker::new(1);
            c.seq_base = 0;
            c.offsets.get_or_insert_with(|| SeqChecker::new(1));
            self.live(idx);
            return;
        }
        let mut req = Vec::with_capacity(512);
        if !self.cfg.anonymous {
            req.extend_from_slice(b"{\"id\":1,\"method\":\"auth\",\"params\":{\"token\":");
            extract::push_json_str(&mut req, &self.cfg.token);
            req.extend_from_slice(b"}}");
            ws::encode_client_frame(&mut c.pending, ws::OP_TEXT, &req, k1);
            req.clear();
        }
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
        frame_bytes: u64,
        now_ns: u64,
    ) -> Result<(), String> {
        if self.cfg.peer == Peer::Nchan {
            let channels = self.cfg.channels.len() as u64;
            return match extract::parse_raw_payload(text, channels) {
                Some(b) => self.on_broadcast(idx, b, frame_bytes, now_ns),
                None => Err(format!(
                    "Nchan sent a message that is not a payload of ours: {}",
                    String::from_utf8_lossy(&text[..text.len().min(120)])
                )),
            };
        }
        match extract::parse_message(text) {
            Message::Broadcast(b) => self.on_broadcast(idx, b, frame_bytes, now_ns),
            Message::Response(r) => self.on_response(idx, r),
            Message::Other => Ok(()),
        }
    }

    fn pong(&mut self, idx: usize, payload: &[u8]) {
        let key = self.rng.next_key();
        ws::encode_client_frame(&mut self.conns[idx].pending, ws::OP_PONG, payload, key);
    }
}

impl Worker {
    /// Checks and times one broadcast (for Nchan, one message, its seq and offset derived).
    fn on_broadcast(
        &mut self,
        idx: usize,
        b: extract::Broadcast,
        frame_bytes: u64,
        now_ns: u64,
    ) -> Result<(), String> {
        let c = &mut self.conns[idx];
        if c.phase != Phase::Live {
            return Err(format!(
                "broadcast before the subscribe result (seq {})",
                b.seq
            ));
        }
        let k = &mut self.counters;
        // A rewound publication was published before this subscriber came: checked like
        // the live ones, but neither a delivery of the run nor timed.
        let rewound = b.offset <= c.rewound_upto;
        if rewound {
            k.replayed += 1;
        } else {
            k.deliveries += 1;
        }
        k.frames += 1;
        k.frame_bytes += frame_bytes;
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
        if rewound {
            return Ok(());
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
}
