#!/bin/bash
# Cost of chat events (edits, reactions) against plain messages: four
# fanout runs on one stored broker each (50 rooms of 10, JSON, 20 s after
# a 3 s warm-up), the broker pinned to core 0 and loadgen to core 1:
#   plain    every publish a message
#   edits    every publish an edit of the publisher's last message
#   react    every publish a reaction (added, then removed)
#   mix      70% messages, 20% edits, 10% reactions
# Writes results/chat-mix-<time>.json (the four reports, the machine) and
# prints broker CPU per delivery for each.
#
# usage: scripts/chat-mix.sh [shoal-binary] [loadgen-binary]
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/shoal}; lg=${2:-target/release/loadgen}
rate=${RATE:-2000}
stamp=$(date -u +%Y%m%dT%H%M%SZ)
out=results/chat-mix-$stamp.json
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
secret=chat-mix-secret-chat-mix-secret-0123456
runs=("plain 0 0" "edits 1 0" "react 0 1" "mix 0.2 0.1")
for r in "${runs[@]}"; do
  read -r name edit react <<<"$r"
  dir=$work/$name; mkdir -p "$dir"
  port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
  SHOAL_JWT_SECRET=$secret taskset -c 0 "$bin" --listen 127.0.0.1:"$port" --data "$dir/data" --log warn \
    --rate-limit 100000 --rate-burst 100000 &
  pid=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.1; done
  SHOAL_JWT_SECRET=$secret taskset -c 1 "$lg" fanout --url "http://127.0.0.1:$port" --rooms 50 --members 10 \
    --rate "$rate" --encoding json --duration 20 --warmup 3 --pid "$pid" \
    --edit-share "$edit" --react-share "$react" --out "$dir/report.json" --quiet > "$dir/out.txt" 2>&1 || true
  kill "$pid"; wait "$pid" 2>/dev/null || true
done
python3 - "$work" "$out" "$rate" <<'PY'
import json, os, platform, sys
work, out, rate = sys.argv[1], sys.argv[2], float(sys.argv[3])
runs = {}
for name in ["plain", "edits", "react", "mix"]:
    r = json.load(open(os.path.join(work, name, "report.json")))
    runs[name] = {
        "deliveries": r["deliveries"], "lost": r["lost"], "errors": r["errors"],
        "achieved_rate": r["achieved_rate"],
        "broker_cpu_us_per_delivery": r["broker_cpu_us_per_delivery"],
        "broker_cpu_percent": r["broker_cpu_percent"],
        "latency_p50_ms": r["latency"]["p50"], "latency_p99_ms": r["latency"]["p99"],
        "ack_p99_ms": r["ack_latency"]["p99"],
    }
base = runs["plain"]["broker_cpu_us_per_delivery"]
doc = {
    "what": "broker CPU per delivery of chat events vs plain messages; stored namespace (SQLite group commit), 50 rooms x 10 members, JSON, fanout from 50 publishers",
    "rate_per_sec": rate,
    "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                "pinning": "broker on core 0, loadgen on core 1 (taskset)"},
    "limited_by": "nothing saturated at this rate: the broker core below 100%, the figures are cost, not capacity",
    "runs": runs,
    "relative_to_plain": {k: round(v["broker_cpu_us_per_delivery"] / base, 2) if base else None for k, v in runs.items()},
}
json.dump(doc, open(out, "w"), indent=2)
for k, v in runs.items():
    print(f"{k:6} {v['broker_cpu_us_per_delivery']:.2f} us/delivery (x{doc['relative_to_plain'][k]}), "
          f"deliveries {v['deliveries']}, lost {v['lost']}, errors {v['errors']}, p99 {v['latency_p99_ms']} ms, broker {v['broker_cpu_percent']}%")
print("wrote", out)
PY
