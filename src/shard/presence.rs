//! Presence on the shards (SPEC 16): a member's subscriptions counted by its channel's owner
//! (or, in cluster mode, by the node's Redis bridge), the owner's joins and leaves sent to the
//! watching shards through the rings like publications (so in order with them), and who is in
//! a channel.

use super::{Pending, Shard};
use crate::channel::{Asked, Position, PresenceChange};
use crate::error::{err, Code, Error};
use crate::presence::Kind;
use crate::ring::ShardMsg;
use crate::route::{route, Route};
use crate::webhook::Event;
use futures_channel::oneshot;
use std::rc::Rc;
use std::sync::Arc;

impl Shard {
    /// As the channel's owner: a subscribe from shard `from`. Its member is counted first (a
    /// join when new, sent to the shards already watching; ResourceExhausted beyond the cap),
    /// then the position, with the presence version and, when `list`, the members.
    pub(super) fn owner_subscribe(
        &self,
        from: usize,
        channel: &str,
        asked: &Asked,
    ) -> Result<Position, Error> {
        let Asked {
            start,
            member,
            list,
        } = asked;
        let member = member.as_ref();
        let was_watched = self.owned.borrow().watched(channel);
        let joined = match member {
            Some(member) => self.owned.borrow_mut().join(channel, member)?,
            None => None,
        };
        // Occupied before the member that made it so.
        if !was_watched {
            self.hook(Event::Occupied, channel, None);
        }
        if let (Some(member), Some(change)) = (member, joined) {
            self.presence_changed(Kind::Join, channel, &member.user, change);
        }
        let mut owned = self.owned.borrow_mut();
        let mut position = owned.subscribe(from, channel, start);
        if member.is_some() || self.node.rules.policy(channel).tracks_members() {
            let (version, members) = owned.presence(channel, *list);
            position.presence_version = Some(version);
            position.presence = members;
        }
        Ok(position)
    }

    /// As the channel's owner: one subscription of `user` ended (a leave when it was its last).
    pub(super) fn owner_leave(&self, channel: &str, user: &Arc<str>) {
        let change = self.owned.borrow_mut().leave(channel, user);
        if let Some(change) = change {
            self.presence_changed(Kind::Leave, channel, user, change);
        }
    }

    /// As the channel's owner: shard `from` has no subscriber of `channel` left.
    pub(super) fn owner_unwatch(&self, from: usize, channel: &str) {
        if self.owned.borrow_mut().unwatch(from, channel) {
            self.hook(Event::Vacated, channel, None);
        }
    }

    fn presence_changed(
        &self,
        kind: Kind,
        channel: &str,
        user: &str,
        (event, watchers): PresenceChange,
    ) {
        self.node.presence.changed(kind == Kind::Join);
        let hooked = match kind {
            Kind::Join => Event::MemberAdded,
            Kind::Leave => Event::MemberRemoved,
        };
        self.hook(hooked, channel, Some(user));
        if let Some(event) = event {
            self.send_to_watchers(&event, &watchers);
        }
    }

    /// A member's subscription on this shard ended: its owner (or Redis) counts it out.
    pub(crate) fn leave(&self, channel: &Arc<str>, user: &Arc<str>) {
        match route(&self.node, self.id, channel) {
            Route::Local => self.owner_leave(channel, user),
            Route::Peer(owner) => {
                let (channel, user) = (channel.clone(), user.clone());
                self.send(owner, ShardMsg::Leave { channel, user });
            }
            Route::Redis(bridge) => {
                let (channel, user) = (channel.clone(), user.clone());
                bridge.send(crate::cluster::Request::Leave { channel, user });
            }
        }
    }

    /// Who is in `channel` now: `{"members","count","version"}`.
    pub(crate) async fn presence(self: &Rc<Self>, channel: String) -> Result<Vec<u8>, Error> {
        let owner = match route(&self.node, self.id, &channel) {
            Route::Local => return Ok(self.owner_presence(&channel)),
            Route::Peer(owner) => owner,
            Route::Redis(bridge) => {
                let (reply, rx) = oneshot::channel();
                bridge.send(crate::cluster::Request::Presence { channel, reply });
                return rx
                    .await
                    .map_err(|_| err(Code::Unavailable, "cluster bridge stopped"))?;
            }
        };
        let (tx, rx) = oneshot::channel();
        let token = self.await_answer(Pending::Presence(tx));
        let from = self.id;
        self.send(
            owner,
            ShardMsg::Presence {
                token,
                from,
                channel,
            },
        );
        rx.await
            .map_err(|_| err(Code::Unavailable, "owner shard stopped"))
    }

    /// A presence message from another shard (`messages.rs` hands them here).
    pub(super) fn on_presence(&self, msg: ShardMsg) {
        match msg {
            ShardMsg::Leave { channel, user } => self.owner_leave(&channel, &user),
            ShardMsg::Presence {
                token,
                from,
                channel,
            } => {
                let body = self.owner_presence(&channel);
                self.send(from, ShardMsg::PresenceIs { token, body });
            }
            ShardMsg::PresenceIs { token, body } => {
                if let Some(Pending::Presence(tx)) = self.answer_for(token) {
                    let _ = tx.send(body);
                }
            }
            _ => debug_assert!(false, "not a presence message"),
        }
    }

    /// A transition this node made (this shard owns the channel), to the webhooks that want it.
    fn hook(&self, event: Event, channel: &str, user: Option<&str>) {
        if let Some(hooks) = &self.node.webhooks {
            hooks.emit(event, channel, user);
        }
    }

    fn owner_presence(&self, channel: &str) -> Vec<u8> {
        let (_, members) = self.owned.borrow().presence(channel, true);
        members.unwrap_or_default()
    }
}
