#!/usr/bin/env bash
# System calls per request, by call, for nginx as a plain proxy, the
# Kong-style peer and creditgate (`perf stat` on syscall tracepoints while
# wrk runs). Counts, not times: tracing slows every target, so the req/s
# printed here is not a throughput figure.
#   bench/syscalls.sh [seconds=5] [connections=50]
# BENCH_LEASES=1 and CREDITGATE_BIN as for bench/proxy.sh.
cd "$(dirname "$0")/.."
command -v perf >/dev/null || { . scripts/deps.sh; apt_install linux-perf; }
. bench/common.sh
# One file descriptor per event and thread.
ulimit -n "$(ulimit -Hn)"
SECONDS_=${1:-5}
CONNS=${2:-50}
CALLS="recvfrom sendto read write writev readv recvmsg sendmsg epoll_wait epoll_ctl futex
  sched_yield getsockopt setsockopt accept4 close openat lseek statx mmap munmap madvise
  pwrite64 msync fsync fdatasync ioctl newfstatat"
EVENTS=$(for c in $CALLS; do printf 'syscalls:sys_enter_%s,' "$c"; done)
start_gateway
curl -fs -H "Authorization: Bearer $KEY" "http://$GATEWAY/rag/warm" >/dev/null
curl -fs -H "Authorization: Bearer $KEY" "http://$PEER/rag/warm" >/dev/null
count() { # label url pids
  local label=$1 url=$2 out reqs
  perf stat -e "${EVENTS%,}" -p "$(echo $3 | tr ' ' ',')" -o "$WORK/$label.perf" -- sleep $((SECONDS_ + 1)) &
  local perf_pid=$!
  sleep 0.3
  out=$(wrk -t1 -c"$CONNS" -d"${SECONDS_}s" -H "Authorization: Bearer $KEY" "$url")
  wait $perf_pid
  reqs=$(echo "$out" | awk '/requests in/ {print $1}')
  echo "== $label: $reqs requests"
  awk -v n="$reqs" '/syscalls:sys_enter_/ {gsub(",", "", $1); if ($1 > 0) printf "  %-12s %.3f\n", substr($2, 20), $1 / n; t += $1}
    END {printf "  %-12s %.3f\n", "all", t / n}' "$WORK/$label.perf" | sort -k2 -rn | head -12
}
count nginx "http://$NGINX_PROXY/rag/q" "$(workers_of proxy)"
count peer "http://$PEER/rag/q" "$(workers_of peer)"
# -p on a process counts all its threads.
count creditgate "http://$GATEWAY/rag/q" "$GW_PID"
