-- wrk script: POST a body built beforehand (bench/load.py multipart_body(): N images in one
-- multipart/form-data request) and count answers by status as multipart.lua does.
-- usage: wrk -s prepared.lua URL -- BODY_PATH CONTENT_TYPE_HEADER
local here = debug.getinfo(1, "S").source:sub(2):match("(.*/)") or "./"
dofile(here .. "multipart.lua")

function init(args)
  local f = assert(io.open(args[1], "rb"))
  wrk.body = f:read("*all")
  f:close()
  wrk.method = "POST"
  wrk.headers["Content-Type"] = args[2]
  reset_counts()
end
