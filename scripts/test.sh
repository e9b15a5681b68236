#!/usr/bin/env bash
# Runs the whole test suite: starts Redis and PostgreSQL if needed, builds
# once (debug) and runs every test with cargo-nextest (cargo test without it).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh

ensure_cargo
ensure_redis
ensure_postgres
ensure_promtool
ensure_standardwebhooks
ensure_pdftotext

export RUST_BACKTRACE=1
# Property-based API tests and the browser tests first, so the Rust test
# runner's summary closes the log.
bash scripts/schemathesis.sh
bash scripts/browser-tests.sh
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi
