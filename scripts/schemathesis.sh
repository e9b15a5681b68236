#!/usr/bin/env bash
# Property-based API tests: schemathesis generates requests from
# /api/openapi.json and checks that no answer is a 5xx and every answer
# matches the document. Runs against a real gateway, Redis and Postgres.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
ensure_redis
ensure_postgres
command -v schemathesis >/dev/null || { log "installing schemathesis"; pip install -q schemathesis; }

cargo build --quiet
BIN=$PWD/target/debug/creditgate
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
GW_PORT=$(port)
UP_PORT=$(port)
DB=creditgate_schemathesis
psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)"
redis-cli --scan --pattern '{st:*' | xargs -r -d '\n' redis-cli del >/dev/null

export CREDITGATE_CONFIG=config/creditgate.toml
export CREDITGATE_SERVER__LISTEN=127.0.0.1:$GW_PORT
export CREDITGATE_DATABASE__URL=postgres://postgres@127.0.0.1:5432/$DB
export CREDITGATE_REDIS__KEY_PREFIX=st
export CREDITGATE_AUTH__ADMIN_KEYS='[{ name = "schemathesis", key = "st-admin-key-123" }]'
export CREDITGATE_AUTH__SERVICE_KEYS='[{ name = "schemathesis", key = "st-service-key-123" }]'
export CREDITGATE_LOG__LEVEL=warn
for m in RAG LEGAL FISCAL VOICE PARK API; do export CREDITGATE_MODULES__${m}__UPSTREAM=http://127.0.0.1:$UP_PORT; done

$BIN migrate 2>/dev/null
KEY=$($BIN user create --name "Schema Thesis" --plan pro | sed -n 's/^api_key: //p')
$BIN demo-upstream --listen 127.0.0.1:$UP_PORT 2>/dev/null &
UP_PID=$!
$BIN serve 2>/tmp/creditgate-schemathesis.log &
GW_PID=$!
trap 'kill $GW_PID $UP_PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$GW_PORT/healthz" >/dev/null && break; sleep 0.1; done

schemathesis run "http://127.0.0.1:$GW_PORT/api/openapi.json" \
  -H "X-Admin-Key: st-admin-key-123" \
  -H "X-Service-Key: st-service-key-123" \
  -H "X-API-Key: $KEY" \
  --checks not_a_server_error,response_schema_conformance,content_type_conformance \
  --max-examples "${SCHEMATHESIS_EXAMPLES:-40}" \
  --seed 1 \
  --generation-deterministic \
  --workers 1 \
  --no-color
