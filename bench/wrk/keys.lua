-- wrk script: every request carries the next API key of a pre-generated list (one per line),
-- so admission touches many buckets (rotating keys) instead of one hot key.
-- Usage: wrk ... -s bench/wrk/keys.lua URL -- KEYFILE [HEADER]
local keys = {}
local header = "X-API-Key"
local index = 0

function init(args)
  local path = args[1]
  header = args[2] or header
  for line in io.lines(path) do
    if #line > 0 then keys[#keys + 1] = line end
  end
  -- Each wrk thread starts at a different place in the list.
  index = math.random(0, #keys - 1)
end

function request()
  index = index % #keys + 1
  wrk.headers[header] = keys[index]
  return wrk.format()
end
