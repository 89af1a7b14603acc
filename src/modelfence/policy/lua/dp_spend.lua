-- Spend epsilon from one client's differential-privacy budget, atomically.
-- KEYS[1]: the client's budget hash {window, spent}
-- ARGV[1]: epsilon to spend; ARGV[2]: budget per window; ARGV[3]: window length in seconds
-- Returns 1 when spent, 0 when the budget of the current window would be exceeded.
-- The window comes from Redis TIME, so replicas with skewed clocks agree.
local now = redis.call('TIME')
local length = tonumber(ARGV[3])
local window = math.floor((tonumber(now[1]) + tonumber(now[2]) / 1e6) / length)
local epsilon = tonumber(ARGV[1])
local state = redis.call('HMGET', KEYS[1], 'window', 'spent')
local spent = 0
if tonumber(state[1]) == window then
  spent = tonumber(state[2])
end
if spent + epsilon > tonumber(ARGV[2]) then
  return 0
end
redis.call('HSET', KEYS[1], 'window', window, 'spent', tostring(spent + epsilon))
redis.call('PEXPIRE', KEYS[1], math.ceil(length * 2000))
return 1
