//! The `soak` scenario's connections: each cycles connect → upgrade → `auth` + `subscribe` (one to a
//! few channels, with `since` once it has seen the channel) → receive for a random while (sometimes
//! unsubscribing from a channel and subscribing again with `since`) → close (the WebSocket closing
//! handshake, or a plain TCP drop) → a random pause → reconnect, until the run settles.
//!
//! Every (connection, channel) pair keeps one offset checker for its whole life, across reconnects
//! and resubscribes, so a message lost or reordered anywhere in the churn shows; `seq` is checked per
//! subscription and `offset == base + seq` per broadcast. At the end the workers stop churning
//! ("settle"): every connection comes back, resubscribes with `since`, and must catch up to the last
//! offset published on each of its channels. [`super::run`] drives the run and checks the server's
//! RSS, gauges and descriptors.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io::{ErrorKind, Write};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::{Events, Interest, Poll, Token};

use super::plan::{history_cannot_hold, Rng};
use crate::checker::{Anomalies, SeqChecker};
use crate::extract::{self, Message};
use crate::hist;
use crate::net::Node;
use crate::recv::{self, End, Inbound, Receiver};
use crate::schedule::now_unix_ns;
use crate::ws;

/// How long the server has to answer our close frame (generous: an overloaded host delays it).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(20);
/// Shortest wait before reconnecting after a failure (no hot loop against a refusing server).
const RETRY_MIN: Duration = Duration::from_millis(100);

/// State shared by the soak workers and the main thread.
pub(crate) struct SoakShared {
    /// End the run: workers return their results.
    pub(crate) stop: AtomicBool,
    /// Stop churning: every connection reconnects and resubscribes now and catches up to
    /// [`SoakShared::final_offsets`].
    pub(crate) settle: AtomicBool,
    /// Per channel, the last offset published (set before `settle`).
    pub(crate) final_offsets: Vec<AtomicU64>,
    /// Per worker, its connections that are open, subscribed to all their channels and caught up
    /// (counted while settling).
    pub(crate) settled: Vec<AtomicU64>,
    /// WebSocket connections open now (upgraded, not yet closed by either side).
    pub(crate) open: AtomicI64,
    /// Subscriptions confirmed by the server and not yet ended.
    pub(crate) live_subs: AtomicI64,
    /// Connections that completed the upgrade (each session once).
    pub(crate) sessions: AtomicU64,
    /// Sessions the client ended on purpose (close handshake or drop).
    pub(crate) cycled: AtomicU64,
    /// Of those, dropped with no close frame.
    pub(crate) abrupt: AtomicU64,
    /// Unsubscribe + resubscribe cycles within a session.
    pub(crate) resubscribes: AtomicU64,
    /// Subscribes with `since` answered `recovered: true`.
    pub(crate) recovered: AtomicU64,
    /// Subscribes with `since` answered `recovered: false` although history should have held the gap.
    pub(crate) unrecovered: AtomicU64,
    /// Subscribes with `since` answered `recovered: false` for a gap larger than the history size
    /// (allowed; the offsets skipped are in `history_gap_offsets`).
    pub(crate) history_gaps: AtomicU64,
    /// Offsets skipped over allowed history gaps.
    pub(crate) history_gap_offsets: AtomicU64,
    /// Broadcasts received (replays included).
    pub(crate) deliveries: AtomicU64,
    /// Of those, publications replayed by a recovery.
    pub(crate) replayed: AtomicU64,
    /// Broadcasts whose seq was not the expected one (progress line).
    pub(crate) anomalies: AtomicU64,
    /// Connection failures: refused or failed connects and upgrades, server-side closes, request
    /// errors, close handshakes the server did not answer.
    pub(crate) failures: AtomicU64,
    /// Largest live latency since the progress line last read it, ns.
    pub(crate) interval_max_ns: AtomicU64,
    /// First error messages.
    pub(crate) errors: Mutex<Vec<String>>,
}

