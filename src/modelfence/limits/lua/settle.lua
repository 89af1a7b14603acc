-- Settle one lease on Redis time: free its concurrency slot and replace the reservations
-- with real usage. A lease already settled or expired is ignored, so a second settle
-- frees nothing and refunds nothing. Mirrors MemoryBackend._release and gcra.adjust.
--
-- Abandoning (ARGV[4] > 0) settles an admission whose answer was lost; when its lease is
-- not there, a marker makes admit.lua refuse that lease id should the call still run.
--
-- KEYS[1]  lease ZSET         KEYS[2]  dollars HASH {day, spent}
-- KEYS[3]  abandon marker of the lease id
-- KEYS[4]  tokens TAT string, only when tokens are limited
-- KEYS[n]  last, only when the lease charged an account: its HASH {r:<day>, t:<day>}
-- ARGV     lease id, lease day, dollars to add in µ$ ('' when unlimited; < 0 refunds),
--          marker lifetime ms (0: a plain settle, no marker),
--          tokens interval s ('' without the tokens TAT), tokens to add (< 0 refunds),
--          account rows to add ('' without an account; < 0 refunds), account tokens to
--          add, days of the long window, seconds per day, account HASH TTL s
-- Returns  1 if the lease was held, else 0

local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000

local expiry = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]))
if not expiry then
  local marker_ms = tonumber(ARGV[4])
  if marker_ms > 0 then
    redis.call('SET', KEYS[3], '1', 'PX', marker_ms)
  end
  return 0
end
redis.call('ZREM', KEYS[1], ARGV[1])
if expiry <= now then
  return 0
end

if ARGV[3] ~= '' then
  local stored = redis.call('HMGET', KEYS[2], 'day', 'spent')
  -- After midnight the reservation belongs to a closed day: leave today's count alone.
  if tonumber(stored[1]) == tonumber(ARGV[2]) then
    redis.call('HSET', KEYS[2], 'spent', math.max(tonumber(stored[2]) + tonumber(ARGV[3]), 0))
  end
end

if ARGV[5] ~= '' then
  local interval, units = tonumber(ARGV[5]), tonumber(ARGV[6])
  local tat = tonumber(redis.call('GET', KEYS[4])) or now
  local backlog = math.max(math.max(tat, now) + units * interval, now) - now
  if backlog > 0 then
    redis.call('SET', KEYS[4], string.format('%.17g', now + backlog), 'PX', math.ceil(backlog * 1000))
  else
    redis.call('DEL', KEYS[4])
  end
end

if ARGV[7] ~= '' then
  local account, day = KEYS[#KEYS], ARGV[2]
  local today = math.floor(now / tonumber(ARGV[10]))
  -- A day that has left the window counts no more: adjusting it would change nothing.
  if tonumber(day) > today - tonumber(ARGV[9]) then
    local deltas = {tonumber(ARGV[7]), tonumber(ARGV[8])}
    for i, counter in ipairs({'r', 't'}) do
      if deltas[i] ~= 0 then
        local field = counter .. ':' .. day
        local count = (tonumber(redis.call('HGET', account, field)) or 0) + deltas[i]
        redis.call('HSET', account, field, string.format('%.17g', math.max(count, 0)))
      end
    end
    redis.call('EXPIRE', account, tonumber(ARGV[11]))
  end
end
return 1
