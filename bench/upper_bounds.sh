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
#   lease-ceiling  bench/experiments/lease-ceiling.patch: no charge, but
#              every request's charge event goes through a per-runtime
#              spend log (grouped write(2), no fsync; the request waits
#              for it) straight to Postgres, with no Redis at all: the most
#              a lease (docs/LEASES.md) could give on a hot account.
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
git -C "$TREE" checkout -q -- .
git -C "$TREE" apply "$PWD/bench/experiments/lease-ceiling.patch"
variant lease-ceiling
variants_end
for v in canned no-charge lease-ceiling; do
  echo
  echo "######## A = shipped, B = $v"
  CREDITGATE_BIN=$OUT/$v bench/compare.sh "$OUT/shipped" "$DURATION" "$CONNS"
done
