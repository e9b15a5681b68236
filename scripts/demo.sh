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

  try:
    curl -i -H "Authorization: Bearer $key" http://127.0.0.1:8207/rag/search?q=tva
    curl -N -H "Authorization: Bearer $key" http://127.0.0.1:8207/legal/stream
    curl -i -H "Authorization: Bearer $key" http://127.0.0.1:8207/fiscal/fail   # 500: refunded

MSG
$bin serve
