//! The bridge thread's loops: requests from the shards, the connection to Redis (kept open,
//! re-opened with capped exponential backoff, every watched channel resubscribed), and the
//! pub/sub messages handed to the shards that watch their channel.

use super::conn::{Conn, Incoming, Subscriber};
use super::scripts::keys;
use super::{
    bump, control, presence, publish, recovery, watch, Request, State, Upstream, REDIS_TIMEOUT,
};
use crate::channel::{Header, Publication};
use crate::ring::ShardMsg;
use futures_util::StreamExt;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the bridge checks that Redis still answers.
const LIVENESS_INTERVAL: Duration = Duration::from_millis(500);
/// Redis Cluster: failed checks in a row (`LIVENESS_INTERVAL` apart) before reconnecting.
const CLUSTER_SILENT_CHECKS: u32 = 4;
/// Channels whose position `catch_up` asks at once.
const CATCH_UP_IN_FLIGHT: usize = 64;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

pub(super) async fn run(
    state: Rc<State>,
    finder: Finder,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Request>,
) {
    tokio::task::spawn_local(supervise(state.clone(), finder));
    let watch_tx = spawn_watch(state.clone());
    while let Some(request) = rx.recv().await {
        match request {
            Request::Publish {
                params,
                accepted,
                reply,
            } => {
                let s = state.clone();
                tokio::task::spawn_local(async move {
                    let _ = reply.send(publish::publish(&s, params, accepted).await);
                });
            }
            Request::History {
                channel,
                limit,
                reply,
            } => {
                let s = state.clone();
                tokio::task::spawn_local(async move {
                    let _ = reply.send(recovery::history(&s, &channel, limit).await);
                });
            }
            Request::Presence { channel, reply } => {
                let s = state.clone();
                tokio::task::spawn_local(async move {
                    let _ = reply.send(presence::members(&s, &channel).await);
                });
            }
            Request::Control { op, reply } => {
                let s = state.clone();
                tokio::task::spawn_local(async move {
                    let _ = reply.send(control::publish(&s, &op).await);
                });
            }
            Request::MemberCounts { channels, reply } => {
                let s = state.clone();
                tokio::task::spawn_local(async move {
                    let _ = reply.send(presence::member_counts(&s, channels).await);
                });
            }
            r => {
                let _ = watch_tx.send(r);
            }
        }
    }
}

/// Starts the task that runs watch requests one at a time, in order, so a shard's subscribes and
/// unsubscribes of a channel take effect in the order it sent them, and a member's joins,
/// leaves and the reconcile never interleave; and the heartbeat, which feeds it reconciles.
fn spawn_watch(state: Rc<State>) -> tokio::sync::mpsc::UnboundedSender<Request> {
    let (watch_tx, mut watch_rx) = tokio::sync::mpsc::unbounded_channel::<Request>();
    tokio::task::spawn_local(presence::heartbeat(state.clone(), watch_tx.clone()));
    tokio::task::spawn_local(async move {
        while let Some(r) = watch_rx.recv().await {
            match r {
                Request::Watch {
                    shard,
                    token,
                    channel,
                    asked,
                } => watch::watch(&state, shard, token, channel, asked).await,
                Request::Unwatch { shard, channel } => watch::unwatch(&state, shard, channel).await,
                Request::Leave { channel, user } => {
                    presence::unsubscribed(&state, &channel, &user).await
                }
                Request::Reconcile => presence::reconcile(&state).await,
                _ => {}
            }
        }
    });
    watch_tx
}

/// How the bridge finds the Redis to connect to.
pub(super) enum Finder {
    Standalone(redis::Client),
    /// Asked at every (re)connect, so a failover is followed.
    Sentinel {
        sentinel: redis::sentinel::Sentinel,
        master: String,
    },
    /// Any of these nodes tells the cluster's slot map.
    Cluster(Vec<redis::ConnectionInfo>),
}

impl Finder {
    pub(super) fn new(upstream: Upstream) -> Result<Finder, String> {
        // A URL may hold a password: errors name the key, not the value.
        match upstream {
            Upstream::Standalone(url) => redis::Client::open(url.as_str())
                .map(Finder::Standalone)
                .map_err(|e| format!("redis.url: {e}")),
            Upstream::Sentinel { urls, master } => redis::sentinel::Sentinel::build(urls)
                .map(|sentinel| Finder::Sentinel { sentinel, master })
                .map_err(|e| format!("redis.urls: {e}")),
            Upstream::Cluster(urls) => urls
                .iter()
                .map(|u| redis::IntoConnectionInfo::into_connection_info(u.as_str()))
                .collect::<Result<Vec<_>, _>>()
                .map(Finder::Cluster)
                .map_err(|e| format!("redis.urls: {e}")),
        }
    }

