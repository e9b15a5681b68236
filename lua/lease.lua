-- lease.lua: close a credit lease that charge.lua opened (docs/LEASES.md).
--
-- A lease is a block of credits a gateway took from an account's balance
-- and day counter to spend locally, one call at a time, without a script
-- per call. It is closed once, either by its gateway ("settle": it says
-- how much it spent, the rest goes back) or, when that gateway never came
-- back for it, by any gateway ("lost": the credits stay spent, as its
-- spend log is gone with it and no call may be free).
--
-- KEYS[1]  the shard's usage stream {tag}:events (events as in refund.lua: JSON, field "v")
-- KEYS[2]  the account hash {tag}:acct:<user>: field "lease:<lease id>" =
--          "<credits>,<from monthly>,<from bonus>,<day>,<period>" while open
-- KEYS[3]  the shard's lease index {tag}:leases (sorted set, "<user> <lease id>"
--          scored by the lease's end, unix ms on Redis's clock)
--
-- ARGV[1]  "settle" or "lost"
-- ARGV[2]  lease id
-- ARGV[3]  user id
-- ARGV[4]  settle: credits spent from the lease (net of the calls it gave
--          back); lost: how long past its end, in ms, a lease counts as lost
-- ARGV[5]  now, unix milliseconds (the event's time)
-- ARGV[6]  actor
--
-- Returns:
--   {"settled", returned_monthly, returned_bonus, monthly, bonus, day_used}
--            a "lease_return" event: n = credits not spent, fm/fb = what of
--            them went back (the monthly part only within the lease's period,
--            the day counter only within its day, as refund.lua does)
--   {"lost", held}  a "lease_lost" event: n = the lease's credits, nothing back
--   {"gone"}        no such open lease: settled, lost, or its account rebuilt
--   {"early"}       lost: not yet past its end by ARGV[4] ms; nothing written

local acct, index = KEYS[2], KEYS[3]
local op, lease_id, user = ARGV[1], ARGV[2], ARGV[3]
local field = 'lease:' .. lease_id
local member = user .. ' ' .. lease_id

local rec = redis.call('HGET', acct, field)
if not rec then
  redis.call('ZREM', index, member)
  return {'gone'}
end
local credits, lfm, lfb, lday, lperiod = string.match(rec, '^(%d+),(%d+),(%d+),([^,]*),(.*)$')
credits, lfm, lfb = tonumber(credits), tonumber(lfm), tonumber(lfb)

if op == 'lost' then
  local ends = tonumber(redis.call('ZSCORE', index, member))
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if ends and ends + tonumber(ARGV[4]) > now then
    return {'early'}
  end
end

local f = redis.call('HMGET', acct, 'plan', 'monthly', 'bonus', 'period', 'day', 'used')
local monthly = tonumber(f[2]) or 0
local bonus = tonumber(f[3]) or 0
local used = tonumber(f[6]) or 0
local kind, n, back_m, back_b
if op == 'settle' then
  -- What was spent came out of the monthly part first, as a charge does.
  local spent = math.max(0, math.min(tonumber(ARGV[4]) or 0, credits))
  local spent_m = math.min(spent, lfm)
  kind, n = 'lease_return', credits - spent
  back_m, back_b = lfm - spent_m, lfb - (spent - spent_m)
  if f[4] ~= lperiod then
    -- A new period refilled the allowance: the old one's rest is gone.
    back_m = 0
  end
  monthly, bonus = monthly + back_m, bonus + back_b
  if f[5] == lday then
    used = math.max(0, used - n)
  end
  redis.call('HSET', acct, 'monthly', monthly, 'bonus', bonus, 'used', used)
else
  kind, n, back_m, back_b = 'lease_lost', credits, 0, 0
end
redis.call('HDEL', acct, field)
redis.call('ZREM', index, member)
redis.call('XADD', KEYS[1], '*', 'v', cjson.encode({
  e = lease_id .. ':' .. (op == 'settle' and 'return' or 'lost'), u = user, k = kind,
  p = f[1] or '', m = '', a = '', n = n, fm = back_m, fb = back_b,
  mb = monthly, bb = bonus, ap = f[4] or '', ad = f[5] or '', au = used,
  r = '', by = ARGV[6], t = tonumber(ARGV[5]), d = lday}))
if op == 'settle' then
  return {'settled', back_m, back_b, monthly, bonus, used}
end
return {'lost', credits}
