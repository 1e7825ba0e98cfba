--[[
job_free.lua: a job ended (done status, DELETE, the admin call): mark its index ended.

The index is kept, marked with this call's end id, and returned to the caller, who then
removes the job's member from its slot buckets (job_drop.lua: another hash tag, so another
call). Only the owner may end a job, except the admin call (owner ""): an index owned by
another key is left alone. When no index exists yet, the report is remembered in a tombstone
for a short while, so a handover that is still on its way (job_index.lua) hands nothing over.

Idempotent: a replay of one end (same end id) answers what its first run answered. A later
end of an ended job answers 2 with the same fields: its caller drops the member again (which
heals a drop that failed) but reports nothing ended.

KEYS[1]  the job index   KEYS[2] the job's tombstone
ARGV[1]  job id   ARGV[2] owner key id, or "" for the admin call   ARGV[3] tombstone ttl_ms
ARGV[4]  end id (unique per end call)
Returns: {1, owner, member, keys} when this end ended the job; {2, owner, member, keys} when
         an earlier end did; {0} otherwise
]]

local fields = redis.call('HMGET', KEYS[1], 'job', 'owner', 'member', 'keys', 'ended')
if fields[1] == ARGV[1] then
  if ARGV[2] ~= '' and ARGV[2] ~= fields[2] then
    return {0}
  end
  if not fields[5] then
    -- PEXPIRE first: over `maxmemory` (noeviction) Redis refuses only a script's first write
    -- when it is one that may grow memory, and ending a job must never fail for lack of it.
    redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3])))
    redis.call('HSET', KEYS[1], 'ended', ARGV[4])
    return {1, fields[2], fields[3], fields[4]}
  end
  if fields[5] == ARGV[4] then
    return {1, fields[2], fields[3], fields[4]}
  end
  return {2, fields[2], fields[3], fields[4]}
end
local who = ARGV[2]
if who == '' then who = '*' end
redis.call('SADD', KEYS[2], who)
redis.call('PEXPIRE', KEYS[2], math.ceil(tonumber(ARGV[3])))
return {0}
