-- wrk script for the token-exchange benchmark.
--
--   wrk -t2 -c16 -d8s --latency -s bench/token.lua http://127.0.0.1:PORT/token \
--       -- BODIES_FILE NTHREADS "Basic base64(client:secret)" FAILURE_DUMP_PREFIX
--
-- BODIES_FILE holds one pre-built form body per line (a distinct pair of
-- RS256-signed EHR tokens each), or "body<TAB>DPoP proof" (variant dpop: the
-- proof is sent as the DPoP header). Thread k of n sends lines k, k+n, k+2n, ...
-- in order, so no body is sent twice in one run unless the file runs out
-- ("wrapped" > 0 in the summary says it did). Non-2xx responses are counted
-- here (wrk also prints "Non-2xx or 3xx responses"), and the first one each
-- thread sees is written to FAILURE_DUMP_PREFIX-<thread>.txt (status line,
-- then the response body) for diagnosis.

local threads = {}
local next_id = 0

function setup(thread)
   thread:set("tid", next_id)
   next_id = next_id + 1
   table.insert(threads, thread)
end

function init(args)
   local path, n = args[1], tonumber(args[2])
   bodies, proofs = {}, {}
   local i = 0
   for line in io.lines(path) do
      if line ~= "" then
         if i % n == tid then
            local body, proof = line:match("^([^\t]*)\t(.*)$")
            if body then
               bodies[#bodies + 1] = body
               proofs[#bodies] = proof
            else
               bodies[#bodies + 1] = line
            end
         end
         i = i + 1
      end
   end
   nbodies = #bodies
   if nbodies == 0 then error("no request bodies for thread " .. tid .. " in " .. path) end
   headers = {["Authorization"] = args[3], ["Content-Type"] = "application/x-www-form-urlencoded"}
   dump = args[4] or ""
   idx, sent, wrapped, responses, non2xx, dumped = 0, 0, 0, 0, 0, false
end

function request()
   idx = idx + 1
   if idx > #bodies then
      idx = 1
      wrapped = wrapped + 1
   end
   sent = sent + 1
   local proof = proofs[idx]
   if proof then
      return wrk.format("POST", nil, {["Authorization"] = headers["Authorization"],
                                      ["Content-Type"] = headers["Content-Type"], ["DPoP"] = proof}, bodies[idx])
   end
   return wrk.format("POST", nil, headers, bodies[idx])
end

function response(status, hdrs, body)
   responses = responses + 1
   if status < 200 or status > 299 then
      non2xx = non2xx + 1
      if not dumped and dump ~= "" then
         dumped = true
         local f = io.open(dump .. "-" .. tid .. ".txt", "w")
         if f then
            f:write("HTTP " .. status .. "\n" .. (body or "") .. "\n")
            f:close()
         end
      end
   end
end

function done(summary, latency, requests)
   local t = {sent = 0, responses = 0, non2xx = 0, wrapped = 0, bodies = 0}
   for _, th in ipairs(threads) do
      t.sent = t.sent + th:get("sent")
      t.responses = t.responses + th:get("responses")
      t.non2xx = t.non2xx + th:get("non2xx")
      t.wrapped = t.wrapped + th:get("wrapped")
      t.bodies = t.bodies + th:get("nbodies")
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
      '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d,' ..
      '"lat_p50_us":%d,"lat_p90_us":%d,"lat_p99_us":%d,"lat_mean_us":%.1f,"lat_max_us":%d,' ..
      '"sent":%d,"responses":%d,"non2xx":%d,"wrapped":%d,"bodies":%d}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max,
      t.sent, t.responses, t.non2xx, t.wrapped, t.bodies))
end
