-- wrk script: multipart.lua with a share of repeated uploads (bench/cache.py). Each upload is
-- the image with a few bytes after its end, which decoders ignore and the cache's digest does
-- not: REPEAT_SHARE of the requests send one of HOT uploads (seen before: the cache can answer
-- them), the others an upload never sent before.
-- RUN tells one run's uploads from another's (a cache outlives a run).
-- usage: wrk -s cache.lua URL -- IMAGE_PATH FIELD CONTENT_TYPE REPEAT_SHARE HOT RUN
local here = debug.getinfo(1, "S").source:sub(2):match("(.*/)") or "./"
dofile(here .. "multipart.lua")

local multipart_setup, multipart_init = setup, init
local started = 0
local head, tail, share, hot, run, sent  -- and `id`, a global setup() sets per thread

function setup(thread)
  started = started + 1
  thread:set("id", started)
  multipart_setup(thread)
end

function init(args)
  multipart_init(args)
  local f = assert(io.open(args[1], "rb"))
  local data = f:read("*all")
  f:close()
  -- multipart.lua's body around the image: everything before its bytes end, and after.
  local at = wrk.body:find(data, 1, true)
  head, tail = wrk.body:sub(1, at + #data - 1), wrk.body:sub(at + #data)
  share, hot, run, sent = tonumber(args[4]), tonumber(args[5]), args[6], 0
  math.randomseed(1000 + id)
end

function request()
  local suffix
  if math.random() < share then
    suffix = run .. "-hot-" .. math.random(hot)
  else
    sent = sent + 1
    suffix = run .. "-new-" .. id .. "-" .. sent
  end
  return wrk.format(nil, nil, nil, head .. suffix .. tail)
end
