#!/usr/bin/env bash
# Property-based API tests: schemathesis generates requests from
# /api/openapi.json and checks that no answer is a 5xx and every answer
# matches the document. Runs against a real gateway, Redis and Postgres.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/stack.sh
command -v schemathesis >/dev/null || { log "installing schemathesis"; pip install -q schemathesis; }

prepare_stack st
export CREDITGATE_AUTH__ADMIN_KEYS='[{ name = "schemathesis", key = "st-admin-key-123" }]'
export CREDITGATE_AUTH__SERVICE_KEYS='[{ name = "schemathesis", key = "st-service-key-123" }]'
KEY=$($BIN user create --name "Schema Thesis" --plan pro | sed -n 's/^api_key: //p')
start_stack

schemathesis run "$GATEWAY/api/openapi.json" \
  -H "X-Admin-Key: st-admin-key-123" \
  -H "X-Service-Key: st-service-key-123" \
  -H "X-API-Key: $KEY" \
  --checks not_a_server_error,response_schema_conformance,content_type_conformance \
  --max-examples "${SCHEMATHESIS_EXAMPLES:-40}" \
  --seed 1 \
  --generation-deterministic \
  --workers 1 \
  --no-color
