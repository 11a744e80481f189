//! Subscribing without gaps: a subscription starts at the moment its owner's answer arrives in
//! ring order; unsubscribing; and letting the owner know when no subscriber is left here.

use super::{Pending, Shard, SubscribeRequest};
use crate::channel::{Asked, Position, Publication};
use crate::connection::{Conn, Subscription};
use crate::error::Error;
use crate::metrics::ShardMetrics;
use crate::ring::ShardMsg;
use crate::route::{route, Route};
use crate::wire::reply;
use futures_channel::oneshot;
use std::rc::Rc;
use std::sync::Arc;

impl Shard {
    /// Starts a subscription for `conn`. It becomes active, and its response is queued, at the
    /// moment the owner's answer arrives in ring order, so no publication after the answer's
    /// offset can be missed and none before it is delivered. The returned receiver completes
    /// then. With `asked.member` (the channel counts members), the subscription counts its
    /// user in; with `asked.list`, the response lists the members.
    pub fn subscribe(
        self: &Rc<Self>,
        conn: &Rc<Conn>,
        request_id: Option<&[u8]>,
        channel: &str,
        asked: Asked,
    ) -> oneshot::Receiver<()> {
        let (done, rx) = oneshot::channel();
        let channel = self.subscriptions.begin(channel);
        let request = SubscribeRequest {
            conn: conn.clone(),
            request_id: request_id.map(<[u8]>::to_vec),
            channel: channel.clone(),
            member: asked.member.as_ref().map(|m| m.user.clone()),
            done,
        };
        match route(&self.node, self.id, &channel) {
            Route::Local => match self.owner_subscribe(self.id, &channel, &asked) {
                Ok(position) => self.subscribed(request, position),
                Err(error) => self.subscribe_failed(request, &error),
            },
            Route::Peer(owner) => {
                let token = self.await_answer(Pending::Subscribe(request));
                let from = self.id;
                let msg = ShardMsg::Subscribe {
                    token,
                    from,
                    channel,
                    asked,
                };
                self.send(owner, msg);
            }
            Route::Redis(bridge) => {
                let token = self.await_answer(Pending::Subscribe(request));
                let shard = self.id;
                let request = crate::cluster::Request::Watch {
                    shard,
                    token,
                    channel,
                    asked,
                };
                bridge.send(request);
            }
        }
        rx
    }

    /// A subscribe message from another shard (`messages.rs` hands them here): as the owner,
    /// a subscribe to answer; as the subscriber's shard, the answer.
    pub(super) fn on_subscribe(&self, msg: ShardMsg) {
        match msg {
            ShardMsg::Subscribe {
                token,
                from,
                channel,
                asked,
            } => {
                let msg = match self.owner_subscribe(from, &channel, &asked) {
                    Ok(position) => ShardMsg::Subscribed { token, position },
                    Err(error) => ShardMsg::SubscribeFailed { token, error },
                };
                self.send(from, msg);
            }
            ShardMsg::Subscribed { token, position } => {
                if let Some(Pending::Subscribe(request)) = self.answer_for(token) {
                    self.subscribed(request, position);
                }
            }
            ShardMsg::SubscribeFailed { token, error } => {
                if let Some(Pending::Subscribe(request)) = self.answer_for(token) {
                    self.subscribe_failed(request, &error);
                }
            }
            _ => debug_assert!(false, "not a subscribe message"),
        }
    }

    /// The owner answered a subscribe with the channel's position: the subscription starts
    /// here. The response is queued first, then what was missed, then (later) live
    /// publications.
    pub(super) fn subscribed(&self, request: SubscribeRequest, position: Position) {
        let SubscribeRequest {
            conn,
            request_id,
            channel,
            member,
            done,
        } = request;
        let held = self.subscriptions.answered(&channel);
        if conn.is_closing() {
            if let Some(user) = &member {
                self.leave(&channel, user);
            }
            self.release(&channel);
            let _ = done.send(());
            return;
        }
        let n = self.next_subscription.get() + 1;
        self.next_subscription.set(n);
        let (offset, epoch) = (position.offset, position.epoch.clone());
        let is_member = member.is_some();
        let sub = Rc::new(Subscription::new(
            conn.clone(),
            channel,
            offset,
            epoch,
            is_member,
        ));
        self.subscriptions.add(sub.clone());
        conn.add_subscription(sub.clone());
        ShardMetrics::gauge(&self.metrics().subscriptions_total, 1);
        let body = reply::subscribed(
            &format!("{}-{}", self.id, n),
            &crate::clock::now_rfc3339(),
            position.offset,
            &position.epoch,
            position.recovered,
            position.rewound,
            position.presence.as_deref(),
        );
        conn.respond(request_id.as_deref(), Ok(&body));
        // Held joins and leaves count by version: those at or below the answer's are in the
        // members it listed.
        let newer = |p: &&Arc<Publication>| match p.presence {
            Some(version) => position.presence_version.is_none_or(|v| version > v),
            None => {
                p.offset > position.offset || p.epoch.as_ref().is_some_and(|e| *e != position.epoch)
            }
        };
        let (metrics, flusher) = (self.metrics(), &self.send.flusher);
        for publication in position.replay.iter().chain(held.iter().filter(newer)) {
            if publication.presence.is_some() {
                conn.enqueue_notification(publication, metrics, flusher);
            } else {
                let seq = sub.next_seq(publication.offset);
                conn.enqueue_broadcast(publication, seq, metrics, flusher);
            }
        }
        let _ = done.send(());
    }

    /// A subscribe could not be set up (cluster mode: Redis unreachable): its request gets the
    /// error.
    pub(super) fn subscribe_failed(&self, request: SubscribeRequest, error: &Error) {
        self.subscriptions.failed(&request.channel);
        self.metrics().rejected(error.code);
        let id = request.request_id.as_deref();
        request.conn.respond(id, Err(error));
        let _ = request.done.send(());
    }

    /// Removes one subscription of a connection (unsubscribe, re-auth narrowing, or close);
    /// `user` is the connection's, whose membership a member subscription ends.
    pub(crate) fn unsubscribe(&self, sub: &Rc<Subscription>, user: Option<&str>) {
        if !self.subscriptions.remove(sub) {
            return;
        }
        ShardMetrics::gauge(&self.metrics().subscriptions_total, -1);
        if sub.is_member() {
            debug_assert!(user.is_some(), "a member subscription has a user");
            if let Some(user) = user {
                self.leave(&sub.channel, &Arc::from(user));
            }
        }
        self.release(&sub.channel);
    }

    /// When a channel has neither subscribers nor pending subscribes here, tells its owner to
    /// stop sending its publications to this shard.
    fn release(&self, channel: &Arc<str>) {
        if !self.subscriptions.forget_if_idle(channel) {
            return;
        }
        match route(&self.node, self.id, channel) {
            Route::Local => self.owner_unwatch(self.id, channel),
            Route::Peer(owner) => {
                let (from, channel) = (self.id, channel.clone());
                self.send(owner, ShardMsg::Unwatch { from, channel });
            }
            Route::Redis(bridge) => {
                let (shard, channel) = (self.id, channel.clone());
                bridge.send(crate::cluster::Request::Unwatch { shard, channel });
            }
        }
    }
}
