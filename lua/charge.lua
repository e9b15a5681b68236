-- charge.lua: decide and deduct metered calls, atomically, in order.
--
-- One call carries one or more charges of one shard: the gateway groups the
-- charges that arrive while the shard's previous call is in Redis (group
-- commit), so under load many charges share one script call; alone, a
-- charge is a call of one. Charges run one after the other, each against
-- the state the previous ones left, exactly as separate calls would.
--
-- Every key of an account shares its shard's hash tag, and a call holds
-- charges of one shard only, so the script touches a single Redis Cluster
-- slot.
--
-- KEYS[1]  the shard's usage stream {tag}:events: one entry per call, one
--          field "rows", the call's events one per line, each nineteen
--          tab-separated fields: e event id, k kind (charge|reset), p plan,
--          m module, a action, n amount, fm/fb taken from monthly/bonus,
--          mb/bb monthly/bonus after, au account day-used after, why
--          reason (empty), then the charge's shared tail (ARGV +15): u user,
--          r request id, by actor, t unix ms, d local day the amount counts
--          for, ap/ad account period/day after. Text the gateway cannot
--          vouch for arrives escaped as COPY text is (\\ \t \n \r); ids of
--          plans, modules and actions are configuration identifiers.
-- then three per charge (charge i uses KEYS[1 + 3(i-1) + n]):
--   +1 account hash   {tag}:acct:<user>   fields: plan monthly bonus period day used blocked,
--                     tat (the rate limit's theoretical arrival time, unix us),
--                     rn (the latest now a call the rate limit served was
--                     decided at, unix us)
--   +2 live keys      {tag}:apikeys:<user>   hash: sha256 hex of each live API key ->
--                     "<expires unix ms>|<,module,...,>", either part empty (no
--                     expiry, every module of the plan)
--   +3 idempotency record: {tag}:req:<user>:<request id> (credits API, a string
--      "from_monthly,from_bonus,day,period,module,action,event id", then
--      ",told" once a repeat was answered "duplicate") or
--      {tag}:idem:<user>:<Idempotency-Key> (proxy, a hash: split (the same
--      string), fp request fingerprint, st p|d|x, lease (unix ms), rid the
--      original request id, ev its charge event id, status hdrs body);
--      for a "lease:" mode, the shard's lease index {tag}:leases (a sorted
--      set: "<user> <lease id>" scored by the lease's end on Redis's clock,
--      unix ms); any key of the slot (the account's) otherwise
--
-- ARGV[1]  plan table, ";<plan>:<daily limit or -1>:<monthly credits>:<calls per minute or -1>:<burst>;"
-- ARGV[2]  idempotency record TTL in seconds
-- ARGV[3]  "1" when the auto-block policy is on: a charge that leaves the
--          account at 0 credits marks it blocked="exhausted" until the next
--          period or until credits come back (grant, refund)
-- ARGV[4]  the call's deadline on Redis's own clock, unix ms ("0": none):
--          the earliest of its charges'. Past it the gateway has already
--          answered 503 "nothing was charged" to that caller, so a call that
--          only runs now (Redis paused, stalled, slow) must not charge
-- then fifteen per charge (charge i uses ARGV[4 + 15(i-1) + n]):
--   +1  key hash, or "" when the caller is already trusted (X-User-ID, service API)
--   +2  module id
--   +3  action ("" for none)
--   +4  cost in credits (integer >= 0)
--   +5  plans that include the module, comma-delimited on both ends: ",free,pro,"
--   +6  local calendar day "YYYY-MM-DD" (server.timezone)
--   +7  local billing period "YYYY-MM"
--   +8  now, unix milliseconds
--   +9  event id (uuid) for the charge event; a rollover reset uses it + ":reset"
--   +10 request id
--   +11 idempotency: "0" none; "1" credits API request id (a repeat is a
--       "duplicate", charged 0); "2" proxy Idempotency-Key (a repeat is never
--       forwarded: replayed, in progress, reused or not replayable)
--   +12 mode: "charge" deducts; "check" answers the same question and writes nothing;
--       "lease:<credits>:<least>:<room>:<ttl ms>" deducts and also takes
--       the largest lease of at most <credits> (a multiple of the cost, and
--       not under <least>) that leaves the account <room> times its size of
--       its balance and of its daily limit after the charge (docs/LEASES.md): moved from
--       the balance and the day counter into the account hash's field
--       "lease:<lease id>" = "<credits>,<from monthly>,<from bonus>,<day>,<period>",
--       indexed in +3, with a "lease" event. Never for idempotent charges or
--       plans with a rate limit. The lease id is the charge's event id .. ":lease".
--   +13 request fingerprint (idempotency "2"): hash of method, module, path, query
--   +14 lease end, unix ms (idempotency "2"): until then a pending first call
--       is "in progress"; after it, the gateway that owned it is presumed dead
--   +15 the fields every event of this charge ends with, tab-separated and
--       escaped by the gateway: user, request id, actor, now, day, period, day
--
-- Events are written by concatenation, never cjson, and numbers reach
-- Redis as strings formatted with %d: cjson's table and encoder, and the
-- %.17g of a Lua number passed to redis.call, were about 45 % of the
-- script's instructions (bench/redis_charge_cost.py INSTRUCTIONS=1). Rows
-- rather than JSON: the flusher splits a line where it parsed an object.
--
-- Returns one reply per charge, in order (integers unless noted):
--   "ok <charged> <monthly> <bonus> <day_used> <daily_limit> <from_monthly> <from_bonus> <auto_blocked>
--       <rate_remaining> <rate_reset_ms> <plan>[ <lease credits> <lease from monthly> <lease from bonus>]
--       [ @<day>/<period>]"
--                               one string, space-separated (the plan last
--                               unless a lease was taken); the balances are
--                               after the lease; "@day/period" only when the
--                               call counted in a later day or period than its
--                               stamp's (the account's, see below);
--                               rate_remaining: calls the rate limit lets through
--                               right now after this one, rate_reset_ms: until
--                               its whole burst is back (both -1: no limit)
--   {"duplicate", 0, monthly, bonus, day_used, daily_limit, plan}
--   {"replay", rid, status, headers, body, monthly, bonus, day_used, daily_limit, plan}
--                               idempotency "2": the first call completed; its response
--   {"in_progress", rid}        idempotency "2": the first call has not completed yet
--   {"key_reused", rid}         idempotency "2": the key was used for another request
--   {"not_replayable", rid}     idempotency "2": completed, but its response was too
--                               long to keep (or never finished streaming)
--   {"missing"}                 account not in Redis: rebuild from Postgres, then retry
--   {"expired"}                 ran after its deadline: nothing written
--   {"unknown_key"}             key revoked (not among the live keys)
--   {"key_expired"}             the key's expiry has passed
--   {"key_scope"}               the key is limited to other modules
--   {"blocked"}
--   {"not_in_plan"}             also when the account's plan left the configuration
--   {"rate_limited", wait_ms}   the plan's rate limit: the next call fits in wait_ms
--   {"daily_limit", monthly, bonus, day_used, daily_limit}
--   {"insufficient", monthly, bonus, day_used, daily_limit}
--   {"error", message}          this charge failed in Redis; the others stand
-- daily_limit is -1 when the plan has none. In "check" mode "ok" means the
-- call would be charged, its balances are the account's as it is (before
-- the call), and nothing is written.

