#!/usr/bin/env bash
# Install what `make test` needs on a fresh Debian machine that has only the
# Rust toolchain. Idempotent: packages already present are not reinstalled.
set -euo pipefail

# Debian packages the test suite starts or calls: curl and python3 for the
# smoke and bench scripts, prometheus (with promtool) for the dashboard
# check. Extended as features land (redis-server, nginx, postgresql, chromium).
APT_PACKAGES=(curl python3 prometheus ${SHOAL_APT_PACKAGES:-})

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

rustup component add rustfmt clippy >/dev/null 2>&1 || true
echo "test dependencies ready"
