//! Presence across nodes (SPEC 16). The bridge counts the node's subscriptions per member
//! (`State::members`) and talks to Redis only when a member's count on this node goes 0 -> 1
//! or 1 -> 0, so a reconnect storm of members present on the node costs Redis nothing.
//!
//! Redis holds per channel its members, which nodes hold each, and a version (the keys of
//! `scripts::presence_keys`); the join and leave scripts publish their notification on the
//! channel's pub/sub channel, so every node delivers it in order with the channel's
//! publications. Each node also keeps the set of `channel user` pairs it holds and heartbeats
//! in `bc:nodes`: a node silent for 3/5 of `presence.node_timeout` is dead, and every
//! survivor runs the leave script for each of its pairs (the script removes a pair once, so
//! one `leave` each however many survivors race). A node that finds itself missing from Redis
//! (Redis lost its data, or it was taken for dead) re-asserts its members: silently after data
//! loss (clients saw their joins), with joins after being reaped (clients saw leaves).

use super::scripts::{node_keys, presence_keys, NODES};
use super::{unavailable, Request, State, REDIS_TIMEOUT};
use crate::channel::Publication;
use crate::error::Error;
use crate::presence::{Kind, Member};
use crate::webhook::Event;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

/// How a join is told: announced to subscribers, or silent (a re-assert after data loss).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Told {
    Announced,
    Silent,
}

/// One more subscription of `member` on this node; Redis hears of it when it is the node's
/// first. Errors: ResourceExhausted (the channel is full), Unavailable.
pub(super) async fn subscribed(
    state: &State,
    channel: &Arc<str>,
    member: &Member,
) -> Result<(), Error> {
    let first = {
        let mut members = state.members.borrow_mut();
        let entry = members.entry(channel.clone()).or_default();
        entry.add(member, usize::MAX).unwrap_or(false)
    };
    if !first {
        return Ok(());
    }
    state.presence.members.fetch_add(1, Relaxed);
    let cap = state.rules.policy(channel).presence_members_max;
    let result = join(state, channel, member, cap, Told::Announced).await;
    if result.is_err() {
        forget(state, channel, &member.user);
    }
    result
}

/// One subscription of `user` on this node ended; Redis hears of it when it was the node's
/// last. A failure leaves Redis to be put right by the next reconcile.
pub(super) async fn unsubscribed(state: &State, channel: &Arc<str>, user: &Arc<str>) {
    if !forget(state, channel, user) {
        return;
    }
    if leave(state, &state.node_id, channel, user).await.is_err() {
        state.dirty.set(true);
    }
}

/// Counts one subscription of `user` out locally; true when it was the node's last.
fn forget(state: &State, channel: &Arc<str>, user: &Arc<str>) -> bool {
    let mut members = state.members.borrow_mut();
    let Some(m) = members.get_mut(channel) else {
        return false;
    };
    let last = m.remove(user).is_some();
    if m.is_empty() {
        members.remove(channel);
    }
    if last {
        state.presence.members.fetch_sub(1, Relaxed);
    }
    last
}

async fn join(
    state: &State,
    channel: &str,
    member: &Member,
    cap: usize,
    told: Told,
) -> Result<(), Error> {
    // A node must be in `bc:nodes` before it holds a member, or its death would go unseen.
    if !state.beating.get() {
        beat(state).await?;
    }
    let mut conn = state
        .connection()
        .ok_or_else(|| unavailable("not connected"))?;
    let pair = pair(channel, &member.user);
    let node_set = &node_keys(&state.node_id)[0];
    let announce = state.rules.policy(channel).join_leave;
    let k = presence_keys(channel);
    let mut invocation = state.scripts.join.key(&k[0]);
    invocation.key(&k[1]).key(&k[2]).key(&k[3]).key(&k[4]);
    invocation
        .arg(&state.node_id)
        .arg(&*member.user)
        .arg(member.info.as_deref().unwrap_or(""))
        .arg(cap)
        .arg(u8::from(announce))
        .arg(u8::from(told == Told::Silent));
    // The node's set first: a node that dies between the two leaves a pair the survivors
    // remove for nothing, never a member nobody would remove.
    let call = async {
        redis::cmd("SADD")
            .arg(node_set)
            .arg(&pair)
            .query_async::<i64>(&mut conn)
            .await?;
        invocation.invoke_async::<i64>(&mut conn).await
    };
    match tokio::time::timeout(REDIS_TIMEOUT, call).await {
        Ok(Ok(-1)) => {
            let _ = redis::cmd("SREM")
                .arg(node_set)
                .arg(&pair)
                .exec_async(&mut conn)
                .await;
            Err(crate::presence::full(cap))
        }
        Ok(Ok(joined)) => {
            if joined == 1 {
                state.presence.events_total[0].fetch_add(1, Relaxed);
                if told == Told::Announced {
                    state.hook(Event::MemberAdded, channel, Some(&member.user));
                }
            }
            Ok(())
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, channel, "redis presence join failed");
            Err(unavailable("presence join failed"))
        }
        Err(_) => Err(unavailable("presence join timed out")),
    }
}

