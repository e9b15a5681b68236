#!/usr/bin/env bash
# Shared set-up for the benchmarks: release build, nginx upstream and plain
# reverse proxy, a creditgate configured against them.
set -euo pipefail
. scripts/deps.sh

ensure_redis
ensure_postgres
for tool in wrk nginx hey; do
  command -v $tool >/dev/null || apt_install wrk nginx-light hey
done
# CREDITGATE_BIN: benchmark another build (say, the commit before a change).
if [ -z "${CREDITGATE_BIN:-}" ]; then cargo build --release --quiet; fi
BIN=${CREDITGATE_BIN:-$PWD/target/release/creditgate}
WORK=$(mktemp -d /tmp/cg-bench.XXXX)
UPSTREAM=127.0.0.1:18080
NGINX_PROXY=127.0.0.1:18081
GATEWAY=127.0.0.1:18207

# The fast local upstream (1 worker) and nginx as a plain reverse proxy
# (2 workers, keep-alive to the upstream): two separate instances.
cat > "$WORK/upstream.conf" <<NGINX
worker_processes 1;
pid $WORK/upstream.pid;
error_log $WORK/upstream.err;
events { worker_connections 4096; }
http {
  access_log off;
  server { listen $UPSTREAM; keepalive_requests 1000000; location / { return 200 "ok\n"; } }
}
NGINX
cat > "$WORK/proxy.conf" <<NGINX
worker_processes 2;
pid $WORK/proxy.pid;
error_log $WORK/proxy.err;
events { worker_connections 4096; }
http {
  access_log off;
  upstream up { server $UPSTREAM; keepalive 256; }
  server {
    listen $NGINX_PROXY;
    keepalive_requests 1000000;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
NGINX
nginx -c "$WORK/upstream.conf"
nginx -c "$WORK/proxy.conf"

export CREDITGATE_CONFIG=config/creditgate.toml
export CREDITGATE_SERVER__LISTEN=$GATEWAY
export CREDITGATE_DATABASE__URL=postgres://postgres@127.0.0.1:5432/${BENCH_DB:-creditgate_bench}
export CREDITGATE_REDIS__KEY_PREFIX=bench
export CREDITGATE_LOG__LEVEL=warn
export CREDITGATE_AUTH__ADMIN_KEYS='[{ name = "bench", key = "bench-admin-key-123" }]'
export CREDITGATE_AUTH__SERVICE_KEYS='[{ name = "bench", key = "bench-service-key-123" }]'
export CREDITGATE_PLANS__BENCH__NAME=Bench
export CREDITGATE_PLANS__BENCH__MONTHLY_CREDITS=1000000000
export CREDITGATE_PLANS__BENCH__MODULES='["rag"]'
export CREDITGATE_MODULES__RAG__UPSTREAM=http://$UPSTREAM
redis-cli --scan --pattern '{bench:*' | xargs -r -d '\n' redis-cli del >/dev/null
"$BIN" migrate 2>/dev/null
KEY=$("$BIN" user create --name bench --plan bench | sed -n 's/^api_key: //p')

GW_PID=""
start_gateway() {
  "$BIN" serve 2>"$WORK/gateway.log" &
  GW_PID=$!
  for _ in $(seq 100); do curl -fs "http://$GATEWAY/healthz" >/dev/null && return; sleep 0.1; done
  echo "gateway did not start" >&2; exit 1
}
stop_gateway() { [ -n "$GW_PID" ] && kill "$GW_PID" && wait "$GW_PID" 2>/dev/null || true; GW_PID=""; }

cleanup() {
  stop_gateway
  nginx -c "$WORK/upstream.conf" -s quit 2>/dev/null || true
  nginx -c "$WORK/proxy.conf" -s quit 2>/dev/null || true
}
trap cleanup EXIT

# Largest age (ms) of an unacknowledged usage event, over every stream.
LAG_LUA='local t = redis.call("TIME"); local now = t[1] * 1000 + math.floor(t[2] / 1000); local age = 0
for i = 0, 15 do local e = redis.call("XRANGE", "{bench:" .. i .. "}:events", "-", "+", "COUNT", 1)
  if e[1] then local ms = tonumber(string.match(e[1][1], "^(%d+)")); age = math.max(age, now - ms) end end
return age'
