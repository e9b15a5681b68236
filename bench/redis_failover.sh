#!/usr/bin/env bash
# How long Redis Cluster itself takes to fail over, with no gateway: a
# local cluster (scripts/cluster.sh, cluster-node-timeout 2000), SIGKILL
# of a master, then the time until its replica is master and the cluster
# is ok again, split from the nodes' logs into detection (kill to the
# master marked FAIL) and election (FAIL to "election won", most of it
# Redis's fixed 500 ms + random 0-500 ms delay). The gateway can serve a
# shard again only after this; tests/it/cluster.rs bounds what it adds.
#   bench/redis_failover.sh [runs=10] [base-port=7300]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-10}
BASE=${2:-7300}
DIR=/tmp/creditgate-failover-$BASE
ms() { date +%s%3N; }
log_ms() { # the time of a log line (HH:MM:SS.mmm) as ms since the epoch
  date -d "$(date +%F) $1" +%s%3N
}
for run in $(seq "$RUNS"); do
  CLUSTER_DIR=$DIR scripts/cluster.sh start "$BASE" >/dev/null
  victim=$(redis-cli -p "$BASE" INFO server | sed -n 's/^process_id:\([0-9]*\).*/\1/p')
  id=$(redis-cli -p "$BASE" CLUSTER MYID)
  sleep 2
  killed=$(ms)
  kill -9 "$victim"
  # Done when, seen from another master, three connected masters serve the
  # slots and the cluster is ok.
  until [ "$(redis-cli -p $((BASE + 1)) CLUSTER NODES | grep -v "^$id" | grep master | grep -v fail | grep -c connected)" = 3 ] \
    && redis-cli -p $((BASE + 1)) CLUSTER INFO | grep -q cluster_state:ok; do
    sleep 0.01
  done
  done_at=$(ms)
  failed=$(grep -h -E 'FAIL message received|as failing' "$DIR"/*/redis.log | awk '{print $5}' | sort | head -1)
  won=$(grep -h 'election won' "$DIR"/*/redis.log | awk '{print $5}' | head -1)
  delay=$(grep -h 'election delayed' "$DIR"/*/redis.log | sed -E 's/.*delayed for ([0-9]+).*/\1/' | head -1)
  printf 'run %2d: service back %5d ms after the kill | detection %5d ms, election %4d ms (random delay %s ms)\n' \
    "$run" $((done_at - killed)) $(($(log_ms "$failed") - killed)) $(($(log_ms "$won") - $(log_ms "$failed"))) "$delay"
  CLUSTER_DIR=$DIR scripts/cluster.sh stop "$BASE"
done
