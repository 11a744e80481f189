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

/// One user's connections on this shard. Several are keyed by connection id: one user may hold
/// thousands (a shared viewer token, a load test), and a list would make each `auth` and close
/// of that user cost a scan of all the others.
enum Held {
    One(Token),
    Many(HashMap<u64, Token>),
}

impl Held {
    fn tokens(&self) -> impl Iterator<Item = &Token> {
        let (one, many) = match self {
            Held::One(t) => (Some(t), None),
            Held::Many(ts) => (None, Some(ts.values())),
        };
        one.into_iter().chain(many.into_iter().flatten())
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
                let both = HashMap::from([(first.id, first), (id, token)]);
                self.0.insert(user.clone(), Held::Many(both));
            }
            Some(Held::Many(ts)) => {
                ts.insert(id, token);
            }
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
                ts.remove(&id);
                if ts.len() == 1 {
                    if let Some(&only) = ts.values().next() {
                        *held = Held::One(only);
                    }
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
        let held = self.0.get(user);
        held.into_iter()
            .flat_map(Held::tokens)
            .map(|t| t.id)
            .collect()
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
        let mut all = u.of("alice");
        all.sort_unstable();
        assert_eq!(all, vec![1, 2, 3]);
        u.remove("alice", 2);
        u.remove("alice", 1);
        assert_eq!(u.of("alice"), vec![3]);
        assert!(matches!(u.0.get("alice"), Some(Held::One(t)) if t.id == 3));
        u.remove("alice", 9);
        u.remove("alice", 3);
        assert!(u.of("alice").is_empty() && u.0.is_empty());
    }

    #[test]
    fn a_user_with_thousands_of_connections() {
        let mut u = Users::default();
        let viewer: Arc<str> = Arc::from("viewer");
        for id in 1..=5000 {
            u.add(&viewer, id, &issued(0, None));
        }
        u.add(&viewer, 77, &issued(9, None));
        assert_eq!(u.of("viewer").len(), 5000);
        let late = Revocation {
            target: Target::User("viewer".into()),
            cutoff_ms: 1000,
            expires_ms: u64::MAX,
        };
        assert_eq!(u.revoked(&late).len(), 4999, "77 re-authenticated at 9 s");
        for id in 1..5000 {
            u.remove("viewer", id);
        }
        assert!(matches!(u.0.get("viewer"), Some(Held::One(t)) if t.id == 5000));
        u.remove("viewer", 5000);
        assert!(u.0.is_empty());
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
            let mut ids: Vec<_> = u.revoked(r).into_iter().map(|(_, id)| id).collect();
            ids.sort_unstable();
            ids
        };
        assert_eq!(ids(&by_time("alice", 150_000)), vec![1]);
        assert_eq!(ids(&by_time("alice", 200_001)), vec![1, 2]);
        assert!(ids(&by_time("carol", 999_999)).is_empty());
        assert_eq!(u.revoked(&by_jti("b1")), vec![(bob.clone(), 3)]);
        assert!(ids(&by_jti("zz")).is_empty());
        // A re-auth replaces the connection's token.
        u.add(&alice, 1, &issued(300, None));
        let mut all = u.of("alice");
        all.sort_unstable();
        assert_eq!(all, vec![1, 2]);
        let ids = |r: &Revocation| {
            let mut ids: Vec<_> = u.revoked(r).into_iter().map(|(_, id)| id).collect();
            ids.sort_unstable();
            ids
        };
        assert!(ids(&by_jti("a1")).is_empty());
        assert_eq!(ids(&by_time("alice", 250_000)), vec![2]);
    }
}
