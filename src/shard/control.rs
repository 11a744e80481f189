//! The backend's `/disconnect`, `/unsubscribe` and `/revoke` (SPEC 17): on this shard's connections, on
//! every shard of the node through the rings, and in cluster mode on every node through Redis.

use super::{Pending, Shard};
use crate::auth::Issued;
use crate::error::{err, Code, Error};
use crate::ring::ShardMsg;
use crate::wire::reply;
use crate::wire::request::Control;
use futures_channel::oneshot;
use std::rc::Rc;
use std::sync::Arc;

impl Shard {
    /// Applies `op` on every shard of this node and hands it to the other nodes; returns how
    /// many connections (disconnect) or subscriptions (unsubscribe) it ended on this node.
    /// With Redis unreachable it still applies here, and answers Unavailable so that the
    /// backend retries.
    pub(crate) async fn control(self: &Rc<Self>, op: Control) -> Result<usize, Error> {
        if let Control::Revoke(r) = &op {
            // In the node's table before any shard looks: an `auth` after this point refuses
            // the token, one before it is in a shard's index when the close reaches it.
            let full = self
                .node
                .revocations
                .insert(r, crate::clock::unix_ms())
                .is_err();
            if full {
                let why = "auth.revocations_max revocations are held; retry when some expire";
                return Err(err(Code::ResourceExhausted, why));
            }
        }
        let op = Arc::new(op);
        let mut count = self.apply_control(&op);
        if self.node.shards > 1 {
            let from = self.id;
            let ask = |token| ShardMsg::Control {
                token,
                from,
                op: op.clone(),
            };
            count += self
                .ask_peers(0, Pending::Control, ask)
                .await
                .map_err(|_| err(Code::Unavailable, "a shard stopped"))?;
        }
        if let Some(bridge) = &self.node.bridge {
            let (reply, rx) = oneshot::channel();
            bridge.send(crate::cluster::Request::Control { op, reply });
            rx.await
                .map_err(|_| err(Code::Unavailable, "cluster bridge stopped"))??;
        }
        Ok(count)
    }

    /// `op` on this shard's connections; returns how many connections or subscriptions ended.
    pub(crate) fn apply_control(&self, op: &Control) -> usize {
        match op {
            Control::Disconnect { user, code, reason } => {
                let ids = self.users.borrow().of(user);
                let conns = ids.into_iter().filter_map(|id| self.conn(id));
                let open: Vec<_> = conns.filter(|c| !c.is_closing()).collect();
                for conn in &open {
                    conn.close(*code, reason, false);
                }
                open.len()
            }
            Control::Unsubscribe { user, pattern } => {
                let ids = self.users.borrow().of(user);
                let mut ended = 0;
                for conn in ids.into_iter().filter_map(|id| self.conn(id)) {
                    let matched = |c: &str| crate::rules::matches(pattern, c);
                    for sub in conn.remove_subscriptions_unless(|c| !matched(c)) {
                        self.unsubscribe(&sub, Some(user));
                        conn.notify(&reply::unsubscribed(&sub.channel, "server"));
                        ended += 1;
                    }
                }
                ended
            }
            Control::Revoke(r) => {
                let taken = self.users.borrow().revoked(r);
                let mut closed = 0;
                for (user, id) in taken {
                    let Some(conn) = self.conn(id).filter(|c| !c.is_closing()) else {
                        continue;
                    };
                    for sub in conn.remove_subscriptions_unless(|_| false) {
                        self.unsubscribe(&sub, Some(&user));
                        conn.notify(&reply::unsubscribed(&sub.channel, "revoked"));
                    }
                    conn.close(crate::error::close::REVOKED, "token revoked", false);
                    closed += 1;
                }
                closed
            }
        }
    }

    /// A control message from another shard, or from the bridge (another node's request).
    pub(super) fn on_control(&self, msg: ShardMsg) {
        match msg {
            ShardMsg::Control { token, from, op } => {
                let count = self.apply_control(&op);
                self.send(from, ShardMsg::ControlDone { token, count });
            }
            ShardMsg::ControlDone { token, count } => self.control_done(token, count),
            ShardMsg::Apply(op) => {
                self.apply_control(&op);
            }
            _ => debug_assert!(false, "not a control message"),
        }
    }

    /// One peer's count; the request completes with the last.
    fn control_done(&self, token: u64, n: usize) {
        self.gathered(token, Pending::control, |count| *count += n);
    }

    /// Connection `id` authenticated as `user` with a token `issued` so (each `auth`).
    pub(crate) fn user_authenticated(&self, user: &Arc<str>, id: u64, issued: &Issued) {
        self.users.borrow_mut().add(user, id, issued);
    }

    /// Connection `id` of `user` ended.
    pub(crate) fn user_ended(&self, user: &str, id: u64) {
        self.users.borrow_mut().remove(user, id);
    }
}
