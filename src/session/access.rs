//! Who may subscribe where (SPEC 14, 15): the channel's rule says token, public or proxy; a
//! token's `authorizedChannels` decide the first, nobody is refused the second, and the backend
//! decides the third, again at the `expireAt` it gave. Also where a subscription starts, and the
//! connect proxy (`auth` with `{"proxy":true}`).

use super::Session;
use crate::auth::Permissions;
use crate::clock::unix_now;
use crate::connection::Conn;
use crate::error::{err, Code, Error};
use crate::rules::{Access, Policy};
use crate::shard::Shard;
use crate::wire::reply;
use crate::wire::request::Start;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

/// After a re-check the backend could not answer (timeout, 5xx, garbage), the subscription is
/// kept and asked about again this much later: an outage of the backend must not end every
/// subscription at once.
const RECHECK_RETRY: Duration = Duration::from_secs(10);
/// The shortest time between two checks of one subscription.
const RECHECK_MIN: Duration = Duration::from_secs(1);
/// The longest a re-check task sleeps before it looks whether its subscription still exists.
const RECHECK_STEP: Duration = Duration::from_secs(30);

/// Why `subscribe` is refused before anything is asked, if it is.
pub(crate) fn refusal(access: Access, perms: Option<&Permissions>, channel: &str) -> Option<Error> {
    match (access, perms) {
        (Access::Public | Access::Proxy, _) => None,
        // SPEC 22.4: Unauthenticated, not PermissionDenied: a token would change the answer.
        (Access::Token, None) => Some(err(
            Code::Unauthenticated,
            "this channel needs auth first (it is not public)",
        )),
        (Access::Token, Some(p)) if p.can_subscribe && p.allows_channel(channel) => None,
        (Access::Token, Some(_)) => Some(err(
            Code::PermissionDenied,
            "token does not allow subscribing to this channel",
        )),
    }
}

/// Where a subscription starts: as asked, or the rule's `rewind_default`; a `rewind` beyond
/// what the channel keeps or `limits.rewind_max` is InvalidArgument.
pub(crate) fn start(
    policy: &Policy,
    asked: Option<Start>,
    rewind_max: usize,
) -> Result<Start, Error> {
    let most = policy.history_size.min(rewind_max);
    match asked {
        Some(Start::Rewind(n)) if n > most => Err(err(
            Code::InvalidArgument,
            format!("rewind must be between 0 and {most} on this channel (its history_size and limits.rewind_max)"),
        )),
        Some(start) => Ok(start),
        None if policy.rewind_default > 0 => Ok(Start::Rewind(policy.rewind_default.min(most))),
        None => Ok(Start::Live),
    }
}

/// Asks the backend whether this connection may subscribe to `channel` (a proxy channel):
/// `Ok(expire_at)` when allowed, with the Unix second to ask again at, if any.
pub(super) async fn ask(
    shard: &Rc<Shard>,
    conn: &Conn,
    session: &Session,
    channel: &str,
) -> Result<Option<u64>, Error> {
    let Some(proxy) = shard.proxy.as_ref() else {
        return Err(err(Code::Internal, "no access proxy configured"));
    };
    let user = session.perms.as_ref().map(|p| &*p.sub);
    let call = crate::proxy::SubscribeCall {
        channel,
        user,
        connection: conn.id,
        headers: &conn.client_headers(),
        cached: true,
    };
    proxy.subscribe(shard.metrics(), call).await
}

/// At `at` (Unix seconds) asks the backend again about `conn`'s subscription to `channel`; a
/// denial ends it with `unsubscribed`, reason `expired`; another `expireAt` schedules the next
/// check. The task holds the connection and the subscription weakly, so a closed connection
/// is not kept alive until then. `user` is the connection's (its token's `sub`), if any; an
/// SSE stream's opening calls this too.
pub(crate) fn recheck_at(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    user: Option<Arc<str>>,
    channel: &str,
    at: u64,
) {
    let Some(sub) = conn.subscription(channel) else {
        return;
    };
    let (sub, weak_conn) = (Rc::downgrade(&sub), Rc::downgrade(conn));
    let headers = conn.client_headers();
    let (shard, channel) = (shard.clone(), channel.to_string());
    let id = conn.id;
    glommio::spawn_local(async move {
        // At least RECHECK_MIN apart: an expireAt already past must not make a busy loop.
        let mut at = at.max(unix_now() + RECHECK_MIN.as_secs());
        loop {
            // In steps of at most RECHECK_STEP, so the task of a subscription that ended
            // meanwhile ends soon too, not at a far expireAt.
            let left = Duration::from_secs(at.saturating_sub(unix_now()));
            glommio::timer::sleep(left.min(RECHECK_STEP)).await;
            let (Some(conn), Some(sub)) = (weak_conn.upgrade(), sub.upgrade()) else {
                return;
            };
            if conn.is_closing() {
                return;
            }
            if unix_now() < at {
                continue;
            }
            let Some(proxy) = shard.proxy.as_ref() else {
                return;
            };
            let call = crate::proxy::SubscribeCall {
                channel: &channel,
                user: user.as_deref(),
                connection: id,
                headers: &headers,
                cached: false,
            };
            at = match proxy.subscribe(shard.metrics(), call).await {
                Ok(Some(next)) => next.max(unix_now() + RECHECK_MIN.as_secs()),
                Ok(None) => return,
                Err(e) if matches!(e.code, Code::Unavailable | Code::Internal) => {
                    unix_now() + RECHECK_RETRY.as_secs()
                }
                Err(_) => {
                    if conn.remove_this_subscription(&sub) {
                        shard.unsubscribe(&sub, user.as_deref());
                        conn.notify(&reply::unsubscribed(&channel, "expired"));
                    }
                    return;
                }
            };
        }
    })
    .detach();
}

/// `auth` with `{"proxy":true}`: the backend's connect answer becomes the connection's
/// permissions, as a JWT's claims would.
pub(super) async fn connect(shard: &Rc<Shard>, conn: &Rc<Conn>) -> Result<Permissions, Error> {
    let Some(proxy) = shard.proxy.as_ref() else {
        return Err(crate::proxy::no_connect_url());
    };
    let perms = proxy
        .connect(shard.metrics(), conn.id, &conn.client_headers())
        .await?;
    if perms.exp <= unix_now() {
        return Err(err(
            Code::Unauthenticated,
            "the backend's answer has expired",
        ));
    }
    Ok(perms)
}
