-- One admission: every dimension decided atomically on Redis time; nothing is consumed
-- unless all pass. Mirrors limits/gcra.py (rates), limits/memory.py (leases, dollars) and
-- limits/dimensions.py (account allowances).
--
-- KEYS[1]   lease ZSET (member: lease id, score: expiry)
-- KEYS[2]   dollars HASH {day = UTC day number, spent = micro-dollars}
-- KEYS[3]   abandon marker of this lease id (set by settle.lua when the caller gave up)
-- KEYS[4..] one GCRA TAT string per rate dimension, in ARGV order
-- KEYS[n]   last, only with allowance windows: the account HASH {r:<day> = rows,
--           t:<day> = tokens}
-- ARGV      slack s, lease id, lease TTL s, max leases (-1: none), budget µ$ (-1: none),
--           cost µ$, retry s for a full lease set, seconds per day,
--           allowance windows (0: no account), rows to charge, tokens to charge,
--           days of the long window, account HASH TTL s, account fields before pruning,
--           then per rate dimension: name, interval s, tolerance s, cost units,
--           then per allowance window: name, days, limit
-- Returns   {allowed 0|1, denied dimension or '', retry_after, day,
--            account rows today, rows over the span read, tokens today, tokens over it
--            (the span: the longest window, so only today without a long one; 0s without
--            an account), then per rate dimension: remaining units, reset s}
-- Numbers travel as strings: Redis truncates Lua numbers in replies to integers, and one
-- past 2^63 (a limit beyond the configured maxima) would not survive that at all.

local slack = tonumber(ARGV[1])
local lease_id, lease_ttl = ARGV[2], tonumber(ARGV[3])
local max_leases, budget, usd_cost = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local lease_retry, day_seconds = tonumber(ARGV[7]), tonumber(ARGV[8])
local window_count = tonumber(ARGV[9])
local rows_cost, tokens_cost = tonumber(ARGV[10]), tonumber(ARGV[11])
local window_days, account_ttl = tonumber(ARGV[12]), tonumber(ARGV[13])
local max_fields = tonumber(ARGV[14])
local first_rate = 15
local rate_count = #KEYS - 3
local account = nil
if window_count > 0 then
  rate_count = rate_count - 1
  account = KEYS[#KEYS]
end

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
for i = 1, rate_count do
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

-- Daily counters of the account, oldest first, today last: only as many days as the
-- longest window needs (the HMGET of 60 fields only when a 30-day limit is set).
local span, rows, tokens = 1, {}, {}

-- Mirrors dimensions.allowance_wait: 0 if it fits, else until enough old days have left.
-- The window drops day d at the start of day d + days.
local function allowance_wait(window, used, cost)
  if cost > window.limit then
    return math.huge
  end
  local first = span - window.days + 1
  local excess = cost - window.limit
  for i = first, span do
    excess = excess + used[i]
  end
  if excess <= 0 then
    return 0
  end
  for i = first, span do
    excess = excess - used[i]
    if excess <= 0 then
      return (day - span + i + window.days) * day_seconds - now
    end
  end
end

if account then
  local windows = {}
  for i = 1, window_count do
    local at = first_rate + 4 * rate_count + (i - 1) * 3
    windows[i] = {name = ARGV[at], days = tonumber(ARGV[at + 1]), limit = tonumber(ARGV[at + 2])}
    span = math.max(span, windows[i].days)
  end
  local fields = {}
  for d = day - span + 1, day do
    table.insert(fields, 'r:' .. d)
    table.insert(fields, 't:' .. d)
  end
  local stored = redis.call('HMGET', account, unpack(fields))
  for i = 1, span do
    rows[i] = tonumber(stored[2 * i - 1]) or 0
    tokens[i] = tonumber(stored[2 * i]) or 0
  end
  for _, window in ipairs(windows) do
    local wait
    if window.name == 'account_rows' then
      wait = allowance_wait(window, rows, rows_cost)
    else
      wait = allowance_wait(window, tokens, tokens_cost)
    end
    if wait > 0 then
      deny(window.name, wait)
    end
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
  if account then
    rows[span] = rows[span] + rows_cost
    tokens[span] = tokens[span] + tokens_cost
    redis.call('HSET', account, 'r:' .. day, num(rows[span]), 't:' .. day, num(tokens[span]))
    redis.call('EXPIRE', account, account_ttl)
    -- The window holds two fields a day: past max_fields, some days have left it.
    if redis.call('HLEN', account) > max_fields then
      local oldest = day - window_days + 1
      for _, field in ipairs(redis.call('HKEYS', account)) do
        local stored_day = tonumber(string.sub(field, 3))
        if not stored_day or stored_day < oldest then
          redis.call('HDEL', account, field)
        end
      end
    end
  end
end

local function total(counts)
  local sum = 0
  for _, count in ipairs(counts) do
    sum = sum + count
  end
  return sum
end

local result = {
  denied == '' and 1 or 0, denied, num(retry_after), day,
  num(rows[span] or 0), num(total(rows)), num(tokens[span] or 0), num(total(tokens)),
}
for _, rate in ipairs(rates) do
  table.insert(result, num(remaining(rate.backlog, rate.interval, rate.tolerance)))
  table.insert(result, num(rate.backlog))
end
return result
