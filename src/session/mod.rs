//! One WebSocket session over a connection: the read loop, the due times (auth timeout, token
//! expiry, pings, ping timeout, close linger), the requests, and the teardown.

pub(crate) mod access;
mod rate_limit;
pub(crate) mod requests;

use crate::admission::Client;
use crate::auth::Permissions;
use crate::clock::unix_now;
use crate::config::Limits;
use crate::connection::{Conn, Framing};
use crate::error::close;
use crate::io::socket::{self as transport, Transport};
use crate::metrics::ShardMetrics;
use crate::shard::Shard;
use crate::wire::frame::Decoder;
use rate_limit::RateLimit;
use std::cell::RefCell;
use std::io;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// After our close frame, how long we wait for the peer's close before dropping the socket.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// What a session knows of its client.
struct Session {
    perms: Option<Permissions>,
    rate: RateLimit,
}

/// The session's own times.
struct Times {
    opened: Instant,
    /// The last frame from the client.
    last_heard: Instant,
    next_ping: Instant,
    /// When our close frame was out: the linger runs from there.
    close_started: Option<Instant>,
}

/// Runs one upgraded WebSocket connection to its end. `input` holds bytes read after the head.
///
/// Not an `async fn`: the setup runs here, so the returned future, which lives as long as the
/// connection, does not keep room for the `Transport` argument it moved out at once.
pub(crate) fn run(
    shard: Rc<Shard>,
    id: u64,
    stream: Transport,
    (client, framing): (Client, Framing),
    input: Vec<u8>,
) -> impl std::future::Future<Output = ()> {
    let conn = Conn::new(id, shard.config().limits.outbound_buffer_bytes);
    shard.conns.borrow_mut().insert(conn.id, conn.clone());
    ShardMetrics::gauge(&shard.metrics().connections_active, 1);
    tracing::debug!(conn = conn.id, shard = shard.id, "websocket open");
    let stream = Rc::new(RefCell::new(stream));
    conn.attach(shard.send.clone(), stream.clone());
    conn.set_client(Box::new(client));
    conn.set_framing(framing);
    run_session(shard, conn, stream, input)
}

async fn run_session(
    shard: Rc<Shard>,
    conn: Rc<Conn>,
    stream: Rc<RefCell<Transport>>,
    mut input: Vec<u8>,
) {
    let user = reader(&shard, &conn, &stream, &mut input).await;
    // Uncounted now, whoever may still hold the connection.
    drop(conn.take_client());
    // Boxed: only a closing connection needs room for the user next to the wait.
    Box::pin(end(&shard, &conn, user)).await;
    shard.conns.borrow_mut().remove(&conn.id);
    ShardMetrics::gauge(&shard.metrics().connections_active, -1);
    shard.node.connection_ended();
    tracing::debug!(conn = conn.id, shard = shard.id, "websocket closed");
}

/// Whatever ended the reader ends the writer too, and the flush pass stops writing to the
/// socket (it may still hold this connection in its list); then the subscriptions go, each
/// member's with a leave; and the user's count (an SSE connection ends the same way).
pub(crate) async fn end(shard: &Shard, conn: &Conn, user: Option<std::sync::Arc<str>>) {
    for sub in conn.end().await {
        shard.unsubscribe(&sub, user.as_deref());
    }
    if let Some(user) = &user {
        shard.user_ended(user, conn.id);
        if let Some(counts) = &shard.node.per_user {
            counts.release(user);
        }
    }
}

/// What ended a wait of the session.
enum Wake {
    Data(usize),
    Timer,
}

