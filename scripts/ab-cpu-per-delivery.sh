#!/bin/bash
# Broker CPU per delivery of one build, for A/B comparisons of two builds
# on this 2-core machine: the broker pinned to core 0, loadgen to core 1,
# a 20 s JSON fanout (50 rooms of 10, 4,000 msg/s, no storage) on
# loopback. Prints CPU seconds (from /proc/PID/stat), deliveries, CPU per
# delivery, delivery p50/p99 and loss. Alternate the two builds' runs:
# this VM drifts by ~15% over an hour.
#
# The scenario can be changed with ROOMS, MEMBERS, RATE (messages/s) and
# ENCODING; `loadgen floor` gives the kernel's floor for the same writes.
#
# usage: scripts/ab-cpu-per-delivery.sh <shoal-binary> <loadgen-binary> <label>
set -u
rooms=${ROOMS:-50}; members=${MEMBERS:-10}; rate=${RATE:-4000}; enc=${ENCODING:-json}
bin=$1; lg=$2; label=$3
dir=$(mktemp -d); port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
secret=ab-secret-ab-secret-ab-secret-ab-0123
SHOAL_JWT_SECRET=$secret taskset -c 0 $bin --listen 127.0.0.1:$port --data $dir --log warn \
  --rate-limit 100000 --rate-burst 100000 --namespace 'live:persist=off' --threads 1 &
pid=$!
for i in $(seq 100); do curl -sf http://127.0.0.1:$port/health >/dev/null && break; sleep 0.1; done
read -r u0 s0 < <(awk '{print $14, $15}' /proc/$pid/stat)
SHOAL_JWT_SECRET=$secret taskset -c 1 $lg fanout --url http://127.0.0.1:$port --rooms "$rooms" --members "$members" --rate "$rate" \
  --encoding "$enc" --namespace live --duration 20 --warmup 3 --pid $pid --out $dir/r.json --quiet > $dir/out.txt 2>&1
read -r u1 s1 < <(awk '{print $14, $15}' /proc/$pid/stat)
kill $pid; wait $pid 2>/dev/null
tck=$(getconf CLK_TCK)
python3 - "$dir/r.json" "$label" $(( (u1-u0)+(s1-s0) )) $tck <<'PY'
import json,sys
r=json.load(open(sys.argv[1])); label=sys.argv[2]; ticks=int(sys.argv[3]); tck=int(sys.argv[4])
cpu=ticks/tck
d=r.get('delivered') or r.get('deliveries') or 0
L=r.get("latency") or {}
print(f"{label}: cpu {cpu:.2f}s delivered {d} per-delivery {cpu/d*1e6 if d else 0:.1f}us p50 {L.get('p50')} p99 {L.get('p99')} lost {r.get('lost')}")
PY
rm -rf $dir
