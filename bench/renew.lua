-- wrk script: replays pre-built renewal requests (POST /v1/clusters/{name}/intermediate with an
-- agent token, a fresh CSR and a proof) round-robin, counts every status, and prints one JSON
-- summary line starting with "RESULT " at the end.
--
--   wrk -t2 -c16 -d10s -s bench/renew.lua https://127.0.0.1:PORT -- requests.tsv 2 prelude.tsv
--
-- requests.tsv: one request per line, "<path>\t<agent token>\t<JSON body>". Thread i of n takes
-- lines i, i+n, i+2n, ... so the threads never send the same request twice.
--
-- prelude.tsv (optional, same format): sent first. Over TLS, wrk asks request() again when its
-- first write on a new connection meets the unfinished handshake, dropping the request it got
-- before; the main requests form per-cluster key chains (each proves with the key the previous
-- one asked a certificate for), so none of them may be dropped. Prelude requests depend on
-- nothing and nothing depends on them: while the connections open, they absorb those retries.

local threads = {}
local next_id = 1

function setup(thread)
  thread:set("tid", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

local function load(file, nthreads)
  local out = {}
  local i = 0
  for line in io.lines(file) do
    if (i % nthreads) + 1 == tid then
      local path, tok, body = line:match("^([^\t]*)\t([^\t]*)\t(.*)$")
      out[#out + 1] = wrk.format("POST", path, {
        ["Authorization"] = "Bearer " .. tok,
        ["Content-Type"] = "application/json",
      }, body)
    end
    i = i + 1
  end
  return out
end

function init(args)
  nthreads = tonumber(args[2]) or 1  -- must equal wrk's -t
  reqs = load(args[1], nthreads)
  prelude = args[3] and load(args[3], nthreads) or {}
  pidx = 0
  nreqs = #reqs + #prelude
  idx = 0
  sent = 0
  statuses = {}
end

function request()
  if pidx < #prelude then
    pidx = pidx + 1
    sent = sent + 1
    return prelude[pidx]
  end
  idx = idx + 1
  if idx > #reqs then idx = 1 end
  sent = sent + 1
  return reqs[idx]
end

function response(status, headers, body)
  local k = tostring(status)
  statuses[k] = (statuses[k] or 0) + 1
end

function done(summary, latency, requests)
  local total = {}
  local prepared = 0
  local sent_all = 0
  for _, t in ipairs(threads) do
    local s = t:get("statuses")
    for k, v in pairs(s) do total[k] = (total[k] or 0) + v end
    prepared = prepared + t:get("nreqs")
    sent_all = sent_all + t:get("sent")
  end
  local parts = {}
  for k, v in pairs(total) do parts[#parts + 1] = string.format('"%s":%d', k, v) end
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests":%d,"duration_us":%d,"statuses":{%s},"prepared":%d,"sent":%d,' ..
    '"socket_errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%d,"mean":%.1f,"p50":%d,"p90":%d,"p99":%d,"p999":%d,"max":%d}}\n',
    summary.requests, summary.duration, table.concat(parts, ","), prepared, sent_all,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.max))
end
