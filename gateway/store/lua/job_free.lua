--[[
job_free.lua: a job ended (done status, DELETE, the admin call): take its index.

The index is removed and returned to the caller, who then removes the job's member from its
slot buckets (another hash tag, so another call). Only the owner may end a job, except the
admin call (owner ""): an index owned by another key is left alone. When no index exists
yet, the report is remembered in a tombstone for a short while, so a handover that is still
on its way (job_index.lua) ends the job at once instead of holding its slot.

KEYS[1]  the job index   KEYS[2] the job's tombstone
ARGV[1]  job id   ARGV[2] owner key id, or "" for the admin call   ARGV[3] tombstone ttl_ms
Returns: {1, owner, member, keys} when this call ended the job; {0} otherwise
]]

local fields = redis.call('HMGET', KEYS[1], 'job', 'owner', 'member', 'keys')
if fields[1] == ARGV[1] then
  if ARGV[2] == '' or ARGV[2] == fields[2] then
    redis.call('DEL', KEYS[1])
    return {1, fields[2], fields[3], fields[4]}
  end
  return {0}
end
local who = ARGV[2]
if who == '' then who = '*' end
redis.call('SADD', KEYS[2], who)
redis.call('PEXPIRE', KEYS[2], math.ceil(tonumber(ARGV[3])))
return {0}
