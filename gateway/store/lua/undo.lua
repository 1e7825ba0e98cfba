--[[
undo.lua: take back an admission whose caller was told "error" (lost reply, timeout, caller
gone), by its lease id, whether or not admit.lua has run yet.

Removes the lease's unit members from every sliding log and its members (periods.lua
lease_members) from every slot bucket, and when the admission is found (so its time is known)
takes its units back out of every counter bucket and quota of that window or period too.
Then records the lease id in the hash tag's undone set for `ttl_ms`: admit.lua refuses a lease
id found there, so an EVALSHA that was sent before the undo but reaches Redis after it (it sat
in a socket buffer while Redis stalled) takes nothing. Idempotent: running it again changes
nothing more.

A request with only counters and quotas and no slot is found (and dated) in the trace set
admit.lua recorded it in (ARGV[8] = 1). Shadow counters and quotas are left alone (a shadow
bucket that would have refused holds nothing of it).

KEYS: the rate bucket keys (ARGV[4] of them), the quota keys (ARGV[7]), the slot bucket keys,
      the trace set when ARGV[8] is 1, then the undone set (one {hash tag}, as admit.lua's KEYS
      without the waiter queues)
ARGV[1]  lease id   ARGV[2] lease_ms   ARGV[3] now_ms override ("" means TIME)
ARGV[4]  n_rate     ARGV[5] ttl_ms of the undone record   ARGV[6] cost   ARGV[7] n_quota
ARGV[8]  1 when KEYS holds the trace set (no log, no slot: scripts.untraceable), else 0
then 2 per rate bucket: window_ms, flags (admit.lua's); 2 per quota: period, flags
Returns: 1 when the admission had run (and was taken back), 0 when it had not
]]

--#include periods
local lease_id = ARGV[1]
local lease_ms = tonumber(ARGV[2])
--#now ARGV[3]
local n_rate = tonumber(ARGV[4])
local ttl = tonumber(ARGV[5])
local cost = tonumber(ARGV[6])
local n_quota = tonumber(ARGV[7])
local traced = ARGV[8] == '1'
local quota_at = 8 + 2 * n_rate
local undone = KEYS[#KEYS]
local n_slot = #KEYS - 1 - n_rate - n_quota
if traced then n_slot = n_slot - 1 end

local function units_of(flags)
  if floor(flags / 2) % 2 == 1 then return cost end
  return 1
end

local admitted_at = nil
if traced then
  local trace = KEYS[#KEYS - 1]
  local score = redis.call('ZSCORE', trace, lease_id)
  if score then
    admitted_at = tonumber(score)
    redis.call('ZREM', trace, lease_id)
  end
end
for i = 1, n_rate do
  local flags = tonumber(ARGV[8 + 2 * i])
  if flags % 2 == 0 then
    local score = redis.call('ZSCORE', KEYS[i], lease_id)
    if score then
      admitted_at = tonumber(score)
      redis.call('ZREM', KEYS[i], unpack(unit_members(lease_id, 1, math.max(1, units_of(flags)))))
    end
  end
end
local members = lease_members(lease_id)
for j = 1, n_slot do
  local key = KEYS[n_rate + n_quota + j]
  local score = redis.call('ZSCORE', key, members[1])
  if score then
    -- Never renewed (the store renews only leases whose caller was told "admitted").
    admitted_at = admitted_at or (tonumber(score) - lease_ms)
  end
  redis.call('ZREM', key, unpack(members))
end

if admitted_at then
  for i = 1, n_rate do
    local flags = tonumber(ARGV[8 + 2 * i])
    if flags % 2 == 1 and flags < 4 then
      local u = units_of(flags)
      local f = redis.call('HMGET', KEYS[i], 'w', 'c', 'p', 'l')
      if f[1] and f[2] and f[3] and f[4] then
        local w, l = tonumber(f[1]), tonumber(f[4])
        local at = floor(admitted_at / l)
        if at == w then
          redis.call('HSET', KEYS[i], 'c', math.max(0, tonumber(f[2]) - u))
        elseif at == w - 1 then
          redis.call('HSET', KEYS[i], 'p', math.max(0, tonumber(f[3]) - u))
        end
      end
    end
  end
  for q = 1, n_quota do
    local flags = tonumber(ARGV[quota_at + 2 * q])
    if flags < 4 then
      local key = KEYS[n_rate + q]
      local index = period_of(admitted_at, ARGV[quota_at + 2 * q - 1])
      local f = redis.call('HMGET', key, 'p', 'u')
      if tonumber(f[1]) == index then
        redis.call('HSET', key, 'u', math.max(0, (tonumber(f[2]) or 0) - units_of(flags)))
      end
    end
  end
end

redis.call('ZREMRANGEBYSCORE', undone, '-inf', now)
redis.call('ZADD', undone, now + ttl, lease_id)
if redis.call('PTTL', undone) < ttl then redis.call('PEXPIRE', undone, math.ceil(ttl)) end
if admitted_at then return 1 end
return 0
