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

COLUMNS="event_id, user_id, kind, module, action, amount, from_monthly, from_bonus,
  monthly_after, bonus_after, plan, request_id, actor, local_day, occurred_at, stream_ms,
  stream_seq, reason, lease_id"
# As bench/ledger_row_cost.sh, but 64 users: the user index is a real tree.
"${PSQL[@]}" -d postgres -c "COPY (
  SELECT substr(h, 1, 8) || '-' || substr(h, 9, 4) || '-7' || substr(h, 13, 3) || '-'
           || substr(h, 16, 4) || '-' || substr(h, 20, 12),
         'usr_01a224f0463676a9ac6dea81a4' || lpad((i % 64)::text, 6, '0'), 'charge', 'rag', NULL,
         1, 1, 0, NULL, NULL, 'bench', md5((i + 1)::text), 'proxy', DATE '2026-11-29',
         TIMESTAMPTZ '2026-11-29 02:00:00+00' + i * INTERVAL '100 microseconds',
         1795916062375 + i / 10, 0, NULL, 'lease-' || (i / 64)
  FROM (SELECT i, lpad(to_hex(1795916062375 + i / 10), 12, '0') || md5(i::text) AS h
        FROM generate_series(1, $ROWS) AS i) AS g) TO STDOUT" > "$WORK/rows.tsv"

echo "== $ROWS rows per load, µs per row, in turns"
for r in $(seq "$ROUNDS"); do
  for db in "${DBS[@]}"; do
    "${PSQL[@]}" -d $db -c "TRUNCATE ledger_events" -c CHECKPOINT
    start=$(date +%s%N)
    "${PSQL[@]}" -d $db -c "\\copy ledger_events ($COLUMNS) FROM '$WORK/rows.tsv'"
    ns=$(( $(date +%s%N) - start ))
    printf '%-24s round %d  %5.2f us/row\n' "$db" "$r" "$(echo "scale=2; $ns / 1000 / $ROWS" | bc)"
  done
done
