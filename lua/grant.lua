-- grant.lua: add bonus credits to an account (admin grant or purchase),
-- at most once per Idempotency-Key, never past the bonus ceiling.
--
-- KEYS[1]  account hash {tag}:acct:<user>
-- KEYS[2]  usage stream {tag}:events (fields as in charge.lua; kind "grant",
--          fb = amount, "why" carries the reason, r the Idempotency-Key)
-- KEYS[3]  grant record {tag}:grant:<user>:<Idempotency-Key>: "fingerprint|monthly|bonus"
--          (unused when ARGV[9] is "")
--
-- ARGV[1]  credits to add (integer > 0; bounded by the caller)
-- ARGV[2]  now, unix milliseconds
-- ARGV[3]  event id (uuid)
-- ARGV[4]  user id
-- ARGV[5]  actor ("admin:<key name>")
-- ARGV[6]  reason
-- ARGV[7]  local day "YYYY-MM-DD"
-- ARGV[8]  ceiling for the bonus after the grant
-- ARGV[9]  Idempotency-Key, "" for none
-- ARGV[10] fingerprint of the grant (amount and reason)
-- ARGV[11] grant record TTL, seconds
--
-- Returns (balances after):
--   {"ok", monthly, bonus}
--   {"repeat", monthly, bonus}   the key's grant was already applied; these
--                                are the balances that grant left
--   {"key_reused"}               the key was used for another grant
--   {"over_limit", bonus}        the bonus would pass ARGV[8]; nothing changed
--   {"missing"}                  account not in Redis (rebuild, then retry)

local acct = KEYS[1]
if ARGV[9] ~= '' then
  local rec = redis.call('GET', KEYS[3])
  if rec then
    local fp, m, b = string.match(rec, '^(.*)|(%-?%d+)|(%-?%d+)$')
    if fp ~= ARGV[10] then
      return {'key_reused'}
    end
    return {'repeat', tonumber(m), tonumber(b)}
  end
end
if redis.call('EXISTS', acct) == 0 then
  return {'missing'}
end
local amount = tonumber(ARGV[1])
local current = tonumber(redis.call('HGET', acct, 'bonus')) or 0
if current + amount > tonumber(ARGV[8]) then
  return {'over_limit', current}
end
local bonus = redis.call('HINCRBY', acct, 'bonus', amount)
local f = redis.call('HMGET', acct, 'plan', 'monthly', 'period', 'day', 'used')
local monthly = tonumber(f[2]) or 0
redis.call('XADD', KEYS[2], '*', 'v', cjson.encode({
  e = ARGV[3], u = ARGV[4], k = 'grant', p = f[1] or '', m = '', a = '',
  n = amount, fm = 0, fb = amount,
  mb = monthly, bb = bonus, ap = f[3] or '', ad = f[4] or '', au = tonumber(f[5]) or 0,
  r = ARGV[9], by = ARGV[5], t = tonumber(ARGV[2]), d = ARGV[7], why = ARGV[6]}))
if ARGV[9] ~= '' then
  redis.call('SET', KEYS[3], ARGV[10] .. '|' .. monthly .. '|' .. bonus, 'EX', ARGV[11])
end
return {'ok', monthly, bonus}
