//! One WebSocket connection: its send queue, the shard's flush pass and the connection's writer
//! that drain it, and the session (read loop, requests, timers, close codes).
//!
//! Fan-out queues bytes and marks the connection; the flush pass (`Flusher`, one task per shard)
//! writes every marked socket once per executor turn with a plain non-blocking `send`, so a
//! delivered message costs no task wake-up. The writer task handles the rest (TLS, a socket
//! that is full, close frames) and the reader its own socket; each has its own waker. All state
//! is `Cell`/`RefCell`, borrowed only inside synchronous helpers.

use crate::auth::Permissions;
use crate::channel::Publication;
use crate::clock::{now_rfc3339, unix_now};
use crate::error::{close, err, Code, Error};
use crate::frame::{self, Decoder, Message};
use crate::io::socket::{self as transport, Transport};
use crate::metrics::ShardMetrics;
use crate::protocol::{self, Method};
use crate::shard::{Shard, Subscription};
use futures_lite::future;
use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// Buffers for send queues, reused across connections so an idle connection holds none and a
/// busy one does not allocate per message.
mod pool {
    use std::cell::RefCell;

    /// Enough for the connections a shard writes to in one wake at moderate fan-out; beyond it,
    /// buffers go back to the allocator rather than sit here (at 19,000 idle connections a pool
    /// of 4,096 x 4 KiB cost 880 bytes per connection).
    const KEEP_MAX: usize = 256;
    /// Buffers that grew under a backlog go back to the allocator: kept here, they would hold
    /// up to 256 x 256 KiB after a burst for as long as the server runs (a 30-minute soak saw
    /// its RSS step up 2 MiB for good after the publisher fell 110 ms behind and caught up).
    const CAPACITY_MAX: usize = FIRST_CAPACITY;
    const FIRST_CAPACITY: usize = 4096;

    thread_local! {
        static FREE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    }

    pub fn take() -> Vec<u8> {
        FREE.with(|f| f.borrow_mut().pop())
            .unwrap_or_else(|| Vec::with_capacity(FIRST_CAPACITY))
    }

    pub fn give(mut buf: Vec<u8>) {
        if buf.capacity() == 0 || buf.capacity() > CAPACITY_MAX {
            return;
        }
        buf.clear();
        FREE.with(|f| {
            let mut f = f.borrow_mut();
            if f.len() < KEEP_MAX {
                f.push(buf);
            }
        });
    }
}

struct ConnIo {
    shard: Rc<Shard>,
    stream: Rc<RefCell<Transport>>,
}

/// Shard-local state of one connection that fan-out and the ring handlers touch.
pub struct Conn {
    pub id: u64,
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
    /// The shard and the stream, while `run` runs: what the flush pass and a writer need.
    io: RefCell<Option<ConnIo>>,
    /// A writer task exists (it exits when the queue is empty): no task while idle.
    writer_running: Cell<bool>,
    /// `run` waiting for the writer to exit.
    writer_done: Cell<Option<Waker>>,
    reader_waker: Cell<Option<Waker>>,
    /// The earliest wake asked of the shard's timers (`poller::Timers`), until it fires.
    wake_at: Cell<Option<Instant>>,
    /// The shard's timers woke the reader: something may be due.
    timer_fired: Cell<bool>,
    /// Its bytes are in the flush pass's current io_uring submission.
    in_pass: Cell<bool>,
    /// One broadcast frame queued in the flush pass's arena instead of `out`: (start, length);
    /// length 0 when none. Only while `out` is empty; anything else queued moves it into `out`
    /// first, so the order holds.
    staged: Cell<(u32, u32)>,
    /// A close frame is queued: nothing more is queued after it.
    closing: Cell<bool>,
    /// The socket failed or the writer gave up: stop everything.
    dead: Cell<bool>,
    /// The close frame has been written and FIN sent: the reader's close linger runs.
    close_sent: Cell<bool>,
    /// A connection's subscriptions, few for most: a vector costs 32 bytes for up to four where
    /// a hash map cost 128; the scan is bounded by `max_subscriptions_per_connection`.
    subs: RefCell<Vec<Rc<Subscription>>>,
}

