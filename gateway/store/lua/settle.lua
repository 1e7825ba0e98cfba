--[[
settle.lua: a request's release, with its settlement: free its slots and re-price its charge.

Slots: every member of the lease (periods.lua lease_members) leaves every slot bucket.
Settlement (when ARGV[3] + ARGV[4] > 0 and settled ~= charged), d = settled - charged:
- sliding log: the lease's unit members become exactly `settled` (ZREM id#(settled+1) ..
  id#charged, or ZADD id#(charged+1) .. id#settled at the score of `id`); nothing when they
  have aged out. A lease charged 0 wrote nothing: its units go in at admitted_at while that
  is still in the window.
- counter: c += d when its stored window is the admission's, p += d when that window is the
  one before; else nothing (floored at 0).
- quota: u += d when its period is the admission's (floored at 0).
A window or quota may end up over its limit: later requests wait for it.
Idempotent per lease id: the lease is remembered in the hash tag's settled set for ttl_ms (a
release re-sent after a lost connection frees nothing more and settles nothing twice).
Then PUBLISH "1" on each channel (wake-ups, after the slots are free).

KEYS: the settlement's rate keys (ARGV[3]), its quota keys (ARGV[4]), the slot keys, then the
      settled set; one {hash tag}.
ARGV[1] lease id  ARGV[2] now_ms override ("" means TIME)  ARGV[3] n_rate  ARGV[4] n_quota
ARGV[5] charged   ARGV[6] settled   ARGV[7] admitted_at_ms   ARGV[8] ttl_ms of the record
ARGV[9] n_channels, then the channels; then 2 per rate key: window_ms, counter (1 | 0);
        then 1 per quota key: period
Returns: 1 when the settlement was applied now, else 0
]]

--#include periods
local lease_id = ARGV[1]
--#now ARGV[2]
local n_rate, n_quota = tonumber(ARGV[3]), tonumber(ARGV[4])
local charged, settled = tonumber(ARGV[5]), tonumber(ARGV[6])
local admitted_at, ttl = tonumber(ARGV[7]), tonumber(ARGV[8])
local n_channels = tonumber(ARGV[9])
local rate_at = 9 + n_channels
local quota_at = rate_at + 2 * n_rate
local record = KEYS[#KEYS]

local members = lease_members(lease_id)
for j = n_rate + n_quota + 1, #KEYS - 1 do
  redis.call('ZREM', KEYS[j], unpack(members))
end

local applied = 0
local d = settled - charged
if n_rate + n_quota > 0 and d ~= 0 and not redis.call('ZSCORE', record, lease_id) then
  for i = 1, n_rate do
    local key = KEYS[i]
    local window = tonumber(ARGV[rate_at + 2 * i - 1])
    if ARGV[rate_at + 2 * i] == '1' then
      local f = redis.call('HMGET', key, 'w', 'c', 'p', 'l')
      if f[1] and f[2] and f[3] and f[4] then
        local w, l = tonumber(f[1]), tonumber(f[4])
        local at = floor(admitted_at / l)
        if w == at then
          redis.call('HSET', key, 'c', math.max(0, tonumber(f[2]) + d))
        elseif w == at + 1 then
          redis.call('HSET', key, 'p', math.max(0, tonumber(f[3]) + d))
        end
      end
    else
      redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
      local score = nil
      if charged > 0 then
        score = tonumber(redis.call('ZSCORE', key, lease_id))
      elseif admitted_at > now - window then
        score = admitted_at
      end
      if score then
        if d < 0 then
          redis.call('ZREM', key, unpack(unit_members(lease_id, settled + 1, charged)))
        else
          local add = {}
          for n, member in ipairs(unit_members(lease_id, charged + 1, settled)) do
            add[2 * n - 1] = score
            add[2 * n] = member
          end
          redis.call('ZADD', key, unpack(add))
          local keep = math.ceil(score + window - now)
          if redis.call('PTTL', key) < keep then redis.call('PEXPIRE', key, keep) end
        end
      end
    end
  end
  for q = 1, n_quota do
    local key = KEYS[n_rate + q]
    local index = period_of(admitted_at, ARGV[quota_at + q])
    local f = redis.call('HMGET', key, 'p', 'u')
    if tonumber(f[1]) == index then
      redis.call('HSET', key, 'u', math.max(0, (tonumber(f[2]) or 0) + d))
    end
  end
  redis.call('ZREMRANGEBYSCORE', record, '-inf', now)
  redis.call('ZADD', record, now + ttl, lease_id)
  if redis.call('PTTL', record) < ttl then redis.call('PEXPIRE', record, math.ceil(ttl)) end
  applied = 1
end

for c = 1, n_channels do
  redis.call('PUBLISH', ARGV[9 + c], '1')
end
return applied
