#!/usr/bin/env bash
# Builds and runs loraplex images with podman on a machine that has no Docker engine and no access to
# image registries (our CI and dev machines). Real users run `docker build -f docker/Dockerfile .`.
#
# Why a script: podman needs runc + cgroupfs + empty default ulimits here (crun fails on cgroup and
# setrlimit), the base image must be made locally with debootstrap (registries are unreachable), and a
# local CPU torch wheel is mounted into the build so nothing multi-GB is downloaded. Keeping those
# details in one place means the container test and a developer type the same thing.
#
#   docker/podman-build.sh build [TAG]     build docker/Dockerfile (default tag localhost/loraplex:cpu)
#   docker/podman-build.sh base            make the debootstrap base image (cached; done by `build`)
#   docker/podman-build.sh podman ARGS...  run podman with the flags this machine needs
#   docker/podman-build.sh size [TAG]      print the image size in bytes
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BASE_TAG=${LORAPLEX_BASE_IMAGE:-localhost/python-base:bookworm}
WHEELS=${LORAPLEX_WHEELS_DIR:-/opt/wheels}
HOST_CA=${LORAPLEX_HOST_CA:-/etc/ssl/certs/ca-certificates.crt}
CONF=${LORAPLEX_CONTAINERS_CONF:-${TMPDIR:-/tmp}/loraplex-containers.conf}

ensure_tools() {
  local missing=()
  for tool in podman runc debootstrap; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]} (Debian packages)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null
  fi
  [ -f "$CONF" ] || printf '[containers]\ndefault_ulimits = []\n' >"$CONF"
}

pm() {
  CONTAINERS_CONF="$CONF" podman --runtime runc --cgroup-manager=cgroupfs "$@"
}

ensure_base() {
  if pm image exists "$BASE_TAG"; then return 0; fi
  local rootfs
  rootfs=$(mktemp -d "${TMPDIR:-/tmp}/loraplex-rootfs.XXXXXX")
  echo "debootstrap bookworm -> $BASE_TAG (once; cached in podman's image store)" >&2
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$rootfs" >"$rootfs.log" 2>&1 || { tail -20 "$rootfs.log" >&2; exit 1; }
  # what python:3.11-slim also leaves out: package caches and lists
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/*
  tar -C "$rootfs" -c . | pm import - "$BASE_TAG" >/dev/null
  rm -rf "$rootfs" "$rootfs.log"
}

build() {
  local tag=${1:-localhost/loraplex:cpu}
  local mount=()
  [ -d "$WHEELS" ] && mount=(-v "$WHEELS:/wheels:ro")
  # This machine reaches PyPI through a TLS-inspecting proxy whose CA is in the host's bundle only.
  [ -f "$HOST_CA" ] && mount+=(-v "$HOST_CA:/etc/ssl/certs/ca-certificates.crt:ro")
  ensure_base
  pm build --network host --isolation chroot --layers --format docker \
    --build-arg BASE_IMAGE="$BASE_TAG" "${mount[@]}" \
    -f "$ROOT/docker/Dockerfile" -t "$tag" "$ROOT"
}

cmd=${1:-build}
shift || true
ensure_tools
case "$cmd" in
  build) build "$@" ;;
  base) ensure_base ;;
  podman) pm "$@" ;;
  size) pm image inspect --format '{{.Size}}' "${1:-localhost/loraplex:cpu}" ;;
  *) echo "usage: $0 {build [TAG]|base|podman ARGS...|size [TAG]}" >&2; exit 2 ;;
esac
