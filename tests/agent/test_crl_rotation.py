"""ca-crl.pem never breaks in-cluster mTLS (issue 11, items 4 and 5), against a real CA service.

Envoy verifies every peer chain with CRL_CHECK|CRL_CHECK_ALL once istiod ships ca-crl.pem
(envoy default_validator.cc initializeSslContexts): every CA of the chain needs a current CRL
from its issuer. `openssl verify -crl_check_all` with the same CRL set makes the same decision
(ISTIO-NOTES, "CRLs in the data plane"), so each test asks it about workload certificates minted
the way istiod signs them.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import math
import threading
import time
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from cluster_agent.ca_client import CAClient
from cluster_agent.config import load_config
from cluster_agent.intermediate import SUPERSEDED_GRACE
from cluster_agent.loop import AgentLoop, Backoff
from cluster_agent.output import DirectoryWriter
from cluster_agent.reconcile import Reconciler
from cluster_agent.render import check_cacerts_bundle
from cluster_agent.state import DirStateStore
from tests.ca.certcheck import VerifyResult, openssl_verify
from tests.support.caservice import CAService

TTL = dt.timedelta(hours=24)  # ca.workload_cert_ttl's default, Istio's default workload TTL


class Clock:
    """The agent's clock: wall time plus an offset the test moves (the CA keeps the wall time)."""

    def __init__(self) -> None:
        self.offset = dt.timedelta(0)

    def __call__(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC) + self.offset


def make_loop(cfg_path: Path, clock: Clock) -> tuple[AgentLoop, Path]:
    """A render-mode agent whose state lives in `<dir>/out/.meshbridge` (a restart = a new one)."""
    cfg = load_config(cfg_path)
    out = cfg_path.parent / "out"
    client = CAClient(cfg.ca.url, trust_pem=Path(cfg.ca.trust_anchor).read_text(), cluster=cfg.cluster)
    writer = DirectoryWriter(out, state_dir=out / ".meshbridge", stream=io.StringIO())
    rec = Reconciler(cfg, client=client, applier=writer, state_store=DirStateStore(out / ".meshbridge"), clock=clock)
    return AgentLoop(rec, poll_wait=1, backoff=Backoff(base=0.01, cap=0.01)), out


def step(loop: AgentLoop) -> None:
    loop.revision = None  # take the current desired state at once and render
    assert loop.step() is not None


def cacerts(out: Path) -> dict[str, str]:
    secret = yaml.safe_load((out / "secret-istio-system-cacerts.yaml").read_text())
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def crls_of(pem: str) -> list[x509.CertificateRevocationList]:
    marker = "-----END X509 CRL-----"
    return [x509.load_pem_x509_crl((block + marker).encode()) for block in pem.split(marker) if "BEGIN" in block]


def workload(files: dict[str, str], *, valid_for: dt.timedelta = dt.timedelta(days=3)) -> str:
    """A workload certificate signed as istiod signs one with these cacerts (PEM, leaf only)."""
    ca_cert = x509.load_pem_x509_certificate(files["ca-cert.pem"].encode())
    ca_key = serialization.load_pem_private_key(files["ca-key.pem"].encode(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    trust_domain = ca_cert.subject.get_attributes_for_oid(x509.oid.NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + valid_for)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain!s}/ns/default/sa/web")]
            ),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode() + files["cert-chain.pem"]


def verify(
    tmp: Path, chain_pem: str, files: dict[str, str], *, at: dt.datetime | None = None, extra_crls: str = ""
) -> VerifyResult:
    """openssl verify -crl_check_all -CAfile root-cert.pem -untrusted <chain> -CRLfile ca-crl.pem."""
    tmp.mkdir(parents=True, exist_ok=True)
    leaf, _, rest = chain_pem.partition("-----END CERTIFICATE-----\n")
    (tmp / "leaf.pem").write_text(leaf + "-----END CERTIFICATE-----\n")
    (tmp / "chain.pem").write_text(rest)
    (tmp / "root.pem").write_text(files["root-cert.pem"])
    (tmp / "crl.pem").write_text(files["ca-crl.pem"] + extra_crls)
    return openssl_verify(
        tmp / "leaf.pem",
        cafile=tmp / "root.pem",
        untrusted=tmp / "chain.pem",
        crlfile=tmp / "crl.pem",
        attime=at,
        extra=["-crl_check_all"],
    )


def test_workloads_of_the_superseded_and_the_new_intermediate_both_verify_after_a_rotate(
    ca_service: CAService, two_clusters: dict[str, Path], tmp_path: Path
) -> None:
    clock = Clock()
    loop, out = make_loop(two_clusters["a"], clock)
    step(loop)
    gen_n = cacerts(out)
    leaf_n = workload(gen_n)  # istiod signed it before the rotation
    assert verify(tmp_path / "n-before", leaf_n, gen_n).ok

    ca_service.authority.rotate("a", actor="test")
    step(loop)
    gen_n1 = cacerts(out)
    assert gen_n1["ca-cert.pem"] != gen_n["ca-cert.pem"]
    leaf_n1 = workload(gen_n1)
    for name, leaf in (("n", leaf_n), ("n+1", leaf_n1)):
        res = verify(tmp_path / name, leaf, gen_n1)
        assert res.ok, (
            f"a workload certificate of generation {name} fails with generation N+1's ca-crl.pem:\n{res.output}"
        )
    # the set: the root's CRL, the new intermediate's own, the superseded one's final CRL
    crls = crls_of(gen_n1["ca-crl.pem"])
    old = x509.load_pem_x509_certificate(gen_n["ca-cert.pem"].encode())
    final = [c for c in crls if c.is_signature_valid(old.public_key())]  # type: ignore[arg-type]
    assert len(crls) == 3 and len(final) == 1
    assert final[0].next_update_utc is not None
    assert final[0].next_update_utc >= clock() + TTL  # covers every workload certificate it signed
    check_cacerts_bundle(
        ca_cert_pem=gen_n1["ca-cert.pem"],
        ca_key_pem=gen_n1["ca-key.pem"],
        cert_chain_pem=gen_n1["cert-chain.pem"],
        root_cert_pem=gen_n1["root-cert.pem"],
        crl_pem=gen_n1["ca-crl.pem"],
        now=clock(),
    )


