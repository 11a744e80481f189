//! The Redis side of a channel: its keys (all under one `{channel}` hash tag, so one slot) and
//! the Lua scripts that change them atomically.

/// Whether the channel's state may be kept, given the generation it was written under (KEYS
/// `key`) and the one asked (`State::generation`): none in standalone mode, the master's run id
/// in sentinel mode. In Redis Cluster (`*`) it is the id of the master that holds the slot now;
/// state written under another master is kept when that master is still a healthy master (the
/// slot moved here with its keys, a resharding), and not when it failed or became a replica (a
/// failover, after which the last writes may be missing). Records the generation now current.
const GENERATION: &str = r#"
local function same_generation(asked, key, ttl)
  if asked == '' then return true end
  local held = redis.call('GET', key)
  local now, keep = asked, held == asked
  if asked == '*' then
    now = redis.call('CLUSTER', 'MYID')
    keep = held == now
    if held and not keep then
      for line in string.gmatch(redis.call('CLUSTER', 'NODES'), '[^\n]+') do
        local id, flags = string.match(line, '^(%S+) %S+ (%S+)')
        if id == held then
          keep = string.find(flags, 'master', 1, true) ~= nil and string.find(flags, 'fail', 1, true) == nil
        end
      end
    end
  end
  if held ~= now then redis.call('SET', key, now, 'PX', ttl) end
  return keep
end
"#;

/// Assigns the next offset (creating the epoch when the channel's history is new or was lost,
/// or was written under another master: ARGV[10] against KEYS[5], see `GENERATION`),
/// appends to the capped stream, refreshes the TTLs and publishes, in one atomic step.
const PUBLISH_LUA: &str = r#"
if not same_generation(ARGV[10], KEYS[5], ARGV[7]) then redis.call('DEL', KEYS[2]) end
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
  redis.call('XADD', KEYS[3], 'MAXLEN', ARGV[6], off .. '-1', 'i', ARGV[1], 't', ARGV[2], 'e', ARGV[3], 'p', ARGV[4], 'm', ARGV[8], 'f', ARGV[9])
end
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call('PEXPIRE', KEYS[2], ARGV[7])
redis.call('PEXPIRE', KEYS[3], ARGV[7])
if ARGV[10] ~= '' then redis.call('PEXPIRE', KEYS[5], ARGV[7]) end
redis.call('PUBLISH', KEYS[4], off .. ' ' .. epoch .. ' ' .. ARGV[1] .. ' ' .. ARGV[2] .. ' ' .. string.len(ARGV[3]) .. ' ' .. string.len(ARGV[9]) .. ' ' .. ARGV[3] .. ARGV[9] .. ARGV[4])
return off
"#;

/// The channel's offset and epoch, creating the epoch for a channel never published to (or
/// written under another master, as `PUBLISH_LUA`: ARGV[4] against KEYS[6]); with ARGV[3] = 1
/// also its presence version (KEYS[4]), with 2 its members too (KEYS[5]): one call per
/// subscribe, with or without presence.
const POSITION_LUA: &str = r#"
if not same_generation(ARGV[4], KEYS[6], ARGV[2]) then redis.call('DEL', KEYS[2]) end
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
if ARGV[3] == '0' then return {off, epoch} end
local v = redis.call('GET', KEYS[4]) or '0'
if ARGV[3] == '1' then return {off, epoch, v} end
return {off, epoch, v, redis.call('HGETALL', KEYS[5])}
"#;

/// The next presence version (`presence::next_version` in Lua, on Redis's clock), stored in
/// KEYS[4] for a day past the last change; a version lost with its key still comes out larger
/// than every one before it, which clients compare with their snapshot's.
const NEXT_VERSION: &str = r#"
local function next_version(key)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local v = math.max(tonumber(redis.call('GET', key) or '0') + 1, now)
  local text = string.format('%.0f', v)
  redis.call('SET', key, text, 'PX', 86400000)
  return text
end
"#;

