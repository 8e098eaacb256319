-- wrk script: multipart.lua, paced: each connection pauses PAUSE_MS after every answer, so that
-- C connections offer about C / (latency + pause) requests per second (`make soak`).
-- usage: wrk -s paced.lua URL -- IMAGE_PATH FIELD CONTENT_TYPE PAUSE_MS
local here = debug.getinfo(1, "S").source:sub(2):match("(.*/)") or "./"
dofile(here .. "multipart.lua")

local pause_ms = 0
local multipart_init = init

function init(args)
  pause_ms = tonumber(args[4]) or 0
  multipart_init(args)
end

function delay()
  return pause_ms
end
