-- EXPERIMENT, never shipped (bench/upper_bounds.sh): lua/charge.lua with
-- every decision taken out. Each charge's event row is appended as the
-- real script appends it, one XADD per call, and the answer is a canned
-- "ok" for the bench plan; nothing is read or written in the account.
-- It measures what the gateway and Redis cost when Redis decides nothing:
-- an upper bound for anything that takes decisions out of Redis (leases).
--
-- KEYS, ARGV: as lua/charge.lua (only KEYS[1] and each charge's module,
-- action, cost, event id and shared tail are read).
-- Returns one "ok" string per charge, as lua/charge.lua's common answer.
local PER_CHARGE = 15
local events = {}
local replies = {}
for i = 1, (#KEYS - 1) / 3 do
  local a = 4 + PER_CHARGE * (i - 1)
  local module, action, cost_s, event_id, common = ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 9], ARGV[a + 15]
  events[#events + 1] = event_id .. '\tcharge\tbench\t' .. module .. '\t' .. action .. '\t' .. cost_s .. '\t' ..
    cost_s .. '\t0\t1000000\t0\t1\t\t' .. common
  replies[i] = 'ok ' .. cost_s .. ' 1000000 0 1 -1 ' .. cost_s .. ' 0 0 -1 -1 bench'
end
redis.call('XADD', KEYS[1], '*', 'rows', table.concat(events, '\n'))
return replies
