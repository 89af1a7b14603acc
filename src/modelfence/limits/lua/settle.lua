-- Settle one lease on Redis time: free its concurrency slot and replace the reservations
-- with real usage. A lease already settled or expired is ignored, so a second settle
-- frees nothing and refunds nothing. Mirrors MemoryBackend.settle and gcra.adjust.
--
-- Abandoning (ARGV[4] > 0) settles an admission whose answer was lost; when its lease is
-- not there, a marker makes admit.lua refuse that lease id should the call still run.
--
-- KEYS[1]  lease ZSET         KEYS[2]  dollars HASH {day, spent}
-- KEYS[3]  abandon marker of the lease id
-- KEYS[4]  tokens TAT string, only when tokens are limited
-- ARGV     lease id, lease day, dollars to add in µ$ ('' when unlimited; < 0 refunds),
--          marker lifetime ms (0: a plain settle, no marker),
--          then with KEYS[4]: tokens interval s, tokens to add (< 0 refunds)
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

if KEYS[4] then
  local interval, units = tonumber(ARGV[5]), tonumber(ARGV[6])
  local tat = tonumber(redis.call('GET', KEYS[4])) or now
  local backlog = math.max(math.max(tat, now) + units * interval, now) - now
  if backlog > 0 then
    redis.call('SET', KEYS[4], string.format('%.17g', now + backlog), 'PX', math.ceil(backlog * 1000))
  else
    redis.call('DEL', KEYS[4])
  end
end
return 1
