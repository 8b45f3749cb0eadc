#!/usr/bin/env bash
# `make cluster NODES=3` / `make cluster-down`: a local Shoal cluster on
# loopback, every process started from a state dir and stopped by its PID.
#
#   cluster.sh up [NODES]   Redis, PostgreSQL, NODES brokers on the Redis bus
#                           with the shared PostgreSQL store, nginx (TLS
#                           with a self-signed certificate) in front
#   cluster.sh down         stop exactly what `up` started
#
# Ports: brokers 8081.., nginx 8443 (wss/https), Redis 6390, PostgreSQL
# 5440; override with SHOAL_CLUSTER_BASE_PORT, SHOAL_CLUSTER_NGINX_PORT,
# SHOAL_CLUSTER_REDIS_PORT, SHOAL_CLUSTER_PG_PORT.
# State, logs and data: $SHOAL_CLUSTER_DIR (default /tmp/shoal-cluster).
# PostgreSQL runs as the `postgres` user when started by root (it refuses
# to run as root), with trust authentication on 127.0.0.1 only.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="${SHOAL_CLUSTER_DIR:-/tmp/shoal-cluster}"
base="${SHOAL_CLUSTER_BASE_PORT:-8081}"
ngx_port="${SHOAL_CLUSTER_NGINX_PORT:-8443}"
redis_port="${SHOAL_CLUSTER_REDIS_PORT:-6390}"
pg_port="${SHOAL_CLUSTER_PG_PORT:-5440}"
pg_bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
as_pg() { if [ "$(id -u)" -eq 0 ]; then setpriv --reuid=postgres --regid=postgres --init-groups "$@"; else "$@"; fi; }
bin="${SHOAL_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/shoal}"

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on 127.0.0.1:$1 (see $dir/*.log)" >&2
    return 1
}

down() {
    [ -f "$dir/pids" ] || { echo "no cluster running (no $dir/pids)"; return 0; }
    # nginx last in the file, brokers before it, Redis first: stop in reverse.
    tac "$dir/pids" | while read -r name pid; do
        if kill "$pid" 2>/dev/null; then
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            echo "stopped $name (pid $pid)"
        fi
    done
    rm -f "$dir/pids"
}

up() {
    local nodes="${1:-3}"
    [ -f "$dir/pids" ] && { echo "a cluster is already running; make cluster-down first" >&2; exit 1; }
    [ -x "$bin" ] || { echo "$bin missing: cargo build --release -p shoal-broker" >&2; exit 1; }
    [ -n "$pg_bin" ] || { echo "PostgreSQL is not installed (make test-deps)" >&2; exit 1; }
    for p in "$redis_port" "$pg_port" "$ngx_port" $(seq "$base" $((base + nodes - 1))); do
        port_free "$p" || { echo "port $p is taken" >&2; exit 1; }
    done
    mkdir -p "$dir"
    : >"$dir/pids"
    trap 'echo "start failed; stopping what started" >&2; down' ERR

    redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$dir" --save '' \
        --appendonly yes --appendfsync everysec >"$dir/redis.log" 2>&1 &
    echo "redis $!" >>"$dir/pids"
    wait_port "$redis_port"

    mkdir -p "$dir/pg"
    if [ "$(id -u)" -eq 0 ]; then
        # The postgres user must reach its directory through ours.
        chmod o+x "$dir"
        chown postgres:postgres "$dir/pg"
    fi
    as_pg "$pg_bin/initdb" -A trust -U shoal -E UTF8 -D "$dir/pg/data" >"$dir/postgres-init.log" 2>&1
    as_pg "$pg_bin/postgres" -D "$dir/pg/data" -h 127.0.0.1 -p "$pg_port" -k "$dir/pg" \
        >"$dir/postgres.log" 2>&1 &
    echo "postgres $!" >>"$dir/pids"
    wait_port "$pg_port"

    local secret="${SHOAL_JWT_SECRET:-cluster-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')}"
    echo "$secret" >"$dir/jwt_secret"
    local upstreams=()
    for i in $(seq 0 $((nodes - 1))); do
        local port=$((base + i))
        mkdir -p "$dir/node$i"
        SHOAL_JWT_SECRET="$secret" "$bin" --listen "127.0.0.1:$port" --data "$dir/node$i" \
            --node-id "node$i" --bus redis --redis-url "redis://127.0.0.1:$redis_port" \
            --store postgres --postgres-url "postgres://shoal@127.0.0.1:$pg_port/postgres" \
            >"$dir/node$i.log" 2>&1 &
        echo "node$i $!" >>"$dir/pids"
        upstreams+=("127.0.0.1:$port")
    done
    # Ready means healthy: a node refuses WebSocket handshakes until its
    # Redis bus is up.
    for i in $(seq 0 $((nodes - 1))); do
        wait_port $((base + i))
        for _ in $(seq 100); do curl -sf "http://127.0.0.1:$((base + i))/health" >/dev/null && break; sleep 0.1; done
    done

    openssl req -x509 -newkey rsa:2048 -nodes -subj /CN=localhost \
        -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -days 30 \
        -keyout "$dir/key.pem" -out "$dir/cert.pem" 2>/dev/null
    "$root/scripts/nginx-conf.sh" "$dir/nginx" "127.0.0.1:$ngx_port" "$dir/cert.pem" \
        "$dir/key.pem" "${upstreams[@]}" >/dev/null
    nginx -p "$dir/nginx" -c "$dir/nginx/nginx.conf" -g 'daemon off;' >"$dir/nginx.log" 2>&1 &
    echo "nginx $!" >>"$dir/pids"
    wait_port "$ngx_port"
    trap - ERR

    echo "Shoal cluster up ($nodes nodes), state in $dir:"
    echo "  via nginx:  https://localhost:$ngx_port  wss://localhost:$ngx_port/ws  (self-signed: $dir/cert.pem)"
    for i in $(seq 0 $((nodes - 1))); do
        echo "  node$i:      http://127.0.0.1:$((base + i))  (/health, /metrics)"
    done
    echo "  redis:      redis://127.0.0.1:$redis_port"
    echo "  postgres:   postgres://shoal@127.0.0.1:$pg_port/postgres"
    echo "  JWT secret: $dir/jwt_secret"
    echo "Stop with: make cluster-down"
}

case "${1:-}" in
    up) up "${2:-3}" ;;
    down) down ;;
    *) echo "usage: $0 up [NODES] | down" >&2; exit 2 ;;
esac