impl Conn {
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
            closing: Cell::new(false),
            dead: Cell::new(false),
            close_sent: Cell::new(false),
            subs: RefCell::new(Vec::new()),
        })
    }

    pub fn is_closing(&self) -> bool {
        self.closing.get() || self.dead.get()
    }

    /// Readiness from the shard's epoll set for this connection's socket.
    pub fn socket_ready(&self, events: u32) {
        let wake = match &*self.io.borrow() {
            Some(io) => transport::socket_ready(&io.stream, events),
            None => false,
        };
        if wake {
            self.wake();
        }
    }

    /// The shard's timers say `due` has come: wakes the reader if it still waits for it.
    pub fn timer_due(&self, due: Instant) {
        if self.wake_at.get() == Some(due) {
            self.wake_at.set(None);
            self.timer_fired.set(true);
            self.wake();
        }
    }

    /// Wakes the reader: the connection's state changed.
    fn wake(&self) {
        if let Some(w) = self.reader_waker.take() {
            w.wake();
        }
    }

    /// Something was queued outside fan-out (a response, a ping, a close): the flush pass writes
    /// it at the end of this turn, like fan-out's frames.
    fn queued(self: &Rc<Self>) {
        let io = self.io.borrow();
        if let Some(io) = &*io {
            io.shard.flusher.mark(self);
        }
    }

    /// Starts the writer task unless one runs (it loops until the queue is empty).
    fn start_writer(self: &Rc<Self>) {
        if self.writer_running.get() || self.dead.get() {
            return;
        }
        let Some((shard, stream)) = self
            .io
            .borrow()
            .as_ref()
            .map(|io| (io.shard.clone(), io.stream.clone()))
        else {
            return;
        };
        self.writer_running.set(true);
        let conn = self.clone();
        glommio::spawn_local(async move {
            writer(
                &conn,
                &stream,
                shard.config().limits.write_timeout,
                shard.metrics(),
            )
            .await;
            conn.writer_running.set(false);
            if let Some(w) = conn.writer_done.take() {
                w.wake();
            }
        })
        .detach();
    }

    /// The close frame and everything before it are out: FIN, and the reader's linger starts.
    fn close_written(&self, fd: i32) {
        crate::sys::shutdown_write(fd);
        self.close_sent.set(true);
        self.wake();
    }

    fn register(slot: &Cell<Option<Waker>>, waker: &Waker) {
        match slot.take() {
            Some(w) if w.will_wake(waker) => slot.set(Some(w)),
            _ => slot.set(Some(waker.clone())),
        }
    }

    /// Queues one broadcast frame; false when the connection is closing or just overflowed. A
    /// connection whose queue was empty is handed to `flusher`, which writes it after this turn.
    #[inline]
    pub fn enqueue_broadcast(
        self: &Rc<Self>,
        p: &Publication,
        seq: u64,
        metrics: &ShardMetrics,
        flusher: &Flusher,
    ) -> bool {
        if self.closing.get() || self.dead.get() {
            return false;
        }
        // Frame length is bounded by prefix + suffix + 20 digits + 10 header bytes.
        let frame_max = p.prefix.len() + p.suffix.len() + 30;
        // An empty queue always takes one frame, so a payload at max_payload_bytes (whose frame
        // is larger by its envelope) never cuts off a subscriber that keeps up.
        let queued = self.queued_bytes() + self.inflight.get();
        if queued > 0 && queued + frame_max > self.out_bytes_max {
            ShardMetrics::add(&metrics.slow_consumers_total, 1);
            tracing::info!(conn = self.id, channel = %p.channel, "slow consumer closed (4003)");
            self.close(close::SLOW_CONSUMER, "slow consumer", true);
            return false;
        }
        if queued == 0 && !self.writer_running.get() {
            // The common case, one frame per socket per pass: it goes into the pass's arena,
            // so fan-out allocates nothing per subscriber (TLS sockets copy it out again in
            // the pass, for their writer).
            let mut arena = flusher.arena.borrow_mut();
            let start = arena.len();
            if start < ARENA_MAX {
                protocol::write_broadcast_frame(&mut arena, &p.prefix, seq, &p.suffix);
                self.staged
                    .set((start as u32, (arena.len() - start) as u32));
                drop(arena);
                self.oldest.set(Some(p.accepted));
                flusher.mark(self);
                return true;
            }
        }
        self.unstage(&flusher.arena.borrow());
        let mut out = self.out_buf();
        protocol::write_broadcast_frame(&mut out, &p.prefix, seq, &p.suffix);
        if queued == 0 {
            self.oldest.set(Some(p.accepted));
            drop(out);
            flusher.mark(self);
        }
        true
    }

    /// Writes what is queued with one non-blocking `send` from the flush pass: a delivered
    /// message costs no task and no wake-up. What the socket does not take (rare: its buffer is
    /// full) and TLS go to a writer task, which waits for room under the write timeout.
    fn flush_now(self: &Rc<Self>, arena: &[u8], metrics: &ShardMetrics, now: Instant) {
        let Some((fd, ptr, len)) = self.flush_start(arena) else {
            return;
        };
        // SAFETY: `ptr`/`len` are queued bytes (`out` or the arena), untouched until `flush_end`;
        // `fd` is this connection's open socket (`run` sets it to -1, and `dead`, before the
        // stream is dropped, and nothing else closes it).
        let bytes = unsafe { std::slice::from_raw_parts(ptr, len) };
        let result = crate::sys::send_nonblocking(fd, bytes);
        self.flush_end(fd, result, arena, metrics, now);
    }

    /// What the flush pass should send for this connection: its socket and queued bytes (in
    /// `out` or staged in `arena`), which stay as they are until `flush_end` (nothing else runs
    /// in between). None when there is nothing to send or a writer task must do it.
    fn flush_start(self: &Rc<Self>, arena: &[u8]) -> Option<(i32, *const u8, usize)> {
        if self.dead.get() {
            // The arena is cleared after the pass: nothing may point into it then.
            self.staged.set((0, 0));
            return None;
        }
        if self.in_pass.get() {
            // Listed twice in one pass: sent once.
            return None;
        }
        let fd = self.fd.get();
        if self.writer_running.get() || fd < 0 {
            // A writer loops until the queue is empty: it keeps the order.
            self.to_writer(arena);
            return None;
        }
        let (start, len) = self.staged.get();
        if len > 0 {
            let start = start as usize;
            return Some((fd, arena[start..].as_ptr(), len as usize));
        }
        let out = self.out.borrow();
        if out.is_empty() {
            return None;
        }
        Some((fd, out.as_ptr(), out.len()))
    }

    /// Handles the result of sending what `flush_start` gave.
    fn flush_end(
        self: &Rc<Self>,
        fd: i32,
        result: io::Result<usize>,
        arena: &[u8],
        metrics: &ShardMetrics,
        now: Instant,
    ) {
        let n = match result {
            Ok(n) => n,
            Err(e) => {
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) {
                    self.to_writer(arena);
                } else {
                    // Reset or broken pipe: the reader ends the connection.
                    self.staged.set((0, 0));
                    self.dead.set(true);
                    self.wake();
                }
                return;
            }
        };
        let (start, len) = self.staged.get();
        if len > 0 {
            self.staged.set((start + n as u32, len - n as u32));
            if (n as u32) < len {
                self.to_writer(arena);
                return;
            }
        } else {
            let mut out = self.out.borrow_mut();
            if n < out.len() {
                out.drain(..n);
                drop(out);
                self.start_writer();
                return;
            }
            let buf = std::mem::take(&mut *out);
            drop(out);
            pool::give(buf);
        }
        if let Some(t) = self.oldest.take() {
            metrics.observe_publish_to_write(now.saturating_duration_since(t));
        }
        if self.closing.get() {
            self.close_written(fd);
        }
    }

    fn push_frame(self: &Rc<Self>, f: impl FnOnce(&mut Vec<u8>)) {
        if self.closing.get() || self.dead.get() {
            return;
        }
        self.unstage_here();
        let mut out = self.out_buf();
        f(&mut out);
        drop(out);
        self.queued();
    }

    /// Queues a response: `Ok(body)` is the JSON text of `result`.
    pub fn respond(self: &Rc<Self>, id: Option<&[u8]>, result: Result<&[u8], &Error>) {
        self.push_frame(|out| {
            let mut msg = Vec::with_capacity(96);
            match result {
                Ok(body) => protocol::write_result(&mut msg, id, body),
                Err(e) => protocol::write_error(&mut msg, id, e),
            }
            frame::write_text(out, &msg);
        });
    }

    /// Queues a close frame, after what is queued unless `discard` (a slow consumer's queue is
    /// dropped: its socket is full anyway, and the close is best effort, SPEC 13.16).
    pub fn close(self: &Rc<Self>, code: u16, reason: &str, discard: bool) {
        if self.closing.get() || self.dead.get() {
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
            frame::write_close(&mut out, code, reason);
        }
        self.closing.set(true);
        self.queued();
        self.wake();
    }

    /// Bytes queued and not yet handed to the writer.
    pub fn queued_bytes(&self) -> usize {
        self.out.borrow().len() + self.staged.get().1 as usize
    }

    /// Forgets what is queued and hands the buffer back, as the flush pass leaves a connection
    /// whose queue it wrote in full; for benchmarks and tests of fan-out (with
    /// `Flusher::discard`).
    pub fn discard_queued(&self) {
        if let Some(buf) = self.out.borrow_mut().take_if_any() {
            pool::give(buf);
        }
        self.staged.set((0, 0));
    }

    /// Moves a frame staged in the flush pass's arena into `out` (which is empty while one is
    /// staged), before anything else is queued behind it.
    fn unstage(&self, arena: &[u8]) {
        let (start, len) = self.staged.replace((0, 0));
        if len == 0 {
            return;
        }
        let (start, len) = (start as usize, len as usize);
        self.out_buf().extend_from_slice(&arena[start..start + len]);
    }

    /// The connection's own queue to append to, with a pool buffer if it had none (an idle
    /// connection holds none). Whatever is staged in the arena must be moved in first.
    fn out_buf(&self) -> std::cell::RefMut<'_, Vec<u8>> {
        let mut out = self.out.borrow_mut();
        if out.capacity() == 0 {
            *out = pool::take();
        }
        out
    }

    /// Hands what is queued, a staged frame included, to a writer task (which keeps the order).
    fn to_writer(self: &Rc<Self>, arena: &[u8]) {
        self.unstage(arena);
        self.start_writer();
    }

    /// `unstage` with the arena of this connection's shard.
    fn unstage_here(&self) {
        if self.staged.get().1 == 0 {
            return;
        }
        let io = self.io.borrow();
        match &*io {
            Some(io) => self.unstage(&io.shard.flusher.arena.borrow()),
            // Ended: nothing will be written.
            None => self.staged.set((0, 0)),
        }
    }

    pub fn add_subscription(&self, sub: Rc<Subscription>) {
        debug_assert!(
            self.subscribed(&sub.channel).is_none(),
            "one subscription per channel and connection"
        );
        self.subs.borrow_mut().push(sub);
    }

    fn subscription_count(&self) -> usize {
        self.subs.borrow().len()
    }

    fn subscribed(&self, channel: &str) -> Option<usize> {
        self.subs
            .borrow()
            .iter()
            .position(|s| &*s.channel == channel)
    }

    fn remove_subscription(&self, channel: &str) -> Option<Rc<Subscription>> {
        let at = self.subscribed(channel)?;
        Some(self.subs.borrow_mut().swap_remove(at))
    }
}

