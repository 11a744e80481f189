//! The route table of the HTTP endpoints (SPEC 3) and the REST handlers.

use super::playground;
use super::Role;
use crate::auth;
use crate::error::{err, Code, Error};
use crate::metrics::{self, ShardMetrics};
use crate::shard::Shard;
use crate::wire::http::{self, Head};
use crate::wire::reply::{self, HistoryItem};
use crate::wire::request::{self, PublishParams};
use std::rc::Rc;

/// Most channels one `/broadcast` may name.
const BROADCAST_CHANNELS_MAX: usize = 1024;

/// Who may call an endpoint.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Any client on any listener.
    Anyone,
    /// The public listener, when the playground is on (dev mode or `playground = true`).
    Playground,
    /// The backend listener (the public one unless `admin_listen` is set), no API key.
    Backend,
    /// The backend listener, with an API key.
    BackendKey,
}

#[derive(Clone, Copy)]
enum Handler {
    Health,
    Page,
    ClientJs,
    Metrics,
    Publish,
    Broadcast,
    History,
    Channels,
    Presence,
    Disconnect,
    Unsubscribe,
    Revoke,
}

/// One endpoint: path, method (GET also answers HEAD), access, handler.
struct Endpoint(&'static str, &'static str, Access, Handler);

const ROUTES: [Endpoint; 12] = [
    Endpoint("/health", "GET", Access::Anyone, Handler::Health),
    Endpoint("/", "GET", Access::Playground, Handler::Page),
    Endpoint("/client.js", "GET", Access::Playground, Handler::ClientJs),
    Endpoint("/metrics", "GET", Access::Backend, Handler::Metrics),
    Endpoint("/publish", "POST", Access::BackendKey, Handler::Publish),
    Endpoint("/broadcast", "POST", Access::BackendKey, Handler::Broadcast),
    Endpoint("/history", "GET", Access::BackendKey, Handler::History),
    Endpoint("/channels", "GET", Access::BackendKey, Handler::Channels),
    Endpoint("/presence", "GET", Access::BackendKey, Handler::Presence),
    Endpoint(
        "/disconnect",
        "POST",
        Access::BackendKey,
        Handler::Disconnect,
    ),
    Endpoint(
        "/unsubscribe",
        "POST",
        Access::BackendKey,
        Handler::Unsubscribe,
    ),
    Endpoint("/revoke", "POST", Access::BackendKey, Handler::Revoke),
];

/// Answers one HTTP request (other than the WebSocket upgrade) into `out`.
pub(super) async fn route(
    shard: &Rc<Shard>,
    role: Role,
    head: &Head,
    body: &[u8],
    keep_alive: bool,
    out: &mut Vec<u8>,
) {
    let answer = match find(shard, role, head) {
        Ok(handler) => handle(shard, handler, head, body)
            .await
            .map_err(|e| (e.code.http_status(), e)),
        Err(refused) => Err(refused),
    };
    match answer {
        Ok((status, content_type, body)) => {
            http::write_response(out, status, content_type, &body, keep_alive)
        }
        Err((status, e)) => {
            shard.metrics().rejected(e.code);
            http::write_error(out, status, &e, keep_alive);
        }
    }
}

/// The handler of `head`'s path, checked against the listener, the method and the API key;
/// or the HTTP status and error to answer.
fn find(shard: &Shard, role: Role, head: &Head) -> Result<Handler, (u16, Error)> {
    let playground = shard.config().playground || shard.config().dev_mode;
    let visible = |access: Access| match access {
        Access::Anyone => true,
        Access::Playground => playground && role.public(),
        Access::Backend | Access::BackendKey => role.backend(),
    };
    let Some(Endpoint(path, method, access, handler)) =
        ROUTES.iter().find(|e| e.0 == head.path && visible(e.2))
    else {
        return Err((
            404,
            err(Code::NotFound, format!("no endpoint at {}", head.path)),
        ));
    };
    if head.method != *method && !(*method == "GET" && head.method == "HEAD") {
        return Err((
            405,
            err(Code::InvalidArgument, format!("{path} takes {method}")),
        ));
    }
    if *access == Access::BackendKey {
        let keys = &shard.config().auth.api_keys;
        if !head
            .bearer
            .as_deref()
            .is_some_and(|k| auth::api_key_matches(keys, k))
        {
            ShardMetrics::add(&shard.metrics().auth_failures_total, 1);
            let message = "missing or unknown API key (Authorization: Bearer KEY)";
            return Err((401, err(Code::Unauthenticated, message)));
        }
    }
    Ok(*handler)
}

