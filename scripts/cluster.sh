#!/usr/bin/env bash
# A local Redis Cluster on loopback for the demo, the bench and by-hand
# checks: 6 redis-server processes, 3 masters and 3 replicas,
# cluster-node-timeout 2000 ms, each with its AOF in its own directory.
#
#   scripts/cluster.sh start [base-port=7000]   # ports base .. base+5
#   scripts/cluster.sh stop  [base-port=7000]
#   scripts/cluster.sh url   [base-port=7000]   # the redis+cluster:// URL
#
# The gateway needs only some of the nodes in its URL; it discovers the rest.
set -euo pipefail
cmd=${1:-start}
BASE=${2:-7000}
DIR=${CLUSTER_DIR:-/tmp/creditgate-cluster-$BASE}
PORTS=$(seq "$BASE" $((BASE + 5)))

url() { echo "redis+cluster://127.0.0.1:$BASE,127.0.0.1:$((BASE + 1)),127.0.0.1:$((BASE + 2))"; }

stop() {
  for p in $PORTS; do
    redis-cli -p "$p" SHUTDOWN NOSAVE >/dev/null 2>&1 || true
  done
  rm -rf "$DIR"
}

start() {
  command -v redis-server >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  }
  stop
  for p in $PORTS; do
    mkdir -p "$DIR/$p"
    redis-server --port "$p" --bind 127.0.0.1 --dir "$DIR/$p" --daemonize yes \
      --logfile "$DIR/$p/redis.log" --cluster-enabled yes --cluster-config-file nodes.conf \
      --cluster-node-timeout 2000 --appendonly yes --save "" --repl-diskless-sync-delay 0
  done
  for p in $PORTS; do
    until redis-cli -p "$p" PING >/dev/null 2>&1; do sleep 0.1; done
  done
  # shellcheck disable=SC2046
  redis-cli --cluster create $(for p in $PORTS; do printf '127.0.0.1:%s ' "$p"; done) \
    --cluster-replicas 1 --cluster-yes >"$DIR/create.log"
  for p in $PORTS; do
    until redis-cli -p "$p" CLUSTER INFO | grep -q 'cluster_state:ok'; do sleep 0.1; done
  done
  # Replicas attach a moment after the slots are assigned.
  until [ "$(redis-cli -p "$BASE" CLUSTER NODES | grep -c slave)" = 3 ]; do sleep 0.1; done
  # A replica takes over only once it has its master's data.
  for p in $PORTS; do
    until redis-cli -p "$p" INFO replication | grep -qE 'role:master|master_link_status:up'; do sleep 0.1; done
  done
  echo "cluster up on ports $BASE-$((BASE + 5)) (data in $DIR)"
  echo "redis.url = \"$(url)\""
}

case $cmd in
  start) start ;;
  stop) stop ;;
  url) url ;;
  *) echo "usage: $0 start|stop|url [base-port]" >&2; exit 2 ;;
esac
