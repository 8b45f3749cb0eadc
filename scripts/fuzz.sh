#!/usr/bin/env bash
# Run every cargo-fuzz target (proto/fuzz, broker/fuzz) for N seconds each
# (default 60). Installs cargo-fuzz from crates.io if missing. Works on the
# stable toolchain (`--sanitizer none`); set FUZZ_SANITIZER=address with a
# nightly toolchain for ASan. New inputs go to a scratch corpus, the
# committed seed corpus stays as it is; crashes land in <crate>/fuzz/artifacts.
set -euo pipefail
secs="${1:-60}"
root="$(cd "$(dirname "$0")/.." && pwd)"
# A debug build of the tool itself: it only drives cargo, and builds in
# half the time.
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked --debug
sanitizer="${FUZZ_SANITIZER:-none}"
# FUZZ_DEV=1 (make test) builds the targets unoptimised: they compile in
# about half the time, and a short bounded run needs coverage of the
# decoders, not peak executions per second.
profile=()
[ "${FUZZ_DEV:-0}" = 1 ] && profile=(--dev)
# Both fuzz crates share one target dir under the workspace's (so `cargo
# clean` removes it): proto and its dependencies are built once.
target_dir="$root/target/fuzz"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for dir in proto/fuzz broker/fuzz; do
    cd "$root/$dir"
    for t in $(cargo fuzz list); do
        mkdir -p "$work/$t" "corpus/$t"
        echo "== fuzz $dir $t for ${secs}s"
        if ! cargo fuzz run "${profile[@]}" --target-dir "$target_dir" --sanitizer "$sanitizer" "$t" "$work/$t" "corpus/$t" -- \
            -max_total_time="$secs" -max_len=8192 -print_final_stats=1 >"$work/$t.log" 2>&1; then
            tail -40 "$work/$t.log"
            echo "fuzz target $t failed (reproducer in $dir/artifacts/$t/)"
            exit 1
        fi
        grep -E "^(Done|stat::number_of_executed_units)" "$work/$t.log" || true
    done
done
echo "fuzzing passed"
