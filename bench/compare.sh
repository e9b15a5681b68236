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
WRK_ARGS=(-t1 -c"$CONNS" -d"$DURATION")

echo "== wrk ${WRK_ARGS[*]} --latency, upstream nginx 'return 200'"
measure nginx "http://$NGINX_PROXY/rag/q" "$(workers_of proxy)" "${WRK_ARGS[@]}"
for round in $(seq "${ROUNDS:-2}"); do
  for side in A B; do
    if [ $side = A ]; then
      BIN=$OLD; CREDITGATE_CONFIG=${OLD_CONFIG:-config/creditgate.toml} start_gateway
    else
      BIN=$NEW; start_gateway
    fi
    curl -fs -H "Authorization: Bearer $KEY" "http://$GATEWAY/rag/warm" >/dev/null
    measure "$side$round" "http://$GATEWAY/rag/q" "$GW_PID" "${WRK_ARGS[@]}"
    stop_gateway
  done
done
echo "A = $OLD"
echo "B = $NEW"
