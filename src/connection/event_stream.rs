//! What only an SSE connection's send side does: the event id of each broadcast, which carries
//! every channel's position (`wire::sse`), and the end of its opening.

use crate::channel::Publication;
use crate::connection::{Conn, Flusher, Framing, Subscription};
use crate::metrics::ShardMetrics;
use crate::wire::sse;
use std::rc::Rc;

impl Conn {
    /// A connection that writes the SSE form (as `sse/` makes them), for benchmarks and tests
    /// of fan-out; `sse_opened` once it is subscribed makes its broadcasts carry ids.
    pub fn new_event_stream(id: u64, out_bytes_max: usize) -> Rc<Conn> {
        let conn = Conn::new(id, out_bytes_max);
        conn.set_framing(Framing::Sse);
        conn
    }

    /// Queues the SSE form of one broadcast. Once the opening is over, its event id lists the
    /// position of every channel of the connection (at most `sse.channels_max`), read from its
    /// subscriptions, which stand in URL order.
    pub(super) fn enqueue_sse_broadcast(
        self: &Rc<Self>,
        p: &Publication,
        seq: u64,
        metrics: &ShardMetrics,
        flusher: &Flusher,
    ) -> bool {
        let suffix = p.sse_suffix();
        let subs = self.subs.borrow();
        let id_max: usize = subs.iter().map(|s| s.position().0.len() + 22).sum();
        let frame_max = p.prefix.len() + p.suffix.len() + id_max + 64;
        self.enqueue(p, frame_max, metrics, flusher, |out| {
            sse::write_broadcast(out, |out| write_id(out, &subs), &p.prefix, seq, suffix)
        })
    }

    /// The opening is over: every channel of the URL is subscribed (its replay queued), so
    /// event ids from now on hold every position. Queues a bare `id` (no data: the browser
    /// takes it as its `Last-Event-ID` and dispatches nothing), so a reconnect right after the
    /// opening resumes from here, not from the previous stream's id.
    pub fn sse_opened(self: &Rc<Self>) {
        let subs = self.subs.borrow();
        for sub in subs.iter() {
            sub.set_opened();
        }
        self.push_frame(|out| {
            write_id(out, &subs);
            out.push(b'\n');
        });
    }
}

/// The `id:` line of a broadcast, or nothing during the opening: an id written before every
/// channel is subscribed would leave out the later channels, and a reconnect with it would
/// resume them live, losing what they missed. Without an id the browser keeps the one it
/// came with; a reconnect in the middle of the opening replays again (duplicates, no loss).
fn write_id(out: &mut Vec<u8>, subs: &[Rc<Subscription>]) {
    if !subs.first().is_some_and(|s| s.opened()) {
        return;
    }
    out.extend_from_slice(b"id: ");
    let positions = subs.iter().map(|s| {
        let (epoch, offset) = s.position();
        (s.index(), epoch, offset)
    });
    sse::write_positions(out, positions);
    out.push(b'\n');
}
