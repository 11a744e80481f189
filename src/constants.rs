//! Compile-time limits and how they relate, checked when the crate compiles. Limits a deployment
//! may tune are configuration keys (`config.rs`); these are the ones the data structures are
//! built around.

/// Most shards one node runs. A connection id keeps its shard in its low `SHARD_ID_BITS` bits,
/// and a channel's owner keeps one watch bit per shard in `WATCH_WORDS` words; `shards` in the
/// configuration is bounded by this too.
pub(crate) const SHARDS_MAX: usize = 256;
/// Low bits of a connection id that name its shard.
pub(crate) const SHARD_ID_BITS: u32 = 8;
/// 64-bit words of a channel's watch mask (one bit per shard).
pub(crate) const WATCH_WORDS: usize = SHARDS_MAX / 64;

const _: () = assert!(1 << SHARD_ID_BITS == SHARDS_MAX);
const _: () = assert!(WATCH_WORDS * 64 == SHARDS_MAX);

/// Messages in flight between one pair of shards before the sender's pump waits. Deep enough
/// to absorb a burst without waking the pump, small enough to bound memory.
pub(crate) const RING_CAPACITY: usize = 4096;

/// Bytes of broadcast frames a shard stages in one flush pass's arena; beyond it, frames go to
/// the connections' own buffers (the arena keeps its capacity between passes). A staged frame
/// is located by u32 offsets.
pub(crate) const ARENA_MAX: usize = 4 << 20;

const _: () = assert!(ARENA_MAX < u32::MAX as usize);

/// Publications a shard holds for the subscribes of one channel still waiting for their answer
/// (cluster mode: the answer may come after newer publications, which the new subscriptions
/// must get). A subscribe round trip's worth; later ones are not held.
pub(crate) const HELD_MAX: usize = 4096;
