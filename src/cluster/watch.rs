//! Which channels this node subscribes to in Redis: one SUBSCRIBE while any shard of the node
//! has subscribers (pending ones included), one UNSUBSCRIBE after the last leaves. A subscribe's
//! answer (the channel's position) is read only after Redis confirmed the SUBSCRIBE, so no
//! publication after the answer can be missed; a member is counted in (`presence.rs`) before
//! it, so the presence it lists holds the member.

use super::presence;
use super::recovery::{position, Presence};
use super::scripts::keys;
use super::{unavailable, State, REDIS_TIMEOUT};
use crate::channel::{Asked, Position};
use crate::error::Error;
use crate::ring::ShardMsg;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

pub(super) async fn watch(
    state: &State,
    shard: usize,
    token: u64,
    channel: Arc<str>,
    asked: Asked,
) {
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
        let sink = state.sink.borrow().clone();
        match sink {
            Some(mut sink) => {
                let r = tokio::time::timeout(REDIS_TIMEOUT, sink.subscribe(&k[3])).await;
                matches!(r, Ok(Ok(())))
            }
            None => false,
        }
    } else {
        state.metrics.up.load(Relaxed)
    };
    if subscribed && first_on_node {
        // Occupied before the member that made it so.
        super::occupancy::occupied(state, &channel).await;
    }
    let position = if subscribed {
        answer(state, &channel, &asked).await
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

/// The member counted in, then the position with the presence version (and members).
async fn answer(state: &State, channel: &Arc<str>, asked: &Asked) -> Result<Position, Error> {
    if let Some(member) = &asked.member {
        presence::subscribed(state, channel, member).await?;
    }
    let tracked = asked.member.is_some() || state.rules.policy(channel).tracks_members();
    let presence = match (tracked, asked.list) {
        (false, _) => Presence::None,
        (true, false) => Presence::Version,
        (true, true) => Presence::Members,
    };
    let answer = position(state, channel, &asked.start, presence).await;
    if answer.is_err() {
        if let Some(member) = &asked.member {
            presence::unsubscribed(state, channel, &member.user).await;
        }
    }
    answer
}

/// The shard has no subscriber (and no pending subscribe) left for `channel`: it sent one Watch
/// per subscribe but sends one Unwatch in all, so its whole count goes.
pub(super) async fn unwatch(state: &State, shard: usize, channel: Arc<str>) {
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
            state.delivered.borrow_mut().remove(channel);
        }
        last
    };
    if last {
        let sink = state.sink.borrow().clone();
        if let Some(mut sink) = sink {
            let _ = tokio::time::timeout(REDIS_TIMEOUT, sink.unsubscribe(&keys(channel)[3])).await;
        }
        super::occupancy::vacated(state, channel).await;
    }
}
