//! The backend's disconnect, unsubscribe and revoke between nodes (SPEC 17): the node that got
//! the request publishes it on `CHANNEL`, every node subscribes to it from its first
//! connection to Redis, and each other node applies it on all its shards. Revocations are also
//! kept in Redis (`scripts::REVOKED`, one script stores and publishes them), loaded by a node
//! at each (re)connect, and put back from the node's own table when Redis lost them.

use super::scripts::REVOKED;
use super::{unavailable, State, REDIS_TIMEOUT};
use crate::clock::unix_ms;
use crate::error::{err, Code, Error};
use crate::revocation::{Revocation, Target};
use crate::ring::ShardMsg;
use crate::wire::request::Control;
use std::sync::Arc;

/// The pub/sub channel of control messages (in the slot of `scripts::REVOKED`).
pub(super) const CHANNEL: &str = "bc:{bc}:control";

/// Revocations per script call when a node puts its table back.
const PUT_BACK_CHUNK: usize = 500;

/// Publishes `op` for the other nodes (a revocation: stored, then published, in one script).
pub(super) async fn publish(state: &State, op: &Control) -> Result<(), Error> {
    let mut conn = state
        .connection()
        .ok_or_else(|| unavailable("not connected"))?;
    let message = encode(&state.node_id, op);
    if let Control::Revoke(r) = op {
        return store(state, std::slice::from_ref(r), &message).await;
    }
    let mut publish = redis::cmd(state.publish_command());
    publish.arg(CHANNEL).arg(message);
    match tokio::time::timeout(REDIS_TIMEOUT, publish.query_async::<i64>(&mut conn)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "redis control publish failed");
            Err(unavailable("control publish failed"))
        }
        Err(_) => Err(unavailable("control publish timed out")),
    }
}

/// Stores `revocations` in Redis and publishes `message` (none when empty).
async fn store(state: &State, revocations: &[Revocation], message: &[u8]) -> Result<(), Error> {
    let mut conn = state
        .connection()
        .ok_or_else(|| unavailable("not connected"))?;
    let mut call = state.scripts.revoke.key(REVOKED);
    call.arg(unix_ms())
        .arg(state.revocations.max())
        .arg(CHANNEL)
        .arg(message);
    for r in revocations {
        call.arg(field(&r.target))
            .arg(r.cutoff_ms)
            .arg(r.expires_ms);
    }
    match tokio::time::timeout(REDIS_TIMEOUT, call.invoke_async::<i64>(&mut conn)).await {
        Ok(Ok(1)) => Ok(()),
        Ok(Ok(_)) => Err(err(
            Code::ResourceExhausted,
            "auth.revocations_max revocations are held in Redis; retry when some expire",
        )),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "redis revoke failed");
            Err(unavailable("revoke failed"))
        }
        Err(_) => Err(unavailable("revoke timed out")),
    }
}

/// At each (re)connect: puts this node's revocations back (Redis may have restarted without
/// them, or missed one made during an outage), then takes every revocation Redis holds, and
/// closes the connections here that the ones new to this node revoke (only those: a `jti`
/// revocation scans a shard's connections, and Redis may hold 100,000 of them).
pub(super) async fn sync_revocations(state: &State) {
    let now = unix_ms();
    let mine = state.revocations.live(now);
    for chunk in mine.chunks(PUT_BACK_CHUNK) {
        if let Err(e) = store(state, chunk, b"").await {
            tracing::warn!(error = %e.message, "revocations not put back into redis");
            break;
        }
    }
    let Some(mut conn) = state.connection() else {
        return;
    };
    let mut read = redis::cmd("HGETALL");
    read.arg(REVOKED);
    let read = read.query_async::<Vec<(String, String)>>(&mut conn);
    let held = match tokio::time::timeout(REDIS_TIMEOUT, read).await {
        Ok(Ok(held)) => held,
        _ => {
            tracing::warn!("revocations not read from redis; the next reconnect retries");
            return;
        }
    };
    for (f, value) in held {
        let Some(r) = parse_entry(&f, &value) else {
            continue;
        };
        if state.revocations.insert(&r, now) == Ok(true) {
            apply(state, Control::Revoke(r));
        }
    }
}

/// `u:<user>` or `j:<jti>` with `<cutoff> <expires>`.
fn parse_entry(field: &str, value: &str) -> Option<Revocation> {
    let target = match field.split_at_checked(2)? {
        ("u:", user) => Target::User(user.to_string()),
        ("j:", jti) => Target::Jti(jti.to_string()),
        _ => return None,
    };
    let (cutoff, expires) = value.split_once(' ')?;
    Some(Revocation {
        target,
        cutoff_ms: cutoff.parse().ok()?,
        expires_ms: expires.parse().ok()?,
    })
}

