"""End-to-end mode with real handshakes (issue 13 item 3): a caller certificate of cluster a and a
destination certificate of cluster b, each signed by its cluster's intermediate as the agents
installed it in `cacerts` (and as istiod signs: `tests/e2e/workload.py` `mint`), complete Istio-style
mTLS through two SNI relays standing for a's egress and b's ingress gateway (PASSTHROUGH: routed by
the ClientHello's SNI, bytes untouched). The SNI and the pinned SAN are the ones a's agent rendered
in its DestinationRule; the CAs, intermediates and CRLs come from a real CA service and two agents.

OpenSSL with `VERIFY_CRL_CHECK_CHAIN` (CRL_CHECK|CRL_CHECK_ALL) against each side's `ca-crl.pem`
reproduces Envoy's decision (docs/istio-notes.md "CRLs in the data plane"): with the CRL sets the
agents write (each holding the peer intermediate's CRL, relayed by the CA service) the handshake
passes; without the peer's CRL it fails.
"""

from __future__ import annotations

import base64
import socket
import ssl
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshbridge_wire.pem import load_crls
from tests.agent.conftest import NO_WORKLOAD_CERT_WAIT, agent_yaml
from tests.agent.test_agent_pass import recording_reconciler
from tests.e2e.workload import Workload, mint
from tests.support.caservice import CAService
from tests.support.snirelay import SniRelay

CALLER = "spiffe://a.mesh/ns/bookinfo/sa/bookinfo-productpage"
EXPORT = (
    "[{service: ratings, namespace: bookinfo, ports: [9080], mode: end-to-end, service_accounts: [bookinfo-ratings],"
    " consumers: [{cluster: a, principals: [ns/bookinfo/sa/bookinfo-productpage]}]}]"
)
ALPN = ["istio-peer-exchange", "istio"]  # what a sidecar offers on ISTIO_MUTUAL (util.ALPNInMeshWithMxc)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """b exports ratings.bookinfo end to end to a; both agents ran; returns their render dirs."""
    work = tmp_path_factory.mktemp("e2e-handshake")
    ca = CAService(work / "ca", policy=NO_WORKLOAD_CERT_WAIT).start()
    try:
        paths = {}
        for name, addr, exp, imp in (
            ("b", "198.51.100.20", EXPORT, "[]"),
            ("a", "198.51.100.10", "[]", '[{from: b, names: ["*"]}]'),
        ):
            d = work / name
            d.mkdir()
            ca.add_cluster(name, f"{name}.mesh", d / "bootstrap-token")
            (d / "agent.yaml").write_text(
                agent_yaml(name=name, td=f"{name}.mesh", url=ca.url, address=addr, exports=exp, imports=imp)
            )
            paths[name] = d / "agent.yaml"
        # a learns of its end-to-end import in its first pass and publishes its CRL in the second
        agents = {name: recording_reconciler(path, []) for name, path in paths.items()}
        for name in ("b", "a", "a", "b"):
            agents[name].run_pass(revision=None, wait=0, resync=lambda: True)
        yield {name: path.parent / "out" for name, path in paths.items()}
    finally:
        ca.stop()


def _cacerts(out: Path) -> dict[str, str]:
    secret = yaml.safe_load((out / "secret-istio-system-cacerts.yaml").read_text())
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def _sidecar_tls(out: Path) -> dict[str, Any]:
    """The caller sidecar's TLS settings for ratings.bookinfo.remote, as a's agent rendered them."""
    [path] = out.glob("destinationrule-*-meshbridge-e2e-import-ratings-bookinfo.yaml")
    tls: dict[str, Any] = yaml.safe_load(path.read_text())["spec"]["trafficPolicy"]["tls"]
    return tls


