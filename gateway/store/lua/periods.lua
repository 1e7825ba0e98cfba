-- periods.lua: quota periods and lease members, included where a script says `--#include
-- periods`. Mirrors gateway/store/periods.py (period_of) and base.lease_members.
local DAY_MS = 86400000
local floor = math.floor

local function civil_from_days(z)
  z = z + 719468
  local era = floor(z / 146097)
  local doe = z - era * 146097
  local yoe = floor((doe - floor(doe / 1460) + floor(doe / 36524) - floor(doe / 146096)) / 365)
  local year = yoe + era * 400
  local doy = doe - (365 * yoe + floor(yoe / 4) - floor(yoe / 100))
  local mp = floor((5 * doy + 2) / 153)
  local month
  if mp < 10 then month = mp + 3 else month = mp - 9 end
  if month <= 2 then year = year + 1 end
  return year, month
end

local function days_from_civil(year, month)
  if month <= 2 then year = year - 1 end
  local era = floor(year / 400)
  local yoe = year - era * 400
  local mp
  if month > 2 then mp = month - 3 else mp = month + 9 end
  local doy = floor((153 * mp + 2) / 5)
  local doe = yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

-- index, end_ms, length_ms of the period ('1d', '7d' ISO weeks, 'month') holding t.
local function period_of(t, period)
  local day = floor(t / DAY_MS)
  if period == '1d' then return day, (day + 1) * DAY_MS, DAY_MS end
  if period == '7d' then
    local index = floor((day - 4) / 7)
    local start = index * 7 + 4
    return index, (start + 7) * DAY_MS, 7 * DAY_MS
  end
  local year, month = civil_from_days(day)
  local start = days_from_civil(year, month)
  local stop
  if month == 12 then stop = days_from_civil(year + 1, 1) else stop = days_from_civil(year, month + 1) end
  return year * 12 + month - 1, stop * DAY_MS, (stop - start) * DAY_MS
end

-- The members a lease holds in a slot bucket (`id*K`: id, id#2 .. id#K, K <= 64).
local function lease_members(id)
  local k = tonumber(string.match(id, '%*(%d+)$')) or 1
  if k > 64 then k = 64 end
  local members = {id}
  for n = 2, k do members[n] = id .. '#' .. n end
  return members
end

-- The first `units` members of a sliding log for a lease: id, id#2 .. id#units.
local function unit_members(id, from, to)
  local members = {}
  for n = from, to do
    if n == 1 then members[#members + 1] = id else members[#members + 1] = id .. '#' .. n end
  end
  return members
end
