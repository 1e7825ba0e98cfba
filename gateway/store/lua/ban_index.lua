--[[
ban_index.lua: the index of active bans, one hash for the whole deployment, read by every
replica's sync loop and by the admin API. It lives under its own {hash tag} and is written
after strike.lua has decided (Redis Cluster: one script never mixes it with IP keys).

KEYS[1]  index: hash group -> "<until_ms> <bans>"
ARGV[1]  op: "add", "list" or "remove"
ARGV[2]  now_ms override; "" means the server clock (TIME)
add:     ARGV[3..] triples group, ms_left, bans. Returns the number added.
list:    drops ended bans; returns {group, ms_left, bans, group, ms_left, bans, ...}
remove:  ARGV[3] group. Returns 1 when it was an active ban, else 0.

The key's TTL always covers its longest ban (it only collects garbage).
]]

local op = ARGV[1]
--#now ARGV[2]

local function ends(value)
  local space = string.find(value, ' ', 1, true)
  return tonumber(string.sub(value, 1, space - 1)), tonumber(string.sub(value, space + 1))
end

if op == 'add' then
  local longest = 0
  local added = 0
  for i = 3, #ARGV, 3 do
    local ms = tonumber(ARGV[i + 1])
    redis.call('HSET', KEYS[1], ARGV[i], string.format('%.3f', now + ms) .. ' ' .. ARGV[i + 2])
    if ms > longest then
      longest = ms
    end
    added = added + 1
  end
  if redis.call('PTTL', KEYS[1]) < longest then
    redis.call('PEXPIRE', KEYS[1], math.ceil(longest))
  end
  return added
elseif op == 'list' then
  local flat = redis.call('HGETALL', KEYS[1])
  local out = {}
  for i = 1, #flat, 2 do
    local ban_until, bans = ends(flat[i + 1])
    if ban_until > now then
      out[#out + 1] = flat[i]
      out[#out + 1] = math.ceil(ban_until - now)
      out[#out + 1] = bans
    else
      redis.call('HDEL', KEYS[1], flat[i])
    end
  end
  return out
elseif op == 'remove' then
  local value = redis.call('HGET', KEYS[1], ARGV[3])
  if not value then
    return 0
  end
  redis.call('HDEL', KEYS[1], ARGV[3])
  local ban_until = ends(value)
  if ban_until > now then
    return 1
  end
  return 0
end
return redis.error_reply('ban_index.lua: unknown op ' .. tostring(op))
