"""Golden files for every renderer: byte-for-byte `yaml.safe_dump(obj, sort_keys=True)` per object.

Regenerate after an intended change with

    UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/agent/test_render_golden.py

and review the diff under tests/agent/golden/. The test PKI in golden/pki/ is made once (when
missing) and kept, so the cacerts Secret stays byte-stable; it is a throwaway test CA.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cluster_agent.config import parse_config
from cluster_agent.render import (
    file_name,
    merge_into_corefile,
    render_all,
    render_cacerts_secret,
    render_coredns_configmaps,
    render_server_block,
    render_state_configmap,
)
from tests.support.corefile import KUBEADM_COREFILE

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"


INGRESS = "spiffe://{td}/ns/istio-system/sa/istio-ingressgateway-service-account"
EGRESS = "spiffe://{td}/ns/istio-system/sa/istio-egressgateway-service-account"


def dump(obj: Any) -> str:
    return yaml.safe_dump(obj, sort_keys=True)


def assert_golden(directory: Path, files: dict[str, str]) -> None:
    if UPDATE:
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.iterdir():
            if stale.name not in files:
                stale.unlink()
        for name, text in files.items():
            (directory / name).write_bytes(text.encode())
        return
    assert directory.is_dir(), f"{directory} is missing; run with UPDATE_GOLDEN=1 and review it"
    assert sorted(p.name for p in directory.iterdir()) == sorted(files), "files differ; UPDATE_GOLDEN=1 to review"
    for name, text in files.items():
        assert (directory / name).read_bytes() == text.encode(), f"{directory.name}/{name} differs"


# ------------------------------------------------------------------------------------------------
# A fixed test PKI (root → cluster b intermediate), made once


def _pki() -> dict[str, str]:
    directory = GOLDEN / "pki"
    names = ("root-cert.pem", "ca-cert.pem", "ca-key.pem", "root-crl.pem", "intermediate-crl.pem")
    if not all((directory / n).exists() for n in names):
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in _new_pki().items():
            (directory / name).write_text(text)
    return {n: (directory / n).read_text() for n in names}


def _new_pki() -> dict[str, str]:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    root_key, ca_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

    def cert(
        cn: str,
        key: ec.EllipticCurvePrivateKey,
        issuer: x509.Certificate | None,
        signer: Any,
        path_length: int | None,
        years: int,
    ) -> x509.Certificate:
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshbridge golden"),
                x509.NameAttribute(NameOID.COMMON_NAME, cn),
            ]
        )
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer.subject if issuer else name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start.replace(year=start.year + years))
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(signer, hashes.SHA256())
        )

    def crl(issuer: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> str:
        return (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer.subject)
            .last_update(start)
            .next_update(start + timedelta(days=7))
            .sign(key, hashes.SHA256())
            .public_bytes(serialization.Encoding.PEM)
            .decode()
        )

    root = cert("golden root", root_key, None, root_key, None, 20)
    ca = cert("golden cluster b", ca_key, root, root_key, 0, 10)
    return {
        "root-cert.pem": root.public_bytes(serialization.Encoding.PEM).decode(),
        "ca-cert.pem": ca.public_bytes(serialization.Encoding.PEM).decode(),
        "ca-key.pem": ca_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode(),
        "root-crl.pem": crl(root, root_key),
        "intermediate-crl.pem": crl(ca, ca_key),
    }


# ------------------------------------------------------------------------------------------------
# Inputs


def _import(name: str, cluster: str, ports: list[tuple[int, str]], address: str) -> dict[str, Any]:
    return {
        "name": name,
        "cluster": cluster,
        "ports": [{"number": n, "protocol": p} for n, p in ports],
        "gateway": {"address": address, "port": 15443},
        "identity": INGRESS.format(td=f"{cluster}.mesh"),
    }


def _peer(name: str, trust_domain: str) -> dict[str, Any]:
    return {
        "name": name,
        "trust_domain": trust_domain,
        "identities": {"ingress": INGRESS.format(td=trust_domain), "egress": EGRESS.format(td=trust_domain)},
    }


CONFIG_B = {
    "cluster": "b",
    "ca": {"url": "https://127.0.0.1:8443", "trust_anchor": "/etc/meshbridge/ca-root.pem"},
    "istio": {
        "namespace": "istio-system",
        "trust_domain": "b.mesh",
        "ingress_gateway": {
            "selector": {"istio": "ingressgateway"},
            "service": "istio-ingressgateway",
            "service_account": "istio-ingressgateway-service-account",
            "address": "198.51.100.20",
            "port": 15443,
        },
        "egress_gateway": {
            "selector": {"istio": "egressgateway"},
            "service": "istio-egressgateway",
            "service_account": "istio-egressgateway-service-account",
        },
    },
    "dns": {"suffix": "remote", "mode": "coredns", "nodelocal_dns": {"bind": ["169.254.20.10", "10.96.0.10"]}},
    "exports": [
        {"service": "ratings", "namespace": "bookinfo", "ports": [9080], "consumers": ["a"]},
        {
            "service": "api",
            "namespace": "shop",
            "ports": [80, {"number": 9090, "protocol": "GRPC"}],
            "consumers": ["a", "c"],
        },
    ],
    "imports": [{"from": "a", "names": ["*"]}, {"from": "c", "names": ["reviews.bookinfo"]}],
}
IMPORTS_B = [
    _import("details.bookinfo", "a", [(9080, "HTTP")], "203.0.113.10"),
    _import("productpage.bookinfo", "a", [(9080, "HTTP"), (80, "HTTP2")], "203.0.113.10"),
    {
        # two TCP ports (each on an SNI of its own), c's published TCP port
        **_import("reviews.bookinfo", "c", [(9080, "HTTP"), (3306, "TCP"), (3307, "TCP")], "ingress.c.example"),
        "gateway": {"address": "ingress.c.example", "port": 15443, "tcp_port": 15544},
    },
]
PEERS_B = [_peer("a", "a.mesh"), _peer("c", "c.mesh")]

CONFIG_A = {
    "cluster": "a",
    "ca": {"url": "https://ca.example", "trust_anchor": "/etc/meshbridge/ca-root.pem"},
    "istio": {"trust_domain": "a.mesh", "authorization_mode": "allow", "cross_cluster_port": 15445},
    "dns": {"suffix": "mesh.example", "mode": "none", "vip_range": "240.10.0.0/24"},
    "exports": [{"service": "details", "namespace": "bookinfo", "ports": [9080], "consumers": ["b", "d"]}],
    "imports": [
        {
            "from": "b",
            "names": ["ratings.bookinfo"],
            "egress_gateway": {
                "selector": {"app": "egress-to-b"},
                "service": "egress-to-b",
                "service_account": "istio-egressgateway-service-account",
            },
        },
        # issue 13: ratings.bookinfo from c too, as the fallback (priority 1), each at its locality
        {"from": "c", "names": ["ratings.bookinfo"], "priority": 1, "locality": "us-east1"},
    ],
}
IMPORTS_A = [
    {  # b publishes two gateway addresses, one a DNS name
        **_import("ratings.bookinfo", "b", [(9080, "HTTP")], "lb.b.example"),
        "gateway": {"address": "lb.b.example", "addresses": ["lb.b.example", "198.51.100.21"], "port": 15443},
    },
    _import("ratings.bookinfo", "c", [(9080, "HTTP")], "203.0.113.30"),
]
PEERS_A = [_peer("b", "cluster.local"), _peer("d", "cluster.local")]


def _object_files(result: Any) -> dict[str, str]:
    files = {file_name(obj): dump(obj) for obj in result.objects}
    files["_warnings.txt"] = "".join(f"{w}\n" for w in result.warnings)
    return files


def test_golden_render_all_cluster_b() -> None:
    pki = _pki()
    bundle = {
        "ca-cert.pem": pki["ca-cert.pem"],
        "cert-chain.pem": pki["ca-cert.pem"] + pki["root-cert.pem"],
        "root-cert.pem": pki["root-cert.pem"],
        "crl.pem": pki["root-crl.pem"],
    }
    result = render_all(
        parse_config(CONFIG_B),
        imports=IMPORTS_B,
        peers=PEERS_B,
        # allocated under the old default range, Istio's 240.240.0.0/16: moves to the same host part
        vips={"details.bookinfo": "240.240.0.10", "gone.bookinfo": "240.240.0.11"},
        bundle=bundle,
        intermediate_key_pem=pki["ca-key.pem"],
        crl_pem=pki["intermediate-crl.pem"],
        corefile=KUBEADM_COREFILE,
    )
    assert_golden(GOLDEN / "render_all-b", _object_files(result))


def test_golden_render_all_cluster_a_allow_mode_dedicated_egress_no_dns() -> None:
    result = render_all(parse_config(CONFIG_A), imports=IMPORTS_A, peers=PEERS_A, vips={})
    assert_golden(GOLDEN / "render_all-a", _object_files(result))


E2E_EXPORTER = {
    "cluster": "b",
    "ca": {"url": "https://ca.example", "trust_anchor": "/etc/meshbridge/ca-root.pem"},
    "istio": {"trust_domain": "b.mesh"},
    "dns": {"mode": "none"},
    "exports": [
        # end to end: a's reviews workloads only, the whole of c
        {
            "service": "ratings",
            "namespace": "bookinfo",
            "ports": [9080, {"number": 3306, "protocol": "TCP"}],
            "mode": "end-to-end",
            "service_accounts": ["bookinfo-ratings"],
            "consumers": [{"cluster": "a", "principals": ["ns/bookinfo/sa/bookinfo-reviews"]}, "c"],
        },
        {"service": "details", "namespace": "bookinfo", "ports": [9080], "consumers": ["a"]},
    ],
}
E2E_IMPORTER = {
    "cluster": "a",
    "ca": {"url": "https://ca.example", "trust_anchor": "/etc/meshbridge/ca-root.pem"},
    "istio": {"trust_domain": "a.mesh"},
    "dns": {"mode": "none"},
    "imports": [{"from": "b", "names": ["*"]}],
}
E2E_IMPORTS = [
    {
        **_import("ratings.bookinfo", "b", [(9080, "HTTP"), (3306, "TCP")], "198.51.100.20"),
        "gateway": {"address": "198.51.100.20", "port": 15443, "tcp_port": 15444},
        "mode": "end-to-end",
        "workload_identities": ["spiffe://b.mesh/ns/bookinfo/sa/bookinfo-ratings"],
    },
    _import("details.bookinfo", "b", [(9080, "HTTP")], "198.51.100.20"),
]


def test_golden_render_end_to_end_exporter() -> None:
    result = render_all(
        parse_config(E2E_EXPORTER), imports=[], peers=[_peer("a", "a.mesh"), _peer("c", "c.mesh")], vips={}
    )
    assert_golden(GOLDEN / "render_all-e2e-exporter", _object_files(result))


def test_golden_render_end_to_end_importer() -> None:
    result = render_all(parse_config(E2E_IMPORTER), imports=E2E_IMPORTS, peers=[_peer("b", "b.mesh")], vips={})
    assert_golden(GOLDEN / "render_all-e2e-importer", _object_files(result))


VIPS = {"details.bookinfo": "241.0.0.10", "reviews.bookinfo": "241.0.77.3", "ratings.bookinfo": "241.0.1.200"}


def test_golden_coredns() -> None:
    block = render_server_block("remote", VIPS)
    objects = render_coredns_configmaps("remote", VIPS, cluster="b", corefile=KUBEADM_COREFILE)
    assert_golden(
        GOLDEN / "coredns",
        {
            "remote.server": block,
            "Corefile.merged": merge_into_corefile(KUBEADM_COREFILE, block),
            **{file_name(o): dump(o) for o in objects},
        },
    )


def test_golden_state_and_cacerts() -> None:
    pki = _pki()
    secret = render_cacerts_secret(
        "istio-system",
        ca_cert_pem=pki["ca-cert.pem"],
        ca_key_pem=pki["ca-key.pem"],
        cert_chain_pem=pki["ca-cert.pem"] + pki["root-cert.pem"],
        root_cert_pem=pki["root-cert.pem"],
        cluster="b",
    )
    state = render_state_configmap(VIPS, namespace="istio-system", cluster="b")
    assert_golden(GOLDEN / "state-cacerts", {file_name(secret): dump(secret), file_name(state): dump(state)})


@pytest.mark.skipif(UPDATE, reason="regenerating")
def test_golden_directories_hold_nothing_else() -> None:
    assert sorted(p.name for p in GOLDEN.iterdir()) == [
        "README.md",
        "coredns",
        "pki",
        "render_all-a",
        "render_all-b",
        "render_all-e2e-exporter",
        "render_all-e2e-importer",
        "state-cacerts",
    ]
