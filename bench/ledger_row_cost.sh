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

COLUMNS="event_id, user_id, kind, module, action, amount, from_monthly, from_bonus,
  monthly_after, bonus_after, plan, request_id, actor, local_day, occurred_at, stream_ms,
  stream_seq, reason, lease_id"
# Event ids as UUIDv7 text: the millisecond first, so they arrive in order.
"${PSQL[@]}" -d $DB -c "COPY (
  SELECT substr(h, 1, 8) || '-' || substr(h, 9, 4) || '-7' || substr(h, 13, 3) || '-'
           || substr(h, 16, 4) || '-' || substr(h, 20, 12),
         'usr_01a224f0463676a9ac6dea81a42137bf', 'charge', 'rag', NULL, 1, 1, 0, NULL, NULL,
         'bench', md5((i + 1)::text), 'proxy', DATE '2026-11-29',
         TIMESTAMPTZ '2026-11-29 02:00:00+00' + i * INTERVAL '100 microseconds',
         1795916062375 + i / 10, 0, NULL, 'lease-' || (i / 64)
  FROM (SELECT i, lpad(to_hex(1795916062375 + i / 10), 12, '0') || md5(i::text) AS h
        FROM generate_series(1, $ROWS) AS i) AS g) TO STDOUT" > "$WORK/rows.tsv"

load() { # label
  local ms=0 r start
  for r in $(seq "$ROUNDS"); do
    "${PSQL[@]}" -d $DB -c "TRUNCATE ledger_events"
    start=$(date +%s%N)
    "${PSQL[@]}" -d $DB -c "\\copy ledger_events ($COLUMNS) FROM '$WORK/rows.tsv'"
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