def _context(side: ssl._SSLMethod, me: Workload, roots: str, crls: str, d: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(side)
    key, chain = me.files(d, "server" if side == ssl.PROTOCOL_TLS_SERVER else "client")
    ctx.load_cert_chain(chain, key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = False  # Istio matches URI SANs, not host names
    ctx.load_verify_locations(cadata=roots)
    (d / f"crls-{side}.pem").write_text(crls)
    ctx.load_verify_locations(cafile=str(d / f"crls-{side}.pem"))
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN  # CRL_CHECK | CRL_CHECK_ALL, as Envoy with a CRL
    ctx.set_alpn_protocols(ALPN)
    return ctx


def _uri_sans(cert: dict[str, Any] | None) -> list[str]:
    return [v for k, v in (cert or {}).get("subjectAltName", ()) if k == "URI"]


def handshake(
    *,
    caller: Workload,
    destination: Workload,
    roots: str,
    caller_crls: str,
    destination_crls: str,
    sni: str,
    pinned: list[str],
    exported: list[str],
) -> tuple[bool, str, list[tuple[str | None, bool]]]:
    """caller → relay (egress a) → relay (ingress b) → destination; returns (ok, detail, what the
    ingress relay saw)."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        server_ctx = _context(ssl.PROTOCOL_TLS_SERVER, destination, roots, destination_crls, d)
        client_ctx = _context(ssl.PROTOCOL_TLS_CLIENT, caller, roots, caller_crls, d)
        listener = socket.create_server(("127.0.0.1", 0))
        seen: dict[str, str] = {}

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    seen["caller"] = ",".join(_uri_sans(tls.getpeercert()))
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError) as exc:
                seen["server"] = str(exc)

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        ingress = SniRelay({s: int(listener.getsockname()[1]) for s in exported})
        egress = SniRelay({sni: ingress.port})
        try:
            with (
                socket.create_connection(("127.0.0.1", egress.port), timeout=5) as raw,
                client_ctx.wrap_socket(raw, server_hostname=sni) as tls,
            ):
                peer = _uri_sans(tls.getpeercert())
                if not set(peer) & set(pinned):  # Envoy's match_subject_alt_names
                    return False, f"client: peer {peer} is not one of the pinned {pinned}", ingress.seen
                data = tls.recv(2)
            server.join(5)
            ok = data == b"ok" and seen.get("caller") == CALLER
            return ok, f"destination saw {seen.get('caller')}; client saw {peer}", ingress.seen
        except (ssl.SSLError, OSError) as exc:
            server.join(5)  # the server's own reason (e.g. its CRL check), once it has one
            return False, f"client: {exc}; {seen.get('server', '')}", ingress.seen
        finally:
            listener.close()
            ingress.close()
            egress.close()


def _parties(fleet: dict[str, Path]) -> dict[str, Any]:
    a, b = _cacerts(fleet["a"]), _cacerts(fleet["b"])
    tls = _sidecar_tls(fleet["a"])
    return {
        "a": a,
        "b": b,
        "sni": tls["sni"],
        "pinned": tls["subjectAltNames"],
        "caller": mint(a, CALLER),
        "destination": mint(b, tls["subjectAltNames"][0]),
        "roots": a["root-cert.pem"],
    }


def test_the_rendered_sidecar_settings_name_the_destination_workload(fleet: dict[str, Path]) -> None:
    tls = _sidecar_tls(fleet["a"])
    assert tls == {
        "mode": "ISTIO_MUTUAL",
        "sni": "9080.ratings.bookinfo.mb-e2e",
        "subjectAltNames": ["spiffe://b.mesh/ns/bookinfo/sa/bookinfo-ratings"],
    }


def _without_issuer(crls: str, issuer_pem: str) -> str:
    """`crls` without the CRLs `issuer_pem` signed."""
    issuer = x509.load_pem_x509_certificate(issuer_pem.encode()).subject
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in load_crls(crls) if c.issuer != issuer)


def test_the_caller_reaches_the_workload_with_the_crl_sets_the_agents_wrote(fleet: dict[str, Path]) -> None:
    p = _parties(fleet)
    ok, detail, seen = handshake(
        caller=p["caller"],
        destination=p["destination"],
        roots=p["roots"],
        caller_crls=p["a"]["ca-crl.pem"],
        destination_crls=p["b"]["ca-crl.pem"],
        sni=p["sni"],
        pinned=p["pinned"],
        exported=[p["sni"]],
    )
    assert ok, detail
    assert f"destination saw {CALLER}" in detail and seen == [(p["sni"], True)]


@pytest.mark.parametrize("side", ["caller", "destination"])
def test_without_the_peers_intermediate_crl_the_handshake_fails(fleet: dict[str, Path], side: str) -> None:
    """What end-to-end mode needs the CA service to relay: drop the peer intermediate's CRL from one
    side's ca-crl.pem and CRL_CHECK_ALL refuses the peer's chain."""
    p = _parties(fleet)
    crls = {"caller": p["a"]["ca-crl.pem"], "destination": p["b"]["ca-crl.pem"]}
    peer = "b" if side == "caller" else "a"
    crls[side] = _without_issuer(crls[side], p[peer]["ca-cert.pem"])
    ok, detail, _ = handshake(
        caller=p["caller"],
        destination=p["destination"],
        roots=p["roots"],
        caller_crls=crls["caller"],
        destination_crls=crls["destination"],
        sni=p["sni"],
        pinned=p["pinned"],
        exported=[p["sni"]],
    )
    assert not ok and "unable to get certificate CRL" in detail, detail


def test_an_unexported_sni_is_refused_at_the_ingress_relay(fleet: dict[str, Path]) -> None:
    p = _parties(fleet)
    both = p["a"]["ca-crl.pem"]
    ok, _, seen = handshake(
        caller=p["caller"],
        destination=p["destination"],
        roots=p["roots"],
        caller_crls=both,
        destination_crls=p["b"]["ca-crl.pem"],
        sni=p["sni"],
        pinned=p["pinned"],
        exported=["9080.details.bookinfo.mb-e2e"],
    )
    assert not ok and seen == [(p["sni"], False)]


def test_another_workload_of_b_is_not_accepted_as_the_destination(fleet: dict[str, Path]) -> None:
    p = _parties(fleet)
    both = p["a"]["ca-crl.pem"]
    impostor = mint(p["b"], "spiffe://b.mesh/ns/bookinfo/sa/bookinfo-details")
    ok, detail, _ = handshake(
        caller=p["caller"],
        destination=impostor,
        roots=p["roots"],
        caller_crls=both,
        destination_crls=p["b"]["ca-crl.pem"],
        sni=p["sni"],
        pinned=p["pinned"],
        exported=[p["sni"]],
    )
    assert not ok and "is not one of the pinned" in detail, detail
