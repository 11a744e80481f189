//! One connection's send side: its send queue, the shard's flush pass and the writer task that
//! drain it, its subscriptions, and where it is in its life. Fan-out, the ring handlers and the
//! session touch a connection only through here.
//!
//! Fan-out queues bytes and marks the connection; the flush pass (`Flusher`, one task per shard)
//! writes every marked socket once per executor turn with a non-blocking send, so a delivered
//! message costs no task wake-up. The writer task handles the rest (TLS, a socket that is full).
//! All state is `Cell`/`RefCell`, borrowed only inside synchronous helpers, never across an
//! await.

mod event_stream;
mod flush;
mod pool;
mod send_queue;
mod subscription;
mod writer;

pub use flush::Flusher;
pub(crate) use subscription::Subscription;

use crate::admission::Client;
use crate::error::Error;
use crate::io::socket::{self as transport, Transport};
use crate::io::timers::Timers;
use crate::metrics::ShardMetrics;
use crate::node::Node;
use crate::wire::{frame, reply, sse};
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::task::Waker;
use std::time::{Duration, Instant};

/// Where a connection is in its life. Phases only move forward.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Phase {
    Open,
    /// A close frame is queued: nothing more is queued after it.
    Closing,
    /// The close frame has been written and FIN sent: the session's close linger runs.
    CloseSent,
    /// The socket failed, the writer gave up, or the session ended: stop everything.
    Dead,
}

/// How a connection's messages go on the wire, fixed by its handshake.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub(crate) enum Framing {
    /// WebSocket frames, uncompressed.
    #[default]
    WebSocket,
    /// WebSocket with permessage-deflate (RFC 7692), without context takeover either way.
    Deflate,
    /// permessage-deflate with our window limited below what compressed broadcasts use: they go
    /// uncompressed, and the client's compressed messages are inflated.
    InflateOnly,
    /// Server-sent events (`text/event-stream`).
    Sse,
}

/// What the send side of every connection of one shard shares: the flush pass and the limits
/// and metrics its writers need. One per shard; a connection holds an `Rc` of it while open.
pub(crate) struct SendSide {
    pub(crate) flusher: Flusher,
    write_timeout: Duration,
    node: Arc<Node>,
    shard: usize,
}

impl SendSide {
    pub(crate) fn new(node: Arc<Node>, shard: usize) -> SendSide {
        let compression = &node.config.compression;
        let flusher = Flusher::new((compression.level, compression.min_payload_bytes));
        SendSide {
            flusher,
            write_timeout: node.config.limits.write_timeout,
            node,
            shard,
        }
    }

    fn metrics(&self) -> &ShardMetrics {
        &self.node.metrics[self.shard]
    }
}

/// What a connection needs to be written while its session runs.
struct ConnIo {
    send: Rc<SendSide>,
    stream: Rc<RefCell<Transport>>,
}

/// Shard-local state of one connection that fan-out, the ring handlers and its session touch.
pub struct Conn {
    pub(crate) id: u64,
    /// The plain TCP socket the flush pass writes to directly; -1 for TLS (its records are
    /// written by the writer task) and once the connection has ended.
    fd: Cell<i32>,
    /// Bytes queued and not yet written.
    out: RefCell<Vec<u8>>,
    /// Bytes the writer holds and has not written yet; they count against the limit too.
    inflight: Cell<usize>,
    out_bytes_max: usize,
    /// When the oldest broadcast in `out` was accepted, for `publish_to_write_seconds`.
    oldest: Cell<Option<Instant>>,
    /// The shard's send side and the stream, while the session runs.
    io: RefCell<Option<ConnIo>>,
    /// A writer task exists (it exits when the queue is empty): no task while idle.
    writer_running: Cell<bool>,
    /// The session waiting for the writer to exit.
    writer_done: Cell<Option<Waker>>,
    reader_waker: Cell<Option<Waker>>,
    /// The earliest wake asked of the shard's timers, until it fires.
    wake_at: Cell<Option<Instant>>,
    /// The shard's timers woke the session: something may be due.
    timer_fired: Cell<bool>,
    /// Its bytes are in the flush pass's current io_uring submission.
    in_pass: Cell<bool>,
    /// One broadcast frame queued in the flush pass's arena instead of `out`: (start, length);
    /// length 0 when none. Only while `out` is empty; anything else queued moves it into `out`
    /// first, so the order holds.
    staged: Cell<(u32, u32)>,
    phase: Cell<Phase>,
    framing: Cell<Framing>,
    /// A connection's subscriptions, few for most: a vector costs 32 bytes for up to four where
    /// a hash map cost 128; the scan is bounded by `max_subscriptions_per_connection`.
    subs: RefCell<Vec<Rc<Subscription>>>,
    /// What the handshake told, while it matters (anonymous, or headers for the access
    /// proxy). 8 bytes, which `Rc<Conn>` still fits in its allocator size class.
    client: Cell<Option<Box<Client>>>,
}

