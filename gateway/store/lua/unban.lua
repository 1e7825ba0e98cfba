--[[
unban.lua: lift the ban on one client IP group and forget its strikes and past bans
(an operator's lift is a pardon: the next ban starts from the first duration again).

KEYS[1]  strikes (see strike.lua)
KEYS[2]  state
ARGV[1]  now_ms override; "" means the server clock (TIME)

Returns 1 when the group was banned, else 0.
]]

--#now ARGV[1]
local ban_until = tonumber(redis.call('HGET', KEYS[2], 'until')) or 0
redis.call('DEL', KEYS[1], KEYS[2])
if ban_until > now then
  return 1
end
return 0