local PER_CHARGE = 15
local stream = KEYS[1]
local auto_block = ARGV[3] == '1'
local deadline = tonumber(ARGV[4])
local expired -- decided once per call, on Redis's clock
-- The call's events, appended as one stream entry at the end: one XADD per
-- call instead of one per charge (and one entry for the flusher to read,
-- acknowledge and delete).
local events = {}

-- Plans parsed from ARGV[1] on first use, once per call, then looked up
-- by name (and never used as a pattern).
local plans
local function plan_of(name)
  if not plans then
    plans = {}
    for id, limit, allowance, rpm, burst in string.gmatch(ARGV[1], ';([^;:]+):(%-?%d+):(%d+):(%-?%d+):(%d+)') do
      local p = {limit = tonumber(limit), limit_s = limit, allowance = allowance, needle = ',' .. id .. ','}
      if tonumber(rpm) > 0 then
        -- Whole microseconds: every sum below stays an exact integer
        -- (unix us are under 2^53). Rounding the interval moves a rate of
        -- 7 a minute by under a microsecond a minute.
        p.interval = math.floor(60000000 / tonumber(rpm) + 0.5)
        p.tolerance = p.interval * (tonumber(burst) - 1)
      end
      plans[id] = p
    end
  end
  return plans[name]
end

local function int(n)
  return string.format('%d', n)
end