    /// Connects to Redis, or to every shard of the cluster.
    async fn connect(&mut self) -> redis::RedisResult<Connected> {
        let client = match self {
            Finder::Cluster(nodes) => return connect_cluster(nodes).await,
            Finder::Standalone(client) => client.clone(),
            Finder::Sentinel { sentinel, master } => {
                sentinel.async_master_for(master, None).await?
            }
        };
        let mut conn = client.get_multiplexed_async_connection().await?;
        let (sink, stream) = client.get_async_pubsub().await?.split();
        let generation = self.generation(&mut conn).await?;
        let addr = client.get_connection_info().addr().to_string();
        Ok(Connected {
            conn: Conn::Single(conn),
            sink: Subscriber::Classic(sink),
            feed: Feed::Classic(Box::pin(stream)),
            generation,
            addr,
            topology: None,
        })
    }

    /// Sentinel mode: the master's run id (`State::generation`); standalone: none.
    async fn generation(
        &self,
        conn: &mut redis::aio::MultiplexedConnection,
    ) -> redis::RedisResult<String> {
        if matches!(self, Finder::Standalone(_)) {
            return Ok(String::new());
        }
        let info: String = redis::cmd("INFO").arg("server").query_async(conn).await?;
        let run_id = info.lines().find_map(|l| l.strip_prefix("run_id:"));
        Ok(run_id.map(str::trim).unwrap_or_default().to_string())
    }
}

/// The command connection and the sharded pub/sub connection to a Redis Cluster.
async fn connect_cluster(nodes: &[redis::ConnectionInfo]) -> redis::RedisResult<Connected> {
    let commands = redis::cluster::ClusterClient::builder(nodes.to_vec()).build()?;
    let mut conn = Conn::Cluster(commands.get_async_connection().await?);
    // Read before anything is subscribed, so a change during the subscribing is seen.
    let topology = Some(cluster_epoch(&mut conn).await?);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let pubsub = redis::cluster::ClusterClient::builder(nodes.to_vec())
        .use_protocol(redis::ProtocolVersion::RESP3)
        .push_sender(tx)
        .build()?;
    let sub = pubsub.get_async_connection().await?;
    let addr = nodes
        .first()
        .map(|n| n.addr().to_string())
        .unwrap_or_default();
    Ok(Connected {
        conn,
        sink: Subscriber::Sharded(sub),
        feed: Feed::Sharded(rx),
        generation: "*".into(),
        addr: format!("cluster via {addr}"),
        topology,
    })
}

/// What `Finder::connect` opens.
struct Connected {
    conn: Conn,
    sink: Subscriber,
    feed: Feed,
    /// `State::generation`.
    generation: String,
    /// Where Redis is, for the log.
    addr: String,
    /// Redis Cluster: its configuration epoch when connected (`cluster_epoch`).
    topology: Option<u64>,
}

/// Redis Cluster's `cluster_current_epoch`, which a failover or a slot moved to another master
/// increases. The cluster connections re-route commands when told the slot moved, but a
/// subscription whose master died is not told anything: the bridge reconnects when the epoch
/// grows, so every subscription is made again where its slot now is.
async fn cluster_epoch(conn: &mut Conn) -> redis::RedisResult<u64> {
    let info: String = redis::cmd("CLUSTER").arg("INFO").query_async(conn).await?;
    let epoch = info
        .lines()
        .find_map(|l| l.strip_prefix("cluster_current_epoch:"))
        .and_then(|e| e.trim().parse().ok());
    epoch.ok_or_else(|| {
        redis::RedisError::from((redis::ErrorKind::Parse, "no cluster_current_epoch"))
    })
}

