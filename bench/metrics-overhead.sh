#!/usr/bin/env bash
# Cost of recording metrics on the hot path: creditgate with
# server.metrics = true and = false, alternating, same wrk settings.
#   bench/metrics-overhead.sh [duration] [rounds]
cd "$(dirname "$0")/.."
. bench/common.sh
DURATION=${1:-10s}
ROUNDS=${2:-2}
declare -A total=([on]=0 [off]=0)
for round in $(seq "$ROUNDS"); do
  for mode in on off; do
    if [ "$mode" = on ]; then export CREDITGATE_SERVER__METRICS=true; else export CREDITGATE_SERVER__METRICS=false; fi
    start_gateway
    curl -fs -H "Authorization: Bearer $KEY" "http://$GATEWAY/rag/warm" >/dev/null
    rps=$(wrk -t2 -c64 -d"$DURATION" -H "Authorization: Bearer $KEY" "http://$GATEWAY/rag/q" | awk '/Requests\/sec/ {print $2}')
    stop_gateway
    echo "round $round metrics=$mode: $rps req/s"
    total[$mode]=$(echo "${total[$mode]} + $rps" | bc)
  done
done
echo "metrics on / off = $(echo "scale=3; ${total[on]} / ${total[off]}" | bc)"