/// Node `node` no longer holds `user` in `channel`: the leave script, then the node's set.
/// Returns whether the member left the channel (cluster-wide).
async fn leave(state: &State, node: &str, channel: &str, user: &str) -> Result<bool, Error> {
    let mut conn = state
        .connection()
        .ok_or_else(|| unavailable("not connected"))?;
    let announce = state.rules.policy(channel).join_leave;
    let k = presence_keys(channel);
    let mut invocation = state.scripts.leave.key(&k[0]);
    invocation.key(&k[1]).key(&k[2]).key(&k[3]).key(&k[4]);
    invocation.arg(node).arg(user).arg(u8::from(announce));
    let node_set = &node_keys(node)[0];
    let call = async {
        let left = invocation.invoke_async::<i64>(&mut conn).await?;
        redis::cmd("SREM")
            .arg(node_set)
            .arg(pair(channel, user))
            .query_async::<i64>(&mut conn)
            .await?;
        redis::RedisResult::Ok(left == 1)
    };
    match tokio::time::timeout(REDIS_TIMEOUT, call).await {
        Ok(Ok(left)) => {
            if left {
                state.presence.events_total[1].fetch_add(1, Relaxed);
                state.hook(Event::MemberRemoved, channel, Some(user));
            }
            Ok(left)
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, channel, "redis presence leave failed");
            Err(unavailable("presence leave failed"))
        }
        Err(_) => Err(unavailable("presence leave timed out")),
    }
}

/// `channel user`: channel names hold no space, so the first one splits the pair.
fn pair(channel: &str, user: &str) -> String {
    format!("{channel} {user}")
}

/// Who is in the channel (`reply::presence`): its members and version, read in one
/// transaction.
pub(super) async fn members(state: &State, channel: &str) -> Result<Vec<u8>, Error> {
    let mut conn = state
        .connection()
        .ok_or_else(|| unavailable("not connected"))?;
    let k = presence_keys(channel);
    let mut pipe = redis::pipe();
    pipe.atomic().get(&k[3]).hgetall(&k[0]);
    let read = pipe.query_async::<(Option<u64>, HashMap<String, String>)>(&mut conn);
    let (version, members) = tokio::time::timeout(REDIS_TIMEOUT, read)
        .await
        .map_err(|_| unavailable("presence timed out"))?
        .map_err(|e| {
            tracing::warn!(error = %e, channel, "redis presence read failed");
            unavailable("presence failed")
        })?;
    let members = members.into_iter().collect();
    Ok(super::recovery::encode_members(
        members,
        version.unwrap_or(0),
    ))
}

/// Members of each of `channels`, as Redis has them.
pub(super) async fn member_counts(
    state: &State,
    channels: Vec<Arc<str>>,
) -> Result<Vec<(Arc<str>, usize)>, Error> {
    let conn = state
        .connection()
        .ok_or_else(|| unavailable("not connected"))?;
    // One command per channel, all in flight together (the connection pipelines them): in
    // Redis Cluster the channels' keys are in different slots, which one pipeline cannot span.
    let reads = channels.iter().map(|c| {
        let mut conn = conn.clone();
        let mut hlen = redis::cmd("HLEN");
        hlen.arg(&presence_keys(c)[0]);
        async move { hlen.query_async::<usize>(&mut conn).await }
    });
    let counts: Vec<usize> =
        tokio::time::timeout(REDIS_TIMEOUT, futures_util::future::try_join_all(reads))
            .await
            .map_err(|_| unavailable("channels timed out"))?
            .map_err(|_| unavailable("channels failed"))?;
    Ok(channels.into_iter().zip(counts).collect())
}

