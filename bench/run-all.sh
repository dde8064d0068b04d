#!/usr/bin/env bash
# `make bench`: renewal throughput of `meshbridge-ca serve` on SQLite and on PostgreSQL, over HTTPS
# (the default) and plain HTTP (as behind a TLS terminator), at concurrency 4 and 16; the cost of
# one rate-limit sync; the CPU of a long-poll answer and a status report; then the 1,000-agent fleet event (root rotation), its agents simulated by
# bench/fleetagents (Go, built on first use; needs the Go toolchain, as `make testbin` does).
# Tables on stdout, JSON reports in $OUT.
# Environment: WORKERS (serve --workers, default nproc), DURATION (seconds per wrk run, default 10),
# AGENTS (fleet size, default 1000), ENGINES (default "sqlite postgres"), OUT (report directory).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORKERS=${WORKERS:-$(nproc)}
DURATION=${DURATION:-10}
AGENTS=${AGENTS:-1000}
ENGINES=${ENGINES:-sqlite postgres}
OUT=${OUT:-${TMPDIR:-/tmp}/meshbridge-bench-results}
mkdir -p "$OUT"
# 1,000 long-polls need more than the usual 1,024 descriptors (server and clients inherit this)
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
command -v wrk >/dev/null || { echo "wrk is missing: make sysdeps" >&2; exit 1; }

rc=0
for engine in $ENGINES; do
  for transport in https http; do
    extra=()
    [ "$transport" = http ] && extra+=(--insecure-http)
    echo "== renewals: $engine, $transport, serve --workers $WORKERS"
    "$PY" bench/ca_renewals.py --engine "$engine" --workers "$WORKERS" --duration "$DURATION" "${extra[@]}" \
      --out "$OUT/renewals-$engine-$transport.json" || rc=1
    echo
  done
done
echo "== rate-limit sync: ${ENGINES// /,}"
"$PY" bench/rate_counters.py --engine "${ENGINES// /,}" --out "$OUT/rate-counters.json" || rc=1
echo
echo "== agent routes, shortcut and FastAPI: ${ENGINES// /,}"
"$PY" bench/agent_routes.py --engine "${ENGINES// /,}" --out "$OUT/agent-routes.json" || rc=1
echo
for engine in $ENGINES; do
  echo "== fleet event: $AGENTS agents, $engine, https, serve --workers $WORKERS"
  "$PY" bench/fleet_event.py --agents "$AGENTS" --engine "$engine" --workers "$WORKERS" \
    --out "$OUT/fleet-$engine.json" || rc=1
  echo
done
echo "JSON reports: $OUT"
exit $rc
