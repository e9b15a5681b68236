#!/usr/bin/env bash
# Proxy throughput, latency and CPU per request, all in one run on one box:
# direct to the upstream, nginx as a plain reverse proxy, the Kong-style
# peer (nginx + Lua + Redis: one EVALSHA deduct + XADD per request), and
# creditgate metering (its ledger flusher included).
#   bench/proxy.sh [--cluster] [duration=15s] [connections=50]
# --cluster: creditgate meters on a local 3-master Redis Cluster
# (scripts/cluster.sh) instead of the single Redis.
# Every proxy runs with its access log off (creditgate: log.level = warn).
cd "$(dirname "$0")/.."
if [ "${1:-}" = --cluster ]; then export BENCH_CLUSTER=1; shift; fi
. bench/common.sh
DURATION=${1:-15s}
CONNS=${2:-50}
WRK_ARGS=(-t1 -c"$CONNS" -d"$DURATION")
start_gateway
curl -fs -H "Authorization: Bearer $KEY" "http://$GATEWAY/rag/warm" >/dev/null
curl -fs -H "Authorization: Bearer $KEY" "http://$PEER/rag/warm" >/dev/null

echo "== wrk ${WRK_ARGS[*]} --latency, upstream nginx 'return 200' (1 worker)"
measure direct "http://$UPSTREAM/rag/q" "" "${WRK_ARGS[@]}"
measure nginx "http://$NGINX_PROXY/rag/q" "$(workers_of proxy)" "${WRK_ARGS[@]}"
measure peer "http://$PEER/rag/q" "$(workers_of peer)" "${WRK_ARGS[@]}"
redis-cli CONFIG RESETSTAT >/dev/null
if [ -n "${BENCH_CLUSTER:-}" ]; then for p in $(seq 7100 7105); do redis-cli -p "$p" CONFIG RESETSTAT >/dev/null; done; fi
thread_ticks "$GW_PID" > "$WORK/threads.before"
measure creditgate "http://$GATEWAY/rag/q" "$GW_PID" "${WRK_ARGS[@]}" &
WRK_PID=$!
# Ledger lag while the proxy runs flat out, sampled every 200 ms.
: > "$WORK/lag"
while kill -0 $WRK_PID 2>/dev/null; do
  [ -z "${BENCH_CLUSTER:-}" ] && redis-cli EVAL "$LAG_LUA" 0 >> "$WORK/lag"
  sleep 0.2
done
wait $WRK_PID
thread_ticks "$GW_PID" > "$WORK/threads.after"

reqs=$(awk '/requests in/ {print $1}' "$WORK/creditgate.wrk")
echo
echo "== ratios"
echo "creditgate / nginx = $(echo "scale=3; $(rps creditgate) / $(rps nginx)" | bc)"
echo "creditgate / peer  = $(echo "scale=3; $(rps creditgate) / $(rps peer)" | bc)"
echo "peer / nginx       = $(echo "scale=3; $(rps peer) / $(rps nginx)" | bc)"
echo
echo "== Redis commands during the creditgate run ($reqs requests)"
# On a cluster, the sum over its masters.
stats() {
  if [ -z "${BENCH_CLUSTER:-}" ]; then redis-cli INFO commandstats; return; fi
  for p in $(seq 7100 7105); do
    [ "$(redis-cli -p "$p" ROLE | head -1)" = master ] && redis-cli -p "$p" INFO commandstats
  done
  true
}
stats | grep -E 'cmdstat_(evalsha|eval|xreadgroup|xack|xdel|xautoclaim|hmget|hset|xadd|sismember|exists|time)' \
  | sed -E 's/cmdstat_([a-z]+):calls=([0-9]+),usec=([0-9]+).*/\1 \2 \3/' \
  | awk -v n="$reqs" '{c[$1] += $2; u[$1] += $3} END {for (k in c) printf "  %-11s %9d calls  %.3f per request  %.2f us per request inside the command\n", k, c[k], c[k] / n, u[k] / n}'
echo
echo "== the gateway's threads during its run: runtimes (creditgate-N), the ledger's flusher (creditgate-ledg)"
thread_split "$WORK/threads.before" "$WORK/threads.after" "$reqs"
echo
echo "== ledger lag during the run (ms, from $(wc -l < "$WORK/lag") samples; not sampled on a cluster)"
[ -s "$WORK/lag" ] && sort -n "$WORK/lag" | awk '{a[NR]=$1} END {printf "  p50 %d  p99 %d  max %d\n", a[int(NR*0.5)+1], a[int(NR*0.99)+1], a[NR]}'

# Latency at a constant rate: half of nginx's maximum, then half of
# creditgate's own maximum (a rate every target can sustain). With wrk2 on
# the PATH (github.com/giltene/wrk2, `make`, copy `wrk` as `wrk2`): its
# latencies count from when each request was due, not sent (no coordinated
# omission), and its one C thread leaves the two cores to the targets far
# more than hey's Go runtime does. Without it, hey.
latency_at() { # rate
  local rate=$1 per_worker=$(( $1 / 32 ))
  echo
  if command -v wrk2 >/dev/null; then
    echo "== latency at a constant $rate req/s: wrk2 -t1 -c32 -d15s -R $rate --latency"
  else
    echo "== latency at a constant $((per_worker * 32)) req/s: hey -z 10s -c 32 -q $per_worker (wrk2 not found)"
  fi
  for target in "direct http://$UPSTREAM/rag/q" "nginx http://$NGINX_PROXY/rag/q" \
                "peer http://$PEER/rag/q" "creditgate http://$GATEWAY/rag/q"; do
    set -- $target
    if command -v wrk2 >/dev/null; then
      wrk2 -t1 -c32 -d15s -R "$rate" --latency -H "Authorization: Bearer $KEY" "$2" > "$WORK/$1.wrk2"
      read -r r a b c d _ < <(wrk2_summary "$WORK/$1.wrk2")
      printf '  %-11s p50 %s  p90 %s  p99 %s  p99.9 %s  (%s req/s)\n' "$1" "$a" "$b" "$c" "$d" "$r"
      continue
    fi
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
