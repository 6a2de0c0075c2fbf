-- wrk script: POST /api/v1/events, 100 new events per request (unique event ids).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local counter = 0
local prefix = tostring(math.random(1, 1e9))
setup = function(thread)
  thread:set("prefix", tostring(math.random(1, 1e9)))
end
request = function()
  counter = counter + 1
  local parts = {}
  for i = 1, 100 do
    parts[i] = string.format('{"eventId":"b%s-%d-%d","customerId":"cust-%05d","type":"page_view"}',
      prefix, counter, i, math.random(0, 9999))
  end
  return wrk.format(nil, "/api/v1/events", nil, "[" .. table.concat(parts, ",") .. "]")
end
