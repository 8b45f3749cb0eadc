#!/usr/bin/env bash
# Benchmark a single release-built broker on loopback with loadgen and
# write results under results/. Usage: scripts/bench.sh [fanout|capacity|connect] [loadgen args...]
# The broker has a `live` namespace without storage (`--namespace live` in
# loadgen measures delivery alone); BROKER_ARGS adds broker flags.
set -euo pipefail
cd "$(dirname "$0")/.."
scenario="${1:-fanout}"; shift || true
cargo build --release -p shoal-broker -p shoal-loadgen
tmp="$(mktemp -d)"
. scripts/broker.sh
trap 'stop_broker; rm -rf "$tmp"' EXIT
start_broker "$target_dir"/release/shoal "$tmp" \
    --rate-limit 1000000 --rate-burst 1000000 --max-rooms-per-connection 4096 \
    --namespace live:persist=off ${BROKER_ARGS:-}
rc=0
SHOAL_JWT_SECRET="$secret" "$target_dir"/release/loadgen "$scenario" --url "$url" "$@" || rc=$?
# What the group-commit writer did during the run.
curl -sf "$url/metrics" | awk '
  /^shoal_store_batch_ops_sum/ {ops=$2} /^shoal_store_batch_ops_count/ {n=$2}
  /^shoal_store_commit_seconds_sum/ {t=$2}
  END { if (n > 0) printf "store: %d commits, %.1f ops per commit, %.3f ms per commit\n", n, ops/n, 1000*t/n }'
exit "$rc"
