//! Who is in a channel (SPEC 16): members by token `sub`, each counted once however many
//! subscriptions hold it. One node's owner shard keeps a channel's `Members`; in cluster mode
//! the node's Redis bridge keeps the node's own count per member, and Redis the channel's
//! members (`cluster/presence.rs`).

use crate::error::{err, Code, Error};
use crate::wire::reply;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// One member as a subscription brings it: the token's `sub` and `info` claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The token's `sub`.
    pub user: Arc<str>,
    /// Compact JSON of an object, when the token has an `info` claim.
    pub info: Option<Arc<str>>,
}

/// `join` or `leave`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Join,
    Leave,
}

impl Kind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Kind::Join => "join",
            Kind::Leave => "leave",
        }
    }
}

/// A channel's members, each with the number of subscriptions holding it.
#[derive(Debug, Default)]
pub(crate) struct Members {
    members: HashMap<Arc<str>, (Option<Arc<str>>, u32)>,
}

impl Members {
    /// One more subscription of `member`; true when it is a new member. A new member beyond
    /// `max` is refused.
    pub(crate) fn add(&mut self, member: &Member, max: usize) -> Result<bool, Error> {
        if let Some((_, n)) = self.members.get_mut(&member.user) {
            *n += 1;
            return Ok(false);
        }
        if self.members.len() >= max {
            return Err(full(max));
        }
        let entry = (member.info.clone(), 1);
        self.members.insert(member.user.clone(), entry);
        Ok(true)
    }

    /// One subscription of `user` fewer; its info when that was its last (it left).
    pub(crate) fn remove(&mut self, user: &str) -> Option<Option<Arc<str>>> {
        let (_, n) = self.members.get_mut(user)?;
        *n -= 1;
        if *n > 0 {
            return None;
        }
        self.members.remove(user).map(|(info, _)| info)
    }

    pub(crate) fn len(&self) -> usize {
        self.members.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Every member with its info.
    pub(crate) fn iter(&self) -> impl Iterator<Item = Member> + '_ {
        self.members.iter().map(|(user, (info, _))| Member {
            user: user.clone(),
            info: info.clone(),
        })
    }

    /// The members as `reply::presence` encodes them, sorted by user so that two snapshots of
    /// the same members read the same.
    pub(crate) fn encode(&self, version: u64) -> Vec<u8> {
        let mut list: Vec<_> = self.members.iter().collect();
        list.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let members = list.into_iter().map(|(u, (i, _))| (&**u, i.as_deref()));
        reply::presence(members, version)
    }
}

/// The error for presence asked of a channel whose rule does not list members.
pub(crate) fn off() -> Error {
    err(
        Code::FailedPrecondition,
        "presence is off for this channel (its [[channels]] rule has no presence = true)",
    )
}

/// The error of a subscribe that would add a member beyond the rule's cap.
pub(crate) fn full(max: usize) -> Error {
    err(
        Code::ResourceExhausted,
        format!("the channel has its most members ({max}, presence_members_max)"),
    )
}

/// The version after `previous`: larger, and at least the current Unix time in microseconds,
/// so versions keep increasing even after the state holding `previous` was lost (a channel
/// forgotten and made again, Redis without its data): clients drop events at or below their
/// snapshot's version.
pub(crate) fn next_version(previous: u64) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    (previous + 1).max(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(user: &str) -> Member {
        Member {
            user: user.into(),
            info: Some(format!(r#"{{"name":"{user}"}}"#).into()),
        }
    }

    #[test]
    fn a_member_is_counted_once_and_leaves_with_its_last_subscription() {
        let mut m = Members::default();
        assert!(m.add(&member("a"), 2).unwrap());
        assert!(
            !m.add(&member("a"), 2).unwrap(),
            "second subscription: no join"
        );
        assert!(m.add(&member("b"), 2).unwrap());
        assert_eq!(
            m.add(&member("c"), 2).unwrap_err().code,
            Code::ResourceExhausted
        );
        assert!(
            !m.add(&member("b"), 2).unwrap(),
            "an existing member is never refused"
        );
        assert_eq!(m.remove("a"), None);
        assert_eq!(m.remove("a").unwrap().as_deref(), Some(r#"{"name":"a"}"#));
        assert_eq!(m.remove("a"), None, "not a member any more");
        assert_eq!(m.len(), 1);
        let v: serde_json::Value = serde_json::from_slice(&m.encode(7)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"members":[{"user":"b","info":{"name":"b"}}],"count":1,"version":7})
        );
    }

    #[test]
    fn versions_increase_past_lost_state() {
        let v = next_version(0);
        assert!(v > 1_700_000_000_000_000, "Unix microseconds");
        assert!(next_version(v) > v);
        assert_eq!(next_version(u64::MAX / 2), u64::MAX / 2 + 1);
    }
}