/// Reads and handles the client's frames until the connection ends; closes it when something
/// is due (auth timeout, token expiry, ping timeout) and pings. Returns the connection's user
/// (its token's `sub`), if it authenticated, whose memberships its subscriptions end. The wait is written out here,
/// not in a function of its own: as a nested future it made the connection's task 16 bytes
/// larger than the limit that keeps it in mimalloc's 640-byte class
/// (`connection_futures_stay_small`).
async fn reader(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    stream: &RefCell<Transport>,
    input: &mut Vec<u8>,
) -> Option<std::sync::Arc<str>> {
    // Borrowed, not cloned: the reader lives as long as the connection.
    let limits = &shard.config().limits;
    let opened = Instant::now();
    let mut decoder = Decoder::new(limits.max_frame_bytes);
    decoder.inflate = matches!(conn.framing(), Framing::Deflate | Framing::InflateOnly);
    let mut session = Session {
        perms: None,
        rate: RateLimit::new(limits.requests_per_second, limits.request_burst, opened),
    };
    let mut times = Times {
        opened,
        last_heard: opened,
        next_ping: opened + limits.ping_interval,
        close_started: None,
    };
    loop {
        handle_buffered(shard, conn, &mut session, &mut decoder, input).await;
        if conn.is_dead() {
            return session.perms.map(|p| p.sub);
        }
        let now = Instant::now();
        if conn.is_closing() {
            input.clear();
            if lingered(conn, &mut times, now) {
                return session.perms.map(|p| p.sub);
            }
        }
        let token_expiry = session
            .perms
            .as_ref()
            .map(|p| expiry_instant(p.exp, shard.config().auth.leeway, now));
        let due = next_due(conn, &session, &times, token_expiry, limits, now);
        conn.wake_at(&shard.timers, due);
        let lingering = times.close_started.is_some();
        let ready = |cx: &std::task::Context<'_>| {
            if conn.is_dead() {
                return Some(io::ErrorKind::ConnectionAborted.into());
            }
            if conn.take_timer_fired() || (!lingering && conn.close_sent()) {
                return Some(io::ErrorKind::Interrupted.into());
            }
            conn.wait_with(cx.waker());
            None
        };
        let wake = match transport::read_some(stream, input, &ready).await {
            Ok(n) => Wake::Data(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Wake::Timer,
            Err(_) => Wake::Data(0),
        };
        let now = Instant::now();
        match wake {
            Wake::Data(0) => {
                conn.mark_dead();
                return session.perms.map(|p| p.sub);
            }
            Wake::Data(_) => times.last_heard = now,
            Wake::Timer => {}
        }
        if !conn.is_closing() {
            on_time(conn, &session, &mut times, token_expiry, limits, now);
        }
    }
}

/// While closing: true once the close linger is over. It starts when our close frame is out;
/// until then the writer is still flushing what was queued before it (shutdown_grace applies
/// to that).
fn lingered(conn: &Conn, times: &mut Times, now: Instant) -> bool {
    if !conn.close_sent() {
        return false;
    }
    let started = *times.close_started.get_or_insert(now);
    now >= started + CLOSE_LINGER
}

/// Handles every complete frame already buffered in `input`, then drops what they took.
async fn handle_buffered(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    session: &mut Session,
    decoder: &mut Decoder,
    input: &mut Vec<u8>,
) {
    let mut pos = 0;
    while !conn.is_closing() {
        let (used, outcome) = match decoder.decode(&mut input[pos..]) {
            Ok(None) => break,
            Err(v) => {
                let (code, reason) = (v.code, v.reason);
                tracing::debug!(conn = conn.id, code, reason, "protocol violation");
                conn.close(code, reason, false);
                break;
            }
            Ok(Some((None, used))) => (used, Ok(())),
            Ok(Some((Some(message), used))) => {
                // Boxed: the request state exists only while a request is handled, so an idle
                // connection does not carry it in its future.
                let r = Box::pin(requests::handle(shard, conn, session, message)).await;
                (used, r)
            }
        };
        pos += used;
        if let Err(c) = outcome {
            conn.close(c.code, c.reason, false);
        }
    }
    if pos > 0 {
        input.drain(..pos);
    }
    if input.is_empty() && input.capacity() > 0 {
        *input = Vec::new();
    }
}

/// The next moment something is due: auth timeout, token expiry, a ping, ping timeout; while
/// closing, only the end of the linger (the others fired already or no longer matter, and a
/// due time in the past would spin the read loop and starve the writer).
fn next_due(
    conn: &Conn,
    session: &Session,
    times: &Times,
    token_expiry: Option<Instant>,
    limits: &Limits,
    now: Instant,
) -> Instant {
    match times.close_started {
        Some(started) => started + CLOSE_LINGER,
        // Closing, close frame not out yet: the writer ends it (flushed, or its write
        // timeout); this is only a backstop, never a due time in the past.
        None if conn.is_closing() => now + limits.write_timeout + CLOSE_LINGER,
        None => {
            let mut due = times
                .next_ping
                .min(times.last_heard + limits.ping_interval * 2);
            if must_auth(conn, session) {
                due = due.min(times.opened + limits.auth_timeout);
            }
            if let Some(t) = token_expiry {
                due = due.min(t);
            }
            due
        }
    }
}