/// A node's first subscription of a member: KEYS are the channel's members (user -> info),
/// node-member pairs, member -> node count, version, pub/sub channel; ARGV node, user, info,
/// cap (0: none), announce (1: publish the join), silent (1: a re-assert after Redis lost its
/// data, whose join clients already saw). Returns 1 for a new member, 0 when it was one
/// already (or this node had it counted), -1 when the channel is full.
fn join_lua() -> String {
    format!(
        "{NEXT_VERSION}{}",
        r#"
local pair = ARGV[1] .. '|' .. ARGV[2]
if redis.call('SADD', KEYS[2], pair) == 0 then return 0 end
if redis.call('HINCRBY', KEYS[3], ARGV[2], 1) > 1 then return 0 end
local cap = tonumber(ARGV[4])
if cap > 0 and redis.call('HLEN', KEYS[1]) >= cap then
  redis.call('SREM', KEYS[2], pair)
  redis.call('HDEL', KEYS[3], ARGV[2])
  return -1
end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
local v = next_version(KEYS[4])
if ARGV[5] == '1' and ARGV[6] == '0' then
  redis.call('PUBLISH', KEYS[5], 'J ' .. v .. ' ' .. string.len(ARGV[2]) .. ' ' .. ARGV[2] .. ARGV[3])
end
return 1
"#
    )
}

/// A node's last subscription of a member ended (or the node died): KEYS and ARGV node, user
/// as `join_lua`, ARGV[3] announce. Returns 1 when the member left the channel.
fn leave_lua() -> String {
    format!(
        "{NEXT_VERSION}{}",
        r#"
if redis.call('SREM', KEYS[2], ARGV[1] .. '|' .. ARGV[2]) == 0 then return 0 end
if redis.call('HINCRBY', KEYS[3], ARGV[2], -1) > 0 then return 0 end
redis.call('HDEL', KEYS[3], ARGV[2])
local info = redis.call('HGET', KEYS[1], ARGV[2]) or ''
redis.call('HDEL', KEYS[1], ARGV[2])
local v = next_version(KEYS[4])
if ARGV[3] == '1' then
  redis.call('PUBLISH', KEYS[5], 'L ' .. v .. ' ' .. string.len(ARGV[2]) .. ' ' .. ARGV[2] .. info)
end
return 1
"#
    )
}

/// Stamps this node's heartbeat (ARGV[1]) with Redis's clock in the nodes' sorted set and
/// returns {1 if it was not there, nodes silent for ARGV[2] ms}.
const HEARTBEAT_LUA: &str = r#"
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local new = redis.call('ZADD', KEYS[1], ms, ARGV[1])
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. string.format('%.0f', ms - tonumber(ARGV[2])))
return {new, dead}
"#;

/// Revocations (SPEC 17): field `u:<user>` or `j:<jti>` -> `<cutoff ms> <expires ms>`; the
/// key lives until its latest entry expires. Its hash tag is the control channel's
/// (`control::CHANNEL`), since the script that stores a revocation also publishes it, and in
/// Redis Cluster a script may only touch one slot.
pub(super) const REVOKED: &str = "bc:{bc}:revoked";

/// Stores revocations (ARGV from 5: field, cutoff ms, expires ms; a held field keeps the later
/// cutoff and expiry) in KEYS[1] while it holds fewer than ARGV[2] live ones (ARGV[1]: now,
/// ms), then PUBLISHes ARGV[4] (unless empty) on ARGV[3]. Returns 0 when full, else 1.
const REVOKE_LUA: &str = r#"
local now, max, latest = tonumber(ARGV[1]), tonumber(ARGV[2]), 0
for i = 5, #ARGV, 3 do
  local field, cutoff, expires = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local held = redis.call('HGET', KEYS[1], field)
  if held then
    local c, e = string.match(held, '^(%d+) (%d+)$')
    cutoff = math.max(cutoff, tonumber(c) or 0)
    expires = math.max(expires, tonumber(e) or 0)
  elseif redis.call('HLEN', KEYS[1]) >= max then
    local all = redis.call('HGETALL', KEYS[1])
    for j = 1, #all, 2 do
      local e = tonumber(string.match(all[j + 1], ' (%d+)$')) or 0
      if e <= now then redis.call('HDEL', KEYS[1], all[j]) end
    end
    if redis.call('HLEN', KEYS[1]) >= max then return 0 end
  end
  redis.call('HSET', KEYS[1], field, string.format('%.0f %.0f', cutoff, expires))
  latest = math.max(latest, expires)
