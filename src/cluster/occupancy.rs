//! Whether a channel has subscribers anywhere in the cluster, for the `channel_occupied` and
//! `channel_vacated` webhooks (SPEC 18). Only channels some hook wants cost anything: the node
//! adds itself to the channel's set of nodes at its first subscriber and removes itself after
//! its last, and the script that leaves the set non-empty from empty (or empty from
//! non-empty) tells that node to send the event, so each is sent once per cluster. A dead
//! node's channels (`bc:node:{id}:w`) are removed by the survivor that reaps it.

use super::{State, REDIS_TIMEOUT};
use crate::webhook::Event;
use std::collections::HashSet;
use std::sync::Arc;

/// The nodes with subscribers of `channel`.
fn nodes_key(channel: &str) -> String {
    format!("bc:{{{channel}}}:w")
}

/// The channels node `node` has subscribers of (those some hook wants).
fn channels_key(node: &str) -> String {
    format!("bc:node:{{{node}}}:w")
}

/// Whether a hook wants this channel's occupancy.
pub(super) fn tracked(state: &State, channel: &str) -> bool {
    state
        .webhooks
        .as_ref()
        .is_some_and(|h| h.wants(Event::Occupied, channel) || h.wants(Event::Vacated, channel))
}

/// This node's first subscriber of `channel`.
pub(super) async fn occupied(state: &State, channel: &Arc<str>) {
    if !tracked(state, channel) {
        return;
    }
    if enter(state, channel, true).await.is_err() {
        state.dirty.set(true);
    }
}

/// This node's last subscriber of `channel` left.
pub(super) async fn vacated(state: &State, channel: &Arc<str>) {
    if !tracked(state, channel) {
        return;
    }
    if exit(state, &state.node_id, channel).await.is_err() {
        state.dirty.set(true);
    }
}

/// Adds this node to `channel`'s nodes; with `announce`, the first one sends `occupied`.
async fn enter(state: &State, channel: &str, announce: bool) -> Result<(), ()> {
    let mut conn = state.connection().ok_or(())?;
    let mut call = state.scripts.occupy.key(nodes_key(channel));
    call.arg(&state.node_id);
    // The node's own set first: a node that dies between the two leaves a channel the
    // survivors remove for nothing, never one nobody would remove.
    let run = async {
        redis::cmd("SADD")
            .arg(channels_key(&state.node_id))
            .arg(channel)
            .exec_async(&mut conn)
            .await?;
        call.invoke_async::<i64>(&mut conn).await
    };
    match tokio::time::timeout(REDIS_TIMEOUT, run).await {
        Ok(Ok(first)) => {
            if first == 1 && announce {
                state.hook(Event::Occupied, channel, None);
            }
            Ok(())
        }
        _ => Err(()),
    }
}

async fn exit(state: &State, node: &str, channel: &str) -> Result<(), ()> {
    let mut conn = state.connection().ok_or(())?;
    let mut call = state.scripts.vacate.key(nodes_key(channel));
    call.arg(node);
    let run = async {
        let last = call.invoke_async::<i64>(&mut conn).await?;
        redis::cmd("SREM")
            .arg(channels_key(node))
            .arg(channel)
            .exec_async(&mut conn)
            .await?;
        redis::RedisResult::Ok(last)
    };
    match tokio::time::timeout(REDIS_TIMEOUT, run).await {
        Ok(Ok(last)) => {
            if last == 1 {
                state.hook(Event::Vacated, channel, None);
            }
            Ok(())
        }
        _ => Err(()),
    }
}

/// Dead node `node`'s channels: removed, each emptied one reported vacated (by this node).
pub(super) async fn reap(state: &State, node: &str) -> Result<(), ()> {
    for channel in read(state, node).await? {
        exit(state, node, &channel).await?;
    }
    Ok(())
}

/// Makes Redis hold exactly the tracked channels this node has subscribers of (after Redis
/// lost its data, an outage that ate an exit, or this node being taken for dead). Channels
/// put back are announced occupied only when `announce` (the node was reaped: the backend was
/// told they were vacated); after data loss the backend saw them occupied already.
pub(super) async fn reconcile(state: &State, announce: bool) -> Result<(), ()> {
    let held: HashSet<String> = read(state, &state.node_id).await?.into_iter().collect();
    let watched: Vec<Arc<str>> = state.watchers.borrow().keys().cloned().collect();
    let watched: Vec<Arc<str>> = watched.into_iter().filter(|c| tracked(state, c)).collect();
    let mine: HashSet<&str> = watched.iter().map(|c| &**c).collect();
    for channel in held.iter().filter(|c| !mine.contains(c.as_str())) {
        exit(state, &state.node_id, channel).await?;
    }
    for channel in watched.iter().filter(|c| !held.contains(&***c)) {
        enter(state, channel, announce).await?;
    }
    Ok(())
}

async fn read(state: &State, node: &str) -> Result<Vec<String>, ()> {
    let mut conn = state.connection().ok_or(())?;
    let mut members = redis::cmd("SMEMBERS");
    members.arg(channels_key(node));
    match tokio::time::timeout(REDIS_TIMEOUT, members.query_async(&mut conn)).await {
        Ok(Ok(channels)) => Ok(channels),
        _ => Err(()),
    }
}
