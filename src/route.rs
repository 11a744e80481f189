//! Where a channel's work goes: this shard, the peer shard that owns the channel, or Redis in
//! cluster mode. The one place that decides it, for publish, subscribe, unwatch and history.

use crate::cluster::Bridge;
use crate::node::Node;
use std::hash::{Hash, Hasher};

/// Where the work for one channel is done.
pub(crate) enum Route<'a> {
    /// This shard owns the channel: done here, now.
    Local,
    /// Shard `.0` owns the channel: a message on the ring, answered on the ring.
    Peer(usize),
    /// Cluster mode: offsets, history and delivery between nodes are Redis's.
    Redis(&'a Bridge),
}

/// Which shard sequences `channel`. Stable across runs and shards (SipHash with fixed keys).
pub(crate) fn owner_of(channel: &str, shards: usize) -> usize {
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new_with_keys(0x6272_6f61, 0x6463_6173);
    channel.hash(&mut h);
    (h.finish() % shards as u64) as usize
}

/// Where shard `here` of `node` sends work for `channel`.
pub(crate) fn route<'a>(node: &'a Node, here: usize, channel: &str) -> Route<'a> {
    if let Some(bridge) = &node.bridge {
        return Route::Redis(bridge);
    }
    match owner_of(channel, node.shards) {
        owner if owner == here => Route::Local,
        owner => Route::Peer(owner),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_are_stable_and_spread() {
        // Fixed keys: the same channel has the same owner in every process and shard.
        assert_eq!(
            owner_of("contest/annual-2024", 4),
            owner_of("contest/annual-2024", 4)
        );
        let mut per_shard = [0usize; 4];
        for i in 0..4000 {
            per_shard[owner_of(&format!("c{i}"), 4)] += 1;
        }
        assert!(per_shard.iter().all(|&n| n > 800), "{per_shard:?}");
    }
}
