--[[
ban_index.lua: the index of active bans, one hash for the whole deployment, read by every
replica's sync loop and by the admin API. It lives under its own {hash tag} and is written
after strike.lua has decided (Redis Cluster: one script never mixes it with IP keys).

KEYS[1]  index: hash group -> "<until_ms> <bans> <u> <r> <c>" (u, r, c: the strikes by kind
         that earned the ban, as strike.lua counts them; an entry without them reads 0)
ARGV[1]  op: "add", "list" or "remove"
ARGV[2]  now_ms override; "" means the server clock (TIME)
add:     ARGV[3..] sextuples group, ms_left, bans, u, r, c. Returns the number added (a
         replay of the same add writes the same entries again: nothing more).
list:    drops ended bans; returns {group, ms_left, bans, u, r, c, group, ...}
remove:  ARGV[3] group. Returns 1 when it was an active ban, else 0.

The key's TTL always covers its longest ban (it only collects garbage).
]]

local op = ARGV[1]
--#now ARGV[2]

local function fields(value)
  local out = {}
  for word in string.gmatch(value, '%S+') do
    out[#out + 1] = tonumber(word)
  end
  return out
end

if op == 'add' then
  local longest = 0
  local added = 0
  for i = 3, #ARGV, 6 do
    local ms = tonumber(ARGV[i + 1])
    redis.call('HSET', KEYS[1], ARGV[i], string.format('%.3f', now + ms) .. ' ' .. ARGV[i + 2]
      .. ' ' .. ARGV[i + 3] .. ' ' .. ARGV[i + 4] .. ' ' .. ARGV[i + 5])
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
    local f = fields(flat[i + 1])
    if f[1] > now then
      out[#out + 1] = flat[i]
      out[#out + 1] = math.ceil(f[1] - now)
      out[#out + 1] = f[2]
      out[#out + 1] = f[3] or 0
      out[#out + 1] = f[4] or 0
      out[#out + 1] = f[5] or 0
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
  if fields(value)[1] > now then
    return 1
  end
  return 0
end
return redis.error_reply('ban_index.lua: unknown op ' .. tostring(op))
