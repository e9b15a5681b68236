#!/usr/bin/env bash
# Shared set-up for the benchmarks: release build, nginx upstream, nginx as
# a plain reverse proxy, the Kong-style peer (nginx + Lua + Redis, one
# EVALSHA deduct + XADD per request), a creditgate configured against them,
# and CPU accounting per process from /proc.
set -euo pipefail
. scripts/deps.sh

ensure_redis
ensure_postgres
for tool in wrk nginx hey; do
  command -v $tool >/dev/null || apt_install wrk nginx-light hey
done
# The peer: Debian's lua-nginx-redis is lua-resty-redis (as `nginx.redis`).
[ -f /usr/lib/nginx/modules/ngx_http_lua_module.so ] && [ -f /usr/share/lua/5.1/nginx/redis.lua ] \
  || apt_install libnginx-mod-http-lua lua-nginx-redis
# CREDITGATE_BIN: benchmark another build (say, the commit before a change).
if [ -z "${CREDITGATE_BIN:-}" ]; then cargo build --release --quiet; fi
BIN=${CREDITGATE_BIN:-$PWD/target/release/creditgate}
WORK=$(mktemp -d /tmp/cg-bench.XXXX)
UPSTREAM=127.0.0.1:18080
NGINX_PROXY=127.0.0.1:18081
GATEWAY=127.0.0.1:18207
PEER=127.0.0.1:18082

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
PEER_SHA=$(redis-cli SCRIPT LOAD "$(cat bench/peer/charge.lua)")
# Workers run as www-data: everything they read is in this (root-only)
# file, which the master reads before dropping privileges.
cat > "$WORK/peer.conf" <<NGINX
load_module /usr/lib/nginx/modules/ndk_http_module.so;
load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;
worker_processes 2;
pid $WORK/peer.pid;
error_log $WORK/peer.err;
events { worker_connections 4096; }
http {
  access_log off;
  lua_package_path "/usr/share/lua/5.1/?.lua;;";
  upstream up { server $UPSTREAM; keepalive 256; }
  server {
    listen $PEER;
    keepalive_requests 1000000;
    location / {
      access_by_lua_block {
        local auth = ngx.var.http_authorization
        if not auth then return ngx.exit(401) end
        local red = require("nginx.redis"):new()
        red:set_timeouts(250, 250, 250)
        local ok = red:connect("127.0.0.1", 6379)
        if not ok then return ngx.exit(503) end
        local left = red:evalsha("$PEER_SHA", 2, "peer:acct:" .. auth, "peer:events", 1, ngx.now())
        if not left then return ngx.exit(503) end
        red:set_keepalive(10000, 512)
        if left < 0 then return ngx.exit(402) end
      }
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
NGINX
nginx -c "$WORK/upstream.conf"
nginx -c "$WORK/proxy.conf"
nginx -c "$WORK/peer.conf"

export CREDITGATE_CONFIG=${BENCH_CONFIG:-config/creditgate.toml}
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
# BENCH_LEASES=1: credit leases on (docs/LEASES.md), with their defaults;
# the spend log in this run's work directory. The bench's one account is
# as hot as an account gets.
if [ -n "${BENCH_LEASES:-}" ]; then
  export CREDITGATE_METERING__LEASES__ENABLED=true
  export CREDITGATE_METERING__LEASES__DIR=$WORK/spend
fi
redis-cli --scan --pattern '{bench:*' | xargs -r -d '\n' redis-cli del >/dev/null
# BENCH_CLUSTER=1: the gateway meters on a fresh local Redis Cluster
# (scripts/cluster.sh, ports 7100-7105) instead of the Redis on 6379; the
# peer keeps the single Redis.
if [ -n "${BENCH_CLUSTER:-}" ]; then
  scripts/cluster.sh start 7100 >/dev/null
  CREDITGATE_REDIS__URL=$(scripts/cluster.sh url 7100)
  export CREDITGATE_REDIS__URL
fi
# A new ledger for every run (BENCH_KEEP_DB=1 keeps it): each run adds up
# to a million rows, and this box's Postgres runs without autovacuum
# (`SHOW autovacuum`), so runs on one database would not start alike.
if [ -z "${BENCH_KEEP_DB:-}" ]; then
  psql -h 127.0.0.1 -U postgres -d postgres -qc "DROP DATABASE IF EXISTS ${BENCH_DB:-creditgate_bench} WITH (FORCE)"
fi
"$BIN" migrate 2>/dev/null
KEY=$("$BIN" user create --name bench --plan bench | sed -n 's/^api_key: //p')
redis-cli SET "peer:acct:Bearer $KEY" 1000000000 >/dev/null
redis-cli DEL peer:events >/dev/null

# ---------------------------------------------------------------- CPU
TICK=$(getconf CLK_TCK)
REDIS_PID=$(redis-cli INFO server | sed -n 's/^process_id:\([0-9]*\).*/\1/p')
# On a cluster, "redis" is every node of the gateway's cluster plus the
# single Redis (the peer's); each target only uses one of the two.
[ -n "${BENCH_CLUSTER:-}" ] && REDIS_PID="$REDIS_PID $(pgrep -f 'redis-server 127.0.0.1:710[0-5]' | tr '\n' ' ')"
workers_of() { pgrep -P "$(cat "$WORK/$1.pid")" | tr '\n' ' '; }
# utime + stime of the given processes, in clock ticks.
cpu_ticks() { local t=0 p; for p in $1; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0))); done; echo $t; }

