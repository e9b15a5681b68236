# Ledger rows shaped like leased calls, for the scripts that load them
# straight into `ledger_events` (bench/ledger_row_cost.sh,
# bench/ledger_collation.sh). Sourced; needs PSQL (a psql command array).

# The columns the rows fill, in their order (as the gateway's COPY).
LEDGER_COLUMNS="event_id, user_id, kind, module, action, amount, from_monthly, from_bonus,
  monthly_after, bonus_after, plan, request_id, actor, local_day, occurred_at, stream_ms,
  stream_seq, reason, lease_id"

# ledger_rows ROWS USERS: COPY text on stdout. Event ids are UUIDv7 text,
# the millisecond first, so they arrive in order; calls go round USERS
# accounts, ten to a millisecond, 64 to a lease.
ledger_rows() {
  "${PSQL[@]}" -d postgres -c "COPY (
    SELECT substr(h, 1, 8) || '-' || substr(h, 9, 4) || '-7' || substr(h, 13, 3) || '-'
             || substr(h, 16, 4) || '-' || substr(h, 20, 12),
           'usr_01a224f0463676a9ac6dea81a4' || lpad((i % $2)::text, 6, '0'), 'charge', 'rag', NULL,
           1, 1, 0, NULL, NULL, 'bench', md5((i + 1)::text), 'proxy', DATE '2026-11-29',
           TIMESTAMPTZ '2026-11-29 02:00:00+00' + i * INTERVAL '100 microseconds',
           1795916062375 + i / 10, 0, NULL, 'lease-' || (i / 64)
    FROM (SELECT i, lpad(to_hex(1795916062375 + i / 10), 12, '0') || md5(i::text) AS h
          FROM generate_series(1, $1) AS i) AS g) TO STDOUT"
}
