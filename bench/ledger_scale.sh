#!/usr/bin/env bash
# The ledger at scale: builds a database with ROWS ledger events (default
# 50 million: 20,000 users over the 365 days before today, 5 modules, one
# refund in 20) plus the aggregates the flusher would have written, then
# runs EXPLAIN (ANALYZE, BUFFERS) on the exact queries behind a user's
# GET /api/billing/usage, the admin GET /api/admin/billing/stats, and
# GET /api/admin/billing/usage.csv for one day.
#   bench/ledger_scale.sh [rows=50000000] [out=docs/perf/ledger-scale.txt]
# DAYS=30 spreads the rows over the last 30 days instead of 365: a day then
# holds as many rows as a day of the full 50M-row database with a twelfth
# of the build time (the one-day export reads one day of one partition).
# Needs about 20 GB of disk for 50M rows; KEEP=1 keeps the database,
# EXPLAIN_ONLY=1 only runs the queries on a database kept before.
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${1:-50000000}
OUT=${2:-docs/perf/ledger-scale.txt}
DB=creditgate_scale
USERS=20000
DAYS=${DAYS:-365}
CHUNK=1000000
PSQL=(psql -h 127.0.0.1 -U postgres -qAt -v ON_ERROR_STOP=1)
BIN=${BIN:-target/release/creditgate}
[ -x "$BIN" ] || cargo build --release --quiet

q() { "${PSQL[@]}" -d $DB -c "$1"; }
FIRST=$(date -d "$DAYS days ago" +%F)
FIRST_MS=$(( $(date -d "$FIRST" +%s) * 1000 ))
if [ -z "${EXPLAIN_ONLY:-}" ]; then
"${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS $DB"
CREDITGATE_DATABASE__URL="postgres://postgres@127.0.0.1:5432/$DB" \
  CREDITGATE_AUTH__ADMIN_KEYS='[{ name = "scale", key = "scale-admin-key-123" }]' \
  CREDITGATE_AUTH__SERVICE_KEYS='[{ name = "scale", key = "scale-service-key-123" }]' \
  "$BIN" --config config/creditgate.toml migrate
[ -n "${KEEP:-}" ] || trap '"${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS $DB"' EXIT
echo "== $ROWS events, $USERS users, local days $FIRST .. $(date -d yesterday +%F)"
q "SELECT ledger_ensure_partition((DATE '$FIRST' + make_interval(months => m))::date)
   FROM generate_series(0, $DAYS / 28 + 1) m" >/dev/null
q "INSERT INTO users (id, name, plan, created_at)
   SELECT 'usr_' || lpad(u::text, 6, '0'), 'User ' || u,
          (ARRAY['free', 'starter', 'pro', 'business'])[1 + u % 4], now() - u * interval '1 minute'
   FROM generate_series(0, $USERS - 1) u"
start=$(date +%s)
for ((c = 0; c < ROWS; c += CHUNK)); do
  # Events in time order, as the flusher writes them; i spreads them
  # evenly over the year and round-robin over the users.
  q "INSERT INTO ledger_events (event_id, user_id, kind, module, amount, from_monthly,
       monthly_after, bonus_after, plan, request_id, actor, local_day, occurred_at,
       stream_ms, stream_seq)
     SELECT 'ev-' || i, 'usr_' || lpad((i % $USERS)::text, 6, '0'),
       CASE WHEN i % 20 = 0 THEN 'refund' ELSE 'charge' END,
       (ARRAY['rag', 'legal', 'voice', 'park', 'api'])[1 + (i / $USERS) % 5],
       1 + i % 3, 1 + i % 3, 1000000 - i / $USERS, 0, 'pro', 'req-' || i, 'proxy',
       DATE '$FIRST' + (i * $DAYS / $ROWS)::int,
       to_timestamp(($FIRST_MS + i * ($DAYS * 86400000::bigint) / $ROWS) / 1000.0),
       $FIRST_MS + i * ($DAYS * 86400000::bigint) / $ROWS, i % 1024
     FROM generate_series($c::bigint, LEAST($c + $CHUNK, $ROWS) - 1) i"
  printf '\r  %d rows (%d s)' $((c + CHUNK)) $(( $(date +%s) - start ))
done
echo
echo "  aggregates (as the flusher would have written them)"
# usage_daily (a row per user, day and module) only for the first
# DAILY_USERS users: for all of them it is about 26M rows and its GROUP BY
# took over 30 minutes on the 2-core box. The roll-ups the stats read come
# from every event.
DAILY_USERS=${DAILY_USERS:-1000}
AGG="COALESCE(SUM(amount) FILTER (WHERE kind = 'charge'), 0), COUNT(*) FILTER (WHERE kind = 'charge'),
     COALESCE(SUM(amount) FILTER (WHERE kind = 'refund'), 0), COUNT(*) FILTER (WHERE kind = 'refund')"
