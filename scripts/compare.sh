#!/usr/bin/env bash
# Shoal against the servers users compare it with: the same fanout
# scenario, rates and topology on both, one side-by-side result.
#
#   scripts/compare.sh [loadgen fanout args...]           (make compare)
#   TARGET=sockudo scripts/compare.sh [args...]          (make compare-sockudo)
#
# TARGET=socketio (default):
# Installs socket.io and @socket.io/redis-adapter (versions pinned in
# scripts/compare/package-lock.json) from npm into a temp dir, starts
# NODES (1 or 2) Socket.IO servers and NODES Shoal brokers on loopback
# (with 2: both on one redis-server, the Redis adapter against Shoal's
# Redis bus), runs `loadgen fanout` with clients spread over the nodes
# three times: Shoal's native protocol, the same Shoal brokers through
# their Socket.IO endpoint (--protocol socketio with a token), and the
# Node Socket.IO servers; writes results/compare-socketio-<time>.json
# (every run, each with its server's CPU) and a percentile chart beside it.
#
# TARGET=sockudo: sockudo 5.2.0, the nearest Rust peer (Pusher protocol),
# built once with `cargo install --locked` into ~/.cache/shoal/sockudo
# (needs protoc: Debian's protobuf-compiler, installed when missing), with
# a loopback-only config (one app, client events on, limits off; with 2
# nodes its Redis adapter); loadgen speaks --protocol pusher to it.
#
# Shoal runs without storage (`persist=off`) and with JSON frames: neither
# peer keeps history and both speak JSON text, so the work is the same.
#
# COMPARE_CHECK=1 (make test): debug binaries, a short run, results in the
# temp dir; fails unless both sides deliver everything.
set -euo pipefail
cd "$(dirname "$0")/.."
nodes="${NODES:-1}"
check="${COMPARE_CHECK:-0}"
target="${TARGET:-socketio}"
case "$target" in socketio|sockudo) ;; *) echo "TARGET must be socketio or sockudo" >&2; exit 2;; esac
if [ "$check" = 1 ]; then
    bin="${CARGO_TARGET_DIR:-target}/debug"
    [ -n "${SKIP_BUILD:-}" ] || cargo build -p shoal-broker -p shoal-loadgen
    defaults=(--rooms 10 --members 10 --publishers 10 --rate 200 --duration 3 --warmup 1)
else
    bin="${CARGO_TARGET_DIR:-target}/release"
    cargo build --release -p shoal-broker -p shoal-loadgen
    defaults=(--rooms 100 --members 10 --publishers 100 --rate 2000 --duration 20 --warmup 3)
