"""The submit script (Lua): one round trip admits a job whole, or writes nothing.

Kept apart from hive/jobs/submit.py, which builds its KEYS and ARGV and reads its answer:
the script is the contract between them, documented here beside it.
"""

# Submits a job in one step: the depth checks, the claim of a warm worker, and
# every write (job record, first event, jobs index, waiting sets, RQ's job and its
# queue), so a job is either wholly accepted or not at all, in one round trip.
#
# The pick, capacity-aware: of the model's idle set (workers holding the model with
# a free slot, most recently freed first, the first ARGV[6]), the live one (a
# heartbeat since ARGV[4]) with the most free slots: its capacity less its running
# jobs (its hash, ARGV[5] .. name) less its claims (ARGV[21] .. name: jobs routed
# to it that it has not yet counted as running, so neither a worker listed for two
# models nor one taking a job off its queue right now is given more than it has
# slots); the pick adds a claim. Of those, the worker that last ran a prompt
# starting alike (control.prefix: shared/prefix_affinity.py's keys, longest first)
# goes first unless it is far busier; the pick becomes those prefixes' worker.
# Dead or full entries are dropped on the way, and a worker whose last slot this
# job takes; the worker lists itself again when a slot frees. The picked worker
# gets the job on its own RQ queue (ARGV[10] .. name) and the job waits behind no
# one; a job left on a full or dead worker's queue is handed on by the reaper.
#
# The keys of a worker's own queue and of RQ's job are built here from prefixes
# (which worker is claimed is only known here): one Redis, not a cluster.
# Per-key limits and the Idempotency-Key come as ARGV[23], a JSON object (Admission),
# with their keys: KEYS[10] the key's jobs in flight, KEYS[11] its rate bucket,
# KEYS[12] the idempotency record; fair share's are KEYS[13] (the waiting jobs by
# tag) and KEYS[14] (each key's youngest waiting job).
# Returns {0, position, worker or "", rate tokens left, jobs in flight}, or
# {1, waiting} / {2, waiting for the model} when a depth limit is reached,
# {3, in flight} / {4, seconds until a token, in flight} when the key's limits are,
# {5, job id, stored response} replaying an Idempotency-Key, {6, job id} when it was
# used with another request, {7, job id} when that request is still in admission.
SUBMIT = """
local ROUND, IN_FLIGHT_SCAN = 1000000, 16
local control = cjson.decode(ARGV[23])
local now = tonumber(ARGV[3])
-- Idempotency-Key: the same key and body answer the same job (its stored response),
-- a different body is refused, and a request still in admission asks to come back.
if control.idem ~= '' then
  local held = redis.call('HMGET', KEYS[12], 'hash', 'job_id', 'state', 'response')
  if held[2] then
    if held[1] ~= control.idem then return {6, held[2]} end
    if held[3] ~= 'accepted' then return {7, held[2]} end
    return {5, held[2], held[4] or ''}
  end
end
-- Per-key limits, checked before anything is written: jobs in flight (the set drops
-- the jobs that ended as it counts), then the create rate (a token bucket).
-- The scan is bounded, so a key with thousands of jobs waiting does not make every
-- submit of it read them all: the oldest (most likely running or ended) are read,
-- as many as the limit needs, or IN_FLIGHT_SCAN for a key without one.
local in_flight, running = 0, 0
local scan = IN_FLIGHT_SCAN
if control.max_in_flight > 0 then scan = control.max_in_flight + IN_FLIGHT_SCAN end
for _, id in ipairs(redis.call('ZRANGE', KEYS[10], 0, scan - 1)) do
  local state = redis.call('HGET', control.job_prefix .. id, 'state')
  if not state or state == 'completed' or state == 'failed' or state == 'cancelled' then
    redis.call('ZREM', KEYS[10], id)
  elseif state ~= 'queued' then
    running = running + 1
  end
end
in_flight = redis.call('ZCARD', KEYS[10])
if control.max_in_flight > 0 and in_flight >= control.max_in_flight then return {3, in_flight} end
local tokens = 0
if control.rate > 0 then
  local bucket = redis.call('HMGET', KEYS[11], 'tokens', 'at')
  local at = tonumber(bucket[2]) or now
  tokens = math.min(control.burst, (tonumber(bucket[1]) or control.burst) + math.max(0, now - at) * control.rate)
  if tokens < 1 then return {4, tostring((1 - tokens) / control.rate), in_flight} end
end
local waiting = redis.call('ZCARD', KEYS[1])
if waiting >= tonumber(ARGV[1]) then return {1, waiting} end
local for_model = redis.call('ZCARD', KEYS[2])
if for_model >= tonumber(ARGV[2]) then return {2, for_model} end
local worker = ''
if ARGV[12] == '1' then
  local best = -1
  local free_of = {}
  for _, name in ipairs(redis.call('ZREVRANGE', KEYS[3], 0, ARGV[6] - 1)) do
    local beat = redis.call('ZSCORE', KEYS[4], name)
    local free = -1
    if beat and tonumber(beat) >= tonumber(ARGV[4]) then
      local slots = redis.call('HMGET', ARGV[5] .. name, 'capacity', 'running')
      local claimed = math.max(tonumber(redis.call('GET', ARGV[21] .. name) or '0'), 0)
      free = (tonumber(slots[1]) or 1) - (tonumber(slots[2]) or 0) - claimed
    end
    if free <= 0 then
      redis.call('ZREM', KEYS[3], name)  -- dead or full: it lists itself again when a slot frees
    else
      free_of[name] = free
      if free > best then worker, best = name, free end
    end
  end
  -- Cache-aware: the worker that last ran a prompt starting alike (the longest cut
  -- first), unless it has under half the free slots of the best. A dead worker's
  -- affinity is dropped.
  local followed = false
  for _, key in ipairs(control.prefix) do
    local name = redis.call('GET', key)
    if name then
      local beat = redis.call('ZSCORE', KEYS[4], name)
      if not beat or tonumber(beat) < tonumber(ARGV[4]) then
        redis.call('DEL', key)
      elseif free_of[name] and 2 * free_of[name] >= best then
        worker, best, followed = name, free_of[name], true
        break
      end
    end
  end
  -- A prefix no worker holds: the least loaded, ties taken in turn (by name), so
  -- that new prefixes spread over the workers' caches rather than pile onto one.
  if not followed and #control.prefix > 0 then
    local ties = {}
    for name, free in pairs(free_of) do
      if free == best then ties[#ties + 1] = name end
    end
    if #ties > 1 then
      table.sort(ties)
      worker = ties[redis.call('INCR', control.spread_key) % #ties + 1]
      redis.call('EXPIRE', control.spread_key, control.affinity_ttl)
    end
  end
  if best == 1 then redis.call('ZREM', KEYS[3], worker) end  -- its last free slot
  if worker ~= '' then
    redis.call('INCR', ARGV[21] .. worker)
    redis.call('PEXPIRE', ARGV[21] .. worker, ARGV[22])
    for _, key in ipairs(control.prefix) do
      redis.call('SET', key, worker, 'EX', control.affinity_ttl)
    end
  end
end
local rq_queue, position = ARGV[9], waiting + 1
if worker ~= '' then rq_queue, position = ARGV[10] .. worker, 1 end
local ttl, job_id = ARGV[7], ARGV[8]  -- ARGV[3] as sent for the scores
if worker ~= '' then
  redis.call('RPUSH', ARGV[11] .. rq_queue, job_id)
else
  -- Fair share: start-time fair queueing by API key. A job's round is the round of
  -- the job first in line, or one past its key's youngest job still waiting, if
  -- later; within a round, the key with fewer running jobs first, then arrival.
  -- One key's jobs keep their order; another key's job joins the current round.
  local round = 0
  local head = redis.call('ZRANGE', KEYS[13], 0, 0, 'WITHSCORES')
  if #head > 0 then round = math.floor(tonumber(head[2]) / ROUND) end
  local youngest = redis.call('HGET', KEYS[14], control.owner)
  if youngest then
    local last_round, last_job = string.match(youngest, '^(%d+):(.+)$')
    if redis.call('ZSCORE', KEYS[13], last_job) then round = math.max(round, tonumber(last_round) + 1) end
  end
  local arrival = redis.call('INCR', KEYS[13] .. ':arrivals') % 1000
  redis.call('EXPIRE', KEYS[13] .. ':arrivals', ttl)
  local score = round * ROUND + math.min(running, 999) * 1000 + arrival
  redis.call('ZADD', KEYS[13], score, job_id)
  redis.call('EXPIRE', KEYS[13], ttl)
  redis.call('HSET', KEYS[14], control.owner, round .. ':' .. job_id)
  redis.call('EXPIRE', KEYS[14], ttl)
  -- The RQ list follows that order: the job goes in before the first one behind it.
  local placed = false
  for _, next_id in ipairs(redis.call('ZRANGE', KEYS[13], '(' .. score, '+inf', 'BYSCORE', 'LIMIT', 0, 16)) do
    if redis.call('LINSERT', ARGV[11] .. rq_queue, 'BEFORE', next_id, job_id) > 0 then
      placed = true
      break
    end
  end
  if not placed then redis.call('RPUSH', ARGV[11] .. rq_queue, job_id) end
  position = redis.call('ZRANK', KEYS[13], job_id) + 1
end
-- The job's record (ARGV[19]) and RQ's hash (ARGV[20]) come as JSON objects of
-- strings, RQ's binary fields as pairs after them: a few long arguments cost the
-- hive far less to send than fifty short ones.
local function flat(object, into)
  for field, value in pairs(cjson.decode(object)) do
    into[#into + 1] = field
    into[#into + 1] = value
  end
  return into
end
local record = flat(ARGV[19], {ARGV[15], rq_queue, ARGV[16], position})
local rq_fields = flat(ARGV[20], {'origin', rq_queue, unpack(ARGV, 24, #ARGV)})
redis.call('HSET', KEYS[5], unpack(record))
redis.call('EXPIRE', KEYS[5], ttl)
redis.call('XADD', KEYS[6], ARGV[17], 'e', ARGV[18], 'd', ARGV[13] .. position .. ARGV[14])
redis.call('EXPIRE', KEYS[6], ttl)
redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', now - tonumber(ttl))
redis.call('ZADD', KEYS[7], ARGV[3], job_id)
redis.call('EXPIRE', KEYS[7], ttl)
for i = 1, 2 do
  redis.call('ZADD', KEYS[i], ARGV[3], job_id)
  redis.call('EXPIRE', KEYS[i], ttl)
end
redis.call('HSET', KEYS[8], unpack(rq_fields))
redis.call('SADD', KEYS[9], ARGV[11] .. rq_queue)
redis.call('ZADD', KEYS[10], ARGV[3], job_id)
redis.call('EXPIRE', KEYS[10], ttl)
if control.rate > 0 then
  tokens = tokens - 1
  redis.call('HSET', KEYS[11], 'tokens', tostring(tokens), 'at', ARGV[3])
  redis.call('EXPIRE', KEYS[11], math.ceil(control.burst / control.rate) + 60)
end
if control.idem ~= '' then
  redis.call('HSET', KEYS[12], 'hash', control.idem, 'job_id', job_id, 'state', control.idem_state)
  redis.call('EXPIRE', KEYS[12], control.idem_ttl)
end
return {0, position, worker, tostring(tokens), in_flight + 1}
"""

# Takes back a submit that did not reach enough replicas: everything the submit
# script wrote, unless a worker has already taken the job off its RQ queue (then it
# runs, and stays accepted). KEYS as SUBMIT's 1, 2, 5, 6, 7, 8; ARGV: the job id,
# the RQ queue's key, the claims key of the worker it was routed to (or "").
WITHDRAW = """
if redis.call('LREM', ARGV[2], 0, ARGV[1]) == 0 then return 0 end
redis.call('DEL', KEYS[3], KEYS[4], KEYS[6])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
if ARGV[3] ~= '' and tonumber(redis.call('GET', ARGV[3]) or '0') > 0 then redis.call('DECR', ARGV[3]) end
if ARGV[4] ~= '' then redis.call('DEL', ARGV[4]) end
redis.call('ZREM', ARGV[5], ARGV[1])
redis.call('ZREM', ARGV[6], ARGV[1])
return 1
"""
