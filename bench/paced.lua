-- wrk script: multipart.lua at a fixed request rate (`make soak`). Each thread hands out send
-- times RATE apart to its connections, whatever the latency: a constant offered load, not the
-- closed loop's "as fast as answers come back".
-- usage: wrk -s paced.lua URL -- IMAGE_PATH FIELD CONTENT_TYPE RATE_PER_THREAD
local here = debug.getinfo(1, "S").source:sub(2):match("(.*/)") or "./"
dofile(here .. "multipart.lua")

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } paced_timespec;
int clock_gettime(int clock_id, paced_timespec *tp);
]]
local CLOCK_MONOTONIC = 1
local timespec = ffi.new("paced_timespec")

local function now_ms()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, timespec)
  return tonumber(timespec.tv_sec) * 1000 + tonumber(timespec.tv_nsec) / 1e6
end

local interval_ms, next_ms = 0, nil
local multipart_init = init

function init(args)
  interval_ms = 1000 / tonumber(args[4])
  multipart_init(args)
end

function delay()
  local now = now_ms()
  -- After a stall, start again from now instead of sending the missed requests in one burst.
  if next_ms == nil or next_ms < now - 1000 then next_ms = now end
  next_ms = next_ms + interval_ms
  return math.max(0, math.floor(next_ms - now))
end
