//! What another shard, or the Redis bridge, says to this one: one small fn per message, behind
//! one dispatch. None waits: replies go to outboxes.

use super::{Pending, Shard};
use crate::channel::Publication;
use crate::ring::{Ack, ShardMsg};
use std::sync::Arc;

impl Shard {
    /// Handles one message, in ring order.
    pub(crate) fn on_ring(&self, msg: ShardMsg) {
        match msg {
            ShardMsg::Publish {
                token,
                from,
                params,
                accepted,
            } => {
                let ack = self.owner_publish(&params, accepted);
                self.send(from, ShardMsg::Published { token, ack });
            }
            ShardMsg::Published { token, ack } => self.published(token, ack),
            msg @ (ShardMsg::Subscribe { .. }
            | ShardMsg::Subscribed { .. }
            | ShardMsg::SubscribeFailed { .. }) => self.on_subscribe(msg),
            msg
            @ (ShardMsg::Control { .. } | ShardMsg::ControlDone { .. } | ShardMsg::Apply(_)) => {
                self.on_control(msg)
            }
            msg @ (ShardMsg::Leave { .. }
            | ShardMsg::Presence { .. }
            | ShardMsg::PresenceIs { .. }) => self.on_presence(msg),
            ShardMsg::Unwatch { from, channel } => self.owner_unwatch(from, &channel),
            ShardMsg::Deliver(publication) => self.deliver(&publication),
            ShardMsg::History {
                token,
                from,
                channel,
                limit,
            } => {
                let (items, offset, epoch) = self.owned.borrow_mut().history(&channel, limit);
                let msg = ShardMsg::HistoryIs {
                    token,
                    items,
                    offset,
                    epoch,
                };
                self.send(from, msg);
            }
            ShardMsg::HistoryIs {
                token,
                items,
                offset,
                epoch,
            } => self.history_is(token, items, offset, epoch),
            ShardMsg::Channels { token, from } => {
                let counts = self.subscriptions.counts();
                let users = self.owned.borrow().member_counts();
                let msg = ShardMsg::ChannelsAre {
                    token,
                    counts,
                    users,
                };
                self.send(from, msg);
            }
            ShardMsg::ChannelsAre {
                token,
                counts,
                users,
            } => self.channels_are(token, counts, users),
        }
    }

    fn published(&self, token: u64, ack: Ack) {
        if let Some(Pending::Publish(tx)) = self.answer_for(token) {
            let _ = tx.send(ack);
        }
    }

    fn history_is(&self, token: u64, items: Vec<Arc<Publication>>, offset: u64, epoch: String) {
        if let Some(Pending::History(tx)) = self.answer_for(token) {
            let _ = tx.send((items, offset, epoch));
        }
    }

    /// One peer's subscriber and member counts; the request completes with the last.
    fn channels_are(
        &self,
        token: u64,
        counts: Vec<(Arc<str>, usize)>,
        users: Vec<(Arc<str>, usize)>,
    ) {
        self.gathered(token, Pending::channels, |sum| {
            for (c, n) in counts {
                *sum.subscribers.entry(c).or_insert(0) += n;
            }
            for (c, n) in users {
                *sum.users.entry(c).or_insert(0) += n;
            }
        });
    }
}
