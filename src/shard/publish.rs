//! The one publish entry for REST and WebSocket, and sequencing a publication as its owner.

use super::{Pending, Shard};
use crate::error::{err, Code, Error};
use crate::metrics::ShardMetrics;
use crate::ring::{Ack, ShardMsg, Submitted};
use crate::route::{route, Route};
use crate::wire::request::PublishParams;
use futures_channel::oneshot;
use std::rc::Rc;
use std::time::Instant;

impl Shard {
    /// The one publish entry for REST and WebSocket: route to the owner shard, wait for the ack.
    pub(crate) async fn publish(self: &Rc<Self>, params: PublishParams) -> Result<Ack, Error> {
        self.submit(params).wait().await
    }

    /// Sends a publication on its way without waiting: publications submitted one after another
    /// from one shard keep their order, so `/broadcast` submits all, then waits for all.
    pub(crate) fn submit(self: &Rc<Self>, params: PublishParams) -> Submitted {
        if self.node.is_shutting_down() {
            return Submitted::Done(Err(err(Code::Unavailable, "server is shutting down")));
        }
        ShardMetrics::add(&self.metrics().messages_received_total, 1);
        let accepted = Instant::now();
        let owner = match route(&self.node, self.id, &params.channel) {
            Route::Local => return Submitted::Done(Ok(self.owner_publish(&params, accepted))),
            Route::Peer(owner) => owner,
            Route::Redis(bridge) => {
                if !bridge.is_up() {
                    return Submitted::Done(Err(err(
                        Code::Unavailable,
                        "cluster broker unreachable; retry",
                    )));
                }
                let (reply, rx) = oneshot::channel();
                bridge.send(crate::cluster::Request::Publish {
                    params,
                    accepted,
                    reply,
                });
                return Submitted::Bridge(rx);
            }
        };
        let (tx, rx) = oneshot::channel();
        let token = self.await_answer(Pending::Publish(tx));
        self.send(
            owner,
            ShardMsg::Publish {
                token,
                from: self.id,
                params,
                accepted,
            },
        );
        Submitted::Ring(rx)
    }

    pub(super) fn owner_publish(&self, p: &PublishParams, accepted: Instant) -> Ack {
        let n = self.next_publication.get() + 1;
        self.next_publication.set(n);
        let id = format!("{}-{}-{}", self.node.node_id, self.id, n);
        let now = crate::clock::now_rfc3339();
        let (publication, watchers) = self.owned.borrow_mut().publish(p, &id, &now, accepted);
        self.send_to_watchers(&publication, &watchers);
        Ack {
            id: publication.id.clone(),
            create_time: publication.create_time.clone(),
            offset: publication.offset,
        }
    }
}
