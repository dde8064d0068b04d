"""Issue 10, item 1: no cluster can impersonate the CA service.

The attack: a cluster's intermediate key sits in its ``cacerts``; with it anyone can sign a TLS
server certificate for the CA service's name or IP that chains to the root every agent trusts, then
relay and capture bootstrap and agent tokens. Every cluster intermediate now excludes the CA
service's names (recorded by ``serve``) in its critical nameConstraints, so OpenSSL, Go and the
agent's own TLS client refuse such a certificate, while istiod's and workloads' DNS certificates
keep verifying.
"""

from __future__ import annotations

import http.server
import ipaddress
import ssl
import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ca_server.core import x509profiles as xp
from ca_server.core.errors import InvalidInput
from cluster_agent import pki
from cluster_agent.ca_client import CAAnswerInvalid, CAClient, CAUnreachable
from tests.ca import certcheck
from tests.ca.conftest import Agent, Harness
from tests.support.pgserver import free_port

CA_DNS = "ca.meshbridge.test"
CA_IP = "127.0.0.1"
requires_go = pytest.mark.skipif(certcheck.GO is None, reason="needs a Go toolchain")


def serve_names(h: Harness, *names: str) -> None:
    """What ``serve --server-name … --listen HOST:PORT`` does at start: issue its TLS certificate."""
    dns = [n for n in names if not _is_ip(n)]
    ips = [n for n in names if _is_ip(n)]
    h.authority.issue_server_certificate(
        ec.generate_private_key(ec.SECP256R1()).public_key(), dns_names=dns, ip_addresses=ips
    )


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def mint_leaf(
    agent: Agent,
    *,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    uris: Sequence[str] = (),
    key: ec.EllipticCurvePrivateKey | None = None,
) -> x509.Certificate:
    """What the attacker signs with the cluster's intermediate key: a TLS server certificate."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    sans += [x509.UniformResourceIdentifier(u) for u in uris]
    assert isinstance(agent.key, ec.EllipticCurvePrivateKey)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshbridge CA service")]))
        .issuer_name(agent.cert.subject)
        .public_key(key.public_key())
        .serial_number(xp.random_serial())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(agent.key.public_key()), critical=False)
        .sign(agent.key, hashes.SHA256())
    )


def roots_of(agent: Agent) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(agent.bundle["root-cert.pem"].encode())


def sslserver_verify(tmp_path: Path, agent: Agent, leaf: x509.Certificate) -> certcheck.VerifyResult:
    """``openssl verify -purpose sslserver -CAfile <agent anchor> -untrusted <intermediate>``."""
    return certcheck.openssl_verify_certs(
        tmp_path, leaf, roots=roots_of(agent), intermediates=[agent.cert], extra=["-purpose", "sslserver"]
    )


# ------------------------------------------------------------------ the profile


def test_every_intermediate_excludes_the_ca_service_names(harness: Harness) -> None:
    serve_names(harness, CA_DNS, CA_IP, "::1")
    agent = harness.enroll("a", trust_domain="a.mesh")
    nc = agent.cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert nc.critical
    assert nc.value.permitted_subtrees == [x509.UniformResourceIdentifier("a.mesh")]
    assert set(nc.value.excluded_subtrees or []) == {
        x509.DNSName(CA_DNS),
        x509.IPAddress(ipaddress.ip_network("127.0.0.1/32")),
        x509.IPAddress(ipaddress.ip_network("::1/128")),
    }
    renewed = harness.renew(agent)  # the renewal path (with its drafts) too
    assert renewed.cert.extensions.get_extension_for_class(x509.NameConstraints).value == nc.value


@pytest.mark.parametrize(
    "name", ["svc", "istio-system.svc", "cluster.local", "svc.cluster.local", "local", "*.example.com", "not a name"]
)
def test_a_name_that_would_break_the_mesh_is_refused(harness: Harness, name: str) -> None:
    with pytest.raises(InvalidInput):
        serve_names(harness, name)
    with harness.store.read() as tx:
        assert tx.list_server_names() == []


# ------------------------------------------------------------------ the attack, under OpenSSL and Go


@pytest.mark.parametrize(
    ("dns", "ips"), [([CA_DNS], []), ([], [CA_IP]), (["x." + CA_DNS], []), (["innocent.example", CA_DNS], [])]
)
def test_openssl_refuses_an_intermediate_minted_ca_server_certificate(
    harness: Harness, tmp_path: Path, dns: list[str], ips: list[str]
) -> None:
    serve_names(harness, CA_DNS, CA_IP)
    agent = harness.enroll("a", trust_domain="a.mesh")
    result = sslserver_verify(tmp_path, agent, mint_leaf(agent, dns=dns, ips=ips))
    assert not result.ok, result.output
    assert "excluded subtree violation" in result.output


@pytest.mark.parametrize(
    ("dns", "uris"),
    [
        (["istiod.istio-system.svc"], ["spiffe://a.mesh/ns/istio-system/sa/istiod"]),
        (["istiod.istio-system.svc", "istiod.istio-system.svc.cluster.local"], []),
        (["reviews.bookinfo.svc.cluster.local"], ["spiffe://a.mesh/ns/bookinfo/sa/reviews"]),
    ],
)
def test_the_intermediate_still_signs_istiod_and_workload_dns_names(
    harness: Harness, tmp_path: Path, dns: list[str], uris: list[str]
) -> None:
    serve_names(harness, CA_DNS, CA_IP)
    agent = harness.enroll("a", trust_domain="a.mesh")
    leaf = mint_leaf(agent, dns=dns, uris=uris)
    result = sslserver_verify(tmp_path, agent, leaf)
    assert result.ok, result.output
    if certcheck.GO is not None:
        go = certcheck.go_verify(
            tmp_path / "go", leaf, roots=roots_of(agent), intermediates=[agent.cert], at=datetime.now(UTC)
        )
        assert go.ok, go.output


@requires_go
@pytest.mark.parametrize(("dns", "ips"), [([CA_DNS], []), ([], [CA_IP])])
def test_go_refuses_an_intermediate_minted_ca_server_certificate(
    harness: Harness, tmp_path: Path, dns: list[str], ips: list[str]
) -> None:
    serve_names(harness, CA_DNS, CA_IP)
    agent = harness.enroll("a", trust_domain="a.mesh")
    result = certcheck.go_verify(
        tmp_path,
        mint_leaf(agent, dns=dns, ips=ips),
        roots=roots_of(agent),
        intermediates=[agent.cert],
        at=datetime.now(UTC),
    )
    assert not result.ok and "excluded" in result.output, result.output


# ------------------------------------------------------------------ the attack, on the agent's TLS client


class _Impostor(http.server.BaseHTTPRequestHandler):
    captured: list[str]

    def do_GET(self) -> None:
        self.captured.append(self.headers.get("Authorization", ""))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *_: object) -> None:
        pass


def test_the_agent_refuses_a_ca_impersonated_with_an_intermediate(harness: Harness, tmp_path: Path) -> None:
    """Before the fix (an intermediate signed before the CA's names were protected) the agent's own
    client connects to the impostor and hands over its agent token; an intermediate signed since
    cannot mint a certificate the client accepts, and the older one's cluster must rotate."""
    old = harness.enroll("old", trust_domain="old.mesh")  # signed before `serve` recorded its names
    serve_names(harness, CA_DNS, CA_IP)
    assert harness.cluster("old")["rotation_pending"]
    new = harness.enroll("a", trust_domain="a.mesh")
    assert not harness.cluster("a")["rotation_pending"]

    def impersonate(agent: Agent) -> tuple[type[Exception], list[str]]:
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = mint_leaf(agent, dns=[CA_DNS], ips=[CA_IP], key=key)
        chain, key_file = tmp_path / f"{agent.name}.pem", tmp_path / f"{agent.name}.key"
        chain.write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + agent.bundle["ca-cert.pem"].encode())
        key_file.write_bytes(pki.key_pem(key).encode())
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(chain, key_file)
        port = free_port()
        captured: list[str] = []
        handler = type("Impostor", (_Impostor,), {"captured": captured})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        client = CAClient(f"https://{CA_IP}:{port}", trust_pem=new.bundle["root-cert.pem"], cluster="victim", timeout=5)
        client.set_token("mbagent.0123456789abcdef.victim-secret")
        try:
            client.desired()
        except (CAUnreachable, CAAnswerInvalid) as exc:
            return type(exc), captured
        finally:
            client.close()
            server.shutdown()
            server.server_close()
        raise AssertionError("the impostor answered a valid desired state")

    outcome, captured = impersonate(old)
    assert outcome is CAAnswerInvalid and captured == ["Bearer mbagent.0123456789abcdef.victim-secret"]
    outcome, captured = impersonate(new)
    assert outcome is CAUnreachable and captured == []


# ------------------------------------------------------------------ names added later


def test_a_new_server_name_is_protected_audited_and_rotates_clusters(harness: Harness, tmp_path: Path) -> None:
    serve_names(harness, CA_IP)
    agent = harness.enroll("a", trust_domain="a.mesh")
    assert not harness.desired(agent)["rotate_required"]
    serve_names(harness, CA_IP, CA_DNS)  # serve restarted with one more --server-name
    desired = harness.desired(agent)
    assert desired["rotate_required"] and desired["generation"] == agent.generation + 1
    entries = [e for e in harness.authority.audit(after=0, limit=1000) if e.action == "server_names.protect"]
    assert [e.details["names"] for e in entries] == [[CA_IP], [CA_DNS]]
    assert entries[-1].details["rotated"] == ["a"]
    renewed = harness.renew(agent)
    assert not sslserver_verify(tmp_path, renewed, mint_leaf(renewed, dns=[CA_DNS])).ok
    serve_names(harness, CA_DNS, CA_IP)  # nothing new: nothing audited, nothing rotated
    assert not harness.desired(renewed)["rotate_required"]
    assert len([e for e in harness.authority.audit(after=0, limit=1000) if e.action == "server_names.protect"]) == 2