/// Connections that fan-out queued bytes for in this turn of the shard's executor. The flush
/// pass runs once per turn (a task woken by the first mark), after every publication of the
/// turn was queued, so each socket gets one `send` for all of them.
#[derive(Default)]
pub struct Flusher {
    dirty: RefCell<Vec<Rc<Conn>>>,
    waker: Cell<Option<Waker>>,
    /// This turn's broadcast frames for sockets that had nothing else queued, back to back;
    /// cleared after each pass (`Conn::staged` points into it).
    arena: RefCell<Vec<u8>>,
}

/// Beyond this many bytes in one turn, frames go to per-connection buffers instead (the arena
/// keeps its capacity between passes).
const ARENA_MAX: usize = 4 << 20;

impl Flusher {
    fn mark(&self, conn: &Rc<Conn>) {
        let mut dirty = self.dirty.borrow_mut();
        if dirty.is_empty() {
            if let Some(w) = self.waker.take() {
                w.wake();
            }
        }
        dirty.push(conn.clone());
    }

    /// Forgets the connections marked so far without writing them; for benchmarks of fan-out
    /// (with `Conn::discard_queued`).
    pub fn discard(&self) {
        self.dirty.borrow_mut().clear();
        self.arena.borrow_mut().clear();
    }

    /// The flush pass, run as one task per shard for the shard's life.
    pub async fn run(&self, metrics: &ShardMetrics) {
        let mut batch: Vec<Rc<Conn>> = Vec::new();
        // One io_uring submission per pass instead of a send() per socket: 4-13% less server
        // CPU per delivered message (A/B, fan-out and chat rows).
        let mut ring = crate::io::send_batch::SendBatch::new();
        let mut items: Vec<crate::io::send_batch::Item> = Vec::new();
        let mut owners: Vec<usize> = Vec::new();
        loop {
            poll_fn(|cx| {
                if self.dirty.borrow().is_empty() {
                    Conn::register(&self.waker, cx.waker());
                    Poll::Pending
                } else {
                    Poll::Ready(())
                }
            })
            .await;
            std::mem::swap(&mut batch, &mut *self.dirty.borrow_mut());
            // Taken out for the pass (nothing is queued during it, but nothing could then write
            // into the bytes being sent either); every staged frame is in `batch`.
            let mut arena = std::mem::take(&mut *self.arena.borrow_mut());
            self.pass(&batch, &arena, &mut ring, &mut items, &mut owners, metrics);
            batch.clear();
            arena.clear();
            if arena.capacity() > 2 * ARENA_MAX {
                arena.shrink_to(ARENA_MAX);
            }
            let mut slot = self.arena.borrow_mut();
            if slot.capacity() == 0 {
                *slot = arena;
            }
        }
    }