impl SoakShared {
    /// State for `channels` channels and `workers` worker threads.
    pub(crate) fn new(channels: usize, workers: usize) -> Self {
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
    pub(crate) fn error(&self, msg: String) {
        if let Ok(mut e) = self.errors.lock() {
            if e.len() < 20 {
                e.push(msg);
            }
        }
    }

    /// Connections settled, all workers.
    pub(crate) fn settled_total(&self) -> u64 {
        self.settled.iter().map(|s| s.load(Ordering::Relaxed)).sum()
    }
}

/// What every soak connection needs to know.
#[derive(Clone)]
pub(crate) struct SoakConfig {
    /// The server.
    pub(crate) node: Node,
    /// The client token.
    pub(crate) token: String,
    /// Channel names.
    pub(crate) channels: Arc<Vec<String>>,
    /// Initial connects in flight per worker, at most.
    pub(crate) concurrency: usize,
    /// Mean session length (each uniform in 0.5x..1.5x).
    pub(crate) session: Duration,
    /// Longest pause between sessions, and between an unsubscribe and the resubscribe.
    pub(crate) pause: Duration,
    /// Share of sessions with an unsubscribe/resubscribe.
    pub(crate) resubscribe: f64,
    /// Share of sessions ended by a TCP drop.
    pub(crate) abrupt: f64,
    /// The server's history size: a larger gap may be unrecoverable.
    pub(crate) history_size: u64,
    /// The server's history TTL: a publication older than this may be gone.
    pub(crate) history_ttl: Duration,
}

/// One connection to create: its channels (indices, distinct) and source address.
#[derive(Debug, Clone)]
pub(crate) struct ConnSpec {
    /// Channel indices, fixed for the connection's life.
    pub(crate) channels: Vec<u32>,
    /// Source address to bind.
    pub(crate) source: Option<Ipv4Addr>,
    /// A token of the connection's own (a presence user's); None: the run's.
    pub(crate) token: Option<Arc<str>>,
}

/// What one worker hands back.
pub(crate) struct SoakWorkerResult {
    /// Live (not replayed) delivery latency, ns.
    pub(crate) hist: Histogram<u64>,
    /// By seq, per subscription, all subscriptions.
    pub(crate) seq: Anomalies,
    /// By offset, per (connection, channel) across its whole life, tail up to the final offsets.
    pub(crate) offsets: Anomalies,
    /// Broadcasts whose offset was not the subscription's base + seq.
    pub(crate) seq_offset_mismatch: u64,
    /// Broadcasts for a channel the connection was not subscribed to at that moment.
    pub(crate) unexpected: u64,
    /// (connection, channel) pairs.
    pub(crate) pairs: u64,
    /// Pairs whose subscribe never succeeded.
    pub(crate) never_subscribed: u64,
    /// Pairs not live at the end (their tails count as lost).
    pub(crate) not_live_at_end: u64,
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

impl Sub {
    /// The subscribe with `since` answered `recovered: false`, the channel at offset `top`. That is
    /// allowed when history could not have held the gap, and the offsets move on; otherwise it is a
    /// failure, and the gap stays open in the offset checker, so its offsets count as lost too.
    fn not_recovered(
        &mut self,
        since: u64,
        top: u64,
        epoch: &Option<String>,
        cfg: &SoakConfig,
        shared: &SoakShared,
    ) {
        let gap = top.saturating_sub(since);
        let same_epoch = epoch.is_none() || *epoch == self.epoch;
        let age_ns = now_unix_ns().saturating_sub(self.floor_ns);
        let ttl_ns = cfg.history_ttl.as_nanos() as u64;
        if history_cannot_hold(gap, age_ns, cfg.history_size, ttl_ns) && same_epoch {
            shared.history_gaps.fetch_add(1, Ordering::Relaxed);
            let skipped = self.offsets.as_mut().map_or(0, |o| o.skip_to(top + 1));
            shared
                .history_gap_offsets
                .fetch_add(skipped, Ordering::Relaxed);
        } else {
            shared.unrecovered.fetch_add(1, Ordering::Relaxed);
            shared.error(format!(
                "subscribe to {} since offset {since} answered recovered: false \
                 (top offset {top}: {gap} missed, within --history-size {}, \
                 the first at most {:.1} s old{})",
                cfg.channels[self.channel as usize],
                cfg.history_size,
                age_ns as f64 / 1e9,
                if same_epoch {
                    ""
                } else {
                    "; the epoch changed"
                }
            ));
        }
        self.seq_base = top;
        self.floor_ns = self.subscribe_sent_ns;
    }
}

struct Conn {
    subs: Vec<Sub>,
    source: Option<Ipv4Addr>,
    token: Option<Arc<str>>,
    stream: Option<mio::net::TcpStream>,
    phase: Phase,
    inbound: Inbound,
    pending: Vec<u8>,
    requests: Vec<(u64, Req)>,
    next_id: u64,
    /// Bumped whenever the connection closes: timers of an older generation are stale.
    gen: u32,
    /// Holds a ramp slot (first connect in progress).
    ramping: bool,
    /// After a failure, no reconnect before this (also while settling).
    retry_at: Instant,
}

#[derive(Default)]
struct Local {
    deliveries: u64,
    replayed: u64,
    anomalies: u64,
    interval_max_ns: u64,
}

/// Runs one soak worker until `shared.stop`.
pub(crate) fn run_worker(
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
                token: s.token,
                stream: None,
                phase: Phase::Idle,
                inbound: Inbound::default(),
                pending: Vec::new(),
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
            rbuf: vec![0; recv::READ_BUF_BYTES],
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
        c.inbound.clear();
        c.pending.clear();
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
        c.inbound.clear();
        c.pending.clear();
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
        let result = recv::read_ready(self, idx, |w| {
            if !w.conns[idx].pending.is_empty() {
                w.flush(poll, idx);
            }
        });
        let phase = self.conns[idx].phase;
        match result {
            Ok(()) => {}
            Err(End::Closed) => self.closed(poll, idx),
            Err(End::Eof) => self.fail(
                poll,
                idx,
                format!("server closed the connection (phase {phase:?})"),
            ),
            Err(End::ReadFailed(e)) => {
                self.fail(poll, idx, format!("read failed ({phase:?}): {e}"))
            }
            Err(End::Failed(msg)) => self.fail(poll, idx, msg),
        }
    }

