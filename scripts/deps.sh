#!/usr/bin/env bash
# Installs and starts what creditgate's demo and tests need on a Debian
# machine, only where missing: redis-server, PostgreSQL (reachable over TCP
# as user postgres without a password, for local use only), psql.
# Sourced by scripts/demo.sh and scripts/test.sh.
set -euo pipefail

log() { printf '\033[1m[deps]\033[0m %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=""
apt_install() {
  if [ -z "$apt_updated" ]; then
    log "apt-get update"
    as_root apt-get update -qq
    apt_updated=1
  fi
  log "installing $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_redis() {
  command -v redis-server >/dev/null || apt_install redis-server
  if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    log "starting redis-server on 127.0.0.1:6379"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
      --logfile /tmp/creditgate-redis.log
    for _ in $(seq 50); do redis-cli -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
  fi
}

pg_ok() { psql -h 127.0.0.1 -U postgres -d postgres -tAc 'select 1' >/dev/null 2>&1; }

ensure_postgres() {
  command -v pg_ctlcluster >/dev/null || apt_install postgresql postgresql-client
  if pg_ok; then return; fi
  local version
  version=$(ls /etc/postgresql | sort -V | tail -n1)
  log "starting PostgreSQL $version"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null || true
  for _ in $(seq 50); do pg_isready -h 127.0.0.1 -q && break; sleep 0.2; done
  if ! pg_ok; then
    # A fresh Debian cluster asks for passwords over TCP. This machine is a
    # dev/CI box: let localhost in as on the reference machines.
    local hba="/etc/postgresql/$version/main/pg_hba.conf"
    log "allowing trust auth for localhost in $hba"
    as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main reload
    sleep 1
  fi
  pg_ok || { log "PostgreSQL is not reachable on 127.0.0.1:5432 as postgres"; exit 1; }
}

ensure_promtool() {
  command -v promtool >/dev/null || apt_install --no-install-recommends prometheus
}

# The Standard Webhooks reference library: the webhook tests check the
# gateway's signatures with it, not with our own code.
ensure_standardwebhooks() {
  command -v python3 >/dev/null || apt_install python3 python3-pip
  python3 -c 'import standardwebhooks' 2>/dev/null && return
  log "installing the Python package standardwebhooks"
  python3 -m pip install -q standardwebhooks 2>/dev/null \
    || python3 -m pip install -q --break-system-packages standardwebhooks
}

# pdftotext (poppler-utils): the invoice tests read the PDFs back.
ensure_pdftotext() {
  command -v pdftotext >/dev/null || apt_install poppler-utils
}

ensure_cargo() {
  command -v cargo >/dev/null || { log "cargo is required (rustup)"; exit 1; }
}
