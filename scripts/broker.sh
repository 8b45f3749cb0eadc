# Sourced by bench.sh, smoke.sh and soak.sh: start a broker binary on a free
# loopback port with a throwaway secret and data dir, and stop it by PID.
#
#   start_broker BIN DATA_DIR [extra shoal flags...]
#     sets: port, url, secret (export it as SHOAL_JWT_SECRET for loadgen), pid
#   stop_broker

start_broker() {
    local bin="$1" data="$2"
    shift 2
    port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
    url="http://127.0.0.1:$port"
    # Reused when already set, so several brokers accept the same tokens.
    secret="${secret:-run-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')}"
    SHOAL_JWT_SECRET="$secret" "$bin" --listen "127.0.0.1:$port" --data "$data" --log warn "$@" &
    pid=$!
    for _ in $(seq 100); do
        curl -sf "$url/health" >/dev/null && return 0
        sleep 0.1
    done
    echo "broker did not start on $url" >&2
    return 1
}

stop_broker() {
    [ -n "${pid:-}" ] || return 0
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
