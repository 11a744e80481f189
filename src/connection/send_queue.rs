//! A connection's send queue: what fan-out and responses append, where it is kept (a frame
//! staged in the flush pass's arena, or the connection's own buffer), and the slow-consumer
//! decision (close 4003 when the queue would pass `outbound_buffer_bytes`).

use super::pool;
use crate::channel::Publication;
use crate::connection::{Conn, Flusher, Framing};
use crate::constants::ARENA_MAX;
use crate::error::close;
use crate::metrics::ShardMetrics;
use crate::wire::{broadcast, deflate, frame, sse};
use std::rc::Rc;

impl Conn {
    /// Queues one broadcast frame; false when the connection is closing or just overflowed. A
    /// connection whose queue was empty is handed to `flusher`, which writes it after this turn.
    #[inline]
    pub(crate) fn enqueue_broadcast(
        self: &Rc<Self>,
        p: &Publication,
        seq: u64,
        metrics: &ShardMetrics,
        flusher: &Flusher,
    ) -> bool {
        match self.framing() {
            Framing::Sse => return self.enqueue_sse_broadcast(p, seq, metrics, flusher),
            Framing::Deflate => {
                if let Some(z) = p.deflated(flusher.compression) {
                    return self.enqueue_deflated(p, seq, z, metrics, flusher);
                }
            }
            Framing::WebSocket | Framing::InflateOnly => {}
        }
        // Frame length is bounded by prefix + suffix + 20 digits + 10 header bytes.
        let frame_max = p.prefix.len() + p.suffix.len() + 30;
        self.enqueue(p, frame_max, metrics, flusher, |out| {
            broadcast::write_broadcast_frame(out, &p.prefix, seq, &p.suffix)
        })
    }

    /// Queues one broadcast frame compressed with permessage-deflate: the publication's shared
    /// compressed suffix `z` after this subscriber's prefix and `seq` (`wire::deflate`).
    #[inline]
    fn enqueue_deflated(
        self: &Rc<Self>,
        p: &Publication,
        seq: u64,
        z: &[u8],
        metrics: &ShardMetrics,
        flusher: &Flusher,
    ) -> bool {
        // The stored block's 5 bytes, 20 digits and 10 header bytes.
        let frame_max = p.prefix.len() + z.len() + 35;
        let queued = self.enqueue(p, frame_max, metrics, flusher, |out| {
            deflate::write_broadcast_frame(out, &p.prefix, seq, z)
        });
        if queued {
            let before = p.prefix.len() + p.suffix.len();
            ShardMetrics::add(&metrics.compression_bytes_before_total, before as u64);
            let after = p.prefix.len() + 5 + z.len();
            ShardMetrics::add(&metrics.compression_bytes_after_total, after as u64);
        }
        queued
    }

    /// Queues a join or leave notification (its whole text is `p.prefix`), like a broadcast.
    pub(crate) fn enqueue_notification(
        self: &Rc<Self>,
        p: &Publication,
        metrics: &ShardMetrics,
        flusher: &Flusher,
    ) -> bool {
        if self.framing() == Framing::Sse {
            let frame_max = p.prefix.len() + 32;
            return self.enqueue(p, frame_max, metrics, flusher, |out| {
                sse::write_notification(out, &p.prefix)
            });
        }
        let frame_max = p.prefix.len() + 10;
        self.enqueue(p, frame_max, metrics, flusher, |out| {
            frame::write_text(out, &p.prefix)
        })
    }

    /// Queues the frame `write` appends (at most `frame_max` bytes) for `p`.
    #[inline(always)]
    pub(super) fn enqueue(
        self: &Rc<Self>,
        p: &Publication,
        frame_max: usize,
        metrics: &ShardMetrics,
        flusher: &Flusher,
        write: impl Fn(&mut Vec<u8>),
    ) -> bool {
        if self.is_closing() {
            return false;
        }
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
                write(&mut arena);
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
        write(&mut out);
        if queued == 0 {
            self.oldest.set(Some(p.accepted));
            drop(out);
            flusher.mark(self);
        }
        true
    }

    /// Queues a frame `f` writes (a response, a ping, a close): after what is queued.
    pub(super) fn push_frame(self: &Rc<Self>, f: impl FnOnce(&mut Vec<u8>)) {
        if self.is_closing() {
            return;
        }
        self.unstage_here();
        let mut out = self.out_buf();
        f(&mut out);
        drop(out);
        self.queued();
    }

    /// Something was queued outside fan-out: the flush pass writes it at the end of this turn,
    /// like fan-out's frames.
    pub(super) fn queued(self: &Rc<Self>) {
        let io = self.io.borrow();
        if let Some(io) = &*io {
            io.send.flusher.mark(self);
        }
    }

    /// Bytes queued and not yet handed to the writer.
    pub fn queued_bytes(&self) -> usize {
        self.out.borrow().len() + self.staged.get().1 as usize
    }

    /// Forgets what is queued and hands the buffer back, as the flush pass leaves a connection
    /// whose queue it wrote in full; for benchmarks and tests of fan-out (with
    /// `Flusher::discard`).
    pub fn discard_queued(&self) {
        if let Some(buf) = super::take_if_any(&mut self.out.borrow_mut()) {
            pool::give(buf);
        }
        self.staged.set((0, 0));
    }

    /// Moves a frame staged in the flush pass's arena into `out` (which is empty while one is
    /// staged), before anything else is queued behind it.
    pub(super) fn unstage(&self, arena: &[u8]) {
        let (start, len) = self.staged.replace((0, 0));
        if len == 0 {
            return;
        }
        let (start, len) = (start as usize, len as usize);
        self.out_buf().extend_from_slice(&arena[start..start + len]);
    }

    /// The connection's own queue to append to, with a pool buffer if it had none (an idle
    /// connection holds none). Whatever is staged in the arena must be moved in first.
    pub(super) fn out_buf(&self) -> std::cell::RefMut<'_, Vec<u8>> {
        let mut out = self.out.borrow_mut();
        if out.capacity() == 0 {
            *out = pool::take();
        }
        out
    }

    /// `unstage` with the arena of this connection's shard.
    pub(super) fn unstage_here(&self) {
        if self.staged.get().1 == 0 {
            return;
        }
        let io = self.io.borrow();
        match &*io {
            Some(io) => self.unstage(&io.send.flusher.arena.borrow()),
            // Ended: nothing will be written.
            None => self.staged.set((0, 0)),
        }
    }
}
