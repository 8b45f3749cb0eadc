#!/usr/bin/env bash
# Profile the broker under a loadgen scenario: perf samples of the broker
# process (DWARF call graphs from the release build's line tables) while
# the scenario runs, folded into a flamegraph SVG and a flat top-symbols
# list under results/profile-<name>.{svg,txt}.
#
# Usage: scripts/profile.sh NAME [loadgen fanout args...]
#   BROKER_FLAGS  extra shoal flags (default: a `live` namespace, no limits)
#   SECONDS_REC   seconds of samples (default 6, taken after 3 s of load)
#   NODES=2       two nodes on a Redis bus (one runtime thread each), clients
#                 split over both; both nodes are sampled
# Needs perf (linux-perf) and inferno (`cargo install inferno`).
set -euo pipefail
cd "$(dirname "$0")/.."
name="$1"; shift
command -v perf >/dev/null || { echo "perf is not installed (apt install linux-perf)" >&2; exit 1; }
command -v inferno-flamegraph >/dev/null || { echo "cargo install inferno" >&2; exit 1; }
cargo build --release -p shoal-broker -p shoal-loadgen
tmp="$(mktemp -d)"
. scripts/broker.sh
lg="" redis_pid="" pids=()
cleanup() {
    [ -n "$lg" ] && kill "$lg" 2>/dev/null || true
    stop_all
    rm -rf "$tmp"
}
trap cleanup EXIT
flags=("${BENCH_FLAGS[@]}")
urls=()
if [ "${NODES:-1}" = 2 ]; then
    start_redis "$tmp"
    for i in 0 1; do
        # shellcheck disable=SC2086
        start_broker "$target_dir"/release/shoal "$tmp/n$i" "${flags[@]}" --threads 1 --bus redis \
            --redis-url "redis://127.0.0.1:$rport" --node-id "prof$i" ${BROKER_FLAGS:-}
        pids+=("$pid"); urls+=(--url "$url")
    done
else
    # shellcheck disable=SC2086
    start_broker "$target_dir"/release/shoal "$tmp/data" "${flags[@]}" ${BROKER_FLAGS:-}
    pids+=("$pid"); urls+=(--url "$url")
fi
pid=""
rec="${SECONDS_REC:-6}"
SHOAL_JWT_SECRET="$secret" "$target_dir"/release/loadgen fanout "${urls[@]}" --namespace live \
    --duration "$((rec + 6))" --warmup 1 --quiet --out "$tmp/result.json" "$@" &
lg=$!
sleep 3
perf record -q -F 499 --call-graph dwarf,32768 -p "$(IFS=,; echo "${pids[*]}")" \
    -o "$tmp/perf.data" -- sleep "$rec" 2>/dev/null
wait "$lg" || true; lg=""
perf script -i "$tmp/perf.data" 2>/dev/null | inferno-collapse-perf > "$tmp/folded"
inferno-flamegraph --title "shoal: $name" < "$tmp/folded" > "results/profile-$name.svg"
{
    echo "# perf report --no-children (self time by symbol), ${NODES:-1} broker node(s) under: loadgen fanout $*"
    perf report -i "$tmp/perf.data" --no-children --sort symbol --stdio 2>/dev/null \
        | grep -E '^ +[0-9.]+%' | head -40 || true  # head closes the pipe early
} > "results/profile-$name.txt"
python3 - "$tmp/result.json" <<'PY' | tee -a "results/profile-$name.txt"
import json, sys
r = json.load(open(sys.argv[1]))
l = r["latency"]
print(f"# run: {r.get('deliveries_per_sec', 0):,.0f} deliveries/s, p50 {l['p50']} ms, p99 {l['p99']} ms, "
      f"lost {r.get('lost', 0)}, cpu loadgen {r.get('loadgen_cpu_percent', 0):.0f}%")
PY
echo "results/profile-$name.svg results/profile-$name.txt"