"${PSQL[@]}" -d $DB -c "SET work_mem = '256MB'" \
  -c "INSERT INTO usage_daily (user_id, day, module, charged_credits, charges, refunded_credits, refunds)
      SELECT user_id, local_day, module, $AGG FROM ledger_events
      WHERE user_id < 'usr_$(printf %06d "$DAILY_USERS")' GROUP BY 1, 2, 3" \
  -c "INSERT INTO usage_module_daily (day, module, shard, charged_credits, charges, refunded_credits, refunds)
      SELECT local_day, module, (hashtext(user_id) & 15)::smallint, $AGG FROM ledger_events GROUP BY 1, 2, 3" \
  -c "INSERT INTO usage_monthly (user_id, month, charged_credits, charges, refunded_credits, refunds)
      SELECT user_id, date_trunc('month', local_day)::date, $AGG FROM ledger_events GROUP BY 1, 2"
q "VACUUM ANALYZE"
echo "  built in $(( $(date +%s) - start )) s"
fi

USER_ID=usr_000421
TODAY=$(date -d yesterday +%F)   # the last day with events
MONTH=$(date -d "$TODAY" +%Y-%m-01)
FROM30=$(date -d "$TODAY - 29 days" +%F)
# The gateway's connections run with JIT off (src/accounts/mod.rs): so do these.
export PGOPTIONS="-c jit=off"
explain() { # title, SQL, [extra EXPLAIN options]
  echo
  echo "### $1"
  echo
  echo '```'
  q "EXPLAIN (ANALYZE, BUFFERS${3:+, $3}) $2"
  echo '```'
}
{
  echo "# The ledger at $ROWS rows ($(date +%F), bench/ledger_scale.sh)"
  echo
  q "SELECT 'ledger_events: ' || (SELECT count(*) FROM ledger_events) || ' rows in '
           || count(*) || ' partitions, ' || pg_size_pretty(sum(pg_total_relation_size(inhrelid)))
     FROM pg_inherits WHERE inhparent = 'ledger_events'::regclass"
  q "SELECT relname || ': ' || n_live_tup || ' rows' FROM pg_stat_user_tables
     WHERE relname IN ('usage_daily', 'usage_module_daily', 'usage_monthly', 'users') ORDER BY relname"
  echo
  echo "## GET /api/billing/usage (one user, 30 days)"
  explain "usage by day" "SELECT day, module, SUM(charged_credits - refunded_credits)::bigint, SUM(charges - refunds)::bigint
    FROM usage_daily WHERE user_id = '$USER_ID' AND day >= '$FROM30' GROUP BY day, module ORDER BY day, module"
  explain "totals by module" "SELECT module, SUM(charged_credits - refunded_credits)::bigint, SUM(charges - refunds)::bigint
    FROM usage_daily WHERE user_id = '$USER_ID' AND day >= '$FROM30' GROUP BY module ORDER BY module"
  explain "transactions, first page" "SELECT event_id, kind, module, action, amount, monthly_after, bonus_after, request_id, actor, occurred_at
    FROM ledger_events WHERE user_id = '$USER_ID' ORDER BY stream_ms DESC, stream_seq DESC LIMIT 20 OFFSET 0"
  explain "transactions, total" "SELECT count(*) FROM ledger_events WHERE user_id = '$USER_ID'"
  echo
  echo "## GET /api/admin/billing/stats (with the 30-day chart)"
  explain "users per plan and status" "SELECT plan, status, count(*) FROM users GROUP BY plan, status"
  explain "per module, this month" "SELECT module, SUM(charged_credits - refunded_credits)::bigint, SUM(charges - refunds)::bigint
    FROM usage_module_daily WHERE day >= '$MONTH' GROUP BY module ORDER BY module"
  explain "top users, this month" "SELECT m.user_id, u.name, u.plan, (m.charged_credits - m.refunded_credits) AS c
    FROM usage_monthly m JOIN users u ON u.id = m.user_id WHERE m.month = '$MONTH' ORDER BY c DESC, m.user_id LIMIT 10"
  explain "daily chart, 30 days" "SELECT day, module, SUM(charged_credits - refunded_credits)::bigint, SUM(charges - refunds)::bigint
    FROM usage_module_daily WHERE NULL::text IS NULL AND day >= '$FROM30' GROUP BY day, module ORDER BY day, module"
  echo
  echo "## GET /api/admin/billing/usage.csv?from=$TODAY&to=$TODAY"
  # TIMING OFF: per-node timing reads the clock twice per row, which at
  # 137k rows is a fifth of the time measured (docs/BENCHMARKS.md).
  explain "one day of ledger rows (the export asks day by day, unsorted)" "SELECT event_id, user_id, kind, module, action, amount, monthly_after, bonus_after, request_id, actor, local_day, occurred_at
    FROM ledger_events WHERE local_day = '$TODAY'" "TIMING OFF"
} > "$OUT"
grep -E '^(#|ledger_events|usage|users)|Execution Time' "$OUT"
