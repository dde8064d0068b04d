#!/usr/bin/env bash
# Builds the real binaries the e2e tests use (kube-apiserver, kubectl, etcd, CoreDNS, istioctl, istiod
# (pilot-discovery), helm, zlint, promtool) and the prebuilt Go checkers of tests/e2e/go, from the Go module proxy only.
#
#   ${MESHBRIDGE_TESTBIN:-~/.cache/meshbridge/testbin/<hash>}/bin/
#
# <hash> covers testbin/versions.env, the build modules under testbin/ and `go env GOVERSION`
# (tests/e2e/testbin.py computes the same). Idempotent: whatever already exists is skipped, so a
# rerun after an interruption resumes. Ends by writing bin/.complete and printing the directory.
set -euo pipefail
cd "$(dirname "$0")/.."

GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
[ -x "$GO" ] || { echo "testbin: no Go toolchain found (set GO=/path/to/go)" >&2; exit 1; }
export GOTOOLCHAIN=local          # never fetch another toolchain behind our back
export CGO_ENABLED=0
NICE=(nice -n 10)

# shellcheck source=/dev/null
source testbin/versions.env

# Files whose content defines the cache directory. Keep in step with tests/e2e/testbin.py.
HASH_FILES=(
  testbin/versions.env
  testbin/etcd/go.mod testbin/etcd/go.sum testbin/etcd/main.go
  testbin/kube/go.mod testbin/kube/go.sum
)
GOVERSION=$("$GO" env GOVERSION)
HASH=$({ for f in "${HASH_FILES[@]}"; do printf '%s\0' "$f"; cat "$f"; printf '\0'; done
         printf 'go=%s' "$GOVERSION"; } | sha256sum | cut -c1-16)
CACHE_ROOT=${HOME}/.cache/meshbridge/testbin
DIR=${MESHBRIDGE_TESTBIN:-$CACHE_ROOT/$HASH}
BIN=$DIR/bin
mkdir -p "$BIN"

# The build modules must ask for what versions.env pins.
check_pin() { # file module version
  grep -Eq "^[[:space:]]*(require )?$2 $3( |$)" "$1" ||
    { echo "testbin: $1 does not require $2 $3 (versions.env); fix one of them" >&2; exit 1; }
}
check_pin testbin/kube/go.mod k8s.io/kubernetes "$KUBERNETES_VERSION"
# ...and every staging module at the matching v0.<minor>.<patch>.
grep -q "k8s.io/api => k8s.io/api v0.${KUBERNETES_VERSION#v1.}\$" testbin/kube/go.mod ||
  { echo "testbin: testbin/kube/go.mod must replace k8s.io/<staging> with v0.${KUBERNETES_VERSION#v1.}" >&2; exit 1; }
check_pin testbin/etcd/go.mod go.etcd.io/etcd/server/v3 "$ETCD_VERSION"
check_pin tests/e2e/go/go.mod istio.io/istio "$ISTIO_MODULE_VERSION"

echo "testbin: $DIR ($GOVERSION, $(nproc) cores)"
TIMES=$DIR/build-times.txt
TOTAL_START=$(date +%s)

# build NAME CMD... : runs CMD (which must write $OUT) unless bin/NAME exists; atomic rename.
build() {
  local name=$1; shift
  if [ -x "$BIN/$name" ]; then echo "testbin: $name: present, skipped"; return; fi
  echo "testbin: $name: building…"
  local start end
  start=$(date +%s)
  OUT=$BIN/.$name.partial
  rm -f "$OUT"
  "$@"
  mv -f "$OUT" "$BIN/$name"
  end=$(date +%s)
  echo "testbin: $name: built in $((end - start)) s"
  printf '%s\t%ss\t%s\t%s\n' "$name" "$((end - start))" "$(date -u +%FT%TZ)" "$GOVERSION" >> "$TIMES"
}

