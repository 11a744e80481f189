//! Which connections of this shard belong to each authenticated user, and when their tokens
//! were issued, so the backend's `/disconnect`, `/unsubscribe` and `/revoke` reach them without
//! asking every session. Touched at `auth` and at close, never per message; a user with one
//! connection costs its map entry and no allocation of its own.

use crate::auth::Issued;
use crate::revocation::{Revocation, Target};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// One connection and its token's revocation claims: the `jti` as a hash, so that an entry
/// stays the size of the map's value either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Token {
    id: u64,
    iat: u64,
    /// 0: no `jti`.
    jti: u64,
}

impl Token {
    fn new(id: u64, issued: &Issued) -> Token {
        Token {
            id,
            iat: issued.iat,
            jti: issued.jti.as_deref().map_or(0, jti_hash),
        }
    }
}

fn jti_hash(jti: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    jti.hash(&mut h);
    h.finish().max(1)
}

/// One user's connections on this shard.
enum Held {
    One(Token),
    Many(Vec<Token>),
}

impl Held {
    fn tokens(&self) -> &[Token] {
        match self {
            Held::One(t) => std::slice::from_ref(t),
            Held::Many(ts) => ts,
        }
    }
}

/// Users and their connections on one shard.
#[derive(Default)]
pub(crate) struct Users(HashMap<Arc<str>, Held>);

impl Users {
    /// Connection `id` authenticated as `user` with a token `issued` so; again (a re-auth),
    /// the new token replaces the old.
    pub(crate) fn add(&mut self, user: &Arc<str>, id: u64, issued: &Issued) {
        let token = Token::new(id, issued);
        match self.0.get_mut(user) {
            None => {
                self.0.insert(user.clone(), Held::One(token));
            }
            Some(Held::One(first)) if first.id == id => *first = token,
            Some(Held::One(first)) => {
                let first = *first;
                self.0.insert(user.clone(), Held::Many(vec![first, token]));
            }
            Some(Held::Many(ts)) => match ts.iter_mut().find(|t| t.id == id) {
                Some(t) => *t = token,
                None => ts.push(token),
            },
        }
    }

    /// Connection `id` of `user` ended.
    pub(crate) fn remove(&mut self, user: &str, id: u64) {
        let Some(held) = self.0.get_mut(user) else {
            return;
        };
        let gone = match held {
            Held::One(only) => only.id == id,
            Held::Many(ts) => {
                ts.retain(|t| t.id != id);
                if let [only] = ts[..] {
                    *held = Held::One(only);
                }
                false
            }
        };
        if gone {
            self.0.remove(user);
        }
    }

    /// The connections of `user` on this shard.
    pub(crate) fn of(&self, user: &str) -> Vec<u64> {
        let tokens = self.0.get(user).map(Held::tokens).unwrap_or_default();
        tokens.iter().map(|t| t.id).collect()
    }

    /// The connections (with their user) whose token `r` revokes: a user's by `iat`, or, for
    /// a `jti`, any user's (a scan of this shard's authenticated connections; revocations are
    /// rare).
    pub(crate) fn revoked(&self, r: &Revocation) -> Vec<(Arc<str>, u64)> {
        let (users, jti): (Vec<_>, _) = match &r.target {
            Target::User(user) => (self.0.get_key_value(user.as_str()).into_iter().collect(), 0),
            Target::Jti(jti) => (self.0.iter().collect(), jti_hash(jti)),
        };
        let mut taken = Vec::new();
        for (user, held) in users {
            for t in held.tokens() {
                let hit = match r.target {
                    Target::User(_) => t.iat.saturating_mul(1000) < r.cutoff_ms,
                    Target::Jti(_) => t.jti == jti,
                };
                if hit {
                    taken.push((user.clone(), t.id));
                }
            }
        }
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issued(iat: u64, jti: Option<&str>) -> Issued {
        Issued {
            iat,
            jti: jti.map(String::from),
        }
    }

    #[test]
    fn a_users_connections_come_and_go() {
        let mut u = Users::default();
        let alice: Arc<str> = Arc::from("alice");
        for id in 1..=3 {
            u.add(&alice, id, &issued(0, None));
        }
        assert_eq!(u.of("alice"), vec![1, 2, 3]);
        u.remove("alice", 2);
        u.remove("alice", 1);
        assert_eq!(u.of("alice"), vec![3]);
        assert!(matches!(u.0.get("alice"), Some(Held::One(t)) if t.id == 3));
        u.remove("alice", 9);
        u.remove("alice", 3);
        assert!(u.of("alice").is_empty() && u.0.is_empty());
    }

    #[test]
    fn revocations_pick_the_tokens_they_name() {
        let mut u = Users::default();
        let (alice, bob): (Arc<str>, Arc<str>) = (Arc::from("alice"), Arc::from("bob"));
        u.add(&alice, 1, &issued(100, Some("a1")));
        u.add(&alice, 2, &issued(200, None));
        u.add(&bob, 3, &issued(100, Some("b1")));
        let by_time = |user: &str, cutoff_ms| Revocation {
            target: Target::User(user.into()),
            cutoff_ms,
            expires_ms: u64::MAX,
        };
        let by_jti = |jti: &str| Revocation {
            target: Target::Jti(jti.into()),
            cutoff_ms: 0,
            expires_ms: u64::MAX,
        };
        let ids = |r: &Revocation| {
            u.revoked(r)
                .into_iter()
                .map(|(_, id)| id)
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&by_time("alice", 150_000)), vec![1]);
        assert_eq!(ids(&by_time("alice", 200_001)), vec![1, 2]);
        assert!(ids(&by_time("carol", 999_999)).is_empty());
        assert_eq!(u.revoked(&by_jti("b1")), vec![(bob.clone(), 3)]);
        assert!(ids(&by_jti("zz")).is_empty());
        // A re-auth replaces the connection's token.
        u.add(&alice, 1, &issued(300, None));
        assert_eq!(u.of("alice"), vec![1, 2]);
        let ids = |r: &Revocation| {
            u.revoked(r)
                .into_iter()
                .map(|(_, id)| id)
                .collect::<Vec<_>>()
        };
        assert!(ids(&by_jti("a1")).is_empty());
        assert_eq!(ids(&by_time("alice", 250_000)), vec![2]);
    }
}
