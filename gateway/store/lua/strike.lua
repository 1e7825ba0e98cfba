--[[
strike.lua: record strikes (401s, and 429s that came back early) against one client IP group
and decide, atomically, whether they earn a ban.

Every key belongs to the group's own {hash tag}: no API-key or workspace key is ever touched,
so the script runs on Redis Cluster.

Units: milliseconds. Decisions use the times stored in the keys (now comes from Redis TIME, or
from ARGV in tests); TTLs only collect garbage.

KEYS[1]  strikes: sorted set of strike ids "<call id>:<kind><i>" (kind u = 401, r = early rate
         429, c = early concurrency 429) scored by time; a strike counts while its time lies
         in (now - within, now]
KEYS[2]  state: hash {until = ban end, bans = bans remembered, forget = when they are
         forgotten, u/r/c = the strikes by kind that earned the ban, by = its call id}
ARGV[1]  call id: echoed back so a reply cannot be mistaken; a replay of the same call (a
         retry layer re-sending it) adds nothing twice and, if it banned, answers "banned now"
         again with the same numbers
ARGV[2..4]  strikes of this call by kind: 401s, early rate 429s, early concurrency 429s
ARGV[5]  now_ms override; "" means the server clock (TIME)
ARGV[6]  strikes: this many inside the window earn a ban
ARGV[7]  within_ms
ARGV[8]  duration_ms: the first ban
ARGV[9]  factor: each further remembered ban multiplies the duration
ARGV[10] max_duration_ms: the cap
ARGV[11] remember_ms: past bans count for escalation until this long after the last one ends

A group already banned records nothing. On reaching `strikes`: bans += 1 (from 0 when the
past is forgotten), the ban lasts min(duration * factor^(bans-1), max_duration), the strikes
are cleared.

Returns {call_id, status, ms_left, bans, strikes, u, r, c}
  status: 0 not banned (strikes = strikes in the window now), 1 already banned, 2 banned now
  ms_left: ms until the ban ends (ceiling; 0 when not banned)
  u, r, c: when banned, the strikes by kind that earned the ban
]]

local call_id = ARGV[1]
--#now ARGV[5]
local threshold = tonumber(ARGV[6])
local within = tonumber(ARGV[7])
local duration = tonumber(ARGV[8])
local factor = tonumber(ARGV[9])
local max_duration = tonumber(ARGV[10])
local remember = tonumber(ARGV[11])

local state = redis.call('HMGET', KEYS[2], 'until', 'bans', 'forget', 'u', 'r', 'c', 'by', 'count')
local ban_until = tonumber(state[1]) or 0
local bans = tonumber(state[2]) or 0
local forget = tonumber(state[3]) or 0
if ban_until > now then
  local status = 1
  local count = 0
  if state[7] == call_id then -- this very call banned: a replay answers what it answered
    status = 2
    count = tonumber(state[8]) or 0
  end
  return {call_id, status, math.ceil(ban_until - now), bans, count,
    tonumber(state[4]) or 0, tonumber(state[5]) or 0, tonumber(state[6]) or 0}
end
if forget <= now then
  bans = 0
end

redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.3f', now - within))
local room = threshold -- more than enough to decide
local score = string.format('%.3f', now)
local kinds = {'u', 'r', 'c'}
for k = 1, 3 do
  local weight = tonumber(ARGV[1 + k])
  if weight > room then
    weight = room
  end
  room = room - weight
  for i = 1, weight do
    redis.call('ZADD', KEYS[1], 'NX', score, call_id .. ':' .. kinds[k] .. i)
  end
end
local count = redis.call('ZCARD', KEYS[1])
if count < threshold then
  redis.call('PEXPIRE', KEYS[1], math.ceil(within))
  return {call_id, 0, 0, bans, count, 0, 0, 0}
end

local by_kind = {u = 0, r = 0, c = 0}
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local kind = string.match(member, ':(%a)%d+$')
  if kind and by_kind[kind] then
    by_kind[kind] = by_kind[kind] + 1
  end
end
bans = bans + 1
local ms = math.ceil(math.min(duration * factor ^ (bans - 1), max_duration))
ban_until = now + ms
forget = ban_until + remember
redis.call('HSET', KEYS[2], 'until', string.format('%.3f', ban_until), 'bans', bans,
  'forget', string.format('%.3f', forget), 'u', by_kind.u, 'r', by_kind.r, 'c', by_kind.c,
  'by', call_id, 'count', count)
redis.call('PEXPIRE', KEYS[2], math.ceil(forget - now))
redis.call('DEL', KEYS[1])
return {call_id, 2, ms, bans, count, by_kind.u, by_kind.r, by_kind.c}
