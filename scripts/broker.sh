# Sourced by bench.sh, smoke.sh, soak.sh, cluster-bench.sh and compare.sh: start a broker binary on a free
# loopback port with a throwaway secret and data dir, and stop it by PID.
#
#   start_broker BIN DATA_DIR [extra shoal flags...]
#     sets: port, url, secret (export it as SHOAL_JWT_SECRET for loadgen), pid
#   stop_broker
#   free_port            prints a free loopback port
#   wait_http URL        until URL answers 2xx (10 s)
#   wait_port PORT       until something listens on 127.0.0.1:PORT (30 s)
#   start_redis DIR      a throwaway redis-server (no persistence) in DIR on a
#                        free port; sets rport, redis_pid
#   stop_all             stop the brokers in "${pids[@]}" and $redis_pid
#   BENCH_FLAGS          broker flags of benchmark runs: no rate limits, rooms
#                        in the `live` namespace (no storage)
#   target_dir           where cargo put the binaries (CARGO_TARGET_DIR or
#                        ./target)

target_dir="${CARGO_TARGET_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/target}"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_http() {
    for _ in $(seq 100); do curl -sf "$1" >/dev/null && return 0; sleep 0.1; done
    echo "nothing answered $1" >&2; return 1
}

wait_port() {
    for _ in $(seq 300); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
    echo "nothing listening on port $1" >&2; return 1
}

start_broker() {
    local bin="$1" data="$2"
    shift 2
    port="$(free_port)"
    url="http://127.0.0.1:$port"
    # Reused when already set, so several brokers accept the same tokens.
    secret="${secret:-run-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')}"
    # BROKER_PREFIX: a command to run it under, e.g. `taskset -c 0`.
    SHOAL_JWT_SECRET="$secret" ${BROKER_PREFIX:-} "$bin" --listen "127.0.0.1:$port" --data "$data" --log warn "$@" &
    pid=$!
    wait_http "$url/health"
}

stop_broker() {
    [ -n "${pid:-}" ] || return 0
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

start_redis() {
    rport="$(free_port)"
    redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no --dir "$1" >/dev/null &
    redis_pid=$!
    wait_port "$rport"
}

stop_all() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    [ -n "${redis_pid:-}" ] && kill "$redis_pid" 2>/dev/null || true
    wait 2>/dev/null || true
}

BENCH_FLAGS=(--rate-limit 1000000 --rate-burst 1000000 --max-rooms-per-connection 4096 --namespace live:persist=off)
