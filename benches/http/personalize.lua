-- wrk script: POST /api/v1/personalize for a uniformly random demo customer.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
math.randomseed(os.time())
request = function()
  local id = string.format("cust-%05d", math.random(0, 9999))
  return wrk.format(nil, "/api/v1/personalize",
    nil, '{"customer_id":"' .. id .. '","placement":"homepage_hero"}')
end
