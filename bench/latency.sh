#!/usr/bin/env bash
# Latency at constant rates, every target in one run, with oha's latency
# correction (a late request's wait counts from when it was due, so a stall
# shows in the percentiles instead of slowing the load down: the
# "coordinated omission" hey and wrk without -R hide):
#   direct to the upstream, nginx as a plain proxy, the Kong-style peer,
#   creditgate as configured, creditgate with credit leases on, and, with
#   NOCHARGE_BIN (a build of bench/experiments/no-charge.patch, as
#   bench/upper_bounds.sh makes), the HTTP path alone.
#   bench/latency.sh [rates="3000 6000"] [duration=8s]
# Needs oha (cargo install oha). 32 connections; p50, p99, p99.9, the rate
# reached and the share of 2xx answers per target and rate.
cd "$(dirname "$0")/.."
RATES=${1:-3000 6000}
DURATION=${2:-8s}
command -v oha >/dev/null || cargo install oha --locked
. bench/common.sh
SHIPPED=$BIN

one() { # label url rate
  oha -z "$DURATION" -c 32 -q "$3" --latency-correction --no-tui --output-format json \
    -H "Authorization: Bearer $KEY" "$2" > "$WORK/oha.json" 2>/dev/null
  python3 - "$1" "$3" "$WORK/oha.json" <<'PY'
import json, sys
label, rate, path = sys.argv[1:]
d = json.load(open(path))
p, s = d["latencyPercentiles"], d["summary"]
print("%-10s %6s req/s: p50 %6.2f ms  p99 %6.2f ms  p99.9 %6.2f ms  (%.0f req/s, 2xx %.3f)" % (
    label, rate, p["p50"] * 1000, p["p99"] * 1000, p["p99.9"] * 1000,
    s["requestsPerSec"], s["successRate"]))
PY
}
gateway() { # label binary leases(0|1) rate
  if [ "$3" = 1 ]; then
    export CREDITGATE_METERING__LEASES__ENABLED=true CREDITGATE_METERING__LEASES__DIR=$WORK/spend
  else
    unset CREDITGATE_METERING__LEASES__ENABLED
  fi
  BIN=$2 start_gateway
  curl -fs -H "Authorization: Bearer $KEY" "http://$GATEWAY/rag/warm" >/dev/null
  one "$1" "http://$GATEWAY/rag/q" "$4"
  stop_gateway
}
echo "== oha -z $DURATION -c 32 -q RATE --latency-correction, upstream nginx 'return 200'"
for rate in $RATES; do
  one direct "http://$UPSTREAM/rag/q" "$rate"
  one nginx "http://$NGINX_PROXY/rag/q" "$rate"
  one peer "http://$PEER/rag/q" "$rate"
  [ -n "${NOCHARGE_BIN:-}" ] && gateway no-charge "$NOCHARGE_BIN" 0 "$rate"
  gateway creditgate "$SHIPPED" 0 "$rate"
  gateway leases "$SHIPPED" 1 "$rate"
done
