--[[
usage.lua: what one key is using right now, for the admin view. Read-only.

KEYS: the rate bucket keys (ARGV[2] of them), the slot bucket keys, then the quota keys
      (ARGV[3] of them); one {hash tag}.
ARGV[1]  now_ms override; "" means the server clock (TIME)
ARGV[2]  n_rate   ARGV[3] n_quota
ARGV[4..3+n_rate]  window_ms per rate bucket, then the period of each quota
Returns: {now (text, ms), then per rate bucket five values: 0, count, 0, 0, 0 for a sliding
          log (or a missing key), or 1, w, c, p, l for a sliding-window counter's stored state
          (`exact: false`: a hash; its key differs from any log's, so the type tells the two
          apart); then per slot bucket: live members, n_jobs, then n_jobs pairs of
          (member, ms until it expires); then per quota: used, granted (0, 0 when its stored
          period is not the current one), ms until the period ends}
  A job holding K slots has K members (periods.lua lease_members): the caller lists it once.
  The counter's estimate is computed by the caller with gateway/store/window_counter.py, the
  module admit.lua mirrors, so this script does not repeat that arithmetic.
  Live slot members are unexpired leases and job members; job members start with "j:".
]]

--#include periods
--#now ARGV[1]
local n_rate = tonumber(ARGV[2])
local n_quota = tonumber(ARGV[3])

-- `now` as text: Redis truncates Lua numbers in replies, the counter estimate wants the fraction.
local reply = {string.format('%.3f', now)}
for i = 1, n_rate do
  local window = tonumber(ARGV[3 + i])
  local f = {false, false, false, false}
  if redis.call('TYPE', KEYS[i])['ok'] == 'hash' then
    f = redis.call('HMGET', KEYS[i], 'w', 'c', 'p', 'l')
  end
  if f[1] and f[2] and f[3] and f[4] then
    reply[#reply + 1] = 1
    for k = 1, 4 do reply[#reply + 1] = f[k] end
  else
    reply[#reply + 1] = 0
    reply[#reply + 1] = redis.call('ZCOUNT', KEYS[i], '(' .. (now - window), '+inf')
    for _ = 1, 3 do reply[#reply + 1] = 0 end
  end
end
for j = n_rate + 1, #KEYS - n_quota do
  local live = redis.call('ZRANGEBYSCORE', KEYS[j], '(' .. now, '+inf', 'WITHSCORES')
  local jobs = {}
  for m = 1, #live, 2 do
    if string.sub(live[m], 1, 2) == 'j:' then
      jobs[#jobs + 1] = live[m]
      jobs[#jobs + 1] = math.ceil(tonumber(live[m + 1]) - now)
    end
  end
  reply[#reply + 1] = #live / 2
  reply[#reply + 1] = #jobs / 2
  for _, value in ipairs(jobs) do reply[#reply + 1] = value end
end
for q = 1, n_quota do
  local index, end_ms = period_of(now, ARGV[3 + n_rate + q])
  local f = redis.call('HMGET', KEYS[#KEYS - n_quota + q], 'p', 'u', 'g')
  if tonumber(f[1]) == index then
    reply[#reply + 1] = tonumber(f[2]) or 0
    reply[#reply + 1] = tonumber(f[3]) or 0
  else
    reply[#reply + 1] = 0
    reply[#reply + 1] = 0
  end
  reply[#reply + 1] = math.ceil(end_ms - now)
end
return reply
