//! Server-sent events (SPEC 19): the same channels as the WebSocket, for an EventSource or a
//! network that refuses WebSockets. `open.rs` decides before the `200` (the channels, the
//! token, access, where each channel resumes); this session then subscribes each channel in
//! the URL's order, and until the connection ends sends pings, closes at token expiry, and
//! notices the client leaving (it sends nothing else).
//!
//! Everything the connection is sent goes through `Conn` as for a WebSocket; its framing
//! (`Framing::Sse`) makes each message an event (`wire::sse`). A broadcast's event id carries
//! every channel's position, so the browser's `Last-Event-ID` resumes them all.

mod open;

pub(crate) use open::serve;

use crate::admission::Client;
use crate::auth::{Issued, Permissions};
use crate::channel::Asked;
use crate::connection::{Conn, Framing};
use crate::error::close;
use crate::io::socket::{self as transport, Transport};
use crate::metrics::ShardMetrics;
use crate::shard::Shard;
use crate::wire::sse;
use std::cell::RefCell;
use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

/// Most bytes read from the client at once: it has nothing to say, what it sends is dropped.
const INPUT_BYTES_MAX: usize = 4096;

/// What `open` decided: the channels in URL order, what each subscribe asks (with the access
/// proxy's `expireAt`, when it gave one), who the client is.
pub(crate) struct Opening {
    channels: Vec<String>,
    asked: Vec<(Asked, Option<u64>)>,
    perms: Option<Permissions>,
    issued: Option<Issued>,
}

/// Runs one SSE connection, its `200` head already written, to its end.
fn run(
    shard: Rc<Shard>,
    id: u64,
    stream: Transport,
    client: Client,
    opening: Opening,
) -> impl std::future::Future<Output = ()> {
    let conn = Conn::new(id, shard.config().limits.outbound_buffer_bytes);
    conn.set_framing(Framing::Sse);
    shard.conns.borrow_mut().insert(conn.id, conn.clone());
    ShardMetrics::gauge(&shard.metrics().sse_connections_active, 1);
    tracing::debug!(conn = conn.id, shard = shard.id, "event stream open");
    let stream = Rc::new(RefCell::new(stream));
    conn.attach(shard.send.clone(), stream.clone());
    conn.set_client(Box::new(client));
    if let (Some(perms), Some(issued)) = (&opening.perms, &opening.issued) {
        // Found by `/disconnect` and `/revoke` like a WebSocket of the same user.
        shard.user_authenticated(&perms.sub, conn.id, issued);
        conn.authenticated();
    }
    run_stream(shard, conn, stream, opening)
}

async fn run_stream(
    shard: Rc<Shard>,
    conn: Rc<Conn>,
    stream: Rc<RefCell<Transport>>,
    opening: Opening,
) {
    let Opening {
        channels,
        asked,
        perms,
        ..
    } = opening;
    let user = perms.as_ref().map(|p| p.sub.clone());
    subscribe_all(&shard, &conn, &channels, asked, user.clone()).await;
    let expiry = perms.as_ref().map(|p| p.exp);
    wait(&shard, &conn, &stream, expiry).await;
    drop(conn.take_client());
    crate::session::end(&shard, &conn, user).await;
    shard.conns.borrow_mut().remove(&conn.id);
    ShardMetrics::gauge(&shard.metrics().sse_connections_active, -1);
    shard.node.connection_ended();
    tracing::debug!(conn = conn.id, shard = shard.id, "event stream closed");
}

/// Subscribes each channel, one after the other: the subscriptions then stand in URL order,
/// the order of the positions in event ids. Each answer is a `subscribed` event (named by the
/// channel, passed as the request id). A subscribe that fails (cluster mode, Redis
/// unreachable) gets an `error` event and ends the stream with close 1001, so the
/// EventSource reconnects and tries all of them again, rather than holding a stream whose
/// event ids would skip a channel.
async fn subscribe_all(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    channels: &[String],
    asked: Vec<(Asked, Option<u64>)>,
    user: Option<Arc<str>>,
) {
    for (i, (channel, (asked, expire_at))) in channels.iter().zip(asked).enumerate() {
        let name = sse::json_string(channel);
        let _ = shard.subscribe(conn, Some(&name), channel, asked).await;
        if conn.is_closing() {
            return;
        }
        if conn.subscription_count() != i + 1 {
            conn.close(close::GOING_AWAY, "subscribe failed", false);
            return;
        }
        if let Some(at) = expire_at {
            // As for a WebSocket: asked again at `expireAt`; a denial is `unsubscribed`.
            crate::session::access::recheck_at(shard, conn, user.clone(), channel, at);
        }
    }
    conn.sse_opened();
}

/// Waits for the connection to end: the client goes (end of stream), the writer fails or
/// times out, or the close event is out (token expiry, slow consumer, `/disconnect`,
/// shutdown). Pings every `ping_interval`; closes 4002 when the token expires.
async fn wait(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    stream: &RefCell<Transport>,
    expiry: Option<u64>,
) {
    let limits = &shard.config().limits;
    let now = Instant::now();
    let token_expiry =
        expiry.map(|exp| crate::session::expiry_instant(exp, shard.config().auth.leeway, now));
    let mut next_ping = now + limits.ping_interval;
    let mut closing_since: Option<Instant> = None;
    let mut input = Vec::new();
    loop {
        if conn.is_dead() || conn.close_sent() {
            return;
        }
        let now = Instant::now();
        let due = if conn.is_closing() {
            // The writer ends it (written, or its write timeout); this is a backstop.
            let since = *closing_since.get_or_insert(now);
            if now >= since + limits.write_timeout * 2 {
                conn.mark_dead();
                return;
            }
            since + limits.write_timeout * 2
        } else {
            token_expiry.map_or(next_ping, |t| t.min(next_ping))
        };
        conn.wake_at(&shard.timers, due);
        let ready = |cx: &std::task::Context<'_>| {
            if conn.is_dead() {
                return Some(io::ErrorKind::ConnectionAborted.into());
            }
            if conn.take_timer_fired() || conn.close_sent() {
                return Some(io::ErrorKind::Interrupted.into());
            }
            conn.wait_with(cx.waker());
            None
        };
        match transport::read_some(stream, &mut input, &ready).await {
            Ok(0) => {
                conn.mark_dead();
                return;
            }
            Ok(_) if input.len() > INPUT_BYTES_MAX => input = Vec::new(),
            Ok(_) => input.clear(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                conn.mark_dead();
                return;
            }
        }
        let now = Instant::now();
        if conn.is_closing() {
            continue;
        }
        if token_expiry.is_some_and(|t| now >= t) {
            conn.close(close::TOKEN_EXPIRED, "token expired", false);
        } else if now >= next_ping {
            conn.ping();
            next_ping = now + limits.ping_interval;
        }
    }
}
