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
    slot: Cell<u32>,
    /// It made its connection's user a member of the channel: its end is a leave.
    member: bool,
    /// The offset of the last publication queued for it (at first, where it started): an SSE
    /// connection's event ids carry it.
    last_offset: Cell<u64>,
    /// Its place among its connection's subscriptions when it was added: an SSE connection
    /// subscribes in its URL's channel order, and its event ids list positions in that order.
    index: Cell<u16>,
    /// Set on an SSE connection's subscriptions once all of them exist: its event ids may
    /// then be written (`connection/event_stream.rs`).
    opened: Cell<bool>,
}

impl Subscription {
    /// A subscription starting at `offset` of `epoch`: publications up to it are not its.
    /// `member`: it counts its connection's user as a member of the channel.
    pub(crate) fn new(
        conn: Rc<Conn>,
        channel: Arc<str>,
        offset: u64,
        epoch: Arc<str>,
        member: bool,
    ) -> Self {
        Subscription {
            conn,
            channel,
            seq: Cell::new(0),
            start_offset: Cell::new(offset),
            start_epoch: epoch,
            slot: Cell::new(0),
            member,
            last_offset: Cell::new(offset),
            index: Cell::new(0),
            opened: Cell::new(false),
        }
    }

    /// It counts its connection's user as a member of the channel.
    pub(crate) fn is_member(&self) -> bool {
        self.member
    }

    /// The `seq` of the publication at `offset`, queued now for this subscription.
    #[inline]
    pub(crate) fn next_seq(&self, offset: u64) -> u64 {
        let s = self.seq.get() + 1;
        self.seq.set(s);
        self.last_offset.set(offset);
        s
    }

    /// Where the subscription is: its epoch and the offset last queued for it.
    pub(crate) fn position(&self) -> (&str, u64) {
        (&self.start_epoch, self.last_offset.get())
    }

    pub(crate) fn index(&self) -> usize {
        usize::from(self.index.get())
    }

    pub(super) fn opened(&self) -> bool {
        self.opened.get()
    }

    pub(super) fn set_opened(&self) {
        self.opened.set(true);
    }

    pub(super) fn set_index(&self, index: usize) {
        self.index.set(u16::try_from(index).unwrap_or(u16::MAX));
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
        self.slot.get() as usize
    }

    pub(crate) fn set_slot(&self, slot: usize) {
        // A channel's subscribers on one shard are bounded by its connections, far below 2^32.
        self.slot.set(slot as u32);
    }
}
