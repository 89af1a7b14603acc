-- One admission: every dimension decided atomically on Redis time; nothing is consumed
-- unless all pass. Mirrors limits/gcra.py (rates) and limits/memory.py (leases, dollars).
--
-- KEYS[1]   lease ZSET (member: lease id, score: expiry)
-- KEYS[2]   dollars HASH {day = UTC day number, spent = micro-dollars}
-- KEYS[3]   abandon marker of this lease id (set by settle.lua when the caller gave up)
-- KEYS[4..] one GCRA TAT string per rate dimension, in ARGV order
-- ARGV      slack s, lease id, lease TTL s, max leases (-1: none), budget µ$ (-1: none),
--           cost µ$, retry s for a full lease set, seconds per day,
--           then per rate dimension: name, interval s, tolerance s, cost units
-- Returns   {allowed 0|1, denied dimension or '', retry_after, day,
--            then per rate dimension: remaining units, reset s}
-- Numbers travel as strings: Redis truncates Lua numbers in replies to integers, and one
-- past 2^63 (a limit beyond the configured maxima) would not survive that at all.

local slack = tonumber(ARGV[1])
local lease_id, lease_ttl = ARGV[2], tonumber(ARGV[3])
local max_leases, budget, usd_cost = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local lease_retry, day_seconds = tonumber(ARGV[7]), tonumber(ARGV[8])
local first_rate = 9

local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local day = math.floor(now / day_seconds)

local function num(x)
  return string.format('%.17g', x)
end

local function fits(backlog, tolerance)
  return backlog <= tolerance + slack
end

-- Closed form, as gcra.remaining: the quotient, then one step where the division rounded
-- differently from fits(). Never a loop: past 2^53 units + 1 == units.
local function remaining(backlog, interval, tolerance)
  if not fits(backlog, tolerance) then
    return 0
  end
  local units = math.max(math.floor((tolerance + slack - backlog) / interval), 0)
  if units > 0 and not fits(backlog + units * interval, tolerance) then
    return units - 1
  end
  if fits(backlog + (units + 1) * interval, tolerance) then
    return units + 1
  end
  return units
end

-- Several dimensions may deny: report the one that takes longest to clear.
local denied, retry_after = '', 0
local function deny(dimension, after)
  if denied == '' or after > retry_after then
    denied, retry_after = dimension, after
  end
end

-- The caller timed out waiting for this very call and has already undone it: a late run
-- (e.g. queued behind a stall) must take nothing. Nobody reads this answer.
if redis.call('EXISTS', KEYS[3]) == 1 then
  deny('backend', 0)
end

local rates = {}
for i = 1, #KEYS - 3 do
  local at = first_rate + (i - 1) * 4
  local rate = {
    name = ARGV[at],
    interval = tonumber(ARGV[at + 1]),
    tolerance = tonumber(ARGV[at + 2]),
    cost = tonumber(ARGV[at + 3]),
  }
  local tat = tonumber(redis.call('GET', KEYS[i + 3])) or now
  rate.backlog = math.max(tat - now, 0)
  rate.after = rate.backlog + rate.cost * rate.interval
  if not fits(rate.after, rate.tolerance) then
    if fits(rate.cost * rate.interval, rate.tolerance) then
      deny(rate.name, rate.after - rate.tolerance)
    else
      deny(rate.name, math.huge)
    end
  end
  rates[i] = rate
end

redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if max_leases >= 0 and redis.call('ZCARD', KEYS[1]) >= max_leases then
  deny('concurrency', lease_retry)
end

local spent = 0
if budget >= 0 then
  local stored = redis.call('HMGET', KEYS[2], 'day', 'spent')
  if tonumber(stored[1]) == day then
    spent = tonumber(stored[2])
  end
  if usd_cost > budget then
    deny('usd', math.huge)
  elseif spent + usd_cost > budget then
    deny('usd', (day + 1) * day_seconds - now)
  end
end

if denied == '' then
  for i, rate in ipairs(rates) do
    rate.backlog = rate.after
    if rate.after > 0 then
      -- The key outlives its TAT by under a millisecond: an absent key is a full bucket.
      redis.call('SET', KEYS[i + 3], num(now + rate.after), 'PX', math.ceil(rate.after * 1000))
    end
  end
  redis.call('ZADD', KEYS[1], num(now + lease_ttl), lease_id)
  redis.call('PEXPIRE', KEYS[1], math.ceil(lease_ttl * 1000))
  if budget >= 0 then
    redis.call('HSET', KEYS[2], 'day', day, 'spent', spent + usd_cost)
    redis.call('EXPIRE', KEYS[2], 2 * day_seconds)
  end
end

local result = {denied == '' and 1 or 0, denied, num(retry_after), day}
for _, rate in ipairs(rates) do
  table.insert(result, num(remaining(rate.backlog, rate.interval, rate.tolerance)))
  table.insert(result, num(rate.backlog))
end
return result
