"""Issue 10, item 2: an agent never lets an answer rewrite its trust.

The attacker holds a man-in-the-middle position between the agent and the CA service (an
``httpx.MockTransport`` in front of the real service, forwarding every request and rewriting the
answers it chooses). Before the fix, ``desired.trust_bundle`` replaced the agent's anchors unchecked
and a renewal answer was checked only against its own ``root-cert.pem``.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ca_server.core import x509profiles as xp
from ca_server.core.keytypes import LocalKeySigner
from cluster_agent.ca_client import CAClient
from cluster_agent.config import load_config
from cluster_agent.errors import TrustRefused
from cluster_agent.loop import AgentLoop
from cluster_agent.output import DirectoryWriter
from cluster_agent.reconcile import Reconciler
from cluster_agent.state import DirStateStore
from cluster_agent.trust import endorsed
from tests.agent.test_agent_flow import cacerts, make_agent, step
from tests.support.caservice import CAService
from tests.support.served import report_served

Rewrite = Callable[[httpx.Request, dict[str, Any]], dict[str, Any]]


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


class Attacker:
    """A root of the attacker's own, and the means to sign with it."""

    def __init__(self, subject: x509.Name | None = None) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.signer = LocalKeySigner(self.key)
        name = subject or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attacker root")])
        self.root = xp.build_root(self.signer, subject=name, now=datetime.now(UTC))

    def endorse(self, root: x509.Certificate, *, issuer: x509.Certificate | None = None) -> str:
        """A forged endorsement of ``root``: claims ``issuer`` (default: the attacker's root) but is
        signed with the attacker's key."""
        builder = (
            x509.CertificateBuilder()
            .subject_name(root.subject)
            .issuer_name((issuer or self.root).subject)
            .public_key(root.public_key())
            .serial_number(xp.random_serial())
            .not_valid_before(datetime.now(UTC) - timedelta(minutes=5))
            .not_valid_after(datetime.now(UTC) + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        )
        return pem(builder.sign(self.key, hashes.SHA256()))

    def intermediate_for(self, csr_pem: str, template: x509.Certificate) -> x509.Certificate:
        """An intermediate for the agent's CSR key, shaped like the real one, under the attacker's root."""
        csr = x509.load_pem_x509_csr(csr_pem.encode())
        return xp.issue_intermediate(
            csr=csr,
            issuer=self.root,
            signer=self.signer,
            subject=template.subject,
            trust_domain="a.mesh",
            now=datetime.now(UTC),
        )


def mitm_agent(ca_service: CAService, cfg_path: Path, rewrite: Rewrite) -> tuple[AgentLoop, Path, list[bool]]:
    """The agent of ``cfg_path`` talking to the real CA service through the attacker, who forwards
    everything and rewrites JSON answers with ``rewrite`` while the returned switch is on."""
    cfg = load_config(cfg_path)
    anchor = Path(cfg.ca.trust_anchor).read_text()
    upstream = httpx.Client(base_url=ca_service.url, verify=ssl.create_default_context(cadata=anchor))
    on = [False]

    def relay(request: httpx.Request) -> httpx.Response:
        answer = upstream.send(
            upstream.build_request(request.method, str(request.url), headers=request.headers, content=request.content)
        )
        if not on[0] or answer.status_code >= 300 or not answer.content:
            return httpx.Response(
                answer.status_code,
                content=answer.content,
                headers={"Content-Type": answer.headers.get("Content-Type", "application/json")},
            )
        body = rewrite(request, answer.json())
        return httpx.Response(answer.status_code, json=body)

    client = CAClient(cfg.ca.url, trust_pem=anchor, cluster=cfg.cluster, transport=httpx.MockTransport(relay))
    out = cfg_path.parent / "out"
    writer = DirectoryWriter(out, state_dir=out / ".meshbridge")
    rec = Reconciler(cfg, client=client, applier=writer, state_store=DirStateStore(out / ".meshbridge"))
    return AgentLoop(rec, poll_wait=1), out, on


def snapshot(out: Path) -> tuple[bytes, bytes]:
    return ((out / "secret-istio-system-cacerts.yaml").read_bytes(), (out / ".meshbridge" / "state.json").read_bytes())


def refused(loop: AgentLoop, ca_service: CAService, match: str) -> None:
    """The pass is refused with TrustRefused, reported to the CA as the loop reports it."""
    with pytest.raises(TrustRefused, match=match) as caught:
        step(loop)
    loop.r.failed(f"rejected: {caught.value}")  # what AgentLoop.run does with a BundleRejected
    status = {c.name: c for c, _ in ca_service.authority.list_clusters()}[loop.r.config.cluster].agent_status
    assert status is not None and any(
        "no trusted root" in e or "does not trust" in e or "does not end" in e for e in status["errors"]
    ), status


def only_desired(change: Callable[[dict[str, Any]], None]) -> Rewrite:
    def rewrite(request: httpx.Request, body: dict[str, Any]) -> dict[str, Any]:
        if request.url.path.endswith("/desired"):
            change(body)
        return body

    return rewrite


# ------------------------------------------------------------------ forged desired state


@pytest.mark.parametrize("forgery", ["bare", "self-endorsed", "endorsement claiming the real root"])
def test_forged_desired_state_cannot_add_an_attacker_root(
    ca_service: CAService, two_clusters: dict[str, Path], forgery: str
) -> None:
    attacker = Attacker()
    real_root = x509.load_pem_x509_certificate(ca_service.authority.list_roots()[0].cert_pem.encode())

    def add_root(body: dict[str, Any]) -> None:
        body["trust_bundle"] += pem(attacker.root)
        if forgery == "self-endorsed":
            body["root_endorsements"] = [attacker.endorse(attacker.root)]
        elif forgery == "endorsement claiming the real root":
            body["root_endorsements"] = [attacker.endorse(attacker.root, issuer=real_root)]

    loop, out, on = mitm_agent(ca_service, two_clusters["a"], only_desired(add_root))
    step(loop)
    before, trusted = snapshot(out), loop.r.client.trust_pem
    on[0] = True
    refused(loop, ca_service, "no trusted root endorses")
    assert snapshot(out) == before and loop.r.client.trust_pem == trusted
    assert pem(attacker.root) not in cacerts(out)["root-cert.pem"]


def test_forged_bundle_dropping_every_trusted_root_is_refused(
    ca_service: CAService, two_clusters: dict[str, Path]
) -> None:
    attacker = Attacker()

    def replace_roots(body: dict[str, Any]) -> None:
        body["trust_bundle"] = pem(attacker.root)

    loop, out, on = mitm_agent(ca_service, two_clusters["a"], only_desired(replace_roots))
    step(loop)
    before, trusted = snapshot(out), loop.r.client.trust_pem
    on[0] = True
    refused(loop, ca_service, "no trusted root endorses")
    on[0] = False  # the attacker leaves: the agent still reaches the real CA service
    assert snapshot(out) == before and loop.r.client.trust_pem == trusted
    step(loop)


def test_a_bundle_holding_no_root_is_refused(ca_service: CAService, two_clusters: dict[str, Path]) -> None:
    loop, out, on = mitm_agent(
        ca_service, two_clusters["a"], only_desired(lambda body: body.update(trust_bundle="not a certificate"))
    )
    step(loop)
    before = snapshot(out)
    on[0] = True
    with pytest.raises(TrustRefused, match="trust bundle"):
        step(loop)
    assert snapshot(out) == before


# ------------------------------------------------------------------ forged renewal answer


@pytest.mark.parametrize("root_cert", ["attacker root only", "real bundle plus attacker root"])
def test_renewal_answer_chaining_to_an_attacker_root_is_refused(
    ca_service: CAService, two_clusters: dict[str, Path], root_cert: str
) -> None:
    attacker = Attacker()
    csrs: list[str] = []

    def forge(request: httpx.Request, body: dict[str, Any]) -> dict[str, Any]:
        if request.url.path.endswith("/intermediate"):
            csr = json.loads(request.content)["csr"]
            csrs.append(csr)
            real = x509.load_pem_x509_certificate(body["bundle"]["ca-cert.pem"].encode())
            forged = pem(attacker.intermediate_for(csr, real))
            roots = (
                pem(attacker.root)
                if root_cert == "attacker root only"
                else body["bundle"]["root-cert.pem"] + pem(attacker.root)
            )
            body["bundle"].update(
                {"ca-cert.pem": forged, "cert-chain.pem": forged + pem(attacker.root), "root-cert.pem": roots}
            )
        return body

    loop, out, on = mitm_agent(ca_service, two_clusters["a"], forge)
    step(loop)
    before, trusted = snapshot(out), loop.r.client.trust_pem
    ca_service.authority.rotate("a", actor="test")
    on[0] = True
    refused(loop, ca_service, "does not end at a root this agent trusts")
    assert csrs, "the attack did not run"
    assert snapshot(out) == before and loop.r.client.trust_pem == trusted
    assert pem(attacker.root) not in cacerts(out)["cert-chain.pem"]


# ------------------------------------------------------------------ legitimate rotation


def test_agent_that_missed_phase_2_reconnects_after_activation(
    ca_service: CAService, two_clusters: dict[str, Path]
) -> None:
    """The colleague's report: agents that skipped the trusted-root window failed TLS after
    activation. The CA's TLS chain carries the new root's endorsement, so they reconnect, prove the
    new root from the old one, renew under it and later drop the retired root."""
    auth = ca_service.authority
    a, out = make_agent(two_clusters["a"])
    step(a)
    old_root = auth.list_roots()[0]
    new_root = auth.add_root(key_type=None, actor="test")  # phase 2: agent a is away
    # phase 3: a's istiod does not serve the new root (a never fetched it), so activation is forced:
    # since the gates, forcing is how an agent can miss phase 2
    auth.activate_root(new_root.id, actor="test", force=True)
    ca_service.server_cert.refresh()
    a.r.client.close()
    a, out = make_agent(two_clusters["a"])  # a comes back: a new TLS connection, state from its state dir
    res = step(a)
    assert res.renewed and cacerts(out)["cert-chain.pem"].endswith(new_root.cert_pem)
    assert new_root.cert_pem in a.r.client.trust_pem and old_root.cert_pem in a.r.client.trust_pem
    report_served(auth, "a", cacerts(out))  # a's istiod signs under the new root
    auth.retire_root(old_root.id, actor="test")  # phase 4
    step(a)
    assert a.r.client.trust_pem == new_root.cert_pem
    assert cacerts(out)["root-cert.pem"] == new_root.cert_pem


def test_agent_enrolling_after_activation_with_the_old_anchor(
    ca_service: CAService, two_clusters: dict[str, Path]
) -> None:
    """Its configured anchor predates the rotation: it reaches the CA through the endorsement, learns
    the new root from desired state before installing a chain under it, and spends its bootstrap
    token once."""
    auth = ca_service.authority
    old_root = auth.list_roots()[0]
    new_root = auth.add_root(key_type=None, actor="test")
    auth.activate_root(new_root.id, actor="test")
    ca_service.server_cert.refresh()
    b, out = make_agent(two_clusters["b"])  # b's ca.trust_anchor holds the old root only
    assert b.r.client.trust_pem == old_root.cert_pem
    step(b)
    assert cacerts(out)["cert-chain.pem"].endswith(new_root.cert_pem)
    assert b.r.client.trust_pem == old_root.cert_pem + new_root.cert_pem


def test_the_ca_publishes_an_endorsement_of_each_new_root(ca_service: CAService) -> None:
    auth = ca_service.authority
    old = x509.load_pem_x509_certificate(auth.list_roots()[0].cert_pem.encode())
    new_root = auth.add_root(key_type=None, actor="test")
    new = x509.load_pem_x509_certificate(new_root.cert_pem.encode())
    ca_service.add_cluster("c", "c.mesh", ca_service.data_dir / "token-c")
    endorsements = auth.desired("c")["root_endorsements"]
    assert endorsements == [new_root.endorsement_pem]
    cross = x509.load_pem_x509_certificates(endorsements[0].encode())
    now = datetime.now(UTC)
    assert endorsed(new, [cross], [old], now)
    assert not endorsed(new, [cross], [new], now)  # the proof is the old root's signature
    other = Attacker(subject=new.subject)  # same subject, another key: the SPKI must match too
    assert not endorsed(other.root, [cross], [old], now)
    assert not endorsed(new, [cross], [old], now + timedelta(days=4000))  # expired
