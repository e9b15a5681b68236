#!/usr/bin/env bash
# Latency at a constant rate, two builds taking turns (A B A B ...): the
# p99 target is at a fixed rate, where req/s at saturation says nothing.
#   bench/latency_ab.sh OLD_BINARY [rate=8000] [duration=10s]
# B is CREDITGATE_BIN (default: this tree's release build). hey keeps 32
# connections, each at rate/32 req/s. ROUNDS (default 3) pairs.
cd "$(dirname "$0")/.."
OLD=${1:?usage: bench/latency_ab.sh OLD_BINARY [rate] [duration]}
RATE=${2:-8000}
DURATION=${3:-10s}
. bench/common.sh
NEW=$BIN
PER=$((RATE / 32))
echo "== hey -z $DURATION -c 32 -q $PER ($((PER * 32)) req/s), upstream nginx 'return 200'"
for round in $(seq "${ROUNDS:-3}"); do
  for side in A B; do
    if [ $side = A ]; then BIN=$OLD; else BIN=$NEW; fi
    start_gateway
    curl -fs -H "Authorization: Bearer $KEY" "http://$GATEWAY/rag/warm" >/dev/null
    hey -z "$DURATION" -c 32 -q "$PER" -H "Authorization: Bearer $KEY" "http://$GATEWAY/rag/q" > "$WORK/lat.hey"
    printf '%-4s %10s req/s  p50 %8s  p99 %8s  p99.9 %8s  slowest %8s\n' "$side$round" \
      "$(awk '/Requests\/sec/ {print $2}' "$WORK/lat.hey")" \
      "$(awk '$1 == "50%" {print $3 * 1000 " ms"}' "$WORK/lat.hey")" \
      "$(awk '$1 == "99%" {print $3 * 1000 " ms"}' "$WORK/lat.hey")" \
      "$(awk '$1 == "99.9%" {print $3 * 1000 " ms"}' "$WORK/lat.hey")" \
      "$(awk '/Slowest/ {print $2 * 1000 " ms"}' "$WORK/lat.hey")"
    stop_gateway
  done
done
echo "A = $OLD"
echo "B = $NEW"
