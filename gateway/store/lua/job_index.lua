--[[
job_index.lua: record who holds a job's slot, unless the job already ended.

Runs after job_handover.lua, on the job's own hash tag (found from the job id alone, so the
admin `done` call and status requests can find it). If an end of this job was reported
before the index existed (the upstream's `done` call can overtake the gateway's handover),
a tombstone says so: the caller then frees the slot at once.

KEYS[1]  the job index (hash): job, owner, member, keys
KEYS[2]  the job's tombstone (set of owners whose end reports found no index; "*" = admin)
ARGV[1]  job id   ARGV[2] owner key id   ARGV[3] member   ARGV[4] slot keys, "\n"-joined
ARGV[5]  ttl_ms of the index (the job's max_duration, plus slack)
Returns: 1 when the job had already ended (nothing recorded), else 0
]]

local tomb = KEYS[2]
if redis.call('SISMEMBER', tomb, '*') == 1 or redis.call('SISMEMBER', tomb, ARGV[2]) == 1 then
  return 1
end
redis.call('HSET', KEYS[1], 'job', ARGV[1], 'owner', ARGV[2], 'member', ARGV[3], 'keys', ARGV[4])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[5])))
return 0