/// Status, content type and body of a successful answer.
type Answer = (u16, &'static str, Vec<u8>);

const JSON: &str = "application/json";

async fn handle(
    shard: &Rc<Shard>,
    handler: Handler,
    head: &Head,
    body: &[u8],
) -> Result<Answer, Error> {
    Ok(match handler {
        Handler::Health => health(shard),
        Handler::Page => {
            let page = playground::page(shard.config().dev_token.as_deref());
            (200, "text/html; charset=utf-8", page.into_bytes())
        }
        Handler::ClientJs => {
            let js = playground::client_js().as_bytes().to_vec();
            (200, "text/javascript; charset=utf-8", js)
        }
        Handler::Metrics => {
            let text = shard.node.exposition.render();
            (200, metrics::CONTENT_TYPE, text.into_bytes())
        }
        Handler::Publish => (200, JSON, publish(shard, body).await?),
        Handler::Broadcast => (200, JSON, broadcast(shard, body).await?),
        Handler::History => (200, JSON, history(shard, &head.query).await?),
        Handler::Channels => (200, JSON, channels(shard).await?),
        Handler::Presence => (200, JSON, presence(shard, &head.query).await?),
        Handler::Disconnect => {
            let op = request::parse_disconnect_body(body)?;
            let n = shard.control(op).await?;
            (200, JSON, format!("{{\"connections\":{n}}}").into_bytes())
        }
        Handler::Unsubscribe => {
            let op = request::parse_unsubscribe_body(body)?;
            let n = shard.control(op).await?;
            (200, JSON, format!("{{\"subscriptions\":{n}}}").into_bytes())
        }
        Handler::Revoke => {
            let (target, cutoff_ms) = request::parse_revoke_body(body)?;
            let revocations = &shard.node.revocations;
            let r = revocations.revocation(target, cutoff_ms, crate::clock::unix_ms());
            shard.control(request::Control::Revoke(r)).await?;
            (200, JSON, b"{\"revoked\":true}".to_vec())
        }
    })
}

/// 200 ok; 200 degraded while Redis is unreachable in cluster mode (existing connections
/// still work, so a load balancer must keep the node); 503 while shutting down. With channel
/// rules, their hash, so a rolling deploy can check that nodes agree.
fn health(shard: &Shard) -> Answer {
    let (status, body) = if shard.node.is_shutting_down() {
        (503, reply::health::SHUTTING_DOWN)
    } else if shard.node.bridge.as_ref().is_some_and(|b| !b.is_up()) {
        (200, reply::health::DEGRADED)
    } else {
        (200, reply::health::OK)
    };
    let body = reply::health::with_rules(body, shard.node.rules.hash());
    (status, JSON, body)
}

async fn publish(shard: &Rc<Shard>, body: &[u8]) -> Result<Vec<u8>, Error> {
    let params = request::parse_publish_body(body, shard.config().limits.max_payload_bytes)?;
    let ack = shard.publish(params).await?;
    Ok(reply::ack(&ack.id, &ack.create_time, ack.offset))
}

async fn broadcast(shard: &Rc<Shard>, body: &[u8]) -> Result<Vec<u8>, Error> {
    let (channels, event, payload) = request::parse_broadcast_body(
        body,
        shard.config().limits.max_payload_bytes,
        BROADCAST_CHANNELS_MAX,
    )?;
    // Submit every publication first: one shard's submissions keep their order, and the owners
    // work on them in parallel instead of one round trip after another.
    let submitted: Vec<_> = channels
        .iter()
        .map(|channel| {
            shard.submit(PublishParams {
                channel: channel.clone(),
                event: event.clone(),
                payload: payload.clone(),
                from: None,
            })
        })
        .collect();
    let mut acks = Vec::with_capacity(submitted.len());
    for pending in submitted {
        acks.push(pending.wait().await?);
    }
    let results = channels
        .iter()
        .zip(&acks)
        .map(|(c, a)| (c.as_str(), &*a.id, a.offset));
    Ok(reply::broadcast_results(results))
}

async fn history(shard: &Rc<Shard>, query: &str) -> Result<Vec<u8>, Error> {
    let channel = http::query_param(query, "channel")
        .ok_or_else(|| err(Code::InvalidArgument, "channel is required"))?;
    request::check_channel(&channel)?;
    let limit = match http::query_param(query, "limit") {
        None => shard.node.rules.policy(&channel).history_size,
        Some(l) => l
            .parse::<usize>()
            .map_err(|_| err(Code::InvalidArgument, "limit must be a whole number"))?,
    };
    let (items, offset, epoch) = shard.history(channel, limit).await?;
    let items = items.iter().map(|p| HistoryItem {
        id: &p.id,
        offset: p.offset,
        create_time: &p.create_time,
        event: &p.event,
        from: p.from.as_deref(),
        payload: p.payload(),
    });
    Ok(reply::history_page(items, offset, &epoch))
}

async fn channels(shard: &Rc<Shard>) -> Result<Vec<u8>, Error> {
    let counts = shard.channel_counts().await?;
    let mut list: Vec<_> = counts.subscribers.into_iter().collect();
    list.sort();
    let rules = &shard.node.rules;
    let users = |c: &str| {
        let listed = rules.policy(c).presence;
        listed.then(|| counts.users.get(c).copied().unwrap_or(0))
    };
    Ok(reply::channel_counts(
        list.iter().map(|(c, n)| (&**c, *n, users(c))),
    ))
}

/// `GET /presence?channel=C`: who is in a channel whose rule has `presence`.
async fn presence(shard: &Rc<Shard>, query: &str) -> Result<Vec<u8>, Error> {
    let channel = http::query_param(query, "channel")
        .ok_or_else(|| err(Code::InvalidArgument, "channel is required"))?;
    request::check_channel(&channel)?;
    if !shard.node.rules.policy(&channel).presence {
        return Err(crate::presence::off());
    }
    shard.presence(channel).await
}
