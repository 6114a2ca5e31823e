-- wrk script: every request is a new lesson job (unique idempotency key), from 500 users.
local counter = 0
local threads = 0

function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end

function request()
  counter = counter + 1
  local body = string.format(
    '{"job_kind":"lesson","idempotency_key":"wrk-%s-%d-%d","payload":{"topic":"Benchmarks"}}',
    run_id, tid, counter)
  return wrk.format("POST", "/", {
    ["Content-Type"] = "application/json",
    ["X-Dylen-User"] = "bench-" .. (counter % 500),
  }, body)
end

function init(args)
  run_id = args[1] or tostring(os.time())
end
