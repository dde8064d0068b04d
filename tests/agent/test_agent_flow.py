"""The agent against a real CA service: enrollment, exchange, rotation, root phases, revocation,
zero-write reconciles, an unreachable CA, and a bundle that must never be written."""

from __future__ import annotations

import base64
import io
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from cluster_agent.ca_client import CAClient, CAUnreachable
from cluster_agent.config import load_config
from cluster_agent.errors import BundleRejected
from cluster_agent.loop import AgentLoop, Backoff
from cluster_agent.output import DirectoryWriter
from cluster_agent.reconcile import Reconciler
from cluster_agent.state import DirStateStore
from meshbridge_wire.models import DesiredOut
from tests.support.caservice import CAService
from tests.support.served import report_served


def make_agent(
    cfg_path: Path, *, corefile: Path | None = None, dry_run: bool = False, stream: Any = None
) -> tuple[AgentLoop, Path]:
    cfg = load_config(cfg_path)
    out = cfg_path.parent / "out"
    state_dir = out / ".meshbridge"
    client = CAClient(cfg.ca.url, trust_pem=Path(cfg.ca.trust_anchor).read_text(), cluster=cfg.cluster)
    writer = DirectoryWriter(
        out, state_dir=state_dir, corefile=corefile, dry_run=dry_run, stream=stream or io.StringIO()
    )
    rec = Reconciler(cfg, client=client, applier=writer, state_store=DirStateStore(state_dir))
    return AgentLoop(rec, poll_wait=1), out


def load_objects(out: Path) -> dict[str, dict[str, Any]]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(out.glob("*.yaml"))}


def cacerts(out: Path) -> dict[str, str]:
    secret = yaml.safe_load((out / "secret-istio-system-cacerts.yaml").read_text())
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def step(loop: AgentLoop) -> Any:
    loop.revision = None  # no long-poll wait in tests: take the current desired state
    return loop.step()


