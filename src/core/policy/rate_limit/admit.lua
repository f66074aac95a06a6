-- tollgate rate limits, v1 (keys PREFIX:rl:v1:...): check one request against token buckets
-- and take its amounts from every one of them, all or none. The same arithmetic as the local
-- backend (src/core/policy/rate_limit/local.rs): a bucket holds one minute's allowance and
-- refills at limit / 60 s; a changed limit keeps what was used.
--
-- KEYS[i]: one bucket (a hash: l = limit, v = level, a = last refill, Redis ms).
-- ARGV[2i-1]: its limit; ARGV[2i]: what the request takes from it (1 request, or its tokens).
-- Returns {admitted (1|0), index of the bucket that refused (0), its wait in ms,
--          then per bucket: floor(level), ms until full}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = #KEYS
local level, at, lim = {}, {}, {}
local worst, worst_wait = 0, 0
for i = 1, n do
  local limit = tonumber(ARGV[2 * i - 1])
  local take = tonumber(ARGV[2 * i])
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
  level[i], at[i], lim[i] = v, a, limit
  local need = math.min(take, limit)
  if v < need then
    local wait = math.ceil((need - v) * 60000 / limit)
    if wait > worst_wait then
      worst, worst_wait = i, wait
    end
  end
end
local admitted = worst == 0
local out = {admitted and 1 or 0, worst, worst_wait}
for i = 1, n do
  local v = level[i]
  local full_in = 0
  if admitted then
    v = v - tonumber(ARGV[2 * i])
    full_in = math.min(math.ceil((lim[i] - v) * 60000 / lim[i]), 604800000)
    redis.call('HSET', KEYS[i], 'l', lim[i], 'v', v, 'a', at[i])
    -- A bucket full again is the same as none: idle scopes leave nothing behind.
    redis.call('PEXPIRE', KEYS[i], full_in + 1000)
  else
    full_in = math.min(math.ceil((lim[i] - v) * 60000 / lim[i]), 604800000)
  end
  out[#out + 1] = math.floor(math.max(v, -1e15))
  out[#out + 1] = full_in
end
return out
