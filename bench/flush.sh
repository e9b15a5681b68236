#!/usr/bin/env bash
# Ledger flush throughput: fill the 16 usage streams with N well-formed
# events while no flusher runs, then time `creditgate flush` draining them
# into Postgres.   bench/flush.sh [events=200000] [batch_size=2000] [per_entry=1]
# per_entry: events per stream entry, as charge.lua writes a call's charges
# (one JSON array per call; about 14 per call under the proxy bench).
cd "$(dirname "$0")/.."
. bench/common.sh
N=${1:-200000}
export CREDITGATE_LEDGER__BATCH_SIZE=${2:-2000}
PER_ENTRY=${3:-1}
psql -h 127.0.0.1 -U postgres -d creditgate_bench -qc \
  "TRUNCATE ledger_events, usage_daily, usage_module_daily, usage_monthly, account_snapshots, ledger_rejects"

# 1000 users spread over the shards, events as charge.lua writes them: one
# line per event in the field "rows" (FORMAT=json: the JSON the other
# scripts, and gateways before rows, write in the field "v").
FORMAT=${FORMAT:-rows}
FILL_LUA='local n = tonumber(ARGV[1]); local run = ARGV[2]; local g = tonumber(ARGV[3]); local json = ARGV[4] == "json"
local batch = {}
for i = 1, n do
  local u = "bench-" .. (i % 1000)
  if json then
    batch[#batch + 1] = cjson.encode({e = run .. "-" .. KEYS[1] .. "-" .. i, u = u,
      k = "charge", p = "bench", m = "rag", a = "", n = 1, fm = 1, fb = 0, mb = 1000000 - i, bb = 0,
      ap = "2026-11", ad = "2026-11-26", au = i, r = "r" .. i, by = "bench",
      t = 1795700000000 + i, d = "2026-11-26"})
  else
    batch[#batch + 1] = run .. "-" .. KEYS[1] .. "-" .. i .. "\tcharge\tbench\trag\t\t1\t1\t0\t" ..
      (1000000 - i) .. "\t0\t" .. i .. "\t\t" .. u .. "\tr" .. i .. "\tbench\t" .. (1795700000000 + i) ..
      "\t2026-11-26\t2026-11\t2026-11-26"
  end
  if #batch == g or i == n then
    if json then
      local v = batch[1]
      if #batch > 1 then v = "[" .. table.concat(batch, ",") .. "]" end
      redis.call("XADD", KEYS[1], "*", "v", v)
    else
      redis.call("XADD", KEYS[1], "*", "rows", table.concat(batch, "\n"))
    end
    batch = {}
  end
end
return n'
per=$((N / 16))
run=$(date +%s%N)
for s in $(seq 0 15); do redis-cli EVAL "$FILL_LUA" 1 "{bench:$s}:events" $per "$run" "$PER_ENTRY" "$FORMAT" >/dev/null; done
total=$((per * 16))
echo "== $total events queued ($FORMAT), $PER_ENTRY per stream entry; draining with: creditgate flush (batch_size=$CREDITGATE_LEDGER__BATCH_SIZE)"
b_pg=$(pg_snapshot); b_redis=$(cpu_ticks "$REDIS_PID")
start=$(date +%s.%N)
"$BIN" flush 2>"$WORK/flush.log" &
FLUSH_PID=$!
while [ "$(redis-cli EVAL 'local n=0 for i=0,15 do n=n+redis.call("XLEN","{bench:"..i.."}:events") end return n' 0)" != 0 ]; do
  sleep 0.05
done
end=$(date +%s.%N)
flusher_ticks=$(cpu_ticks "$FLUSH_PID")
# The flusher's Postgres backends are forked after the first snapshot.
pg_ticks=$(pg_delta "$b_pg" "$(pg_snapshot)"); redis_ticks=$(( $(cpu_ticks "$REDIS_PID") - b_redis ))
kill $FLUSH_PID; wait $FLUSH_PID 2>/dev/null || true
rows=$(psql -h 127.0.0.1 -U postgres -d creditgate_bench -tAc "SELECT count(*) FROM ledger_events")
secs=$(echo "$end - $start" | bc)
echo "rows in ledger_events: $rows"
echo "drained $total events in ${secs}s = $(echo "$total / $secs" | bc) events/s"
per_event() { echo "scale=2; $1 * 1000000 / $TICK / $total" | bc; }
echo "CPU per event (us): flusher $(per_event "$flusher_ticks")  postgres $(per_event "$pg_ticks")  redis $(per_event "$redis_ticks")"
