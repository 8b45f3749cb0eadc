#!/usr/bin/env bash
# Latency smoke run for `make test`: a broker and loadgen (the debug
# binaries cargo test just built, or release with PROFILE=release) on a free
# loopback port, ~10 s of fanout over a few hundred connections, gated on
# generous absolute bounds (p99 under 50 ms, zero loss, full rate).
# Usage: scripts/smoke.sh [extra loadgen gate args, e.g. --baseline FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${PROFILE:-debug}"
if [ "$profile" = release ]; then
    cargo build --release -p shoal-broker -p shoal-loadgen
elif [ -z "${SKIP_BUILD:-}" ]; then
    # `make test` sets SKIP_BUILD: `cargo test` has just built both binaries.
    cargo build -p shoal-broker -p shoal-loadgen
fi
bin="${CARGO_TARGET_DIR:-target}/$profile"
tmp="$(mktemp -d)"
out="${SMOKE_OUT:-$tmp/smoke.json}"
. scripts/broker.sh
trap 'stop_broker; rm -rf "$tmp"' EXIT
start_broker "$bin/shoal" "$tmp/data" --rate-limit 100000 --rate-burst 100000
SHOAL_JWT_SECRET="$secret" "$bin/loadgen" fanout --url "$url" \
    --rooms 20 --members 15 --publishers 20 --rate 1000 --payload 64 \
    --duration 8 --warmup 2 --quiet --out "$out" --max-p99-ms 50
"$bin/loadgen" gate --current "$out" --max-p99-ms 50 --max-loss 0 "$@"
