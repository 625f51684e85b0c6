#!/usr/bin/env bash
# The fedq image on a machine with no container registry: the project's Dockerfile from the bare
# Debian image scripts/docker-engine.sh makes (Debian's Python), with PyTorch 2.13.0 CPU from a local
# wheel and fedq from this checkout. fedq's other dependencies come from the package index, which
# these machines reach. Rebuilt when the checkout's fedq changes; reused otherwise.
# Usage: DOCKER_HOST=unix:///dir/docker.sock scripts/fedq-image.sh [IMAGE]   (default fedq:latest)
set -euo pipefail
cd "$(dirname "$0")/.."
image=${1:-fedq:latest}
base=local/debian:bookworm
version=${FEDQ_TORCH_VERSION:-2.13.0}
say() { echo "fedq image: $*" >&2; }
started=$(date +%s)

docker image inspect "$base" >/dev/null 2>&1 || {
  say "no $base in the engine at ${DOCKER_HOST:-the default socket}: run scripts/docker-engine.sh first, which makes it"; exit 1; }
recipe=$(cat Dockerfile pyproject.toml README.md $(git ls-files fedq shared coordinator worker) | sha256sum | cut -c1-16)
if [ "$(docker image inspect -f '{{index .Config.Labels "fedq.recipe"}}' "$image" 2>/dev/null)" = "$recipe" ]; then
  say "reusing $image"; exit 0
fi
# pip's wheel cache or find-links folder on this machine holds the CPU wheel the .venv was made from.
wheel=$(find /opt/wheels "${PIP_FIND_LINKS:-/nonexistent}" ~/.cache/pip -name "torch-${version}+cpu-cp311-*.whl" 2>/dev/null | head -1 || true)
[ -n "$wheel" ] || { say "no torch-${version}+cpu wheel for Python 3.11 found (looked in /opt/wheels, \$PIP_FIND_LINKS, ~/.cache/pip)"; exit 1; }
rm -rf wheelhouse && mkdir wheelhouse && cp "$wheel" wheelhouse/
trap 'rm -rf wheelhouse' EXIT
# The CA bundle this machine's pip trusts: the package index may be reached through a TLS-inspecting proxy.
ca=$(pip config get global.cert 2>/dev/null || true)
ca=${ca:-/etc/ssl/certs/ca-certificates.crt}
[ -f "$ca" ] && cp "$ca" wheelhouse/ca.pem
say "building $image from $base with $(basename "$wheel") (log /tmp/fedq-image-build.log)"
docker build --force-rm --build-arg "BASE=$base" --build-arg TORCH_INDEX= --build-arg "TORCH_SPEC=/wheelhouse/$(basename "$wheel")" \
  ${ca:+--build-arg INDEX_CA=/wheelhouse/ca.pem} \
  --label "fedq.recipe=$recipe" -t "$image" . >/tmp/fedq-image-build.log 2>&1 || {
  say "the build failed; /tmp/fedq-image-build.log ends with:"; tail -20 /tmp/fedq-image-build.log >&2; exit 1; }
docker image prune -f >/dev/null
say "ready in $(( $(date +%s) - started )) s: $image"
