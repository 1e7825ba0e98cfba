--[[
quota.lua: the admin's adjustment of one quota (a payment came in): reset the current period
(used 0, granted 0) and/or grant extra units for it. A stored period other than the current
one reads as used 0, granted 0.

KEYS[1] the quota hash {p, u, g} (admit.lua)
ARGV[1] now_ms override ("" means TIME)  ARGV[2] period (1d | 7d | month)
ARGV[3] units to grant (>= 0)  ARGV[4] reset (1 | 0)
Returns: {used, granted, ms until the period ends}
]]

--#include periods
--#now ARGV[1]
local index, end_ms = period_of(now, ARGV[2])
local f = redis.call('HMGET', KEYS[1], 'p', 'u', 'g')
local used, granted = 0, 0
if tonumber(f[1]) == index then used, granted = tonumber(f[2]) or 0, tonumber(f[3]) or 0 end
if ARGV[4] == '1' then used, granted = 0, 0 end
granted = granted + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'p', index, 'u', used, 'g', granted)
redis.call('PEXPIRE', KEYS[1], math.ceil(end_ms - now + DAY_MS))
return {used, granted, math.ceil(end_ms - now)}
