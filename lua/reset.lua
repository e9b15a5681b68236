-- reset.lua: start the new billing period of one account (monthly reset).
--
-- The same transition charge.lua makes lazily on an account's first call
-- in a new period, so whichever runs first wins and the other finds the
-- period already current: running the reset twice, or after a crash half
-- way, or concurrently with traffic, resets each account once.
--
-- KEYS[1]  account hash {tag}:acct:<user>
-- KEYS[2]  usage stream {tag}:events (kind "reset", n = new allowance)
--
-- ARGV[1]  plan table (as charge.lua)
-- ARGV[2]  the new period "YYYY-MM"
-- ARGV[3]  local day "YYYY-MM-DD"
-- ARGV[4]  now, unix milliseconds
-- ARGV[5]  event id (uuid)
-- ARGV[6]  user id
-- ARGV[7]  actor
--
-- Returns {"reset", monthly, bonus}, {"current"} (already in this period or a later one),
-- {"missing"} or {"unknown_plan"}.

local acct = KEYS[1]
if redis.call('EXISTS', acct) == 0 then
  return {'missing'}
end
local f = redis.call('HMGET', acct, 'plan', 'period', 'bonus', 'day', 'used')
-- In this period or a later one (periods as text sort in time order): a
-- reset run late, for a period the account has left, must not start it
-- again and refill the allowance.
if (f[2] or '') >= ARGV[2] then
  return {'current'}
end
local plan = f[1] or ''
local _, allowance_s = string.match(ARGV[1], ';' .. plan .. ':(%-?%d+):(%d+):(%-?%d+):(%d+);')
if not allowance_s then
  return {'unknown_plan'}
end
local monthly = tonumber(allowance_s)
local bonus = tonumber(f[3]) or 0
local day, used = f[4] or '', tonumber(f[5]) or 0
if day ~= ARGV[3] then
  day, used = ARGV[3], 0
end
redis.call('HSET', acct, 'monthly', monthly, 'period', ARGV[2], 'day', day, 'used', used)
redis.call('XADD', KEYS[2], '*', 'v', cjson.encode({
  e = ARGV[5], u = ARGV[6], k = 'reset', p = plan, m = '', a = '',
  n = monthly, fm = 0, fb = 0,
  mb = monthly, bb = bonus, ap = ARGV[2], ad = day, au = used,
  r = '', by = ARGV[7], t = tonumber(ARGV[4]), d = ARGV[3]}))
return {'reset', monthly, bonus}
