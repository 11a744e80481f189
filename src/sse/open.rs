//! Opening an SSE connection: everything that can refuse it is decided before the `200`, so a
//! refusal is an ordinary REST error (400, 401, 403, 503) the caller can read, and an
//! EventSource that gets one stops instead of reconnecting forever.
//!
//! The decisions are the WebSocket's own: the token verifier and revocations of `auth`
//! (`session::requests::verify`), the connect proxy, the channel rules and the access proxy of
//! `subscribe` (`session::access`), the connection caps of the upgrade.

use super::Opening;
use crate::admission::{self, Client};
use crate::auth::{Issued, Permissions};
use crate::channel::Asked;
use crate::error::{err, Code, Error};
use crate::io::socket::{write_all, HttpSock};
use crate::presence::Member;
use crate::rules::Access;
use crate::session::{access, requests};
use crate::shard::Shard;
use crate::wire::http::{self, Head};
use crate::wire::request::{check_channel, Since, Start};
use crate::wire::sse;
use std::net::IpAddr;
use std::rc::Rc;

/// A refusal before the stream: its HTTP status and error.
type Refusal = (u16, Error);

/// The HTTP status of an error answered before the stream.
fn status_of(code: Code) -> u16 {
    match code {
        Code::InvalidArgument => 400,
        Code::Unauthenticated => 401,
        Code::PermissionDenied => 403,
        Code::NotFound => 404,
        _ => 503,
    }
}

fn refusal(e: Error) -> Refusal {
    (status_of(e.code), e)
}

fn bad(message: impl Into<String>) -> Refusal {
    refusal(err(Code::InvalidArgument, message))
}

/// Serves `GET /sse` (or `GET /ws` asking for `text/event-stream`): checks, counts, answers
/// `200` with the stream's head, and hands the socket to an SSE session task.
pub(crate) async fn serve(
    shard: Rc<Shard>,
    sock: Rc<HttpSock>,
    id: u64,
    head: Head,
    (peer, headers): (IpAddr, Vec<(String, String)>),
    last_event_id: Option<String>,
) {
    let admitted = match check(&shard, id, &head, &headers, last_event_id.as_deref()).await {
        Ok(opening) => admit(&shard, &head, peer, headers, opening),
        Err(r) => Err(r),
    };
    let (opening, client) = match admitted {
        Ok(admitted) => admitted,
        Err((status, e)) => {
            let mut out = Vec::new();
            http::write_error(&mut out, status, &e, false);
            let _ = write_all(&sock.stream, &out).await;
            return;
        }
    };
    let mut out = Vec::new();
    let retry_ms = shard.config().sse.retry.as_millis() as u64;
    // `check` refused an origin not allowed: the one left is named back, which a
    // cross-origin EventSource needs to read the stream.
    let allow_origin = head.origin.as_deref();
    sse::write_head(&mut out, retry_ms, allow_origin);
    if write_all(&sock.stream, &out).await.is_err() {
        release(&shard, &opening);
        return;
    }
    shard.unwatch(id);
    let Ok(sock) = Rc::try_unwrap(sock) else {
        release(&shard, &opening);
        return;
    };
    // A task of its own, as a WebSocket session's: this HTTP task and its buffers end here.
    let stream = super::run(shard, id, sock.stream.into_inner(), client, opening);
    glommio::spawn_local(stream).detach();
}

/// Gives back what `admit` counted, for a connection that ended before its session started.
fn release(shard: &Shard, opening: &Opening) {
    if let (Some(perms), Some(counts)) = (&opening.perms, &shard.node.per_user) {
        counts.release(&perms.sub);
    }
    shard.node.connection_ended();
}

