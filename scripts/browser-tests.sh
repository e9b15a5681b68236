#!/usr/bin/env bash
# The panels in a real browser: headless Debian chromium driven by
# playwright-core (web/tests/), against a real gateway, Redis and Postgres.
# Screenshots land in docs/screenshots/.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
ensure_redis
ensure_postgres
command -v chromium >/dev/null || apt_install chromium
command -v node >/dev/null || apt_install nodejs npm
[ -d web/tests/node_modules/playwright-core ] || (cd web/tests && npm install --silent --no-audit --no-fund)

cargo build --quiet
BIN=$PWD/target/debug/creditgate
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
GW_PORT=$(port)
UP_PORT=$(port)
DB=creditgate_browser
psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)"
redis-cli --scan --pattern '{bt:*' | xargs -r -d '\n' redis-cli del >/dev/null

export CREDITGATE_CONFIG=config/creditgate.toml
export CREDITGATE_SERVER__LISTEN=127.0.0.1:$GW_PORT
export CREDITGATE_DATABASE__URL=postgres://postgres@127.0.0.1:5432/$DB
export CREDITGATE_REDIS__KEY_PREFIX=bt
export CREDITGATE_AUTH__ADMIN_KEYS='[{ name = "browser", key = "bt-admin-key-123" }]'
export CREDITGATE_LEDGER__BLOCK_MS=100
export CREDITGATE_LOG__LEVEL=warn
# A small plan, so a handful of calls crosses the 80 % and 100 % alerts.
export CREDITGATE_PLANS__MINI__NAME=Mini
export CREDITGATE_PLANS__MINI__MONTHLY_CREDITS=10
export CREDITGATE_PLANS__MINI__PRICE_DZD=500
export CREDITGATE_PLANS__MINI__MODULES='["rag", "park"]'
for m in RAG LEGAL FISCAL VOICE PARK API; do export CREDITGATE_MODULES__${m}__UPSTREAM=http://127.0.0.1:$UP_PORT; done

$BIN migrate 2>/dev/null
$BIN demo-upstream --listen 127.0.0.1:$UP_PORT 2>/dev/null &
UP_PID=$!
$BIN serve 2>/tmp/creditgate-browser.log &
GW_PID=$!
trap 'kill $GW_PID $UP_PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$GW_PORT/healthz" >/dev/null && break; sleep 0.1; done

GATEWAY=http://127.0.0.1:$GW_PORT ADMIN_KEY=bt-admin-key-123 SCREENSHOTS=$PWD/docs/screenshots \
  node --test --test-concurrency=1 web/tests/
