//! One subscription: a (channel, connection) pair with its own `seq` counter.

use crate::channel::Publication;
use crate::connection::Conn;
use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;

pub(crate) struct Subscription {
    pub(crate) conn: Rc<Conn>,
    pub(crate) channel: Arc<str>,
    seq: Cell<u64>,
    /// The channel's offset when the subscription started: older publications that are still
    /// in flight towards this shard (cluster mode) are not for it.
    ///
    /// Only publications still in flight when the subscription started can be older, and they
    /// arrive before any newer one (each source feeds this shard in order); so the first newer
    /// publication clears this, and offsets that restart after Redis lost its data (a new epoch)
    /// are never mistaken for old ones.
    start_offset: Cell<u64>,
    /// The epoch `start_offset` belongs to.
    start_epoch: Arc<str>,
    /// Index in the channel's subscriber list, kept so removal is a swap_remove.
    slot: Cell<usize>,
}

impl Subscription {
    /// A subscription starting at `offset` of `epoch`: publications up to it are not its.
    pub(crate) fn new(conn: Rc<Conn>, channel: Arc<str>, offset: u64, epoch: Arc<str>) -> Self {
        Subscription {
            conn,
            channel,
            seq: Cell::new(0),
            start_offset: Cell::new(offset),
            start_epoch: epoch,
            slot: Cell::new(0),
        }
    }

    #[inline]
    pub(crate) fn next_seq(&self) -> u64 {
        let s = self.seq.get() + 1;
        self.seq.set(s);
        s
    }

    /// Whether `p` is for this subscription: a publication of its start epoch at or below its
    /// start offset was in flight when it started (its replay, if any, covered it).
    #[inline]
    pub(crate) fn takes(&self, p: &Publication) -> bool {
        let start = self.start_offset.get();
        if start > 0 {
            let same_epoch = p.epoch.as_ref().is_none_or(|e| *e == self.start_epoch);
            if same_epoch && p.offset <= start {
                return false;
            }
            self.start_offset.set(0);
        }
        true
    }

    #[inline]
    pub(crate) fn slot(&self) -> usize {
        self.slot.get()
    }

    pub(crate) fn set_slot(&self, slot: usize) {
        self.slot.set(slot);
    }
}
