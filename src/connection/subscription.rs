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
        }
    }

    /// It counts its connection's user as a member of the channel.
    pub(crate) fn is_member(&self) -> bool {
        self.member
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
        self.slot.get() as usize
    }

    pub(crate) fn set_slot(&self, slot: usize) {
        // A channel's subscribers on one shard are bounded by its connections, far below 2^32.
        self.slot.set(slot as u32);
    }
}
