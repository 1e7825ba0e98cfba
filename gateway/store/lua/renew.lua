--[[
renew.lua: extend the slot leases a live process still holds (its heartbeat).

A lease is extended only while it is alive: a member that is gone (released or purged)
or already expired (score <= now) is reported lost and left alone, so a renewal never
resurrects a slot someone else may have been admitted into. ZADD XX GT never adds a member
and never shortens a longer expiry (a job slot). A lease `id*K` holds K members (periods.lua
lease_members): its first member decides alive or lost, and all K are extended.

Units: milliseconds (float scores).
KEYS: the slot bucket keys of this batch; all share one {hash tag}.
ARGV[1]  lease_ms: the renewed lease expires this long after now
ARGV[2]  now_ms override; "" means the server clock (TIME)
ARGV[3..] pairs: key index (1-based into KEYS), lease id
Returns: the 1-based numbers of the pairs whose lease was lost (empty when all were renewed)
]]

--#include periods
local lease_ms = tonumber(ARGV[1])
--#now ARGV[2]
local expiry = now + lease_ms

local lost = {}
local touched = {}
local pair = 0
for a = 3, #ARGV, 2 do
  pair = pair + 1
  local key = KEYS[tonumber(ARGV[a])]
  local members = lease_members(ARGV[a + 1])
  local score = redis.call('ZSCORE', key, members[1])
  if score and tonumber(score) > now then
    for m = 1, #members do redis.call('ZADD', key, 'XX', 'GT', expiry, members[m]) end
    touched[tonumber(ARGV[a])] = true
  else
    lost[#lost + 1] = pair
  end
end

for index = 1, #KEYS do
  if touched[index] then
    local key = KEYS[index]
    -- Like admit.lua: the renewed expiry plus one lease (never shortening a longer TTL).
    if redis.call('PTTL', key) < 2 * lease_ms then
      redis.call('PEXPIRE', key, math.ceil(2 * lease_ms))
    end
  end
end
return lost