/// Keeps a command connection and a pub/sub connection open, reconnecting with capped
/// exponential backoff; after a reconnect it resubscribes every watched channel.
async fn supervise(state: Rc<State>, mut finder: Finder) {
    let mut backoff = BACKOFF_MIN;
    let mut first = true;
    loop {
        match tokio::time::timeout(REDIS_TIMEOUT, finder.connect()).await {
            Ok(Ok(Connected {
                conn,
                mut sink,
                mut feed,
                generation,
                addr,
                topology,
            })) => {
                *state.generation.borrow_mut() = generation;
                // The backend's control messages, then every watched channel.
                let watched = watched_names(&state);
                let channels =
                    std::iter::once(control::CHANNEL).chain(watched.iter().map(|c| &**c));
                let mut ok = true;
                for c in channels {
                    let subscribe = tokio::time::timeout(REDIS_TIMEOUT, sink.subscribe(c));
                    if !matches!(subscribe.await, Ok(Ok(()))) {
                        ok = false;
                        break;
                    }
                }
                if ok {
                    *state.conn.borrow_mut() = Some(conn);
                    *state.sink.borrow_mut() = Some(sink.clone());
                    state.metrics.up.store(true, Relaxed);
                    // After a topology change the previous connection served meanwhile: what
                    // was watched or released through it since `watched` was read is made so
                    // on this one.
                    let now = watched_names(&state);
                    for c in now.difference(&watched) {
                        let _ = tokio::time::timeout(REDIS_TIMEOUT, sink.subscribe(c)).await;
                    }
                    for c in watched.difference(&now) {
                        let _ = tokio::time::timeout(REDIS_TIMEOUT, sink.unsubscribe(c)).await;
                    }
                    if !first {
                        bump(&state.metrics.reconnects_total);
                        // Redis may have restarted without its data, or missed leaves.
                        state.dirty.set(true);
                    }
                    tracing::info!(redis = %addr, "redis bridge connected");
                    let s = state.clone();
                    tokio::task::spawn_local(async move { control::sync_revocations(&s).await });
                    first = false;
                    backoff = BACKOFF_MIN;
                    // Redis Cluster confirms each subscription in the feed, where `subscribed`
                    // fills the channel's gap; a classic connection says nothing, so here.
                    if !state.sharded {
                        catch_up(&state).await;
                    }
                    if serve(&state, &mut feed, topology).await == Ended::Moved {
                        // Reconnect at once, and keep this connection serving publishes and
                        // subscribes until the new one replaces it.
                        continue;
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

/// The pub/sub channel names of every watched channel.
fn watched_names(state: &State) -> std::collections::HashSet<String> {
    let watchers = state.watchers.borrow();
    watchers.keys().map(|c| keys(c)[3].clone()).collect()
}

/// Why `serve` stopped.
#[derive(PartialEq, Eq)]
enum Ended {
    /// Redis went away or stopped answering.
    Lost,
    /// Redis Cluster's slots moved (`cluster_epoch`): the connections still work.
    Moved,
}

/// The pub/sub connection's messages.
pub(super) enum Feed {
    Classic(std::pin::Pin<Box<dyn futures_util::Stream<Item = redis::Msg>>>),
    Sharded(tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>),
}

impl Feed {
    async fn next(&mut self) -> Option<Incoming> {
        match self {
            Feed::Classic(stream) => stream.next().await.map(Incoming::Classic),
            Feed::Sharded(rx) => rx.recv().await.map(Incoming::Sharded),
        }
    }
}

/// Hands pub/sub messages to the shards until the connection ends or Redis stops answering
/// (a Redis that hangs, or a partition, ends no stream: a PING every `LIVENESS_INTERVAL`
/// notices).
async fn serve(state: &Rc<State>, feed: &mut Feed, topology: Option<u64>) -> Ended {
    let mut liveness = tokio::time::interval(LIVENESS_INTERVAL);
    // Redis Cluster: checks in a row that found no answer. One master down makes a check fail
    // when it lands there, while every other shard still serves: the node reconnects only when
    // the cluster stays silent, or when its epoch says the slots moved.
    let mut silent = 0;
    loop {
        tokio::select! {
            incoming = feed.next() => match incoming {
                Some(incoming) => {
                    if let Some((channel, data)) = incoming.message() {
                        on_message(state, channel, data).await;
                    } else if let Some(channel) = incoming.sunsubscribed() {
                        resubscribe(state, channel);
                    } else if let Some(channel) = incoming.ssubscribed() {
                        subscribed(state, channel).await;
                    }
                }
                None => return Ended::Lost,
            },
            _ = liveness.tick() => {
                let Some(mut conn) = state.connection() else { return Ended::Lost };
                if let Some(known) = topology {
                    match tokio::time::timeout(REDIS_TIMEOUT, cluster_epoch(&mut conn)).await {
                        Ok(Ok(epoch)) if epoch > known => {
                            tracing::info!(epoch, "redis cluster topology changed; reconnecting");
                            return Ended::Moved;
                        }
                        Ok(Ok(_)) => silent = 0,
                        _ => silent += 1,
                    }
                    if silent >= CLUSTER_SILENT_CHECKS {
                        return Ended::Lost;
                    }
                    continue;
                }
                let ping = redis::cmd("PING");
                let answer = ping.query_async::<String>(&mut conn);
                if !matches!(tokio::time::timeout(REDIS_TIMEOUT, answer).await, Ok(Ok(_))) {
                    return Ended::Lost;
                }
            }
        }
    }
}

/// Redis Cluster unsubscribed this node from a shard channel: when the node still wants it (the
/// slot moved: a resharding or a failover), it subscribes again, which the cluster connection
/// sends to the slot's new owner. Publications made there before that are read back from
/// history when the next one arrives (`on_message`).
fn resubscribe(state: &Rc<State>, channel: &[u8]) {
    let Ok(channel) = std::str::from_utf8(channel) else {
        return;
    };
    let wanted = channel == control::CHANNEL
        || channel_of(channel).is_some_and(|c| state.watchers.borrow().contains_key(c));
    let sub = state.sink.borrow().clone();
    let (true, Some(mut sub)) = (wanted, sub) else {
        return;
    };
    bump(&state.metrics.resubscribes_total);
    let channel = channel.to_string();
    tokio::task::spawn_local(async move {
        match tokio::time::timeout(REDIS_TIMEOUT, sub.subscribe(&channel)).await {
            Ok(Ok(())) => tracing::info!(channel, "shard channel moved; subscribed again"),
            _ => tracing::warn!(
                channel,
                "shard channel moved and could not be subscribed again"
            ),
        }
    });
}

/// The channel a pub/sub channel name (`bc:{C}`) carries.
fn channel_of(name: &str) -> Option<&str> {
    name.strip_prefix("bc:{").and_then(|c| c.strip_suffix('}'))
}

/// Decodes a publication (`offset epoch id createTime eventlen fromlen event+from+payload`) or
/// a join or leave (`J|L version userlen user+info`) and hands it to every watching shard.
///
/// A publication whose offset skips some (its channel was being subscribed again when they were
/// published: a reconnect, a failover, a resharding) first has the skipped ones read from the
/// channel's history and handed over in order; the pub/sub messages behind it wait, so every
/// shard still gets each channel's publications in offset order.
async fn on_message(state: &State, name: &[u8], data: &[u8]) {
    if name == control::CHANNEL.as_bytes() {
        return control::on_message(state, data);
    }
    let Some(channel) = std::str::from_utf8(name).ok().and_then(channel_of) else {
        return;
    };
    let decoded = match data.first() {
        Some(b'J' | b'L') => super::presence::decode(channel, data),
        _ => decode(channel, data),
    };
    let Some(p) = decoded else {
        tracing::warn!(channel, "undecodable message from redis dropped");
        return;
    };
    if p.presence.is_none() {
        bump(&state.metrics.publications_in_total);
    }
    if !state.watchers.borrow().contains_key(channel) {
        return;
    }
    if let (Some(epoch), None) = (p.epoch.clone(), &p.presence) {
        fill(state, channel, p.offset.saturating_sub(1), &epoch).await;
        if !state.follow(channel, &epoch, p.offset) {
            return;
        }
    }
    deliver(state, channel, Arc::new(p));
}

/// After a classic connection subscribed again: each watched channel's publications made while
/// the node was not subscribed, read from history and handed over before any pub/sub message
/// (which wait in the feed), so a subscriber gets them even when nothing is published after the
/// gap.
async fn catch_up(state: &State) {
    let known: Vec<Arc<str>> = state.delivered.borrow().keys().cloned().collect();
    let positions = futures_util::stream::iter(known)
        .map(|channel| async move {
            let now = position_now(state, &channel).await;
            (channel, now)
        })
        .buffered(CATCH_UP_IN_FLIGHT);
    let mut positions = std::pin::pin!(positions);
    while let Some((channel, now)) = positions.next().await {
        if let Some((offset, epoch)) = now {
            fill(state, &channel, offset, &epoch).await;
        }
    }
}

/// Redis Cluster confirmed a shard channel's subscription: one the node made (at a reconnect, or
/// a new watch, which has nothing to fill), or one the cluster connection made again by itself
/// after the slot's master changed. What was published meanwhile is filled, as `catch_up` does
/// for a classic connection.
async fn subscribed(state: &State, name: &[u8]) {
    let Some(channel) = std::str::from_utf8(name).ok().and_then(channel_of) else {
        return;
    };
    // Only channels delivered before can have missed anything.
    if !state.delivered.borrow().contains_key(channel) {
        return;
    }
    if let Some((offset, epoch)) = position_now(state, channel).await {
        fill(state, channel, offset, &epoch).await;
    }
}

/// The channel's offset and epoch in Redis now.
async fn position_now(state: &State, channel: &str) -> Option<(u64, Arc<str>)> {
    let mut conn = state.connection()?;
    let k = keys(channel);
    let mut pipe = redis::pipe();
    pipe.get(&k[0]).get(&k[1]);
    let read = pipe.query_async::<(Option<u64>, Option<String>)>(&mut conn);
    match tokio::time::timeout(REDIS_TIMEOUT, read).await {
        Ok(Ok((Some(offset), Some(epoch)))) => Some((offset, Arc::from(epoch))),
        _ => None,
    }
}

/// Hands over what this node has not delivered of `channel` up to `offset` of `epoch` (all of
/// it when the epoch is new to the node), from history.
async fn fill(state: &State, channel: &str, offset: u64, epoch: &Arc<str>) {
    let after = match state.delivered.borrow().get(channel) {
        Some((held, last)) if **held == **epoch => *last,
        Some(_) => 0,
        None => return,
    };
    if offset <= after {
        return;
    }
    let missed = recovery::missed(state, channel, after + 1, offset, epoch).await;
    let skipped = offset - after;
    if (missed.len() as u64) < skipped {
        tracing::warn!(
            channel,
            skipped,
            found = missed.len(),
            "publications pub/sub skipped are gone from history"
        );
    }
    state
        .metrics
        .gap_filled_total
        .fetch_add(missed.len() as u64, Relaxed);
    for p in missed {
        if state.follow(channel, epoch, p.offset) {
            deliver(state, channel, p);
        }
    }
}

/// Hands `p` to every shard of this node that watches `channel`.
fn deliver(state: &State, channel: &str, p: Arc<Publication>) {
    let watchers = state.watchers.borrow();
    let Some(counts) = watchers.get(channel) else {
        return;
    };
    for (shard, n) in counts.iter().enumerate() {
        if *n > 0 {
            let _ = state.shards[shard].unbounded_send(ShardMsg::Deliver(p.clone()));
        }
    }
}

fn decode(channel: &str, data: &[u8]) -> Option<Publication> {
    let mut fields = data.splitn(7, |b| *b == b' ');
    let offset: u64 = std::str::from_utf8(fields.next()?).ok()?.parse().ok()?;
    let epoch = std::str::from_utf8(fields.next()?).ok()?;
    let id = std::str::from_utf8(fields.next()?).ok()?;
    let create_time = std::str::from_utf8(fields.next()?).ok()?;
    let event_len: usize = std::str::from_utf8(fields.next()?).ok()?.parse().ok()?;
    let from_len: usize = std::str::from_utf8(fields.next()?).ok()?.parse().ok()?;
    let rest = fields.next()?;
    let event = std::str::from_utf8(rest.get(..event_len)?).ok()?;
    let from = std::str::from_utf8(rest.get(event_len..event_len.checked_add(from_len)?)?).ok()?;
    let payload = rest.get(event_len + from_len..)?;
    let header = Header {
        id,
        create_time,
        event,
        from: (!from.is_empty()).then(|| Arc::from(from)),
    };
    let mut p = Publication::new(Arc::from(channel), offset, header, payload, Instant::now());
    p.epoch = Some(Arc::from(epoch));
    Some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pubsub_messages_decode() {
        let p = decode(
            "c",
            b"7 e1 n1-3 2026-01-01T00:00:00.000Z 5 0 a b c{\"x\": 1}",
        )
        .unwrap();
        assert_eq!(p.epoch.as_deref(), Some("e1"));
        assert_eq!(p.offset, 7);
        assert_eq!(&*p.id, "n1-3");
        assert_eq!(&*p.event, "a b c");
        assert_eq!(p.payload(), b"{\"x\": 1}");
        assert!(p.from.is_none());
        let p = decode("c", b"1 e n1 t 1 12 e{\"user\":\"a\"}[1]").unwrap();
        assert_eq!(p.from.as_deref(), Some("{\"user\":\"a\"}"));
        assert_eq!(p.payload(), b"[1]");
        assert!(decode("c", b"x e n1 t 1 0 e1").is_none());
        assert!(decode("c", b"1 e n1 t 9 0 e1").is_none());
        assert!(decode("c", b"1 e n1 t 1 99 e1").is_none());
    }
}
