#!/usr/bin/env bash
# A Docker engine and a RabbitMQ image for the container tests, on a machine with no registry.
# Installs Debian's docker.io if dockerd is missing, starts dockerd on a private socket (never the
# default one, so no other program on the machine switches to it unasked) or reuses the one already
# there, and builds $FEDQ_BROKER_IMAGE offline unless the engine has it. Idempotent: CI calls it on
# every run. Usage: DOCKER_HOST=unix:///dir/docker.sock FEDQ_BROKER_IMAGE=name:tag scripts/docker-engine.sh
set -euo pipefail
cd "$(dirname "$0")/.."

dir=${FEDQ_DOCKER_DIR:-/tmp/fedq-docker}
export DOCKER_HOST=${DOCKER_HOST:-unix://$dir/docker.sock}
image=${FEDQ_BROKER_IMAGE:-fedq/rabbitmq-offline:3.10}
base=local/debian:bookworm
say() { echo "fedq docker: $*" >&2; }
started=$(date +%s)

if command -v docker >/dev/null && docker version >/dev/null 2>&1; then
  say "reusing the engine at $DOCKER_HOST"
else
  socket=${DOCKER_HOST#unix://}
  if [ "$socket" = "$DOCKER_HOST" ]; then
    say "the engine at $DOCKER_HOST does not answer; start it, or set DOCKER_HOST=unix:///some/dir/docker.sock to have one started there"
    exit 1
  fi
  if [ "$socket" = /var/run/docker.sock ] || [ "$socket" = /run/docker.sock ]; then
    say "refusing to start dockerd on the default socket $socket, where every program on the machine would find it; set DOCKER_HOST=unix:///some/dir/docker.sock"
    exit 1
  fi
  if ! command -v dockerd >/dev/null; then
    say "installing Debian's docker.io"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
  fi
  mkdir -p "$dir" "$(dirname "$socket")"
  say "starting dockerd on $socket (log $dir/dockerd.log)"
  # Its own session: the engine outlives this CI run and is reused by the next.
  setsid dockerd -H "unix://$socket" --data-root "$dir/data" --exec-root "$dir/exec" \
    --pidfile "$dir/docker.pid" >"$dir/dockerd.log" 2>&1 < /dev/null &
  for _ in $(seq 60); do
    docker version >/dev/null 2>&1 && break
    sleep 0.5
  done
  if ! docker version >/dev/null 2>&1; then
    say "dockerd did not answer on $socket within 30 s; its log ($dir/dockerd.log) ends with:"
    tail -20 "$dir/dockerd.log" >&2
    exit 1
  fi
fi

# The compose test runs the project's docker-compose.yml with Debian's docker-compose (1.29).
if ! command -v docker-compose >/dev/null; then
  say "installing Debian's docker-compose"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null
fi

# The image is rebuilt when its Dockerfile changes, so a machine that kept an older one does not test it.
recipe=$(sha256sum scripts/rabbitmq-offline.Dockerfile | cut -c1-16)
if [ "$(docker image inspect -f '{{index .Config.Labels "fedq.recipe"}}' "$image" 2>/dev/null)" = "$recipe" ]; then
  say "reusing image $image"
else
  if ! docker image inspect "$base" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || {
      say "installing debootstrap"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    }
    # The mirror apt already uses: the one place these machines can download Debian from.
    mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
      | awk '/^(URIs:|deb) / && !/security/ {print $2; exit}' || true)
    mirror=${mirror:-http://deb.debian.org/debian}
    rootfs=$(mktemp -d "$dir/rootfs.XXXXXX")
    say "making $base with debootstrap from $mirror"
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$dir/debootstrap.log" 2>&1 || {
      say "debootstrap failed; $dir/debootstrap.log ends with:"; tail -20 "$dir/debootstrap.log" >&2; exit 1; }
    tar -C "$rootfs" -c . | docker import - "$base" >/dev/null
    rm -rf "$rootfs"
  fi
  context=$(mktemp -d)
  mkdir -p "$context/apt"
  cp -r /etc/apt/sources.list* /etc/apt/trusted.gpg* "$context/apt/" 2>/dev/null || true
  # Sources switched off on the host stay off; other keyrings than Debian's are not in the base image.
  find "$context/apt" -name '*.disabled*' -delete
  cp scripts/rabbitmq-offline.Dockerfile "$context/Dockerfile"
  say "building $image"
  docker build --build-arg "BASE=$base" --label "fedq.recipe=$recipe" -t "$image" "$context" >"$dir/build.log" 2>&1 || {
    say "building $image failed; $dir/build.log ends with:"; tail -20 "$dir/build.log" >&2; exit 1; }
  # The image this one replaced, now untagged: each change of the recipe would otherwise keep 400 MB.
  docker image prune -f >/dev/null
  rm -rf "$context"
fi
say "ready in $(( $(date +%s) - started )) s: DOCKER_HOST=$DOCKER_HOST FEDQ_BROKER_IMAGE=$image"
