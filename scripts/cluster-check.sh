#!/usr/bin/env bash
# `make test` check of `make cluster` / `make cluster-down`: bring up a
# 2-node cluster on free ports with the debug binary, check /health through
# nginx (TLS) and on each node, register on one node and log in on the
# other (shared PostgreSQL), then check that `down` stopped every PID.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/scripts/broker.sh" # free_port
export SHOAL_CLUSTER_DIR="$(mktemp -d)"
export SHOAL_BIN="$target_dir/debug/shoal"
export SHOAL_CLUSTER_NGINX_PORT="$(free_port)" SHOAL_CLUSTER_REDIS_PORT="$(free_port)" SHOAL_CLUSTER_PG_PORT="$(free_port)"
# Two consecutive free ports for the brokers.
for _ in $(seq 20); do
    p="$(free_port)"
    if python3 -c "import socket,sys; s=socket.socket(); s.bind(('127.0.0.1',$p+1))" 2>/dev/null; then
        export SHOAL_CLUSTER_BASE_PORT="$p"
        break
    fi
done
trap '"$root/scripts/cluster.sh" down >/dev/null; rm -rf "$SHOAL_CLUSTER_DIR"' EXIT
trap 'echo "cluster check failed at line $LINENO" >&2' ERR
if ! "$root/scripts/cluster.sh" up 2 >"$SHOAL_CLUSTER_DIR/up.log" 2>&1; then
    tail -n 20 "$SHOAL_CLUSTER_DIR"/*.log >&2
    exit 1
fi
curl -sf --cacert "$SHOAL_CLUSTER_DIR/cert.pem" "https://localhost:$SHOAL_CLUSTER_NGINX_PORT/health" | grep -q '"bus":"up"'
for i in 0 1; do
    curl -sf "http://127.0.0.1:$((SHOAL_CLUSTER_BASE_PORT + i))/health" | grep -q "\"node\":\"node$i\""
done
curl -sf -X POST -H 'content-type: application/json' -d '{"username":"check","password":"password123"}' \
    "http://127.0.0.1:$SHOAL_CLUSTER_BASE_PORT/api/register" >/dev/null
curl -sf -X POST -H 'content-type: application/json' -d '{"username":"check","password":"password123"}' \
    "http://127.0.0.1:$((SHOAL_CLUSTER_BASE_PORT + 1))/api/login" | grep -q token
pids="$(awk '{print $2}' "$SHOAL_CLUSTER_DIR/pids")"
"$root/scripts/cluster.sh" down >/dev/null
for pid in $pids; do
    if kill -0 "$pid" 2>/dev/null; then
        echo "cluster-down left pid $pid running" >&2
        exit 1
    fi
done
echo "cluster check passed: up, healthy through nginx, down stopped $(echo $pids | wc -w) processes"
