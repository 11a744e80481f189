//! One small function per request method behind one dispatch, the way mini-redis's `cmd/`
//! applies its commands. Each answers on the connection; an `Err` closes it.

use super::access;
use super::rate_limit::Verdict;
use super::Session;
use crate::auth::{Issued, Permissions};
use crate::channel::Asked;
use crate::clock::now_rfc3339;
use crate::connection::Conn;
use crate::error::{close, err, Close, Code, Error};
use crate::metrics::ShardMetrics;
use crate::presence::Member;
use crate::rules::Access;
use crate::shard::Shard;
use crate::wire::frame::Message;
use crate::wire::reply;
use crate::wire::request::{self, Method, PublishParams, Start};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Instant;

/// What handling a message leaves: go on, or close with this.
pub(super) type Outcome = Result<(), Close>;

/// Handles one complete message from the client.
pub(super) async fn handle(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    session: &mut Session,
    message: Message<'_>,
) -> Outcome {
    match message {
        Message::Text(text) => request(shard, conn, session, text).await,
        Message::Binary(_) => {
            let e = err(
                Code::InvalidArgument,
                "binary frames are not supported; send JSON text",
            );
            fail(shard, conn, None, &e);
            match session.rate.take(Instant::now()) {
                Verdict::Allow => Ok(()),
                verdict => rate_limited(shard, conn, None, verdict),
            }
        }
        Message::Ping(payload) => {
            conn.pong(payload);
            Ok(())
        }
        Message::Pong => Ok(()),
        // Echo the peer's code (RFC 6455 5.5.1), then close.
        Message::Close(code) => Err(Close::new(code.unwrap_or(close::NORMAL), "")),
    }
}

/// A text frame: one request, parsed, counted against the rate limit, dispatched.
///
/// The methods that wait (subscribe, publish) are boxed: their state exists only while they
/// are in flight, and keeping it out of this future keeps the request's box in a smaller
/// allocator size class than the connection's task (sharing one fragmented the task's pages:
/// measured +150-500 B per idle connection).
async fn request(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    session: &mut Session,
    text: &[u8],
) -> Outcome {
    thread_local! {
        // simd-json parses in place; one copy buffer per shard, not one per connection.
        static SCRATCH: RefCell<crate::wire::json::Scratch> =
            const { RefCell::new(crate::wire::json::Scratch::new()) };
    }
    let payload_max = shard.config().limits.max_payload_bytes;
    let request = SCRATCH.with(|s| request::parse_request(text, &mut s.borrow_mut(), payload_max));
    let verdict = session.rate.take(Instant::now());
    let request = match request {
        Ok(r) => r,
        Err(rejected) if verdict == Verdict::Allow => {
            fail(shard, conn, rejected.id, &rejected.error);
            return Ok(());
        }
        Err(rejected) => return rate_limited(shard, conn, rejected.id, verdict),
    };
    let id = request.id;
    if verdict != Verdict::Allow {
        return rate_limited(shard, conn, id, verdict);
    }
    // Unauthenticated wins over a bad parameter of a method that needs auth.
    let method = match request.method {
        _ if request.method_needs_auth && session.perms.is_none() => {
            fail(shard, conn, id, &unauthenticated());
            return Ok(());
        }
        Ok(m) => m,
        Err(e) => {
            fail(shard, conn, id, &e);
            return Ok(());
        }
    };
    match method {
        Method::Heartbeat => heartbeat(conn, id),
        Method::Auth { token } => match verify(shard, &token) {
            Ok((perms, issued)) => authenticated(shard, conn, session, id, perms, &issued),
            Err(e) => {
                ShardMetrics::add(&shard.metrics().auth_failures_total, 1);
                fail(shard, conn, id, &e);
            }
        },
        Method::AuthProxy => match Box::pin(access::connect(shard, conn)).await {
            Ok(perms) => {
                // The backend's answer stands for a token issued now (a `/revoke` by time
                // before this does not take it).
                let issued = Issued {
                    iat: crate::clock::unix_now(),
                    jti: None,
                };
                authenticated(shard, conn, session, id, perms, &issued)
            }
            Err(e) => fail(shard, conn, id, &e),
        },
        Method::Subscribe { channel, start } => {
            Box::pin(subscribe(shard, conn, session, id, &channel, start)).await
        }
        Method::Unsubscribe { channel } => unsubscribe(shard, conn, session, id, &channel),
        Method::Publish(params) => match session.perms.as_ref() {
            Some(perms) => Box::pin(publish(shard, conn, perms, id, params)).await,
            None => fail(shard, conn, id, &unauthenticated()),
        },
        Method::Presence { channel } => Box::pin(presence(shard, conn, session, id, channel)).await,
    }
    Ok(())
}

