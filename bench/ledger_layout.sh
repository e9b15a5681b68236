#!/usr/bin/env bash
# What the ledger's table layout costs Postgres per inserted event, the
# flusher's way (INSERT ... SELECT of 2,000 rows per statement), in one run:
#   old: one table, primary key on event_id, btree indexes on
#        (user_id, stream_ms, stream_seq), (occurred_at), (user_id, request_id)
#   new: partitioned by month of local_day, primary key (event_id, local_day),
#        btree (user_id, stream_ms, stream_seq), BRIN (local_day)
# The two take turns, ROUNDS times, each into a fresh table; ON CONFLICT
# DO NOTHING as the flusher does (redelivered events insert nothing).
#   bench/ledger_layout.sh [rows per round=200000] [rounds=3]
set -euo pipefail
ROWS=${1:-200000}
ROUNDS=${2:-3}
DB=cg_bench_layout
PSQL=(psql -h 127.0.0.1 -U postgres -qAt -v ON_ERROR_STOP=1)
"${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB"
trap '"${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS $DB"' EXIT

COLUMNS="event_id TEXT NOT NULL, user_id TEXT NOT NULL, kind TEXT NOT NULL, module TEXT,
  action TEXT, amount BIGINT NOT NULL, from_monthly BIGINT NOT NULL DEFAULT 0,
  from_bonus BIGINT NOT NULL DEFAULT 0, monthly_after BIGINT, bonus_after BIGINT, plan TEXT,
  request_id TEXT, actor TEXT NOT NULL, local_day DATE NOT NULL, occurred_at TIMESTAMPTZ NOT NULL,
  stream_ms BIGINT NOT NULL DEFAULT 0, stream_seq BIGINT NOT NULL DEFAULT 0, reason TEXT,
  recorded_at TIMESTAMPTZ NOT NULL DEFAULT now()"

setup_old() {
  "${PSQL[@]}" -d $DB -c "DROP TABLE IF EXISTS ev" -c "CREATE TABLE ev ($COLUMNS, PRIMARY KEY (event_id))" \
    -c "CREATE INDEX ON ev (user_id, stream_ms, stream_seq)" -c "CREATE INDEX ON ev (occurred_at)" \
    -c "CREATE INDEX ON ev (user_id, request_id)"
}
setup_new() {
  "${PSQL[@]}" -d $DB -c "DROP TABLE IF EXISTS ev" \
    -c "CREATE TABLE ev ($COLUMNS, PRIMARY KEY (event_id, local_day)) PARTITION BY RANGE (local_day)" \
    -c "CREATE TABLE ev_2026_11 PARTITION OF ev FOR VALUES FROM ('2026-11-01') TO ('2026-12-01')" \
    -c "CREATE INDEX ON ev (user_id, stream_ms, stream_seq)" -c "CREATE INDEX ON ev USING brin (local_day)"
}

# ROWS events over 10,000 users, in statements of 2,000, uuid-like ids as
# the gateway makes them; prints the milliseconds Postgres took.
insert() {
  local sql="" i
  for ((i = 0; i < ROWS; i += 2000)); do
    sql+="INSERT INTO ev (event_id, user_id, kind, module, amount, from_monthly, monthly_after,
      bonus_after, plan, request_id, actor, local_day, occurred_at, stream_ms, stream_seq)
      SELECT gen_random_uuid()::text, 'usr_' || (g % 10000), 'charge', 'rag', 1, 1, 1000 - g, 0,
        'pro', gen_random_uuid()::text, 'proxy', DATE '2026-11-27', now(), $i + g, g
      FROM generate_series(1, 2000) g ON CONFLICT DO NOTHING;"
  done
  local start end
  start=$(date +%s%N)
  "${PSQL[@]}" -d $DB -c "$sql"
  end=$(date +%s%N)
  echo $(( (end - start) / 1000000 ))
}

for ((r = 1; r <= ROUNDS; r++)); do
  for layout in old new; do
    "setup_$layout"
    ms=$(insert)
    printf '%-4s round %d: %d rows in %5d ms = %5.2f us per row\n' "$layout" "$r" "$ROWS" "$ms" \
      "$(echo "scale=2; $ms * 1000 / $ROWS" | bc)"
  done
done
