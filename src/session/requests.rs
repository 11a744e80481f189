//! One small function per request method behind one dispatch, the way mini-redis's `cmd/`
//! applies its commands. Each answers on the connection; an `Err` closes it.

use super::rate_limit::Verdict;
use super::Session;
use crate::auth::Permissions;
use crate::clock::now_rfc3339;
use crate::connection::Conn;
use crate::error::{close, err, Close, Code, Error};
use crate::metrics::ShardMetrics;
use crate::shard::Shard;
use crate::wire::frame::Message;
use crate::wire::reply;
use crate::wire::request::{self, Method, PublishParams, Since};
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
    let perms = session.perms.as_ref();
    match (method, perms) {
        (Method::Heartbeat, _) => heartbeat(conn, id),
        (Method::Auth { token }, _) => auth(shard, conn, session, id, &token),
        (Method::Subscribe { channel, since }, Some(perms)) => {
            Box::pin(subscribe(shard, conn, perms, id, &channel, since)).await
        }
        (Method::Unsubscribe { channel }, Some(_)) => unsubscribe(shard, conn, id, &channel),
        (Method::Publish(params), Some(perms)) => {
            Box::pin(publish(shard, conn, perms, id, params)).await
        }
        (_, None) => fail(shard, conn, id, &unauthenticated()),
    }
    Ok(())
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

/// `auth`, first or again: a fresher token of the same `sub` refreshes the permissions, and the
/// subscriptions a narrower token no longer allows are dropped.
fn auth(shard: &Shard, conn: &Rc<Conn>, session: &mut Session, id: Option<&[u8]>, token: &str) {
    let perms = match shard.node.verifier.verify(token) {
        Ok(perms) => perms,
        Err(e) => {
            ShardMetrics::add(&shard.metrics().auth_failures_total, 1);
            return fail(shard, conn, id, &err(Code::Unauthenticated, e.0));
        }
    };
    if let Some(old) = &session.perms {
        if old.sub != perms.sub {
            let e = err(
                Code::FailedPrecondition,
                "re-auth must keep the same sub; open a new connection",
            );
            return fail(shard, conn, id, &e);
        }
        let allowed = |c: &str| perms.can_subscribe && perms.allows_channel(c);
        for sub in conn.remove_subscriptions_unless(allowed) {
            shard.unsubscribe(&sub);
        }
    }
    tracing::debug!(conn = conn.id, sub = %perms.sub, "authenticated");
    session.perms = Some(perms);
    conn.respond(id, Ok(reply::SUCCESS));
}

async fn subscribe(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    perms: &Permissions,
    id: Option<&[u8]>,
    channel: &str,
    since: Option<Since>,
) {
    let refused = if !perms.can_subscribe || !perms.allows_channel(channel) {
        Some(err(
            Code::PermissionDenied,
            "token does not allow subscribing to this channel",
        ))
    } else if conn.is_subscribed(channel) {
        Some(err(
            Code::AlreadyExists,
            "already subscribed to this channel",
        ))
    } else if conn.subscription_count() >= shard.config().limits.max_subscriptions_per_connection {
        Some(err(
            Code::ResourceExhausted,
            "max_subscriptions_per_connection reached; unsubscribe first",
        ))
    } else {
        None
    };
    match refused {
        Some(e) => fail(shard, conn, id, &e),
        None => {
            let _ = shard.subscribe(conn, id, channel, since).await;
        }
    }
}

fn unsubscribe(shard: &Shard, conn: &Rc<Conn>, id: Option<&[u8]>, channel: &str) {
    match conn.remove_subscription(channel) {
        Some(sub) => {
            shard.unsubscribe(&sub);
            conn.respond(id, Ok(reply::SUCCESS));
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
    match shard.publish(params).await {
        Ok(a) => conn.respond(id, Ok(&reply::ack(&a.id, &a.create_time, a.offset))),
        Err(e) => fail(shard, conn, id, &e),
    }
}
