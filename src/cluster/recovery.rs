//! A channel's position in Redis (offset and epoch, creating the epoch the first time), the
//! publications after a client's `since` from the stream, and history pages.

use super::scripts::{keys, presence_keys};
use super::{unavailable, State, REDIS_TIMEOUT};
use crate::channel::{Header, HistoryPage, Position, Publication};
use crate::clock::unix_ms;
use crate::error::Error;
use crate::wire::request::{Since, Start};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

type StreamEntries = Vec<(String, HashMap<String, redis::Value>)>;

/// What a subscribe's answer says of presence.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Presence {
    /// Nothing: the channel counts no members.
    None,
    /// The version, which held joins and leaves are compared with.
    Version,
    /// The version and the members.
    Members,
}

pub(super) async fn position(
    state: &State,
    channel: &str,
    start: &Start,
    presence: Presence,
) -> Result<Position, Error> {
    let Some(mut conn) = state.connection() else {
        return Err(unavailable("not connected"));
    };
    let ttl = state.rules.policy(channel).history_ttl;
    let k = keys(channel);
    let (offset, epoch, version, members) =
        ask_position(state, &mut conn, channel, presence).await?;
    let mut position = Position::new(offset, Arc::from(epoch.as_str()));
    if presence != Presence::None {
        position.presence_version = Some(version);
    }
    if presence == Presence::Members {
        position.presence = Some(encode_members(members, version));
    }
    match start {
        Start::Live => {}
        Start::Rewind(n) => {
            // Bounded by the position's offset: anything newer reaches the shard through
            // pub/sub, after the answer, so nothing is replayed twice.
            let mut entries: StreamEntries = if *n == 0 || offset == 0 {
                Vec::new()
            } else {
                let mut cmd = redis::cmd("XREVRANGE");
                cmd.arg(&k[2])
                    .arg(format!("{offset}-1"))
                    .arg("-")
                    .arg("COUNT")
                    .arg(*n);
                tokio::time::timeout(REDIS_TIMEOUT, cmd.query_async(&mut conn))
                    .await
                    .map_err(|_| unavailable("rewind timed out"))?
                    .map_err(|_| unavailable("rewind failed"))?
            };
            entries.reverse();
            position.replay = entries_to_publications(channel, entries, ttl);
            position.rewound = Some(position.replay.len());
        }
        Start::Since(since) => {
            let (recovered, replay) =
                recover(&mut conn, channel, since, offset, &epoch, ttl).await?;
            position.recovered = Some(recovered);
            position.replay = replay;
        }
    }
    Ok(position)
}

/// The position script's answer: offset, epoch, presence version, members.
async fn ask_position(
    state: &State,
    conn: &mut super::conn::Conn,
    channel: &str,
    presence: Presence,
) -> Result<PositionAnswer, Error> {
    let ttl = state.rules.policy(channel).history_ttl;
    let k = keys(channel);
    let p = presence_keys(channel);
    let candidate = format!("{:016x}", rand::random::<u64>());
    let mut invocation = state.scripts.position.key(&k[0]);
    invocation
        .key(&k[1])
        .key(&k[2])
        .key(&p[3])
        .key(&p[0])
        .key(&k[4]);
    invocation
        .arg(&candidate)
        .arg(ttl.as_millis().max(1) as u64)
        .arg(presence as u8)
        .arg(&*state.generation.borrow());
    let answer: Vec<redis::Value> =
        tokio::time::timeout(REDIS_TIMEOUT, invocation.invoke_async(conn))
            .await
            .map_err(|_| unavailable("position timed out"))?
            .map_err(|_| unavailable("position failed"))?;
    read_position(answer).ok_or_else(|| unavailable("position unreadable"))
}

/// Members as Redis holds them (user -> info, "" for none), sorted, as `reply::presence`.
pub(super) fn encode_members(mut members: Vec<(String, String)>, version: u64) -> Vec<u8> {
    members.sort_unstable();
    let list = members.iter().map(|(u, i)| {
        let info = Some(i.as_str()).filter(|i| !i.is_empty());
        (u.as_str(), info)
    });
    crate::wire::reply::presence(list, version)
}

/// `{offset, epoch, version?, members?}` as the position script answers.
type PositionAnswer = (u64, String, u64, Vec<(String, String)>);

