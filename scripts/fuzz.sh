#!/usr/bin/env bash
# Run every cargo-fuzz target for N seconds (default 60). Installs
# cargo-fuzz from crates.io if missing. Needs a nightly toolchain.
set -euo pipefail
secs="${1:-60}"
cd "$(dirname "$0")/../proto/fuzz"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
for t in $(cargo +nightly fuzz list); do
    mkdir -p "corpus/$t"
    cargo +nightly fuzz run "$t" "corpus/$t" -- -max_total_time="$secs" -max_len=4096
done
