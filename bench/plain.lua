-- wrk script: one request without an upload, for what a request costs before any work.
-- usage: wrk -s plain.lua URL -- METHOD [JSON_BODY]
function init(args)
  wrk.method = args[1] or "GET"
  if args[2] then
    wrk.body = args[2]
    wrk.headers["Content-Type"] = "application/json"
  end
end