def test_a_workload_of_a_revoked_cluster_fails_the_same_check(
    ca_service: CAService, two_clusters: dict[str, Path], tmp_path: Path
) -> None:
    clock = Clock()
    loop_a, out_a = make_loop(two_clusters["a"], clock)
    loop_b, out_b = make_loop(two_clusters["b"], clock)
    step(loop_a)
    step(loop_b)
    files_b = cacerts(out_b)
    leaf_b = workload(files_b)
    own_b = crls_of(files_b["ca-crl.pem"])[-1].public_bytes(serialization.Encoding.PEM).decode()
    assert verify(tmp_path / "before", leaf_b, cacerts(out_a), extra_crls=own_b).ok

    ca_service.authority.revoke_cluster("b", reason="keyCompromise", actor="test")
    step(loop_a)
    files_a = cacerts(out_a)
    res = verify(tmp_path / "after", leaf_b, files_a)
    assert not res.ok, res.output
    # given b's own CRL too, the reason left is the revocation of b's intermediate by the root
    res = verify(tmp_path / "after-with-own", leaf_b, files_a, extra_crls=own_b)
    assert not res.ok and "certificate revoked" in res.output, res.output
    assert verify(tmp_path / "a", workload(files_a), files_a).ok


def test_the_final_crl_survives_a_restart_and_is_dropped_after_the_keep_period(
    ca_service: CAService, two_clusters: dict[str, Path], tmp_path: Path
) -> None:
    clock = Clock()
    loop, out = make_loop(two_clusters["a"], clock)
    step(loop)
    leaf_n = workload(cacerts(out))
    ca_service.authority.rotate("a", actor="test")
    step(loop)
    leaf_n1 = workload(cacerts(out))

    # a restart (new process, state from the state directory) one minute before the keep period ends
    clock.offset = TTL + SUPERSEDED_GRACE - dt.timedelta(minutes=1)
    restarted, _ = make_loop(two_clusters["a"], clock)
    step(restarted)
    kept = cacerts(out)
    assert len(crls_of(kept["ca-crl.pem"])) == 3
    assert verify(tmp_path / "kept", leaf_n, kept, at=clock()).ok

    clock.offset = TTL + SUPERSEDED_GRACE + dt.timedelta(minutes=1)  # no workload certificate of N is alive
    step(restarted)
    dropped = cacerts(out)
    assert len(crls_of(dropped["ca-crl.pem"])) == 2
    assert verify(tmp_path / "n1", leaf_n1, dropped, at=clock()).ok
    res = verify(tmp_path / "n", leaf_n, dropped, at=clock())
    assert not res.ok and "unable to get certificate CRL" in res.output, res.output
    assert restarted.r.state.superseded_crls == []


def test_a_ca_outage_past_seven_days_leaves_valid_crls(
    ca_service: CAService, two_clusters: dict[str, Path], tmp_path: Path
) -> None:
    clock = Clock()
    loop, out = make_loop(two_clusters["a"], clock)
    step(loop)
    installed = loop.metrics.registry.get_sample_value("meshbridge_agent_ca_crl_next_update_seconds")
    assert installed is not None and installed > (clock() + dt.timedelta(days=6)).timestamp()
    leaf = workload(cacerts(out), valid_for=dt.timedelta(days=10))

    ca_service.stop()  # the CA is down from now on
    clock.offset = dt.timedelta(days=8)  # past the 7-day CRLs of before
    runner = threading.Thread(target=loop.run, daemon=True)
    runner.start()
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            expires_in = loop.metrics.registry.get_sample_value("meshbridge_agent_ca_crl_expires_in_seconds")
            if expires_in is not None and not math.isnan(expires_in) and expires_in > 8 * 86400:
                break
            time.sleep(0.1)
    finally:
        loop.stop.set()
        runner.join(10)
    assert loop.metrics.registry.get_sample_value("meshbridge_agent_ca_reachable") == 0
    expires_in = loop.metrics.registry.get_sample_value("meshbridge_agent_ca_crl_expires_in_seconds")
    # the agent's own CRL re-signed for another 7 days from the moved clock: 8 + 7 days from wall time
    assert expires_in is not None and expires_in > 14 * 86400, expires_in

    files = cacerts(out)
    res = verify(tmp_path / "outage", leaf, files, at=clock())
    assert res.ok, f"after 8 days without the CA the CRL set must still verify:\n{res.output}"
    check_cacerts_bundle(
        ca_cert_pem=files["ca-cert.pem"],
        ca_key_pem=files["ca-key.pem"],
        cert_chain_pem=files["cert-chain.pem"],
        root_cert_pem=files["root-cert.pem"],
        crl_pem=files["ca-crl.pem"],
        now=clock(),
    )


def test_ca_crl_off_writes_no_crl_set(ca_service: CAService, two_clusters: dict[str, Path], tmp_path: Path) -> None:
    cfg = two_clusters["a"]
    cfg.write_text(cfg.read_text().replace("ca:\n", "ca:\n  ca_crl: false\n", 1))
    loop, out = make_loop(cfg, Clock())
    step(loop)
    files = cacerts(out)
    assert "ca-crl.pem" not in files
    assert math.isnan(loop.metrics.registry.get_sample_value("meshbridge_agent_ca_crl_expires_in_seconds") or 0.0)
