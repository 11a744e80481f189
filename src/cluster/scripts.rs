//! The Redis side of a channel: its keys (all under one `{channel}` hash tag, so one slot) and
//! the Lua scripts that change them atomically.

/// Assigns the next offset (creating the epoch when the channel's history is new or was lost),
/// appends to the capped stream, refreshes the TTLs and publishes, in one atomic step.
pub(super) const PUBLISH_LUA: &str = r#"
local off = redis.call('INCR', KEYS[1])
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = ARGV[5]
  redis.call('SET', KEYS[2], epoch)
  if off ~= 1 then
    redis.call('SET', KEYS[1], 1)
    off = 1
    redis.call('DEL', KEYS[3])
  end
end
if tonumber(ARGV[6]) > 0 then
  redis.call('XADD', KEYS[3], 'MAXLEN', ARGV[6], off .. '-1', 'i', ARGV[1], 't', ARGV[2], 'e', ARGV[3], 'p', ARGV[4], 'm', ARGV[8])
end
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call('PEXPIRE', KEYS[2], ARGV[7])
redis.call('PEXPIRE', KEYS[3], ARGV[7])
redis.call('PUBLISH', KEYS[4], off .. ' ' .. epoch .. ' ' .. ARGV[1] .. ' ' .. ARGV[2] .. ' ' .. string.len(ARGV[3]) .. ' ' .. ARGV[3] .. ARGV[4])
return off
"#;

/// The channel's offset and epoch, creating the epoch for a channel never published to.
pub(super) const POSITION_LUA: &str = r#"
local off = tonumber(redis.call('GET', KEYS[1]) or '0')
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[2], epoch, 'PX', ARGV[2])
  if off ~= 0 then
    redis.call('DEL', KEYS[1])
    redis.call('DEL', KEYS[3])
    off = 0
  end
end
return {off, epoch}
"#;

/// The channel's keys: offset counter, epoch, history stream, pub/sub channel.
pub(super) fn keys(channel: &str) -> [String; 4] {
    [
        format!("bc:{{{channel}}}:o"),
        format!("bc:{{{channel}}}:e"),
        format!("bc:{{{channel}}}:h"),
        format!("bc:{{{channel}}}"),
    ]
}