-- The common answer as one string: the gateway's RESP parser pays per
-- value, and eleven values per charge were most of its cost of reading a
-- call's replies (bench/gateway_instructions.sh). Built from strings: a
-- made charge passes those it already formatted for its HSET and its
-- event, as string.format's eight %d were 11.6k of a charge's 91k
-- instructions (bench/redis_charge_cost.py INSTRUCTIONS=1).
local function ok_reply(cost_s, mb, bb, au, limit_s, fm, fb, auto_blocked, rate_remaining, rate_reset, plan)
  local head = 'ok ' .. cost_s .. ' ' .. mb .. ' ' .. bb .. ' ' .. au .. ' ' .. limit_s .. ' ' .. fm .. ' ' .. fb ..
    ' ' .. auto_blocked .. ' '
  if rate_remaining < 0 then
    -- No rate limit: constants, not two more numbers to format.
    return head .. '-1 -1 ' .. plan
  end
  return head .. string.format('%d %d ', rate_remaining, rate_reset) .. plan
end

local function charge(k, a)
  local acct, live_keys, record = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  local key_hash, module, action, cost_s, allowed, today, this_period, now_ms, event_id,
        request_id, idempotency, mode, fingerprint, lease, common =
    unpack(ARGV, a + 1, a + PER_CHARGE)
  local check_only = mode == 'check'
  local lease_want, lease_least, lease_room, lease_ttl
  if idempotency == '0' and string.byte(mode, 1) == 108 then -- 'l'
    lease_want, lease_least, lease_room, lease_ttl = string.match(mode, '^lease:(%d+):(%d+):(%d+):(%d+)$')
  end

  if expired then
    return {'expired'}
  end

  -- Every account hash has a plan: no plan is no account (one command
  -- fewer than EXISTS first: -0.3 us per charge, bench/redis_charge_cost.py).
  local f = redis.call('HMGET', acct, 'plan', 'monthly', 'bonus', 'period', 'day', 'used', 'blocked', 'tat', 'rn')
  if not f[1] then
    return {'missing'}
  end
  if key_hash ~= '' then
    -- A key Redis does not hold is revoked, or an account mirrored before
    -- keys had details: the gateway asks Postgres and mirrors it again.
    local details = redis.call('HGET', live_keys, key_hash)
    if not details then
      return {'unknown_key'}
    end
    if details ~= '|' then
      local expires, scope = string.match(details, '^(%d*)|(.*)$')
      if expires ~= '' and tonumber(expires) <= tonumber(now_ms) then
        return {'key_expired'}
      end
      if scope ~= '' and not string.find(scope, ',' .. module .. ',', 1, true) then
        return {'key_scope'}
      end
    end
  end
  local plan = f[1]
  local monthly = tonumber(f[2]) or 0
  local bonus = tonumber(f[3]) or 0
  local period = f[4] or ''
  local day = f[5] or ''
  local used = tonumber(f[6]) or 0
  -- A call stamped before the account's period or day, decided after one
  -- stamped later (two workers' batches, two gateways, a clock a little
  -- ahead), counts in the account's period and day: rolling the account
  -- back would start the old period again (the allowance refilled, a
  -- "reset" event) or zero the day's count, and the next call would do it
  -- once more. Dates as text sort in time order ("YYYY-MM", "YYYY-MM-DD").
  local moved = ''
  if period > this_period or day > today then
    if period > this_period then
      this_period = period
    end
    if day > today then
      today = day
    end
    -- The rows' last three fields: the day it counts for, period and day after.
    common = string.match(common, '^(.*)\t[^\t]*\t[^\t]*\t[^\t]*$') .. '\t' .. today .. '\t' ..
      this_period .. '\t' .. today
    -- The answer says so: a refund of this call gives its credits back to
    -- the day and period it counted in, not to its stamp's.
    moved = ' @' .. today .. '/' .. this_period
  end

  if f[7] == '1' then
    return {'blocked'}
  end
  if f[7] == 'exhausted' then
    if period == this_period and monthly + bonus <= 0 then
      return {'blocked'}
    end
    -- A new period or returned credits lift the policy block by themselves.
    if not check_only then
      redis.call('HSET', acct, 'blocked', '0')
    end
  end

  local p = plan_of(plan)
  if not p or not string.find(allowed, p.needle, 1, true) then
    return {'not_in_plan'}
  end
  local limit = p.limit

  -- Per-plan rate limit: GCRA, as redis-cell, per account and so shared
  -- by every instance. The account's theoretical arrival time (tat) moves
  -- one interval (60 s / rate) per call served; a call fits while tat is
  -- at most `tolerance` ahead of now, so `burst` calls pass at once and
  -- then one per interval, and no window boundary lets twice the rate
  -- through. Only a charged call moves tat: a refused one (by this limit
  -- or any other) costs nothing. Decided here, written with the charge,
  -- in the account hash: no command of its own (a key apart, read and
  -- written, cost 30 % more per charge, bench/redis_charge_cost.py). A
  -- tat in the past is a full burst, so an account rebuilt without one
  -- starts full. Calls are decided in the order Redis runs them, which is
  -- not their stamps' order (two workers' batches, two gateways): a call
  -- stamped before the last one served counts as arriving with it (rn).
  -- Otherwise it found tat moved by calls stamped after it and was refused
  -- inside the burst (30 parallel calls against a burst of 5 once let 4
  -- through).
  local tat_after, rate_remaining, rate_reset = nil, -1, -1
  local now
  if p.interval then
    now = math.max(tonumber(now_ms) * 1000, tonumber(f[9]) or 0)
    local tat = math.max(tonumber(f[8]) or now, now)
    local wait = tat - p.tolerance - now
    if wait > 0 then
      return {'rate_limited', math.ceil(wait / 1000)}
    end
    tat_after = tat + p.interval
    -- (never below 0 for a call that fits, as tat - now <= tolerance; the
    -- guard keeps -1 meaning "no limit" and nothing else)
    rate_remaining = math.max(0, math.floor((p.tolerance - (tat_after - now)) / p.interval) + 1)
    rate_reset = math.ceil((tat_after - now) / 1000)
  end

  -- Lazy rollovers: a missed cron or an idle account still starts the new
  -- period and the new day on its first call. Every event carries the
  -- account's full state after it (mb bb ap ad au), so the ledger can
  -- rebuild an account and replay its balance chain.
  local new_period = period ~= this_period
  if new_period then
    monthly = tonumber(p.allowance)
  end
  if day ~= today then
    used = 0
  end
  if not check_only and (new_period or day ~= today) then
    redis.call('HSET', acct, 'monthly', int(monthly), 'period', this_period, 'used', int(used), 'day', today)
    if new_period then
      events[#events + 1] = event_id .. ':reset\treset\t' .. plan .. '\t\t\t' .. p.allowance .. '\t0\t0\t' ..
        p.allowance .. '\t' .. int(bonus) .. '\t' .. int(used) .. '\t\t' .. common
    end
  end

  if idempotency == '1' then
    local rec = redis.call('GET', record)
    if rec then
      -- The caller now knows it was charged: a charge whose first answer
      -- was lost stays (refund.lua's "void_record" reads this).
      if not check_only and string.sub(rec, -5) ~= ',told' then
        redis.call('SET', record, rec .. ',told', 'KEEPTTL')
      end
      return {'duplicate', 0, monthly, bonus, used, limit, plan}
    end
  end
  if idempotency == '2' then
    local r = redis.call('HMGET', record, 'fp', 'st', 'lease', 'rid', 'status', 'hdrs', 'body')
    if r[1] then
      local rid = r[4] or ''
      if r[1] ~= fingerprint then
        return {'key_reused', rid}
      end
      if r[2] == 'd' then
        return {'replay', rid, tonumber(r[5]) or 200, r[6] or '', r[7] or '', monthly, bonus, used, limit, plan}
      end
      if r[2] == 'p' and (tonumber(r[3]) or 0) > tonumber(now_ms) then
        return {'in_progress', rid}
      end
      return {'not_replayable', rid}
    end
  end

  local cost = tonumber(cost_s)
  if limit >= 0 and used + cost > limit then
    return {'daily_limit', monthly, bonus, used, limit}
  end
  if monthly + bonus < cost then
    return {'insufficient', monthly, bonus, used, limit}
  end

  local from_monthly = math.min(monthly, cost)
  local from_bonus = cost - from_monthly
  if check_only then
    return ok_reply(cost_s, int(monthly), int(bonus), int(used), p.limit_s, int(from_monthly), int(from_bonus),
      '0', rate_remaining, rate_reset, plan) .. moved
  end

  monthly = monthly - from_monthly
  bonus = bonus - from_bonus
  used = used + cost
  local fm, fb = cost_s, '0'
  local mb, au = int(monthly), int(used)
  local bb
  if from_bonus == 0 then
    bb = f[3] or '0'
    if tat_after then
      redis.call('HSET', acct, 'monthly', mb, 'used', au, 'tat', int(tat_after), 'rn', int(now))
    else
      redis.call('HSET', acct, 'monthly', mb, 'used', au)
    end
  else
    fm, fb, bb = int(from_monthly), int(from_bonus), int(bonus)
    if tat_after then
      redis.call('HSET', acct, 'monthly', mb, 'bonus', bb, 'used', au, 'tat', int(tat_after), 'rn', int(now))
    else
      redis.call('HSET', acct, 'monthly', mb, 'bonus', bb, 'used', au)
    end
  end
  if idempotency ~= '0' then
    -- What refund.lua needs to give this exact charge back, and only once.
    local split = fm .. ',' .. fb .. ',' .. today .. ',' .. this_period .. ',' .. module .. ',' .. action
    if idempotency == '1' then
      redis.call('SET', record, split .. ',' .. event_id, 'EX', ARGV[2])
    else
      redis.call('HSET', record, 'split', split, 'fp', fingerprint, 'st', 'p', 'lease', lease,
        'rid', request_id, 'ev', event_id)
      redis.call('EXPIRE', record, ARGV[2])
    end
  end
  events[#events + 1] = event_id .. '\tcharge\t' .. plan .. '\t' .. module .. '\t' .. action .. '\t' ..
    cost_s .. '\t' .. fm .. '\t' .. fb .. '\t' .. mb .. '\t' .. bb .. '\t' .. au .. '\t\t' .. common
  local auto_blocked = '0'
  if auto_block and monthly + bonus <= 0 then
    redis.call('HSET', acct, 'blocked', 'exhausted')
    auto_blocked = '1'
  end
  local leased = ''
  if lease_want and not p.interval then
    -- Far from every limit only: near one, each call is decided here, so
    -- the exactness at the edge is the plain charge's. The charge's event
    -- (above) keeps the balance after the charge, the lease's the balance
    -- after the lease: each one's change, in order, for the ledger's chain.
    -- The gateway asks for what its rate would spend in a lease's life;
    -- closer to a limit, a smaller one, and none under <least>.
    local left = monthly + bonus
    if limit >= 0 then
      left = math.min(left, limit - used)
    end
    local want = math.min(tonumber(lease_want), math.floor(left / math.max(tonumber(lease_room), 1)))
    if cost > 0 then
      want = want - want % cost
    end
    if cost > 0 and want > 0 and want >= tonumber(lease_least) then
      local lfm = math.min(monthly, want)
      local lfb = want - lfm
      monthly = monthly - lfm
      bonus = bonus - lfb
      used = used + want
      mb, bb, au = int(monthly), int(bonus), int(used)
      local lease_id = event_id .. ':lease'
      redis.call('HSET', acct, 'monthly', mb, 'bonus', bb, 'used', au,
        'lease:' .. lease_id, int(want) .. ',' .. int(lfm) .. ',' .. int(lfb) .. ',' .. today .. ',' .. this_period)
      local t = redis.call('TIME')
      local until_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(lease_ttl)
      redis.call('ZADD', record, until_ms, string.match(acct, ':acct:(.*)$') .. ' ' .. lease_id)
      events[#events + 1] = lease_id .. '\tlease\t' .. plan .. '\t' .. module .. '\t\t' .. int(want) .. '\t' ..
        int(lfm) .. '\t' .. int(lfb) .. '\t' .. mb .. '\t' .. bb .. '\t' .. au .. '\t\t' .. common
      leased = ' ' .. int(want) .. ' ' .. int(lfm) .. ' ' .. int(lfb)
    end
  end
  return ok_reply(cost_s, mb, bb, au, p.limit_s, fm, fb, auto_blocked, rate_remaining, rate_reset, plan) .. leased ..
    moved
end

if deadline ~= 0 then
  local t = redis.call('TIME')
  expired = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) > deadline
end
local replies = {}
for i = 1, (#KEYS - 1) / 3 do
  -- One charge's failure (a key of an unexpected type, say) must not take
  -- the others of the call, nor their events, down with it.
  local ok, reply = pcall(charge, 1 + 3 * (i - 1), 4 + PER_CHARGE * (i - 1))
  if ok then
    replies[i] = reply
  else
    replies[i] = {'error', type(reply) == 'table' and tostring(reply.err) or tostring(reply)}
  end
end
if #events > 0 then
  redis.call('XADD', stream, '*', 'rows', table.concat(events, '\n'))
end
return replies
