//! The flush pass: once per executor turn, after every publication of the turn was queued,
//! every connection with something queued is written with one non-blocking send, all of them
//! in one io_uring submission (`io/send_batch.rs`). What a socket does not take goes to the
//! connection's writer task.

#![allow(unsafe_code)]

use super::{pool, Conn, Phase};
use crate::constants::ARENA_MAX;
use crate::io::send_batch::{Item, SendBatch};
use crate::metrics::ShardMetrics;
use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Instant;

/// Connections that fan-out queued bytes for in this turn of the shard's executor. The flush
/// pass runs once per turn (a task woken by the first mark), after every publication of the
/// turn was queued, so each socket gets one `send` for all of them.
#[derive(Default)]
pub struct Flusher {
    dirty: RefCell<Vec<Rc<Conn>>>,
    waker: Cell<Option<Waker>>,
    /// This turn's broadcast frames for sockets that had nothing else queued, back to back;
    /// cleared after each pass (`Conn::staged` points into it).
    pub(super) arena: RefCell<Vec<u8>>,
    /// Passes run so far, and the tasks waiting for one to end (`written`).
    passes: Cell<u64>,
    written: RefCell<Vec<Waker>>,
    /// `compression.level` and `compression.min_payload_bytes`, for the compressed form of a
    /// publication (`Publication::deflated`).
    pub(super) compression: (u32, usize),
}

impl Flusher {
    /// A flusher whose compressed broadcasts use `compression` (level, min payload bytes).
    pub(crate) fn new(compression: (u32, usize)) -> Flusher {
        Flusher {
            compression,
            ..Flusher::default()
        }
    }

    pub(super) fn mark(&self, conn: &Rc<Conn>) {
        let mut dirty = self.dirty.borrow_mut();
        if dirty.is_empty() {
            if let Some(w) = self.waker.take() {
                w.wake();
            }
        }
        dirty.push(conn.clone());
    }

    /// Resolves once everything marked so far was written (the pass that takes it ended), or at
    /// once when nothing is marked. REST answers are written after this: a publisher that waits
    /// for its answers then sends its next publication when the previous fan-out left, instead
    /// of into a queue behind it, where it waited a whole pass (max-rate latency was 1.5 passes,
    /// not half of one); and it cannot queue publications faster than the shard writes them.
    /// (A WebSocket answer needs no wait: it is queued behind the fan-out, in the same pass.)
    pub(crate) async fn written(&self) {
        if self.dirty.borrow().is_empty() {
            return;
        }
        let pass = self.passes.get() + 1;
        poll_fn(|cx| {
            if self.passes.get() >= pass {
                Poll::Ready(())
            } else {
                self.written.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
    }

    /// Forgets the connections marked so far without writing them; for benchmarks of fan-out
    /// (with `Conn::discard_queued`).
    pub fn discard(&self) {
        self.dirty.borrow_mut().clear();
        self.arena.borrow_mut().clear();
    }

    /// The flush pass, run as one task per shard for the shard's life.
    pub(crate) async fn run(&self, metrics: &ShardMetrics) {
        let mut batch: Vec<Rc<Conn>> = Vec::new();
        // One io_uring submission per pass instead of a send() per socket: 4-13% less server
        // CPU per delivered message (A/B, fan-out and chat rows).
        let mut ring = SendBatch::new();
        let mut items: Vec<Item> = Vec::new();
        let mut owners: Vec<usize> = Vec::new();
        loop {
            poll_fn(|cx| {
                if self.dirty.borrow().is_empty() {
                    super::register(&self.waker, cx.waker());
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
            self.passes.set(self.passes.get() + 1);
            for w in self.written.take() {
                w.wake();
            }
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
        ring: &mut Option<SendBatch>,
        items: &mut Vec<Item>,
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

impl Conn {
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
        if self.is_dead() {
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
                    // Reset or broken pipe: the session ends the connection.
                    self.staged.set((0, 0));
                    self.mark_dead();
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
        if self.phase.get() == Phase::Closing {
            self.close_written(fd);
        }
    }

    /// Hands what is queued, a staged frame included, to a writer task (which keeps the order).
    fn to_writer(self: &Rc<Self>, arena: &[u8]) {
        self.unstage(arena);
        self.start_writer();
    }

    /// The close frame and everything before it are out: FIN, and the session's linger starts.
    fn close_written(&self, fd: i32) {
        crate::sys::shutdown_write(fd);
        self.close_is_out();
    }
}
