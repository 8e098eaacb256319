-- wrk script: POST one image as multipart/form-data and count answers by status.
-- usage: wrk -s multipart.lua URL -- IMAGE_PATH [FIELD] [CONTENT_TYPE]
-- bench/load.py multipart_body() builds the same body in Python (and one with N images, which
-- bench/prepared.lua sends): change both together.
local counts = {}
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function reset_counts()
  s200, s413, s429, s503, s504, sother = 0, 0, 0, 0, 0, 0
end

function init(args)
  local path, field, ctype = args[1], args[2] or "images", args[3] or "image/jpeg"
  local f = assert(io.open(path, "rb"))
  local data = f:read("*all")
  f:close()
  local filename = ctype == "image/png" and "upload.png" or "upload.jpg"
  local boundary = "----benchboundary7MA4YWxkTrZu0gW"
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "multipart/form-data; boundary=" .. boundary
  wrk.body = "--" .. boundary .. "\r\n"
    .. 'Content-Disposition: form-data; name="' .. field .. '"; filename="' .. filename .. '"\r\n'
    .. "Content-Type: " .. ctype .. "\r\n\r\n" .. data .. "\r\n--" .. boundary .. "--\r\n"
  reset_counts()
end

function response(status, headers, body)
  if status == 200 then s200 = s200 + 1
  elseif status == 413 then s413 = s413 + 1
  elseif status == 429 then s429 = s429 + 1
  elseif status == 503 then s503 = s503 + 1
  elseif status == 504 then s504 = s504 + 1
  else sother = sother + 1 end
end

function done(summary, latency, requests)
  local t = {s200 = 0, s413 = 0, s429 = 0, s503 = 0, s504 = 0, sother = 0}
  for _, thread in ipairs(threads) do
    for k, _ in pairs(t) do t[k] = t[k] + (thread:get(k) or 0) end
  end
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p95_us": %d, "p99_us": %d, ' ..
    '"max_us": %d, "connect_errors": %d, "read_errors": %d, "write_errors": %d, ' ..
    '"timeouts": %d, "status_200": %d, "status_413": %d, "status_429": %d, "status_503": %d, ' ..
    '"status_504": %d, "status_other": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(95),
    latency:percentile(99), latency.max, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.timeout, t.s200, t.s413, t.s429, t.s503, t.s504,
    t.sother))
end
