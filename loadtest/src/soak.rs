//! The `soak` scenario's connections: each cycles connect → upgrade → `auth` + `subscribe` (one to a
//! few channels, with `since` once it has seen the channel) → receive for a random while (sometimes
//! unsubscribing from a channel and subscribing again with `since`) → close (the WebSocket closing
//! handshake, or a plain TCP drop) → a random pause → reconnect, until the run settles.
//!
//! Every (connection, channel) pair keeps one offset checker for its whole life, across reconnects
//! and resubscribes, so a message lost or reordered anywhere in the churn shows; `seq` is checked per
//! subscription and `offset == base + seq` per broadcast. At the end the workers stop churning
//! ("settle"): every connection comes back, resubscribes with `since`, and must catch up to the last
//! offset published on each of its channels. [`crate::scenario::soak`] drives the run and checks the
//! server's RSS, gauges and descriptors.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::{Events, Interest, Poll, Token};

use crate::checker::{Anomalies, SeqChecker};
use crate::cli::SoakArgs;
use crate::client::Shared;
use crate::extract::{self, Message};
use crate::hist;
use crate::metrics::{self, Gauges};
use crate::net::Node;
use crate::procstat;
use crate::publisher::{self, PublishResult, PublisherConfig, Via};
use crate::report::Report;
use crate::scenario::{self, SetupError};
use crate::schedule::now_unix_ns;
use crate::ws;

/// Bytes read per `read()`, one buffer per worker.
const READ_BUF_BYTES: usize = 128 * 1024;
/// Leftover (partial frame) bytes kept per connection before it is judged broken.
const PARTIAL_BYTES_MAX: usize = 32 << 20;
/// How long the server has to answer our close frame (generous: an overloaded host delays it).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(20);
/// Shortest wait before reconnecting after a failure (no hot loop against a refusing server).
const RETRY_MIN: Duration = Duration::from_millis(100);

/// State shared by the soak workers and the main thread.
pub struct SoakShared {
    /// End the run: workers return their results.
    pub stop: AtomicBool,
    /// Stop churning: every connection reconnects and resubscribes now and catches up to
    /// [`SoakShared::final_offsets`].
    pub settle: AtomicBool,
    /// Per channel, the last offset published (set before `settle`).
    pub final_offsets: Vec<AtomicU64>,
    /// Per worker, its connections that are open, subscribed to all their channels and caught up
    /// (counted while settling).
    pub settled: Vec<AtomicU64>,
    /// WebSocket connections open now (upgraded, not yet closed by either side).
    pub open: AtomicI64,
    /// Subscriptions confirmed by the server and not yet ended.
    pub live_subs: AtomicI64,
    /// Connections that completed the upgrade (each session once).
    pub sessions: AtomicU64,
    /// Sessions the client ended on purpose (close handshake or drop).
    pub cycled: AtomicU64,
    /// Of those, dropped with no close frame.
    pub abrupt: AtomicU64,
    /// Unsubscribe + resubscribe cycles within a session.
    pub resubscribes: AtomicU64,
    /// Subscribes with `since` answered `recovered: true`.
    pub recovered: AtomicU64,
    /// Subscribes with `since` answered `recovered: false` although history should have held the gap.
    pub unrecovered: AtomicU64,
    /// Subscribes with `since` answered `recovered: false` for a gap larger than the history size
    /// (allowed; the offsets skipped are in `history_gap_offsets`).
    pub history_gaps: AtomicU64,
    /// Offsets skipped over allowed history gaps.
    pub history_gap_offsets: AtomicU64,
    /// Broadcasts received (replays included).
    pub deliveries: AtomicU64,
    /// Of those, publications replayed by a recovery.
    pub replayed: AtomicU64,
    /// Broadcasts whose seq was not the expected one (progress line).
    pub anomalies: AtomicU64,
    /// Connection failures: refused or failed connects and upgrades, server-side closes, request
    /// errors, close handshakes the server did not answer.
    pub failures: AtomicU64,
    /// Largest live latency since the progress line last read it, ns.
    pub interval_max_ns: AtomicU64,
    /// First error messages.
    pub errors: Mutex<Vec<String>>,
}

impl SoakShared {
    /// State for `channels` channels and `workers` worker threads.
    pub fn new(channels: usize, workers: usize) -> Self {
        SoakShared {
            stop: AtomicBool::new(false),
            settle: AtomicBool::new(false),
            final_offsets: (0..channels).map(|_| AtomicU64::new(0)).collect(),
            settled: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            open: AtomicI64::new(0),
            live_subs: AtomicI64::new(0),
            sessions: AtomicU64::new(0),
            cycled: AtomicU64::new(0),
            abrupt: AtomicU64::new(0),
            resubscribes: AtomicU64::new(0),
            recovered: AtomicU64::new(0),
            unrecovered: AtomicU64::new(0),
            history_gaps: AtomicU64::new(0),
            history_gap_offsets: AtomicU64::new(0),
            deliveries: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            anomalies: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            interval_max_ns: AtomicU64::new(0),
            errors: Mutex::new(Vec::new()),
        }
    }

    /// Records an error message (the first 20 are kept).
    pub fn error(&self, msg: String) {
        if let Ok(mut e) = self.errors.lock() {
            if e.len() < 20 {
                e.push(msg);
            }
        }
    }

    /// Connections settled, all workers.
    pub fn settled_total(&self) -> u64 {
        self.settled.iter().map(|s| s.load(Ordering::Relaxed)).sum()
    }
}

/// What every soak connection needs to know.
#[derive(Clone)]
pub struct SoakConfig {
    /// The server.
    pub node: Node,
    /// The client token.
    pub token: String,
    /// Channel names.
    pub channels: Arc<Vec<String>>,
    /// Initial connects in flight per worker, at most.
    pub concurrency: usize,
    /// Mean session length (each uniform in 0.5x..1.5x).
    pub session: Duration,
    /// Longest pause between sessions, and between an unsubscribe and the resubscribe.
    pub pause: Duration,
    /// Share of sessions with an unsubscribe/resubscribe.
    pub resubscribe: f64,
    /// Share of sessions ended by a TCP drop.
    pub abrupt: f64,
    /// The server's history size: a larger gap may be unrecoverable.
    pub history_size: u64,
    /// The server's history TTL: a publication older than this may be gone.
    pub history_ttl: Duration,
}

/// One connection to create: its channels (indices, distinct) and source address.
#[derive(Debug, Clone)]
pub struct ConnSpec {
    /// Channel indices, fixed for the connection's life.
    pub channels: Vec<u32>,
    /// Source address to bind.
    pub source: Option<Ipv4Addr>,
}

/// A small xorshift64* generator (uniform enough for jitter; no dependency).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator (zero replaced).
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n) (0 when n is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

/// Picks each connection's channels: 1 to `per_conn_max` distinct channels out of `channels`
/// (consecutive from a random start, so every channel gets about the same number of subscribers).
pub fn plan_channels(n: usize, channels: usize, per_conn_max: usize, seed: u64) -> Vec<Vec<u32>> {
    let channels = channels.max(1);
    let max = per_conn_max.clamp(1, channels);
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let k = 1 + rng.below(max as u64) as usize;
            let start = rng.below(channels as u64) as usize;
            (0..k).map(|j| ((start + j) % channels) as u32).collect()
        })
        .collect()
}

/// `recovered: false` is legitimate when more publications were missed than history holds, or
/// when the first missed one may have outlived the history TTL (`age_ns` is an upper bound of its
/// age).
pub fn history_cannot_hold(gap: u64, age_ns: u64, history_size: u64, ttl_ns: u64) -> bool {
    gap > history_size || age_ns >= ttl_ns
}

/// How long the server's history takes to reach its steady size: `size` publications per channel
/// at `per_channel_rate`, or the TTL, whichever comes first.
pub fn history_fill_time(size: u64, ttl: Duration, per_channel_rate: f64) -> Duration {
    if per_channel_rate <= 0.0 {
        return ttl;
    }
    Duration::from_secs_f64((size as f64 / per_channel_rate).min(1e9)).min(ttl)
}

/// The default warm-up: 20% of the run, 10 s to 6 min, at least the history's fill time plus two
/// seconds, and never more than half the run.
pub fn default_warmup(duration: Duration, history_fill: Duration) -> Duration {
    duration
        .mul_f64(0.2)
        .clamp(Duration::from_secs(10), Duration::from_secs(360))
        .max(history_fill + Duration::from_secs(2))
        .min(duration / 2)
}

/// The median of the RSS samples `(seconds into the run, bytes)` taken from `from` to `to` seconds.
pub fn rss_level(samples: &[(f64, u64)], from: f64, to: f64) -> Option<u64> {
    let mut v: Vec<u64> = samples
        .iter()
        .filter(|(t, _)| *t >= from && *t <= to)
        .map(|&(_, r)| r)
        .collect();
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    Some(v[v.len() / 2])
}

/// The length of the RSS windows: 10% of the run, 5 s to 60 s.
pub fn rss_window(duration: Duration) -> Duration {
    duration
        .mul_f64(0.1)
        .clamp(Duration::from_secs(5), Duration::from_secs(60))
}

/// The RSS check: `end` within `tolerance_pct` percent of `warm`, or within `slack_mib` MiB.
pub fn rss_within(warm: u64, end: u64, tolerance_pct: f64, slack_mib: f64) -> bool {
    let diff = (end as f64 - warm as f64).abs();
    diff <= warm as f64 * tolerance_pct / 100.0 || diff <= slack_mib * 1048576.0
}