/// Acts on what is due at `now`: closes for auth timeout, token expiry or ping timeout, or
/// pings.
fn on_time(
    conn: &Rc<Conn>,
    session: &Session,
    times: &mut Times,
    token_expiry: Option<Instant>,
    limits: &Limits,
    now: Instant,
) {
    if must_auth(conn, session) && now >= times.opened + limits.auth_timeout {
        conn.close(close::AUTH_TIMEOUT, "not authenticated in time", false);
    } else if token_expiry.is_some_and(|t| now >= t) {
        conn.close(close::TOKEN_EXPIRED, "token expired", false);
    } else if now >= times.last_heard + limits.ping_interval * 2 {
        let reason = "no frame within twice the ping interval";
        conn.close(close::PING_TIMEOUT, reason, true);
    } else if now >= times.next_ping {
        conn.ping();
        times.next_ping = now + limits.ping_interval;
    }
}

/// A connection is closed 4001 at `auth_timeout` only when it has neither authenticated nor
/// holds a subscription: an anonymous viewer of a public (or proxy-allowed) channel stays.
fn must_auth(conn: &Conn, session: &Session) -> bool {
    session.perms.is_none() && conn.subscription_count() == 0
}

/// The instant a token of expiry `exp` (Unix seconds) stops being valid.
pub(crate) fn expiry_instant(exp: u64, leeway: Duration, now: Instant) -> Instant {
    // A client picks `exp`: saturate, and treat anything past a century as "never".
    const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    let left = exp
        .saturating_add(leeway.as_secs())
        .saturating_sub(unix_now());
    let left = Duration::from_secs(left).min(FAR);
    now.checked_add(left)
        .unwrap_or(now + Duration::from_secs(365 * 24 * 3600))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::node::Node;
    use std::sync::Arc;

    #[test]
    fn token_expiry_far_in_the_future_does_not_overflow() {
        let now = Instant::now();
        let t = expiry_instant(u64::MAX, Duration::from_secs(3600), now);
        assert!(t > now + Duration::from_secs(10 * 365 * 24 * 3600));
        assert!(expiry_instant(0, Duration::ZERO, now) <= now);
    }

    /// The per-connection futures live as long as the connection: their size is idle memory.
    #[test]
    fn connection_futures_stay_small() {
        crate::io::test_executor().run(async {
            let mut config = Config::default();
            config.auth.jwt_secret = Some("s".into());
            let shard = Shard::new(0, Arc::new(Node::new(config, 1).unwrap()));
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let connect = || {
                let tcp = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
                Transport::Raw(transport::RawSock::new(tcp.into()))
            };
            let conn = Conn::new(1, 1 << 20);
            let stream = Rc::new(RefCell::new(connect()));
            let mut input = Vec::new();
            let client = || Client {
                headers: Vec::new(),
                anonymous: None,
            };
            let r = std::mem::size_of_val(&reader(&shard, &conn, &stream, &mut input));
            eprintln!(
                "reader future {r} B, conn {} B",
                std::mem::size_of::<Conn>()
            );
            assert!(r <= 640, "{r}");
            // Rc<Conn> (the connection plus two counts) stays in mimalloc's 224-byte class.
            let conn_bytes = std::mem::size_of::<Conn>() + 16;
            assert!(conn_bytes <= 224, "Rc<Conn> of {conn_bytes} B");
            // Idle memory is mostly the connection's task: this future plus glommio's header
            // (~48 B). At most 592 keeps the task in mimalloc's 640-byte class (racing a glommio
            // sleep against each read would make it 704-768), and a request's boxed
            // future must stay in a smaller class: sharing the task's class, transient request
            // boxes fragmented the pages of long-lived tasks (+150-500 B per idle connection,
            // measured at 19,000).
            let task = run(
                shard.clone(),
                2,
                connect(),
                (client(), Framing::WebSocket),
                Vec::new(),
            );
            let mut session = Session {
                perms: None,
                rate: RateLimit::new(1, 1, Instant::now()),
            };
            let request = requests::handle(
                &shard,
                &conn,
                &mut session,
                crate::wire::frame::Message::Text(b"{}"),
            );
            let (task, request) = (
                std::mem::size_of_val(&task),
                std::mem::size_of_val(&request),
            );
            eprintln!("connection task future {task} B, request future {request} B");
            assert!(task <= 592 && request <= 512, "{task} {request}");
        });
    }
}
