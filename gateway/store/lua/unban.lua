--[[
unban.lua: lift the ban on one client IP group and forget its strikes and past bans
(an operator's lift is a pardon: the next ban starts from the first duration again).

KEYS[1]  strikes (see strike.lua)
KEYS[2]  state
KEYS[3]  lifted: the call id of the last lift that found a ban (a minute's memory), so that
         a replay of that call (a retry layer re-sending it) answers 1 again
ARGV[1]  now_ms override; "" means the server clock (TIME)
ARGV[2]  call id

Returns 1 when the group was banned, else 0.
]]

--#now ARGV[1]
if redis.call('GET', KEYS[3]) == ARGV[2] then
  return 1
end
local ban_until = tonumber(redis.call('HGET', KEYS[2], 'until')) or 0
redis.call('DEL', KEYS[1], KEYS[2])
if ban_until > now then
  redis.call('SET', KEYS[3], ARGV[2], 'PX', 60000)
  return 1
end
return 0
