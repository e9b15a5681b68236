#!/usr/bin/env bash
# Proxy throughput and latency: direct to upstream, nginx plain proxy,
# creditgate with metering. Same client settings, one run.
#   bench/proxy.sh [duration] [connections]
cd "$(dirname "$0")/.."
. bench/common.sh
DURATION=${1:-15s}
CONNS=${2:-64}
WRK="wrk -t2 -c$CONNS -d$DURATION --latency -H 'Authorization: Bearer $KEY'"

run_wrk() { # name url
  echo "== $1: $WRK $2" | sed "s/$KEY/<key>/"
  eval "$WRK $2" | tee "$WORK/$1.wrk" | grep -E 'Requests/sec|Latency|50%|99%'
}
start_gateway
curl -fs -H "Authorization: Bearer $KEY" "http://$GATEWAY/rag/warm" >/dev/null

run_wrk direct "http://$UPSTREAM/rag/q"
run_wrk nginx "http://$NGINX_PROXY/rag/q"
redis-cli CONFIG RESETSTAT >/dev/null
run_wrk creditgate "http://$GATEWAY/rag/q" &
WRK_PID=$!
# Ledger lag while the proxy runs flat out, sampled every 200 ms.
: > "$WORK/lag"
while kill -0 $WRK_PID 2>/dev/null; do redis-cli EVAL "$LAG_LUA" 0 >> "$WORK/lag"; sleep 0.2; done
wait $WRK_PID

rps() { grep Requests/sec "$WORK/$1.wrk" | awk '{print $2}'; }
reqs=$(grep -E 'requests in' "$WORK/creditgate.wrk" | awk '{print $1}')
echo
echo "== ratios"
echo "creditgate / nginx  = $(echo "scale=3; $(rps creditgate) / $(rps nginx)" | bc)"
echo "creditgate / direct = $(echo "scale=3; $(rps creditgate) / $(rps direct)" | bc)"
echo
echo "== Redis commands during the creditgate run ($reqs requests)"
redis-cli INFO commandstats | grep -E 'cmdstat_(evalsha|eval|xreadgroup|xack|xdel|xautoclaim|hmget|hset|xadd|sismember|exists)' \
  | sed -E 's/cmdstat_([a-z]+):calls=([0-9]+).*/\1 \2/' \
  | awk -v n="$reqs" '{printf "  %-11s %9d calls  %.3f per request\n", $1, $2, $2 / n}'
echo
echo "== ledger lag during the run (ms, from $(wc -l < "$WORK/lag") samples)"
sort -n "$WORK/lag" | awk '{a[NR]=$1} END {printf "  p50 %d  p99 %d  max %d\n", a[int(NR*0.5)+1], a[int(NR*0.99)+1], a[NR]}'

# Added latency at a constant rate: half of nginx's maximum, then half of
# creditgate's own maximum (a rate every target can sustain).
latency_at() { # rate
  local per_worker=$(( $1 / 32 ))
  echo
  echo "== latency at a constant $((per_worker * 32)) req/s: hey -z 10s -c 32 -q $per_worker"
  for target in "direct http://$UPSTREAM/rag/q" "nginx http://$NGINX_PROXY/rag/q" "creditgate http://$GATEWAY/rag/q"; do
    set -- $target
    hey -z 10s -c 32 -q "$per_worker" -H "Authorization: Bearer $KEY" "$2" > "$WORK/$1.hey"
    printf '  %-11s p50 %s  p99 %s  (%s)\n' "$1" \
      "$(grep -E '^ +50%' "$WORK/$1.hey" | awk '{print $3 * 1000 " ms"}')" \
      "$(grep -E '^ +99%' "$WORK/$1.hey" | awk '{print $3 * 1000 " ms"}')" \
      "$(grep -E 'Requests/sec' "$WORK/$1.hey" | awk '{print $2 " req/s"}')"
  done
}
half_nginx=$(echo "$(rps nginx) / 2" | bc)
half_gw=$(echo "$(rps creditgate) / 2" | bc)
latency_at "${half_nginx%.*}"
latency_at "${half_gw%.*}"
