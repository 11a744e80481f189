//! Which connections of this shard belong to each authenticated user, so the backend's
//! `/disconnect` and `/unsubscribe` reach them without a scan. Touched at `auth` and at close,
//! never per message; a user with one connection costs its map entry and no allocation of its
//! own.

use std::collections::HashMap;
use std::sync::Arc;

/// One user's connections on this shard, by connection id.
enum Held {
    One(u64),
    Many(Vec<u64>),
}

/// Users and their connections on one shard.
#[derive(Default)]
pub(crate) struct Users(HashMap<Arc<str>, Held>);

impl Users {
    /// Connection `id` authenticated as `user`.
    pub(crate) fn add(&mut self, user: &Arc<str>, id: u64) {
        match self.0.get_mut(user) {
            None => {
                self.0.insert(user.clone(), Held::One(id));
            }
            Some(Held::One(first)) => {
                let first = *first;
                self.0.insert(user.clone(), Held::Many(vec![first, id]));
            }
            Some(Held::Many(ids)) => ids.push(id),
        }
    }

    /// Connection `id` of `user` ended.
    pub(crate) fn remove(&mut self, user: &str, id: u64) {
        let Some(held) = self.0.get_mut(user) else {
            return;
        };
        let gone = match held {
            Held::One(only) => *only == id,
            Held::Many(ids) => {
                ids.retain(|x| *x != id);
                if let [only] = ids[..] {
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
        match self.0.get(user) {
            None => Vec::new(),
            Some(Held::One(id)) => vec![*id],
            Some(Held::Many(ids)) => ids.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_users_connections_come_and_go() {
        let mut u = Users::default();
        let alice: Arc<str> = Arc::from("alice");
        u.add(&alice, 1);
        u.add(&alice, 2);
        u.add(&alice, 3);
        assert_eq!(u.of("alice"), vec![1, 2, 3]);
        u.remove("alice", 2);
        u.remove("alice", 1);
        assert_eq!(u.of("alice"), vec![3]);
        assert!(matches!(u.0.get("alice"), Some(Held::One(3))));
        u.remove("alice", 9);
        u.remove("alice", 3);
        assert!(u.of("alice").is_empty() && u.0.is_empty());
    }
}