impl Conn {
    /// A connection known to its shard as `id`, whose send queue holds at most
    /// `out_bytes_max` bytes (`limits.outbound_buffer_bytes`).
    pub fn new(id: u64, out_bytes_max: usize) -> Rc<Conn> {
        Rc::new(Conn {
            id,
            fd: Cell::new(-1),
            out: RefCell::new(Vec::new()),
            inflight: Cell::new(0),
            out_bytes_max,
            oldest: Cell::new(None),
            io: RefCell::new(None),
            writer_running: Cell::new(false),
            writer_done: Cell::new(None),
            reader_waker: Cell::new(None),
            wake_at: Cell::new(None),
            timer_fired: Cell::new(false),
            in_pass: Cell::new(false),
            staged: Cell::new((0, 0)),
            phase: Cell::new(Phase::Open),
            framing: Cell::new(Framing::WebSocket),
            subs: RefCell::new(Vec::new()),
            client: Cell::new(None),
        })
    }

    /// Starts writing to `stream` through the shard's `send` side.
    pub(crate) fn attach(&self, send: Rc<SendSide>, stream: Rc<RefCell<Transport>>) {
        if !matches!(&*stream.borrow(), Transport::Tls(_)) {
            self.fd.set(stream.borrow().raw_fd());
        }
        *self.io.borrow_mut() = Some(ConnIo { send, stream });
    }

    /// Set once, by the handshake, before anything is queued.
    pub(crate) fn set_framing(&self, framing: Framing) {
        self.framing.set(framing);
    }

    pub(crate) fn framing(&self) -> Framing {
        self.framing.get()
    }

    /// A close frame is queued, or the connection is dead.
    pub(crate) fn is_closing(&self) -> bool {
        self.phase.get() != Phase::Open
    }

    pub(crate) fn is_dead(&self) -> bool {
        self.phase.get() == Phase::Dead
    }

    /// Our close frame and FIN are out.
    pub(crate) fn close_sent(&self) -> bool {
        self.phase.get() == Phase::CloseSent
    }

    /// The close frame and FIN are out: the session's close linger starts (unless the
    /// connection died meanwhile: phases only move forward).
    fn close_is_out(&self) {
        if self.phase.get() == Phase::Closing {
            self.phase.set(Phase::CloseSent);
        }
        self.wake();
    }

    /// Stops everything: the writer ends, the flush pass skips the connection, the session
    /// ends.
    pub(crate) fn mark_dead(&self) {
        self.phase.set(Phase::Dead);
        self.wake();
    }

    /// Readiness from the shard's epoll set for this connection's socket.
    pub(crate) fn socket_ready(&self, events: u32) {
        let wake = match &*self.io.borrow() {
            Some(io) => transport::socket_ready(&io.stream, events),
            None => false,
        };
        if wake {
            self.wake();
        }
    }

    /// The shard's timers say `due` has come: wakes the session if it still waits for it.
    pub(crate) fn timer_due(&self, due: Instant) {
        if self.wake_at.get() == Some(due) {
            self.wake_at.set(None);
            self.timer_fired.set(true);
            self.wake();
        }
    }

    /// Asks the shard's timers to wake the session at `due` (or earlier, if it asked so).
    pub(crate) fn wake_at(&self, timers: &Timers, due: Instant) {
        timers.arm(self.id, &self.wake_at, due);
    }

    /// True once after the timers woke the session.
    pub(crate) fn take_timer_fired(&self) -> bool {
        self.timer_fired.replace(false)
    }

    /// The session waits: `waker` is woken when the connection's state changes.
    pub(crate) fn wait_with(&self, waker: &Waker) {
        register(&self.reader_waker, waker);
    }

    /// Wakes the session: the connection's state changed.
    fn wake(&self) {
        if let Some(w) = self.reader_waker.take() {
            w.wake();
        }
    }

    /// Queues a response: `Ok(body)` is the JSON text of `result`.
    pub(crate) fn respond(self: &Rc<Self>, id: Option<&[u8]>, result: Result<&[u8], &Error>) {
        if self.framing() == Framing::Sse {
            return self.push_frame(|out| sse::write_response(out, id, result));
        }
        self.push_frame(|out| {
            let mut msg = Vec::with_capacity(96);
            match result {
                Ok(body) => reply::write_result(&mut msg, id, body),
                Err(e) => reply::write_error(&mut msg, id, e),
            }
            frame::write_text(out, &msg);
        });
    }

    /// Queues a ping.
    pub(crate) fn ping(self: &Rc<Self>) {
        if self.framing() == Framing::Sse {
            return self.push_frame(sse::write_ping);
        }
        self.push_frame(frame::write_ping);
    }

    /// Queues a pong answering `payload`.
    pub(crate) fn pong(self: &Rc<Self>, payload: &[u8]) {
        self.push_frame(|out| frame::write_pong(out, payload));
    }

    /// Queues a close frame, after what is queued unless `discard` (a slow consumer's queue is
    /// dropped: its socket is full anyway, and the close is best effort, SPEC 13.16).
    pub(crate) fn close(self: &Rc<Self>, code: u16, reason: &str, discard: bool) {
        if self.is_closing() {
            return;
        }
        if discard {
            self.staged.set((0, 0));
        } else {
            self.unstage_here();
        }
        {
            let mut out = self.out_buf();
            if discard {
                out.clear();
            }
            if self.framing() == Framing::Sse {
                sse::write_close(&mut out, code);
            } else {
                frame::write_close(&mut out, code, reason);
            }
        }
        self.phase.set(Phase::Closing);
        self.queued();
        self.wake();
    }