/// A token's permissions, unless it is invalid or revoked (Unauthenticated).
pub(crate) fn verify(shard: &Shard, token: &str) -> Result<(Permissions, Issued), Error> {
    let node = &shard.node;
    let (perms, issued) = node
        .verifier
        .verify_issued(token)
        .map_err(|e| err(Code::Unauthenticated, e.0))?;
    let jti = issued.jti.as_deref();
    if node
        .revocations
        .revoked(&perms.sub, issued.iat, jti, crate::clock::unix_ms())
    {
        let why = "token revoked; get a new token from the backend";
        return Err(err(Code::Unauthenticated, why));
    }
    Ok((perms, issued))
}

fn unauthenticated() -> Error {
    err(Code::Unauthenticated, "send auth with a valid token first")
}

/// Answers a request refused for rate, or closes with 4004.
fn rate_limited(shard: &Shard, conn: &Rc<Conn>, id: Option<&[u8]>, verdict: Verdict) -> Outcome {
    if verdict == Verdict::Close {
        tracing::info!(conn = conn.id, "closed for too many requests (4004)");
        return Err(Close::new(close::TOO_MANY_REQUESTS, "too many requests"));
    }
    let e = err(
        Code::ResourceExhausted,
        "request rate over the limit; slow down",
    );
    fail(shard, conn, id, &e);
    Ok(())
}

/// Answers an error, counted in `rejected_requests_total`.
fn fail(shard: &Shard, conn: &Rc<Conn>, id: Option<&[u8]>, e: &Error) {
    shard.metrics().rejected(e.code);
    conn.respond(id, Err(e));
}

fn heartbeat(conn: &Rc<Conn>, id: Option<&[u8]>) {
    conn.respond(id, Ok(&reply::heartbeat(&now_rfc3339())));
}

/// `auth` succeeded, first or again (with a JWT or through the connect proxy): a fresher token
/// of the same `sub` refreshes the permissions, and the subscriptions a narrower token no
/// longer allows are dropped. The connection stops counting as anonymous.
fn authenticated(
    shard: &Shard,
    conn: &Rc<Conn>,
    session: &mut Session,
    id: Option<&[u8]>,
    perms: Permissions,
    issued: &Issued,
) {
    if let Some(old) = &session.perms {
        if old.sub != perms.sub {
            let e = err(
                Code::FailedPrecondition,
                "re-auth must keep the same sub; open a new connection",
            );
            return fail(shard, conn, id, &e);
        }
        let rules = &shard.node.rules;
        // Public and proxy subscriptions stay: the token never decided them.
        let allowed = |c: &str| access::refusal(rules.policy(c).access, Some(&perms), c).is_none();
        // Each dropped subscription is told, before the auth answer (SPEC 17: reason
        // "permission"); no broadcast of its channel follows.
        for sub in conn.remove_subscriptions_unless(allowed) {
            shard.unsubscribe(&sub, Some(&perms.sub));
            conn.notify(&reply::unsubscribed(&sub.channel, "permission"));
        }
    }
    if session.perms.is_none() {
        let per_user = shard.node.per_user.as_ref();
        if per_user.is_some_and(|counts| !counts.admit(&perms.sub)) {
            let why = "limits.connections_per_user_max reached for this user; close another connection first";
            return fail(shard, conn, id, &err(Code::ResourceExhausted, why));
        }
    }
    shard.user_authenticated(&perms.sub, conn.id, issued);
    tracing::debug!(conn = conn.id, sub = %perms.sub, "authenticated");
    session.perms = Some(perms);
    conn.authenticated();
    conn.respond(id, Ok(reply::SUCCESS));
}

