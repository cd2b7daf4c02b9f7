"""The Lua scripts of the shared gate: every change to the lease tables is one atomic script on the Redis server.

Keys of one upstream share the prefix ``gg:{<upstream>}`` (one hash tag, so one slot):

* ``:leases``   sorted set, member ``<replica>|<request>``, score = expiry in ms of the server's ``TIME``: the truth
* ``:info``     hash, member -> ``<lane>\\n<profile>\\n<tokens>`` (to keep the indexes right when a lease expires)
* ``:tokens``   the sum of the live leases' token needs (kept by ``put`` and ``unindex``; gone at 0)
* ``:lane:<l>`` and ``:prof:<p>``  sets of members: per-lane and per-profile indexes of ``:leases``
* ``:replicas`` sorted set, replica id -> heartbeat expiry (ms): who was alive lately
* ``:queued``   hash, replica id -> ``<requests waiting>|<expiry ms>`` (for the cluster-wide capacity view)
* ``:demand``   hash, replica id -> ``<priority>|<enqueued ms>|<lane>|<lane cap>|<expiry ms>``: its best waiter
* ``:waiting``  hash, replica id -> expiry ms: it has a request refused lately (any reason: cap, lane, profile)
* ``:epoch``    set once; missing means a fresh (restarted, empty) server
* ``:quiet``    for one lease after a fresh start: no new leases, only renewals, so that every replica re-registers
  what it holds before anyone is granted past it

Only the server's clock is read (``TIME``), never a replica's. A lease whose expiry passed is removed (from the
indexes too) by whichever script runs next. Release publishes on ``<prefix>:released`` to wake the waiters, and a
replica newly marked waiting too (``?<replica>``): replicas that keep idle leases (``pool.py``) give them back.
"""

from __future__ import annotations

OK, FULL, LANE_FULL, PROFILE_FULL, YIELD, QUIET, TOKENS = 1, 0, -1, -2, -3, -4, -5
ENDS = (FULL, YIELD, QUIET, TOKENS)  # the codes that end a call (its ask is published as the replica's demand)

_COMMON = r"""
local p = ARGV[1]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function boot(now, lease)
  if redis.call('EXISTS', p .. ':epoch') == 0 then
    redis.call('SET', p .. ':epoch', now)
    redis.call('SET', p .. ':quiet', '1', 'PX', lease)
  end
  return redis.call('EXISTS', p .. ':quiet')
end
local function add_tokens(delta)
  if delta ~= 0 and redis.call('INCRBY', p .. ':tokens', delta) == 0 then redis.call('DEL', p .. ':tokens') end
end
local function tokens_in_use()
  return tonumber(redis.call('GET', p .. ':tokens') or '0')
end
local function parse(info)  -- '<lane>\n<profile>' (a lease put by a version without token needs) counts 0
  local lane, profile, tokens = string.match(info, '^(.-)\n(.*)\n(%d+)$')
  if not lane then
    lane, profile = string.match(info, '^(.-)\n(.*)$')
    tokens = 0
  end
  return lane, profile, tonumber(tokens)
end
local function unindex(member)
  local info = redis.call('HGET', p .. ':info', member)
  if info then
    local lane, profile, tokens = parse(info)
    redis.call('SREM', p .. ':lane:' .. lane, member)
    redis.call('SREM', p .. ':prof:' .. profile, member)
    redis.call('HDEL', p .. ':info', member)
    add_tokens(-tokens)
  end
end
local function purge(now)
  local gone = redis.call('ZRANGEBYSCORE', p .. ':leases', '-inf', now)
  for _, member in ipairs(gone) do unindex(member) end
  if #gone > 0 then redis.call('ZREMRANGEBYSCORE', p .. ':leases', '-inf', now) end
  redis.call('ZREMRANGEBYSCORE', p .. ':replicas', '-inf', now)
end
local function put(member, lane, profile, tokens, expiry)  -- an upsert: a lease's tokens are counted once
  local old = redis.call('HGET', p .. ':info', member)
  local before = 0
  if old then
    local _lane, _profile, t = parse(old)
    before = t
  end
  add_tokens(tonumber(tokens) - before)
  redis.call('ZADD', p .. ':leases', expiry, member)
  redis.call('HSET', p .. ':info', member, lane .. '\n' .. profile .. '\n' .. tokens)
  redis.call('SADD', p .. ':lane:' .. lane, member)
  redis.call('SADD', p .. ':prof:' .. profile, member)
end
local function view(code)
  local out = {code, redis.call('ZCARD', p .. ':leases'), tokens_in_use()}
  local counts = {}
  for _, member in ipairs(redis.call('ZRANGE', p .. ':leases', 0, -1)) do
    local r = string.match(member, '^([^|]*)|')
    counts[r] = (counts[r] or 0) + 1
  end
  for _, r in ipairs(redis.call('ZRANGE', p .. ':replicas', 0, -1)) do
    if not counts[r] then counts[r] = 0 end
  end
  for r, c in pairs(counts) do out[#out + 1] = r; out[#out + 1] = c end
  return out
end
"""

