--[[
undo.lua: take back an admission whose caller was told "error" (lost reply, timeout, caller
gone), by its lease id, whether or not admit.lua has run yet.

Removes the lease's entry from every sliding log and its member from every slot bucket, and
when the admission is found (so its time is known) takes it back out of every counter
bucket's count too. Then records the lease id in the hash tag's undone set for `ttl_ms`:
admit.lua refuses a lease id found there, so an EVALSHA that was sent before the undo but
reaches Redis after it (it sat in a socket buffer while Redis stalled) takes nothing.
Idempotent: running it again changes nothing more.

A request with only counter buckets (`exact: false`) and no slot leaves no trace of its
lease id to date it by: its count stays one too high until it ages out (fewer admissions,
never more).

KEYS: the rate bucket keys (ARGV[4] of them), the slot bucket keys, then the undone set
      (one {hash tag}, as admit.lua's KEYS without the waiter queues)
ARGV[1]  lease id   ARGV[2] lease_ms   ARGV[3] now_ms override ("" means TIME)
ARGV[4]  n_rate     ARGV[5] ttl_ms of the undone record
ARGV[6..5+2*n_rate]  per rate bucket: window_ms, counter (1: `exact: false`, else 0)
Returns: 1 when the admission had run (and was taken back), 0 when it had not
]]

local lease_id = ARGV[1]
local lease_ms = tonumber(ARGV[2])
--#now ARGV[3]
local n_rate = tonumber(ARGV[4])
local ttl = tonumber(ARGV[5])
local undone = KEYS[#KEYS]
local n_slot = #KEYS - 1 - n_rate

local admitted_at = nil
for i = 1, n_rate do
  if ARGV[5 + 2 * i] ~= '1' then
    local score = redis.call('ZSCORE', KEYS[i], lease_id)
    if score then
      admitted_at = tonumber(score)
      redis.call('ZREM', KEYS[i], lease_id)
    end
  end
end
for j = 1, n_slot do
  local key = KEYS[n_rate + j]
  local score = redis.call('ZSCORE', key, lease_id)
  if score then
    -- Never renewed (the store renews only leases whose caller was told "admitted").
    admitted_at = admitted_at or (tonumber(score) - lease_ms)
    redis.call('ZREM', key, lease_id)
  end
end

if admitted_at then
  for i = 1, n_rate do
    if ARGV[5 + 2 * i] == '1' then
      local f = redis.call('HMGET', KEYS[i], 'w', 'c', 'p', 'l')
      if f[1] and f[2] and f[3] and f[4] then
        local w, l = tonumber(f[1]), tonumber(f[4])
        local at = math.floor(admitted_at / l)
        if at == w and tonumber(f[2]) > 0 then
          redis.call('HSET', KEYS[i], 'c', tonumber(f[2]) - 1)
        elseif at == w - 1 and tonumber(f[3]) > 0 then
          redis.call('HSET', KEYS[i], 'p', tonumber(f[3]) - 1)
        end
      end
    end
  end
end

redis.call('ZREMRANGEBYSCORE', undone, '-inf', now)
redis.call('ZADD', undone, now + ttl, lease_id)
if redis.call('PTTL', undone) < ttl then redis.call('PEXPIRE', undone, math.ceil(ttl)) end
if admitted_at then return 1 end
return 0