/// Decodes `J|L version userlen user+info` into the notification shards deliver.
pub(super) fn decode(channel: &str, data: &[u8]) -> Option<Publication> {
    let mut fields = data.splitn(4, |b| *b == b' ');
    let kind = match fields.next()? {
        b"J" => Kind::Join,
        b"L" => Kind::Leave,
        _ => return None,
    };
    let version: u64 = std::str::from_utf8(fields.next()?).ok()?.parse().ok()?;
    let user_len: usize = std::str::from_utf8(fields.next()?).ok()?.parse().ok()?;
    let rest = fields.next()?;
    let user = std::str::from_utf8(rest.get(..user_len)?).ok()?;
    let info = std::str::from_utf8(rest.get(user_len..)?).ok()?;
    let member = Member {
        user: Arc::from(user),
        info: (!info.is_empty()).then(|| Arc::from(info)),
    };
    Some(Publication::presence_event(
        Arc::from(channel),
        kind,
        &member,
        version,
    ))
}

/// Heartbeats every fifth of `presence.node_timeout`, removes the members of nodes silent for
/// three fifths of it (so a killed node's members are gone within the timeout), and asks for a
/// reconcile (through `watch`, the queue that orders this node's joins and leaves) when Redis
/// lost this node's members or missed a leave.
pub(super) async fn heartbeat(
    state: Rc<State>,
    watch: tokio::sync::mpsc::UnboundedSender<Request>,
) {
    let mut tick = tokio::time::interval(state.node_timeout / 5);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Soon after (re)connecting, not a period later: a node not yet in `bc:nodes` cannot
        // be seen to die.
        if state.connection().is_none() || !state.beating.get() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        } else {
            tick.tick().await;
        }
        let Ok(dead) = beat(&state).await else {
            continue;
        };
        for node in dead.iter().filter(|n| **n != state.node_id) {
            reap(&state, node).await;
        }
        if state.dirty.get() {
            let _ = watch.send(Request::Reconcile);
        }
    }
}

/// Stamps this node's heartbeat; returns the nodes silent too long. A node missing although it
/// beat before was reaped or lost with Redis's data: Redis must be put right.
async fn beat(state: &State) -> Result<Vec<String>, Error> {
    let mut conn = state
        .connection()
        .ok_or_else(|| unavailable("not connected"))?;
    let dead_after = dead_after(state.node_timeout).as_millis() as u64;
    let mut invocation = state.scripts.heartbeat.key(NODES);
    invocation.arg(&state.node_id).arg(dead_after);
    let call = invocation.invoke_async::<(i64, Vec<String>)>(&mut conn);
    let (new, dead) = tokio::time::timeout(REDIS_TIMEOUT, call)
        .await
        .map_err(|_| unavailable("heartbeat timed out"))?
        .map_err(|_| unavailable("heartbeat failed"))?;
    if new == 1 && state.beating.replace(true) {
        state.dirty.set(true);
    }
    Ok(dead)
}

