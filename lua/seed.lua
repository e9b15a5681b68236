-- seed.lua: create an account's hot state in Redis, unless it already exists.
--
-- Called when charge.lua answers "missing" (new account, or Redis lost its
-- data). The existence check and the writes are one atomic step, so when
-- several gateway instances race to rebuild the same account exactly one of
-- them writes and the others keep what it wrote.
--
-- KEYS[1]  account hash   {tag}:acct:<user>
-- KEYS[2]  key-hash set   {tag}:keys:<user>: the live keys' hashes, as builds
--          before key details read them (kept while they may still run)
-- KEYS[3]  live keys      {tag}:apikeys:<user>: hash -> "<expires ms>|<,modules,>"
--
-- ARGV[1]  plan id
-- ARGV[2]  monthly allowance remaining
-- ARGV[3]  bonus credits
-- ARGV[4]  billing period "YYYY-MM" the allowance belongs to
-- ARGV[5]  local day "YYYY-MM-DD" the day counter belongs to
-- ARGV[6]  credits used that day
-- ARGV[7]  "1" if blocked, else "0"
-- ARGV[8..] per live API key, two: its sha256 hex, then its details
--
-- Returns 1 if this call created the account, 0 if it already existed.

if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'plan', ARGV[1], 'monthly', ARGV[2], 'bonus', ARGV[3],
  'period', ARGV[4], 'day', ARGV[5], 'used', ARGV[6], 'blocked', ARGV[7])
redis.call('DEL', KEYS[2], KEYS[3])
for i = 8, #ARGV, 2 do
  redis.call('SADD', KEYS[2], ARGV[i])
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
end
return 1
