#!/usr/bin/env bash
# What the key columns' collation costs a ledger row: two databases, both
# migrated, one as shipped (text in the database's default collation,
# C.UTF-8 on Debian) and one with event_id and user_id altered to
# COLLATE "C" (byte order: btree compares with memcmp instead of
# strcoll). ROWS rows shaped like leased calls are loaded with \copy into
# each in turns, ROUNDS times; prints µs per row for each turn.
#   bench/ledger_collation.sh [rows=200000] [rounds=4]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
ensure_postgres
ROWS=${1:-200000}
ROUNDS=${2:-4}
if [ -z "${CREDITGATE_BIN:-}" ]; then cargo build --release --quiet; fi
BIN=${CREDITGATE_BIN:-$PWD/target/release/creditgate}
PSQL=(psql -h 127.0.0.1 -U postgres -qAt -v ON_ERROR_STOP=1)
WORK=$(mktemp -d /tmp/cg-collation.XXXX)
DBS=(cg_bench_coll_default cg_bench_coll_c)
cleanup() {
  for db in "${DBS[@]}"; do "${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"; done
  rm -rf "$WORK"
}
trap cleanup EXIT
for db in "${DBS[@]}"; do
  "${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"
  CREDITGATE_DATABASE__URL=postgres://postgres@127.0.0.1:5432/$db "$BIN" migrate 2>/dev/null
done
"${PSQL[@]}" -d cg_bench_coll_c -c 'ALTER TABLE ledger_events
  ALTER COLUMN event_id TYPE text COLLATE "C", ALTER COLUMN user_id TYPE text COLLATE "C"'

. bench/ledger_rows.sh
# 64 accounts: the user index is a real tree.
ledger_rows "$ROWS" 64 > "$WORK/rows.tsv"

echo "== $ROWS rows per load, µs per row, in turns"
for r in $(seq "$ROUNDS"); do
  for db in "${DBS[@]}"; do
    "${PSQL[@]}" -d $db -c "TRUNCATE ledger_events" -c CHECKPOINT
    start=$(date +%s%N)
    "${PSQL[@]}" -d $db -c "\\copy ledger_events ($LEDGER_COLUMNS) FROM '$WORK/rows.tsv'"
    ns=$(( $(date +%s%N) - start ))
    printf '%-24s round %d  %5.2f us/row\n' "$db" "$r" "$(echo "scale=2; $ns / 1000 / $ROWS" | bc)"
  done
done
