--[[
strike.lua: record strikes (401s and 429s) against one client IP group and decide, atomically,
whether they earn a ban.

Every key belongs to the group's own {hash tag}: no API-key or workspace key is ever touched,
so the script runs on Redis Cluster.

Units: milliseconds. Decisions use the times stored in the keys (now comes from Redis TIME, or
from ARGV in tests); TTLs only collect garbage.

KEYS[1]  strikes: sorted set of strike ids scored by time; a strike counts while its time lies
         in (now - within, now]
KEYS[2]  state: hash {until = ban end, bans = bans remembered, forget = when they are forgotten}
ARGV[1]  call id: strike ids are "<call id>:<i>"; echoed back so a reply cannot be mistaken
ARGV[2]  weight: how many strikes this call records (the replica batches them)
ARGV[3]  now_ms override; "" means the server clock (TIME)
ARGV[4]  strikes: this many inside the window earn a ban
ARGV[5]  within_ms
ARGV[6]  duration_ms: the first ban
ARGV[7]  factor: each further remembered ban multiplies the duration
ARGV[8]  max_duration_ms: the cap
ARGV[9]  remember_ms: past bans count for escalation until this long after the last one ends

A group already banned records nothing. On reaching `strikes`: bans += 1 (from 0 when the
past is forgotten), the ban lasts min(duration * factor^(bans-1), max_duration), the strikes
are cleared.

Returns {call_id, status, ms_left, bans, strikes}
  status: 0 not banned (strikes = strikes in the window now), 1 already banned, 2 banned now
  ms_left: ms until the ban ends (ceiling; 0 when not banned)
]]

local call_id = ARGV[1]
local weight = tonumber(ARGV[2])
--#now ARGV[3]
local threshold = tonumber(ARGV[4])
local within = tonumber(ARGV[5])
local duration = tonumber(ARGV[6])
local factor = tonumber(ARGV[7])
local max_duration = tonumber(ARGV[8])
local remember = tonumber(ARGV[9])

local state = redis.call('HMGET', KEYS[2], 'until', 'bans', 'forget')
local ban_until = tonumber(state[1]) or 0
local bans = tonumber(state[2]) or 0
local forget = tonumber(state[3]) or 0
if ban_until > now then
  return {call_id, 1, math.ceil(ban_until - now), bans, 0}
end
if forget <= now then
  bans = 0
end

redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.3f', now - within))
if weight > threshold then
  weight = threshold -- more than enough to decide
end
for i = 1, weight do
  redis.call('ZADD', KEYS[1], string.format('%.3f', now), call_id .. ':' .. i)
end
local count = redis.call('ZCARD', KEYS[1])
if count < threshold then
  redis.call('PEXPIRE', KEYS[1], math.ceil(within))
  return {call_id, 0, 0, bans, count}
end

bans = bans + 1
local ms = math.ceil(math.min(duration * factor ^ (bans - 1), max_duration))
ban_until = now + ms
forget = ban_until + remember
redis.call('HSET', KEYS[2], 'until', string.format('%.3f', ban_until), 'bans', bans,
  'forget', string.format('%.3f', forget))
redis.call('PEXPIRE', KEYS[2], math.ceil(forget - now))
redis.call('DEL', KEYS[1])
return {call_id, 2, ms, bans, count}
