#!/usr/bin/env bash
# The floor under creditgate's HTTP path, measured in turns with nginx and
# the gateway on one box: examples/hyper_floor.rs is the least reverse
# proxy hyper 1 can be (same runtime layout as the gateway, nothing else);
# the no-charge build (bench/experiments/no-charge.patch) is creditgate
# with its metering taken out; "metered" is creditgate as shipped.
#   bench/hyper_floor.sh [duration=8s] [connections=50]
# ROUNDS (default 2) turns of floor, no-charge, metered after one nginx run.
# The no-charge build is made from HEAD by bench/variants.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-8s}
CONNS=${2:-50}
ROUNDS=${ROUNDS:-2}
OUT=$(mktemp -d /tmp/cg-floor.XXXX)
cargo build --release --quiet --example hyper_floor
cp target/release/examples/hyper_floor "$OUT/floor"
cargo build --release --quiet
cp target/release/creditgate "$OUT/metered"
. bench/variants.sh
variants_begin "$OUT"
git -C "$TREE" apply "$PWD/bench/experiments/no-charge.patch"
variant no-charge
# Before bench/common.sh sets its own EXIT trap.
variants_end
CREDITGATE_BIN=$OUT/metered
. bench/common.sh
FLOOR=127.0.0.1:18209
FLOOR_PID=""
trap 'cleanup; [ -n "$FLOOR_PID" ] && kill "$FLOOR_PID" 2>/dev/null; true' EXIT
WRK_ARGS=(-t1 -c"$CONNS" -d"$DURATION")

echo "== wrk ${WRK_ARGS[*]} --latency, upstream nginx 'return 200' (1 worker)"
measure nginx "http://$NGINX_PROXY/rag/q" "$(workers_of proxy)" "${WRK_ARGS[@]}"
for round in $(seq "$ROUNDS"); do
  # A session of its own, as the gateway's (start_gateway, bench/common.sh).
  LISTEN=$FLOOR UPSTREAM=$UPSTREAM setsid "$OUT/floor" &
  FLOOR_PID=$!
  until curl -fs "http://$FLOOR/rag/warm" >/dev/null; do sleep 0.1; done
  measure "floor-$round" "http://$FLOOR/rag/q" "$FLOOR_PID" "${WRK_ARGS[@]}"
  kill "$FLOOR_PID"; wait "$FLOOR_PID" 2>/dev/null || true; FLOOR_PID=""
  for build in no-charge metered; do
    BIN=$OUT/$build
    start_gateway
    curl -fs -H "Authorization: Bearer $KEY" "http://$GATEWAY/rag/warm" >/dev/null
    measure "$build-$round" "http://$GATEWAY/rag/q" "$GW_PID" "${WRK_ARGS[@]}"
    stop_gateway
  done
done
