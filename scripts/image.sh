#!/usr/bin/env bash
# Builds and runs the meshbridge image with Debian's buildah and podman, no Docker engine and no
# image registry needed (docs/image.md).
#
#   scripts/image.sh base            # the Debian base (mmdebstrap), cached; prints its name
#   scripts/image.sh build           # the repository's Dockerfile on that base; prints the image name
#   scripts/image.sh name            # the image name the build tags and the charts default to
#   scripts/image.sh run ARGS...     # podman run ARGS..., with this script's storage, runtime, ulimits
#   scripts/image.sh podman ARGS...  # podman ARGS..., with this script's storage and runtime
#
# Environment:
#   MESHBRIDGE_IMAGE_CACHE    base tarballs (default ~/.cache/meshbridge/image)
#   MESHBRIDGE_IMAGE_STORAGE  containers storage root for this script only (default
#                             $MESHBRIDGE_IMAGE_CACHE/storage); "system" uses buildah's and podman's
#                             own storage, so `podman run meshbridge:<version>` finds the image
#   MESHBRIDGE_IMAGE_DRIVER   storage driver for that root (default overlay; vfs where overlay
#                             cannot mount)
#   MESHBRIDGE_BASE_IMAGE     build FROM this image instead (e.g. python:3.11-slim from a registry)
#   MESHBRIDGE_BUILD_CA       CA bundle pip trusts during the build (default: the host's
#                             $PIP_CERT or /etc/ssl/certs/ca-certificates.crt); mounted, never copied
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."

CACHE=${MESHBRIDGE_IMAGE_CACHE:-$HOME/.cache/meshbridge/image}
STORAGE=${MESHBRIDGE_IMAGE_STORAGE:-$CACHE/storage}
DRIVER=${MESHBRIDGE_IMAGE_DRIVER:-overlay}

# The base: Debian bookworm (Python 3.11 as /usr/bin/python3) with only what the Dockerfile needs.
# Its cache key is a hash of this recipe, so a changed recipe builds a new base.
SUITE=bookworm
BASE_PACKAGES=python3,python3-venv,ca-certificates
MMDEBSTRAP_ARGS=(
  --variant=minbase
  --include="$BASE_PACKAGES"
  --aptopt='APT::Install-Recommends "false"'
  --dpkgopt='path-exclude=/usr/share/man/*'
  --dpkgopt='path-exclude=/usr/share/doc/*'
  --dpkgopt='path-include=/usr/share/doc/*/copyright'
  --dpkgopt='path-exclude=/usr/share/locale/*'
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*'
)

die() {
  echo "image.sh: $*" >&2
  exit 1
}

version() {
  python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])'
}

image_name() {
  echo "localhost/meshbridge:$(version)"
}

# A storage root of this script's own, unless told to use the system's.
storage_opts() {
  if [ "$STORAGE" != system ]; then
    printf '%s\n' --root "$STORAGE/root" --runroot "$STORAGE/run" --storage-driver "$DRIVER"
  fi
}

# runc where installed: crun refuses a host whose cgroup v2 hierarchy has controllers while v1 is
# mounted too ("cgroups in hybrid mode not supported"), as on this project's machines.
runtime_opts() {
  if command -v runc >/dev/null; then
    printf '%s\n' --runtime "$(command -v runc)"
  fi
  printf '%s\n' --cgroup-manager cgroupfs
}

# podman and buildah raise RLIMIT_NOFILE/NPROC of a root container to 1048576 unless told, which
# needs CAP_SYS_RESOURCE; stay within this shell's hard limits instead.
ulimit_opts() {
  local nofile nproc
  nofile=$(ulimit -Hn)
  nproc=$(ulimit -Hu)
  [ "$nofile" = unlimited ] && nofile=1048576
  [ "$nproc" = unlimited ] || [ "$nproc" -gt 4096 ] && nproc=4096
  printf '%s\n' --ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc"
}

need() {
  for tool in "$@"; do
    command -v "$tool" >/dev/null || die "$tool not found: apt-get install buildah podman mmdebstrap runc (scripts/sysdeps.sh)"
  done
}

podman_() {
  local s r
  mapfile -t s < <(storage_opts)
  mapfile -t r < <(runtime_opts)
  podman "${s[@]}" "${r[@]}" "$@"
}

base_key() {
  printf '%s\n' "$SUITE" "${MMDEBSTRAP_ARGS[@]}" | sha256sum | cut -c1-16
}

# Prints the base image's name, importing the cached tarball or making it with mmdebstrap first.
base() {
  local key name tarball
  key=$(base_key)
  name=localhost/meshbridge-base:$key
  tarball=$CACHE/base-$key.tar
  if podman_ image exists "$name"; then
    echo "$name"
    return
  fi
  mkdir -p "$CACHE"
  if [ ! -f "$tarball" ]; then
    need mmdebstrap
    echo "image.sh: making the $SUITE base with mmdebstrap into $tarball" >&2
    mmdebstrap --quiet --format=tar "${MMDEBSTRAP_ARGS[@]}" "$SUITE" "$tarball.tmp" >&2
    mv "$tarball.tmp" "$tarball"
  fi
  echo "image.sh: importing $tarball as $name" >&2
  podman_ import --quiet --change 'CMD ["python3"]' "$tarball" "$name" >/dev/null
  echo "$name"
}

build() {
  need buildah podman
  local from name ca s r u
  from=${MESHBRIDGE_BASE_IMAGE:-}
  [ -n "$from" ] || from=$(base)
  name=$(image_name)
  ca=${MESHBRIDGE_BUILD_CA:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}
  [ -f "$ca" ] || die "MESHBRIDGE_BUILD_CA: $ca is not a file"
  mapfile -t s < <(storage_opts)
  mapfile -t r < <(runtime_opts)
  mapfile -t u < <(ulimit_opts)
  # --layers=false: one layer on top of the base. The CA bundle is a read-only bind mount of the
  # build's RUN steps, so no trust store of this machine ends up in the image; it goes under /dev,
  # a tmpfs in every RUN, because a mount point elsewhere (/run) stays in the image as an empty file.
  buildah "${s[@]}" build --quiet --layers=false "${r[@]}" "${u[@]}" --network host \
    --volume "$ca:/dev/meshbridge-build-ca.pem:ro" --build-arg PIP_CERT=/dev/meshbridge-build-ca.pem \
    --build-arg BASE_IMAGE="$from" --tag "$name" --file Dockerfile . >&2
  # The previous build of the same tag is left untagged: drop it (own storage only).
  if [ "$STORAGE" != system ]; then
    podman_ image prune --force >/dev/null
  fi
  echo "$name"
}

run() {
  need podman
  local r
  mapfile -t r < <(ulimit_opts)
  podman_ run "${r[@]}" "$@"
}

case "${1:-}" in
  base) need podman; base ;;
  build) build ;;
  name) image_name ;;
  run) shift; run "$@" ;;
  podman) shift; need podman; podman_ "$@" ;;
  *) die "usage: scripts/image.sh base|build|name|run ARGS...|podman ARGS..." ;;
esac
