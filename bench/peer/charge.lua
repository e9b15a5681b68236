-- The Kong-style peer's Redis script: what a naive nginx + Lua + Redis
-- metering gateway does per request. One EVALSHA deducts and appends the
-- usage event; no plans, daily limit, idempotency, refunds or ledger.
--
-- KEYS[1]  the account's balance (a plain integer)
-- KEYS[2]  the usage stream (trimmed, nothing consumes it)
-- ARGV[1]  cost
-- ARGV[2]  now (seconds, from nginx)
--
-- Returns the balance left, or -1 when it would go below zero (nothing taken).

local left = redis.call('DECRBY', KEYS[1], ARGV[1])
if left < 0 then
  redis.call('INCRBY', KEYS[1], ARGV[1])
  return -1
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 100000, '*', 'a', KEYS[1], 'n', ARGV[1], 't', ARGV[2])
return left
