#!/usr/bin/env bash
# What one ledger row costs Postgres, and how much of it each index of the
# shipped schema is: ROWS rows shaped like leased calls (time-ordered event
# ids, one user, COPY text as the gateway sends it) loaded with \copy into
# the table as migrated, then again after dropping, one at a time, the
# user index, the BRIN and the primary key. Each load goes into an
# emptied table, ROUNDS times; prints the milliseconds and µs per row.
#   bench/ledger_row_cost.sh [rows=200000] [rounds=2]
# Builds the release binary for its `migrate` (CREDITGATE_BIN: another).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
ensure_postgres
ROWS=${1:-200000}
ROUNDS=${2:-2}
DB=cg_bench_row_cost
if [ -z "${CREDITGATE_BIN:-}" ]; then cargo build --release --quiet; fi
BIN=${CREDITGATE_BIN:-$PWD/target/release/creditgate}
PSQL=(psql -h 127.0.0.1 -U postgres -qAt -v ON_ERROR_STOP=1)
WORK=$(mktemp -d /tmp/cg-rowcost.XXXX)
"${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)"
trap '"${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)"; rm -rf "$WORK"' EXIT
CREDITGATE_DATABASE__URL=postgres://postgres@127.0.0.1:5432/$DB "$BIN" migrate 2>/dev/null

. bench/ledger_rows.sh
# One account: its index entries all go to one place.
ledger_rows "$ROWS" 1 > "$WORK/rows.tsv"

load() { # label
  local ms=0 r start
  for r in $(seq "$ROUNDS"); do
    "${PSQL[@]}" -d $DB -c "TRUNCATE ledger_events"
    start=$(date +%s%N)
    "${PSQL[@]}" -d $DB -c "\\copy ledger_events ($LEDGER_COLUMNS) FROM '$WORK/rows.tsv'"
    ms=$(( ms + ($(date +%s%N) - start) / 1000000 ))
  done
  printf '%-52s %7d ms  %5.1f us/row\n' "$1" $(( ms / ROUNDS )) \
    "$(echo "scale=1; $ms * 1000 / $ROUNDS / $ROWS" | bc)"
}
echo "== $ROWS rows per load, mean of $ROUNDS loads"
load "as shipped"
"${PSQL[@]}" -d $DB -c "DROP INDEX ledger_events_user_idx"
load "without (user_id, stream_ms, stream_seq)"
"${PSQL[@]}" -d $DB -c "DROP INDEX ledger_events_day_brin"
load "without the BRIN on local_day too"
"${PSQL[@]}" -d $DB -c "ALTER TABLE ledger_events DROP CONSTRAINT ledger_events_pkey"
load "without the primary key too (heap, WAL, parsing)"