    /// Writes every connection in `batch`: one io_uring submission, or a `send` each.
    fn pass(
        &self,
        batch: &[Rc<Conn>],
        arena: &[u8],
        ring: &mut Option<crate::io::send_batch::SendBatch>,
        items: &mut Vec<crate::io::send_batch::Item>,
        owners: &mut Vec<usize>,
        metrics: &ShardMetrics,
    ) {
        let Some(r) = ring.as_mut() else {
            // A pass over 19,000 sockets takes ~150 ms: the clock is read again every 16 writes
            // so `publish_to_write_seconds` stays within ~0.1 ms of each write, without a clock
            // read per socket.
            let mut now = Instant::now();
            for (i, conn) in batch.iter().enumerate() {
                if i % 16 == 15 {
                    now = Instant::now();
                }
                conn.flush_now(arena, metrics, now);
            }
            return;
        };
        items.clear();
        owners.clear();
        for (i, conn) in batch.iter().enumerate() {
            if let Some(item) = conn.flush_start(arena) {
                conn.in_pass.set(true);
                items.push(item);
                owners.push(i);
            }
        }
        // SAFETY: flush_start's sockets stay open and its bytes untouched until the matching
        // flush_end, which runs inside `send_all`'s callback (or below).
        let sent = unsafe {
            r.send_all(items, |k, result, now| {
                let conn = &batch[owners[k]];
                conn.in_pass.set(false);
                conn.flush_end(items[k].0, result, arena, metrics, now);
            })
        };
        if let Err(e) = sent {
            // Not seen in practice. Whether the unreported sends happened is unknown, so those
            // connections end (their clients recover with `since`), and the flush pass goes back
            // to one send() per socket.
            tracing::error!(error = %e, "io_uring failed in the flush pass; using send()");
            for &i in owners.iter() {
                let conn = &batch[i];
                if conn.in_pass.replace(false) {
                    let gone = Err(io::Error::other(e.to_string()));
                    conn.flush_end(-1, gone, arena, metrics, Instant::now());
                }
            }
            *ring = None;
        }
    }
}

/// Writes what the flush pass could not (TLS, a socket that is full) until the queue is empty
/// or a close frame has been flushed, then exits: an idle connection has no writer task.
async fn writer(
    conn: &Conn,
    stream: &RefCell<Transport>,
    timeout: Duration,
    metrics: &ShardMetrics,
) {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        if conn.dead.get() {
            return;
        }
        std::mem::swap(&mut buf, &mut *conn.out.borrow_mut());
        if buf.is_empty() {
            // Keep the (empty) queue's buffer where it was.
            std::mem::swap(&mut buf, &mut *conn.out.borrow_mut());
            return;
        }
        conn.inflight.set(buf.len());
        let oldest = conn.oldest.take();
        let mut written = 0;
        while written < buf.len() {
            // Most writes complete at once: try before arming the write timeout, which costs a
            // timer insertion and removal per write.
            let mut write = std::pin::pin!(transport::write_some(stream, &buf[written..]));
            let attempt = match future::poll_once(write.as_mut()).await {
                Some(done) => Some(done),
                // Boxed: only a blocked write needs the timer's state.
                None => {
                    Box::pin(future::or(async { Some(write.await) }, async {
                        glommio::timer::sleep(timeout).await;
                        None
                    }))
                    .await
                }
            };
            match attempt {
                Some(Ok(n)) if n > 0 => {
                    written += n;
                    conn.inflight.set(buf.len() - written);
                }
                Some(_) => {
                    conn.dead.set(true);
                    conn.wake();
                    return;
                }
                None => {
                    ShardMetrics::add(&metrics.write_timeouts_total, 1);
                    tracing::info!(
                        conn = conn.id,
                        "write made no progress within write_timeout; closed"
                    );
                    conn.dead.set(true);
                    conn.wake();
                    return;
                }
            }
        }
        if let Some(t) = oldest {
            metrics.observe_publish_to_write(t.elapsed());
        }
        conn.inflight.set(0);
        pool::give(std::mem::take(&mut buf));
        if conn.closing.get() && conn.out.borrow().is_empty() {
            // The close frame is out: send FIN and let the reader drain until the peer closes.
            transport::shutdown_write(stream).await;
            // Tell the reader, which may be waiting on a far timer (the close came from
            // fan-out or shutdown, not from the reader), that its close linger starts now.
            conn.close_sent.set(true);
            conn.wake();
            return;
        }
    }
}

