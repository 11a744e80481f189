//! Cluster mode: the Redis bridge (SPEC section 8).
//!
//! The bridge lives on its own thread with a single-threaded tokio runtime, off the shards, so
//! Redis never blocks a shard. Shards send it requests through an unbounded channel (a send is a
//! plain function call); it answers and delivers through one unbounded channel per shard, whose
//! receiving task the shard runs like a ring reader.
//!
//! Redis holds, per channel, the offset counter, the epoch and a capped stream of history. One Lua
//! script per publication assigns the offset, appends to the stream and PUBLISHes, atomically, so
//! the pub/sub order is the offset order on every node. A node SUBSCRIBEs to a channel only while
//! one of its shards has subscribers, over one pub/sub connection, and fans each message out to
//! those shards once (one `Arc<Publication>`, encoded once per node).

use crate::channel::{HistoryPage, Position, Publication};
use crate::clock::{now_rfc3339, unix_ms};
use crate::error::{Code, Error};
use crate::metrics::BridgeMetrics;
use crate::protocol::{PublishParams, Since};
use crate::ring::{Ack, ShardMsg};
use futures_channel::{mpsc, oneshot};
use futures_util::StreamExt;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A Redis call slower than this counts as Redis being unreachable (SPEC 13.18 asks for
/// `Unavailable` within 5 s).
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the bridge checks that Redis still answers.
const LIVENESS_INTERVAL: Duration = Duration::from_millis(500);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Assigns the next offset (creating the epoch when the channel's history is new or was lost),
/// appends to the capped stream, refreshes the TTLs and publishes, in one atomic step.
const PUBLISH_LUA: &str = r#"
local off = redis.call('INCR', KEYS[1])
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = ARGV[5]
  redis.call('SET', KEYS[2], epoch)
  if off ~= 1 then
    redis.call('SET', KEYS[1], 1)
    off = 1
    redis.call('DEL', KEYS[3])
  end
end
if tonumber(ARGV[6]) > 0 then
  redis.call('XADD', KEYS[3], 'MAXLEN', ARGV[6], off .. '-1', 'i', ARGV[1], 't', ARGV[2], 'e', ARGV[3], 'p', ARGV[4], 'm', ARGV[8])
end
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call('PEXPIRE', KEYS[2], ARGV[7])
redis.call('PEXPIRE', KEYS[3], ARGV[7])
redis.call('PUBLISH', KEYS[4], off .. ' ' .. epoch .. ' ' .. ARGV[1] .. ' ' .. ARGV[2] .. ' ' .. string.len(ARGV[3]) .. ' ' .. ARGV[3] .. ARGV[4])
return off
"#;

/// The channel's offset and epoch, creating the epoch for a channel never published to.
const POSITION_LUA: &str = r#"
local off = tonumber(redis.call('GET', KEYS[1]) or '0')
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[2], epoch, 'PX', ARGV[2])
  if off ~= 0 then
    redis.call('DEL', KEYS[1])
    redis.call('DEL', KEYS[3])
    off = 0
  end
end
return {off, epoch}
"#;

pub enum Request {
    Publish {
        params: PublishParams,
        accepted: Instant,
        reply: oneshot::Sender<Result<Ack, Error>>,
    },
    Watch {
        shard: usize,
        token: u64,
        channel: Arc<str>,
        since: Option<Since>,
    },
    Unwatch {
        shard: usize,
        channel: Arc<str>,
    },
    History {
        channel: String,
        limit: usize,
        reply: oneshot::Sender<Result<HistoryPage, Error>>,
    },
}

/// What shards hold to talk to the bridge.
pub struct Bridge {
    pub requests: tokio::sync::mpsc::UnboundedSender<Request>,
    pub metrics: Arc<BridgeMetrics>,
}

impl Bridge {
    pub fn is_up(&self) -> bool {
        self.metrics.up.load(Relaxed)
    }

    pub fn send(&self, r: Request) {
        // Fails only when the bridge thread is gone (shutdown); callers then see a dropped reply.
        let _ = self.requests.send(r);
    }
}

fn keys(channel: &str) -> [String; 4] {
    [
        format!("bc:{{{channel}}}:o"),
        format!("bc:{{{channel}}}:e"),
        format!("bc:{{{channel}}}:h"),
        format!("bc:{{{channel}}}"),
    ]
}

fn unavailable(what: &str) -> Error {
    crate::error::err(
        Code::Unavailable,
        format!("cluster broker unreachable ({what}); retry"),
    )
}

/// Starts the bridge thread. `shards` are the per-shard delivery channels.
pub fn start(
    url: &str,
    node_id: String,
    shards: Vec<mpsc::UnboundedSender<ShardMsg>>,
    history_size: usize,
    history_ttl: Duration,
) -> Result<Bridge, String> {
    // The URL may hold a password: name the key, not the value.
    let client = redis::Client::open(url).map_err(|e| format!("redis.url: {e}"))?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let metrics = Arc::new(BridgeMetrics::default());
    let m = metrics.clone();
    std::thread::Builder::new()
        .name("redis-bridge".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the redis bridge runtime");
                    return;
                }
            };
            let state = Rc::new(State {
                client,
                node_id,
                shards,
                history_size,
                history_ttl,
                metrics: m,
                conn: RefCell::new(None),
                sink: RefCell::new(None),
                watchers: RefCell::new(HashMap::new()),
                next_publication: std::cell::Cell::new(0),
            });
            let local = tokio::task::LocalSet::new();
            local.block_on(&runtime, run(state, rx));
        })
        .map_err(|e| format!("cannot start the redis bridge thread: {e}"))?;
    Ok(Bridge {
        requests: tx,
        metrics,
    })
}

