--[[
job_index.lua: record who holds a job's slot, before the slot passes to the job.

Runs first, on the job's own hash tag (found from the job id alone, so the admin `done` call
and status requests can find it), then job_handover.lua moves the slot: a job member is never
in a bucket without an index that finds it. If an end of this job was reported before the
index existed (the upstream's `done` call can overtake the gateway's handover), a tombstone
says so: the caller then hands nothing over and the request's release frees the slot.

Idempotent by job id: a replay (or a duplicate that lands late) finds its own entry and
answers what the first run decided, changing nothing.

KEYS[1]  the job index (hash): job, owner, member, keys, and `ended` once job_free.lua ran
KEYS[2]  the job's tombstone (set of owners whose end reports found no index; "*" = admin)
ARGV[1]  job id   ARGV[2] owner key id   ARGV[3] member   ARGV[4] slot keys, "\n"-joined
ARGV[5]  ttl_ms of the index (the job's max_duration, plus slack)
Returns: 1 when the job had already ended (or its id is another key's): hand nothing over;
         else 0
]]

local tomb = KEYS[2]
if redis.call('SISMEMBER', tomb, '*') == 1 or redis.call('SISMEMBER', tomb, ARGV[2]) == 1 then
  return 1
end
local held = redis.call('HMGET', KEYS[1], 'job', 'owner', 'ended')
if held[1] == ARGV[1] then
  if held[2] ~= ARGV[2] or held[3] then
    return 1
  end
  return 0
end
redis.call('HSET', KEYS[1], 'job', ARGV[1], 'owner', ARGV[2], 'member', ARGV[3], 'keys', ARGV[4])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[5])))
return 0