/// `subscribe`: who may (the channel's rule: its token, anyone, or the backend), then the
/// start (`since`, `rewind`, or the rule's `rewind_default`), then the subscription; with the
/// backend's `expireAt`, a re-check at that time.
async fn subscribe(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    session: &Session,
    id: Option<&[u8]>,
    channel: &str,
    start: Option<Start>,
) {
    let policy = shard.node.rules.policy(channel);
    let limits = &shard.config().limits;
    let refused = access::refusal(policy.access, session.perms.as_ref(), channel)
        .or_else(|| {
            conn.is_subscribed(channel)
                .then(|| err(Code::AlreadyExists, "already subscribed to this channel"))
        })
        .or_else(|| {
            let full = conn.subscription_count() >= limits.max_subscriptions_per_connection;
            let why = "max_subscriptions_per_connection reached; unsubscribe first";
            full.then(|| err(Code::ResourceExhausted, why))
        });
    if let Some(e) = refused {
        return fail(shard, conn, id, &e);
    }
    let start = match access::start(policy, start, limits.rewind_max) {
        Ok(start) => start,
        Err(e) => return fail(shard, conn, id, &e),
    };
    let expire_at = if policy.access == Access::Proxy {
        match access::ask(shard, conn, session, channel).await {
            Ok(expire_at) => expire_at,
            Err(e) => return fail(shard, conn, id, &e),
        }
    } else {
        None
    };
    // Anonymous connections are never members (SPEC 16).
    let member = session.perms.as_ref().filter(|_| policy.tracks_members());
    let member = member.map(|p| Member {
        user: p.sub.clone(),
        info: p.info.clone(),
    });
    let list = policy.presence && session.perms.as_ref().is_some_and(|p| p.can_presence);
    let asked = Asked {
        start,
        member,
        list,
    };
    let _ = shard.subscribe(conn, id, channel, asked).await;
    if let Some(at) = expire_at {
        let user = session.perms.as_ref().map(|p| p.sub.clone());
        access::recheck_at(shard, conn, user, channel, at);
    }
}

/// `unsubscribe`: before `auth` too, for what an anonymous connection may hold.
fn unsubscribe(
    shard: &Shard,
    conn: &Rc<Conn>,
    session: &Session,
    id: Option<&[u8]>,
    channel: &str,
) {
    let anonymous = session.perms.is_none();
    match conn.remove_subscription(channel) {
        Some(sub) => {
            shard.unsubscribe(&sub, session.perms.as_ref().map(|p| &*p.sub));
            conn.respond(id, Ok(reply::SUCCESS));
        }
        None if anonymous && shard.node.rules.policy(channel).access == Access::Token => {
            fail(shard, conn, id, &unauthenticated())
        }
        None => fail(
            shard,
            conn,
            id,
            &err(Code::NotFound, "not subscribed to this channel"),
        ),
    }
}

async fn publish(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    perms: &Permissions,
    id: Option<&[u8]>,
    params: PublishParams,
) {
    if !perms.can_publish || !perms.allows_channel(&params.channel) {
        let e = err(
            Code::PermissionDenied,
            "token does not allow publishing to this channel",
        );
        return fail(shard, conn, id, &e);
    }
    // Who said it: from the token, whatever the request held (SPEC 16).
    let params = PublishParams {
        from: Some(perms.from()),
        ..params
    };
    match shard.publish(params).await {
        Ok(a) => conn.respond(id, Ok(&reply::ack(&a.id, &a.create_time, a.offset))),
        Err(e) => fail(shard, conn, id, &e),
    }
}

/// `presence`: who is in a channel, for a connection with the `presence` scope that may
/// subscribe to it (a proxy channel: that is subscribed to it, the backend having allowed it).
async fn presence(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    session: &Session,
    id: Option<&[u8]>,
    channel: String,
) {
    let Some(perms) = session.perms.as_ref() else {
        return fail(shard, conn, id, &unauthenticated());
    };
    let policy = shard.node.rules.policy(&channel);
    let may = match policy.access {
        Access::Proxy => conn.is_subscribed(&channel),
        access => access::refusal(access, Some(perms), &channel).is_none(),
    };
    if !perms.can_presence || !may {
        let why =
            "reading presence needs the presence scope and a channel the token may subscribe to";
        return fail(shard, conn, id, &err(Code::PermissionDenied, why));
    }
    if !policy.presence {
        return fail(shard, conn, id, &crate::presence::off());
    }
    match shard.presence(channel).await {
        Ok(body) => conn.respond(id, Ok(&body)),
        Err(e) => fail(shard, conn, id, &e),
    }
}
