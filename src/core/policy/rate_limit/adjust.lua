-- tollgate rate limits, v1: give back or charge more to token buckets once a request's real
-- usage is known (or it was refused after admission). Arithmetic as in admit.lua.
--
-- KEYS[i]: one bucket; ARGV[2i-1]: its limit; ARGV[2i]: what to add to its level (a negative
-- amount charges more than was reserved; the bucket may go into debt).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, #KEYS do
  local limit = tonumber(ARGV[2 * i - 1])
  local delta = tonumber(ARGV[2 * i])
  local s = redis.call('HMGET', KEYS[i], 'l', 'v', 'a')
  local v, a = limit, now
  if s[1] and s[2] and s[3] then
    v = tonumber(s[2]) + (limit - tonumber(s[1]))
    a = tonumber(s[3])
    local elapsed = now - a
    if elapsed < 0 then elapsed = 0 end
    v = math.min(limit, v + elapsed * limit / 60000)
    if now > a then a = now end
  end
  v = math.min(limit, v + delta)
  if v >= limit then
    redis.call('DEL', KEYS[i])
  else
    local full_in = math.min(math.ceil((limit - v) * 60000 / limit), 604800000)
    redis.call('HSET', KEYS[i], 'l', limit, 'v', v, 'a', a)
    redis.call('PEXPIRE', KEYS[i], full_in + 1000)
  end
end
return #KEYS
