//! A shard's table of its local subscribers, per channel, with the subscribes in flight and the
//! publications held for them. Adding and removing keep the two indexes in step (the channel's
//! list, and each subscription's slot in it) and check that they are.

use crate::channel::Publication;
use crate::connection::Subscription;
use crate::constants::HELD_MAX;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

/// The shard-local subscribers of one channel.
#[derive(Default)]
struct Subscribers {
    subs: Vec<Rc<Subscription>>,
    /// Subscribes sent to the owner and not yet answered; they hold the owner's watch too.
    pending: usize,
    /// While subscribes are pending, the publications delivered meanwhile: in cluster mode the
    /// answer can arrive after publications newer than its offset, which the new subscription
    /// must still get. Bounded by `HELD_MAX`; empty whenever nothing is pending.
    held: Vec<Arc<Publication>>,
}

impl Subscribers {
    fn idle(&self) -> bool {
        self.subs.is_empty() && self.pending == 0
    }
}

/// Borrowed only inside these methods, never across an await.
#[derive(Default)]
pub(crate) struct Subscriptions(RefCell<HashMap<Arc<str>, Subscribers>>);

impl Subscriptions {
    /// A subscribe of `channel` goes out: pending until `answered` or `failed`. Returns the
    /// channel's name as the table keeps it (one allocation per channel, shared).
    pub(crate) fn begin(&self, channel: &str) -> Arc<str> {
        let mut table = self.0.borrow_mut();
        let name = match table.get_key_value(channel) {
            Some((name, _)) => name.clone(),
            None => {
                let name: Arc<str> = Arc::from(channel);
                table.insert(name.clone(), Subscribers::default());
                name
            }
        };
        if let Some(s) = table.get_mut(&name) {
            s.pending += 1;
        }
        name
    }

    /// A subscribe's answer came: the publications held while it was pending (for the last
    /// pending one, they are let go).
    pub(crate) fn answered(&self, channel: &Arc<str>) -> Vec<Arc<Publication>> {
        let mut table = self.0.borrow_mut();
        let Some(s) = table.get_mut(channel) else {
            return Vec::new();
        };
        assert!(s.pending > 0, "an answer for no pending subscribe");
        s.pending -= 1;
        if s.pending == 0 {
            std::mem::take(&mut s.held)
        } else {
            s.held.clone()
        }
    }

    /// A subscribe failed: it is no longer pending, and the channel is forgotten if idle
    /// (its owner already let go).
    pub(crate) fn failed(&self, channel: &Arc<str>) {
        let mut table = self.0.borrow_mut();
        if let Some(s) = table.get_mut(channel) {
            assert!(s.pending > 0, "a failure for no pending subscribe");
            s.pending -= 1;
            if s.pending == 0 {
                s.held.clear();
            }
            if s.idle() {
                table.remove(channel);
            }
        }
    }

    pub(crate) fn add(&self, sub: Rc<Subscription>) {
        let mut table = self.0.borrow_mut();
        let s = table.entry(sub.channel.clone()).or_default();
        sub.set_slot(s.subs.len());
        s.subs.push(sub);
        debug_assert!(s
            .subs
            .last()
            .is_some_and(|last| last.slot() == s.subs.len() - 1));
    }

    /// Removes `sub`; false when it was not in the table (already removed).
    pub(crate) fn remove(&self, sub: &Rc<Subscription>) -> bool {
        let mut table = self.0.borrow_mut();
        let Some(s) = table.get_mut(&sub.channel) else {
            return false;
        };
        let slot = sub.slot();
        if slot >= s.subs.len() || !Rc::ptr_eq(&s.subs[slot], sub) {
            return false;
        }
        s.subs.swap_remove(slot);
        if let Some(moved) = s.subs.get(slot) {
            moved.set_slot(slot);
            debug_assert!(Rc::ptr_eq(&s.subs[moved.slot()], moved));
        }
        true
    }

    /// Forgets `channel` when it has neither subscribers nor subscribes in flight here; true
    /// when it did (then its owner must stop sending its publications to this shard).
    pub(crate) fn forget_if_idle(&self, channel: &Arc<str>) -> bool {
        let mut table = self.0.borrow_mut();
        let idle = table.get(channel).is_some_and(Subscribers::idle);
        if idle {
            table.remove(channel);
        }
        idle
    }

    /// Holds `p` for the channel's subscribes in flight, then runs `deliver` over its
    /// subscribers; None when the channel has none here.
    #[inline]
    pub(crate) fn deliver_to<R>(
        &self,
        p: &Arc<Publication>,
        deliver: impl FnOnce(&[Rc<Subscription>]) -> R,
    ) -> Option<R> {
        let mut table = self.0.borrow_mut();
        let s = table.get_mut(&p.channel)?;
        if s.pending > 0 && s.held.len() < HELD_MAX {
            s.held.push(p.clone());
        }
        Some(deliver(&s.subs))
    }

    /// Every channel with subscribers here, with their number.
    pub(crate) fn counts(&self) -> Vec<(Arc<str>, usize)> {
        self.0
            .borrow()
            .iter()
            .filter(|(_, s)| !s.subs.is_empty())
            .map(|(c, s)| (c.clone(), s.subs.len()))
            .collect()
    }

    /// Channels in the table (with subscribers or subscribes in flight).
    pub(crate) fn len(&self) -> usize {
        self.0.borrow().len()
    }
}
