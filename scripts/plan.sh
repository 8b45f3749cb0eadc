#!/usr/bin/env bash
# Capacity plans with verification (make plan): release build, then
# `loadgen plan --verify` for each example workload (or the arguments
# given), brokers on core 0 and loadgen on core 1 (plan pins both itself).
# Results: results/plan-<name>/ (plan.md, plan.json, charts) and the
# calibration cache results/calibration-<host>.json.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p shoal-broker -p shoal-loadgen
bin="${CARGO_TARGET_DIR:-target}/release"
if [ $# -gt 0 ]; then
    "$bin/loadgen" plan --verify "$@"
    exit
fi
for w in chat-200k live-wide support-stored; do
    "$bin/loadgen" plan --example "$w" --verify --out "results/plan-$w" || echo "plan $w: verification outside 20%"
done