/// Removes every member dead node `node` held, one leave each, then the node.
async fn reap(state: &State, node: &str) {
    let Some(mut conn) = state.connection() else {
        return;
    };
    let [set, reaped] = node_keys(node);
    let mut smembers = redis::cmd("SMEMBERS");
    smembers.arg(&set);
    let members = smembers.query_async::<Vec<String>>(&mut conn);
    let Ok(Ok(pairs)) = tokio::time::timeout(REDIS_TIMEOUT, members).await else {
        return;
    };
    let mut removed = 0u64;
    for p in &pairs {
        let Some((channel, user)) = p.split_once(' ') else {
            continue;
        };
        match leave(state, node, channel, user).await {
            Ok(true) => removed += 1,
            Ok(false) => {}
            // Left for the next heartbeat: the node stays listed until every pair is gone.
            Err(_) => return,
        }
    }
    if super::occupancy::reap(state, node).await.is_err() {
        return;
    }
    state.presence.reaped_total.fetch_add(removed, Relaxed);
    tracing::warn!(
        node,
        members = removed,
        "removed the members of a node that stopped heartbeating"
    );
    // The node's keys share its hash tag; `NODES` has a slot of its own in Redis Cluster, so it
    // is told after (a survivor that dies in between leaves the node to be reaped again, which
    // finds nothing left to remove).
    let mut done = redis::pipe();
    done.atomic().set_ex(&reaped, 1, 86_400).del(&set);
    let gone = async {
        done.exec_async(&mut conn).await?;
        redis::cmd("ZREM")
            .arg(NODES)
            .arg(node)
            .exec_async(&mut conn)
            .await
    };
    let _ = tokio::time::timeout(REDIS_TIMEOUT, gone).await;
}

/// Makes Redis hold exactly this node's members: pairs it holds that the node no longer has
/// (leaves that failed while Redis was away) leave; members the node has that Redis lacks are
/// added again, silently after data loss, with a join after this node was reaped.
pub(super) async fn reconcile(state: &State) {
    let Some(mut conn) = state.connection() else {
        return;
    };
    let [set, reaped] = node_keys(&state.node_id);
    let read = async {
        let held: Vec<String> = redis::cmd("SMEMBERS")
            .arg(&set)
            .query_async(&mut conn)
            .await?;
        let was_reaped: bool = redis::cmd("EXISTS")
            .arg(&reaped)
            .query_async(&mut conn)
            .await?;
        redis::RedisResult::Ok((held, was_reaped))
    };
    let Ok(Ok((held, was_reaped))) = tokio::time::timeout(REDIS_TIMEOUT, read).await else {
        return;
    };
    state.dirty.set(false);
    let local: Vec<(Arc<str>, Member)> = state
        .members
        .borrow()
        .iter()
        .flat_map(|(c, m)| m.iter().map(move |member| (c.clone(), member)))
        .collect();
    let mine: HashSet<String> = local.iter().map(|(c, m)| pair(c, &m.user)).collect();
    for p in held.iter().filter(|p| !mine.contains(*p)) {
        if let Some((channel, user)) = p.split_once(' ') {
            if leave(state, &state.node_id, channel, user).await.is_err() {
                state.dirty.set(true);
            }
        }
    }
    let told = if was_reaped {
        Told::Announced
    } else {
        Told::Silent
    };
    for (channel, member) in &local {
        if join(state, channel, member, 0, told).await.is_err() {
            state.dirty.set(true);
        }
    }
    if super::occupancy::reconcile(state, was_reaped)
        .await
        .is_err()
    {
        state.dirty.set(true);
    }
    if !state.dirty.get() {
        let _ = redis::cmd("DEL").arg(&reaped).exec_async(&mut conn).await;
        tracing::info!(members = local.len(), "presence re-asserted in redis");
    }
}

/// How long a node may be silent before the others remove its members.
pub(super) fn dead_after(node_timeout: Duration) -> Duration {
    node_timeout * 3 / 5
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_and_leaves_decode() {
        let p = decode("c", b"J 17 5 alice{\"n\":1}").unwrap();
        assert_eq!(p.presence, Some(17));
        let v: serde_json::Value = serde_json::from_slice(&p.prefix).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"method":"join","params":{"channel":"c","user":"alice","info":{"n":1},"version":17}})
        );
        let p = decode("c", b"L 18 3 a b").unwrap();
        let v: serde_json::Value = serde_json::from_slice(&p.prefix).unwrap();
        assert_eq!(v["method"], "leave");
        assert_eq!(v["params"]["user"], "a b");
        assert!(v["params"].get("info").is_none());
        assert!(decode("c", b"J x 1 a").is_none());
        assert!(decode("c", b"J 1 9 a").is_none());
        assert!(decode("c", b"X 1 1 a").is_none());
    }
}