go_install() { # module/cmd@version [ldflags]: go install into a temp GOBIN, then move to $OUT
  local pkg=$1 ldflags=${2:-} gobin
  gobin=$(mktemp -d "$DIR/.gobin.XXXXXX")
  GOBIN=$gobin "${NICE[@]}" "$GO" install -trimpath -ldflags "-s -w $ldflags" "$pkg"
  mv "$gobin"/* "$OUT"
  rm -rf "$gobin"
}

kube_ldflags() {
  local v=$KUBERNETES_VERSION minor
  minor=$(echo "$v" | cut -d. -f2)
  local f=""
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    f+=" -X $p.gitVersion=$v -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
    f+=" -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  echo "-s -w$f"
}

build_in_module() { # dir pkg ldflags
  (cd "$1" && "${NICE[@]}" "$GO" build -trimpath -buildvcs=false -ldflags "$3" -o "$OUT" "$2")
}

build etcd           build_in_module testbin/etcd . "-s -w"
build kube-apiserver build_in_module testbin/kube k8s.io/kubernetes/cmd/kube-apiserver "$(kube_ldflags)"
build kubectl        build_in_module testbin/kube k8s.io/kubernetes/cmd/kubectl "$(kube_ldflags)"
build istioctl       go_install "istio.io/istio/istioctl/cmd/istioctl@$ISTIO_MODULE_VERSION" \
                       "-X istio.io/istio/pkg/version.buildVersion=$ISTIO_BUILD_VERSION+${ISTIO_MODULE_VERSION##*-}"
build pilot-discovery go_install "istio.io/istio/pilot/cmd/pilot-discovery@$ISTIO_MODULE_VERSION" \
                       "-X istio.io/istio/pkg/version.buildVersion=$ISTIO_BUILD_VERSION+${ISTIO_MODULE_VERSION##*-}"
build coredns        go_install "github.com/coredns/coredns@$COREDNS_VERSION"
build helm           go_install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" \
                       "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
build zlint          go_install "github.com/zmap/zlint/v3/cmd/zlint@$ZLINT_VERSION"
# promtool (tests/deploy: `promtool check rules` / `promtool test rules` over deploy/prometheus/),
# built via testbin/promtool/ because the prometheus module's go.mod has replace directives, which
# `go install module@version` refuses. Pinned here, not in testbin/versions.env, on purpose:
# versions.env and the HASH_FILES name the cache directory, so a pin there would force a full
# rebuild of every binary above for one tool. testbin/promtool/ is deliberately not in HASH_FILES.
# Module v0.311.3 is Prometheus 3.11.3 (release 3.x is tagged v0.3xx.y).
PROMTOOL_VERSION=v0.311.3
check_pin testbin/promtool/go.mod github.com/prometheus/prometheus "$PROMTOOL_VERSION"
build promtool       build_in_module testbin/promtool github.com/prometheus/prometheus/cmd/promtool "-s -w"

# Prebuilt Go checkers (tests/e2e/go): named by a hash of their sources, so an edit rebuilds them.
# Keep the hash in step with tests/e2e/testbin.py (go_checker_name).
GO_SRC_HASH=$(cd tests/e2e/go &&
  { find . -type f \( -name '*.go' -o -name go.mod -o -name go.sum \) -not -path './testdata/*' |
      LC_ALL=C sort | while read -r f; do printf '%s\0' "${f#./}"; cat "$f"; printf '\0'; done
    printf 'go=%s' "$GOVERSION"; } | sha256sum | cut -c1-16)
CHECKER=istiocheck-$GO_SRC_HASH.test
go_test_c() { (cd tests/e2e/go && "${NICE[@]}" "$GO" test -c -trimpath -buildvcs=false -o "$OUT" .); }
build "$CHECKER" go_test_c
# Stale checkers (other source versions) go after two days unused, so parallel checkouts of
# different branches can share one cache directory.
find "$BIN" -maxdepth 1 -name 'istiocheck-*.test' ! -name "$CHECKER" -atime +2 -delete

date -u +%FT%TZ > "$BIN/.complete"
if [ -z "${MESHBRIDGE_TESTBIN:-}" ]; then ln -sfn "$DIR" "$CACHE_ROOT/current"; fi
echo "testbin: all built in $(( $(date +%s) - TOTAL_START )) s this run"
echo "$DIR"