fi
# Flags given on the command line replace the defaults of the same name.
given=" $* "
kept=()
for ((i = 0; i < ${#defaults[@]}; i += 2)); do
    [[ "$given" == *" ${defaults[i]} "* ]] || kept+=("${defaults[i]}" "${defaults[i + 1]}")
done
defaults=("${kept[@]}")
tmp="$(mktemp -d)"
. scripts/broker.sh
children=()
cleanup() {
    for p in "${children[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT
sockudo_version=5.2.0
sockudo="${SHOAL_CACHE:-$HOME/.cache/shoal}/sockudo-$sockudo_version"
if [ "$target" = socketio ]; then
    command -v node >/dev/null || { echo "node missing: make test-deps installs it" >&2; exit 1; }
    cp scripts/compare/package.json scripts/compare/package-lock.json scripts/compare/socketio-server.js "$tmp/"
    npm ci --prefix "$tmp" --no-audit --no-fund --loglevel=error >/dev/null
elif [ ! -x "$sockudo/bin/sockudo" ]; then
    command -v protoc >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq protobuf-compiler >/dev/null; }
    echo "building sockudo $sockudo_version into $sockudo (once; several minutes)"
    # Its own temp target dir, removed afterwards: only the binary is kept.
    CARGO_TARGET_DIR="$tmp/sockudo-target" cargo install sockudo --version "$sockudo_version" --locked \
        --no-default-features --features local,redis --root "$sockudo"
    rm -rf "$tmp/sockudo-target"
fi

redis_url=""
if [ "$nodes" -gt 1 ]; then
    start_redis "$tmp"
    children+=("$redis_pid"); redis_pid=""
    redis_url="redis://127.0.0.1:$rport"
fi

secret="cmp-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
app_key="cmp-key" app_secret="cmp-$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')"
shoal_urls=() peer_urls=() peer_pids=()
for i in $(seq "$nodes"); do
    flags=("${BENCH_FLAGS[@]}")
    [ -n "$redis_url" ] && flags+=(--bus redis --redis-url "$redis_url" --node-id "cmp$i")
    start_broker "$bin/shoal" "$tmp/shoal$i" "${flags[@]}"
    children+=("$pid"); pid=""
    shoal_urls+=(--url "$url")

    port="$(free_port)"
    if [ "$target" = socketio ]; then
        PORT="$port" REDIS_URL="$redis_url" node "$tmp/socketio-server.js" &
        children+=($!); peer_pids+=(--pid "$!")
        wait_http "http://127.0.0.1:$port/health"
    else
        python3 - "$tmp/sockudo$i.json" "$port" "$(free_port)" "$app_key" "$app_secret" "$redis_url" "cmp$i" <<'PY'
import json, sys
path, port, metrics_port, key, secret, redis_url, node = sys.argv[1:8]
adapter, cache, database = {"driver": "local"}, {"driver": "memory"}, {}
if redis_url:
    # Clustered, sockudo also wants its cache in Redis (it refuses to
    # start with a node-local one).
    adapter = {"driver": "redis", "redis": {"prefix": "cmp:",
               "redis_pub_options": {"url": redis_url}, "redis_sub_options": {"url": redis_url}}}
    cache = {"driver": "redis", "redis": {"prefix": "cmp_cache:", "url_override": redis_url}}
    host, port_ = redis_url.rsplit("/", 1)[-1].split(":")
    database = {"redis": {"host": host, "port": int(port_)}}
json.dump({
    "host": "127.0.0.1", "port": int(port), "debug": False, "mode": "production",
    "adapter": adapter,
    "app_manager": {"driver": "memory", "array": {"apps": [{
        "id": "cmp", "key": key, "secret": secret, "enabled": True,
        "enable_client_messages": True, "max_connections": 1000000,
        "max_client_events_per_second": 1000000000}]}},
    "cache": cache, "database": database, "queue": {"driver": "none"},
    "rate_limiter": {"enabled": False},
    "metrics": {"enabled": False, "host": "127.0.0.1", "port": int(metrics_port)},
    "instance": {"process_id": node},
}, open(path, "w"), indent=1)
PY
        (cd "$tmp" && exec "$sockudo/bin/sockudo" --config "$tmp/sockudo$i.json" >"$tmp/sockudo$i.log" 2>&1) &
        children+=($!); peer_pids+=(--pid "$!")
        wait_port "$port" || { tail -20 "$tmp/sockudo$i.log" >&2; exit 1; }
    fi
    peer_urls+=(--url "http://127.0.0.1:$port")
done

stamp="$(date -u +%Y%m%dT%H%M%SZ)"
outdir=results
[ "$check" = 1 ] && outdir="$tmp"
echo "== shoal ($nodes node(s))"
SHOAL_JWT_SECRET="$secret" "$bin/loadgen" fanout "${shoal_urls[@]}" --namespace live --encoding json \
    --quiet "${defaults[@]}" "$@" --out "$tmp/shoal.json" || true
runs=(shoal "$tmp/shoal.json")
if [ "$target" = socketio ]; then
    # The same Shoal brokers through their Socket.IO endpoint: what a
    # Socket.IO app gets from moving to Shoal without touching its client.
    echo "== shoal via socket.io ($nodes node(s))"
    SHOAL_JWT_SECRET="$secret" "$bin/loadgen" fanout --protocol socketio "${shoal_urls[@]}" --namespace live \
        --quiet "${defaults[@]}" "$@" --out "$tmp/shoal-sio.json" || true
    runs+=(shoal-sio "$tmp/shoal-sio.json")
fi
runs+=("$target" "$tmp/$target.json")
echo "== $target ($nodes node(s))"
peer_flags=(--protocol socketio)
[ "$target" = sockudo ] && peer_flags=(--protocol pusher --pusher-key "$app_key" --pusher-secret "$app_secret")
"$bin/loadgen" fanout "${peer_flags[@]}" "${peer_urls[@]}" "${peer_pids[@]}" \
    --quiet "${defaults[@]}" "$@" --out "$tmp/$target.json" || true

out="$outdir/compare-$target-$stamp"
python3 - "$out.json" "$nodes" "$check" "$target" "${runs[@]}" <<'PY'
import json, sys
out, nodes, check, target = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
pairs = sys.argv[5:]
runs = {}
for name, path in zip(pairs[0::2], pairs[1::2]):
    try:
        runs[name] = json.load(open(path))
    except (OSError, ValueError) as e:
        sys.exit(f"compare: no result from {name}: {e}")
json.dump({"scenario": f"compare-{target}", "nodes": nodes, "runs": runs}, open(out, "w"), indent=1)
cols = ["achieved_rate", "deliveries_per_sec", "lost"]
print(f"{'':10} {'msg/s':>8} {'deliv/s':>9} {'lost':>5} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'max ms':>8} {'server cpu %':>13}")
for name, r in runs.items():
    l = r["latency"]
    cpu = "+".join(f"{c:.0f}" for c in r["broker_cpu_percent"])
    print(f"{name:10} {r['achieved_rate']:8.0f} {r['deliveries_per_sec']:9.0f} {r['lost']:5d} "
          f"{l['p50']:8.3f} {l['p99']:8.3f} {l['p999']:9.3f} {l['max']:8.3f} {cpu:>13}")
print(f"written {out}")
bad = [f"{n}: {'; '.join(r['failures'])}" for n, r in runs.items() if r["failures"]]
if check and bad:
    sys.exit("compare check failed: " + " | ".join(bad))
PY
files=()
for ((i = 1; i < ${#runs[@]}; i += 2)); do files+=("${runs[i]}"); done
"$bin/loadgen" report "${files[@]}" --out "$out-charts" >/dev/null
[ "$check" = 1 ] && echo "compare check passed (every run delivered every message)"
exit 0
