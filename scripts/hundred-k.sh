#!/usr/bin/env bash
# 100,000 concurrent connections on one 2-core box (make hundred-k): the
# per-process open-file limit here is 20,000, so the cluster path: a
# redis-server and BROKERS broker processes (default 6: 100,000 / 5 would
# put each broker at its limit with no descriptor to spare) on the Redis
# bus, loadgen `connect` split over as many processes and spread over
# several loopback source addresses, every connection idle and answering
# pings; while all are held, a low-rate fanout through rooms whose members
# are spread over every node. Everything on 127.0.0.1, on free ports, in a
# temp dir, stopped by PID.
#
# Writes results/hundred-k-<time>/: connect.json (handshake percentiles,
# memory per connection at every 10,000), fanout.json (delivery
# percentiles, loss) and summary.md.
set -euo pipefail
cd "$(dirname "$0")/.."
brokers="${BROKERS:-6}"
total="${CONNECTIONS:-100000}"
rate="${CONNECT_RATE:-1000}"
cargo build --release -p shoal-broker -p shoal-loadgen
bin="${CARGO_TARGET_DIR:-target}/release"
tmp="$(mktemp -d)"
. scripts/broker.sh
pids=()
cleanup() { stop_all; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
start_redis "$tmp"
per=$(( total / brokers + 1000 ))
urls=()
for i in $(seq "$brokers"); do
    start_broker "$bin/shoal" "$tmp/node$i" --bus redis --redis-url "redis://127.0.0.1:$rport" \
        --node-id "hk$i" --max-connections "$per" --handshake-rate 0 \
        --rate-limit 100000 --rate-burst 100000 --namespace 'live:persist=off'
    pids+=("$pid"); pid=""
    urls+=(--url "$url")
done
export SHOAL_JWT_SECRET="$secret"
out="results/hundred-k-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$out"
ramp=$(( total / rate + 5 ))
hold=$(( 60 ))
echo "== $total connections over $brokers brokers at $rate/s (about ${ramp}s), held ${hold}s"
"$bin/loadgen" connect "${urls[@]}" --connections "$total" --connect-rate "$rate" \
    --processes "$brokers" --step 10000 --hold "$hold" --quiet --out "$out/connect.json" &
connect_pid=$!
# Wait until the brokers hold them all.
# A busy broker may not answer a scrape in time: that is not an error here.
metrics() { for u in "${urls[@]}"; do [ "$u" = --url ] || curl -sf -m 5 "$u/metrics" || true; done; }
n=0
for _ in $(seq $(( ramp * 4 + 60 ))); do
    n="$(metrics | awk '/^shoal_connections[{ ]/ {s += $NF} END {print s+0}')" || n=0
    [ "${n%.*}" -ge "$total" ] && break
    sleep 0.5
done
echo "== brokers hold $n connections; fanout through rooms spanning all nodes"
"$bin/loadgen" fanout "${urls[@]}" --namespace live --rooms 60 --members 12 --publishers 60 \
    --rate 300 --duration 20 --warmup 3 --quiet --out "$out/fanout.json" || true
rss_kib="$(for p in "${pids[@]}"; do awk '/VmRSS/ {print $2}' "/proc/$p/status" || true; done | awk '{s += $1} END {print s+0}')"
redis_kib="$(awk '/VmRSS/ {print $2}' "/proc/$redis_pid/status" || echo 0)"
wait "$connect_pid" || true
python3 - "$out" "$total" "$brokers" "$rss_kib" "$redis_kib" <<'PY'
import json, sys
out, total, brokers, rss_kib, redis_kib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
c = json.load(open(f"{out}/connect.json"))
f = json.load(open(f"{out}/fanout.json"))
env = c.get("env", {})
steps = c["steps"]
last = steps[-1] if steps else {}
md = [f"# {total:,} concurrent connections on one box", "",
      f"Machine: {env.get('cpu_model', '?')}, {env.get('cpus', '?')} CPUs, kernel {env.get('kernel', '?')}; revision {env.get('git_revision', '?')}.",
      f"Per-process open-file limit 20,000, so {brokers} broker processes on one redis-server (the Redis bus), loadgen `connect` in {brokers} processes over several loopback source addresses; brokers, Redis and loadgen share the 2 cores (not pinned: nine processes).", "",
      "| figure | value |", "|---|---|",
      f"| connections established | {c['established']:,} of {c['attempted']:,} ({sum(c['failures_by_cause'].values())} failures: {c['failures_by_cause']}) |",
      f"| connect rate achieved | {c['achieved_connect_rate']:.0f}/s |",
      f"| handshake latency | p50 {c['handshake']['p50']:.2f} ms, p99 {c['handshake']['p99']:.2f} ms, max {c['handshake']['max']:.1f} ms |",
      f"| broker memory per connection (RSS slope, all brokers) | {last.get('bytes_per_connection', 0):.0f} B |",
      f"| broker RSS, all {brokers} brokers, with every connection open | {rss_kib/1024:.0f} MiB ({rss_kib*1024/total:.0f} B per connection, base included) |",
      f"| redis-server RSS | {redis_kib/1024:.0f} MiB |",
      f"| fanout while all are held: rooms of 12 spread over every node, {f['achieved_rate']:.0f} msg/s | {f['deliveries']:,} deliveries, lost {f['lost']}, duplicated {f['duplicated']}, reordered {f['reordered']} |",
      f"| delivery latency | p50 {f['latency']['p50']:.2f} ms, p99 {f['latency']['p99']:.2f} ms, p99.9 {f['latency']['p999']:.2f} ms |",
      f"| broker CPU during the fanout | {' + '.join(f'{x:.0f}%' for x in f['broker_cpu_percent'])} |",
      "", "Memory and handshake latency by step:", "",
      "| open | broker RSS MiB | B/conn | handshake p50 ms | p99 ms |", "|---|---|---|---|---|"]
for s in steps:
    md.append(f"| {s['connections']:.0f} | {s['broker_rss_bytes']/2**20:.0f} | {s['bytes_per_connection']:.0f} | {s['handshake']['p50']:.2f} | {s['handshake']['p99']:.2f} |")
open(f"{out}/summary.md", "w").write("\n".join(md) + "\n")
print("\n".join(md))
PY
"$bin/loadgen" report "$out/fanout.json" --out "$out/charts" >/dev/null || true
echo "results: $out"
