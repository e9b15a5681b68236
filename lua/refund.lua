-- refund.lua: give one charge back, at most once.
--
-- KEYS[1]  account hash   {tag}:acct:<user>
-- KEYS[2]  request record {tag}:req:<user>:<request id> (a string) or
--          {tag}:idem:<user>:<key> (a hash with the same string in "split"),
--          both written by charge.lua
-- KEYS[3]  usage stream   {tag}:events (fields as in charge.lua; d is the
--          day of the charge, so the refund lands in that day's aggregates)
-- KEYS[4]  void modes only: the void's mark {tag}:void:<user>:<charge event id>
--          (a string, kept ARGV[15] seconds): one void per charge, whatever
--          the retries
--
-- ARGV[1]  mode: "record" reads the split from KEYS[2] and deletes it, so a
--          second refund of the same request finds nothing; "direct" uses
--          ARGV[2..6] (charges without an idempotency key keep no record);
--          "idem" is "record" for the proxy's hash record. Deleting the
--          record frees the key: a retry is a new call.
--          "void_record", "void_idem", "void_direct": the same for a charge
--          whose answer the gateway never heard (it answered 503 "nothing
--          was charged"), named by its event id ARGV[13]; only once Redis's
--          clock is past the charge's deadline ARGV[14], after which
--          charge.lua can no longer make it. A record must be that charge's
--          own, and its caller must not have been told it was charged
--          since: a repeat answered "duplicate" (",told" at the end of a
--          request record) or a key past its lease (its repeats answer
--          "duplicate_request") keeps the charge.
-- ARGV[2]  credits taken from the monthly allowance   (direct modes)
-- ARGV[3]  credits taken from bonus                   (direct modes)
-- ARGV[4]  local day of the charge "YYYY-MM-DD"       (direct modes)
-- ARGV[5]  billing period of the charge "YYYY-MM"     (direct modes)
-- ARGV[6]  module id                                  (direct modes)
-- ARGV[7]  action                                     (direct modes)
-- ARGV[8]  now, unix milliseconds
-- ARGV[9]  event id (uuid) of the refund event
-- ARGV[10] request id
-- ARGV[11] user id
-- ARGV[12] actor
-- ARGV[13] void modes: the charge's event id
-- ARGV[14] void modes: the charge's deadline on Redis's clock, unix ms
-- ARGV[15] void modes: how long the mark is kept, seconds
--
-- Returns:
--   {"ok", refunded, monthly, bonus, day_used}   (balances after)
--   {"not_found"}   record mode: never charged, already refunded, or expired;
--                   void modes: not this charge's record, or already voided
--   {"missing"}     account not in Redis (rebuild, then retry)
--   {"early", ms}   void modes: Redis's clock is not past the deadline yet
--   {"told"}        void modes: the caller has since been told it was
--                   charged; the charge stands
--
-- The allowance part is returned only within the same billing period (a
-- reset already refilled it) and the day counter only within the same day.

local acct = KEYS[1]
local mode = ARGV[1]
local void = string.sub(mode, 1, 5) == 'void_'
if void then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if now <= tonumber(ARGV[14]) then
    return {'early', tonumber(ARGV[14]) - now + 1}
  end
end
if redis.call('EXISTS', acct) == 0 then
  return {'missing'}
end
if void and not redis.call('SET', KEYS[4], '1', 'NX', 'EX', ARGV[15]) then
  return {'not_found'}
end

local m, b, cday, cperiod, module, action
if mode == 'record' or mode == 'idem' or mode == 'void_record' or mode == 'void_idem' then
  local rec, rest
  if mode == 'idem' or mode == 'void_idem' then
    local r = redis.call('HMGET', KEYS[2], 'split', 'ev', 'st', 'lease')
    rec = r[1]
    if rec and mode == 'void_idem' then
      if r[2] ~= ARGV[13] then
        return {'not_found'}
      end
      if r[3] ~= 'p' or (tonumber(r[4]) or 0) <= tonumber(ARGV[8]) then
        return {'told'}
      end
    end
  else
    rec = redis.call('GET', KEYS[2])
  end
  if not rec then
    return {'not_found'}
  end
  -- A request record ends with ",<event id>", then ",told" once a repeat
  -- was answered "duplicate" (records from before either: neither).
  m, b, cday, cperiod, module, action, rest = string.match(rec, '^(%d+),(%d+),([^,]*),([^,]*),([^,]*),([^,]*)(.*)$')
  if not m then
    return {'not_found'}
  end
  if mode == 'void_record' then
    if rest == ',' .. ARGV[13] .. ',told' then
      return {'told'}
    end
    if rest ~= ',' .. ARGV[13] then
      return {'not_found'}
    end
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
  r = ARGV[10], by = ARGV[12], t = tonumber(ARGV[8]), d = cday,
  why = void and ('unanswered charge ' .. ARGV[13]) or nil}))
return {'ok', refunded, monthly, bonus, used}
