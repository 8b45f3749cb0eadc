#!/usr/bin/env bash
# Run Prometheus against running brokers (make run / make cluster) and a
# loadgen started with --metrics-listen 127.0.0.1:9102. Foreground; Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v prometheus >/dev/null || SHOAL_APT_PACKAGES=prometheus ./scripts/install-test-deps.sh
data="$(mktemp -d)"
trap 'rm -rf "$data"' EXIT
port="${PROMETHEUS_PORT:-9090}"
echo "Prometheus: http://127.0.0.1:$port  (dashboards: grafana/dashboards, datasource: grafana/provisioning)"
prometheus --config.file=grafana/prometheus.yml --storage.tsdb.path="$data" \
    --web.listen-address="127.0.0.1:$port" --log.level=warn
