-- update_account.lua: set fields of an account that is already in Redis.
--
-- A plain HSET would create a partial account (say, only "blocked") that
-- charge.lua would then take for a real one. When the account is absent
-- there is nothing to do: the next call rebuilds it from Postgres, which
-- already holds the change.
--
-- KEYS[1]  account hash {tag}:acct:<user>
-- ARGV     field, value, field, value, ... (fields: plan, blocked)
--
-- Returns 1 if the account existed and was updated, 0 otherwise.

if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
