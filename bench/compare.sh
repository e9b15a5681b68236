#!/usr/bin/env bash
# Before/after on one box, in one run: nginx as a plain reverse proxy, then
# two creditgate builds taking turns (A B A B) under the same wrk load.
#   bench/compare.sh OLD_BINARY [duration=10s] [connections=50]
# B is the current tree's release build. For each run: req/s, p99, and the
# CPU per request of the gateway and of redis-server, read from /proc.
# OLD_CONFIG: a config file the old build understands (settings added since
# are refused by its strict parser), e.g.
#   git show OLD_COMMIT:config/creditgate.toml > /tmp/old.toml
cd "$(dirname "$0")/.."
OLD=${1:?usage: bench/compare.sh OLD_BINARY [duration] [connections]}
DURATION=${2:-10s}
CONNS=${3:-50}
. bench/common.sh
NEW=$BIN
TICK=$(getconf CLK_TCK)
REDIS_PID=$(redis-cli INFO server | sed -n 's/^process_id:\([0-9]*\).*/\1/p')

# utime + stime of the given processes, in clock ticks.
cpu_ticks() { local t=0 p; for p in $1; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo $t; }

run() { # label url "pids of the proxy under test"
  local before_gw before_redis out reqs
  before_gw=$(cpu_ticks "$3"); before_redis=$(cpu_ticks "$REDIS_PID")
  out=$(wrk -t1 -c"$CONNS" -d"$DURATION" --latency -H "Authorization: Bearer $KEY" "$2")
  reqs=$(echo "$out" | awk '/requests in/ {print $1}')
  printf '%-16s %9s req/s  p99 %8s  proxy %5.1f us/req  redis %5.1f us/req\n' "$1" \
    "$(echo "$out" | awk '/Requests\/sec/ {print $2}')" \
    "$(echo "$out" | awk '$1 == "99%" {print $2}')" \
    "$(echo "($(cpu_ticks "$3") - $before_gw) * 1000000 / $TICK / $reqs" | bc -l)" \
    "$(echo "($(cpu_ticks "$REDIS_PID") - $before_redis) * 1000000 / $TICK / $reqs" | bc -l)"
}

echo "== wrk -t1 -c$CONNS -d$DURATION, upstream nginx 'return 200'"
run "nginx proxy" "http://$NGINX_PROXY/rag/q" "$(pgrep -P "$(cat "$WORK/proxy.pid")" | tr '\n' ' ')"
for round in $(seq "${ROUNDS:-2}"); do
  for side in A B; do
    if [ $side = A ]; then
      BIN=$OLD; CREDITGATE_CONFIG=${OLD_CONFIG:-config/creditgate.toml} start_gateway
    else
      BIN=$NEW; start_gateway
    fi
    curl -fs -H "Authorization: Bearer $KEY" "http://$GATEWAY/rag/warm" >/dev/null
    run "$side round $round" "http://$GATEWAY/rag/q" "$GW_PID"
    stop_gateway
  done
done
echo "A = $OLD"
echo "B = $NEW"