struct State {
    client: redis::Client,
    node_id: String,
    shards: Vec<mpsc::UnboundedSender<ShardMsg>>,
    history_size: usize,
    history_ttl: Duration,
    metrics: Arc<BridgeMetrics>,
    conn: RefCell<Option<redis::aio::MultiplexedConnection>>,
    sink: RefCell<Option<redis::aio::PubSubSink>>,
    /// Per channel, how many subscriptions (pending ones included) each shard holds.
    watchers: RefCell<HashMap<Arc<str>, Vec<usize>>>,
    next_publication: std::cell::Cell<u64>,
}

async fn run(state: Rc<State>, mut rx: tokio::sync::mpsc::UnboundedReceiver<Request>) {
    tokio::task::spawn_local(supervise(state.clone()));
    // Watch requests run one at a time, in order, so a shard's subscribes and unsubscribes of a
    // channel take effect in the order it sent them.
    let (watch_tx, mut watch_rx) = tokio::sync::mpsc::unbounded_channel::<Request>();
    let s = state.clone();
    tokio::task::spawn_local(async move {
        while let Some(r) = watch_rx.recv().await {
            match r {
                Request::Watch {
                    shard,
                    token,
                    channel,
                    since,
                } => watch(&s, shard, token, channel, since).await,
                Request::Unwatch { shard, channel } => unwatch(&s, shard, channel).await,
                _ => {}
            }
        }
    });
    while let Some(request) = rx.recv().await {
        match request {
            Request::Publish {
                params,
                accepted,
                reply,
            } => {
                let s = state.clone();
                tokio::task::spawn_local(async move {
                    let _ = reply.send(publish(&s, params, accepted).await);
                });
            }
            Request::History {
                channel,
                limit,
                reply,
            } => {
                let s = state.clone();
                tokio::task::spawn_local(async move {
                    let _ = reply.send(history(&s, &channel, limit).await);
                });
            }
            r => {
                let _ = watch_tx.send(r);
            }
        }
    }
}