/// RSS change from `warm` to `end`, percent of `warm`.
pub fn rss_change_pct(warm: u64, end: u64) -> f64 {
    (end as f64 - warm as f64) / (warm.max(1) as f64) * 100.0
}

/// What one worker hands back.
pub struct SoakWorkerResult {
    /// Live (not replayed) delivery latency, ns.
    pub hist: Histogram<u64>,
    /// By seq, per subscription, all subscriptions.
    pub seq: Anomalies,
    /// By offset, per (connection, channel) across its whole life, tail up to the final offsets.
    pub offsets: Anomalies,
    /// Broadcasts whose offset was not the subscription's base + seq.
    pub seq_offset_mismatch: u64,
    /// Broadcasts for a channel the connection was not subscribed to at that moment.
    pub unexpected: u64,
    /// (connection, channel) pairs.
    pub pairs: u64,
    /// Pairs whose subscribe never succeeded.
    pub never_subscribed: u64,
    /// Pairs not live at the end (their tails count as lost).
    pub not_live_at_end: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not started yet (waiting for a ramp slot).
    Idle,
    /// Between sessions.
    Offline,
    Connecting,
    Upgrading,
    Open,
    /// Our close frame is out; waiting for the server's.
    Closing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SubState {
    Off,
    Subscribing,
    Live,
    Unsubscribing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Req {
    Auth,
    Subscribe(u8),
    Unsubscribe(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    EndSession,
    Reconnect,
    Unsubscribe(u8),
    Resubscribe(u8),
    CloseTimeout,
}

struct Sub {
    channel: u32,
    state: SubState,
    /// Offsets over the pair's whole life (from the first subscribe).
    offsets: Option<SeqChecker>,
    epoch: Option<String>,
    /// `since` sent with the pending subscribe.
    since: Option<u64>,
    seq: SeqChecker,
    seq_base: u64,
    seq_closed: Anomalies,
    /// Offsets from here on are live (below: replayed by a recovery).
    live_from: u64,
    ever_live: bool,
    /// A lower bound of the time (unix ns) the server accepted publication `offsets.high() + 1`:
    /// the scheduled send time of the highest offset seen (the next one on the channel is accepted
    /// after it), or when the subscribe that set the high mark was sent.
    floor_ns: u64,
    /// When the pending subscribe was sent (unix ns).
    subscribe_sent_ns: u64,
}

struct Conn {
    subs: Vec<Sub>,
    source: Option<Ipv4Addr>,
    stream: Option<mio::net::TcpStream>,
    phase: Phase,
    partial: Vec<u8>,
    pending: Vec<u8>,
    fragments: Vec<u8>,
    requests: Vec<(u64, Req)>,
    next_id: u64,
    /// Bumped whenever the connection closes: timers of an older generation are stale.
    gen: u32,
    /// Holds a ramp slot (first connect in progress).
    ramping: bool,
    /// After a failure, no reconnect before this (also while settling).
    retry_at: Instant,
}

/// How processing a connection's input ended, when it did not simply consume bytes.
enum Stop {
    /// Something is wrong: a failure.
    Fail(String),
    /// The server answered our close frame: the session ended cleanly.
    Closed,
}

#[derive(Default)]
struct Local {
    deliveries: u64,
    replayed: u64,
    anomalies: u64,
    interval_max_ns: u64,
}

/// Runs one soak worker until `shared.stop`.
pub fn run_worker(
    cfg: SoakConfig,
    specs: Vec<ConnSpec>,
    shared: Arc<SoakShared>,
    worker: usize,
) -> SoakWorkerResult {
    let mut w = Worker::new(cfg, specs, shared, worker);
    w.run();
    w.finish()
}

struct Worker {
    cfg: SoakConfig,
    shared: Arc<SoakShared>,
    id: usize,
    conns: Vec<Conn>,
    rbuf: Vec<u8>,
    hist: Histogram<u64>,
    mask: ws::MaskRng,
    rng: Rng,
    timers: BinaryHeap<Reverse<(Instant, usize, u32, Timer)>>,
    to_start: VecDeque<usize>,
    in_ramp: usize,
    local: Local,
    mismatch: u64,
    unexpected: u64,
    poll: Option<Poll>,
}

impl Worker {
    fn new(cfg: SoakConfig, specs: Vec<ConnSpec>, shared: Arc<SoakShared>, id: usize) -> Self {
        let conns: Vec<Conn> = specs
            .into_iter()
            .map(|s| Conn {
                subs: s
                    .channels
                    .iter()
                    .map(|&channel| Sub {
                        channel,
                        state: SubState::Off,
                        offsets: None,
                        epoch: None,
                        since: None,
                        seq: SeqChecker::new(1),
                        seq_base: 0,
                        seq_closed: Anomalies::default(),
                        live_from: 0,
                        ever_live: false,
                        floor_ns: 0,
                        subscribe_sent_ns: 0,
                    })
                    .collect(),
                source: s.source,
                stream: None,
                phase: Phase::Idle,
                partial: Vec::new(),
                pending: Vec::new(),
                fragments: Vec::new(),
                requests: Vec::new(),
                next_id: 1,
                gen: 0,
                ramping: false,
                retry_at: Instant::now(),
            })
            .collect();
        let poll = match Poll::new() {
            Ok(p) => Some(p),
            Err(e) => {
                shared.error(format!("epoll_create failed: {e}"));
                None
            }
        };
        Worker {
            to_start: (0..conns.len()).collect(),
            conns,
            rbuf: vec![0; READ_BUF_BYTES],
            hist: hist::new_histogram(),
            mask: ws::MaskRng::new((id as u64 + 1).wrapping_mul(0xA076_1D64_78BD_642F)),
            rng: Rng::new(id as u64 + 7),
            timers: BinaryHeap::new(),
            in_ramp: 0,
            local: Local::default(),
            mismatch: 0,
            unexpected: 0,
            cfg,
            shared,
            id,
            poll,
        }
    }

    fn settling(&self) -> bool {
        self.shared.settle.load(Ordering::Relaxed)
    }

    fn stopping(&self) -> bool {
        self.shared.stop.load(Ordering::Relaxed)
    }

    fn run(&mut self) {
        let Some(mut poll) = self.poll.take() else {
            self.shared.failures.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let mut events = Events::with_capacity(1024);
        let mut next_scan = Instant::now();
        while !self.stopping() {
            self.start_more(&poll);
            self.due_timers(&poll);
            if self.settling() && Instant::now() >= next_scan {
                self.settle_scan(&poll);
                next_scan = Instant::now() + Duration::from_millis(10);
            }
            let timeout = match self.timers.peek() {
                _ if self.in_ramp > 0 => Duration::from_millis(2),
                Some(Reverse((at, ..))) => at
                    .saturating_duration_since(Instant::now())
                    .clamp(Duration::from_millis(1), Duration::from_millis(10)),
                None => Duration::from_millis(10),
            };
            if let Err(e) = poll.poll(&mut events, Some(timeout)) {
                if e.kind() != ErrorKind::Interrupted {
                    self.shared.error(format!("epoll_wait failed: {e}"));
                    break;
                }
            }
            for ev in events.iter() {
                let idx = ev.token().0;
                if idx >= self.conns.len() {
                    continue;
                }
                self.on_event(
                    &poll,
                    idx,
                    ev.is_readable() || ev.is_read_closed() || ev.is_error(),
                    ev.is_writable(),
                );
            }
            self.flush_local();
        }
        self.flush_local();
        self.poll = Some(poll);
    }

    fn flush_local(&mut self) {
        let l = std::mem::take(&mut self.local);
        let s = &self.shared;
        if l.deliveries > 0 {
            s.deliveries.fetch_add(l.deliveries, Ordering::Relaxed);
        }
        if l.replayed > 0 {
            s.replayed.fetch_add(l.replayed, Ordering::Relaxed);
        }
        if l.anomalies > 0 {
            s.anomalies.fetch_add(l.anomalies, Ordering::Relaxed);
        }
        if l.interval_max_ns > 0 {
            s.interval_max_ns
                .fetch_max(l.interval_max_ns, Ordering::Relaxed);
        }
    }

    fn start_more(&mut self, poll: &Poll) {
        while self.in_ramp < self.cfg.concurrency {
            let Some(idx) = self.to_start.pop_front() else {
                return;
            };
            self.in_ramp += 1;
            self.conns[idx].ramping = true;
            self.connect(poll, idx);
        }
    }

    fn end_ramp(&mut self, idx: usize) {
        if std::mem::take(&mut self.conns[idx].ramping) {
            self.in_ramp = self.in_ramp.saturating_sub(1);
        }
    }

    fn schedule(&mut self, after: Duration, idx: usize, t: Timer) {
        let gen = self.conns[idx].gen;
        self.timers
            .push(Reverse((Instant::now() + after, idx, gen, t)));
    }

    fn due_timers(&mut self, poll: &Poll) {
        let now = Instant::now();
        while let Some(Reverse((at, idx, gen, t))) = self.timers.peek().copied() {
            if at > now {
                return;
            }
            self.timers.pop();
            if self.conns[idx].gen != gen {
                continue;
            }
            self.on_timer(poll, idx, t);
        }
    }

    fn on_timer(&mut self, poll: &Poll, idx: usize, t: Timer) {
        let settling = self.settling();
        let phase = self.conns[idx].phase;
        let sub_state = |slot: u8| self.conns[idx].subs[slot as usize].state;
        match t {
            Timer::EndSession if phase == Phase::Open && !settling => self.end_session(poll, idx),
            Timer::Reconnect if phase == Phase::Offline => self.connect(poll, idx),
            Timer::Unsubscribe(slot)
                if phase == Phase::Open && !settling && sub_state(slot) == SubState::Live =>
            {
                self.send_unsubscribe(idx, slot);
                self.flush(poll, idx);
            }
            Timer::Resubscribe(slot)
                if phase == Phase::Open && sub_state(slot) == SubState::Off =>
            {
                self.send_subscribe(idx, slot);
                self.flush(poll, idx);
            }
            Timer::CloseTimeout if phase == Phase::Closing => {
                self.fail(
                    poll,
                    idx,
                    format!(
                        "the server did not answer a close frame within {} s",
                        CLOSE_TIMEOUT.as_secs()
                    ),
                );
            }
            _ => {}
        }
    }

    /// While settling: bring every connection back and resubscribe everything; count those caught
    /// up to the final offsets.
    fn settle_scan(&mut self, poll: &Poll) {
        let finals: Vec<u64> = self
            .shared
            .final_offsets
            .iter()
            .map(|o| o.load(Ordering::Relaxed))
            .collect();
        let mut settled = 0u64;
        let now = Instant::now();
        for idx in 0..self.conns.len() {
            match self.conns[idx].phase {
                Phase::Offline if self.conns[idx].retry_at <= now => self.connect(poll, idx),
                Phase::Open => {
                    let mut sent = false;
                    for slot in 0..self.conns[idx].subs.len() {
                        if self.conns[idx].subs[slot].state == SubState::Off {
                            self.send_subscribe(idx, slot as u8);
                            sent = true;
                        }
                    }
                    if sent {
                        self.flush(poll, idx);
                    }
                    let caught_up = self.conns[idx].subs.iter().all(|s| {
                        s.state == SubState::Live
                            && s.offsets.as_ref().is_some_and(|o| {
                                o.high() >= finals.get(s.channel as usize).copied().unwrap_or(0)
                            })
                    });
                    if caught_up && self.conns[idx].phase == Phase::Open {
                        settled += 1;
                    }
                }
                _ => {}
            }
        }
        self.shared.settled[self.id].store(settled, Ordering::Relaxed);
    }

    fn connect(&mut self, poll: &Poll, idx: usize) {
        if self.stopping() {
            return;
        }
        let target = self.cfg.node.addr;
        let c = &mut self.conns[idx];
        c.partial.clear();
        c.pending.clear();
        c.fragments.clear();
        c.requests.clear();
        match crate::net::connect_nonblocking(target, c.source) {
            Ok(mut s) => {
                if let Err(e) = poll.registry().register(
                    &mut s,
                    Token(idx),
                    Interest::READABLE | Interest::WRITABLE,
                ) {
                    self.fail(poll, idx, format!("epoll register failed: {e}"));
                    return;
                }
                c.stream = Some(s);
                c.phase = Phase::Connecting;
            }
            Err(e) => {
                let hint = if e.raw_os_error() == Some(libc::EMFILE) {
                    " (open-files limit reached)"
                } else if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) {
                    " (ephemeral ports exhausted: use more --source-ips)"
                } else {
                    ""
                };
                self.fail(poll, idx, format!("connect failed: {e}{hint}"));
            }
        }
    }

    /// Closes the connection's socket and forgets its session state (the checkers stay).
    fn drop_conn(&mut self, poll: &Poll, idx: usize) {
        let c = &mut self.conns[idx];
        if let Some(mut s) = c.stream.take() {
            let _ = poll.registry().deregister(&mut s);
        }
        if matches!(c.phase, Phase::Open | Phase::Closing) {
            self.shared.open.fetch_sub(1, Ordering::Relaxed);
        }
        for sub in &mut c.subs {
            if matches!(sub.state, SubState::Live | SubState::Unsubscribing) {
                sub.seq_closed.add(&sub.seq.counts());
                self.shared.live_subs.fetch_sub(1, Ordering::Relaxed);
            }
            sub.state = SubState::Off;
        }
        c.requests.clear();
        c.partial.clear();
        c.pending.clear();
        c.fragments.clear();
        c.phase = Phase::Offline;
        c.gen = c.gen.wrapping_add(1);
    }

    fn pause(&mut self) -> Duration {
        self.cfg.pause.mul_f64(self.rng.unit())
    }

    /// A failure: counted (unless the run is stopping), then the connection tries again later.
    fn fail(&mut self, poll: &Poll, idx: usize, msg: String) {
        self.end_ramp(idx);
        if !self.stopping() {
            self.shared.failures.fetch_add(1, Ordering::Relaxed);
            self.shared.error(msg);
        }
        self.drop_conn(poll, idx);
        let after = self.pause().max(RETRY_MIN);
        self.conns[idx].retry_at = Instant::now() + after;
        self.schedule(after, idx, Timer::Reconnect);
    }

    /// Ends the session on purpose: a close handshake, or (sometimes) a plain TCP drop.
    fn end_session(&mut self, poll: &Poll, idx: usize) {
        self.shared.cycled.fetch_add(1, Ordering::Relaxed);
        if self.rng.unit() < self.cfg.abrupt {
            self.shared.abrupt.fetch_add(1, Ordering::Relaxed);
            self.drop_conn(poll, idx);
            let after = self.pause();
            self.schedule(after, idx, Timer::Reconnect);
        } else {
            let key = self.mask.next_key();
            let c = &mut self.conns[idx];
            ws::encode_close(&mut c.pending, 1000, key);
            c.phase = Phase::Closing;
            self.schedule(CLOSE_TIMEOUT, idx, Timer::CloseTimeout);
            self.flush(poll, idx);
        }
    }

    fn on_event(&mut self, poll: &Poll, idx: usize, readable: bool, writable: bool) {
        match self.conns[idx].phase {
            Phase::Connecting => {
                let Some(s) = self.conns[idx].stream.as_ref() else {
                    return;
                };
                match s.take_error() {
                    Ok(Some(e)) | Err(e) => {
                        self.fail(poll, idx, format!("connect failed: {e}"));
                        return;
                    }
                    Ok(None) => {}
                }
                match s.peer_addr() {
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::NotConnected => return,
                    Err(e) => {
                        self.fail(poll, idx, format!("connect failed: {e}"));
                        return;
                    }
                }
                let req = ws::upgrade_request(&self.cfg.node.host);
                let c = &mut self.conns[idx];
                c.pending.extend_from_slice(&req);
                c.phase = Phase::Upgrading;
                self.flush(poll, idx);
                self.on_readable(poll, idx);
            }
            Phase::Idle | Phase::Offline => {}
            _ => {
                if writable && !self.conns[idx].pending.is_empty() {
                    self.flush(poll, idx);
                }
                if readable {
                    self.on_readable(poll, idx);
                }
            }
        }
    }

    fn flush(&mut self, poll: &Poll, idx: usize) {
        let c = &mut self.conns[idx];
        if matches!(c.phase, Phase::Connecting) {
            return;
        }
        let Some(s) = c.stream.as_mut() else { return };
        while !c.pending.is_empty() {
            match s.write(&c.pending) {
                Ok(0) => {
                    self.fail(poll, idx, "write returned 0".into());
                    return;
                }
                Ok(n) => {
                    c.pending.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    let phase = c.phase;
                    self.fail(poll, idx, format!("write failed ({phase:?}): {e}"));
                    return;
                }
            }
        }
    }

    fn on_readable(&mut self, poll: &Poll, idx: usize) {
        loop {
            let c = &mut self.conns[idx];
            let Some(s) = c.stream.as_mut() else { return };
            let n = match s.read(&mut self.rbuf) {
                Ok(0) => {
                    let phase = c.phase;
                    if phase == Phase::Closing {
                        self.closed(poll, idx);
                    } else {
                        self.fail(
                            poll,
                            idx,
                            format!("server closed the connection (phase {phase:?})"),
                        );
                    }
                    return;
                }
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    let phase = c.phase;
                    self.fail(poll, idx, format!("read failed ({phase:?}): {e}"));
                    return;
                }
            };
            let now_ns = now_unix_ns();
            let gen = self.conns[idx].gen;
            let data = std::mem::take(&mut self.rbuf);
            let mut buf = std::mem::take(&mut self.conns[idx].partial);
            let result = if buf.is_empty() {
                let r = self.process(idx, &data[..n], now_ns);
                if let Ok(used) = r {
                    buf.extend_from_slice(&data[used..n]);
                }
                r
            } else {
                buf.extend_from_slice(&data[..n]);
                let r = self.process(idx, &buf, now_ns);
                if let Ok(used) = r {
                    buf.drain(..used);
                }
                r
            };
            self.rbuf = data;
            match result {
                Err(Stop::Fail(msg)) => {
                    self.fail(poll, idx, msg);
                    return;
                }
                Err(Stop::Closed) => {
                    self.closed(poll, idx);
                    return;
                }
                Ok(_) => {}
            }
            if buf.len() > PARTIAL_BYTES_MAX {
                self.fail(poll, idx, "partial frame over 32 MiB".into());
                return;
            }
            if self.conns[idx].gen == gen {
                self.conns[idx].partial = buf;
            }
            if !self.conns[idx].pending.is_empty() {
                self.flush(poll, idx);
            }
            if n < READ_BUF_BYTES {
                return;
            }
        }
    }

    /// The close handshake completed: the session is over, reconnect after a pause.
    fn closed(&mut self, poll: &Poll, idx: usize) {
        self.drop_conn(poll, idx);
        let after = self.pause();
        self.schedule(after, idx, Timer::Reconnect);
    }

    fn process(&mut self, idx: usize, data: &[u8], now_ns: u64) -> Result<usize, Stop> {
        let mut pos = 0;
        if self.conns[idx].phase == Phase::Upgrading {
            match ws::parse_upgrade_response(data) {
                ws::Upgrade::Incomplete => return Ok(0),
                ws::Upgrade::Refused(status) => {
                    return Err(Stop::Fail(format!("upgrade refused: {status}")))
                }
                ws::Upgrade::Switched(used) => {
                    pos = used;
                    self.on_upgraded(idx);
                }
            }
        }
        while pos < data.len() {
            let f = match ws::decode_server_frame(&data[pos..]) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return Err(Stop::Fail(e.to_string())),
            };
            let payload = &data[pos + f.payload_start..pos + f.end];
            let frame_len = f.end;
            pos += f.end;
            match f.opcode {
                ws::OP_TEXT if f.fin => self.on_text(idx, payload, now_ns)?,
                ws::OP_TEXT | ws::OP_BINARY => {
                    let c = &mut self.conns[idx];
                    c.fragments.clear();
                    c.fragments.extend_from_slice(payload);
                }
                ws::OP_CONTINUATION => {
                    let c = &mut self.conns[idx];
                    c.fragments.extend_from_slice(payload);
                    if c.fragments.len() > PARTIAL_BYTES_MAX {
                        return Err(Stop::Fail("fragmented message over 32 MiB".into()));
                    }
                    if f.fin {
                        let msg = std::mem::take(&mut c.fragments);
                        self.on_text(idx, &msg, now_ns)?;
                    }
                }
                ws::OP_PING => {
                    let key = self.mask.next_key();
                    ws::encode_client_frame(
                        &mut self.conns[idx].pending,
                        ws::OP_PONG,
                        payload,
                        key,
                    );
                }
                ws::OP_CLOSE => {
                    if self.conns[idx].phase == Phase::Closing {
                        return Err(Stop::Closed);
                    }
                    let code = if payload.len() >= 2 {
                        u16::from_be_bytes([payload[0], payload[1]])
                    } else {
                        1005
                    };
                    let reason =
                        String::from_utf8_lossy(payload.get(2..).unwrap_or(&[])).into_owned();
                    return Err(Stop::Fail(format!("server sent close {code} {reason}")));
                }
                _ => {}
            }
            let _ = frame_len;
        }
        Ok(pos)
    }

    fn next_id(&mut self, idx: usize, req: Req) -> u64 {
        let c = &mut self.conns[idx];
        let id = c.next_id;
        c.next_id += 1;
        c.requests.push((id, req));
        id
    }

    fn on_upgraded(&mut self, idx: usize) {
        self.end_ramp(idx);
        self.shared.sessions.fetch_add(1, Ordering::Relaxed);
        self.shared.open.fetch_add(1, Ordering::Relaxed);
        let id = self.next_id(idx, Req::Auth);
        let key = self.mask.next_key();
        let mut req = Vec::with_capacity(512);
        req.extend_from_slice(b"{\"id\":");
        extract::push_u64(&mut req, id);
        req.extend_from_slice(b",\"method\":\"auth\",\"params\":{\"token\":");
        extract::push_json_str(&mut req, &self.cfg.token);
        req.extend_from_slice(b"}}");
        let c = &mut self.conns[idx];
        ws::encode_client_frame(&mut c.pending, ws::OP_TEXT, &req, key);
        c.phase = Phase::Open;
        // auth and the subscribes leave in one write; the server handles a connection's frames in
        // order, so the subscribes are authorized.
        for slot in 0..c.subs.len() {
            self.send_subscribe(idx, slot as u8);
        }
        if !self.settling() {
            let len = self.cfg.session.mul_f64(0.5 + self.rng.unit());
            self.schedule(len, idx, Timer::EndSession);
            if self.rng.unit() < self.cfg.resubscribe {
                let n = self.conns[idx].subs.len() as u64;
                let slot = self.rng.below(n) as u8;
                let at = len.mul_f64(0.1 + 0.7 * self.rng.unit());
                self.schedule(at, idx, Timer::Unsubscribe(slot));
            }
        }
    }

    fn send_subscribe(&mut self, idx: usize, slot: u8) {
        let id = self.next_id(idx, Req::Subscribe(slot));
        let key = self.mask.next_key();
        let c = &mut self.conns[idx];
        let sub = &mut c.subs[slot as usize];
        let mut req = channel_request(id, "subscribe", &self.cfg.channels[sub.channel as usize]);
        sub.since = None;
        if let (Some(off), Some(epoch)) = (sub.offsets.as_ref(), sub.epoch.as_ref()) {
            let since = off.high();
            req.extend_from_slice(b",\"since\":{\"offset\":");
            extract::push_u64(&mut req, since);
            req.extend_from_slice(b",\"epoch\":");
            extract::push_json_str(&mut req, epoch);
            req.push(b'}');
            sub.since = Some(since);
        }
        req.extend_from_slice(b"}}");
        sub.state = SubState::Subscribing;
        sub.subscribe_sent_ns = now_unix_ns();
        ws::encode_client_frame(&mut c.pending, ws::OP_TEXT, &req, key);
    }

    fn send_unsubscribe(&mut self, idx: usize, slot: u8) {
        let id = self.next_id(idx, Req::Unsubscribe(slot));
        let key = self.mask.next_key();
        let c = &mut self.conns[idx];
        let sub = &mut c.subs[slot as usize];
        let mut req = channel_request(id, "unsubscribe", &self.cfg.channels[sub.channel as usize]);
        req.extend_from_slice(b"}}");
        sub.state = SubState::Unsubscribing;
        ws::encode_client_frame(&mut c.pending, ws::OP_TEXT, &req, key);
    }

    fn on_text(&mut self, idx: usize, text: &[u8], now_ns: u64) -> Result<(), Stop> {
        match extract::parse_message(text) {
            Message::Broadcast(b) => {
                self.on_broadcast(idx, text, b, now_ns);
                Ok(())
            }
            Message::Response(r) => self.on_response(idx, r),
            Message::Other => Ok(()),
        }
    }

    fn on_broadcast(&mut self, idx: usize, text: &[u8], b: extract::Broadcast, now_ns: u64) {
        let channels = &self.cfg.channels;
        let c = &mut self.conns[idx];
        let slot = extract::broadcast_channel(text).and_then(|name| {
            c.subs
                .iter()
                .position(|s| channels[s.channel as usize].as_bytes() == name)
        });
        let Some(slot) = slot else {
            self.unexpected += 1;
            self.shared.error(format!(
                "broadcast for a channel this connection never subscribed to: {}",
                String::from_utf8_lossy(&text[..text.len().min(200)])
            ));
            return;
        };
        let sub = &mut c.subs[slot];
        if !matches!(sub.state, SubState::Live | SubState::Unsubscribing) {
            self.unexpected += 1;
            self.shared.error(format!(
                "broadcast (offset {}) on {} while not subscribed ({:?})",
                b.offset, channels[sub.channel as usize], sub.state
            ));
            return;
        }
        let l = &mut self.local;
        l.deliveries += 1;
        if b.seq != sub.seq.next_expected() {
            l.anomalies += 1;
        }
        sub.seq.observe(b.seq);
        if let Some(o) = sub.offsets.as_mut() {
            o.observe(b.offset);
            if o.high() == b.offset && b.sent_unix_ns > 0 {
                sub.floor_ns = b.sent_unix_ns;
            }
        }
        if b.offset != sub.seq_base + b.seq {
            self.mismatch += 1;
        }
        if b.offset < sub.live_from {
            l.replayed += 1;
        } else if b.sent_unix_ns > 0 {
            let lat = now_ns.saturating_sub(b.sent_unix_ns);
            hist::record(&mut self.hist, lat);
            l.interval_max_ns = l.interval_max_ns.max(lat);
        }
    }

    fn on_response(&mut self, idx: usize, r: extract::Response) -> Result<(), Stop> {
        let c = &mut self.conns[idx];
        let Some(id) = r.request_id else {
            return Err(Stop::Fail(format!(
                "response without a request id: error {:?}",
                r.error_code
            )));
        };
        let Some(pos) = c.requests.iter().position(|(i, _)| *i == id) else {
            return Ok(());
        };
        let (_, req) = c.requests.swap_remove(pos);
        match req {
            Req::Auth => match r.error_code {
                Some(code) => Err(Stop::Fail(format!("auth failed: {code} (check --secret)"))),
                None => Ok(()),
            },
            Req::Subscribe(slot) => self.on_subscribed(idx, slot as usize, r),
            Req::Unsubscribe(slot) => {
                if let Some(code) = r.error_code {
                    return Err(Stop::Fail(format!("unsubscribe failed: {code}")));
                }
                let sub = &mut c.subs[slot as usize];
                if sub.state == SubState::Unsubscribing {
                    sub.seq_closed.add(&sub.seq.counts());
                    sub.state = SubState::Off;
                    self.shared.live_subs.fetch_sub(1, Ordering::Relaxed);
                    self.shared.resubscribes.fetch_add(1, Ordering::Relaxed);
                    if !self.settling() {
                        let after = self.pause();
                        self.schedule(after, idx, Timer::Resubscribe(slot));
                    }
                }
                Ok(())
            }
        }
    }

    fn on_subscribed(&mut self, idx: usize, slot: usize, r: extract::Response) -> Result<(), Stop> {
        if let Some(code) = r.error_code {
            return Err(Stop::Fail(format!("subscribe failed: {code}")));
        }
        let top = r
            .offset
            .ok_or_else(|| Stop::Fail("subscribe result without offset".into()))?;
        let recovered = r.recovered == Some(true);
        let history_size = self.cfg.history_size;
        let ttl_ns = self.cfg.history_ttl.as_nanos() as u64;
        let name = &self.cfg.channels[self.conns[idx].subs[slot].channel as usize];
        let sub = &mut self.conns[idx].subs[slot];
        if sub.state != SubState::Subscribing {
            return Err(Stop::Fail(format!(
                "subscribe result for {name} in state {:?}",
                sub.state
            )));
        }
        match (sub.since, sub.offsets.as_mut()) {
            (Some(since), Some(off)) => {
                if recovered {
                    self.shared.recovered.fetch_add(1, Ordering::Relaxed);
                    sub.seq_base = since;
                } else {
                    let gap = top.saturating_sub(since);
                    let same_epoch = r.epoch.is_none() || r.epoch == sub.epoch;
                    let age_ns = now_unix_ns().saturating_sub(sub.floor_ns);
                    if history_cannot_hold(gap, age_ns, history_size, ttl_ns) && same_epoch {
                        // History could not hold the gap: allowed, the offsets move on.
                        self.shared.history_gaps.fetch_add(1, Ordering::Relaxed);
                        let skipped = off.skip_to(top + 1);
                        self.shared
                            .history_gap_offsets
                            .fetch_add(skipped, Ordering::Relaxed);
                    } else {
                        // The gap stays open in the offset checker: its offsets count as lost too.
                        self.shared.unrecovered.fetch_add(1, Ordering::Relaxed);
                        self.shared.error(format!(
                            "subscribe to {name} since offset {since} answered recovered: false \
                             (top offset {top}: {gap} missed, within --history-size {history_size}, \
                             the first at most {:.1} s old{})",
                            age_ns as f64 / 1e9,
                            if same_epoch { "" } else { "; the epoch changed" }
                        ));
                    }
                    sub.seq_base = top;
                    sub.floor_ns = sub.subscribe_sent_ns;
                }
            }
            _ => {
                sub.offsets = Some(SeqChecker::new(top + 1));
                sub.seq_base = top;
                sub.floor_ns = sub.subscribe_sent_ns;
            }
        }
        if r.epoch.is_some() {
            sub.epoch = r.epoch;
        }
        sub.seq = SeqChecker::new(1);
        sub.live_from = top + 1;
        sub.state = SubState::Live;
        sub.ever_live = true;
        self.shared.live_subs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn finish(mut self) -> SoakWorkerResult {
        let finals: Vec<u64> = self
            .shared
            .final_offsets
            .iter()
            .map(|o| o.load(Ordering::Relaxed))
            .collect();
        let mut r = SoakWorkerResult {
            hist: std::mem::replace(&mut self.hist, hist::new_histogram()),
            seq: Anomalies::default(),
            offsets: Anomalies::default(),
            seq_offset_mismatch: self.mismatch,
            unexpected: self.unexpected,
            pairs: 0,
            never_subscribed: 0,
            not_live_at_end: 0,
        };
        for c in &self.conns {
            for s in &c.subs {
                r.pairs += 1;
                if !s.ever_live {
                    r.never_subscribed += 1;
                    continue;
                }
                let last = finals.get(s.channel as usize).copied().unwrap_or(0);
                let mut seq = s.seq_closed;
                if matches!(s.state, SubState::Live | SubState::Unsubscribing) {
                    seq.add(&s.seq.finish(last.saturating_sub(s.seq_base)));
                } else {
                    r.not_live_at_end += 1;
                }
                r.seq.add(&seq);
                if let Some(o) = &s.offsets {
                    r.offsets.add(&o.finish(last));
                }
            }
        }
        // Close every socket now, while the worker still owns the registry.
        if let Some(poll) = self.poll.take() {
            for c in &mut self.conns {
                if let Some(mut s) = c.stream.take() {
                    let _ = poll.registry().deregister(&mut s);
                }
            }
        }
        r
    }
}

/// The soak's own figures, in the report (`soak` in the JSON summary).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SoakFigures {
    /// Seconds of churn with publishing.
    pub duration_s: f64,
    /// Seconds after which the RSS reference was taken.
    pub warmup_s: f64,
    /// Seconds the end took: every connection back, resubscribed and caught up.
    pub settle_s: f64,
    /// Connections.
    pub connections: u64,
    /// (connection, channel) pairs, each checked by offset across its whole life.
    pub subscriptions: u64,
    /// Most channels per connection.
    pub channels_per_conn_max: u64,
    /// Publisher threads.
    pub publishers: u64,
    /// Sessions (upgrades), the first of each connection included.
    pub sessions: u64,
    /// Sessions the load generator ended on purpose, then reconnected: connections cycled.
    pub cycled: u64,
    /// Of those, ended by a TCP drop with no close frame.
    pub abrupt_closes: u64,
    /// Unsubscribe + resubscribe cycles within a session.
    pub resubscribes: u64,
    /// Subscribes with `since` answered `recovered: true`.
    pub recovered: u64,
    /// Subscribes with `since` answered `recovered: false` where history should have held the gap.
    pub unrecovered: u64,
    /// `recovered: false` for gaps larger than `history_size` (allowed).
    pub history_gaps: u64,
    /// Offsets skipped over those gaps.
    pub history_gap_offsets: u64,
    /// The server history size the run assumed (--history-size).
    pub history_size: u64,
    /// Deliveries that were replays of missed publications.
    pub replayed: u64,
    /// Broadcasts for a channel the connection was not subscribed to at the time.
    pub unexpected_broadcasts: u64,
    /// Connections open, subscribed to all their channels and caught up at the end.
    pub settled: u64,
    /// Pairs whose subscribe never succeeded.
    pub never_subscribed: u64,
    /// Pairs not subscribed at the end.
    pub not_live_at_end: u64,
    /// Server RSS before the run, after the warm-up, at the end of the churn, its peak, and after
    /// every connection closed (bytes).
    pub rss_before_bytes: Option<u64>,
    /// RSS level after the warm-up: the median of the once-a-second samples over the
    /// `rss_window_s` seconds after it (one allocator step at the wrong second does not decide).
    pub rss_warm_bytes: Option<u64>,
    /// RSS level at the end of the churn: the median over its last `rss_window_s` seconds.
    pub rss_end_bytes: Option<u64>,
    /// The two windows' length, seconds (10% of the run, 5 s to 60 s).
    pub rss_window_s: f64,
    /// The single samples at the end of the warm-up and at the end of the churn.
    pub rss_warm_instant_bytes: Option<u64>,
    /// See `rss_warm_instant_bytes`.
    pub rss_end_instant_bytes: Option<u64>,
    /// (end - warm) / warm, percent.
    pub rss_change_pct: Option<f64>,
    /// The allowed change, percent either way.
    pub rss_tolerance_pct: f64,
    /// The allowed change in MiB, whatever the percentage.
    pub rss_slack_mib: f64,
    /// Highest RSS seen (sampled once a second).
    pub rss_peak_bytes: Option<u64>,
    /// RSS once every connection closed.
    pub rss_after_close_bytes: Option<u64>,
    /// Server file descriptors before the run.
    pub fd_before: Option<u64>,
    /// Highest count seen (sampled once a second).
    pub fd_peak: Option<u64>,
    /// With every connection open at the end.
    pub fd_open_end: Option<u64>,
    /// After every connection closed (must equal `fd_before`).
    pub fd_after: Option<u64>,
    /// How far the publishers fell behind their open-loop schedule at worst, seconds (more than
    /// a second: the server or the host is saturated).
    pub publishers_behind_max_s: f64,
    /// The server's gauges before the run.
    pub gauges_before: Gauges,
    /// What they should read with the end's connections open (before + what the load generator holds).
    pub gauges_open_expected: Gauges,
    /// What they read then.
    pub gauges_open: Option<Gauges>,
    /// What they read after everything closed (must equal `gauges_before`).
    pub gauges_after_close: Option<Gauges>,
}

fn progress(
    shared: &SoakShared,
    t0: Instant,
    last: &mut (Instant, u64),
    n: usize,
    pid: Option<u32>,
) -> String {
    let now = Instant::now();
    let d = shared.deliveries.load(Ordering::Relaxed);
    let rate = (d - last.1) as f64 / now.duration_since(last.0).as_secs_f64().max(1e-9);
    *last = (now, d);
    let max = shared.interval_max_ns.swap(0, Ordering::Relaxed);
    let server = pid
        .map(|p| {
            format!(
                " | server RSS {} fds {}",
                procstat::rss(p)
                    .map(|r| format!("{:.1} MiB", r as f64 / 1048576.0))
                    .unwrap_or_else(|_| "?".into()),
                procstat::fd_count(p)
                    .map(|f| f.to_string())
                    .unwrap_or_else(|_| "?".into())
            )
        })
        .unwrap_or_default();
    format!(
        "[{:7.1}s] open {}/{n} subs {} cycled {} resubs {} delivered {} ({:.1}k/s, replayed {}) max {} ms | anomalies {} failures {} unrecovered {} gaps {}{server}",
        now.duration_since(t0).as_secs_f64(),
        shared.open.load(Ordering::Relaxed),
        shared.live_subs.load(Ordering::Relaxed),
        shared.cycled.load(Ordering::Relaxed),
        shared.resubscribes.load(Ordering::Relaxed),
        d,
        rate / 1e3,
        shared.replayed.load(Ordering::Relaxed),
        hist::ms(max),
        shared.anomalies.load(Ordering::Relaxed),
        shared.failures.load(Ordering::Relaxed),
        shared.unrecovered.load(Ordering::Relaxed),
        shared.history_gaps.load(Ordering::Relaxed),
    )
}

/// Polls `probe` every 100 ms until it returns `Ok(true)` or `timeout` passes; returns the last
/// value seen and whether it matched.
fn poll_until<T>(
    timeout: Duration,
    mut probe: impl FnMut() -> (Option<T>, bool),
) -> (Option<T>, bool) {
    let deadline = Instant::now() + timeout;
    loop {
        let (v, ok) = probe();
        if ok || Instant::now() >= deadline {
            return (v, ok);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs the soak scenario (see the module documentation and `soak --help`).
pub fn run(a: &SoakArgs) -> Result<Report, SetupError> {
    let common = &a.common;
    if common.server.len() != 1 {
        return Err("soak runs against one server: give one --server".into());
    }
    if common.server_pid.len() > 1 {
        return Err("soak checks one server: give one --server-pid".into());
    }
    if a.connections == 0 || a.channels == 0 {
        return Err("--connections and --channels must be at least 1".into());
    }
    if a.rate <= 0.0 || !a.rate.is_finite() {
        return Err("--rate must be above 0: the soak publishes at a fixed rate".into());
    }
    if a.duration.is_zero() {
        return Err("--duration must be above 0".into());
    }
    let n = a.connections;
    let publishers = a.publishers.clamp(1, a.channels);
    let env = scenario::prepare(common, n + publishers + 8, a.via == Via::Rest)?;
    let plan = scenario::source_plan(common, &env, n + publishers);
    let channels = scenario::channel_names(&env.prefix, "soak", a.channels);
    let pid = common.server_pid.first().copied();
    let metrics_node = env.rest_nodes[0].clone();
    let fill = history_fill_time(a.history_size, a.history_ttl, a.rate / a.channels as f64);
    let warmup = a
        .warmup
        .unwrap_or_else(|| default_warmup(a.duration, fill))
        .min(a.duration);
    if fill > warmup && pid.is_some() && !common.quiet {
        eprintln!(
            "soak: WARNING the server's history (--history-size {}, --history-ttl {} s) fills in {:.0} s, \
             after the {:.0} s warm-up: its growth counts in the RSS check. Run the server with a \
             shorter BROADCASTER_HISTORY_TTL (and --history-ttl), or a longer --duration.",
            a.history_size,
            a.history_ttl.as_secs_f64(),
            fill.as_secs_f64(),
            warmup.as_secs_f64()
        );
    }
    let settle_timeout = Duration::from_secs_f64(a.settle_timeout.max(1.0));

    // Baselines, before the first connection.
    let fd_before = match pid {
        Some(p) => Some(
            procstat::fd_count(p)
                .map_err(|e| format!("reading /proc/{p}/fd (--server-pid): {e}"))?,
        ),
        None => None,
    };
    let rss_before = pid.and_then(|p| procstat::rss(p).ok());
    let gauges_before = metrics::scrape(&metrics_node)
        .map_err(|e| format!("the soak checks the server's gauges, but: {e}"))?;
    if !common.quiet {
        if pid.is_none() {
            eprintln!("soak: no --server-pid: the RSS and file-descriptor checks are skipped");
        }
        eprintln!(
            "soak: {n} connections over {} channels (1-{} each), {} msg/s from {publishers} publishers, \
             sessions ~{} s, pauses up to {} s, for {:.0} s (RSS reference after {:.0} s); \
             server gauges before: {} connections, {} subscriptions",
            a.channels,
            a.channels_per_conn.clamp(1, a.channels),
            a.rate,
            a.session,
            a.pause,
            a.duration.as_secs_f64(),
            warmup.as_secs_f64(),
            gauges_before.connections_active,
            gauges_before.subscriptions_total
        );
    }

    let seed = crate::schedule::now_unix_ns() ^ std::process::id() as u64;
    let specs: Vec<ConnSpec> = plan_channels(n, a.channels, a.channels_per_conn, seed)
        .into_iter()
        .enumerate()
        .map(|(i, channels)| ConnSpec {
            channels,
            source: plan.for_conn(i),
        })
        .collect();
    let pairs: u64 = specs.iter().map(|s| s.channels.len() as u64).sum();
    let threads = env.threads.max(1);
    let shared = Arc::new(SoakShared::new(a.channels, threads));
    let cfg = SoakConfig {
        node: env.nodes[0].clone(),
        token: env.token.clone(),
        channels: channels.clone(),
        concurrency: common.concurrency.max(1),
        session: Duration::from_secs_f64(a.session.max(0.01)),
        pause: Duration::from_secs_f64(a.pause.max(0.0)),
        resubscribe: a.resubscribe.clamp(0.0, 1.0),
        abrupt: a.abrupt.clamp(0.0, 1.0),
        history_size: a.history_size,
        history_ttl: a.history_ttl,
    };
    let mut per: Vec<Vec<ConnSpec>> = vec![Vec::new(); threads];
    for (i, s) in specs.into_iter().enumerate() {
        per[i % threads].push(s);
    }
    let window = scenario::window_start(&common.server_pid);
    let t0 = window.t0;
    let workers: Vec<_> = per
        .into_iter()
        .enumerate()
        .map(|(t, specs)| {
            let (cfg, shared) = (cfg.clone(), shared.clone());
            let cpu = (!common.cpus.is_empty()).then(|| common.cpus[t % common.cpus.len()]);
            std::thread::Builder::new()
                .name(format!("lt-soak-{t}"))
                .spawn(move || {
                    if let Some(c) = cpu {
                        let _ = procstat::pin_current_thread(c);
                    }
                    run_worker(cfg, specs, shared, t)
                })
                .expect("spawning a thread")
        })
        .collect();

    // Publishers: each takes every `publishers`-th channel and its share of the rate.
    let pub_shared = Arc::new(Shared::default());
    let mut pub_threads = Vec::new();
    for p in 0..publishers {
        let idxs: Vec<usize> = (p..a.channels).step_by(publishers).collect();
        let pcfg = PublisherConfig {
            rest_nodes: env.rest_nodes.clone(),
            ws_nodes: env.nodes.to_vec(),
            publish_all: false,
            via: a.via,
            api_key: env.api_key.clone(),
            token: env.token.clone(),
            channels: Arc::new(idxs.iter().map(|&i| channels[i].clone()).collect()),
            rate: a.rate * idxs.len() as f64 / a.channels as f64,
            count: None,
            duration: Some(a.duration),
            window: 1,
            pipeline: 1,
            deliveries_per_publication: 1,
            payload_bytes: common.payload_bytes,
            source: plan.for_conn(n + p),
        };
        let ps = pub_shared.clone();
        let pin = common.cpus.last().copied();
        pub_threads.push(
            std::thread::Builder::new()
                .name(format!("lt-publish-{p}"))
                .spawn(move || {
                    if let Some(c) = pin {
                        let _ = procstat::pin_current_thread(c);
                    }
                    (idxs, publisher::run(&pcfg, &ps))
                })
                .map_err(|e| e.to_string())?,
        );
    }

    // The churn.
    let end_at = t0 + a.duration;
    let warm_at = t0 + warmup;
    let mut rss_warm = None;
    let mut rss_samples: Vec<(f64, u64)> = Vec::new();
    let mut rss_peak = rss_before;
    let mut fd_peak = fd_before;
    let mut last = (t0, 0u64);
    let mut next_line = t0 + Duration::from_secs(1);
    let sample_peaks =
        |rss_peak: &mut Option<u64>, fd_peak: &mut Option<u64>, samples: &mut Vec<(f64, u64)>| {
            if let Some(p) = pid {
                if let Ok(r) = procstat::rss(p) {
                    *rss_peak = Some(rss_peak.unwrap_or(0).max(r));
                    samples.push((t0.elapsed().as_secs_f64(), r));
                }
                if let Ok(f) = procstat::fd_count(p) {
                    *fd_peak = Some(fd_peak.unwrap_or(0).max(f));
                }
            }
        };
    loop {
        let now = Instant::now();
        if now >= end_at {
            break;
        }
        if rss_warm.is_none() && now >= warm_at {
            rss_warm = pid.and_then(|p| procstat::rss(p).ok());
            if !common.quiet {
                if let Some(r) = rss_warm {
                    eprintln!(
                        "soak: warm-up over, server RSS {:.1} MiB (the reference is the median of \
                         the next {:.0} s)",
                        r as f64 / 1048576.0,
                        rss_window(a.duration).as_secs_f64()
                    );
                }
            }
        }
        if now >= next_line {
            sample_peaks(&mut rss_peak, &mut fd_peak, &mut rss_samples);
            if !common.quiet {
                eprintln!("{}", progress(&shared, t0, &mut last, n, pid));
            }
            next_line += Duration::from_secs(1);
        }
        std::thread::sleep(
            Duration::from_millis(50).min(end_at.saturating_duration_since(Instant::now())),
        );
    }
    sample_peaks(&mut rss_peak, &mut fd_peak, &mut rss_samples);
    let rss_end_instant = rss_samples.last().map(|&(_, r)| r);
    let rss_warm_instant = rss_warm.or(rss_end_instant);
    // Levels, not single samples: the allocator moves RSS in ~2 MiB steps at any second.
    let rss_win = rss_window(a.duration);
    let (w0, d) = (warmup.as_secs_f64(), a.duration.as_secs_f64());
    let w = rss_win.as_secs_f64();
    let rss_warm = rss_level(&rss_samples, w0, (w0 + w).min(d)).or(rss_warm_instant);
    let rss_end = rss_level(&rss_samples, (d - w).max(w0), d + 1.0).or(rss_end_instant);

    // Publishing ends on its own schedule; collect the last offsets.
    let mut pres = PublishResult {
        last_offsets: vec![0; a.channels],
        counts: vec![0; a.channels],
        ..Default::default()
    };
    for h in pub_threads {
        let (idxs, r) = h
            .join()
            .map_err(|_| "a publisher thread panicked".to_string())?;
        pres.published += r.published;
        pres.errors += r.errors;
        for (j, &i) in idxs.iter().enumerate() {
            pres.last_offsets[i] = r.last_offsets.get(j).copied().unwrap_or(0);
            pres.counts[i] = r.counts.get(j).copied().unwrap_or(0);
        }
        pres.elapsed_s = pres.elapsed_s.max(r.elapsed_s);
        pres.max_behind_ms = pres.max_behind_ms.max(r.max_behind_ms);
        pres.rtt_p50_us = pres.rtt_p50_us.max(r.rtt_p50_us);
        pres.rtt_max_us = pres.rtt_max_us.max(r.rtt_max_us);
    }

    // Settle: everyone back, resubscribed, caught up to the last offsets.
    for (i, o) in pres.last_offsets.iter().enumerate() {
        shared.final_offsets[i].store(*o, Ordering::Relaxed);
    }
    shared.settle.store(true, Ordering::Relaxed);
    let settle_t0 = Instant::now();
    let mut next_line = settle_t0 + Duration::from_secs(1);
    while (shared.settled_total() as usize) < n && settle_t0.elapsed() < settle_timeout {
        std::thread::sleep(Duration::from_millis(20));
        if Instant::now() >= next_line && !common.quiet {
            eprintln!(
                "{} | settling: {}/{n} caught up",
                progress(&shared, t0, &mut last, n, pid),
                shared.settled_total()
            );
            next_line += Duration::from_secs(1);
        }
    }
    let settle_s = settle_t0.elapsed().as_secs_f64();
    let settled = shared.settled_total();
    let end = scenario::window_end(&window, &common.server_pid);
    if !common.quiet {
        eprintln!("{}", progress(&shared, t0, &mut last, n, pid));
    }

    // With everything open: the server's gauges must count exactly what we hold.
    let gauge_timeout = settle_timeout.min(Duration::from_secs(15));
    let mut expected_open = gauges_before;
    let (gauges_open, gauges_open_ok) = poll_until(gauge_timeout, || {
        expected_open = Gauges {
            connections_active: gauges_before.connections_active
                + shared.open.load(Ordering::Relaxed),
            subscriptions_total: gauges_before.subscriptions_total
                + shared.live_subs.load(Ordering::Relaxed),
        };
        match metrics::scrape(&metrics_node) {
            Ok(g) => (Some(g), g == expected_open),
            Err(e) => {
                shared.error(format!("/metrics: {e}"));
                (None, false)
            }
        }
    });
    let fd_open_end = pid.and_then(|p| procstat::fd_count(p).ok());
    if let Some(f) = fd_open_end {
        fd_peak = Some(fd_peak.unwrap_or(0).max(f));
    }

    // Close everything.
    shared.stop.store(true, Ordering::Relaxed);
    let results: Vec<SoakWorkerResult> =
        workers.into_iter().filter_map(|h| h.join().ok()).collect();
    let (gauges_after, gauges_after_ok) =
        poll_until(settle_timeout, || match metrics::scrape(&metrics_node) {
            Ok(g) => (Some(g), g == gauges_before),
            Err(e) => {
                shared.error(format!("/metrics: {e}"));
                (None, false)
            }
        });
    let (fd_after, fd_ok) = match (pid, fd_before) {
        (Some(p), Some(before)) => poll_until(settle_timeout, || {
            let f = procstat::fd_count(p).ok();
            (f, f == Some(before))
        }),
        _ => (None, true),
    };
    let rss_after_close = pid.and_then(|p| procstat::rss(p).ok());
    if !common.quiet {
        eprintln!(
            "soak: closed; server gauges {} connections {} subscriptions{}",
            gauges_after.map(|g| g.connections_active).unwrap_or(-1),
            gauges_after.map(|g| g.subscriptions_total).unwrap_or(-1),
            fd_after.map(|f| format!(", {f} fds")).unwrap_or_default()
        );
    }

    // Merge and judge.
    let mut h = hist::new_histogram();
    let mut seq = Anomalies::default();
    let mut offsets = Anomalies::default();
    let (mut mismatch, mut unexpected, mut never, mut not_live) = (0, 0, 0, 0);
    for r in &results {
        let _ = h.add(&r.hist);
        seq.add(&r.seq);
        offsets.add(&r.offsets);
        mismatch += r.seq_offset_mismatch;
        unexpected += r.unexpected;
        never += r.never_subscribed;
        not_live += r.not_live_at_end;
    }
    let mut report = Report::new("soak", common, &env.nodes);
    report.connections = n as u64;
    report.channels = a.channels as u64;
    report.subscribers_per_channel = pairs / a.channels as u64;
    report.loadgen_threads = threads as u64;
    report.open_files_limit = env.nofile;
    report.source_addresses = plan.addrs().len() as u64;
    report.rate = a.rate;
    report.via = Some(a.via);
    report.deliveries = shared.deliveries.load(Ordering::Relaxed);
    report.expected_deliveries = report.deliveries;
    report.measured_s = end.elapsed.as_secs_f64();
    report.deliveries_per_s = report.deliveries as f64 / end.elapsed.as_secs_f64().max(1e-9);
    report.latency = hist::percentiles(&h);
    report.histogram = Some(h);
    report.seq = seq;
    report.offsets = offsets;
    report.seq_offset_mismatch = mismatch;
    report.unrecovered = shared.unrecovered.load(Ordering::Relaxed);
    report.reconnects = shared.cycled.load(Ordering::Relaxed);
    report.connection_failures = shared.failures.load(Ordering::Relaxed);
    let mut errors = shared.errors.lock().map(|e| e.clone()).unwrap_or_default();
    errors.extend(
        pub_shared
            .errors
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default(),
    );
    report.errors = errors;
    report.loadgen_cpu_s = end.self_cpu.as_secs_f64();
    report.loadgen_cpu_sys_fraction =
        end.self_sys.as_secs_f64() / end.self_cpu.as_secs_f64().max(1e-9);
    report.loadgen_cpu_us_per_delivery =
        end.self_cpu.as_secs_f64() * 1e6 / report.deliveries.max(1) as f64;
    report.loadgen_rss_bytes = procstat::self_rss();
    if let Some(cpu) = end.server_cpu_ns {
        report.server_cpu_s = Some(cpu as f64 / 1e9);
        report.server_cpu_us_per_delivery =
            Some(cpu as f64 / 1e3 / report.deliveries.max(1) as f64);
    }
    if let (Some(sys), Some(b), Some(e)) = (end.server_sys_ns, end.server_before, end.server_after)
    {
        let ticks = e.cpu_ticks_ns.saturating_sub(b.cpu_ticks_ns);
        report.server_cpu_sys_fraction = (ticks > 0).then(|| sys as f64 / ticks as f64);
    }
    report.server_rss_before_bytes = rss_warm;
    report.server_rss_after_bytes = rss_end;
    let rss_change = match (rss_warm, rss_end) {
        (Some(w), Some(e)) => Some(rss_change_pct(w, e)),
        _ => None,
    };

    if pres.errors > 0 {
        report.fail(format!("{} publications failed", pres.errors));
    }
    if pres.published == 0 {
        report.fail("nothing was published".into());
    } else if report.deliveries == 0 {
        report.fail("nothing was delivered".into());
    }
    if (settled as usize) < n {
        report.fail(format!(
            "only {settled} of {n} connections were back, subscribed and caught up {:.0} s after publishing ended",
            settle_timeout.as_secs_f64()
        ));
    }
    if unexpected > 0 {
        report.fail(format!(
            "{unexpected} broadcasts arrived for a channel the connection was not subscribed to"
        ));
    }
    if never > 0 {
        report.fail(format!(
            "{never} (connection, channel) pairs never subscribed"
        ));
    }
    if !gauges_open_ok {
        report.fail(format!(
            "server gauges with {} connections open: connections_active / subscriptions_total {} / {}, expected {} / {}",
            expected_open.connections_active - gauges_before.connections_active,
            gauges_open.map(|g| g.connections_active.to_string()).unwrap_or_else(|| "?".into()),
            gauges_open.map(|g| g.subscriptions_total.to_string()).unwrap_or_else(|| "?".into()),
            expected_open.connections_active,
            expected_open.subscriptions_total
        ));
    }
    if !gauges_after_ok {
        report.fail(format!(
            "server gauges after every connection closed: connections_active / subscriptions_total {} / {}, expected {} / {} (the pre-run values) within {:.0} s",
            gauges_after.map(|g| g.connections_active.to_string()).unwrap_or_else(|| "?".into()),
            gauges_after.map(|g| g.subscriptions_total.to_string()).unwrap_or_else(|| "?".into()),
            gauges_before.connections_active,
            gauges_before.subscriptions_total,
            settle_timeout.as_secs_f64()
        ));
    }
    if !fd_ok {
        report.fail(format!(
            "server file descriptors LEAKED: {} before the run, {} after every connection closed",
            fd_before.unwrap_or(0),
            fd_after
                .map(|f| f.to_string())
                .unwrap_or_else(|| "?".into())
        ));
    }
    if let (Some(c), Some(w), Some(e)) = (rss_change, rss_warm, rss_end) {
        if !rss_within(w, e, a.rss_tolerance, a.rss_slack_mib) {
            report.fail(format!(
                "server RSS moved {c:+.1}% from the warm-up ({:.1} MiB) to the end ({:.1} MiB), \
                 more than ±{}% and more than {} MiB",
                w as f64 / 1048576.0,
                e as f64 / 1048576.0,
                a.rss_tolerance,
                a.rss_slack_mib
            ));
        }
    }
    let behind_s = pres.max_behind_ms / 1e3;
    report.publish = Some(pres);
    report.soak = Some(SoakFigures {
        publishers_behind_max_s: behind_s,
        duration_s: a.duration.as_secs_f64(),
        warmup_s: warmup.as_secs_f64(),
        settle_s,
        connections: n as u64,
        subscriptions: pairs,
        channels_per_conn_max: a.channels_per_conn.clamp(1, a.channels) as u64,
        publishers: publishers as u64,
        sessions: shared.sessions.load(Ordering::Relaxed),
        cycled: shared.cycled.load(Ordering::Relaxed),
        abrupt_closes: shared.abrupt.load(Ordering::Relaxed),
        resubscribes: shared.resubscribes.load(Ordering::Relaxed),
        recovered: shared.recovered.load(Ordering::Relaxed),
        unrecovered: shared.unrecovered.load(Ordering::Relaxed),
        history_gaps: shared.history_gaps.load(Ordering::Relaxed),
        history_gap_offsets: shared.history_gap_offsets.load(Ordering::Relaxed),
        history_size: a.history_size,
        replayed: shared.replayed.load(Ordering::Relaxed),
        unexpected_broadcasts: unexpected,
        settled,
        never_subscribed: never,
        not_live_at_end: not_live,
        rss_before_bytes: rss_before,
        rss_warm_bytes: rss_warm,
        rss_end_bytes: rss_end,
        rss_window_s: rss_win.as_secs_f64(),
        rss_warm_instant_bytes: rss_warm_instant,
        rss_end_instant_bytes: rss_end_instant,
        rss_change_pct: rss_change,
        rss_tolerance_pct: a.rss_tolerance,
        rss_slack_mib: a.rss_slack_mib,
        rss_peak_bytes: rss_peak,
        rss_after_close_bytes: rss_after_close,
        fd_before,
        fd_peak,
        fd_open_end,
        fd_after,
        gauges_before,
        gauges_open_expected: expected_open,
        gauges_open,
        gauges_after_close: gauges_after,
    });
    report.finish();
    Ok(report)
}

/// `{"id":ID,"method":METHOD,"params":{"channel":CHANNEL` — the caller adds the rest and closes it.
fn channel_request(id: u64, method: &str, channel: &str) -> Vec<u8> {
    let mut req = Vec::with_capacity(256);
    req.extend_from_slice(b"{\"id\":");
    extract::push_u64(&mut req, id);
    req.extend_from_slice(b",\"method\":\"");
    req.extend_from_slice(method.as_bytes());
    req.extend_from_slice(b"\",\"params\":{\"channel\":");
    extract::push_json_str(&mut req, channel);
    req
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_plan_is_distinct_bounded_and_spread() {
        let plan = plan_channels(8000, 8, 3, 42);
        assert_eq!(plan.len(), 8000);
        let mut per_channel = [0u32; 8];
        let mut sizes = [0u32; 4];
        for chans in &plan {
            assert!((1..=3).contains(&chans.len()));
            sizes[chans.len()] += 1;
            let mut sorted = chans.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(sorted.len(), chans.len(), "distinct: {chans:?}");
            for &c in chans {
                assert!(c < 8);
                per_channel[c as usize] += 1;
            }
        }
        // Every size and every channel is well represented.
        for s in &sizes[1..] {
            assert!(*s > 2000, "{sizes:?}");
        }
        let mean = per_channel.iter().sum::<u32>() / 8;
        for p in per_channel {
            assert!(p > mean * 8 / 10 && p < mean * 12 / 10, "{per_channel:?}");
        }
        // More channels per connection than channels: capped.
        assert!(plan_channels(10, 2, 5, 1).iter().all(|c| c.len() <= 2));
    }

    #[test]
    fn rng_is_uniform_enough() {
        let mut r = Rng::new(3);
        let n = 100_000;
        let mean = (0..n).map(|_| r.unit()).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
        assert!((0..1000).all(|_| r.below(7) < 7));
        assert_eq!(r.below(0), 0);
    }

    #[test]
    fn rss_levels_are_window_medians() {
        let m = 1u64 << 20;
        // Flat at 40 MiB with one 2 MiB step in the last second: the level does not move.
        let mut s: Vec<(f64, u64)> = (0..60).map(|t| (t as f64, 40 * m)).collect();
        s.push((60.0, 42 * m));
        assert_eq!(rss_level(&s, 10.0, 16.0), Some(40 * m));
        assert_eq!(rss_level(&s, 54.0, 61.0), Some(40 * m));
        // Steady growth moves it.
        let g: Vec<(f64, u64)> = (0..60).map(|t| (t as f64, (40 + t / 6) * m)).collect();
        assert_eq!(rss_level(&g, 54.0, 61.0), Some(49 * m));
        assert_eq!(rss_level(&g, 100.0, 110.0), None);
        assert_eq!(rss_window(Duration::from_secs(60)), Duration::from_secs(6));
        assert_eq!(rss_window(Duration::from_secs(20)), Duration::from_secs(5));
        assert_eq!(
            rss_window(Duration::from_secs(1800)),
            Duration::from_secs(60)
        );
    }

    #[test]
    fn history_judgement() {
        let s = 1_000_000_000;
        // Within size and TTL: history should have held it.
        assert!(!history_cannot_hold(50, 2 * s, 100, 10 * s));
        // Too many missed, or possibly expired.
        assert!(history_cannot_hold(101, 2 * s, 100, 10 * s));
        assert!(history_cannot_hold(50, 10 * s, 100, 10 * s));
    }

    #[test]
    fn warmup_and_rss_change() {
        let secs = Duration::from_secs;
        // 12.5 msg/s per channel: 10,000 take 800 s, the 300 s TTL comes first; a 10 s TTL fills in 10 s.
        assert_eq!(history_fill_time(10_000, secs(300), 12.5), secs(300));
        assert_eq!(history_fill_time(10_000, secs(10), 12.5), secs(10));
        assert_eq!(history_fill_time(100, secs(300), 12.5), secs(8));
        assert_eq!(history_fill_time(100, secs(300), 0.0), secs(300));
        assert_eq!(default_warmup(secs(60), secs(10)), secs(12));
        assert_eq!(
            default_warmup(secs(60), secs(300)),
            secs(30),
            "at most half the run"
        );
        assert_eq!(default_warmup(secs(20), secs(5)), secs(10));
        assert_eq!(default_warmup(secs(10), secs(1)), secs(5));
        assert_eq!(default_warmup(secs(1800), secs(300)), secs(360));
        assert_eq!(default_warmup(secs(3600), secs(400)), secs(402));
        assert!((rss_change_pct(100, 104) - 4.0).abs() < 1e-9);
        let mib = 1 << 20;
        assert!(rss_within(100 * mib, 104 * mib, 5.0, 2.0));
        assert!(rss_within(100 * mib, 96 * mib, 5.0, 2.0));
        assert!(!rss_within(100 * mib, 106 * mib, 5.0, 2.0));
        assert!(!rss_within(100 * mib, 94 * mib, 5.0, 2.0));
        // A 30 MiB server one 2 MiB allocator step up: 6.7%, within the slack.
        assert!(rss_within(30 * mib, 32 * mib, 5.0, 2.0));
        assert!(!rss_within(30 * mib, 33 * mib, 5.0, 2.0));
        assert!((rss_change_pct(100, 90) + 10.0).abs() < 1e-9);
    }
}