# "pid ticks" for every Postgres process, and "exited ticks": what its
# processes that have ended used (the postmaster's cutime + cstime). A
# list of pids taken before a run misses the backends a run opens (the
# gateway's pools grow under load: with leases, 5 new backends held 90 %
# of Postgres's CPU), so a run is the difference of two snapshots.
pg_snapshot() {
  local p
  for p in $(pgrep -u postgres); do
    echo "$p $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)"
  done
  echo "exited $(awk '{print $16 + $17}' "/proc/$(pgrep -o -u postgres)/stat")"
}
# pg_delta BEFORE AFTER: Postgres's ticks between two snapshots.
pg_delta() {
  LC_ALL=C join -a2 -e0 -o 0,1.2,2.2 <(echo "$1" | LC_ALL=C sort) <(echo "$2" | LC_ALL=C sort) \
    | awk '{t += $3 - $2} END {print t + 0}'
}

# The whole box's CPU time, in clock ticks: user (with nice), system,
# softirq, idle (with iowait), from /proc/stat.
box_ticks() { awk '/^cpu / {print $2 + $3, $4, $8, $5 + $6}' /proc/stat; }
# box_split BEFORE AFTER REQUESTS: the same, in µs per request. The per
# process figures miss what no process is charged for (softirq: most of
# the loopback's TCP work) and wrk itself; these add up to the box's cores.
box_split() {
  paste -d' ' <(echo "$1" | tr ' ' '\n') <(echo "$2" | tr ' ' '\n') \
    | awk -v n="$3" -v t="$TICK" 'BEGIN {split("user sys softirq idle", l, " ")}
        {printf "%s %.1f  ", l[NR], ($2 - $1) * 1e6 / t / n}'
}

