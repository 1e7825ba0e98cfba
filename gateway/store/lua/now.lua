-- now.lua: the preamble every script that needs "now" gets at load time (gateway/store/scripts.py
-- puts it where the script says `--#now ARGV[n]`). Milliseconds, float: the caller's clock when
-- ARGV[n] is set (tests drive time), else the Redis server's TIME.
local now
if NOW_ARG ~= '' then
  now = tonumber(NOW_ARG)
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