    /// Ends the connection's writing: waits for a writer still blocked in a write (it ends
    /// with the error or its write timeout), lets go of the stream and the shard's send side,
    /// and gives back the queue's buffer. Returns the subscriptions, for the shard to remove.
    pub(crate) async fn end(&self) -> Vec<Rc<Subscription>> {
        // Not `mark_dead`: its wake-up would poll the ending session once more for nothing.
        self.phase.set(Phase::Dead);
        self.fd.set(-1);
        std::future::poll_fn(|cx| {
            if self.writer_running.get() {
                register(&self.writer_done, cx.waker());
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(())
            }
        })
        .await;
        // The shard holds the connection and the connection held the shard's send side.
        self.io.borrow_mut().take();
        if let Some(buf) = take_if_any(&mut self.out.borrow_mut()) {
            pool::give(buf);
        }
        std::mem::take(&mut *self.subs.borrow_mut())
    }

    pub(crate) fn add_subscription(&self, sub: Rc<Subscription>) {
        debug_assert!(
            self.subscribed(&sub.channel).is_none(),
            "one subscription per channel and connection"
        );
        let mut subs = self.subs.borrow_mut();
        sub.set_index(subs.len());
        subs.push(sub);
    }

    pub(crate) fn subscription_count(&self) -> usize {
        self.subs.borrow().len()
    }

    pub(crate) fn is_subscribed(&self, channel: &str) -> bool {
        self.subscribed(channel).is_some()
    }

    fn subscribed(&self, channel: &str) -> Option<usize> {
        self.subs
            .borrow()
            .iter()
            .position(|s| &*s.channel == channel)
    }

    pub(crate) fn remove_subscription(&self, channel: &str) -> Option<Rc<Subscription>> {
        let at = self.subscribed(channel)?;
        // `remove`, not `swap_remove`: the order is an SSE connection's URL order (its event
        // ids list positions in it); the scan is bounded by the subscription limit anyway.
        Some(self.subs.borrow_mut().remove(at))
    }

    pub(crate) fn set_client(&self, client: Box<Client>) {
        self.client.set(Some(client));
    }

    pub(crate) fn take_client(&self) -> Option<Box<Client>> {
        self.client.take()
    }

    /// The handshake headers kept for the access proxy.
    pub(crate) fn client_headers(&self) -> Vec<(String, String)> {
        let client = self.client.take();
        let headers = client
            .as_ref()
            .map(|c| c.headers.clone())
            .unwrap_or_default();
        self.client.set(client);
        headers
    }

    /// After a successful `auth`: no longer anonymous; nothing kept when no header is.
    pub(crate) fn authenticated(&self) {
        if let Some(mut client) = self.client.take() {
            client.anonymous = None;
            if !client.headers.is_empty() {
                self.client.set(Some(client));
            }
        }
    }

    /// The subscription to `channel`, if any.
    pub(crate) fn subscription(&self, channel: &str) -> Option<Rc<Subscription>> {
        let at = self.subscribed(channel)?;
        Some(self.subs.borrow()[at].clone())
    }

    /// Removes `sub` if it is still this connection's (not ended, not replaced by a later
    /// subscribe to the same channel).
    pub(crate) fn remove_this_subscription(&self, sub: &Rc<Subscription>) -> bool {
        let mut subs = self.subs.borrow_mut();
        match subs.iter().position(|s| Rc::ptr_eq(s, sub)) {
            Some(at) => {
                // Order kept, as in `remove_subscription`.
                subs.remove(at);
                true
            }
            None => false,
        }
    }

    /// Queues a notification (a JSON text without `requestId`).
    pub(crate) fn notify(self: &Rc<Self>, text: &[u8]) {
        if self.framing() == Framing::Sse {
            return self.push_frame(|out| sse::write_notification(out, text));
        }
        self.push_frame(|out| frame::write_text(out, text));
    }

    /// Removes and returns the subscriptions whose channel `keep` refuses.
    pub(crate) fn remove_subscriptions_unless(
        &self,
        keep: impl Fn(&str) -> bool,
    ) -> Vec<Rc<Subscription>> {
        let mut subs = self.subs.borrow_mut();
        let (kept, dropped) = std::mem::take(&mut *subs)
            .into_iter()
            .partition(|s| keep(&s.channel));
        *subs = kept;
        dropped
    }
}

/// Keeps the waker to wake in `slot`, cloning it only when it changed.
fn register(slot: &Cell<Option<Waker>>, waker: &Waker) {
    match slot.take() {
        Some(w) if w.will_wake(waker) => slot.set(Some(w)),
        _ => slot.set(Some(waker.clone())),
    }
}

/// The buffer, if it has one to give back (an empty `Vec` has none).
fn take_if_any(buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    (buf.capacity() > 0).then(|| std::mem::take(buf))
}
