#!/usr/bin/env bash
# `loadgen plan` end to end for `make test`, so it cannot rot: a quick
# calibration (brokers and a redis-server it starts itself, on free
# loopback ports, stopped by PID), a plan for a tiny workload, and a quick
# --verify run; fails unless the report says how many nodes and what
# limits them. Figures of a quick run are coarse: the 20% agreement is
# checked by the full runs recorded in results/ (make plan).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${SKIP_BUILD:-}" ] || cargo build -p shoal-broker -p shoal-loadgen
bin="${CARGO_TARGET_DIR:-target}/debug"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cat > "$tmp/tiny.toml" <<'TOML'
name = "tiny"
connections = 3000
messages_per_connection_per_minute = 2.0
stored_share = 0.5
rooms = [ { size = 4, share = 1.0 } ]

[node]
cores = 2
memory_gib = 1
TOML
"$bin/loadgen" plan --workload "$tmp/tiny.toml" --quick --verify --shoal-bin "$bin/shoal" \
    --calibration "$tmp/calibration.json" --out "$tmp/plan"
grep -q "node(s) of 2 cores" "$tmp/plan/plan.md"
grep -q "limited by" "$tmp/plan/plan.md"
grep -q "Verification on this machine" "$tmp/plan/plan.md"
test -s "$tmp/plan/cpu.svg" && test -s "$tmp/calibration.json"
# The cache is used the second time: no brokers start.
"$bin/loadgen" plan --workload "$tmp/tiny.toml" --quick --shoal-bin /nonexistent \
    --calibration "$tmp/calibration.json" --out "$tmp/plan2" > "$tmp/second.txt"
grep -q "tiny:" "$tmp/second.txt"
echo "plan check passed"
