#!/usr/bin/env bash
# A throwaway gateway for the black-box test suites (schemathesis, browser):
# its own database and Redis key prefix, the demo upstream on a free port,
# the debug binary. Sourced; `prepare_stack NAME` sets the environment and
# migrates, then `start_stack` runs the upstream and the gateway in the
# background (stopped on exit) and waits until it answers.
# After it: $BIN, $GATEWAY (http://127.0.0.1:port).
set -euo pipefail
. scripts/deps.sh
ensure_redis
ensure_postgres

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

prepare_stack() { # name: database creditgate_NAME, Redis prefix NAME
  local name=$1
  cargo build --quiet
  BIN=$PWD/target/debug/creditgate
  GW_PORT=$(free_port)
  UP_PORT=$(free_port)
  GATEWAY=http://127.0.0.1:$GW_PORT
  psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS creditgate_$name WITH (FORCE)" 2>/dev/null
  redis-cli --scan --pattern "{$name:*" | xargs -r -d '\n' redis-cli del >/dev/null
  export CREDITGATE_CONFIG=config/creditgate.toml
  export CREDITGATE_SERVER__LISTEN=127.0.0.1:$GW_PORT
  export CREDITGATE_DATABASE__URL=postgres://postgres@127.0.0.1:5432/creditgate_$name
  export CREDITGATE_REDIS__KEY_PREFIX=$name
  export CREDITGATE_LOG__LEVEL=warn
  # `serve` refuses the shipped change-me secrets; suites may override these.
  export CREDITGATE_AUTH__ADMIN_KEYS='[{ name = "stack", key = "stack-admin-key-123" }]'
  export CREDITGATE_AUTH__SERVICE_KEYS='[{ name = "stack", key = "stack-service-key-123" }]'
  for m in RAG LEGAL FISCAL VOICE PARK API; do export CREDITGATE_MODULES__${m}__UPSTREAM=http://127.0.0.1:$UP_PORT; done
  "$BIN" migrate 2>/dev/null
}

start_stack() {
  "$BIN" demo-upstream --listen "127.0.0.1:$UP_PORT" 2>/dev/null &
  local up=$!
  "$BIN" serve 2>"/tmp/creditgate-$CREDITGATE_REDIS__KEY_PREFIX.log" &
  local gw=$!
  trap "kill $gw $up 2>/dev/null || true" EXIT
  for _ in $(seq 100); do curl -fs "$GATEWAY/healthz" >/dev/null && return; sleep 0.1; done
  log "the gateway did not start: /tmp/creditgate-$CREDITGATE_REDIS__KEY_PREFIX.log"
  exit 1
}