    /// The close handshake completed: the session is over, reconnect after a pause.
    fn closed(&mut self, poll: &Poll, idx: usize) {
        self.drop_conn(poll, idx);
        let after = self.pause();
        self.schedule(after, idx, Timer::Reconnect);
    }

    fn next_id(&mut self, idx: usize, req: Req) -> u64 {
        let c = &mut self.conns[idx];
        let id = c.next_id;
        c.next_id += 1;
        c.requests.push((id, req));
        id
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

    fn on_response(&mut self, idx: usize, r: extract::Response) -> Result<(), String> {
        let c = &mut self.conns[idx];
        let Some(id) = r.request_id else {
            return Err(format!(
                "response without a request id: error {:?}",
                r.error_code
            ));
        };
        let Some(pos) = c.requests.iter().position(|(i, _)| *i == id) else {
            return Ok(());
        };
        let (_, req) = c.requests.swap_remove(pos);
        match req {
            Req::Auth => match r.error_code {
                Some(code) => Err(format!("auth failed: {code} (check --secret)")),
                None => Ok(()),
            },
            Req::Subscribe(slot) => self.on_subscribed(idx, slot as usize, r),
            Req::Unsubscribe(slot) => {
                if let Some(code) = r.error_code {
                    return Err(format!("unsubscribe failed: {code}"));
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

    fn on_subscribed(
        &mut self,
        idx: usize,
        slot: usize,
        r: extract::Response,
    ) -> Result<(), String> {
        if let Some(code) = r.error_code {
            return Err(format!("subscribe failed: {code}"));
        }
        let top = r
            .offset
            .ok_or_else(|| "subscribe result without offset".to_string())?;
        let recovered = r.recovered == Some(true);
        let name = &self.cfg.channels[self.conns[idx].subs[slot].channel as usize];
        let sub = &mut self.conns[idx].subs[slot];
        if sub.state != SubState::Subscribing {
            return Err(format!(
                "subscribe result for {name} in state {:?}",
                sub.state
            ));
        }
        match (sub.since, sub.offsets.is_some()) {
            (Some(since), true) if recovered => {
                self.shared.recovered.fetch_add(1, Ordering::Relaxed);
                sub.seq_base = since;
            }
            (Some(since), true) => {
                sub.not_recovered(since, top, &r.epoch, &self.cfg, &self.shared);
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

    fn closing(&self, idx: usize) -> bool {
        self.conns[idx].phase == Phase::Closing
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
        let token = self.conns[idx].token.as_deref();
        extract::push_json_str(&mut req, token.unwrap_or(&self.cfg.token));
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

    fn on_text(
        &mut self,
        idx: usize,
        text: &[u8],
        _frame_bytes: u64,
        now_ns: u64,
    ) -> Result<(), String> {
        match extract::parse_message(text) {
            Message::Broadcast(b) => {
                self.on_broadcast(idx, text, b, now_ns);
                Ok(())
            }
            Message::Response(r) => self.on_response(idx, r),
            Message::Other => Ok(()),
        }
    }

    fn pong(&mut self, idx: usize, payload: &[u8]) {
        let key = self.mask.next_key();
        ws::encode_client_frame(&mut self.conns[idx].pending, ws::OP_PONG, payload, key);
    }
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
