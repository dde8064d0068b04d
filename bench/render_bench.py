"""Render benchmark: 5,000 imports from 50 clusters (plus 500 exports to 50 consumers).

Prints the time of `render_all` (best and median of several runs), the time to dump every object
as YAML, the sizes that grow with the fleet (CoreDNS block, largest object) and peak RSS.

    .venv/bin/python bench/render_bench.py [--imports 5000] [--clusters 50] [--runs 5]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from typing import Any

from cluster_agent.config import parse_config
from cluster_agent.render import render_all, to_yaml


def build_inputs(
    imports: int, clusters: int, exports: int = 500
) -> tuple[Any, list[dict[str, Any]], list[dict[str, Any]]]:
    sources = [f"c{i:02d}" for i in range(clusters)]
    config = parse_config(
        {
            "cluster": "hub",
            "ca": {"url": "https://ca.example:8443", "trust_anchor": "/dev/null"},
            "istio": {"trust_domain": "hub.mesh"},
            "dns": {"mode": "coredns", "vip_range": "240.0.0.0/12"},  # coredns: measure the block too
            "exports": [
                {"service": f"svc{i}", "namespace": "shop", "ports": [8080, 9090], "consumers": sources}
                for i in range(exports)
            ],
            "imports": [{"from": s, "names": ["*"]} for s in sources],
        }
    )
    per_cluster = imports // clusters
    import_dicts = [
        {
            "name": f"svc{i}.ns{c}",
            "cluster": source,
            "ports": [{"number": 8080, "protocol": "HTTP"}, {"number": 9090, "protocol": "GRPC"}],
            "gateway": {"address": f"203.0.113.{c + 1}", "port": 15443},
            "identity": f"spiffe://{source}.mesh/ns/istio-system/sa/istio-ingressgateway-service-account",
        }
        for c, source in enumerate(sources)
        for i in range(per_cluster)
    ]
    peers = [
        {
            "name": s,
            "trust_domain": f"{s}.mesh",
            "identities": {
                "ingress": f"spiffe://{s}.mesh/ns/istio-system/sa/istio-ingressgateway-service-account",
                "egress": f"spiffe://{s}.mesh/ns/istio-system/sa/istio-egressgateway-service-account",
            },
        }
        for s in sources
    ]
    return config, import_dicts, peers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--imports", type=int, default=5000)
    parser.add_argument("--clusters", type=int, default=50)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--exports", type=int, default=500, help="exports of the rendering cluster (0: imports only)")
    args = parser.parse_args(argv)
    config, imports, peers = build_inputs(args.imports, args.clusters, args.exports)

    times: list[float] = []
    cpu_times: list[float] = []
    previous: dict[str, str] = {}
    for _ in range(args.runs):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = render_all(config, imports=imports, peers=peers, vips=previous, corefile=".:53 {\n}\n")
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - start_cpu)
        previous = result.vips
    render_peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # rendering only, before any YAML

    start = time.perf_counter()
    texts = [to_yaml(obj) for obj in result.objects]
    dump_seconds = time.perf_counter() - start
    block = result.server_block or ""
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

    print(
        f"imports={len(imports)} clusters={args.clusters} objects={len(result.objects)} warnings={len(result.warnings)}"
    )
    print(
        f"render_all: best {min(times) * 1000:.0f} ms, median {statistics.median(times) * 1000:.0f} ms "
        f"wall (CPU best {min(cpu_times) * 1000:.0f} ms) over {args.runs} runs"
    )
    print(f"to_yaml of every object: {dump_seconds * 1000:.0f} ms, {sum(map(len, texts)) / 1e6:.1f} MB")
    print(
        f"CoreDNS block: {len(block.encode()) / 1024:.0f} KiB; largest object: "
        f"{max(map(len, texts)) / 1024:.0f} KiB (ConfigMap/Secret limit 1024 KiB)"
    )
    print(
        f"peak RSS: {render_peak_kib / 1024:.0f} MiB while rendering (target < 150 MB), "
        f"{peak_kib / 1024:.0f} MiB after also dumping every object to YAML"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
