#!/usr/bin/env bash
# Installs the Debian packages the test-suite and benchmarks need, only those missing.
set -euo pipefail
# chromium: the dashboard's browser test; buildah podman mmdebstrap runc containers-storage:
# tests/deploy/test_image.py builds and runs the image (scripts/image.sh)
want=(postgresql softhsm2 wrk openssl libsofthsm2 chromium buildah podman mmdebstrap runc containers-storage)
missing=()
for p in "${want[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "sysdeps: all present (${want[*]})"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "sysdeps: missing Debian packages: ${missing[*]} — run as root: apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "sysdeps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
