-- sync.lua: mirror what Postgres decides about an account (plan, block,
-- live keys) into Redis, unless Redis already holds a newer version.
--
-- Admin changes are committed to Postgres with a version from one growing
-- sequence; a retry or a late delivery of an older version must not undo
-- a newer one, so the account hash remembers the last version applied.
--
-- KEYS[1]  account hash   {tag}:acct:<user>   (field sv: last version applied)
-- KEYS[2]  key-hash set   {tag}:keys:<user>: the live keys' hashes, as builds
--          before key details read them (kept while they may still run)
-- KEYS[3]  live keys      {tag}:apikeys:<user>: hash -> "<expires ms>|<,modules,>"
--
-- ARGV[1]  version
-- ARGV[2]  plan id
-- ARGV[3]  "1" blocked by an admin, "0" not
-- ARGV[4..] per live API key, two: its sha256 hex, then its details
--
-- Returns 1 applied, 0 already at this version or newer, -1 account not in
-- Redis (nothing to do: the next charge seeds it from Postgres).

if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
local f = redis.call('HMGET', KEYS[1], 'sv', 'blocked')
if (tonumber(f[1]) or 0) >= tonumber(ARGV[1]) then
  return 0
end
-- An auto-block (credits exhausted) is the policy's, not an admin's: an
-- admin unblock leaves it in place; charge.lua lifts it by itself.
local blocked = ARGV[3]
if blocked == '0' and f[2] == 'exhausted' then
  blocked = 'exhausted'
end
redis.call('HSET', KEYS[1], 'sv', ARGV[1], 'plan', ARGV[2], 'blocked', blocked)
redis.call('DEL', KEYS[2], KEYS[3])
for i = 4, #ARGV, 2 do
  redis.call('SADD', KEYS[2], ARGV[i])
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
end
return 1
