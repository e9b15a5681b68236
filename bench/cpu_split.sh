#!/usr/bin/env bash
# User against kernel time, and context switches, per request: nginx as a
# plain proxy, the Kong-style peer and creditgate, each under
# wrk -t1 -c50 -d8s, with the upstream nginx's beside it. Read from every
# thread's /proc/<pid>/task/<tid>/{stat,status}. Shows which side of the
# syscall boundary a proxy's cost is on: the kernel's part of proxying is
# much the same for any proxy, the user part is the proxy's own.
#   bench/cpu_split.sh [rounds=1]
# CREDITGATE_BIN and BENCH_LEASES as for bench/proxy.sh.
cd "$(dirname "$0")/.."
ROUNDS=${1:-1}
. bench/common.sh
start_gateway
curl -fs -H "Authorization: Bearer $KEY" "http://$GATEWAY/rag/warm" >/dev/null
# "utime stime voluntary involuntary" summed over every thread of the pids.
stat_of() {
  local u=0 s=0 v=0 i=0 p t a b
  for p in $1; do
    for t in /proc/"$p"/task/*; do
      read -r a b < <(awk '{print $14, $15}' "$t/stat")
      u=$((u + a)); s=$((s + b))
      v=$((v + $(awk '/^voluntary_ctxt/ {print $2}' "$t/status")))
      i=$((i + $(awk '/^nonvoluntary_ctxt/ {print $2}' "$t/status")))
    done
  done
  echo "$u $s $v $i"
}
split_run() { # LABEL URL PIDS
  local before up_before out n
  before=$(stat_of "$3"); up_before=$(stat_of "$(workers_of upstream)")
  out=$(wrk -t1 -c50 -d8s -H "Authorization: Bearer $KEY" "$2")
  n=$(echo "$out" | awk '/requests in/ {print $1}')
  paste <(echo "$before" | tr ' ' '\n') <(stat_of "$3" | tr ' ' '\n') \
        <(echo "$up_before" | tr ' ' '\n') <(stat_of "$(workers_of upstream)" | tr ' ' '\n') |
    awk -v n="$n" -v t="$TICK" -v l="$1" '{d[NR] = $2 - $1; e[NR] = $4 - $3} END {
      printf "%-10s %7d req  user %4.1f  sys %4.1f us/req  switches vol %.2f invol %.2f /req | upstream user %.1f sys %.1f\n",
        l, n, d[1] * 1e6 / t / n, d[2] * 1e6 / t / n, d[3] / n, d[4] / n, e[1] * 1e6 / t / n, e[2] * 1e6 / t / n}'
}
for _ in $(seq "$ROUNDS"); do
  split_run nginx "http://$NGINX_PROXY/rag/q" "$(workers_of proxy)"
  split_run peer "http://$PEER/rag/q" "$(workers_of peer)"
  split_run creditgate "http://$GATEWAY/rag/q" "$GW_PID"
done
