#!/usr/bin/env bash
# The panels in a real browser: headless Debian chromium driven by
# playwright-core (web/tests/), against a real gateway, Redis and Postgres.
# Screenshots land in docs/screenshots/.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/stack.sh
command -v chromium >/dev/null || apt_install chromium
command -v node >/dev/null || apt_install nodejs npm
[ -d web/tests/node_modules/playwright-core ] && [ -d web/tests/node_modules/@axe-core/playwright ] \
  || (cd web/tests && npm install --silent --no-audit --no-fund)

prepare_stack bt
export CREDITGATE_AUTH__ADMIN_KEYS='[{ name = "browser", key = "bt-admin-key-123" }]'
export CREDITGATE_LEDGER__BLOCK_MS=100
# A small plan, so a handful of calls crosses the 80 % and 100 % alerts.
export CREDITGATE_PLANS__MINI__NAME=Mini
export CREDITGATE_PLANS__MINI__MONTHLY_CREDITS=10
export CREDITGATE_PLANS__MINI__PRICE_DZD=500
export CREDITGATE_PLANS__MINI__MODULES='["rag", "park"]'
start_stack

GATEWAY=$GATEWAY ADMIN_KEY=bt-admin-key-123 SCREENSHOTS=$PWD/docs/screenshots \
  node --test --test-concurrency=1 web/tests/
