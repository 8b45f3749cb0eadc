#!/usr/bin/env bash
# Render nginx/shoal.conf.template into PREFIX/nginx.conf.
# Usage: nginx-conf.sh PREFIX LISTEN CERT KEY NODE [NODE...]
#   e.g. nginx-conf.sh /tmp/ng 127.0.0.1:8443 cert.pem key.pem 127.0.0.1:8081 127.0.0.1:8082
set -euo pipefail
prefix="$1" listen="$2" cert="$3" key="$4"
shift 4
root="$(cd "$(dirname "$0")/.." && pwd)"
upstreams=""
for n in "$@"; do
    upstreams+="server $n max_fails=1 fail_timeout=5s; "
done
mkdir -p "$prefix"
sed -e "s|@PREFIX@|$prefix|g" -e "s|@LISTEN@|$listen|g" -e "s|@CERT@|$cert|g" \
    -e "s|@KEY@|$key|g" -e "s|@UPSTREAMS@|$upstreams|g" \
    "$root/nginx/shoal.conf.template" >"$prefix/nginx.conf"
echo "$prefix/nginx.conf"
