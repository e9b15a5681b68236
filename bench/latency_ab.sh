#!/usr/bin/env bash
# Latency at a constant rate, two builds taking turns (A B, B A, ...): the
# p99 target is at a fixed rate, where req/s at saturation says nothing.
#   bench/latency_ab.sh OLD_BINARY [rate=8000] [duration=15s]
# B is CREDITGATE_BIN (default: this tree's release build). 32 connections.
# With wrk2 on the PATH (github.com/giltene/wrk2, `make`, copy `wrk` as
# `wrk2`): a constant rate without coordinated omission, p50 to p99.9 and
# the slowest call. Otherwise hey, each connection at rate/32 req/s (hey
# waits for an answer before the next request, so a stall slows the load
# down instead of showing in the percentiles). ROUNDS (default 3) pairs.
cd "$(dirname "$0")/.."
OLD=${1:?usage: bench/latency_ab.sh OLD_BINARY [rate] [duration]}
RATE=${2:-8000}
DURATION=${3:-15s}
. bench/common.sh
NEW=$BIN
PER=$((RATE / 32))
if command -v wrk2 >/dev/null; then
  echo "== wrk2 -t1 -c32 -d$DURATION -R $RATE --latency, upstream nginx 'return 200'"
else
  echo "== hey -z $DURATION -c 32 -q $PER ($((PER * 32)) req/s), upstream nginx 'return 200'"
fi
for round in $(seq "${ROUNDS:-3}"); do
  order="A B"
  if [ $((round % 2)) = 0 ]; then order="B A"; fi
  for side in $order; do
    if [ $side = A ]; then BIN=$OLD; else BIN=$NEW; fi
    start_gateway
    curl -fs -H "Authorization: Bearer $KEY" "http://$GATEWAY/rag/warm" >/dev/null
    if command -v wrk2 >/dev/null; then
      wrk2 -t1 -c32 -d"$DURATION" -R "$RATE" --latency -H "Authorization: Bearer $KEY" \
        "http://$GATEWAY/rag/q" > "$WORK/lat.wrk2"
      printf '%-4s %10s req/s  p50 %8s  p90 %8s  p99 %8s  p99.9 %8s  slowest %8s\n' "$side$round" \
        $(wrk2_summary "$WORK/lat.wrk2")
    else
      hey -z "$DURATION" -c 32 -q "$PER" -H "Authorization: Bearer $KEY" "http://$GATEWAY/rag/q" > "$WORK/lat.hey"
      printf '%-4s %10s req/s  p50 %8s  p99 %8s  p99.9 %8s  slowest %8s\n' "$side$round" \
        "$(awk '/Requests\/sec/ {print $2}' "$WORK/lat.hey")" \
        "$(awk '$1 == "50%" {print $3 * 1000 " ms"}' "$WORK/lat.hey")" \
        "$(awk '$1 == "99%" {print $3 * 1000 " ms"}' "$WORK/lat.hey")" \
        "$(awk '$1 == "99.9%" {print $3 * 1000 " ms"}' "$WORK/lat.hey")" \
        "$(awk '/Slowest/ {print $2 * 1000 " ms"}' "$WORK/lat.hey")"
    fi
    stop_gateway
  done
done
echo "A = $OLD"
echo "B = $NEW"
