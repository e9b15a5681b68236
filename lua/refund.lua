-- refund.lua: give one charge back, at most once.
--
-- KEYS[1]  account hash   {tag}:acct:<user>
-- KEYS[2]  request record {tag}:req:<user>:<request id> (a string) or
--          {tag}:idem:<user>:<key> (a hash with the same string in "split"),
--          both written by charge.lua
-- KEYS[3]  usage stream   {tag}:events (fields as in charge.lua; d is the
--          day of the charge, so the refund lands in that day's aggregates)
--
-- ARGV[1]  mode: "record" reads the split from KEYS[2] and deletes it, so a
--          second refund of the same request finds nothing; "direct" uses
--          ARGV[2..6] (charges without an idempotency key keep no record);
--          "idem" is "record" for the proxy's hash record. Deleting the
--          record frees the key: a retry is a new call.
-- ARGV[2]  credits taken from the monthly allowance   (direct mode)
-- ARGV[3]  credits taken from bonus                   (direct mode)
-- ARGV[4]  local day of the charge "YYYY-MM-DD"       (direct mode)
-- ARGV[5]  billing period of the charge "YYYY-MM"     (direct mode)
-- ARGV[6]  module id                                  (direct mode)
-- ARGV[7]  action                                     (direct mode)
-- ARGV[8]  now, unix milliseconds
-- ARGV[9]  event id (uuid) of the refund event
-- ARGV[10] request id
-- ARGV[11] user id
-- ARGV[12] actor
--
-- Returns:
--   {"ok", refunded, monthly, bonus, day_used}   (balances after)
--   {"not_found"}   record mode: never charged, already refunded, or expired
--   {"missing"}     account not in Redis (rebuild, then retry)
--
-- The allowance part is returned only within the same billing period (a
-- reset already refilled it) and the day counter only within the same day.

local acct = KEYS[1]
if redis.call('EXISTS', acct) == 0 then
  return {'missing'}
end

local m, b, cday, cperiod, module, action
if ARGV[1] == 'record' or ARGV[1] == 'idem' then
  local rec
  if ARGV[1] == 'idem' then
    rec = redis.call('HGET', KEYS[2], 'split')
  else
    rec = redis.call('GET', KEYS[2])
  end
  if not rec then
    return {'not_found'}
  end
  m, b, cday, cperiod, module, action = string.match(rec, '^(%d+),(%d+),([^,]*),([^,]*),([^,]*),(.*)$')
  if not m then
    return {'not_found'}
  end
  redis.call('DEL', KEYS[2])
else
  m, b, cday, cperiod, module, action = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
end
m = tonumber(m)
b = tonumber(b)

local f = redis.call('HMGET', acct, 'plan', 'monthly', 'bonus', 'period', 'day', 'used')
local monthly = tonumber(f[2]) or 0
local bonus = tonumber(f[3]) or 0
local used = tonumber(f[6]) or 0

local back_monthly = 0
bonus = bonus + b
if f[4] == cperiod then
  back_monthly = m
  monthly = monthly + m
end
local refunded = back_monthly + b
if f[5] == cday then
  used = math.max(0, used - m - b)
end
redis.call('HSET', acct, 'monthly', monthly, 'bonus', bonus, 'used', used)
redis.call('XADD', KEYS[3], '*', 'v', cjson.encode({
  e = ARGV[9], u = ARGV[11], k = 'refund', p = f[1] or '', m = module, a = action,
  n = refunded, fm = back_monthly, fb = b,
  mb = monthly, bb = bonus, ap = f[4] or '', ad = f[5] or '', au = used,
  r = ARGV[10], by = ARGV[12], t = tonumber(ARGV[8]), d = cday}))
return {'ok', refunded, monthly, bonus, used}
