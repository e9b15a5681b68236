#!/usr/bin/env bash
# Before/after on one box, in one run: nginx as a plain reverse proxy, then
# two creditgate builds taking turns (A B, then B A, ...) under the same
# wrk load. The order flips each round because every run grows the ledger
# and Postgres's cost per event grows with it (5.1 -> 7.1 us over three
# rounds of one build): in a fixed order B always ran on the bigger one.
#   bench/compare.sh OLD_BINARY [duration=10s] [connections=50]
# B is the current tree's release build. For each run: req/s, p99, and the
# CPU per request of the gateway and of redis-server, read from /proc.
# OLD_CONFIG: a config file the old build understands (settings added since
# are refused by its strict parser), e.g.
#   git show OLD_COMMIT:config/creditgate.toml > /tmp/old.toml
# OLD_DB: a database of its own for the old build (created new, migrated and
# given the bench user by the old build), with a Redis key prefix of its
# own: an old build refuses a database with migrations it does not know.
cd "$(dirname "$0")/.."
OLD=${1:?usage: bench/compare.sh OLD_BINARY [duration] [connections]}
DURATION=${2:-10s}
CONNS=${3:-50}
. bench/common.sh
NEW=$BIN
NEW_DB_URL=$CREDITGATE_DATABASE__URL
WRK_ARGS=(-t1 -c"$CONNS" -d"$DURATION")

NEW_KEY=$KEY
OLD_KEY=$KEY
OLD_ENV=(CREDITGATE_CONFIG="${OLD_CONFIG:-config/creditgate.toml}")
if [ -n "${OLD_DB:-}" ]; then
  psql -h 127.0.0.1 -U postgres -d postgres -qc "DROP DATABASE IF EXISTS $OLD_DB WITH (FORCE)"
  OLD_ENV+=(CREDITGATE_DATABASE__URL="postgres://postgres@127.0.0.1:5432/$OLD_DB"
            CREDITGATE_REDIS__KEY_PREFIX=bench_old)
  redis-cli --scan --pattern '{bench_old:*' | xargs -r -d '\n' redis-cli del >/dev/null
  env "${OLD_ENV[@]}" "$OLD" migrate 2>/dev/null
  OLD_KEY=$(env "${OLD_ENV[@]}" "$OLD" user create --name bench --plan bench | sed -n 's/^api_key: //p')
fi

echo "== wrk ${WRK_ARGS[*]} --latency, upstream nginx 'return 200'"
measure nginx "http://$NGINX_PROXY/rag/q" "$(workers_of proxy)" "${WRK_ARGS[@]}"
for round in $(seq "${ROUNDS:-2}"); do
  order="A B"
  if [ $((round % 2)) = 0 ]; then order="B A"; fi
  for side in $order; do
    if [ $side = A ]; then
      BIN=$OLD; KEY=$OLD_KEY
      # The assignments hold for the gateway start_gateway runs.
      for kv in "${OLD_ENV[@]}"; do export "$kv"; done
      start_gateway
    else
      BIN=$NEW; KEY=$NEW_KEY
      export CREDITGATE_CONFIG=${BENCH_CONFIG:-config/creditgate.toml}
      export CREDITGATE_DATABASE__URL=$NEW_DB_URL CREDITGATE_REDIS__KEY_PREFIX=bench
      start_gateway
    fi
    curl -fs -H "Authorization: Bearer $KEY" "http://$GATEWAY/rag/warm" >/dev/null
    measure "$side$round" "http://$GATEWAY/rag/q" "$GW_PID" "${WRK_ARGS[@]}"
    stop_gateway
  done
done
echo "A = $OLD"
echo "B = $NEW"