def test_enroll_exchange_and_render(ca_service: CAService, two_clusters: dict[str, Path], tmp_path: Path) -> None:
    a, out_a = make_agent(two_clusters["a"], corefile=tmp_path / "Corefile")
    b, out_b = make_agent(two_clusters["b"], corefile=tmp_path / "Corefile")
    step(a)
    res_b = step(b)
    step(a)  # a learns b's egress identity for its AuthorizationPolicy
    assert res_b.imports_applied == 1

    # cacerts: Istio's file names, 0600, chain starts with ca-cert.pem, CRLs from root and intermediate
    secret_file = out_b / "secret-istio-system-cacerts.yaml"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    files = cacerts(out_b)
    assert set(files) == {"ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem", "ca-crl.pem"}
    assert files["cert-chain.pem"].startswith(files["ca-cert.pem"])
    assert files["ca-crl.pem"].count("BEGIN X509 CRL") == 2
    ca_cert = x509.load_pem_x509_certificate(files["ca-cert.pem"].encode())
    nc = ca_cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert nc.critical and [g.value for g in nc.value.permitted_subtrees or []] == ["b.mesh"]

    # state dir 0700, the CA service never saw the key: the key in the Secret matches the cert
    assert stat.S_IMODE((out_b / ".meshbridge").stat().st_mode) == 0o700

    objs_b = load_objects(out_b)
    se = [o for o in objs_b.values() if o["kind"] == "ServiceEntry"]
    assert len(se) == 1 and se[0]["spec"]["hosts"] == ["ratings.bookinfo.remote"]
    assert se[0]["spec"]["endpoints"][0]["address"] == "198.51.100.10"
    vip = se[0]["spec"]["addresses"][0]
    assert vip.startswith("241.0.")
    drs = [
        o for o in objs_b.values() if o["kind"] == "DestinationRule" and o["spec"]["host"] == "ratings.bookinfo.remote"
    ]
    assert drs and drs[0]["spec"]["trafficPolicy"]["tls"]["subjectAltNames"] == [
        "spiffe://a.mesh/ns/istio-system/sa/istio-ingressgateway-service-account"
    ]
    dns = objs_b["configmap-kube-system-meshbridge-coredns.yaml"]["data"]["remote.server"]
    assert vip in dns and "ratings.bookinfo.remote" in dns
    merged = objs_b["configmap-kube-system-coredns.yaml"]["data"]["Corefile"]
    assert merged.startswith((tmp_path / "Corefile").read_text().rstrip("\n")[:20])

    objs_a = load_objects(out_a)
    aps = [o for o in objs_a.values() if o["kind"] == "AuthorizationPolicy"]
    assert [ap["spec"]["action"] for ap in aps] == ["DENY"]  # deny the host to everyone but its consumers
    rule = aps[0]["spec"]["rules"][0]
    assert rule["from"][0]["source"]["notPrincipals"] == [
        "b.mesh/ns/istio-system/sa/istio-egressgateway-service-account"
    ]
    assert "ratings.bookinfo.remote" in rule["to"][0]["operation"]["hosts"]
    for o in [*objs_a.values(), *objs_b.values()]:
        if o["metadata"]["name"] != "coredns":
            assert o["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "meshbridge"

    # CA side: both enrolled, status reported
    listed = {c.name: c for c, _ in ca_service.authority.list_clusters()}
    assert listed["b"].agent_status is not None and listed["b"].agent_status["imports_applied"] == 1


def test_restart_needs_no_bootstrap_token_and_second_pass_writes_nothing(
    ca_service: CAService, two_clusters: dict[str, Path]
) -> None:
    a, _ = make_agent(two_clusters["a"])
    step(a)
    (two_clusters["a"].parent / "bootstrap-token").unlink()
    a2, _ = make_agent(two_clusters["a"])  # a restart: state from the state dir
    res = step(a2)
    assert res.report.writes == 0, res.report.summary()
    assert res.report.unchanged


def test_rest_rotate_reaches_cacerts(ca_service: CAService, two_clusters: dict[str, Path]) -> None:
    a, out = make_agent(two_clusters["a"])
    step(a)
    before = cacerts(out)["ca-cert.pem"]
    gen = ca_service.authority.rotate("a", actor="test")
    res = step(a)
    assert res.renewed
    after = cacerts(out)["ca-cert.pem"]
    assert after != before
    assert a.r.state.generation == gen
    assert not ca_service.authority.desired("a")["rotate_required"]


def test_four_root_phases(ca_service: CAService, two_clusters: dict[str, Path]) -> None:
    auth = ca_service.authority
    a, out = make_agent(two_clusters["a"])
    step(a)
    bundle_a = cacerts(out)["root-cert.pem"]
    old_root = auth.list_roots()[0]
    new_root = auth.add_root(key_type=None, actor="test")  # phase 2
    step(a)
    bundle_ab = cacerts(out)["root-cert.pem"]
    assert bundle_ab.startswith(bundle_a) and bundle_ab.count("BEGIN CERTIFICATE") == 2  # superset, byte-stable
    report_served(auth, "a", cacerts(out))  # a's istiod serves what the agent wrote: A+B
    auth.activate_root(new_root.id, actor="test")  # phase 3
    ca_service.server_cert.refresh()  # the CA's own TLS certificate moves to the new root
    res = step(a)
    assert res.renewed
    chain = cacerts(out)["cert-chain.pem"]
    assert chain.endswith(new_root.cert_pem)
    report_served(auth, "a", cacerts(out))  # and signs with the intermediate under B
    auth.retire_root(old_root.id, actor="test")  # phase 4
    step(a)
    assert cacerts(out)["root-cert.pem"] == new_root.cert_pem
    # the agent still talks to the CA: it follows the trust bundle, not the bootstrap anchor
    assert a.r.client.trust_pem == new_root.cert_pem


def test_revoked_exporter_leaves_imports(ca_service: CAService, two_clusters: dict[str, Path]) -> None:
    a, _ = make_agent(two_clusters["a"])
    b, out_b = make_agent(two_clusters["b"])
    step(a)
    step(b)
    assert any(p.name.startswith("serviceentry-") for p in out_b.glob("*.yaml"))
    serial = a.r.state.serial
    ca_service.authority.revoke_cluster("a", reason="keyCompromise", actor="test")
    res = step(b)
    assert any(p.startswith("serviceentry-") for p in res.report.pruned)
    assert not any(p.name.startswith("serviceentry-") for p in out_b.glob("*.yaml"))
    crls = cacerts(out_b)["ca-crl.pem"]
    root_crl = x509.load_pem_x509_crl(crls.split("-----END X509 CRL-----")[0].encode() + b"-----END X509 CRL-----\n")
    assert root_crl.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None


def test_unreachable_ca_keeps_everything(ca_service: CAService, two_clusters: dict[str, Path]) -> None:
    a, out = make_agent(two_clusters["a"])
    step(a)
    snapshot = {p.name: p.read_bytes() for p in out.glob("*.yaml")}
    ca_service.stop()
    with pytest.raises(CAUnreachable):
        step(a)
    assert {p.name: p.read_bytes() for p in out.glob("*.yaml")} == snapshot
    b = Backoff(base=1, cap=8)
    delays = [b.next() for _ in range(8)]
    assert all(d <= 8 for d in delays) and max(delays) > 4  # grows, capped, jittered


def test_bundle_failing_istiod_checks_is_never_written(ca_service: CAService, two_clusters: dict[str, Path]) -> None:
    a, out = make_agent(two_clusters["a"])
    step(a)
    before = (out / "secret-istio-system-cacerts.yaml").read_bytes()
    # corrupt the chain: cert-chain.pem no longer starts with ca-cert.pem
    st = a.r.state
    st.bundle["cert-chain.pem"] = st.bundle["root-cert.pem"]
    with pytest.raises(BundleRejected, match=r"cert-chain\.pem"):
        a.r.reconcile(DesiredOut.model_validate(ca_service.authority.desired("a")))
    assert (out / "secret-istio-system-cacerts.yaml").read_bytes() == before


def test_dry_run_prints_diff_and_writes_nothing(ca_service: CAService, two_clusters: dict[str, Path]) -> None:
    stream = io.StringIO()
    a, out = make_agent(two_clusters["a"], dry_run=True, stream=stream)
    step(a)
    text = stream.getvalue()
    assert "+++ b/gateway-istio-system-" in text
    assert "Secret: content changed, not shown" in text and "PRIVATE KEY" not in text
    assert not list(out.glob("*.yaml"))


def test_token_never_in_state_repr_or_logs(
    ca_service: CAService, two_clusters: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    a, _ = make_agent(two_clusters["a"])
    step(a)
    token = a.r.state.agent_token
    assert token and token not in repr(a.r.state) and token not in repr(a.r.client)
    assert a.r.state.key_pem and "PRIVATE KEY" not in repr(a.r.state)
    for rec in caplog.records:
        assert token not in rec.getMessage() and "PRIVATE KEY" not in rec.getMessage()


def test_client_refuses_a_server_outside_the_trust_anchor(ca_service: CAService, tmp_path: Path) -> None:
    import datetime as dt

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "other root")])
    now = dt.datetime.now(dt.UTC)
    other = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    client = CAClient(ca_service.url, trust_pem=other.public_bytes(serialization.Encoding.PEM).decode(), cluster="a")
    client.set_token("mbagent.0123456789abcdef.not-a-real-secret")
    with pytest.raises(CAUnreachable, match="unreachable"):
        client.desired()
