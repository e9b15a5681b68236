#!/usr/bin/env bash
# Instructions the gateway executes per metered request: the gateway runs
# under valgrind's callgrind, which counts instructions instead of timing
# them, so the number does not move with the load on a shared box (the
# /proc CPU times of bench/proxy.sh move by 10-20 % between runs). Use it
# to compare two builds on a change too small for wall-clock numbers.
#   bench/gateway_instructions.sh [requests=4000] [connections=8]
# CREDITGATE_BIN picks the build (default: the release build of this tree).
# FLOOR_BIN=<examples/hyper_floor build> counts that binary instead, the
# least hyper proxy (bench/hyper_floor.sh), for the floor under the path.
# Under valgrind the gateway is about 50 times slower: group commit then
# packs fewer charges per call than under real load, the same for both
# builds of a comparison.
cd "$(dirname "$0")/.."
N=${1:-4000}
CONNS=${2:-8}
command -v valgrind >/dev/null || { . scripts/deps.sh; apt_install valgrind; }
. bench/common.sh
OUT="$WORK/callgrind"
mkdir -p "$OUT"
if [ -n "${FLOOR_BIN:-}" ]; then
  GATEWAY=127.0.0.1:18209
  LISTEN=$GATEWAY UPSTREAM=$UPSTREAM valgrind --tool=callgrind --callgrind-out-file="$OUT/cg.%p.out" \
    "$FLOOR_BIN" 2>"$WORK/gateway.log" &
else
  valgrind --tool=callgrind --callgrind-out-file="$OUT/cg.%p.out" "$BIN" serve 2>"$WORK/gateway.log" &
fi
GW_PID=$!
# The floor answers every path by forwarding it; the gateway has /healthz.
for _ in $(seq 600); do curl -fs "http://$GATEWAY/healthz" >/dev/null && break; sleep 0.2; done
# Warm up: key cache, connections, scripts loaded.
hey -n 500 -c "$CONNS" -H "Authorization: Bearer $KEY" "http://$GATEWAY/rag/q" >/dev/null
# Let the flusher write the warm-up's events before counting.
sleep 3
counted() {
  rm -f "$OUT"/cg.*
  callgrind_control -d "$GW_PID" >/dev/null
  callgrind_control -z "$GW_PID" >/dev/null
  awk '/^(summary|totals):/ {print $2}' "$OUT"/cg.* | sort -n | tail -1
}
counted >/dev/null
hey -n "$N" -c "$CONNS" -H "Authorization: Bearer $KEY" "http://$GATEWAY/rag/q" > "$WORK/hey.out"
sleep 3 # the flusher's share of these requests
total=$(counted)
ok=$(awk '/\[200\]/ {print $2}' "$WORK/hey.out")
echo "$ok of $N requests answered 200"
echo "gateway: $((total / N)) instructions per request ($total in all, flusher included)"
