--[[
job_drop.lua: an ended job's member leaves its slot buckets, and stays known as ended.

The member goes into the key's ended set (score: when that memory expires), so a handover of
the same job that lands late (a timed-out job_handover.lua, or a replay) moves nothing. The
set is trimmed here; it lives as long as its newest entry. Idempotent.

KEYS: the job's slot bucket keys, then the key's ended set; one {hash tag}.
ARGV[1]  job member   ARGV[2] ended_ms: how long the ended set remembers it
ARGV[3]  now_ms override; "" means the server clock (TIME)
Returns: how many buckets held the member
]]

--#include periods
local member, ended_ms = ARGV[1], tonumber(ARGV[2])
local members = lease_members(member)  -- a job holding K slots has K members
--#now ARGV[3]

local removed = 0
for i = 1, #KEYS - 1 do
  removed = removed + math.min(1, redis.call('ZREM', KEYS[i], unpack(members)))
end
local ended = KEYS[#KEYS]
redis.call('ZREMRANGEBYSCORE', ended, '-inf', now)
redis.call('ZADD', ended, now + ended_ms, member)
redis.call('PEXPIRE', ended, math.ceil(ended_ms))
return removed
