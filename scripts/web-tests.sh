#!/usr/bin/env bash
# Browser tests of the web client: headless Chromium (Debian package) driven
# by playwright-core against the debug-built broker. `make test` runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
# `make test` has just built the binaries with `cargo test` (SKIP_BUILD=1);
# building again here with another feature set would rebuild half the tree.
[ -n "${SKIP_BUILD:-}" ] || cargo build -p shoal-broker
[ -d web-tests/node_modules/socket.io-msgpack-parser ] || npm ci --prefix web-tests --no-audit --no-fund
SHOAL_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/shoal" node web-tests/e2e.mjs
