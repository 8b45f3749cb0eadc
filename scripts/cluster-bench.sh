#!/usr/bin/env bash
# Two brokers on one Redis vs one broker, same scenario, same machine.
# Usage: scripts/cluster-bench.sh [fanout|capacity] [loadgen args...]
# Runs the scenario against (1) one broker without storage (`live`
# namespace, the like-for-like baseline: a cluster keeps history in Redis
# streams) and (2) two brokers on a Redis bus with clients split over both,
# and prints Redis CPU per 100k deliveries/s for the cluster run. Results go
# to results/ (cluster-single-*.json, cluster-two-*.json).
# Each cluster node runs CLUSTER_THREADS runtime threads (default 1), so the
# two nodes together have as many as the single node (one per core): on a
# shared machine, more threads than cores only adds context switches.
# CLUSTER_PIN=1 pins node i to CPU i (taskset), the closest this machine
# comes to giving each node its own core.
set -euo pipefail
cd "$(dirname "$0")/.."
scenario="${1:-fanout}"; shift || true
cargo build --release -p shoal-broker -p shoal-loadgen
tmp="$(mktemp -d)"
. scripts/broker.sh
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
redis_pid="" pids=()
cleanup() {
    stop_broker
    stop_all
    rm -rf "$tmp"
}
trap cleanup EXIT
flags=("${BENCH_FLAGS[@]}")
stamp="$(date -u +%Y%m%dT%H%M%SZ)"

echo "== single node"
start_broker "$target_dir"/release/shoal "$tmp/single" "${flags[@]}"
SHOAL_JWT_SECRET="$secret" "$target_dir"/release/loadgen "$scenario" --url "$url" --namespace live \
    --out "results/cluster-single-$scenario-$stamp.json" --quiet "$@"
stop_broker; pid=""

echo "== two nodes on a Redis bus"
start_redis "$tmp"
urls=()
for i in 0 1; do
    start_broker "$target_dir"/release/shoal "$tmp/n$i" "${flags[@]}" --threads "${CLUSTER_THREADS:-1}" --bus redis \
        --redis-url "redis://127.0.0.1:$rport" --node-id "bench$i"
    if [ "${CLUSTER_PIN:-0}" = 1 ]; then taskset -apc "$i" "$pid" >/dev/null; fi
    pids+=("$pid"); urls+=(--url "$url"); pid=""
done
before="$(cpu_ticks "$redis_pid")"
start_s="$(date +%s.%N)"
SHOAL_JWT_SECRET="$secret" "$target_dir"/release/loadgen "$scenario" "${urls[@]}" --namespace live \
    --out "results/cluster-two-$scenario-$stamp.json" --quiet "$@"
after="$(cpu_ticks "$redis_pid")"
end_s="$(date +%s.%N)"
python3 - "$before" "$after" "$start_s" "$end_s" "results/cluster-two-$scenario-$stamp.json" <<'PY'
import json, os, sys
b, a, t0, t1, path = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
hz = os.sysconf("SC_CLK_TCK")
cores = (a - b) / hz / (t1 - t0)
r = json.load(open(path))
d = r.get("deliveries_per_sec") or r.get("summary", {}).get("deliveries_per_sec")
print(f"redis-server: {cores*100:.1f}% of a core over the run (incl. set-up)", end="")
if d:
    print(f"; {cores*100/(d/1e5):.1f}% of a core per 100k deliveries/s ({d:,.0f} deliveries/s)")
else:
    print()
PY
