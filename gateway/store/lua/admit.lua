--[[
admit.lua: one admission decision over every bucket of one request, atomically.

Either the request is admitted into every enforced bucket or into none: a refused request
writes nothing (expired entries are still purged, which changes no decision; a request that
may wait joins the waiter queues, which takes no slot and no rate budget). A shadow bucket is
checked like an enforced one but never refuses: when it would, nothing is written into it and
its KEYS position is listed in the reply.

Units: times and durations are milliseconds. Scores are floats (now has sub-ms precision);
returned numbers are integers because Redis truncates Lua numbers in replies, so every
duration is rounded up here (a Retry-After must never be early); now goes back in whole µs.

KEYS: the rate bucket keys (ARGV[4] of them), the quota keys (ARGV[8]), the slot bucket keys,
      then, when the request may wait (ARGV[5] set), each slot bucket's waiter queue and its
      expiry set; when the request has neither a sliding log nor a slot bucket, the hash tag's
      trace set of recent lease ids (scripts.trace_key); last the hash tag's set of undone
      leases (undo.lua).
      Every key of one call shares one {hash tag}, so the script runs on Redis Cluster.
ARGV[1]  lease id (`id*K` holds K slots: periods.lua lease_members), echoed back
ARGV[2]  lease_ms: a slot lease expires this long after it is taken (unless renewed)
ARGV[3]  now_ms override; "" means the server clock (TIME). Tests drive time with it.
ARGV[4]  n_rate
ARGV[5]  waiter ttl_ms, or "" when the request does not wait (no queue is read or written)
ARGV[6]  the waiter's arrival (its place in the queues), or "" for a newcomer
ARGV[7]  cost: units written into every bucket that counts cost (0..1000)
ARGV[8]  n_quota
then 3 per rate bucket: limit, window_ms, flags (1: counter `exact: false`, 2: counts cost,
     4: shadow; summed); 3 per quota: limit, period (1d | 7d | month), flags (2, 4 as above);
     2 per slot bucket: limit, shadow (0 | 1)

A bucket's units u: the cost when it counts cost, else 1; the request's slots K (its lease id).
Rate bucket: a sorted set with one member per unit (id, id#2 .. id#u) scored by admission time.
A unit counts while its time lies in (now - window, now]; it admits when count + u <= limit.
Counter bucket (`exact: false`; its key differs from any rate bucket's): a hash w, c, p, l:
the index of the current fixed window (floor(now / l)), the units counted in it, those of the
window before, and the window length l. The estimate at now is p * (1 - f) + c, f the
fraction of window w elapsed; it admits when estimate + u <= limit. The functions below
mirror gateway/store/window_counter.py operation for operation (same decisions as the memory
store); read that module for the reasoning and the error bound.
Quota: a hash p, u, g: the period index (periods.lua), units used and granted in it (a p
other than the current period reads 0, 0); it admits when used + u <= limit + granted.
Slot bucket: a sorted set of lease members scored by lease expiry (K per request). A member
with expiry <= now is dead: it is purged and counted as reclaimed. Job members
(job_handover.lua) live there too, with their own expiry.
Waiter queue: a sorted set of waiting lease members (K per waiter) scored by arrival, and a
twin sorted set scored by when each entry expires (refreshed by every check of that waiter).
A newcomer counts every queued member as ahead of it; a waiter those before its first member.
A slot bucket admits when count + ahead + K <= limit. Shadow slot buckets never queue.
Every key written gets a TTL: a rate key lives one window past its newest entry; a counter
key two windows; a quota key to its period's end plus a day; a slot key one lease past its
longest-lived member; a queue two waiter ttls past its last write.

Safe to run twice for one lease id (a connection lost after the call was sent is re-sent
once, gateway/store/redis.py): a lease id found admitted (its member in a sliding log or an
unexpired first member in a slot bucket) is a replay, answered "admitted" again with the
counts seen without it, and nothing is written. A lease id in the undone set admits nothing
and answers {lease_id, 3}. A request with neither a log nor a slot (counters and quotas only)
is recorded by lease id in the trace set for two leases, where a replay and undo.lua find it.

Returns {lease_id, status, retry_after_ms, reclaimed, now (µs, integer),
         rate_count[1..n_rate], rate_reset_ms[1..n_rate], slot_count[1..n_slot],
         quota_count[1..n_quota], quota_reset_ms[1..n_quota], n_shadow, shadow KEYS positions}
         and, when the request may wait, {queued, arrival} after them
  status: 0 admitted, 1 refused by a rate bucket, 2 by concurrency only, 4 by a quota
          (precedence quota, rate, concurrency; 3: undone, the reply is then {lease_id, 3})
  retry_after_ms: ms until every refusing rate bucket would admit and every refusing quota's
                 period has ended (0 when admitted or refused for concurrency only); a cost
                 above a rate limit waits one window
  rate_count / slot_count / quota_count: units in the bucket before this request (after
                 purging); for a request that may wait, slot_count includes the waiters ahead
  rate_reset_ms: ms until the bucket's oldest entry leaves the window, counting this request
                 if admitted (the window when empty); for a counter bucket, until its
                 rounded-up estimate (this request counted) drops by one
  quota_reset_ms: ms until the quota's period ends
  queued: 1 when the request now waits in the queues; arrival: its place there
]]

--#include periods
local lease_id = ARGV[1]
local lease_ms = tonumber(ARGV[2])
--#now ARGV[3]
local n_rate = tonumber(ARGV[4])
local waiter_ttl = tonumber(ARGV[5])  -- nil: the request does not wait
local arrival = ARGV[6]
local cost = tonumber(ARGV[7])
local n_quota = tonumber(ARGV[8])
local quota_at = 8 + 3 * n_rate  -- ARGV offset before the first quota's triple
local slot_at = quota_at + 3 * n_quota  -- before the first slot's pair
local n_slot = (#ARGV - slot_at) / 2
local slot_key0 = n_rate + n_quota  -- KEYS offset before the first slot key

if redis.call('ZSCORE', KEYS[#KEYS], lease_id) then
  return {lease_id, 3}
end
local members = lease_members(lease_id)
local weight = #members
local first = members[1]

-- Per rate bucket flags (1 counter, 2 counts cost, 4 shadow): "0" is the common case.
local flags = {}
for i = 1, n_rate do flags[i] = tonumber(ARGV[8 + 3 * i]) end
local function is_counter(i) return flags[i] % 2 == 1 end
local function units_of(i)
  if flags[i] >= 2 and floor(flags[i] / 2) % 2 == 1 then return cost end
  return 1
end

local replay = false
local traceable = n_slot > 0
for i = 1, n_rate do
  if not is_counter(i) then
    traceable = true
    if redis.call('ZSCORE', KEYS[i], lease_id) then replay = true end
  end
end
-- No log and no slot: the lease id is recorded in the trace set instead (scripts.trace_key).
local trace = nil
if not traceable then
  trace = KEYS[#KEYS - 1]
  if redis.call('ZSCORE', trace, lease_id) then replay = true end
end
for j = 1, n_slot do
  local score = redis.call('ZSCORE', KEYS[slot_key0 + j], first)
  if score and tonumber(score) > now then replay = true end
end

local status = 0
local retry_after = 0
local reclaimed = 0
local rate_counts, rate_resets, slot_counts = {}, {}, {}
local quota_counts, quota_resets  -- tables only when there are quotas
local skip = nil  -- KEYS position -> true: a shadow bucket that would refuse (written nothing)
local shadow_refused = nil  -- their positions, in check order

local function refuse(position, shadow, code, wait)
  if shadow then
    if skip == nil then skip, shadow_refused = {}, {} end
    skip[position] = true
    shadow_refused[#shadow_refused + 1] = position
  elseif code then
    if code == 4 or status ~= 4 then status = code end
    retry_after = math.max(retry_after, wait)
  end
end

local function score_at(key, index)
  return tonumber(redis.call('ZRANGE', key, index, index, 'WITHSCORES')[2])
end

-- Sliding-window counter (gateway/store/window_counter.py). A state: {w, c, p, l}.
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
    -- Reloaded with another window, or a state from the future: keep what it counts now.
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

local function fits(view, t, target)
  return scaled_estimate(seen_at(view, t, view.l), t) <= target * view.l
end

local function counter_wait(view, t, target)
  if fits(view, t, target) then return 0 end
  local window = view.l
  local elapsed = t - view.w * window
  local wait
  if view.c <= target then
    wait = (window - (target - view.c) * window / view.p) - elapsed
  else
    wait = (window - elapsed) + (window - target * window / view.c)
  end
  local ms = math.max(1, math.ceil(wait))
  while not fits(view, t + ms, target) do ms = ms + 1 end  -- float rounding: never early
  return ms
end

local function counter_view(key, window)
  local f = redis.call('HMGET', key, 'w', 'c', 'p', 'l')
  local state = nil
  if f[1] and f[2] and f[3] and f[4] then
    state = {w = tonumber(f[1]), c = tonumber(f[2]), p = tonumber(f[3]), l = tonumber(f[4])}
  end
  return seen_at(state, now, window)
end

-- Each check fills rate_counts[i] (and rate_resets[i] for a log) and returns nil when the
-- bucket admits, else the ms until it would.
local function check_log(i, key, limit, window, u)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  local count = redis.call('ZCARD', key)
  if replay and redis.call('ZSCORE', key, lease_id) then count = math.max(0, count - u) end
  rate_counts[i] = count
  local oldest = nil
  if count > 0 then
    oldest = score_at(key, 0)
    rate_resets[i] = math.ceil(oldest + window - now)
  else
    rate_resets[i] = math.ceil(window)
  end
  if replay or count + u <= limit then return nil end
  if u > limit then return math.ceil(window) end  -- it never fits: one window
  -- Admission needs count + u - limit entries gone: wait for the one at that index - 1.
  local index = count + u - limit - 1
  local at = oldest
  if index > 0 then at = score_at(key, index) end
  return math.ceil(at + window - now)
end

local counters = {}  -- rate bucket index -> counter view at now, for counter buckets

local function check_counter(i, key, limit, window, u)
  local view = counter_view(key, window)
  counters[i] = view
  rate_counts[i] = whole_count(view, now)  -- rate_resets[i] once the decision is known
  if replay then rate_counts[i] = math.max(0, rate_counts[i] - u) end  -- it counted itself
  if replay or fits(view, now, limit - u) then return nil end
  if limit - u < 0 then return window end
  return counter_wait(view, now, limit - u)
end

-- Over `maxmemory` with `noeviction`, Redis refuses only a script's *first* write (a later one
-- must not stop it half-way). Make that first write this no-op (ZADD XX of a member that is
-- never a lease id), so an admission is refused whole, before it purges or writes anything,
-- and `on_error` decides, instead of being let through by a purge that happens to come first.
-- (A plan of counters and quotas only starts with HSET, which Redis refuses all the same.)
local oom_probe = nil
if n_slot > 0 then
  oom_probe = KEYS[slot_key0 + 1]
else
  for i = 1, n_rate do
    if not is_counter(i) then oom_probe = KEYS[i]; break end
  end
end
if oom_probe then redis.call('ZADD', oom_probe, 'XX', 0, '') end

for i = 1, n_rate do
  local check = check_log
  if is_counter(i) then check = check_counter end
  local wait = check(i, KEYS[i], tonumber(ARGV[6 + 3 * i]), tonumber(ARGV[7 + 3 * i]), units_of(i))
  if wait then refuse(i, flags[i] >= 4, 1, wait) end
end

local quota_views  -- quota index -> {index, used, granted, end_ms, units}
if n_quota > 0 then quota_counts, quota_resets, quota_views = {}, {}, {} end
for q = 1, n_quota do
  local key = KEYS[n_rate + q]
  local limit = tonumber(ARGV[quota_at + 3 * q - 2])
  local flags = tonumber(ARGV[quota_at + 3 * q])
  local u = 1
  if floor(flags / 2) % 2 == 1 then u = cost end
  local index, end_ms = period_of(now, ARGV[quota_at + 3 * q - 1])
  local f = redis.call('HMGET', key, 'p', 'u', 'g')
  local used, granted = 0, 0
  if tonumber(f[1]) == index then
    used, granted = tonumber(f[2]) or 0, tonumber(f[3]) or 0
  end
  quota_views[q] = {index, used, granted, end_ms, u}
  if replay then used = math.max(0, used - u) end
  quota_counts[q] = used
  quota_resets[q] = math.ceil(end_ms - now)
  if not replay and used + u > limit + granted then
    refuse(n_rate + q, flags >= 4, 4, quota_resets[q])
  end
end

local function queue_keys(j)
  local at = slot_key0 + n_slot + 2 * j
  return KEYS[at - 1], KEYS[at]
end

for j = 1, n_slot do
  local position = slot_key0 + j
  local key = KEYS[position]
  local limit = tonumber(ARGV[slot_at + 2 * j - 1])
  local shadow = ARGV[slot_at + 2 * j] == '1'
  reclaimed = reclaimed + redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  local count = redis.call('ZCARD', key)
  if replay and redis.call('ZSCORE', key, first) then count = math.max(0, count - weight) end
  if waiter_ttl and not shadow then
    local queue, expiries = queue_keys(j)
    local dead = redis.call('ZRANGEBYSCORE', expiries, '-inf', now)
    for d = 1, #dead do redis.call('ZREM', queue, dead[d]) end
    if #dead > 0 then redis.call('ZREMRANGEBYSCORE', expiries, '-inf', now) end
    if arrival == '' then
      count = count + redis.call('ZCARD', queue)
    else
      -- (Re)placed at its arrival: a waiter purged during a stall keeps its place.
      for m = 1, weight do redis.call('ZADD', queue, arrival, members[m]) end
      count = count + redis.call('ZRANK', queue, first)
    end
  end
  slot_counts[j] = count
  if count + weight > limit and not replay then
    if shadow then
      refuse(position, true)
    elseif status == 0 then
      status = 2
    end
  end
end

if status == 0 and not replay then
  for i = 1, n_rate do
    local u = units_of(i)
    if u > 0 and not (skip and skip[i]) then
      local window = tonumber(ARGV[7 + 3 * i])
      local view = counters[i]
      if view then
        view = {w = view.w, c = view.c + u, p = view.p, l = view.l}
        counters[i] = view
        redis.call('HSET', KEYS[i], 'w', view.w, 'c', view.c, 'p', view.p, 'l', view.l)
        -- Both counts have aged out two windows from now.
        redis.call('PEXPIRE', KEYS[i], math.ceil(2 * window))
      else
        if u == 1 then
          redis.call('ZADD', KEYS[i], now, lease_id)
        else
          local pairs_ = {}
          for n, member in ipairs(unit_members(lease_id, 1, u)) do
            pairs_[2 * n - 1] = now
            pairs_[2 * n] = member
          end
          redis.call('ZADD', KEYS[i], unpack(pairs_))
        end
        -- The newest entry leaves the window `window` ms from now: the key is useless after that.
        redis.call('PEXPIRE', KEYS[i], math.ceil(window))
      end
    end
  end
  for q = 1, n_quota do
    local view = quota_views[q]
    if view[5] > 0 and not (skip and skip[n_rate + q]) then
      local key = KEYS[n_rate + q]
      redis.call('HSET', key, 'p', view[1], 'u', view[2] + view[5], 'g', view[3])
      redis.call('PEXPIRE', key, math.ceil(view[4] - now + DAY_MS))
    end
  end
  if trace then
    -- Kept two leases: the resend comes within a timeout, the undo within a lease.
    local keep = math.ceil(2 * lease_ms)
    redis.call('ZREMRANGEBYSCORE', trace, '-inf', now - keep)
    redis.call('ZADD', trace, now, lease_id)
    if redis.call('PTTL', trace) < keep then redis.call('PEXPIRE', trace, keep) end
  end
  for j = 1, n_slot do
    if not (skip and skip[slot_key0 + j]) then
      local key = KEYS[slot_key0 + j]
      for m = 1, weight do redis.call('ZADD', key, now + lease_ms, members[m]) end
      -- Cover the longest-lived member (a job slot may outlive a lease by far), plus one
      -- lease so a dead holder's lease is still there to be purged and counted as reclaimed.
      local last = tonumber(redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')[2])
      redis.call('PEXPIRE', key, math.ceil(last - now + lease_ms))
    end
  end
end

-- A counter's reset counts this request when admitted (its view was updated above).
for i, view in pairs(counters) do
  rate_resets[i] = counter_wait(view, now, math.max(0, whole_count(view, now) - 1))
end

-- now in whole µs: an integer survives the reply (a float would be truncated), no string.format.
local reply = {lease_id, status, retry_after, reclaimed, floor(now * 1000 + 0.5)}
for i = 1, n_rate do reply[#reply + 1] = rate_counts[i] end
for i = 1, n_rate do reply[#reply + 1] = rate_resets[i] end
for j = 1, n_slot do reply[#reply + 1] = slot_counts[j] end
for q = 1, n_quota do reply[#reply + 1] = quota_counts[q] end
for q = 1, n_quota do reply[#reply + 1] = quota_resets[q] end
if shadow_refused then
  reply[#reply + 1] = #shadow_refused
  for _, position in ipairs(shadow_refused) do reply[#reply + 1] = position end
else
  reply[#reply + 1] = 0
end

if waiter_ttl then
  local queued = 0
  if status == 2 then
    -- Refused for concurrency alone: wait (a newcomer at the back), entry refreshed.
    if arrival == '' then arrival = string.format('%.3f', now) end
    local keep = math.ceil(2 * waiter_ttl)
    for j = 1, n_slot do
      if ARGV[slot_at + 2 * j] ~= '1' then
        local queue, expiries = queue_keys(j)
        for m = 1, weight do
          redis.call('ZADD', queue, arrival, members[m])
          redis.call('ZADD', expiries, now + waiter_ttl, members[m])
        end
        for _, k in ipairs({queue, expiries}) do
          if redis.call('PTTL', k) < keep then redis.call('PEXPIRE', k, keep) end
        end
      end
    end
    queued = 1
  elseif arrival ~= '' then
    -- Admitted, or refused by a rate limit or quota: a waiter leaves the queues either way.
    for j = 1, n_slot do
      if ARGV[slot_at + 2 * j] ~= '1' then
        local queue, expiries = queue_keys(j)
        redis.call('ZREM', queue, unpack(members))
        redis.call('ZREM', expiries, unpack(members))
      end
    end
  end
  reply[#reply + 1] = queued
  reply[#reply + 1] = arrival
end
return reply
