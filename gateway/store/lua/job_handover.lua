--[[
job_handover.lua: an admitted request's lease passes to the async job it started.

Runs after job_index.lua recorded the job. In every slot bucket the job holds, the request's
lease is replaced by the job's member, atomically, so the slot is never free in between. A
bucket where the lease is already gone (expired and reclaimed, or released) gets no job
member: that slot may belong to someone else by now. The job member expires after
max_duration unless freed earlier; the heartbeat never renews it (it renews leases only, and
never shortens a longer expiry).

Idempotent by job id: a replay, or a run that lands after the job ended, changes nothing.
- The member already in a bucket (the first run moved it): counted as moved, left as is.
- The job ended already (job_drop.lua left its member in the key's ended set): nothing moves;
  the request's own release frees its lease.

Units: milliseconds (float scores).
KEYS: the job's slot bucket keys, then the key's ended set (job_drop.lua); one {hash tag}.
ARGV[1]  lease id of the request
ARGV[2]  job member (the job id, prefixed, so the admin view can list it; weighted as the
         lease is: jobs.job_member)
ARGV[3]  job_ms: the job member expires this long after now (max_duration)
ARGV[4]  lease_ms: the key outlives its longest member by one lease, like admit.lua
ARGV[5]  now_ms override; "" means the server clock (TIME)
Returns: how many buckets hold the job
]]

--#include periods
local lease_id, member = ARGV[1], ARGV[2]
-- A lease of K slots holds K members; the job takes K members in their place.
local leases, jobs = lease_members(lease_id), lease_members(member)
local job_ms, lease_ms = tonumber(ARGV[3]), tonumber(ARGV[4])
--#now ARGV[5]

local ended = redis.call('ZSCORE', KEYS[#KEYS], member)
if ended and tonumber(ended) > now then
  return 0
end

local moved = 0
for i = 1, #KEYS - 1 do
  local key = KEYS[i]
  if redis.call('ZSCORE', key, member) then
    moved = moved + 1
  elseif redis.call('ZREM', key, unpack(leases)) > 0 then
    for m = 1, #jobs do redis.call('ZADD', key, now + job_ms, jobs[m]) end
    moved = moved + 1
    local last = tonumber(redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')[2])
    local ttl = math.ceil(last - now + lease_ms)
    if redis.call('PTTL', key) < ttl then
      redis.call('PEXPIRE', key, ttl)
    end
  end
end
return moved