# One round trip for what a replica has to say: the leases it gives back, then its waiting requests in rank order.
# ARGV: prefix, replica, channel, cap, lease_ms, aging_ms, demand_ttl_ms (0: publish no demand), n (releases),
#       n members to release, then per ask 9 values: member, lane, profile, lane_cap, profile_cap (-1: none),
#       priority, waited_ms, tokens (its need), budget (the upstream's max context tokens; -1: none).
# Each ask in turn: OK, or LANE_FULL / PROFILE_FULL (the next ask is tried), or FULL / YIELD / QUIET / TOKENS
# (the leases' tokens and its need would pass the budget, and some lease holds tokens: a request larger than the
# budget is granted alone), which end the call (that ask is published as the replica's demand). A replica with a
# refused ask (any code but OK) is also marked waiting (``:waiting``, for demand_ttl), announced on the channel as
# '?<replica>' when the mark is new, so that replicas keeping idle leases (pool.py) give them back. A release is
# announced as '<replica>'.
# -> {{codes...}, released, other replicas waiting, leases in total, their tokens, replica, count, ...}
SYNC = (
    _COMMON
    + r"""
local replica, channel = ARGV[2], ARGV[3]
local cap, lease, aging = tonumber(ARGV[4]), tonumber(ARGV[5]), math.max(1, tonumber(ARGV[6]))
local demand_ttl, n = tonumber(ARGV[7]), tonumber(ARGV[8])
local now = now_ms()
local released = 0
for i = 9, 8 + n do
  unindex(ARGV[i])
  released = released + redis.call('ZREM', p .. ':leases', ARGV[i])
end
if released > 0 then redis.call('PUBLISH', channel, replica) end
local codes = {}
local others = {}  -- other replicas' live demand: {rank, lane, lane cap}
local function reply(refused)
  local waiting = 0
  if demand_ttl > 0 then
    if refused then
      local old = redis.call('HGET', p .. ':waiting', replica)
      redis.call('HSET', p .. ':waiting', replica, now + demand_ttl)
      if not old or tonumber(old) <= now then redis.call('PUBLISH', channel, '?' .. replica) end
    else
      redis.call('HDEL', p .. ':waiting', replica)
    end
  end
  local marks = redis.call('HGETALL', p .. ':waiting')
  for i = 1, #marks, 2 do
    if tonumber(marks[i + 1]) <= now then
      redis.call('HDEL', p .. ':waiting', marks[i])
    elseif marks[i] ~= replica then
      waiting = waiting + 1
    end
  end
  local out = view(0)
  out[1] = codes
  table.insert(out, 2, released)
  table.insert(out, 3, waiting)
  return out
end
local function publish(at, code)
  codes[#codes + 1] = code
  if demand_ttl > 0 then
    local lane, lane_cap, priority, waited = ARGV[at + 1], ARGV[at + 3], ARGV[at + 5], tonumber(ARGV[at + 6])
    redis.call('HSET', p .. ':demand', replica,
      priority .. '|' .. (now - waited) .. '|' .. lane .. '|' .. lane_cap .. '|' .. (now + demand_ttl))
  end
  return reply(true)
end
local first = 9 + n
if boot(now, lease) == 1 then
  if #ARGV >= first then return publish(first, -4) end
  return reply(false)
end
purge(now)
local demand = redis.call('HGETALL', p .. ':demand')
for i = 1, #demand, 2 do
  if demand[i] ~= replica then
    local prio, enq, olane, olane_cap, expiry = string.match(demand[i + 1], '^(.-)|(.-)|(.*)|(.-)|(.-)$')
    if tonumber(expiry) <= now then
      redis.call('HDEL', p .. ':demand', demand[i])
    else
      others[#others + 1] = {tonumber(prio) - (now - tonumber(enq)) / aging, olane, tonumber(olane_cap)}
    end
  end
end
local full_lane, full_profile = {}, {}
for at = first, #ARGV, 9 do
  local member, lane, profile = ARGV[at], ARGV[at + 1], ARGV[at + 2]
  local lane_cap, profile_cap = tonumber(ARGV[at + 3]), tonumber(ARGV[at + 4])
  local mine = tonumber(ARGV[at + 5]) - tonumber(ARGV[at + 6]) / aging
  local need, budget = tonumber(ARGV[at + 7]), tonumber(ARGV[at + 8])
  if redis.call('ZSCORE', p .. ':leases', member) then
    put(member, lane, profile, need, now + lease)
    codes[#codes + 1] = 1
  elseif redis.call('ZCARD', p .. ':leases') >= cap then
    return publish(at, 0)
  elseif full_lane[lane] or redis.call('SCARD', p .. ':lane:' .. lane) >= lane_cap then
    full_lane[lane] = true
    codes[#codes + 1] = -1
  elseif full_profile[profile]
      or (profile_cap >= 0 and redis.call('SCARD', p .. ':prof:' .. profile) >= profile_cap) then
    full_profile[profile] = true
    codes[#codes + 1] = -2
  else
    for _, o in ipairs(others) do
      if o[1] < mine and redis.call('SCARD', p .. ':lane:' .. o[2]) < o[3] then return publish(at, -3) end
    end
    local held = tokens_in_use()
    if budget >= 0 and held > 0 and held + need > budget then return publish(at, -5) end
    put(member, lane, profile, need, now + lease)
    codes[#codes + 1] = 1
  end
end
if demand_ttl > 0 then redis.call('HDEL', p .. ':demand', replica) end  -- nobody left that a slot would serve
return reply(next(full_lane) ~= nil or next(full_profile) ~= nil)
"""
)

