#!/usr/bin/env bash
# Legitimate latency under a flood of random (well-formed, unknown) API
# keys: each costs a Postgres lookup, bounded to half the pool.
#   bench/keyflood.sh [flood_rate=5000] [legit_rate=2000] [duration=10]
# Prints the legitimate client's p50/p99 quiet, then during the flood, and
# the flood's real rate and answers.
cd "$(dirname "$0")/.."
FLOOD=${1:-5000}
LEGIT=${2:-2000}
SECS=${3:-10}
. bench/common.sh
start_gateway
curl -fs -H "Authorization: Bearer $KEY" "http://$GATEWAY/rag/warm" >/dev/null

cat > "$WORK/flood.lua" <<LUA
local hex = "0123456789abcdef"
math.randomseed(os.time())
request = function()
  local t = {}
  for i = 1, 48 do local r = math.random(16); t[i] = hex:sub(r, r) end
  return wrk.format("GET", "/rag/q", {["Authorization"] = "Bearer cg_" .. table.concat(t)})
end
-- 50 connections, each waiting this long between requests: about FLOOD/s.
delay = function() return math.floor(50 * 1000 / $FLOOD) end
LUA

legit() { # label
  hey -z "${SECS}s" -c 16 -q $((LEGIT / 16)) -H "Authorization: Bearer $KEY" \
    "http://$GATEWAY/rag/q" > "$WORK/$1.hey"
  printf '  %-22s p50 %7s  p99 %7s  (%s req/s)\n' "$1" \
    "$(awk '$1 == "50%" {print $3 * 1000 " ms"}' "$WORK/$1.hey")" \
    "$(awk '$1 == "99%" {print $3 * 1000 " ms"}' "$WORK/$1.hey")" \
    "$(awk '/Requests\/sec/ {print $2}' "$WORK/$1.hey")"
  grep -A 6 'Status code distribution' "$WORK/$1.hey" | grep '\[' | sed 's/^/      /'
}

echo "== legitimate client: hey -c 16 at $LEGIT req/s for ${SECS}s"
legit quiet
wrk -t1 -c50 -d"$((SECS + 2))s" -s "$WORK/flood.lua" "http://$GATEWAY" > "$WORK/flood.wrk" 2>&1 &
FLOOD_PID=$!
sleep 1
legit "flood of random keys"
wait $FLOOD_PID
echo "== the flood: wrk -t1 -c50 with a per-request delay, random cg_ keys"
grep -E 'Requests/sec|Non-2xx|requests in' "$WORK/flood.wrk" | sed 's/^/  /'
echo "== key lookups during the run (creditgate_key_lookups_total)"
curl -fs "http://$GATEWAY/metrics" | grep '^creditgate_key_lookups_total' | sed 's/^/  /'
