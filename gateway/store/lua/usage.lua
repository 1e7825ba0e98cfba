--[[
usage.lua: what one key is using right now, for the admin view. Read-only.

KEYS: the rate bucket keys (ARGV[2] of them), then the slot bucket keys; one {hash tag}.
ARGV[1]  now_ms override; "" means the server clock (TIME)
ARGV[2]  n_rate
ARGV[3..2+n_rate]  window_ms per rate bucket
Returns: {now, rate_count[1..n_rate], then per slot bucket: live members, n_jobs,
          then n_jobs pairs of (member, ms until it expires)}
  A rate bucket stored as a hash is a sliding-window counter (`exact: false`, see admit.lua):
  its count is the estimate rounded up, as admit.lua reports it. (Its key differs from any
  log's, so the type tells the two apart; a missing key counts 0 either way.)
  Live slot members are unexpired leases and job members; job members start with "j:".
]]

local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
local n_rate = tonumber(ARGV[2])

-- The counter's rounded-up estimate: admit.lua's seen_at and whole_count, unchanged.
local seen_at

local function scaled_estimate(view, t)
  local elapsed = t - view.w * view.l
  return view.p * (view.l - elapsed) + view.c * view.l
end

local function whole_count(view, t)
  local scaled = scaled_estimate(view, t)
  local k = math.ceil(scaled / view.l)
  if scaled > k * view.l then
    k = k + 1
  elseif k > 0 and scaled <= (k - 1) * view.l then
    k = k - 1
  end
  return math.max(0, k)
end

seen_at = function(state, t, window)
  local index = math.floor(t / window)
  if state == nil then return {w = index, c = 0, p = 0, l = window} end
  if state.l ~= window or state.w > index then
    local carried
    if state.w > math.floor(t / state.l) then
      carried = state.c + state.p
    else
      carried = whole_count(seen_at(state, t, state.l), t)
    end
    return {w = index, c = carried, p = 0, l = window}
  end
  if state.w == index then return state end
  if state.w == index - 1 then return {w = index, c = 0, p = state.c, l = window} end
  return {w = index, c = 0, p = 0, l = window}
end

local reply = {math.floor(now)}
for i = 1, n_rate do
  local window = tonumber(ARGV[2 + i])
  if redis.call('TYPE', KEYS[i])['ok'] == 'hash' then
    local f = redis.call('HMGET', KEYS[i], 'w', 'c', 'p', 'l')
    local state = nil
    if f[1] and f[2] and f[3] and f[4] then
      state = {w = tonumber(f[1]), c = tonumber(f[2]), p = tonumber(f[3]), l = tonumber(f[4])}
    end
    reply[#reply + 1] = whole_count(seen_at(state, now, window), now)
  else
    reply[#reply + 1] = redis.call('ZCOUNT', KEYS[i], '(' .. (now - window), '+inf')
  end
end
for j = n_rate + 1, #KEYS do
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
return reply