end
if latest > now then
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl < 0 or now + ttl < latest then
    redis.call('PEXPIREAT', KEYS[1], string.format('%.0f', latest))
  end
end
if ARGV[4] ~= '' then redis.call('PUBLISH', ARGV[3], ARGV[4]) end
return 1
"#;

/// Adds ARGV[1] to the set KEYS[1]; 1 when the set was empty before.
const OCCUPY_LUA: &str = r#"
if redis.call('SADD', KEYS[1], ARGV[1]) == 1 and redis.call('SCARD', KEYS[1]) == 1 then return 1 end
return 0
"#;

/// Removes ARGV[1] from the set KEYS[1]; 1 when that emptied it.
const VACATE_LUA: &str = r#"
if redis.call('SREM', KEYS[1], ARGV[1]) == 1 and redis.call('SCARD', KEYS[1]) == 0 then return 1 end
return 0
"#;

/// Every script, hashed once (`redis::Script::new` computes the SHA-1 that EVALSHA sends).
pub(super) struct Scripts {
    pub(super) publish: redis::Script,
    pub(super) position: redis::Script,
    pub(super) join: redis::Script,
    pub(super) leave: redis::Script,
    pub(super) heartbeat: redis::Script,
    pub(super) revoke: redis::Script,
    pub(super) occupy: redis::Script,
    pub(super) vacate: redis::Script,
}

impl Scripts {
    /// `sharded`: Redis Cluster, where the scripts publish with `SPUBLISH` (sharded pub/sub: a
    /// message goes only to the shard that owns the channel's slot, not to every shard).
    pub(super) fn new(sharded: bool) -> Scripts {
        let script = |text: &str| {
            let text = if sharded {
                text.replace("'PUBLISH'", "'SPUBLISH'")
            } else {
                text.to_string()
            };
            redis::Script::new(&text)
        };
        Scripts {
            publish: script(&format!("{GENERATION}{PUBLISH_LUA}")),
            position: script(&format!("{GENERATION}{POSITION_LUA}")),
            join: script(&join_lua()),
            leave: script(&leave_lua()),
            heartbeat: script(HEARTBEAT_LUA),
            revoke: script(REVOKE_LUA),
            occupy: script(OCCUPY_LUA),
            vacate: script(VACATE_LUA),
        }
    }
}

/// The nodes' heartbeats: node id -> Redis time (ms) of its last.
pub(super) const NODES: &str = "bc:nodes";

/// The set of `channel user` pairs node `node` holds members for (so that the survivors of
/// its death know whom to remove), and the mark that they did.
pub(super) fn node_keys(node: &str) -> [String; 2] {
    [
        format!("bc:node:{{{node}}}"),
        format!("bc:node:{{{node}}}:reaped"),
    ]
}

/// A channel's presence keys: members (user -> info), node-member pairs, member -> node
/// count, version, and the pub/sub channel the joins and leaves go out on.
pub(super) fn presence_keys(channel: &str) -> [String; 5] {
    [
        format!("bc:{{{channel}}}:m"),
        format!("bc:{{{channel}}}:n"),
        format!("bc:{{{channel}}}:c"),
        format!("bc:{{{channel}}}:v"),
        format!("bc:{{{channel}}}"),
    ]
}

/// The channel's keys: offset counter, epoch, history stream, pub/sub channel, and the
/// generation (sentinel mode: the run id of the master its state was written under).
pub(super) fn keys(channel: &str) -> [String; 5] {
    [
        format!("bc:{{{channel}}}:o"),
        format!("bc:{{{channel}}}:e"),
        format!("bc:{{{channel}}}:h"),
        format!("bc:{{{channel}}}"),
        format!("bc:{{{channel}}}:g"),
    ]
}
