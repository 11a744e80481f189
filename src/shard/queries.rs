//! Questions about channels: a channel's history, and subscriber counts over every shard.

use super::{ChannelCounts, Pending, Shard};
use crate::channel::HistoryPage;
use crate::error::{err, Code, Error};
use crate::ring::ShardMsg;
use crate::route::{route, Route};
use futures_channel::oneshot;
use std::rc::Rc;
use std::sync::Arc;

impl Shard {
    pub(crate) async fn history(
        self: &Rc<Self>,
        channel: String,
        limit: usize,
    ) -> Result<HistoryPage, Error> {
        let owner = match route(&self.node, self.id, &channel) {
            Route::Local => return Ok(self.owned.borrow_mut().history(&channel, limit)),
            Route::Peer(owner) => owner,
            Route::Redis(bridge) => {
                let (reply, rx) = oneshot::channel();
                bridge.send(crate::cluster::Request::History {
                    channel,
                    limit,
                    reply,
                });
                return rx
                    .await
                    .map_err(|_| err(Code::Unavailable, "cluster bridge stopped"))?;
            }
        };
        let (tx, rx) = oneshot::channel();
        let token = self.await_answer(Pending::History(tx));
        self.send(
            owner,
            ShardMsg::History {
                token,
                from: self.id,
                channel,
                limit,
            },
        );
        rx.await
            .map_err(|_| err(Code::Unavailable, "owner shard stopped"))
    }

    /// Subscriber counts of every channel with subscribers, summed over all shards, and the
    /// members of the channels that count them (in cluster mode, of those with subscribers
    /// here, from Redis).
    pub(crate) async fn channel_counts(self: &Rc<Self>) -> Result<ChannelCounts, Error> {
        let mut counts = ChannelCounts::default();
        for (c, n) in self.subscriptions.counts() {
            *counts.subscribers.entry(c).or_default() += n;
        }
        counts.users.extend(self.owned.borrow().member_counts());
        let counts = if self.node.shards == 1 {
            counts
        } else {
            self.peer_counts(counts).await?
        };
        match &self.node.bridge {
            Some(bridge) => self.cluster_users(bridge, counts).await,
            None => Ok(counts),
        }
    }

    /// Members of this node's channels that count them, as Redis has them.
    async fn cluster_users(
        &self,
        bridge: &crate::cluster::Bridge,
        mut counts: ChannelCounts,
    ) -> Result<ChannelCounts, Error> {
        let rules = &self.node.rules;
        let channels: Vec<Arc<str>> = counts
            .subscribers
            .keys()
            .filter(|c| rules.policy(c).tracks_members())
            .cloned()
            .collect();
        if channels.is_empty() {
            return Ok(counts);
        }
        let (reply, rx) = oneshot::channel();
        bridge.send(crate::cluster::Request::MemberCounts { channels, reply });
        let users = rx
            .await
            .map_err(|_| err(Code::Unavailable, "cluster bridge stopped"))??;
        counts.users = users.into_iter().collect();
        Ok(counts)
    }

    /// `counts` with every peer shard's added.
    async fn peer_counts(self: &Rc<Self>, counts: ChannelCounts) -> Result<ChannelCounts, Error> {
        let from = self.id;
        let ask = |token| ShardMsg::Channels { token, from };
        self.ask_peers(counts, Pending::Channels, ask)
            .await
            .map_err(|_| err(Code::Unavailable, "a shard stopped"))
    }
}