/// Keeps a command connection and a pub/sub connection open, reconnecting with capped
/// exponential backoff; after a reconnect it resubscribes every watched channel.
async fn supervise(state: Rc<State>) {
    let mut backoff = BACKOFF_MIN;
    let mut first = true;
    loop {
        let connected = async {
            let conn = state.client.get_multiplexed_async_connection().await?;
            let pubsub = state.client.get_async_pubsub().await?;
            redis::RedisResult::Ok((conn, pubsub))
        };
        match tokio::time::timeout(REDIS_TIMEOUT, connected).await {
            Ok(Ok((conn, pubsub))) => {
                let (mut sink, mut stream) = pubsub.split();
                let channels: Vec<String> = state
                    .watchers
                    .borrow()
                    .keys()
                    .map(|c| keys(c)[3].clone())
                    .collect();
                let mut ok = true;
                for c in channels {
                    if sink.subscribe(&c).await.is_err() {
                        ok = false;
                        break;
                    }
                }
                if ok {
                    *state.conn.borrow_mut() = Some(conn);
                    *state.sink.borrow_mut() = Some(sink);
                    state.metrics.up.store(true, Relaxed);
                    if !first {
                        bump(&state.metrics.reconnects_total);
                    }
                    tracing::info!("redis bridge connected");
                    first = false;
                    backoff = BACKOFF_MIN;
                    // A Redis that hangs (or a partition) ends no stream: ping to notice.
                    let mut liveness = tokio::time::interval(LIVENESS_INTERVAL);
                    loop {
                        tokio::select! {
                            msg = stream.next() => match msg {
                                Some(msg) => on_message(&state, &msg),
                                None => break,
                            },
                            _ = liveness.tick() => {
                                let Some(mut conn) = connection(&state) else { break };
                                let ping = redis::cmd("PING");
                                let answer = ping.query_async::<String>(&mut conn);
                                if !matches!(tokio::time::timeout(REDIS_TIMEOUT, answer).await, Ok(Ok(_))) {
                                    break;
                                }
                            }
                        }
                    }
                    tracing::warn!("redis connection lost or unresponsive; reconnecting");
                }
                state.metrics.up.store(false, Relaxed);
                *state.conn.borrow_mut() = None;
                *state.sink.borrow_mut() = None;
            }
            Ok(Err(e)) => tracing::warn!(error = %e, retry_in = ?backoff, "redis unreachable"),
            Err(_) => tracing::warn!(retry_in = ?backoff, "redis connect timed out"),
        }
        state.metrics.up.store(false, Relaxed);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

/// Decodes `offset epoch id createTime eventlen event+payload` and hands it to every watching shard.
fn on_message(state: &State, msg: &redis::Msg) {
    let Some(channel) = msg
        .get_channel_name()
        .strip_prefix("bc:{")
        .and_then(|c| c.strip_suffix('}'))
    else {
        return;
    };
    let data = msg.get_payload_bytes();
    let Some(p) = decode(channel, data) else {
        tracing::warn!(channel, "undecodable publication from redis dropped");
        return;
    };
    bump(&state.metrics.publications_in_total);
    let watchers = state.watchers.borrow();
    let Some(counts) = watchers.get(channel) else {
        return;
    };
    let p = Arc::new(p);
    for (shard, n) in counts.iter().enumerate() {
        if *n > 0 {
            let _ = state.shards[shard].unbounded_send(ShardMsg::Deliver(p.clone()));
        }
    }
}

fn decode(channel: &str, data: &[u8]) -> Option<Publication> {
    let mut fields = data.splitn(6, |b| *b == b' ');
    let offset: u64 = std::str::from_utf8(fields.next()?).ok()?.parse().ok()?;
    let epoch = std::str::from_utf8(fields.next()?).ok()?;
    let id = std::str::from_utf8(fields.next()?).ok()?;
    let create_time = std::str::from_utf8(fields.next()?).ok()?;
    let event_len: usize = std::str::from_utf8(fields.next()?).ok()?.parse().ok()?;
    let rest = fields.next()?;
    let event = std::str::from_utf8(rest.get(..event_len)?).ok()?;
    let payload = rest.get(event_len..)?;
    let mut p = Publication::new(
        Arc::from(channel),
        offset,
        id,
        create_time,
        event,
        payload,
        Instant::now(),
    );
    p.epoch = Some(Arc::from(epoch));
    Some(p)
}

fn connection(state: &State) -> Option<redis::aio::MultiplexedConnection> {
    state.conn.borrow().clone()
}

async fn publish(state: &State, params: PublishParams, _accepted: Instant) -> Result<Ack, Error> {
    let Some(mut conn) = connection(state) else {
        return Err(unavailable("not connected"));
    };
    let n = state.next_publication.get() + 1;
    state.next_publication.set(n);
    let id = format!("{}-{n}", state.node_id);
    let create_time = now_rfc3339();
    let k = keys(&params.channel);
    let epoch = format!("{:016x}", rand::random::<u64>());
    let script = redis::Script::new(PUBLISH_LUA);
    let mut invocation = script.key(&k[0]);
    invocation
        .key(&k[1])
        .key(&k[2])
        .key(&k[3])
        .arg(&id)
        .arg(&create_time)
        .arg(&params.event)
        .arg(&params.payload[..])
        .arg(&epoch)
        .arg(state.history_size)
        .arg(state.history_ttl.as_millis().max(1) as u64)
        .arg(unix_ms());
    let started = Instant::now();
    let result =
        tokio::time::timeout(REDIS_TIMEOUT, invocation.invoke_async::<u64>(&mut conn)).await;
    match result {
        Ok(Ok(offset)) => {
            let m = &state.metrics;
            m.publish_seconds_sum_ns
                .fetch_add(started.elapsed().as_nanos() as u64, Relaxed);
            m.publish_seconds_count.fetch_add(1, Relaxed);
            bump(&m.publications_out_total);
            Ok(Ack {
                id: id.into(),
                create_time: create_time.into(),
                offset,
            })
        }
        Ok(Err(e)) => {
            bump(&state.metrics.publish_errors_total);
            tracing::warn!(error = %e, channel = %params.channel, "redis publish failed");
            Err(unavailable("publish failed"))
        }
        Err(_) => {
            bump(&state.metrics.publish_errors_total);
            Err(unavailable("publish timed out"))
        }
    }
}

async fn watch(state: &State, shard: usize, token: u64, channel: Arc<str>, since: Option<Since>) {
    let reply = |msg: ShardMsg| {
        let _ = state.shards[shard].unbounded_send(msg);
    };
    let first_on_node = {
        let mut w = state.watchers.borrow_mut();
        let counts = w
            .entry(channel.clone())
            .or_insert_with(|| vec![0; state.shards.len()]);
        let first = counts.iter().all(|n| *n == 0);
        counts[shard] += 1;
        first
    };
    // Interest is registered before SUBSCRIBE, so every message Redis sends after confirming the
    // subscription reaches this shard, which holds it until the position below arrives.
    let k = keys(&channel);
    let subscribed = if first_on_node {
        let sink = state.sink.borrow_mut().take();
        match sink {
            Some(mut sink) => {
                let r = tokio::time::timeout(REDIS_TIMEOUT, sink.subscribe(&k[3])).await;
                *state.sink.borrow_mut() = Some(sink);
                matches!(r, Ok(Ok(())))
            }
            None => false,
        }
    } else {
        state.metrics.up.load(Relaxed)
    };
    let position = if subscribed {
        position(state, &channel, since.as_ref()).await
    } else {
        Err(unavailable("subscribe failed"))
    };
    match position {
        Ok(position) => reply(ShardMsg::Subscribed { token, position }),
        Err(error) => {
            release(state, shard, &channel).await;
            reply(ShardMsg::SubscribeFailed { token, error });
        }
    }
}

/// The shard has no subscriber (and no pending subscribe) left for `channel`: it sent one Watch
/// per subscribe but sends one Unwatch in all, so its whole count goes.
async fn unwatch(state: &State, shard: usize, channel: Arc<str>) {
    if let Some(counts) = state.watchers.borrow_mut().get_mut(&channel) {
        counts[shard] = counts[shard].min(1);
    }
    release(state, shard, &channel).await;
}

async fn release(state: &State, shard: usize, channel: &Arc<str>) {
    let last = {
        let mut w = state.watchers.borrow_mut();
        let Some(counts) = w.get_mut(channel) else {
            return;
        };
        counts[shard] = counts[shard].saturating_sub(1);
        let last = counts.iter().all(|n| *n == 0);
        if last {
            w.remove(channel);
        }
        last
    };
    if last {
        let sink = state.sink.borrow_mut().take();
        if let Some(mut sink) = sink {
            let _ = tokio::time::timeout(REDIS_TIMEOUT, sink.unsubscribe(&keys(channel)[3])).await;
            *state.sink.borrow_mut() = Some(sink);
        }
    }
}

type StreamEntries = Vec<(String, HashMap<String, redis::Value>)>;

async fn position(state: &State, channel: &str, since: Option<&Since>) -> Result<Position, Error> {
    let Some(mut conn) = connection(state) else {
        return Err(unavailable("not connected"));
    };
    let k = keys(channel);
    let candidate = format!("{:016x}", rand::random::<u64>());
    let script = redis::Script::new(POSITION_LUA);
    let mut invocation = script.key(&k[0]);
    invocation
        .key(&k[1])
        .key(&k[2])
        .arg(&candidate)
        .arg(state.history_ttl.as_millis().max(1) as u64);
    let (offset, epoch): (u64, String) =
        tokio::time::timeout(REDIS_TIMEOUT, invocation.invoke_async(&mut conn))
            .await
            .map_err(|_| unavailable("position timed out"))?
            .map_err(|_| unavailable("position failed"))?;
    let mut position = Position {
        offset,
        epoch: Arc::from(epoch.as_str()),
        recovered: None,
        replay: Vec::new(),
    };
    let Some(since) = since else {
        return Ok(position);
    };
    position.recovered = Some(false);
    if since.epoch != epoch || since.offset > offset {
        return Ok(position);
    }
    if since.offset == offset {
        position.recovered = Some(true);
        return Ok(position);
    }
    let entries: StreamEntries = tokio::time::timeout(
        REDIS_TIMEOUT,
        redis::cmd("XRANGE")
            .arg(&k[2])
            .arg(format!("{}-0", since.offset + 1))
            .arg(format!("{offset}-1"))
            .query_async(&mut conn),
    )
    .await
    .map_err(|_| unavailable("history timed out"))?
    .map_err(|_| unavailable("history failed"))?;
    let items = entries_to_publications(channel, entries, state.history_ttl);
    // Every publication after `since` must still be held, in order, with none expired.
    let complete = items.len() as u64 == offset - since.offset
        && items
            .iter()
            .enumerate()
            .all(|(i, p)| p.offset == since.offset + 1 + i as u64);
    if complete {
        position.recovered = Some(true);
        position.replay = items;
    }
    Ok(position)
}

fn entries_to_publications(
    channel: &str,
    entries: StreamEntries,
    ttl: Duration,
) -> Vec<Arc<Publication>> {
    let now = unix_ms();
    let text = |m: &HashMap<String, redis::Value>, k: &str| -> Option<Vec<u8>> {
        match m.get(k)? {
            redis::Value::BulkString(b) => Some(b.clone()),
            _ => None,
        }
    };
    let mut out = Vec::with_capacity(entries.len());
    for (entry_id, fields) in entries {
        let Some(offset) = entry_id
            .split('-')
            .next()
            .and_then(|o| o.parse::<u64>().ok())
        else {
            continue;
        };
        let (Some(id), Some(t), Some(e), Some(p)) = (
            text(&fields, "i"),
            text(&fields, "t"),
            text(&fields, "e"),
            text(&fields, "p"),
        ) else {
            continue;
        };
        let written_ms: u64 = text(&fields, "m")
            .and_then(|m| String::from_utf8(m).ok())
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        if now.saturating_sub(written_ms) > ttl.as_millis() as u64 {
            continue;
        }
        let (Ok(id), Ok(t), Ok(e)) = (
            String::from_utf8(id),
            String::from_utf8(t),
            String::from_utf8(e),
        ) else {
            continue;
        };
        out.push(Arc::new(Publication::new(
            Arc::from(channel),
            offset,
            &id,
            &t,
            &e,
            &p,
            Instant::now(),
        )));
    }
    out
}

async fn history(state: &State, channel: &str, limit: usize) -> Result<HistoryPage, Error> {
    let Some(mut conn) = connection(state) else {
        return Err(unavailable("not connected"));
    };
    let k = keys(channel);
    let query = async {
        let (offset, epoch): (Option<u64>, Option<String>) = redis::pipe()
            .get(&k[0])
            .get(&k[1])
            .query_async(&mut conn)
            .await?;
        let entries: StreamEntries = redis::cmd("XREVRANGE")
            .arg(&k[2])
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(limit.max(1))
            .query_async(&mut conn)
            .await?;
        redis::RedisResult::Ok((offset, epoch, entries))
    };
    let (offset, epoch, mut entries) = tokio::time::timeout(REDIS_TIMEOUT, query)
        .await
        .map_err(|_| unavailable("history timed out"))?
        .map_err(|_| unavailable("history failed"))?;
    if limit == 0 {
        entries.clear();
    }
    entries.reverse();
    let items = entries_to_publications(channel, entries, state.history_ttl);
    Ok((items, offset.unwrap_or(0), epoch.unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pubsub_messages_decode() {
        let p = decode("c", b"7 e1 n1-3 2026-01-01T00:00:00.000Z 5 a b c{\"x\": 1}").unwrap();
        assert_eq!(p.epoch.as_deref(), Some("e1"));
        assert_eq!(p.offset, 7);
        assert_eq!(&*p.id, "n1-3");
        assert_eq!(&*p.event, "a b c");
        assert_eq!(p.payload(), b"{\"x\": 1}");
        assert!(decode("c", b"x e n1 t 1 e1").is_none());
        assert!(decode("c", b"1 e n1 t 9 e1").is_none());
    }
}
