"""`meshbridge-agent`: run in a cluster, or render the same objects as YAML."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cluster_agent.ca_client import CAClient, CAClientError
from cluster_agent.config import AgentConfig, ConfigError, load_config
from cluster_agent.errors import AgentError
from cluster_agent.loop import AgentLoop
from cluster_agent.metrics import AgentMetrics, serve_health
from cluster_agent.reconcile import Reconciler
from cluster_agent.state import DirStateStore

EPILOG = """\
examples:
  meshbridge-agent run --config /etc/meshbridge/agent.yaml
  meshbridge-agent render --config agent.yaml --out ./out --once
  meshbridge-agent render --config agent.yaml --out ./out --once --dry-run
  meshbridge-agent check-config --config agent.yaml
"""


def _setup_logging(level: str) -> None:
    from meshbridge_wire.logs import JsonFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.getLogger().handlers[:] = [handler]
    logging.getLogger().setLevel(level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _client(cfg: AgentConfig) -> CAClient:
    anchor = Path(cfg.ca.trust_anchor)
    if not anchor.exists():
        raise ConfigError(f"ca.trust_anchor: file {anchor} does not exist (the CA service's root-cert.pem)")
    return CAClient(cfg.ca.url, trust_pem=anchor.read_text(), cluster=cfg.cluster)


def _install_signals(loop: AgentLoop) -> None:
    def stop(*_: Any) -> None:
        loop.stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def cmd_render(args: argparse.Namespace) -> int:
    from cluster_agent.output import DirectoryWriter

    cfg = load_config(Path(args.config))
    out = Path(args.out)
    state_dir = Path(args.state_dir) if args.state_dir else (cfg.state_dir or out / ".meshbridge")
    writer = DirectoryWriter(
        out, state_dir=Path(state_dir), corefile=Path(args.corefile) if args.corefile else None, dry_run=args.dry_run
    )
    reconciler = Reconciler(cfg, client=_client(cfg), applier=writer, state_store=DirStateStore(Path(state_dir)))
    loop = AgentLoop(reconciler, poll_wait=args.wait)
    if args.once:
        loop.revision = None
        result = loop.step()
        assert result is not None
        rep = result.report
        if args.json:
            print(
                json.dumps(
                    {
                        "created": rep.created,
                        "updated": rep.updated,
                        "unchanged": rep.unchanged,
                        "pruned": rep.pruned,
                        "imports": result.imports_applied,
                        "import_modes": result.import_modes,
                        "renewed": result.renewed,
                        "warnings": result.warnings,
                        "revision": result.desired_revision,
                    }
                )
            )
        elif not args.dry_run:
            print(f"{cfg.cluster}: {rep.summary()} in {out} ({result.imports_applied} imports)")
            for name, mode in sorted(result.import_modes.items()):
                print(f"  import {name}: {mode}")
            for w in result.warnings:
                print(f"  warning: {w}")
        return 0
    _install_signals(loop)
    loop.run()
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from cluster_agent.dnsmode import dns_check_for
    from cluster_agent.istiod import LiveIstiodView
    from cluster_agent.kube import KubeApplier, LeaseElector, SecretStateStore, make_client

    cfg = load_config(Path(args.config))
    kube = make_client(cfg)
    applier = KubeApplier(kube, cfg)
    state = SecretStateStore(kube, cfg.istio.namespace)
    istiod = LiveIstiodView(applier.configmap_data, namespace=cfg.istio.namespace, address=cfg.istio.istiod)
    # dns.mode istio relies on the sidecars' DNS proxy: say so when meshConfig does not turn it on
    dns_check = dns_check_for(cfg.dns.mode)
    reconciler = Reconciler(
        cfg, client=_client(cfg), applier=applier, state_store=state, istiod=istiod, dns_check=dns_check
    )
    metrics = AgentMetrics()
    elector = LeaseElector(kube, cfg.istio.namespace) if not args.no_leader_election else None
    loop = AgentLoop(reconciler, metrics=metrics, poll_wait=args.wait, is_leader=elector.is_leader if elector else None)
    if args.health_listen:
        host, _, port = args.health_listen.rpartition(":")
        serve_health(metrics, ready=loop.ready, host=host or "0.0.0.0", port=int(port))  # noqa: S104
    if args.once:
        result = loop.step()
        for problem in result.istio_problems if result is not None else []:
            print(f"  problem: {problem}")
        return 0
    _install_signals(loop)
    loop.run()
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    cfg = load_config(Path(args.config))
    for note in cfg.advisories():
        print(f"note: {note}")
    print(f"{args.config}: valid (cluster {cfg.cluster}, {len(cfg.exports)} exports, {len(cfg.imports)} import rules)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="meshbridge-agent",
        description="meshbridge cluster agent: keeps Istio's "
        "cacerts, cross-cluster gateway routing and DNS in step with the CA service.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--log-level", default="info")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="apply to the cluster (in-cluster credentials or kubernetes.kubeconfig)")
    r.add_argument("--config", required=True)
    r.add_argument("--once", action="store_true", help="one pass, then exit")
    r.add_argument("--wait", type=float, default=25, help="long-poll wait in seconds (max 60)")
    r.add_argument("--health-listen", default="0.0.0.0:9090", help="/healthz, /readyz, /metrics; '' to disable")
    r.add_argument("--no-leader-election", action="store_true")
    r.set_defaults(fn=cmd_run)

    d = sub.add_parser("render", help="write the objects as YAML into a directory instead of applying them")
    d.add_argument("--config", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--once", action="store_true", help="one pass, then exit")
    d.add_argument("--state-dir", help="agent token and intermediate key (default DIR/.meshbridge, mode 0700)")
    d.add_argument("--corefile", help="also write the coredns ConfigMap: this Corefile with the block merged in")
    d.add_argument("--dry-run", action="store_true", help="print a diff against DIR, write nothing")
    d.add_argument("--wait", type=float, default=25)
    d.add_argument("--json", action="store_true")
    d.set_defaults(fn=cmd_render)

    c = sub.add_parser("check-config", help="validate the config file and exit")
    c.add_argument("--config", required=True)
    c.set_defaults(fn=cmd_check)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        rc: int = args.fn(args)
        return rc
    except ConfigError as exc:
        print(f"meshbridge-agent: config error: {exc}", file=sys.stderr)
        return 2
    except (CAClientError, AgentError) as exc:
        print(f"meshbridge-agent: {exc}", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"meshbridge-agent: file not found: {exc.filename}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