/// Token bucket of SPEC section 6 plus the 4004 rule of SPEC 13.13. Single precision: it
/// lives in every connection's task, and a bucket needs no more.
struct RateLimit {
    tokens: f32,
    per_second: f32,
    burst: f32,
    rejected: u32,
    last: Instant,
    window_start: Instant,
}

/// More than this many rejections for rate within `REJECT_WINDOW` closes with 4004.
const REJECTED_MAX: u32 = 100;
const REJECT_WINDOW: Duration = Duration::from_secs(10);
/// After our close frame, how long we wait for the peer's close before dropping the socket.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

impl RateLimit {
    fn new(per_second: u32, burst: u32, now: Instant) -> RateLimit {
        RateLimit {
            tokens: burst as f32,
            last: now,
            per_second: per_second as f32,
            burst: burst as f32,
            rejected: 0,
            window_start: now,
        }
    }

    /// Ok(()) when the request may go ahead; Err(true) when the connection must close.
    fn take(&mut self, now: Instant) -> Result<(), bool> {
        let dt = now.duration_since(self.last).as_secs_f32();
        self.last = now;
        self.tokens = (self.tokens + dt * self.per_second).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        if now.duration_since(self.window_start) > REJECT_WINDOW {
            self.window_start = now;
            self.rejected = 0;
        }
        self.rejected += 1;
        Err(self.rejected > REJECTED_MAX)
    }
}

struct Session {
    perms: Option<Permissions>,
    rate: RateLimit,
}

/// Runs one upgraded WebSocket connection to its end. `input` holds bytes read after the head.
///
/// Not an `async fn`: the setup runs here, so the returned future, which lives as long as the
/// connection, does not keep room for the `Transport` argument it moved out at once.
pub fn run(
    shard: Rc<Shard>,
    id: u64,
    stream: Transport,
    input: Vec<u8>,
) -> impl std::future::Future<Output = ()> {
    let limits = &shard.config().limits;
    let conn = Conn::new(id, limits.outbound_buffer_bytes);
    shard.conns.borrow_mut().insert(conn.id, conn.clone());
    ShardMetrics::gauge(&shard.metrics().connections_active, 1);
    tracing::debug!(conn = conn.id, shard = shard.id, "websocket open");
    if !matches!(stream, Transport::Tls(_)) {
        conn.fd.set(stream.raw_fd());
    }
    let stream = Rc::new(RefCell::new(stream));
    *conn.io.borrow_mut() = Some(ConnIo {
        shard: shard.clone(),
        stream: stream.clone(),
    });
    run_session(shard, conn, stream, input)
}