fn field(target: &Target) -> String {
    match target {
        Target::User(user) => format!("u:{user}"),
        Target::Jti(jti) => format!("j:{jti}"),
    }
}

/// Another node's request: to every shard of this one (this node's own are applied already).
/// A revocation enters this node's table first, so an `auth` racing it is refused.
pub(super) fn on_message(state: &State, data: &[u8]) {
    let Some((origin, op)) = decode(data) else {
        tracing::warn!("undecodable control message from redis dropped");
        return;
    };
    if origin == state.node_id {
        return;
    }
    if let Control::Revoke(r) = &op {
        if state.revocations.insert(r, unix_ms()).is_err() {
            tracing::warn!("auth.revocations_max reached here; a revocation from another node is applied to open connections only");
        }
    }
    apply(state, op);
}

fn apply(state: &State, op: Control) {
    let op = Arc::new(op);
    for shard in &state.shards {
        let _ = shard.unbounded_send(ShardMsg::Apply(op.clone()));
    }
}

/// `origin D code userlen user+reason`, `origin U userlen user+pattern`, or
/// `origin R <Revocation::to_line>`.
fn encode(origin: &str, op: &Control) -> Vec<u8> {
    let text = match op {
        Control::Disconnect { user, code, reason } => {
            format!("{origin} D {code} {} {user}{reason}", user.len())
        }
        Control::Unsubscribe { user, pattern } => {
            format!("{origin} U {} {user}{pattern}", user.len())
        }
        Control::Revoke(r) => format!("{origin} R {}", r.to_line()),
    };
    text.into_bytes()
}

fn decode(data: &[u8]) -> Option<(String, Control)> {
    let text = std::str::from_utf8(data).ok()?;
    let (origin, rest) = text.split_once(' ')?;
    let (kind, rest) = rest.split_once(' ')?;
    let (code, rest) = match kind {
        "D" => {
            let (code, rest) = rest.split_once(' ')?;
            (Some(code.parse::<u16>().ok()?), rest)
        }
        "U" => (None, rest),
        "R" => {
            let r = Revocation::from_line(rest)?;
            return Some((origin.to_string(), Control::Revoke(r)));
        }
        _ => return None,
    };
    let (len, rest) = rest.split_once(' ')?;
    let len: usize = len.parse().ok()?;
    let user = rest.get(..len)?.to_string();
    let tail = rest.get(len..)?.to_string();
    let op = match code {
        Some(code) => Control::Disconnect {
            user,
            code,
            reason: tail,
        },
        None => Control::Unsubscribe {
            user,
            pattern: tail,
        },
    };
    Some((origin.to_string(), op))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_messages_round_trip() {
        for op in [
            Control::Disconnect {
                user: "a b".into(),
                code: 4007,
                reason: "stolen token".into(),
            },
            Control::Unsubscribe {
                user: "ü".into(),
                pattern: "chat/*".into(),
            },
            Control::Revoke(Revocation {
                target: Target::User("a b".into()),
                cutoff_ms: 12,
                expires_ms: 34,
            }),
            Control::Revoke(Revocation {
                target: Target::Jti("j 1".into()),
                cutoff_ms: 0,
                expires_ms: 34,
            }),
        ] {
            let (origin, back) = decode(&encode("n1", &op)).unwrap();
            assert_eq!((origin.as_str(), back), ("n1", op));
        }
        assert!(decode(b"n1 X 1 a").is_none());
        assert!(decode(b"n1 U 9 a").is_none());
        assert!(decode(b"n1 D x 1 a").is_none());
        assert!(decode(b"n1 R x 1 2 \"a\"").is_none());
        assert!(decode(b"n1 R u 1 2 \"\"").is_none());
        assert!(decode(b"n1 R u 1 a \"b\"").is_none());
        assert!(decode(b"n1 R u 1 2 b").is_none());
    }

    #[test]
    fn stored_revocations_parse() {
        let r = parse_entry("u:al:ice", "5 9").unwrap();
        assert_eq!(r.target, Target::User("al:ice".into()));
        assert_eq!((r.cutoff_ms, r.expires_ms), (5, 9));
        assert_eq!(field(&r.target), "u:al:ice");
        assert!(parse_entry("j:x", "0 9").is_some());
        for (f, v) in [("x:a", "1 2"), ("u:a", "1"), ("u:a", "a 2"), ("", "1 2")] {
            assert!(parse_entry(f, v).is_none(), "{f} {v}");
        }
    }
}
