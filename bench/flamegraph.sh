#!/usr/bin/env bash
# A flame graph of the gateway under load: perf record while wrk runs
# flat out against creditgate, folded by inferno into an SVG.
#   bench/flamegraph.sh OUT.svg [seconds=10] [gateway|redis]
# With "redis", the profile is of redis-server (running charge.lua and
# serving the flusher) instead of the gateway.
# CALL_GRAPH=dwarf: whole stacks for a build without frame pointers
# (bigger and slower to record).
# FOLDED=path keeps the folded stacks there, for sums the SVG does not show.
# Needs perf (Debian: linux-perf) and inferno (cargo install inferno).
cd "$(dirname "$0")/.."
OUT=${1:?usage: bench/flamegraph.sh OUT.svg [seconds]}
SECS=${2:-10}
WHO=${3:-gateway}
command -v perf >/dev/null || apt_install linux-perf
command -v inferno-flamegraph >/dev/null || cargo install inferno --quiet
. bench/common.sh
start_gateway
curl -fs -H "Authorization: Bearer $KEY" "http://$GATEWAY/rag/warm" >/dev/null
wrk -t1 -c50 -d"$((SECS + 4))s" -H "Authorization: Bearer $KEY" "http://$GATEWAY/rag/q" > "$WORK/flame.wrk" &
WRK_PID=$!
sleep 2
PROFILED=$GW_PID
[ "$WHO" = redis ] && PROFILED=$REDIS_PID
perf record -F 499 --call-graph "${CALL_GRAPH:-fp}" -p "$PROFILED" -o "$WORK/perf.data" -- sleep "$SECS" 2>/dev/null
wait $WRK_PID
perf script -i "$WORK/perf.data" 2>/dev/null | inferno-collapse-perf > "$WORK/folded"
[ -n "${FOLDED:-}" ] && cp "$WORK/folded" "$FOLDED"
inferno-flamegraph --title "$WHO: creditgate under wrk -t1 -c50 ($(awk '/Requests\/sec/ {print $2}' "$WORK/flame.wrk") req/s)" \
  < "$WORK/folded" > "$OUT"
echo "$OUT: $(wc -l < "$WORK/folded") stacks; $(grep Requests/sec "$WORK/flame.wrk")"
# The heaviest frames, for the notes.
awk '{n=$NF; $NF=""; split($0, f, ";"); top=f[length(f)]; gsub(/ $/, "", top); s[top]+=n; t+=n} END {for (k in s) printf "%5.1f%% %s\n", 100*s[k]/t, k}' \
  "$WORK/folded" | sort -rn | head -15