async fn run_session(
    shard: Rc<Shard>,
    conn: Rc<Conn>,
    stream: Rc<RefCell<Transport>>,
    mut input: Vec<u8>,
) {
    reader(&shard, &conn, &stream, &mut input).await;
    // Whatever ended the reader ends the writer too, and the flush pass stops writing to the
    // socket (it may still hold this connection in its list).
    conn.dead.set(true);
    conn.fd.set(-1);
    // A writer blocked in a write ends with it (error or write timeout).
    poll_fn(|cx| {
        if conn.writer_running.get() {
            Conn::register(&conn.writer_done, cx.waker());
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    // The shard holds the connection and the connection held the shard.
    conn.io.borrow_mut().take();
    let subs = std::mem::take(&mut *conn.subs.borrow_mut());
    for sub in &subs {
        shard.unsubscribe(sub);
    }
    conn.dead.set(true);
    if let Some(buf) = conn.out.borrow_mut().take_if_any() {
        pool::give(buf);
    }
    shard.conns.borrow_mut().remove(&conn.id);
    ShardMetrics::gauge(&shard.metrics().connections_active, -1);
    shard.node.connection_ended();
    tracing::debug!(conn = conn.id, shard = shard.id, "websocket closed");
}

trait TakeIfAny {
    fn take_if_any(&mut self) -> Option<Vec<u8>>;
}

impl TakeIfAny for Vec<u8> {
    fn take_if_any(&mut self) -> Option<Vec<u8>> {
        (self.capacity() > 0).then(|| std::mem::take(self))
    }
}

enum Wake {
    Data(usize),
    Timer,
}

async fn reader(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    stream: &RefCell<Transport>,
    input: &mut Vec<u8>,
) {
    // Borrowed, not cloned: the reader lives as long as the connection.
    let limits = &shard.config().limits;
    let opened = Instant::now();
    let mut decoder = Decoder::new(limits.max_frame_bytes);
    let mut session = Session {
        perms: None,
        rate: RateLimit::new(limits.requests_per_second, limits.request_burst, opened),
    };
    let mut last_heard = opened;
    let mut next_ping = opened + limits.ping_interval;
    let mut close_started: Option<Instant> = None;
    loop {
        // Handle every complete frame already buffered.
        let mut pos = 0;
        while !conn.closing.get() && !conn.dead.get() {
            let (used, outcome) = match decoder.decode(&mut input[pos..]) {
                Ok(None) => break,
                Err(v) => {
                    tracing::debug!(
                        conn = conn.id,
                        code = v.code,
                        reason = v.reason,
                        "protocol violation"
                    );
                    conn.close(v.code, v.reason, false);
                    break;
                }
                Ok(Some((None, used))) => (used, Ok(())),
                Ok(Some((Some(message), used))) => {
                    // Boxed: the request state exists only while a request is handled, so an idle
                    // connection does not carry it in its future.
                    let r = Box::pin(handle(shard, conn, &mut session, message)).await;
                    (used, r)
                }
            };
            pos += used;
            if let Err((code, reason)) = outcome {
                conn.close(code, reason, false);
            }
        }
        if pos > 0 {
            input.drain(..pos);
        }
        if input.is_empty() && input.capacity() > 0 {
            *input = Vec::new();
        }
        if conn.dead.get() {
            return;
        }
        let now = Instant::now();
        if conn.closing.get() {
            input.clear();
            // The linger starts once our close frame is out; until then the writer is still
            // flushing what was queued before it (shutdown_grace applies to that).
            if conn.close_sent.get() {
                let started = *close_started.get_or_insert(now);
                if now >= started + CLOSE_LINGER {
                    return;
                }
            }
        }
        // The next moment something is due: auth timeout, token expiry, a ping, ping timeout;
        // while closing, only the end of the linger (the others fired already or no longer
        // matter, and a due time in the past would spin this loop and starve the writer).
        let token_expiry = session
            .perms
            .as_ref()
            .map(|p| expiry_instant(p.exp, shard.config().auth.leeway, now));
        let due = match close_started {
            Some(started) => started + CLOSE_LINGER,
            // Closing, close frame not out yet: the writer ends it (flushed, or its write
            // timeout); this is only a backstop, never a due time in the past.
            None if conn.closing.get() => now + limits.write_timeout + CLOSE_LINGER,
            None => {
                let mut due = next_ping.min(last_heard + limits.ping_interval * 2);
                if session.perms.is_none() {
                    due = due.min(opened + limits.auth_timeout);
                }
                if let Some(t) = token_expiry {
                    due = due.min(t);
                }
                due
            }
        };
        let lingering = close_started.is_some();
        shard.timers.arm(conn.id, &conn.wake_at, due);
        let ready = |cx: &std::task::Context<'_>| {
            if conn.dead.get() {
                return Some(io::ErrorKind::ConnectionAborted.into());
            }
            if conn.timer_fired.replace(false) || (!lingering && conn.close_sent.get()) {
                return Some(io::ErrorKind::Interrupted.into());
            }
            Conn::register(&conn.reader_waker, cx.waker());
            None
        };
        let wake = match transport::read_some(stream, input, &ready).await {
            Ok(n) => Wake::Data(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Wake::Timer,
            Err(_) => Wake::Data(0),
        };
        let now = Instant::now();
        match wake {
            Wake::Data(0) => {
                conn.dead.set(true);
                conn.wake();
                return;
            }
            Wake::Data(_) => last_heard = now,
            Wake::Timer => {}
        }
        if conn.closing.get() {
            continue;
        }
        if session.perms.is_none() && now >= opened + limits.auth_timeout {
            conn.close(close::AUTH_TIMEOUT, "not authenticated in time", false);
        } else if token_expiry.is_some_and(|t| now >= t) {
            conn.close(close::TOKEN_EXPIRED, "token expired", false);
        } else if now >= last_heard + limits.ping_interval * 2 {
            conn.close(
                close::PING_TIMEOUT,
                "no frame within twice the ping interval",
                true,
            );
        } else if now >= next_ping {
            conn.push_frame(frame::write_ping);
            next_ping = now + limits.ping_interval;
        }
    }
}

/// The instant a token of expiry `exp` (Unix seconds) stops being valid.
fn expiry_instant(exp: u64, leeway: Duration, now: Instant) -> Instant {
    // A client picks `exp`: saturate, and treat anything past a century as "never".
    const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    let left = exp
        .saturating_add(leeway.as_secs())
        .saturating_sub(unix_now());
    let left = Duration::from_secs(left).min(FAR);
    now.checked_add(left)
        .unwrap_or(now + Duration::from_secs(365 * 24 * 3600))
}

type Outcome = Result<(), (u16, &'static str)>;

async fn handle(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    session: &mut Session,
    message: Message<'_>,
) -> Outcome {
    match message {
        Message::Text(text) => handle_request(shard, conn, session, text).await,
        Message::Binary(_) => {
            fail(
                shard,
                conn,
                None,
                &err(
                    Code::InvalidArgument,
                    "binary frames are not supported; send JSON text",
                ),
            );
            check_rate(shard, conn, session)
        }
        Message::Ping(payload) => {
            let payload = payload.to_vec();
            conn.push_frame(|out| frame::write_pong(out, &payload));
            Ok(())
        }
        Message::Pong => Ok(()),
        Message::Close(code) => {
            // Echo the peer's code (RFC 6455 5.5.1), then close.
            let code = code.unwrap_or(close::NORMAL);
            Err((code, ""))
        }
    }
}

/// Counts a frame against the rate limit when it was answered outside `handle_request`.
fn check_rate(shard: &Rc<Shard>, conn: &Rc<Conn>, session: &mut Session) -> Outcome {
    match session.rate.take(Instant::now()) {
        Ok(()) => Ok(()),
        Err(close_now) => rate_limited(shard, conn, None, close_now),
    }
}

fn rate_limited(shard: &Rc<Shard>, conn: &Rc<Conn>, id: Option<&[u8]>, close_now: bool) -> Outcome {
    if close_now {
        tracing::info!(conn = conn.id, "closed for too many requests (4004)");
        return Err((close::TOO_MANY_REQUESTS, "too many requests"));
    }
    fail(
        shard,
        conn,
        id,
        &err(
            Code::ResourceExhausted,
            "request rate over the limit; slow down",
        ),
    );
    Ok(())
}

fn fail(shard: &Rc<Shard>, conn: &Rc<Conn>, id: Option<&[u8]>, e: &Error) {
    shard.metrics().rejected(e.code);
    conn.respond(id, Err(e));
}

async fn handle_request(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    session: &mut Session,
    text: &[u8],
) -> Outcome {
    let limits = &shard.config().limits;
    thread_local! {
        // simd-json parses in place; one copy buffer per shard, not one per connection.
        static SCRATCH: RefCell<crate::json::Scratch> =
            const { RefCell::new(crate::json::Scratch::new()) };
    }
    let request = SCRATCH.with(|scratch| {
        protocol::parse_request(text, &mut scratch.borrow_mut(), limits.max_payload_bytes)
    });
    let allowed = session.rate.take(Instant::now());
    let request = match request {
        Ok(r) => r,
        Err(rejected) => {
            if let Err(close_now) = allowed {
                return rate_limited(shard, conn, rejected.id, close_now);
            }
            fail(shard, conn, rejected.id, &rejected.error);
            return Ok(());
        }
    };
    let id = request.id;
    if let Err(close_now) = allowed {
        return rate_limited(shard, conn, id, close_now);
    }
    if request.method_needs_auth && session.perms.is_none() {
        fail(
            shard,
            conn,
            id,
            &err(Code::Unauthenticated, "send auth with a valid token first"),
        );
        return Ok(());
    }
    let method = match request.method {
        Ok(m) => m,
        Err(e) => {
            fail(shard, conn, id, &e);
            return Ok(());
        }
    };
    match method {
        Method::Heartbeat => {
            let mut body = b"{\"timestamp\":".to_vec();
            protocol::write_json_string(&mut body, &now_rfc3339());
            body.push(b'}');
            conn.respond(id, Ok(&body));
        }
        Method::Auth { token } => match shard.node.verifier.verify(&token) {
            Err(e) => {
                ShardMetrics::add(&shard.metrics().auth_failures_total, 1);
                fail(shard, conn, id, &err(Code::Unauthenticated, e.0));
            }
            Ok(perms) => {
                if let Some(old) = &session.perms {
                    if old.sub != perms.sub {
                        fail(
                            shard,
                            conn,
                            id,
                            &err(
                                Code::FailedPrecondition,
                                "re-auth must keep the same sub; open a new connection",
                            ),
                        );
                        return Ok(());
                    }
                    // A narrower token drops the subscriptions it no longer authorizes.
                    let dropped: Vec<Rc<Subscription>> = conn
                        .subs
                        .borrow()
                        .iter()
                        .filter(|s| !(perms.can_subscribe && perms.allows_channel(&s.channel)))
                        .cloned()
                        .collect();
                    for sub in &dropped {
                        conn.remove_subscription(&sub.channel);
                        shard.unsubscribe(sub);
                    }
                }
                tracing::debug!(conn = conn.id, sub = %perms.sub, "authenticated");
                session.perms = Some(perms);
                conn.respond(id, Ok(b"{\"success\":true}"));
            }
        },
        Method::Subscribe { channel, since } => {
            let perms = session
                .perms
                .as_ref()
                .ok_or((close::PROTOCOL, "unreachable"))?;
            if !perms.can_subscribe || !perms.allows_channel(&channel) {
                fail(
                    shard,
                    conn,
                    id,
                    &err(
                        Code::PermissionDenied,
                        "token does not allow subscribing to this channel",
                    ),
                );
            } else if conn.subscribed(&channel).is_some() {
                fail(
                    shard,
                    conn,
                    id,
                    &err(Code::AlreadyExists, "already subscribed to this channel"),
                );
            } else if conn.subscription_count() >= limits.max_subscriptions_per_connection {
                fail(
                    shard,
                    conn,
                    id,
                    &err(
                        Code::ResourceExhausted,
                        "max_subscriptions_per_connection reached; unsubscribe first",
                    ),
                );
            } else {
                let done = shard.subscribe(conn, id, &channel, since);
                let _ = done.await;
            }
        }
        Method::Unsubscribe { channel } => {
            let sub = conn.remove_subscription(&channel);
            match sub {
                Some(sub) => {
                    shard.unsubscribe(&sub);
                    conn.respond(id, Ok(b"{\"success\":true}"));
                }
                None => fail(
                    shard,
                    conn,
                    id,
                    &err(Code::NotFound, "not subscribed to this channel"),
                ),
            }
        }
        Method::Publish(params) => {
            let perms = session
                .perms
                .as_ref()
                .ok_or((close::PROTOCOL, "unreachable"))?;
            if !perms.can_publish || !perms.allows_channel(&params.channel) {
                fail(
                    shard,
                    conn,
                    id,
                    &err(
                        Code::PermissionDenied,
                        "token does not allow publishing to this channel",
                    ),
                );
                return Ok(());
            }
            // Boxed: the publish state exists only while it is in flight, and keeping it out of
            // the request future keeps that future in a smaller allocator size class than the
            // connection's task (sharing one fragmented the task's pages: measured +150-500 B
            // per idle connection).
            match Box::pin(shard.publish(params)).await {
                Ok(ack) => {
                    let body = ack_json(&ack);
                    conn.respond(id, Ok(&body));
                }
                Err(e) => fail(shard, conn, id, &e),
            }
        }
    }
    Ok(())
}

/// `{"id","createTime","offset"}` of a publish result.
pub fn ack_json(ack: &crate::ring::Ack) -> Vec<u8> {
    let mut body = Vec::with_capacity(96);
    body.extend_from_slice(b"{\"id\":");
    protocol::write_json_string(&mut body, &ack.id);
    body.extend_from_slice(b",\"createTime\":");
    protocol::write_json_string(&mut body, &ack.create_time);
    body.extend_from_slice(b",\"offset\":");
    body.extend_from_slice(itoa::Buffer::new().format(ack.offset).as_bytes());
    body.push(b'}');
    body
}

/// Closes every connection of this shard with 1001 (shutdown).
pub fn close_all(shard: &Shard) {
    let conns: Vec<Rc<Conn>> = shard.conns.borrow().values().cloned().collect();
    for conn in conns {
        conn.close(close::GOING_AWAY, "server shutting down", false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_expiry_far_in_the_future_does_not_overflow() {
        let now = Instant::now();
        let t = expiry_instant(u64::MAX, Duration::from_secs(3600), now);
        assert!(t > now + Duration::from_secs(10 * 365 * 24 * 3600));
        assert!(expiry_instant(0, Duration::ZERO, now) <= now);
    }

    #[test]
    fn the_buffer_pool_keeps_only_standard_buffers() {
        let mut grown = pool::take();
        grown.resize(64 * 1024, 0);
        pool::give(grown);
        let next = pool::take();
        assert!(next.capacity() <= 4096, "a grown buffer was kept");
        assert!(next.is_empty());
        let ptr = next.as_ptr();
        pool::give(next);
        let again = pool::take();
        assert_eq!(again.as_ptr(), ptr, "a standard buffer is reused");
    }

    #[test]
    fn rate_limit_allows_burst_then_refills_then_closes_abusers() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(10, 5, t0);
        for _ in 0..5 {
            assert_eq!(r.take(t0), Ok(()));
        }
        assert_eq!(r.take(t0), Err(false));
        assert_eq!(r.take(t0 + Duration::from_millis(100)), Ok(()));
        for i in 0..REJECTED_MAX - 1 {
            assert_eq!(r.take(t0 + Duration::from_millis(100)), Err(false), "{i}");
        }
        assert_eq!(r.take(t0 + Duration::from_millis(100)), Err(true));
        // A short burst of rejections much later starts a new window.
        let mut r = RateLimit::new(10, 1, t0);
        assert_eq!(r.take(t0), Ok(()));
        assert_eq!(r.take(t0), Err(false));
        assert_eq!(r.take(t0 + Duration::from_secs(11)), Ok(()));
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;
    use crate::config::Config;
    use crate::node::Node;
    use std::sync::Arc;

    /// The per-connection futures live as long as the connection: their size is idle memory.
    #[test]
    fn connection_futures_stay_small() {
        let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .io_memory(64 * 1024)
            .make()
            .unwrap();
        ex.run(async {
            let mut config = Config::default();
            config.auth.jwt_secret = Some("s".into());
            let shard = Shard::new(0, Arc::new(Node::new(config, 1).unwrap()));
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let connect = || {
                let tcp = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
                Transport::Raw(transport::RawSock::new(tcp.into()))
            };
            let conn = Conn::new(1, 1 << 20);
            let stream = Rc::new(RefCell::new(connect()));
            let mut input = Vec::new();
            let r = reader(&shard, &conn, &stream, &mut input);
            let w = writer(&conn, &stream, Duration::from_secs(1), shard.metrics());
            let sizes = (std::mem::size_of_val(&r), std::mem::size_of_val(&w));
            eprintln!(
                "reader future {} B, writer future {} B, conn {} B",
                sizes.0,
                sizes.1,
                std::mem::size_of::<Conn>()
            );
            assert!(sizes.0 <= 640 && sizes.1 <= 640, "{sizes:?}");
            // Idle memory is mostly the connection's task: this future plus glommio's header
            // (~48 B). At most 592 keeps the task in mimalloc's 640-byte class (it was 704 and
            // 768 while a glommio sleep was raced against each read), and a request's boxed
            // future must stay in a smaller class: sharing the task's class, transient request
            // boxes fragmented the pages of long-lived tasks (+150-500 B per idle connection,
            // measured at 19,000).
            let task = run(shard.clone(), 2, connect(), Vec::new());
            let mut session = Session {
                perms: None,
                rate: RateLimit::new(1, 1, Instant::now()),
            };
            let request = handle(&shard, &conn, &mut session, Message::Text(b"{}"));
            let (task, request) = (
                std::mem::size_of_val(&task),
                std::mem::size_of_val(&request),
            );
            eprintln!("connection task future {task} B, request future {request} B");
            assert!(task <= 592 && request <= 512, "{task} {request}");
        });
    }
}
