-- charge.lua: decide and deduct one metered call, atomically.
--
-- Every key belongs to one account and shares its shard's hash tag, so the
-- script touches a single Redis Cluster slot.
--
-- KEYS[1]  account hash   {tag}:acct:<user>   fields: plan monthly bonus period day used blocked
-- KEYS[2]  key-hash set   {tag}:keys:<user>   sha256 hex of every live API key
-- KEYS[3]  idempotency record: {tag}:req:<user>:<request id> (credits API, a string
--          "from_monthly,from_bonus,day,period,module,action") or
--          {tag}:idem:<user>:<Idempotency-Key> (proxy, a hash: split (the same
--          string), fp request fingerprint, st p|d|x, lease (unix ms), rid the
--          original request id, ev its charge event id, status hdrs body)
-- KEYS[5]  rate counter   {tag}:rl:<user>:<minute>   calls this minute (TTL 61 s)
-- KEYS[4]  usage stream   {tag}:events        one entry per balance change: one
--          field "v", a JSON object (one field to parse, not eighteen) with
--          e event id, u user, k kind (charge|reset), p plan, m module, a action,
--          n amount, fm/fb taken from monthly/bonus, mb/bb monthly/bonus after,
--          ap/ad/au account period/day/day-used after, r request id, by actor,
--          t unix ms, d local day the amount counts for
--
-- ARGV[1]  key hash, or "" when the caller is already trusted (X-User-ID, service API)
-- ARGV[2]  module id
-- ARGV[3]  action ("" for none)
-- ARGV[4]  cost in credits (integer >= 0)
-- ARGV[5]  plans that include the module, comma-delimited on both ends: ",free,pro,"
-- ARGV[6]  plan table, ";<plan>:<daily limit or -1>:<monthly credits>:<calls per minute or -1>;"
-- ARGV[7]  local calendar day "YYYY-MM-DD" (server.timezone)
-- ARGV[8]  local billing period "YYYY-MM"
-- ARGV[9]  now, unix milliseconds
-- ARGV[10] event id (uuid) for the charge event; a rollover reset uses it + ":reset"
-- ARGV[11] request id
-- ARGV[12] idempotency: "0" none; "1" credits API request id (a repeat is a
--          "duplicate", charged 0); "2" proxy Idempotency-Key (a repeat is never
--          forwarded: replayed, in progress, reused or not replayable)
-- ARGV[13] request record TTL in seconds
-- ARGV[14] user id (copied into events)
-- ARGV[15] actor (who caused the charge: "proxy", "service:<name>")
-- ARGV[16] mode: "charge" deducts; "check" answers the same question and writes nothing
-- ARGV[18] seconds left in the current minute (Retry-After when rate limited)
-- ARGV[17] "1" when the auto-block policy is on: a charge that leaves the
--          account at 0 credits marks it blocked="exhausted" until the next
--          period or until credits come back (grant, refund)
-- ARGV[19] request fingerprint (mode "2"): hash of method, module, path, query
-- ARGV[20] lease end, unix ms (mode "2"): until then a pending first call is
--          "in progress"; after it, the gateway that owned it is presumed dead
-- ARGV[21] deadline on Redis's own clock, unix ms ("0": none): past it the
--          gateway has already answered 503 "nothing was charged", so a
--          script that only runs now (Redis paused, stalled, slow) must not
--
-- Returns (integers unless noted):
--   {"ok", charged, monthly, bonus, day_used, daily_limit, from_monthly, from_bonus, plan, auto_blocked}
--   {"duplicate", 0, monthly, bonus, day_used, daily_limit, plan}
--   {"replay", rid, status, headers, body, monthly, bonus, day_used, daily_limit, plan}
--                               mode "2": the first call completed; its response
--   {"in_progress", rid}        mode "2": the first call has not completed yet
--   {"key_reused", rid}         mode "2": the key was used for another request
--   {"not_replayable", rid}     mode "2": completed, but its response was too long
--                               to keep (or never finished streaming)
--   {"missing"}                 account not in Redis: rebuild from Postgres, then retry
--   {"expired"}                 ran after ARGV[21]: nothing written
--   {"unknown_key"}             key revoked (not in the key set)
--   {"blocked"}
--   {"not_in_plan"}             also when the account's plan left the configuration
--   {"rate_limited", retry_after_secs}   the plan's calls-per-minute are used up
--   {"daily_limit", monthly, bonus, day_used, daily_limit}
--   {"insufficient", monthly, bonus, day_used, daily_limit}
-- daily_limit is -1 when the plan has none. In "check" mode "ok" means the
-- call would be charged; nothing is written.

local acct = KEYS[1]
local check_only = ARGV[16] == 'check'

if ARGV[21] ~= '0' then
  local t = redis.call('TIME')
  if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) > tonumber(ARGV[21]) then
    return {'expired'}
  end
end

if redis.call('EXISTS', acct) == 0 then
  return {'missing'}
end
if ARGV[1] ~= '' and redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 0 then
  return {'unknown_key'}
end