# measure LABEL URL "PROXY PIDS" [wrk options]: one wrk run, then a line
# with req/s, p50/p99, and the CPU per request (µs) of the proxy under
# test, Redis, Postgres and the upstream nginx, read from /proc; and a
# second line with the whole box's, split as box_split does.
measure() {
  local label=$1 url=$2 pids=$3; shift 3
  local upstream pg b_proxy b_redis b_pg b_up b_box a_box out reqs
  upstream=$(workers_of upstream)
  b_proxy=$(cpu_ticks "$pids"); b_redis=$(cpu_ticks "$REDIS_PID")
  b_pg=$(pg_snapshot); b_up=$(cpu_ticks "$upstream"); b_box=$(box_ticks)
  out=$(wrk --latency -H "Authorization: Bearer $KEY" "$@" "$url")
  a_box=$(box_ticks)
  echo "$out" > "$WORK/$label.wrk"
  reqs=$(echo "$out" | awk '/requests in/ {print $1}')
  us() { echo "scale=1; ($1) * 1000000 / $TICK / $reqs" | bc; }
  printf '%-18s %9s req/s  p50 %7s  p99 %7s | us/req: proxy %5s  redis %5s  postgres %5s  upstream %5s\n' \
    "$label" "$(echo "$out" | awk '/Requests\/sec/ {print $2}')" \
    "$(echo "$out" | awk '$1 == "50%" {print $2}')" "$(echo "$out" | awk '$1 == "99%" {print $2}')" \
    "$(us "$(cpu_ticks "$pids") - $b_proxy")" "$(us "$(cpu_ticks "$REDIS_PID") - $b_redis")" \
    "$(us "$(pg_delta "$b_pg" "$(pg_snapshot)")")" "$(us "$(cpu_ticks "$upstream") - $b_up")"
  printf '%-18s box us/req: %s\n' "" "$(box_split "$b_box" "$a_box" "$reqs")"
}
# CPU ticks of each thread of a process, summed by thread name:
# "name ticks" lines (the gateway names its runtime and ledger threads).
thread_ticks() {
  local t
  for t in /proc/"$1"/task/*; do
    echo "$(tr ' ' _ < "$t/comm") $(awk '{print $14 + $15}' "$t/stat" 2>/dev/null || echo 0)"
  done | awk '{a[$1] += $2} END {for (k in a) print k, a[k]}' | sort
}
# thread_split BEFORE AFTER REQUESTS: the µs per request of each thread
# that worked, from two thread_ticks snapshots.
thread_split() {
  join "$1" "$2" | awk -v n="$3" -v tk="$TICK" '$3 > $2 {printf "  %-16s %5.1f us/req\n", $1, ($3 - $2) * 1e6 / tk / n}'
}
rps() { awk '/Requests\/sec/ {print $2}' "$WORK/$1.wrk"; }
# From a `wrk2 --latency` output file: "req/s p50 p90 p99 p99.9 slowest".
wrk2_summary() {
  awk '/^ *50.000%/ {a=$2} /^ *90.000%/ {b=$2} /^ *99.000%/ {c=$2} /^ *99.900%/ {d=$2}
       /^ *100.000%/ {e=$2} /Requests\/sec/ {r=$2} END {print r, a, b, c, d, e}' "$1"
}

GW_PID=""
# The gateway gets a session of its own, as the nginx instances have (they
# daemonize) and as a service has under systemd: with the kernel's
# autogroup scheduling (/proc/sys/kernel/sched_autogroup_enabled) a session
# is one scheduling group, and a gateway left in this script's session
# shared one group's share of the CPU with wrk. Measured in turns, six
# rounds: the box idled 4.7 us a request with the shared session, 3.1 with
# its own (docs/BENCHMARKS.md). setsid does not fork here (a background
# job of a script is no process group leader), so $! is the gateway.
start_gateway() {
  setsid "$BIN" serve 2>"$WORK/gateway.log" &
  GW_PID=$!
  for _ in $(seq 100); do curl -fs "http://$GATEWAY/healthz" >/dev/null && return; sleep 0.1; done
  echo "gateway did not start" >&2; exit 1
}
stop_gateway() { [ -n "$GW_PID" ] && kill "$GW_PID" && wait "$GW_PID" 2>/dev/null || true; GW_PID=""; }

cleanup() {
  stop_gateway
  nginx -c "$WORK/upstream.conf" -s quit 2>/dev/null || true
  nginx -c "$WORK/proxy.conf" -s quit 2>/dev/null || true
  nginx -c "$WORK/peer.conf" -s quit 2>/dev/null || true
  [ -n "${BENCH_CLUSTER:-}" ] && scripts/cluster.sh stop 7100
  true
}
trap cleanup EXIT

# Largest age (ms) of an unacknowledged usage event, over every stream.
LAG_LUA='local t = redis.call("TIME"); local now = t[1] * 1000 + math.floor(t[2] / 1000); local age = 0
for i = 0, 15 do local e = redis.call("XRANGE", "{bench:" .. i .. "}:events", "-", "+", "COUNT", 1)
  if e[1] then local ms = tonumber(string.match(e[1][1], "^(%d+)")); age = math.max(age, now - ms) end end
return age'
