#!/usr/bin/env bash
# Static checks of the deployment files (no container engine runs here):
# - deploy/compose.yaml parses and validates (`docker-compose config`);
# - deploy/k8s/*.yaml validate against the Kubernetes 1.31 schemas
#   (kubernetes-validate from PyPI, strict: unknown fields fail);
# - the Dockerfile builds with the same cargo command as `make build`.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
pylib="${XDG_CACHE_HOME:-$HOME/.cache}/shoal/pylib"
if ! PYTHONPATH="$pylib" python3 -c 'import kubernetes_validate' 2>/dev/null; then
    pip install -q --disable-pip-version-check --root-user-action=ignore --target "$pylib" kubernetes-validate==1.31.0
fi
docker-compose -f deploy/compose.yaml config -q
PYTHONPATH="$pylib" python3 -m kubernetes_validate -k 1.31.0 --strict --quiet deploy/k8s/*.yaml
docker_build="$(sed -n 's/^RUN \(cargo build .*\)$/\1/p' Dockerfile)"
make_build="$(sed -n 's/^\t$(CARGO) \(build .*\)$/cargo \1/p' Makefile)"
if [ -z "$docker_build" ] || [ "$docker_build" != "$make_build" ]; then
    echo "Dockerfile builds with '$docker_build' but make build runs '$make_build'" >&2
    exit 1
fi
echo "deploy check passed: compose file, $(ls deploy/k8s/*.yaml | wc -l) Kubernetes manifests, Dockerfile build step"