local f = redis.call('HMGET', acct, 'plan', 'monthly', 'bonus', 'period', 'day', 'used', 'blocked')
local plan = f[1] or ''
local monthly = tonumber(f[2]) or 0
local bonus = tonumber(f[3]) or 0
local period = f[4] or ''
local day = f[5] or ''
local used = tonumber(f[6]) or 0

if f[7] == '1' then
  return {'blocked'}
end
if f[7] == 'exhausted' then
  if period == ARGV[8] and monthly + bonus <= 0 then
    return {'blocked'}
  end
  -- A new period or returned credits lift the policy block by themselves.
  if not check_only then
    redis.call('HSET', acct, 'blocked', '0')
  end
end

local limit_s, allowance_s, rpm_s = string.match(ARGV[6], ';' .. plan .. ':(%-?%d+):(%d+):(%-?%d+);')
if not limit_s or not string.find(ARGV[5], ',' .. plan .. ',', 1, true) then
  return {'not_in_plan'}
end
local limit = tonumber(limit_s)

-- Per-plan rate limit: a fixed one-minute window per account, counted here
-- so every gateway instance shares it. Every attempt counts.
local rpm = tonumber(rpm_s)
if rpm >= 0 and not check_only then
  local calls = redis.call('INCR', KEYS[5])
  if calls == 1 then
    redis.call('EXPIRE', KEYS[5], 61)
  end
  if calls > rpm then
    return {'rate_limited', tonumber(ARGV[18])}
  end
end

-- Every event carries the account's full state after it (mb bb ap ad au),
-- so the ledger can rebuild an account and replay its balance chain.
local function event(kind, id, amount, from_monthly, from_bonus, module, action)
  redis.call('XADD', KEYS[4], '*', 'v', cjson.encode({
    e = id, u = ARGV[14], k = kind, p = plan, m = module, a = action,
    n = amount, fm = from_monthly, fb = from_bonus,
    mb = monthly, bb = bonus, ap = ARGV[8], ad = ARGV[7], au = used,
    r = ARGV[11], by = ARGV[15], t = tonumber(ARGV[9]), d = ARGV[7]}))
end

-- Lazy rollovers: a missed cron or an idle account still starts the new
-- period and the new day on its first call.
local new_period = period ~= ARGV[8]
if new_period then
  monthly = tonumber(allowance_s)
end
if day ~= ARGV[7] then
  used = 0
end
if not check_only and (new_period or day ~= ARGV[7]) then
  redis.call('HSET', acct, 'monthly', monthly, 'period', ARGV[8], 'used', used, 'day', ARGV[7])
  if new_period then
    event('reset', ARGV[10] .. ':reset', monthly, 0, 0, '', '')
  end
end

if ARGV[12] == '1' and redis.call('EXISTS', KEYS[3]) == 1 then
  return {'duplicate', 0, monthly, bonus, used, limit, plan}
end
if ARGV[12] == '2' then
  local r = redis.call('HMGET', KEYS[3], 'fp', 'st', 'lease', 'rid', 'status', 'hdrs', 'body')
  if r[1] then
    local rid = r[4] or ''
    if r[1] ~= ARGV[19] then
      return {'key_reused', rid}
    end
    if r[2] == 'd' then
      return {'replay', rid, tonumber(r[5]) or 200, r[6] or '', r[7] or '', monthly, bonus, used, limit, plan}
    end
    if r[2] == 'p' and (tonumber(r[3]) or 0) > tonumber(ARGV[9]) then
      return {'in_progress', rid}
    end
    return {'not_replayable', rid}
  end
end

local cost = tonumber(ARGV[4])
if limit >= 0 and used + cost > limit then
  return {'daily_limit', monthly, bonus, used, limit}
end
if monthly + bonus < cost then
  return {'insufficient', monthly, bonus, used, limit}
end

local from_monthly = math.min(monthly, cost)
local from_bonus = cost - from_monthly
if check_only then
  return {'ok', cost, monthly - from_monthly, bonus - from_bonus, used + cost, limit, from_monthly, from_bonus, plan, 0}
end

monthly = monthly - from_monthly
bonus = bonus - from_bonus
used = used + cost
redis.call('HSET', acct, 'monthly', monthly, 'bonus', bonus, 'used', used)
-- What refund.lua needs to give this exact charge back, and only once.
local split = from_monthly .. ',' .. from_bonus .. ',' .. ARGV[7] .. ',' .. ARGV[8] .. ',' .. ARGV[2] .. ',' .. ARGV[3]
if ARGV[12] == '1' then
  redis.call('SET', KEYS[3], split, 'EX', ARGV[13])
elseif ARGV[12] == '2' then
  redis.call('HSET', KEYS[3], 'split', split, 'fp', ARGV[19], 'st', 'p', 'lease', ARGV[20],
    'rid', ARGV[11], 'ev', ARGV[10])
  redis.call('EXPIRE', KEYS[3], ARGV[13])
end
event('charge', ARGV[10], cost, from_monthly, from_bonus, ARGV[2], ARGV[3])
local auto_blocked = 0
if ARGV[17] == '1' and monthly + bonus <= 0 then
  redis.call('HSET', acct, 'blocked', 'exhausted')
  auto_blocked = 1
end
return {'ok', cost, monthly, bonus, used, limit, from_monthly, from_bonus, plan, auto_blocked}
