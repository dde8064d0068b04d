"""What 1,000 imports cost one sidecar: its Envoy clusters as Istio builds them (issue 11 item 10).

Renders cluster a of the simulation scenario (tests/support/simscenario.py) with `--imports` extra
HTTP imports `svc<i>.bookinfo` from b, then lets Istio's own xDS generation (the Go checker's
TestSidecarClusters, `make testbin`) build a sidecar in namespace `bookinfo` (the imports' own
namespace) and one in `frontend` (no consumer), with no Sidecar resource:

- ``everywhere``: ``consumer_namespaces: ["*"]``, i.e. every import exported to ``*`` as before
  issue 11 (the same exportTo the earlier renderer wrote);
- ``default``: ``consumer_namespaces`` unset: each import exported to its own namespace and the
  egress gateway's.

    PYTHONPATH=. .venv/bin/python bench/sidecar_clusters.py [--imports 1000] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from tests.e2e.gocheck import sidecar_clusters
from tests.support.simscenario import render_importer

NAMESPACES = ["bookinfo", "frontend"]
SETTINGS: dict[str, list[str] | None] = {"everywhere": ["*"], "default": None}


def measure(imports: int) -> dict[str, dict[str, dict[str, float]]]:
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="sidecar-clusters-") as tmp:
        for label, namespaces in SETTINGS.items():
            directory = render_importer(Path(tmp) / label, extra_imports=imports, consumer_namespaces=namespaces)
            start = time.monotonic()
            counts = sidecar_clusters(directory, NAMESPACES)
            elapsed = time.monotonic() - start
            results[label] = {ns: {**c, "checker_seconds": round(elapsed, 1)} for ns, c in counts.items()}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--imports", type=int, default=1000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = measure(args.imports)
    if args.json:
        json.dump({"imports": args.imports + 2, "results": results}, sys.stdout, indent=2)
        print()
        return 0
    print(f"{args.imports + 2} imports; sidecar clusters (of them .remote) / listeners")
    print(f"{'setting':<12} {'namespace':<10} {'clusters':>9} {'remote':>7} {'listeners':>10}")
    for label, per_ns in results.items():
        for ns, c in per_ns.items():
            print(f"{label:<12} {ns:<10} {c['clusters']:>9.0f} {c['remote_clusters']:>7.0f} {c['listeners']:>10.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