/// Counts the connection against `max_connections`, then the anonymous caps (no token) or
/// `connections_per_user_max` (a token), as the upgrade and `auth` do.
fn admit(
    shard: &Shard,
    head: &Head,
    peer: IpAddr,
    headers: Vec<(String, String)>,
    opening: Opening,
) -> Result<(Opening, Client), Refusal> {
    let node = &shard.node;
    if node.is_shutting_down() {
        return Err(refusal(err(Code::Unavailable, "server is shutting down")));
    }
    if !node.admit_connection() {
        let why = "max_connections reached; try another node";
        return Err(refusal(err(Code::Unavailable, why)));
    }
    let anonymous = match &opening.perms {
        Some(perms) => {
            if node.per_user.as_ref().is_some_and(|c| !c.admit(&perms.sub)) {
                node.connection_ended();
                let why = "limits.connections_per_user_max reached for this user; close another connection first";
                return Err(refusal(err(Code::ResourceExhausted, why)));
            }
            None
        }
        None => {
            let forwarded_for = head.forwarded_for.as_deref();
            let ip = admission::client_addr(peer, forwarded_for, &node.trusted_proxies);
            match node.anonymous.admit(ip) {
                Ok(permit) => Some(permit),
                Err(refused) => {
                    node.connection_ended();
                    shard.metrics().anonymous_refused(&refused);
                    let why = "too many connections without a token; pass one or try another node";
                    return Err(refusal(err(Code::Unavailable, why)));
                }
            }
        }
    };
    let client = Client { headers, anonymous };
    Ok((opening, client))
}

/// What the request asks, and whether it may: the channels, the token (or the connect
/// proxy's answer), each channel's access and where each starts.
async fn check(
    shard: &Rc<Shard>,
    id: u64,
    head: &Head,
    headers: &[(String, String)],
    last_event_id: Option<&str>,
) -> Result<Opening, Refusal> {
    let config = shard.config();
    if head.method != "GET" {
        return Err((405, err(Code::InvalidArgument, "an event stream is a GET")));
    }
    let origins: &[String] = if config.dev_mode {
        &[]
    } else {
        &config.allowed_origins
    };
    if let Some(origin) = head.origin.as_deref() {
        if !origins.is_empty() && !origins.iter().any(|a| a == origin) {
            return Err(refusal(err(Code::PermissionDenied, "origin not allowed")));
        }
    }
    let most = config
        .sse
        .channels_max
        .min(config.limits.max_subscriptions_per_connection);
    let channels = channels(&head.query, most)?;
    let rules = &shard.node.rules;
    let needs_perms = channels
        .iter()
        .any(|c| rules.policy(c).access == Access::Token);
    let (perms, issued) = authenticate(shard, id, head, headers, needs_perms).await?;
    let starts = starts(&channels, last_event_id);
    let mut asked = Vec::with_capacity(channels.len());
    for (channel, since) in channels.iter().zip(starts) {
        asked.push(may_subscribe(shard, id, headers, perms.as_ref(), channel, since).await?);
    }
    Ok(Opening {
        channels,
        asked,
        perms,
        issued,
    })
}

/// The `channel` values of the query: 1 to `channels_max`, valid names, no repeats.
fn channels(query: &str, channels_max: usize) -> Result<Vec<String>, Refusal> {
    let channels = sse::query_values(query, "channel").map_err(|e| bad(e.0))?;
    if channels.is_empty() {
        return Err(bad("name at least one channel: /sse?channel=NAME"));
    }
    if channels.len() > channels_max {
        return Err(bad(format!(
            "at most {channels_max} channels per event stream (sse.channels_max, limits.max_subscriptions_per_connection)"
        )));
    }
    for (i, channel) in channels.iter().enumerate() {
        check_channel(channel).map_err(refusal)?;
        if channels[..i].contains(channel) {
            return Err(bad("a channel is named twice"));
        }
    }
    Ok(channels)
}