# ARGV: prefix, replica, lease_ms, recovering (1/0), queued (its requests waiting), then (member, lane, profile,
# tokens) quadruples: every lease the replica holds now, with its token need (a changed need replaces the old).
# Upserts them (a lease that expired, or that a restarted server lost, is put back: the request still runs) and
# records the heartbeat. A replica back from its fallback starts a quiet
# period (unless one runs), so that no lease is granted past the ones the others took in fallback before they too
# have put them back. -> {quiet (1/0), leases in total, their tokens, replica, count, ...}
RENEW = (
    _COMMON
    + r"""
local replica, lease = ARGV[2], tonumber(ARGV[3])
local now = now_ms()
if ARGV[4] == '1' then redis.call('SET', p .. ':quiet', '1', 'PX', lease, 'NX') end
local quiet = boot(now, lease)
purge(now)
for i = 6, #ARGV, 4 do put(ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], now + lease) end
redis.call('ZADD', p .. ':replicas', now + 3 * lease, replica)
redis.call('HSET', p .. ':queued', replica, ARGV[5] .. '|' .. (now + 3 * lease))
local out = view(quiet)
return out
"""
)

# ARGV: prefix, replica -> its demand and its waiting mark are withdrawn (it has nobody waiting)
CLEAR_DEMAND = r"""
redis.call('HDEL', ARGV[1] .. ':waiting', ARGV[2])
return redis.call('HDEL', ARGV[1] .. ':demand', ARGV[2])
"""

# ARGV: prefix -> {leases in total, {lane, count, ...}, {profile, count, ...}, {replica, queued, ...}, tokens}
GLOBAL_VIEW = (
    _COMMON
    + r"""
local now = now_ms()
purge(now)
local lanes, profiles = {}, {}
local seen_lane, seen_prof = {}, {}
for _, info in ipairs(redis.call('HVALS', p .. ':info')) do
  local lane, profile = parse(info)
  seen_lane[lane] = (seen_lane[lane] or 0) + 1
  seen_prof[profile] = (seen_prof[profile] or 0) + 1
end
for k, v in pairs(seen_lane) do lanes[#lanes + 1] = k; lanes[#lanes + 1] = v end
for k, v in pairs(seen_prof) do profiles[#profiles + 1] = k; profiles[#profiles + 1] = v end
local queued = {}
local q = redis.call('HGETALL', p .. ':queued')
for i = 1, #q, 2 do
  local n, expiry = string.match(q[i + 1], '^(.-)|(.*)$')
  if tonumber(expiry) <= now then
    redis.call('HDEL', p .. ':queued', q[i])
  else
    queued[#queued + 1] = q[i]; queued[#queued + 1] = tonumber(n)
  end
end
return {redis.call('ZCARD', p .. ':leases'), lanes, profiles, queued, tokens_in_use()}
"""
)
