//! Anonymous connections (SPEC 14): every WebSocket connection counts as anonymous from its
//! handshake until its first successful `auth`, against a cap per node and a cap per client
//! address; the client address is the peer's, or what `X-Forwarded-For` says when the peer is a
//! trusted proxy.
//!
//! The per-address counts are shared by every shard, so they sit behind striped locks: taken
//! once at the handshake and once when the connection authenticates or ends, never per message.

use ipnet::IpNet;
use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

/// Independent locks over the per-address counts, so shards accepting at once rarely meet.
const STRIPES: usize = 64;

/// The node's anonymous connections: in total and per client address.
#[derive(Debug)]
pub(crate) struct Anonymous {
    total: AtomicUsize,
    per_ip: Striped<IpAddr>,
    node_max: usize,
    per_ip_max: usize,
}

/// Counts per key shared by every shard, behind `STRIPES` independent locks so shards rarely
/// meet; a key is forgotten when its count goes back to 0.
#[derive(Debug)]
struct Striped<K>([Mutex<HashMap<K, u32>>; STRIPES]);

impl<K: Hash + Eq> Striped<K> {
    fn new() -> Striped<K> {
        Striped(std::array::from_fn(|_| Mutex::new(HashMap::new())))
    }

    fn stripe<Q: Hash + ?Sized>(&self, key: &Q) -> std::sync::MutexGuard<'_, HashMap<K, u32>> {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let h = BuildHasherDefault::<DefaultHasher>::default().hash_one(key);
        // A poisoned stripe only means another thread panicked, and a panic ends the process.
        self.0[h as usize % STRIPES]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// One more for `key`, unless it has `max` already; false then, and nothing counted.
    fn admit(&self, key: K, max: usize) -> bool {
        let mut map = self.stripe(&key);
        let n = map.get(&key).copied().unwrap_or(0);
        if n as usize >= max {
            return false;
        }
        map.insert(key, n + 1);
        true
    }

    /// One fewer for `key`.
    fn release<Q: Hash + Eq + ?Sized>(&self, key: &Q)
    where
        K: Borrow<Q>,
    {
        let mut map = self.stripe(key);
        if let Some(n) = map.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                map.remove(key);
            }
        }
    }
}

/// Why an anonymous connection was refused at the handshake.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// `limits.anonymous_connections_max` reached on this node.
    Node,
    /// `limits.anonymous_connections_per_ip_max` reached for this address.
    Address,
}

/// Who is at the other end of a WebSocket, as its handshake told; kept by its connection until
/// it holds nothing more.
pub(crate) struct Client {
    /// The handshake headers `[proxy] forward_headers` names, for the backend.
    pub(crate) headers: Vec<(String, String)>,
    /// Held until the first successful `auth`: the connection counts as anonymous.
    pub(crate) anonymous: Option<Permit>,
}

/// One anonymous connection counted; dropping it (at `auth` or at the end) uncounts it.
pub(crate) struct Permit {
    counts: Arc<Anonymous>,
    ip: IpAddr,
}

impl Anonymous {
    /// Counts with the two caps of `[limits]`.
    pub(crate) fn new(node_max: usize, per_ip_max: usize) -> Anonymous {
        Anonymous {
            total: AtomicUsize::new(0),
            per_ip: Striped::new(),
            node_max,
            per_ip_max,
        }
    }

    /// Anonymous connections open on the node.
    pub(crate) fn open(&self) -> usize {
        self.total.load(Relaxed)
    }

    /// Counts one more anonymous connection from `ip`, or says which cap refuses it.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Permit, Refused> {
        if self.total.fetch_add(1, Relaxed) >= self.node_max {
            self.total.fetch_sub(1, Relaxed);
            return Err(Refused::Node);
        }
        if !self.per_ip.admit(ip, self.per_ip_max) {
            self.total.fetch_sub(1, Relaxed);
            return Err(Refused::Address);
        }
        Ok(Permit {
            counts: self.clone(),
            ip,
        })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.counts.per_ip.release(&self.ip);
        self.counts.total.fetch_sub(1, Relaxed);
    }
}

/// Authenticated connections per user on this node, against `limits.connections_per_user_max`
/// (SPEC 17). Like the per-address counts, behind striped locks taken at `auth` and at close
/// only.
#[derive(Debug)]
pub(crate) struct PerUser {
    counts: Striped<Arc<str>>,
    max: usize,
}

impl PerUser {
    pub(crate) fn new(max: usize) -> PerUser {
        PerUser {
            counts: Striped::new(),
            max,
        }
    }

    /// Counts one more connection of `user`; false, and nothing counted, at the limit.
    pub(crate) fn admit(&self, user: &Arc<str>) -> bool {
        self.counts.admit(user.clone(), self.max)
    }

    /// A connection of `user` counted by `admit` ended.
    pub(crate) fn release(&self, user: &str) {
        self.counts.release(user);
    }
}

/// The client's address: the peer's, unless the peer is a trusted proxy; then the nearest
/// address of `X-Forwarded-For` that is not itself a trusted proxy (each proxy appends the
/// address it heard from, so entries to its left may be made up by the client).
pub(crate) fn client_addr(peer: IpAddr, forwarded_for: Option<&str>, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(&canonical(*ip)));
    if !is_trusted(&peer) {
        return peer;
    }
    let Some(list) = forwarded_for else {
        return peer;
    };
    let mut client = peer;
    for entry in list.rsplit(',') {
        match entry.trim().parse::<IpAddr>() {
            Ok(ip) => {
                client = canonical(ip);
                if !is_trusted(&client) {
                    break;
                }
            }
            // Garbage (or a port, which proxies do not add here): stop at what is known.
            Err(_) => break,
        }
    }
    client
}

/// IPv4-mapped IPv6 addresses (a dual-stack listener's view of IPv4 peers) as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn caps_per_node_and_per_address() {
        let a = Arc::new(Anonymous::new(3, 2));
        let p1 = a.admit(ip("10.0.0.1")).unwrap();
        let _p2 = a.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(a.admit(ip("10.0.0.1")).err(), Some(Refused::Address));
        let _p3 = a.admit(ip("10.0.0.2")).unwrap();
        assert_eq!(a.admit(ip("10.0.0.3")).err(), Some(Refused::Node));
        assert_eq!(a.open(), 3);
        drop(p1);
        assert_eq!(a.open(), 2);
        assert!(a.admit(ip("10.0.0.1")).is_ok());
        assert_eq!(a.open(), 2, "the permit above was dropped at once");
    }

    #[test]
    fn forwarded_for_counts_only_from_trusted_peers() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let xff = Some("1.1.1.1, 2.2.2.2, 10.1.1.1");
        assert_eq!(client_addr(ip("10.0.0.5"), xff, &trusted), ip("2.2.2.2"));
        assert_eq!(client_addr(ip("9.9.9.9"), xff, &trusted), ip("9.9.9.9"));
        assert_eq!(client_addr(ip("10.0.0.5"), None, &trusted), ip("10.0.0.5"));
        assert_eq!(
            client_addr(ip("10.0.0.5"), Some("junk"), &trusted),
            ip("10.0.0.5")
        );
        assert_eq!(
            client_addr(ip("::ffff:10.0.0.5"), Some("3.3.3.3"), &trusted),
            ip("3.3.3.3")
        );
    }
}