/// The token of `Authorization: Bearer` or `?token=` (never logged), verified as `auth`
/// verifies it; without one, the connect proxy's answer when one is configured and a channel
/// needs permissions (`needs_perms`: public and proxy channels do not, so a stream of those
/// never waits on the backend, nor fails with it); else none.
async fn authenticate(
    shard: &Rc<Shard>,
    id: u64,
    head: &Head,
    headers: &[(String, String)],
    needs_perms: bool,
) -> Result<(Option<Permissions>, Option<Issued>), Refusal> {
    let from_query = sse::query_values(&head.query, "token").map_err(|e| bad(e.0))?;
    let token = match (&head.bearer, from_query.first()) {
        (Some(bearer), _) => Some(String::from_utf8_lossy(bearer).into_owned()),
        (None, Some(token)) => Some(token.clone()),
        (None, None) => None,
    };
    if let Some(token) = token {
        return match requests::verify(shard, &token) {
            Ok((perms, issued)) => Ok((Some(perms), Some(issued))),
            Err(e) => {
                crate::metrics::ShardMetrics::add(&shard.metrics().auth_failures_total, 1);
                Err(refusal(e))
            }
        };
    }
    let Some(proxy) = shard.proxy.as_ref() else {
        return Ok((None, None));
    };
    if !needs_perms || shard.config().proxy.connect_url.is_none() {
        return Ok((None, None));
    }
    let perms = proxy
        .connect(shard.metrics(), id, headers)
        .await
        .map_err(refusal)?;
    if perms.exp <= crate::clock::unix_now() {
        let why = "the backend's answer has expired";
        return Err(refusal(err(Code::Unauthenticated, why)));
    }
    // The backend's answer stands for a token issued now, as at a WebSocket's proxy `auth`.
    let issued = Issued {
        iat: crate::clock::unix_now(),
        jti: None,
    };
    Ok((Some(perms), Some(issued)))
}

/// Where each channel resumes: the position `Last-Event-ID` holds for it. An id that does
/// not decode (another URL's, a proxy's rewrite) is taken as a resume that cannot succeed:
/// every channel is asked `since` an epoch no channel has, so each `subscribed` says
/// `"recovered":false` and the client knows to reload, and the stream still opens (a 400
/// would stop an EventSource for good).
fn starts(channels: &[String], last_event_id: Option<&str>) -> Vec<Option<Since>> {
    let Some(id) = last_event_id else {
        return vec![None; channels.len()];
    };
    match sse::decode_positions(id.trim(), channels.len()) {
        Ok(positions) => positions
            .into_iter()
            .map(|p| {
                p.map(|p| Since {
                    offset: p.offset,
                    epoch: p.epoch,
                })
            })
            .collect(),
        Err(why) => {
            tracing::debug!(why = why.0, "Last-Event-ID not understood; not recovered");
            let lost = Since {
                offset: 0,
                epoch: String::new(),
            };
            vec![Some(lost); channels.len()]
        }
    }
}

/// Whether this connection may subscribe to `channel` (the rule's access: token, public, or
/// the access proxy's answer), and what its subscribe asks, with the access proxy's
/// `expireAt` if it gave one.
async fn may_subscribe(
    shard: &Rc<Shard>,
    id: u64,
    headers: &[(String, String)],
    perms: Option<&Permissions>,
    channel: &str,
    since: Option<Since>,
) -> Result<(Asked, Option<u64>), Refusal> {
    let policy = shard.node.rules.policy(channel);
    let mut expire_at = None;
    if let Some(e) = access::refusal(policy.access, perms, channel) {
        return Err(refusal(e));
    }
    if policy.access == Access::Proxy {
        let Some(proxy) = shard.proxy.as_ref() else {
            return Err(refusal(err(Code::Internal, "no access proxy configured")));
        };
        let call = crate::proxy::SubscribeCall {
            channel,
            user: perms.map(|p| &*p.sub),
            connection: id,
            headers,
            cached: true,
        };
        expire_at = proxy
            .subscribe(shard.metrics(), call)
            .await
            .map_err(refusal)?;
    }
    let asked = since.map(Start::Since);
    let start = access::start(policy, asked, shard.config().limits.rewind_max).map_err(refusal)?;
    // Anonymous connections are never members (SPEC 16).
    let member = perms.filter(|_| policy.tracks_members()).map(|p| Member {
        user: p.sub.clone(),
        info: p.info.clone(),
    });
    let list = policy.presence && perms.is_some_and(|p| p.can_presence);
    let asked = Asked {
        start,
        member,
        list,
    };
    Ok((asked, expire_at))
}
