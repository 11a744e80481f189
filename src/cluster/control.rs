//! The backend's disconnect and unsubscribe between nodes (SPEC 17): the node that got the
//! request publishes it on `bc:control`, every node subscribes to it from its first connection
//! to Redis, and each other node applies it on all its shards.

use super::{unavailable, State, REDIS_TIMEOUT};
use crate::error::Error;
use crate::ring::ShardMsg;
use crate::wire::request::Control;
use std::sync::Arc;

/// The pub/sub channel of control messages.
pub(super) const CHANNEL: &str = "bc:control";

/// Publishes `op` for the other nodes.
pub(super) async fn publish(state: &State, op: &Control) -> Result<(), Error> {
    let mut conn = state
        .connection()
        .ok_or_else(|| unavailable("not connected"))?;
    let message = encode(&state.node_id, op);
    let mut publish = redis::cmd("PUBLISH");
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

/// Another node's request: to every shard of this one (this node's own are applied already).
pub(super) fn on_message(state: &State, data: &[u8]) {
    let Some((origin, op)) = decode(data) else {
        tracing::warn!("undecodable control message from redis dropped");
        return;
    };
    if origin == state.node_id {
        return;
    }
    let op = Arc::new(op);
    for shard in &state.shards {
        let _ = shard.unbounded_send(ShardMsg::Apply(op.clone()));
    }
}

/// `origin D code userlen user+reason` or `origin U userlen user+pattern`.
fn encode(origin: &str, op: &Control) -> Vec<u8> {
    let text = match op {
        Control::Disconnect { user, code, reason } => {
            format!("{origin} D {code} {} {user}{reason}", user.len())
        }
        Control::Unsubscribe { user, pattern } => {
            format!("{origin} U {} {user}{pattern}", user.len())
        }
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
        ] {
            let (origin, back) = decode(&encode("n1", &op)).unwrap();
            assert_eq!((origin.as_str(), back), ("n1", op));
        }
        assert!(decode(b"n1 X 1 a").is_none());
        assert!(decode(b"n1 U 9 a").is_none());
        assert!(decode(b"n1 D x 1 a").is_none());
    }
}
