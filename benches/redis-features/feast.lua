-- wrk script: POST /get-online-features for one uniformly drawn customer x 20 features.
-- The customer count comes from the environment (CUSTOMERS, default 10000).
local customers = tonumber(os.getenv("CUSTOMERS") or "10000")
local names = {}
for j = 0, 19 do names[#names + 1] = string.format('"customer_features:f%02d"', j) end
local features = table.concat(names, ",")
local headers = { ["Content-Type"] = "application/json" }

function setup(thread) thread:set("seed", math.random(1, 1000000)) end
function init(args) math.randomseed(seed) end

function request()
  local id = math.random(0, customers - 1)
  local body = '{"features":[' .. features .. '],"entities":{"customer_id":[' .. id .. ']}}'
  return wrk.format("POST", "/get-online-features", headers, body)
end

function done(summary, latency, requests)
  io.write(string.format(
    '{"requests":%d,"rate_per_s":%.1f,"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d,"non_2xx":%d,"socket_errors":%d}\n',
    summary.requests, summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max,
    summary.errors.status, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
