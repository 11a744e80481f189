//! Questions about channels: a channel's history, and subscriber counts over every shard.

use super::{Pending, Shard};
use crate::channel::HistoryPage;
use crate::error::{err, Code, Error};
use crate::ring::ShardMsg;
use crate::route::{route, Route};
use futures_channel::oneshot;
use std::collections::HashMap;
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

    /// Subscriber counts of every channel with subscribers, summed over all shards.
    pub(crate) async fn channel_counts(self: &Rc<Self>) -> Result<HashMap<Arc<str>, usize>, Error> {
        let mut counts: HashMap<Arc<str>, usize> = HashMap::new();
        for (c, n) in self.subscriptions.counts() {
            *counts.entry(c).or_default() += n;
        }
        if self.node.shards == 1 {
            return Ok(counts);
        }
        let (tx, rx) = oneshot::channel();
        let token = self.await_answer(Pending::Channels {
            waiting: self.node.shards - 1,
            counts,
            done: Some(tx),
        });
        for peer in 0..self.node.shards {
            if peer != self.id {
                self.send(
                    peer,
                    ShardMsg::Channels {
                        token,
                        from: self.id,
                    },
                );
            }
        }
        rx.await
            .map_err(|_| err(Code::Unavailable, "a shard stopped"))
    }
}
