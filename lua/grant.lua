-- grant.lua: add bonus credits to an account (admin grant or purchase).
--
-- KEYS[1]  account hash {tag}:acct:<user>
-- KEYS[2]  usage stream {tag}:events (fields as in charge.lua; kind "grant",
--          fb = amount, and "why" carries the reason)
--
-- ARGV[1]  credits to add (integer > 0; bounded by the caller)
-- ARGV[2]  now, unix milliseconds
-- ARGV[3]  event id (uuid)
-- ARGV[4]  user id
-- ARGV[5]  actor ("admin:<key name>")
-- ARGV[6]  reason
-- ARGV[7]  local day "YYYY-MM-DD"
--
-- Returns {"ok", monthly, bonus} (balances after) or {"missing"}.

local acct = KEYS[1]
if redis.call('EXISTS', acct) == 0 then
  return {'missing'}
end
local amount = tonumber(ARGV[1])
local bonus = redis.call('HINCRBY', acct, 'bonus', amount)
local f = redis.call('HMGET', acct, 'plan', 'monthly', 'period', 'day', 'used')
redis.call('XADD', KEYS[2], '*', 'v', cjson.encode({
  e = ARGV[3], u = ARGV[4], k = 'grant', p = f[1] or '', m = '', a = '',
  n = amount, fm = 0, fb = amount,
  mb = tonumber(f[2]) or 0, bb = bonus, ap = f[3] or '', ad = f[4] or '', au = tonumber(f[5]) or 0,
  r = '', by = ARGV[5], t = tonumber(ARGV[2]), d = ARGV[7], why = ARGV[6]}))
return {'ok', tonumber(f[2]) or 0, bonus}
