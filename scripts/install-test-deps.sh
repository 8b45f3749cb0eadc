#!/usr/bin/env bash
# Install what `make test` needs on a fresh Debian machine that has only the
# Rust toolchain. Idempotent: packages already present are not reinstalled.
set -euo pipefail

# Debian packages the test suite starts or calls: curl and python3 for the
# smoke and bench scripts, procps (kill) for the TLS reload test, g++ for
# libFuzzer (cargo-fuzz), prometheus (with promtool) for the dashboard
# check, chromium + nodejs/npm for the web client's browser tests. Extended
# as features land. redis-server, nginx and postgresql run the cluster tests;
# docker-compose (the client only: no engine runs) validates deploy/compose.yaml.
APT_PACKAGES=(curl python3 procps g++ openssl prometheus chromium redis-server nginx postgresql docker-compose ${SHOAL_APT_PACKAGES:-})

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
# Node may come from elsewhere (nodesource bundles npm); only install the
# Debian packages when the commands are missing.
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
if ((${#missing[@]})); then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# npm packages of the browser tests (playwright-core drives the system
# Chromium; no browser download), pinned by web-tests/package-lock.json.
# socket.io-client and its msgpack parser drive the Socket.IO tests.
if [ ! -d "$(dirname "$0")/../web-tests/node_modules/playwright-core" ] ||
    [ ! -d "$(dirname "$0")/../web-tests/node_modules/socket.io-msgpack-parser" ]; then
    npm ci --prefix "$(dirname "$0")/../web-tests" --no-audit --no-fund
fi

# The JS client library's test dependencies (pinned by its package-lock).
if [ ! -d "$(dirname "$0")/../clients/js/node_modules/ws" ] ||
    [ ! -d "$(dirname "$0")/../clients/js/node_modules/socket.io-client" ]; then
    npm ci --prefix "$(dirname "$0")/../clients/js" --no-audit --no-fund
fi

rustup component add rustfmt clippy >/dev/null 2>&1 || true
echo "test dependencies ready"
