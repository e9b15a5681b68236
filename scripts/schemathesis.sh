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
# One endpoint (nothing listens there: its deliveries stay pending), so that
# a grant leaves a delivery for the retry operation to find.
export CREDITGATE_WEBHOOKS='[{ url = "http://127.0.0.1:9/hooks", secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", events = ["credits.granted"] }]'
KEY=$($BIN user create --name "Schema Thesis" --plan pro --id st-user | sed -n 's/^api_key: //p')
start_stack

# Path parameters that name things which exist (the user's draft invoice
# for this period, a webhook delivery), so those operations reach their
# code rather than 404.
curl -fsS -X POST "$GATEWAY/api/admin/billing/grant" -H "X-Admin-Key: st-admin-key-123" \
  -H "Content-Type: application/json" \
  -d '{"user_id": "st-user", "credits": 5, "reason": "schemathesis"}' >/dev/null
DELIVERY=
for _ in $(seq 50); do
  DELIVERY=$(curl -fsS "$GATEWAY/api/admin/billing/webhooks/deliveries" -H "X-Admin-Key: st-admin-key-123" |
    python3 -c 'import json, sys; d = json.load(sys.stdin)["deliveries"]; print(d[0]["id"] if d else "")')
  [ -n "$DELIVERY" ] && break
  sleep 0.2
done
[ -n "$DELIVERY" ] || { log "no webhook delivery appeared after a grant"; exit 1; }
CONFIG=/tmp/creditgate-schemathesis.toml
PERIOD=$(TZ=Africa/Algiers date +%Y-%m)
cat > "$CONFIG" <<TOML
[[operations]]
include-path = "/api/billing/invoices/{file}"
parameters = { "path.file" = "$PERIOD.pdf" }

[[operations]]
include-path = "/api/admin/billing/users/{id}/invoices/{file}"
parameters = { "path.id" = "st-user", "path.file" = "$PERIOD.pdf" }

[[operations]]
include-path = "/api/admin/billing/webhooks/deliveries/{id}/retry"
parameters = { "path.id" = $DELIVERY }
TOML

schemathesis --config-file "$CONFIG" run "$GATEWAY/api/openapi.json" \
  -H "X-Admin-Key: st-admin-key-123" \
  -H "X-Service-Key: st-service-key-123" \
  -H "X-API-Key: $KEY" \
  --checks not_a_server_error,response_schema_conformance,content_type_conformance \
  --max-examples "${SCHEMATHESIS_EXAMPLES:-40}" \
  --seed 1 \
  --generation-deterministic \
  --workers 1 \
  --no-color