fn read_position(answer: Vec<redis::Value>) -> Option<PositionAnswer> {
    use redis::FromRedisValue;
    let mut fields = answer.into_iter();
    let offset = u64::from_redis_value(fields.next()?).ok()?;
    let epoch = String::from_redis_value(fields.next()?).ok()?;
    let version = match fields.next() {
        Some(v) => u64::from_redis_value(v).ok()?,
        None => 0,
    };
    let members = match fields.next() {
        Some(m) => HashMap::<String, String>::from_redis_value(m).ok()?,
        None => HashMap::new(),
    };
    Some((offset, epoch, version, members.into_iter().collect()))
}

/// Whether every publication after `since` is still held, and if so those publications.
async fn recover(
    conn: &mut super::conn::Conn,
    channel: &str,
    since: &Since,
    offset: u64,
    epoch: &str,
    ttl: Duration,
) -> Result<(bool, Vec<Arc<Publication>>), Error> {
    if since.epoch != epoch || since.offset > offset {
        return Ok((false, Vec::new()));
    }
    if since.offset == offset {
        return Ok((true, Vec::new()));
    }
    let items = range(conn, channel, since.offset + 1, offset, ttl).await?;
    let items: Vec<Arc<Publication>> = items.into_iter().map(Arc::new).collect();
    // Every publication after `since` must still be held, in order, with none expired.
    let complete = items.len() as u64 == offset - since.offset
        && items
            .iter()
            .enumerate()
            .all(|(i, p)| p.offset == since.offset + 1 + i as u64);
    Ok(if complete {
        (true, items)
    } else {
        (false, Vec::new())
    })
}

/// Publications `from..=to` of `channel` still in its history (none expired), oldest first.
async fn range(
    conn: &mut super::conn::Conn,
    channel: &str,
    from: u64,
    to: u64,
    ttl: Duration,
) -> Result<Vec<Publication>, Error> {
    let mut xrange = redis::cmd("XRANGE");
    xrange
        .arg(&keys(channel)[2])
        .arg(format!("{from}-0"))
        .arg(format!("{to}-1"));
    let entries: StreamEntries = tokio::time::timeout(REDIS_TIMEOUT, xrange.query_async(conn))
        .await
        .map_err(|_| unavailable("history timed out"))?
        .map_err(|_| unavailable("history failed"))?;
    Ok(decode_entries(channel, entries, ttl))
}

/// Publications `from..=to` of `channel` (in `epoch`) still in its history, oldest first: what
/// pub/sub skipped while the node subscribed to the channel again. Empty when Redis fails.
pub(super) async fn missed(
    state: &State,
    channel: &str,
    from: u64,
    to: u64,
    epoch: &Arc<str>,
) -> Vec<Arc<Publication>> {
    let Some(mut conn) = state.connection() else {
        return Vec::new();
    };
    let ttl = state.rules.policy(channel).history_ttl;
    let found = range(&mut conn, channel, from, to, ttl).await;
    found
        .unwrap_or_default()
        .into_iter()
        .map(|mut p| {
            p.epoch = Some(epoch.clone());
            Arc::new(p)
        })
        .collect()
}

fn entries_to_publications(
    channel: &str,
    entries: StreamEntries,
    ttl: Duration,
) -> Vec<Arc<Publication>> {
    decode_entries(channel, entries, ttl)
        .into_iter()
        .map(Arc::new)
        .collect()
}

fn decode_entries(channel: &str, entries: StreamEntries, ttl: Duration) -> Vec<Publication> {
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
        let from = text(&fields, "f")
            .and_then(|f| String::from_utf8(f).ok())
            .filter(|f| !f.is_empty())
            .map(Arc::from);
        out.push(Publication::new(
            Arc::from(channel),
            offset,
            Header {
                id: &id,
                create_time: &t,
                event: &e,
                from,
            },
            &p,
            Instant::now(),
        ));
    }
    out
}

pub(super) async fn history(
    state: &State,
    channel: &str,
    limit: usize,
) -> Result<HistoryPage, Error> {
    let Some(mut conn) = state.connection() else {
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
    let ttl = state.rules.policy(channel).history_ttl;
    let items = entries_to_publications(channel, entries, ttl);
    Ok((items, offset.unwrap_or(0), epoch.unwrap_or_default()))
}
