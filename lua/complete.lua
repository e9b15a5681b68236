-- complete.lua: the first call under a proxy Idempotency-Key has finished;
-- keep its response so that a repeat is replayed instead of forwarded.
--
-- KEYS[1]  idempotency record {tag}:idem:<user>:<key> (a hash, see charge.lua)
--
-- ARGV[1]  event id of the charge that owns the record: a record refunded
--          and re-created by a retry belongs to the retry, not to us
-- ARGV[2]  "d" the response is kept (ARGV[3..5]); "x" the call completed
--          but its response cannot be replayed (too long, cut off)
-- ARGV[3]  status code
-- ARGV[4]  headers, "name: value" lines joined by "\n"
-- ARGV[5]  body
--
-- Returns 1 when the record was updated, 0 when it is gone or not ours.
-- The record keeps the TTL charge.lua gave it.

if redis.call('HGET', KEYS[1], 'ev') ~= ARGV[1] then
  return 0
end
if ARGV[2] == 'd' then
  redis.call('HSET', KEYS[1], 'st', 'd', 'status', ARGV[3], 'hdrs', ARGV[4], 'body', ARGV[5])
else
  redis.call('HSET', KEYS[1], 'st', 'x')
end
return 1
