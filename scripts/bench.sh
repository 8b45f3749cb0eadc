#!/usr/bin/env bash
# Benchmark a single release-built broker on loopback with loadgen and
# write results under results/. Usage: scripts/bench.sh [fanout|capacity|connect] [loadgen args...]
# The broker has a `live` namespace without storage (`--namespace live` in
# loadgen measures delivery alone); BROKER_ARGS adds broker flags.
# With two cores or more, the broker is pinned to core 0 and loadgen to
# core 1, and the figure to compare is loadgen's "broker ... us per
# delivery": absolute throughput here is that of a box the broker shares
# with its load generator.
set -euo pipefail
cd "$(dirname "$0")/.."
scenario="${1:-fanout}"; shift || true
cargo build --release -p shoal-broker -p shoal-loadgen
tmp="$(mktemp -d)"
. scripts/broker.sh
LOADGEN_PREFIX=""
if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
    BROKER_PREFIX="taskset -c 0"
    LOADGEN_PREFIX="taskset -c 1"
    echo "bench: broker pinned to core 0, loadgen to core 1 ($(nproc) cores; both on this machine)"
else
    echo "bench: broker and loadgen share $(nproc) core(s): CPU figures mix"
fi
trap 'stop_broker; rm -rf "$tmp"' EXIT
start_broker "$target_dir"/release/shoal "$tmp" \
    --rate-limit 1000000 --rate-burst 1000000 --max-rooms-per-connection 4096 \
    --namespace live:persist=off ${BROKER_ARGS:-}
rc=0
SHOAL_JWT_SECRET="$secret" $LOADGEN_PREFIX "$target_dir"/release/loadgen "$scenario" --url "$url" "$@" || rc=$?
# What the group-commit writer did during the run.
curl -sf "$url/metrics" | awk '
  /^shoal_store_batch_ops_sum/ {ops=$2} /^shoal_store_batch_ops_count/ {n=$2}
  /^shoal_store_commit_seconds_sum/ {t=$2}
  END { if (n > 0) printf "store: %d commits, %.1f ops per commit, %.3f ms per commit\n", n, ops/n, 1000*t/n }'
exit "$rc"
