--[[
admit.lua: one admission decision over every bucket of one request, atomically.

Either the request is admitted into every bucket or into none: a refused request writes
nothing (expired entries are still purged, which changes no decision; a request that may
wait joins the waiter queues, which takes no slot and no rate budget).

Units: times and durations are milliseconds. Scores are floats (now has sub-ms precision);
returned numbers are integers because Redis truncates Lua numbers in replies, so every
duration is rounded up here (a Retry-After must never be early).

KEYS: the rate bucket keys (ARGV[4] of them), then the slot bucket keys, then, when the
      request may wait (ARGV[5] set), each slot bucket's waiter queue and its expiry set,
      and last the hash tag's set of undone leases (undo.lua).
      Every key of one call shares one {hash tag}, so the script runs on Redis Cluster.
ARGV[1]  lease id: the member written into every bucket when admitted, echoed back
ARGV[2]  lease_ms: a slot lease expires this long after it is taken (unless renewed)
ARGV[3]  now_ms override; "" means the server clock (TIME). Tests drive time with it.
ARGV[4]  n_rate: how many of KEYS are rate buckets
ARGV[5]  waiter ttl_ms, or "" when the request does not wait (no queue is read or written)
ARGV[6]  the waiter's arrival (its place in the queues), or "" for a newcomer
ARGV[7..6+3*n_rate]  per rate bucket: limit, window_ms, counter (1: `exact: false`, else 0)
ARGV[7+3*n_rate..]   per slot bucket: limit

Rate bucket: a sorted set of admitted lease ids scored by admission time. An admission
counts while its time lies in (now - window, now].
Counter bucket (`exact: false`; its key differs from any rate bucket's): a hash w, c, p, l:
the index of the current fixed window (floor(now / l)), the admissions counted in it, those
of the window before, and the window length l. The estimate at now is p * (1 - f) + c, f the
fraction of window w elapsed; it admits when estimate + 1 <= limit. The functions below
mirror gateway/store/window_counter.py operation for operation (same decisions as the memory
store); read that module for the reasoning and the error bound.
Slot bucket: a sorted set of lease ids scored by lease expiry. A lease with expiry <= now
is dead: it is purged and counted as reclaimed. Job members (job_handover.lua) live there
too, with their own expiry.
Waiter queue: a sorted set of waiting lease ids scored by arrival, and a twin sorted set
scored by when each waiter's entry expires (it is refreshed by every check of that waiter).
A newcomer counts every waiter as ahead of it; a waiter counts those before it. A slot
bucket admits when count + ahead < limit.
Every key written gets a TTL: a rate key lives one window past its newest entry; a counter
key two windows (by then both its counts have aged out); a slot key lives one lease past its
longest-lived member (so a dead lease is still there to be counted when the next request
comes); a queue lives two waiter ttls past its last write.

Safe to run twice for one lease id (a connection lost after the call was sent is re-sent
once, gateway/store/redis.py): a lease id found admitted (its member in a sliding log or an
unexpired member in a slot bucket) is a replay, answered "admitted" again with the counts
seen without it, and nothing is written. A lease id in the undone set (the caller was told
"error" and undo.lua removed what it held) admits nothing and answers {lease_id, 3}: an
EVALSHA that reaches Redis after its own undo takes nothing.

Returns {lease_id, status, retry_after_ms, reclaimed,
         rate_count[1..n_rate], rate_reset_ms[1..n_rate], slot_count[1..n_slot]}
         and, when the request may wait, {queued, arrival} after them
  status: 0 admitted, 1 refused by a rate bucket, 2 refused by concurrency only (3: undone,
          the reply is then just {lease_id, 3})
  retry_after_ms: ms until every refusing rate bucket would admit (0 unless status 1)
  rate_count / slot_count: entries in the bucket before this request (after purging); for
                 a request that may wait, slot_count includes the waiters ahead of it; for a
                 counter bucket, the estimate rounded up
  rate_reset_ms: ms until the bucket's oldest admission leaves the window, counting this
                 request if admitted (the window when the bucket is empty); for a counter
                 bucket, until its rounded-up estimate (this request counted) drops by one
  retry_after_ms for a counter bucket: until estimate + 1 <= limit (window rollover counted)
  queued: 1 when the request now waits in the queues; arrival: its place there
]]

local lease_id = ARGV[1]
local lease_ms = tonumber(ARGV[2])
--#now ARGV[3]
local n_rate = tonumber(ARGV[4])
local waiter_ttl = tonumber(ARGV[5])  -- nil: the request does not wait
local arrival = ARGV[6]
local n_slot = #ARGV - 6 - 3 * n_rate

if redis.call('ZSCORE', KEYS[#KEYS], lease_id) then
  return {lease_id, 3}
end
local replay = false
for i = 1, n_rate do
  if ARGV[6 + 3 * i] ~= '1' and redis.call('ZSCORE', KEYS[i], lease_id) then replay = true end
end
for j = 1, n_slot do
  local score = redis.call('ZSCORE', KEYS[n_rate + j], lease_id)
  if score and tonumber(score) > now then replay = true end
end

local status = 0
local retry_after = 0
local reclaimed = 0
local rate_counts, rate_resets, slot_counts = {}, {}, {}

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
local function check_log(i, key, limit, window)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  local count = redis.call('ZCARD', key)
  if replay and redis.call('ZSCORE', key, lease_id) then count = count - 1 end
  rate_counts[i] = count
  local oldest = nil
  if count > 0 then
    oldest = score_at(key, 0)
    rate_resets[i] = math.ceil(oldest + window - now)
  else
    rate_resets[i] = math.ceil(window)
  end
  if count < limit or replay then return nil end
  -- Admission needs count - limit + 1 entries gone: wait for the one at index count - limit.
  local wait = window
  if limit > 0 then
    local at = oldest
    if count > limit then
      at = score_at(key, count - limit)
    end
    wait = at + window - now
  end
  return math.ceil(wait)
end

local counters = {}  -- rate bucket index -> counter view at now, for counter buckets

local function check_counter(i, key, limit, window)
  local view = counter_view(key, window)
  counters[i] = view
  rate_counts[i] = whole_count(view, now)  -- rate_resets[i] once the decision is known
  if replay then rate_counts[i] = math.max(0, rate_counts[i] - 1) end  -- it counted itself
  if replay or fits(view, now, limit - 1) then return nil end
  if limit <= 0 then return window end
  return counter_wait(view, now, limit - 1)
end

-- Over `maxmemory` with `noeviction`, Redis refuses only a script's *first* write (a later one
-- must not stop it half-way). Make that first write this no-op (ZADD XX of a member that is
-- never a lease id), so an admission is refused whole, before it purges or writes anything,
-- and `on_error` decides, instead of being let through by a purge that happens to come first.
-- (A plan of counters only starts with HSET, which Redis refuses all the same.)
local oom_probe = nil
if n_slot > 0 then
  oom_probe = KEYS[n_rate + 1]
else
  for i = 1, n_rate do
    if ARGV[6 + 3 * i] ~= '1' then oom_probe = KEYS[i]; break end
  end
end
if oom_probe then redis.call('ZADD', oom_probe, 'XX', 0, '') end

for i = 1, n_rate do
  local check = check_log
  if ARGV[6 + 3 * i] == '1' then check = check_counter end
  local wait = check(i, KEYS[i], tonumber(ARGV[4 + 3 * i]), tonumber(ARGV[5 + 3 * i]))
  if wait then
    status = 1
    retry_after = math.max(retry_after, wait)
  end
end

local function queue_keys(j)
  return KEYS[n_rate + n_slot + 2 * j - 1], KEYS[n_rate + n_slot + 2 * j]
end

for j = 1, n_slot do
  local key = KEYS[n_rate + j]
  local limit = tonumber(ARGV[6 + 3 * n_rate + j])
  reclaimed = reclaimed + redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  local count = redis.call('ZCARD', key)
  if replay and redis.call('ZSCORE', key, lease_id) then count = count - 1 end
  if waiter_ttl then
    local queue, expiries = queue_keys(j)
    local dead = redis.call('ZRANGEBYSCORE', expiries, '-inf', now)
    for d = 1, #dead do redis.call('ZREM', queue, dead[d]) end
    if #dead > 0 then redis.call('ZREMRANGEBYSCORE', expiries, '-inf', now) end
    if arrival == '' then
      count = count + redis.call('ZCARD', queue)
    else
      -- (Re)placed at its arrival: a waiter purged during a stall keeps its place.
      redis.call('ZADD', queue, arrival, lease_id)
      count = count + redis.call('ZRANK', queue, lease_id)
    end
  end
  slot_counts[j] = count
  if count >= limit and status == 0 and not replay then
    status = 2
  end
end

if status == 0 and not replay then
  for i = 1, n_rate do
    local window = tonumber(ARGV[5 + 3 * i])
    local view = counters[i]
    if view then
      view = {w = view.w, c = view.c + 1, p = view.p, l = view.l}
      counters[i] = view
      redis.call('HSET', KEYS[i], 'w', view.w, 'c', view.c, 'p', view.p, 'l', view.l)
      -- Both counts have aged out two windows from now.
      redis.call('PEXPIRE', KEYS[i], math.ceil(2 * window))
    else
      redis.call('ZADD', KEYS[i], now, lease_id)
      -- The newest entry leaves the window `window` ms from now: the key is useless after that.
      redis.call('PEXPIRE', KEYS[i], math.ceil(window))
    end
  end
  for j = 1, n_slot do
    local key = KEYS[n_rate + j]
    redis.call('ZADD', key, now + lease_ms, lease_id)
    -- Cover the longest-lived member (a job slot may outlive a lease by far), plus one
    -- lease so a dead holder's lease is still there to be purged and counted as reclaimed.
    local last = tonumber(redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')[2])
    redis.call('PEXPIRE', key, math.ceil(last - now + lease_ms))
  end
end

-- A counter's reset counts this request when admitted (its view was updated above).
for i, view in pairs(counters) do
  rate_resets[i] = counter_wait(view, now, math.max(0, whole_count(view, now) - 1))
end

local reply = {lease_id, status, retry_after, reclaimed}
for i = 1, n_rate do reply[#reply + 1] = rate_counts[i] end
for i = 1, n_rate do reply[#reply + 1] = rate_resets[i] end
for j = 1, n_slot do reply[#reply + 1] = slot_counts[j] end

if waiter_ttl then
  local queued = 0
  if status == 2 then
    -- Refused for concurrency alone: wait (a newcomer at the back), entry refreshed.
    if arrival == '' then arrival = string.format('%.3f', now) end
    local keep = math.ceil(2 * waiter_ttl)
    for j = 1, n_slot do
      local queue, expiries = queue_keys(j)
      redis.call('ZADD', queue, arrival, lease_id)
      redis.call('ZADD', expiries, now + waiter_ttl, lease_id)
      for _, k in ipairs({queue, expiries}) do
        if redis.call('PTTL', k) < keep then redis.call('PEXPIRE', k, keep) end
      end
    end
    queued = 1
  elseif arrival ~= '' then
    -- Admitted, or refused by a rate limit: a waiter leaves the queues either way.
    for j = 1, n_slot do
      local queue, expiries = queue_keys(j)
      redis.call('ZREM', queue, lease_id)
      redis.call('ZREM', expiries, lease_id)
    end
  end
  reply[#reply + 1] = queued
  reply[#reply + 1] = arrival
end
return reply
