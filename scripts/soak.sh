#!/usr/bin/env bash
# Soak: a release broker under steady fanout load (default 50% of the
# measured store capacity in results/README.md) for SOAK_SECONDS (default
# 3600), with connect/disconnect churn alongside. Samples broker RSS and open
# fds every 10 s and fails if any acked message is lost, if p99 drifts past
# SOAK_MAX_P99_MS, or if RSS keeps growing (last quarter > first quarter ×
# 1.25 + 32 MiB after warm-up). Writes results/soak-<time>.{json,csv}.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${SOAK_SECONDS:-3600}"
rate="${SOAK_RATE:-4000}"
max_p99="${SOAK_MAX_P99_MS:-50}"
cargo build --release -p shoal-broker -p shoal-loadgen
tmp="$(mktemp -d)"
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
out="results/soak-$stamp"
. scripts/broker.sh
churn=""; sampler=""
cleanup() { kill $churn $sampler 2>/dev/null || true; stop_broker; rm -rf "$tmp"; }
trap cleanup EXIT
start_broker "$target_dir"/release/shoal "$tmp/data" --rate-limit 1000000 --rate-burst 1000000

# RSS and fds every 10 s.
echo "t,rss_bytes,open_fds,connections" > "$out.csv"
(
    start=$(date +%s)
    while sleep 10; do
        curl -sf "$url/metrics" | awk -v t=$(( $(date +%s) - start )) '
            /^shoal_process_resident_memory_bytes/ {r=$2} /^shoal_process_open_fds/ {f=$2}
            /^shoal_connections\{/ {c=$2}
            END {printf "%d,%d,%d,%d\n", t, r, f, c}' >> "$out.csv" || true
    done
) &
sampler=$!

# Churn: 400 connections open and close every few seconds, all along.
(
    while true; do
        SHOAL_JWT_SECRET="$secret" "$target_dir"/release/loadgen connect --url "$url" --quiet \
            --connections 400 --connect-rate 400 --hold 1 --out "$tmp/churn.json" >/dev/null 2>&1 || true
    done
) &
churn=$!

SHOAL_JWT_SECRET="$secret" "$target_dir"/release/loadgen fanout --url "$url" --quiet \
    --rooms 20 --members 10 --publishers 40 --rate "$rate" --payload 64 \
    --warmup 10 --duration "$secs" --max-p99-ms "$max_p99" --out "$out.json" || { echo "soak: fanout gate failed"; exit 1; }

# Memory must level off: compare the last quarter with the first (after 60 s).
python3 - "$out.csv" <<'PY'
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if int(r["t"]) >= 60 and int(r["rss_bytes"]) > 0]
if len(rows) < 8:
    sys.exit("soak: too few samples")
q = len(rows) // 4
first = sum(int(r["rss_bytes"]) for r in rows[:q]) / q
last = sum(int(r["rss_bytes"]) for r in rows[-q:]) / q
fds = [int(r["open_fds"]) for r in rows]
print(f"soak: RSS first quarter {first/2**20:.1f} MiB, last quarter {last/2**20:.1f} MiB; fds {min(fds)}..{max(fds)}")
if last > first * 1.25 + 32 * 2**20:
    sys.exit("soak: RSS keeps growing")
PY
echo "soak passed: $out.json $out.csv"
