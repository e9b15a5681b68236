#!/usr/bin/env bash
# Three upper bounds for the throughput work, each measured against this
# checkout's build in turns (bench/compare.sh: nginx, then A B A B):
#   canned     lua/charge.lua replaced by bench/experiments/charge-canned.lua:
#              Redis decides nothing, everything else as shipped (the batch,
#              the events, the flusher, Postgres). The most that taking
#              decisions out of Redis (leases, docs/LEASES.md) could give.
#   no-charge  bench/experiments/no-charge.patch: the proxy charges nothing
#              and writes no event. What the HTTP path costs on its own,
#              the most any metering work could give.
#   leases     this build with credit leases on (docs/LEASES.md), the bench's
#              one account as hot as an account gets. (Before leases were
#              built, a patch here measured their ceiling: a spend log
#              straight to Postgres and no Redis. Its numbers are in
#              docs/BENCHMARKS.md; the real thing replaced it.)
#   bench/upper_bounds.sh [duration=8s] [connections=50]
# The variants are built from HEAD (uncommitted changes are not in them)
# by bench/variants.sh, into target/variants. No variant is ever shipped.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-8s}
CONNS=${2:-50}
OUT=$(mktemp -d /tmp/cg-upper.XXXX)
cargo build --release --quiet
cp target/release/creditgate "$OUT/shipped"
. bench/variants.sh
variants_begin "$OUT"
cp bench/experiments/charge-canned.lua "$TREE/lua/charge.lua"
variant canned
git -C "$TREE" checkout -q -- lua/charge.lua
git -C "$TREE" apply "$PWD/bench/experiments/no-charge.patch"
variant no-charge
variants_end
for v in canned no-charge; do
  echo
  echo "######## A = shipped, B = $v"
  CREDITGATE_BIN=$OUT/$v bench/compare.sh "$OUT/shipped" "$DURATION" "$CONNS"
done
echo
echo "######## A = shipped, B = shipped with credit leases on"
cp config/creditgate.toml "$OUT/leases.toml"
printf '\n[metering.leases]\nenabled = true\ndir = "%s/spend"\n' "$OUT" >> "$OUT/leases.toml"
CREDITGATE_BIN=$OUT/shipped BENCH_CONFIG=$OUT/leases.toml OLD_CONFIG=config/creditgate.toml \
  bench/compare.sh "$OUT/shipped" "$DURATION" "$CONNS"
