#!/usr/bin/env bash
# Starts a working demo: Redis, PostgreSQL, the demo upstream and the
# gateway on :8207 with config/creditgate.toml, plus a demo user whose key
# is printed with a curl line to try. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh

ensure_cargo
ensure_redis
ensure_postgres

cargo build --quiet
bin=target/debug/creditgate
export CREDITGATE_CONFIG=${CREDITGATE_CONFIG:-config/creditgate.toml}
# The shipped config carries change-me example secrets, which `serve`
# refuses: the demo makes its own, printed below.
secret() { head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
admin_key=${DEMO_ADMIN_KEY:-demo-admin-$(secret)}
service_key=${DEMO_SERVICE_KEY:-demo-service-$(secret)}
export CREDITGATE_AUTH__ADMIN_KEYS="[{ name = \"demo\", key = \"$admin_key\" }]"
export CREDITGATE_AUTH__SERVICE_KEYS="[{ name = \"demo\", key = \"$service_key\" }]"

$bin check-config
$bin migrate

$bin demo-upstream --listen 127.0.0.1:9000 &
upstream=$!
trap 'kill $upstream 2>/dev/null || true' EXIT

created=$($bin user create --name "Demo User" --plan pro)
key=$(printf '%s\n' "$created" | sed -n 's/^api_key: //p')
user=$(printf '%s\n' "$created" | sed -n 's/^user_id: //p')

cat <<MSG

  creditgate demo on http://127.0.0.1:8207 (plan "pro": 2000 credits, 500/day)
  user: $user
  key:  $key   (shown once)
  admin key (X-Admin-Key):     $admin_key
  service key (X-Service-Key): $service_key
  panels: http://127.0.0.1:8207/billing/  and  http://127.0.0.1:8207/billing/admin.html

  try:
    curl -i -H "Authorization: Bearer $key" http://127.0.0.1:8207/rag/search?q=tva
    curl -N -H "Authorization: Bearer $key" http://127.0.0.1:8207/legal/stream
    curl -i -H "Authorization: Bearer $key" http://127.0.0.1:8207/fiscal/fail   # 500: refunded

MSG
$bin serve
