"""Issue 12: a real istiod in each test cluster, and the trust lifecycle judged by what it serves.

Two fresh control planes (their own kube-apiservers, not the session's), a real CA service, the
agents writing `cacerts` through the API server, and one istiod per cluster (tests/e2e/istiod.py:
pilot-discovery from the pinned Istio module, its CA directory projected from the Secret as kubelet
does). Every workload certificate below is issued by istiod itself through its CA API with a real
ServiceAccount token; the handshakes run under BoringSSL (grpcio) and OpenSSL with the trust bundle
(`istio-ca-root-cert`) and, inside a cluster, the CRLs (`istio-ca-crl`) istiod publishes.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding
from lightkube.resources.core_v1 import Secret

from ca_server.core.authority import Policy
from ca_server.core.errors import Conflict, FleetNotReady
from cluster_agent.errors import IstioPreconditionFailed
from cluster_agent.loop import AgentLoop
from meshbridge_wire.models import ServedIn
from meshbridge_wire.pem import certificate_fingerprints, load_crls
from tests.e2e import gocheck
from tests.e2e.clusters import Cluster, free_port, start_clusters, stop_clusters
from tests.e2e.istiod import Istiod
from tests.e2e.test_agents_e2e import TD, agent_config, make_loop
from tests.e2e.workload import Workload, grpc_handshake, mint, openssl_handshake
from tests.support.caservice import CAService

EGRESS_SA = "istio-egressgateway-service-account"
INGRESS_SA = "istio-ingressgateway-service-account"
# How long istiod may take to act on a cacerts change: projection poll (0.2 s), istiod's 100 ms
# debounce (istio_ca.go handleCACertsFileWatch), the bundle reload and the ConfigMap writes.
PICKUP_TIMEOUT = 20.0
# The workload certificate lifetime the CA's root phase gates wait for (istio-agent asks for 24 h;
# the bed's workloads live seconds, so the gates can be seen opening).
WORKLOAD_LIFETIME_S = 3


@dataclass
class Bed:
    ca: CAService
    clusters: dict[str, Cluster]
    loops: dict[str, AgentLoop]
    istiod: dict[str, Istiod]

    def settle(self) -> None:
        for name in ("a", "b", "a", "b"):
            loop = self.loops[name]
            loop.revision = None
            loop.step()

    def cacerts_all(self, name: str) -> dict[str, str]:
        """The `cacerts` Secret the agent wrote in cluster ``name``."""
        secret = self.istiod[name].kube().get(Secret, "cacerts", namespace="istio-system")
        return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}

    def cacerts(self, name: str, key: str) -> str:
        return self.cacerts_all(name)[key]


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    yield from istiod_bed(tmp_path_factory.mktemp("istiod-bed"), workload_lifetime_s=WORKLOAD_LIFETIME_S)


def istiod_bed(
    work: Path,
    *,
    workload_lifetime_s: int,
    edit_config: Callable[[str, str], str] = lambda _name, config: config,
    prepare: Callable[[Cluster], None] = lambda _cluster: None,
    settles_before_istiod: int = 1,
    label: str = "istiod bed (2 API servers, CA, 2 agents, 2 istiods)",
) -> Iterator[Bed]:
    """Two API servers, a CA service, an agent per cluster in run mode and, once the agents have
    written `cacerts` (``settles_before_istiod`` passes), one real istiod per cluster; everything
    stopped afterwards. ``edit_config`` rewrites a cluster's agent configuration, ``prepare`` runs
    on each cluster before the agents' first pass."""
    t0 = time.monotonic()
    clusters = {c.name: c for c in start_clusters(work / "clusters")}
    ca = CAService(work / "ca", policy=Policy(workload_cert_lifetime=timedelta(seconds=workload_lifetime_s))).start()
    istiods: dict[str, Istiod] = {}
    try:
        loops = {}
        for name, cluster in clusters.items():
            d = work / name
            d.mkdir()
            ca.add_cluster(name, TD[name], d / "bootstrap-token")
            (d / "ca-root.pem").write_text((work / "ca" / "root-cert.pem").read_text())
            (d / "agent.yaml").write_text(edit_config(name, agent_config(name, ca.url, cluster.kubeconfig)))
            loops[name] = make_loop(d / "agent.yaml")
            prepare(cluster)
        bed = Bed(ca, clusters, loops, istiods)
        for _ in range(settles_before_istiod):
            bed.settle()  # cacerts exist before istiod starts: it loads the plugged-in CA at once
        for name, cluster in clusters.items():
            istiods[name] = Istiod(cluster, TD[name], work / f"istiod-{name}").start()
            loops[name].r.istiod = istiods[name].view()
        bed.settle()  # the agents report what istiod serves
        print(f"\n{label} ready in {time.monotonic() - t0:.1f}s")
        yield bed
    finally:
        for i in istiods.values():
            i.stop()
        ca.stop()
        stop_clusters(list(clusters.values()))


# ----------------------------------------------------------------------------- helpers


def certs(pem: bytes | str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem.encode() if isinstance(pem, str) else pem)


def leaf_issuer_is(w: Workload, ca_cert_pem: str) -> bool:
    leaf = certs(w.chain_pem)[0]
    ca = x509.load_pem_x509_certificate(ca_cert_pem.encode())
    try:
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def openssl_verify(w: Workload, bundle: str, crls: str | None = None) -> tuple[bool, str]:
    """`openssl verify` of the leaf with its chain as untrusted and ``bundle`` as the roots; with
    ``crls``, checking every certificate of the chain as Envoy does (CRL_CHECK|CRL_CHECK_ALL)."""
    with tempfile.TemporaryDirectory() as d:
        dd = Path(d)
        chain = certs(w.chain_pem)
        (dd / "leaf.pem").write_bytes(chain[0].public_bytes(encoding=Encoding.PEM))
        (dd / "chain.pem").write_bytes(b"".join(c.public_bytes(encoding=Encoding.PEM) for c in chain[1:]))
        (dd / "roots.pem").write_text(bundle)
        argv = ["openssl", "verify", "-CAfile", str(dd / "roots.pem"), "-untrusted", str(dd / "chain.pem")]
        if crls is not None:
            (dd / "crls.pem").write_text(crls)
            argv += ["-crl_check_all", "-CRLfile", str(dd / "crls.pem")]
        res = subprocess.run([*argv, str(dd / "leaf.pem")], capture_output=True, text=True, check=False)
        return res.returncode == 0, (res.stdout + res.stderr).strip()


def wait_for(what: str, check: Callable[[], bool], timeout: float = PICKUP_TIMEOUT) -> float:
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: not within {timeout:.0f}s")
        time.sleep(0.2)
    return time.monotonic() - t0


def serves(bed: Bed, name: str, roots: list[str]) -> Callable[[], bool]:
    """Whether istiod in ``name`` publishes exactly ``roots`` as its trust bundle."""
    want = {c for pem in roots for c in certs(pem)}
    return lambda: set(certs(bed.istiod[name].served_bundle() or "")) == want


def signs_with(istiod: Istiod, ca_cert_pem: str) -> Callable[[], bool]:
    """Whether the next certificate ``istiod`` issues is signed by ``ca_cert_pem``."""
    return lambda: leaf_issuer_is(istiod.issue(EGRESS_SA), ca_cert_pem)


def cross_cluster(bed: Bed, client: Workload, server: Workload) -> None:
    """a's egress (client) → b's ingress (server), each side trusting its own istiod's bundle.

    OpenSSL runs the handshake between the two istiod-issued certificates, each side verifying the
    other. BoringSSL (grpcio) verifies the istiod-issued client chain — the decision b's ingress
    gateway makes — against a server certificate minted from b's cacerts with a DNS name: grpcio's
    client insists on a host name match that Istio's URI-only workload certificates cannot meet
    (Envoy matches the URI SAN instead), so that one certificate is not istiod's.
    """
    roots_a, roots_b = bed.istiod["a"].served_bundle(), bed.istiod["b"].served_bundle()
    ok, detail = openssl_handshake(server=server, client=client, server_roots=roots_b, client_roots=roots_a)
    assert ok, f"OpenSSL a-egress → b-ingress: {detail}"
    named_server = mint(bed.cacerts_all("b"), server.uri, dns="ratings.bookinfo.remote")
    ok, detail = grpc_handshake(server=named_server, client=client, server_roots=roots_b, client_roots=roots_a)
    assert ok, f"BoringSSL a-egress → b-ingress: {detail}"


def in_cluster(bed: Bed, name: str, client: Workload, server: Workload) -> None:
    """Two workloads of one cluster, the server checking the client's whole chain against the CRLs
    istiod publishes to sidecars (`istio-ca-crl`), as Envoy does with `ca-crl.pem`."""
    istiod = bed.istiod[name]
    roots, crls = istiod.served_bundle(), istiod.served_crls()
    assert "BEGIN X509 CRL" in crls, f"istiod in {name} publishes no CRL"
    ok, detail = openssl_handshake(
        server=server, client=client, server_roots=roots, client_roots=roots, server_crls=crls
    )
    assert ok, f"OpenSSL in {name} with istiod's CRLs: {detail}"


# ----------------------------------------------------------------------------- tests


def test_istiod_serves_the_shared_root_and_signs_under_the_clusters_intermediate(bed: Bed) -> None:
    for name in ("a", "b"):
        istiod = bed.istiod[name]
        served = istiod.served_bundle()
        assert certs(served) == certs(bed.cacerts(name, "root-cert.pem")), f"{name}: istiod serves another bundle"
        assert istiod.log_has("Use local CA certificate"), f"{name}: istiod did not load the plugged-in CA"
        w = istiod.issue(EGRESS_SA)
        leaf = certs(w.chain_pem)[0]
        uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier
        )
        assert uris == [f"spiffe://{TD[name]}/ns/istio-system/sa/{EGRESS_SA}"]
        assert leaf_issuer_is(w, bed.cacerts(name, "ca-cert.pem")), f"{name}: leaf not signed by the intermediate"
        ok, detail = openssl_verify(w, served)
        assert ok, detail
        ok, detail = openssl_verify(w, served, crls=istiod.served_crls())
        assert ok, f"{name}: istiod's own leaf fails the CRL check with istiod's CRLs: {detail}"


def issue_with_token(istiod: Istiod, token: str, identity: str, out: Path) -> None:
    (out / "token").write_text(token)
    (out / "roots.pem").write_text(istiod.served_bundle())
    gocheck.run_issue_workload_cert(
        address=istiod.ca_address, roots=out / "roots.pem", token=out / "token", identity=identity, out_dir=out
    )


def test_istiod_issues_only_the_identity_its_token_proves(bed: Bed, tmp_path: Path) -> None:
    """istiod's CA authenticates the caller by TokenReview and signs the caller's identity, whatever
    the CSR asks for (security/pkg/server/ca/server.go CreateCertificate: `sans := caller.Identities`);
    a token for another audience than istio-ca is refused."""
    istiod, kubectl = bed.istiod["a"], bed.clusters["a"].kubectl
    egress = f"spiffe://a.mesh/ns/istio-system/sa/{EGRESS_SA}"
    wrong_audience = kubectl("create", "token", EGRESS_SA, "-n", "istio-system").stdout.strip()
    with pytest.raises(gocheck.GoCheckFailed) as err:
        issue_with_token(istiod, wrong_audience, egress, tmp_path)
    assert "authenticate" in err.value.output
    token = kubectl("create", "token", EGRESS_SA, "-n", "istio-system", "--audience", "istio-ca").stdout.strip()
    issue_with_token(istiod, token, f"spiffe://a.mesh/ns/istio-system/sa/{INGRESS_SA}", tmp_path)
    leaf = certs((tmp_path / "cert-chain.pem").read_bytes())[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [egress]


def test_cross_cluster_and_in_cluster_mtls_with_istiod_issued_certificates(bed: Bed) -> None:
    egress_a = bed.istiod["a"].issue(EGRESS_SA)
    ingress_b = bed.istiod["b"].issue(INGRESS_SA)
    cross_cluster(bed, egress_a, ingress_b)
    ratings_a = bed.istiod["a"].issue("bookinfo-ratings", namespace="bookinfo")
    in_cluster(bed, "a", egress_a, ratings_a)


def test_rest_rotate_reaches_running_istiod_and_old_certificates_still_verify(bed: Bed) -> None:
    istiod = bed.istiod["a"]
    assert istiod.proc is not None
    pid = istiod.proc.pid
    before = istiod.issue(EGRESS_SA)
    old_ca = bed.cacerts("a", "ca-cert.pem")
    bed.ca.authority.rotate("a", actor="e2e")
    bed.settle()
    new_ca = bed.cacerts("a", "ca-cert.pem")
    assert new_ca != old_ca
    took = wait_for("istiod in a signing with the new intermediate", signs_with(istiod, new_ca))
    print(f"\nrotate → agent pass → istiod signs under the new intermediate: {took:.1f}s after the pass")
    assert istiod.proc is not None and istiod.proc.pid == pid, "istiod was restarted"
    after = istiod.issue(EGRESS_SA)
    # A workload still holding its certificate from the previous intermediate keeps talking to one
    # with the new, inside the cluster with the CRL check sidecars make, and across clusters.
    in_cluster(bed, "a", before, after)
    in_cluster(bed, "a", after, before)
    cross_cluster(bed, before, bed.istiod["b"].issue(INGRESS_SA))


def test_the_agents_own_renewal_reaches_running_istiod(bed: Bed) -> None:
    """Not a REST rotate: the agent renews because its intermediate reached `ca.renew_fraction` of its
    life (made tiny here, for one pass), and the running istiod signs with the new one."""
    loop, istiod = bed.loops["b"], bed.istiod["b"]
    assert istiod.proc is not None
    pid, generation, before = istiod.proc.pid, loop.r.state.generation, loop.r.state.serial
    normal = loop.r.config
    due = normal.model_copy(update={"ca": normal.ca.model_copy(update={"renew_fraction": 1e-9})})
    loop.r.config = loop.r.intermediate.config = due
    try:
        loop.revision = None
        result = loop.step()
    finally:
        loop.r.config = loop.r.intermediate.config = normal
    assert result is not None and result.renewed
    assert loop.r.state.serial != before and loop.r.state.generation == generation
    wait_for("istiod in b signing with the renewed intermediate", signs_with(istiod, bed.cacerts("b", "ca-cert.pem")))
    assert istiod.proc is not None and istiod.proc.pid == pid, "istiod was restarted"


def test_four_root_phases_with_istiod_issued_certificates(bed: Bed) -> None:
    auth = bed.ca.authority
    old = next(r for r in auth.list_roots() if r.status.value == "active")
    issued: list[tuple[str, Workload, Workload]] = [
        ("phase 1", bed.istiod["a"].issue(EGRESS_SA), bed.istiod["b"].issue(INGRESS_SA))
    ]

    def all_pairs_pass(phase: str) -> None:
        for when, client, server in issued:
            try:
                cross_cluster(bed, client, server)
            except AssertionError as exc:
                raise AssertionError(f"{phase}: certificates issued in {when}: {exc}") from None

    new = auth.add_root(key_type=None, actor="e2e")  # phase 2: bundle A+B
    bed.settle()
    for name in ("a", "b"):
        wait_for(f"istiod in {name} serving A+B", serves(bed, name, [old.cert_pem, new.cert_pem]))
    issued.append(("phase 2", bed.istiod["a"].issue(EGRESS_SA), bed.istiod["b"].issue(INGRESS_SA)))
    all_pairs_pass("phase 2")

    # phase 3: intermediates re-issued under B, once every istiod has served A+B for a workload lifetime
    refused = when_gate_opens(lambda: auth.activate_root(new.id, actor="e2e"), between=bed.settle)
    assert refused > 0, "activation went through before the istiods had served the new root for a lifetime"
    bed.ca.server_cert.refresh()
    bed.settle()
    for name in ("a", "b"):
        ca_b = bed.cacerts(name, "ca-cert.pem")
        wait_for(f"istiod in {name} signing under root B", signs_with(bed.istiod[name], ca_b))
    issued.append(("phase 3", bed.istiod["a"].issue(EGRESS_SA), bed.istiod["b"].issue(INGRESS_SA)))
    all_pairs_pass("phase 3")

    # phase 4: bundle B, once every istiod has signed under B for a workload lifetime
    refused = when_gate_opens(lambda: auth.retire_root(old.id, actor="e2e"), between=bed.settle)
    assert refused > 0, "retirement went through before the istiods had signed under B for a lifetime"
    bed.settle()
    for name in ("a", "b"):
        wait_for(f"istiod in {name} serving B alone", serves(bed, name, [new.cert_pem]))
    # Certificates under A are dead once A left the bundles (why phase 4 waits a workload lifetime);
    # those issued in phase 3 and after keep working.
    issued = [i for i in issued if i[0] in ("phase 3",)]
    issued.append(("phase 4", bed.istiod["a"].issue(EGRESS_SA), bed.istiod["b"].issue(INGRESS_SA)))
    all_pairs_pass("phase 4")


def when_gate_opens(
    action: Callable[[], object],
    *,
    between: Callable[[], None] = lambda: None,
    refused_by: type[Conflict] = FleetNotReady,
    pause: float = 0.5,
    timeout: float = 60.0,
) -> int:
    """Run a gated root phase as an operator would: retry while the CA refuses it with ``refused_by``
    (409), calling ``between`` after each pause (the agents' passes, when the test drives them);
    returns how often it was refused."""
    refused, deadline = 0, time.monotonic() + timeout
    while True:
        try:
            action()
            return refused
        except refused_by as exc:
            refused += 1
            assert time.monotonic() < deadline, f"the gate stayed shut: {exc}"
            time.sleep(pause)
            between()


def reported(bed: Bed, name: str) -> ServedIn:
    """What cluster ``name``'s agent last reported to the CA about its istiod."""
    cluster, _ = bed.ca.authority.get_cluster(name)
    assert cluster.agent_status is not None and cluster.agent_status.get("served"), f"{name} reported nothing"
    return ServedIn.model_validate(cluster.agent_status["served"])


def test_agent_reports_what_istiod_serves(bed: Bed) -> None:
    bed.settle()  # a pass after istiod caught up with the last change (the report is of that pass)
    for name in ("a", "b"):
        served = reported(bed, name)
        assert served.problems == [], served.problems
        assert served.bundle == certificate_fingerprints(bed.istiod[name].served_bundle())
        assert served.bundle == certificate_fingerprints(bed.cacerts(name, "root-cert.pem"))
        assert served.signing_serial == bed.loops[name].r.state.serial
        issuers = {c.issuer for c in served.crls}
        intermediate = x509.load_pem_x509_certificate(bed.cacerts(name, "ca-cert.pem").encode())
        assert intermediate.subject.rfc4514_string() in issuers, f"{name}: istiod does not publish its CRL"


def test_agent_sees_istiod_move_to_a_new_intermediate(bed: Bed) -> None:
    before = reported(bed, "b")
    bed.ca.authority.rotate("b", actor="e2e")
    loop = bed.loops["b"]
    loop.revision = None
    loop.step()  # renews and writes cacerts; istiod follows within a second
    new_serial = loop.r.state.serial
    assert new_serial != before.signing_serial

    def caught_up() -> bool:
        loop.step()  # a quiet pass: the CA answers at once while istiod lags (CONVERGE_WAIT_S)
        return reported(bed, "b").signing_serial == new_serial

    took = wait_for("b's agent reporting istiod on the new intermediate", caught_up)
    after = reported(bed, "b")
    assert after.signing_since is not None and before.signing_since is not None
    assert after.signing_since >= before.signing_since
    assert after.bundle_since == before.bundle_since, "the bundle did not change; its first-seen time must not"
    print(f"\nb: istiod's new intermediate reported {took:.1f}s after the agent's pass")


def test_agent_reports_an_unreachable_istiod(bed: Bed) -> None:
    view = bed.istiod["a"].view()
    view.address = ("127.0.0.1", free_port())
    served = bed.loops["a"].r.served_tracker.observe(view.read(), {}, bed.loops["a"].r.clock())
    assert served.signing_serial is None
    assert any("did not present its certificate" in p for p in served.problems)


# ----------------------------------------------------------------------------- failure modes


def leaf_uri(w: Workload) -> str:
    san = certs(w.chain_pem)[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    (uri,) = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uri


def names_workloads(istiod: Istiod, trust_domain: str) -> Callable[[], bool]:
    return lambda: leaf_uri(istiod.issue(EGRESS_SA)).startswith(f"spiffe://{trust_domain}/")


def test_trust_domain_mismatch_breaks_istiods_certificates_and_the_agent_refuses(bed: Bed) -> None:
    """istiod names workloads after meshConfig.trustDomain; the intermediate is name-constrained to the
    cluster's registered trust domain, so every certificate istiod then issues is refused by peers.
    The agent reads the same ConfigMap and writes nothing while they differ."""
    istiod, loop = bed.istiod["a"], bed.loops["a"]
    istiod.write_mesh_config("wrong.mesh")
    try:
        wait_for("istiod in a naming workloads wrong.mesh", names_workloads(istiod, "wrong.mesh"))
        ok, detail = openssl_verify(istiod.issue(EGRESS_SA), istiod.served_bundle())
        assert not ok and "permitted subtree" in detail, detail
        installed = bed.cacerts("a", "ca-cert.pem")
        bed.ca.authority.rotate("a", actor="e2e")  # something for the agent to write
        loop.revision = None
        with pytest.raises(IstioPreconditionFailed, match=re.escape("meshConfig.trustDomain is 'wrong.mesh'")):
            loop.step()
        assert bed.cacerts("a", "ca-cert.pem") == installed, "cacerts was written"
    finally:
        istiod.write_mesh_config()
    wait_for("istiod in a naming workloads a.mesh again", names_workloads(istiod, "a.mesh"))
    bed.settle()  # now the rotation goes through
    assert bed.cacerts("a", "ca-cert.pem") != installed
    wait_for("istiod in a signing with the rotated intermediate", signs_with(istiod, bed.cacerts("a", "ca-cert.pem")))


def test_without_multiroot_istiod_ignores_a_root_change_and_the_agent_holds_it_back(bed: Bed) -> None:
    istiod, loop = bed.istiod["b"], bed.loops["b"]
    istiod.env["ISTIO_MULTIROOT_MESH"] = "false"
    istiod.restart()
    before = bed.cacerts("b", "root-cert.pem")
    try:
        new = bed.ca.authority.add_root(key_type=None, actor="e2e")  # phase 2: the bundle changes
        loop.revision = None
        with pytest.raises(IstioPreconditionFailed, match="ISTIO_MULTIROOT_MESH"):
            loop.step()
        assert bed.cacerts("b", "root-cert.pem") == before, "cacerts was written"
        # What istiod does with such a change when it is written anyway (behind the agent's back):
        # pilot/pkg/bootstrap/istio_ca.go handleEvent drops it whole.
        patch = {"data": {"root-cert.pem": base64.b64encode((before + new.cert_pem).encode()).decode()}}
        bed.clusters["b"].kubectl(
            "patch", "secret", "cacerts", "-n", "istio-system", "--type=merge", "-p", json.dumps(patch)
        )
        wait_for("istiod in b refusing the new bundle", lambda: istiod.log_has("Multi root is disabled"))
        assert certs(istiod.served_bundle()) == certs(before), "istiod took a root change without multi-root"
    finally:
        restore = {"data": {"root-cert.pem": base64.b64encode(before.encode()).decode()}}
        bed.clusters["b"].kubectl(
            "patch", "secret", "cacerts", "-n", "istio-system", "--type=merge", "-p", json.dumps(restore)
        )
        istiod.env.pop("ISTIO_MULTIROOT_MESH")
        istiod.restart()
    bed.settle()  # with the flag back, the agent installs the new bundle and istiod serves it
    for name in ("a", "b"):
        roots = bed.ca.authority.trust_bundle_from(bed.ca.authority.list_roots())
        wait_for(f"istiod in {name} serving the new root", serves(bed, name, [roots]))


def minimal_config(name: str, td: str, url: str, kubeconfig: Path) -> str:
    return f"""cluster: {name}
ca: {{url: {url}, trust_anchor: ca-root.pem, bootstrap_token_file: bootstrap-token}}
istio:
  trust_domain: {td}
  ingress_gateway: {{address: 127.0.0.13}}
dns: {{mode: none}}
kubernetes: {{kubeconfig: {kubeconfig}}}
"""


def test_first_adoption_of_cacerts_needs_an_istiod_restart(bed: Bed, tmp_path: Path) -> None:
    """istiod started before cacerts existed runs its self-signed CA and never looks at cacerts
    (istio_ca.go createIstioCA watches the directory only in plugged-in mode): the agent says so, and
    after a restart istiod signs under the shared root."""
    (c,) = start_clusters(tmp_path / "clusters", ["c"])
    istiod = Istiod(c, "c.mesh", tmp_path / "istiod-c")
    try:
        istiod.start()
        bed.ca.add_cluster("c", "c.mesh", tmp_path / "bootstrap-token")
        (tmp_path / "ca-root.pem").write_text(bed.ca.authority.trust_bundle_from(bed.ca.authority.list_roots()))
        (tmp_path / "agent.yaml").write_text(minimal_config("c", "c.mesh", bed.ca.url, c.kubeconfig))
        loop = make_loop(tmp_path / "agent.yaml")
        loop.r.istiod = istiod.view()
        for _ in range(2):  # enroll and write cacerts; then the check sees istiod older than cacerts
            loop.revision = None
            loop.step()
        assert any("started before cacerts existed" in p for p in loop.r.istio_problems), loop.r.istio_problems
        served = loop.r.served
        assert served is not None and served.signing_serial is None
        assert "istiod signs with an intermediate this agent did not install" in served.problems
        shared = bed.ca.authority.trust_bundle_from(bed.ca.authority.list_roots())
        ok, _ = openssl_verify(istiod.issue(EGRESS_SA), shared)
        assert not ok, "a self-signed istiod's certificate verified under the shared root"

        istiod.restart()
        loop.revision = None
        loop.step()
        assert not any("started before cacerts existed" in p for p in loop.r.istio_problems), loop.r.istio_problems
        assert loop.r.served is not None and loop.r.served.signing_serial == loop.r.state.serial
        ok, detail = openssl_verify(istiod.issue(EGRESS_SA), shared)
        assert ok, detail

        # Revocation as istiod distributes it: once a's agent applied the CA's new root CRL, a's
        # istiod publishes it (`istio-ca-crl`), and a verifier checking c's whole chain with it and
        # c's own CRL (what istiod in c publishes) refuses c's workloads.
        workload_c = istiod.issue(EGRESS_SA)
        own_c = istiod.served_crls()
        ok, detail = openssl_verify(workload_c, shared, crls=bed.istiod["a"].served_crls() + own_c)
        assert ok, f"before the revocation: {detail}"
        serial = int(loop.r.state.serial, 16)
        bed.ca.authority.revoke_cluster("c", reason="keyCompromise", actor="e2e")
        loop_a = bed.loops["a"]
        loop_a.revision = None
        loop_a.step()
        wait_for("istiod in a publishing c's revocation", publishes_revoked(bed.istiod["a"], serial))
        ok, detail = openssl_verify(workload_c, shared, crls=bed.istiod["a"].served_crls() + own_c)
        assert not ok and "revoked" in detail, detail
    finally:
        istiod.stop()
        stop_clusters([c])


def publishes_revoked(istiod: Istiod, serial: int) -> Callable[[], bool]:
    """Whether a CRL ``istiod`` publishes lists ``serial``."""

    def check() -> bool:
        crls = load_crls(istiod.served_crls())
        return any(crl.get_revoked_certificate_by_serial_number(serial) is not None for crl in crls)

    return check


# ----------------------------------------------------------------------------- item 6


@dataclass
class SimWorkload:
    """A workload as istio-agent keeps it: a certificate from its istiod with the roots that came
    with it, renewed at half its life (SECRET_GRACE_PERIOD_RATIO 0.5, secretcache.go rotateTime)."""

    istiod: Istiod
    service_account: str
    ttl: int = WORKLOAD_LIFETIME_S
    cert: Workload | None = None
    roots: str = ""
    renew_at: float = 0.0

    def current(self) -> tuple[Workload, str]:
        if self.cert is None or time.monotonic() >= self.renew_at:
            self.cert, self.roots = self.istiod.issue_with_roots(self.service_account, ttl=self.ttl)
            self.renew_at = time.monotonic() + self.ttl / 2
        return self.cert, self.roots


@dataclass
class Traffic:
    """Continuous cross-cluster mTLS (OpenSSL) both ways between the clusters' gateways, each side
    trusting only the roots its own certificate came with."""

    bed: Bed
    phase: str = "start"
    results: list[tuple[str, bool, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        pairs = [
            (SimWorkload(self.bed.istiod["a"], EGRESS_SA), SimWorkload(self.bed.istiod["b"], INGRESS_SA)),
            (SimWorkload(self.bed.istiod["b"], EGRESS_SA), SimWorkload(self.bed.istiod["a"], INGRESS_SA)),
        ]
        while not self.stop.is_set():
            for client, server in pairs:
                # each renews when due first: a renewal (a token, then istiod's answer) takes long
                # under load, and one side's must not outlast the certificate the other side already
                # took (one CI run handshook with a client certificate that expired meanwhile)
                client.current()
                server.current()
                (c, c_roots), (s, s_roots) = client.current(), server.current()
                ok, detail = openssl_handshake(server=s, client=c, server_roots=s_roots, client_roots=c_roots)
                self.results.append((self.phase, ok, detail))
            time.sleep(0.05)

    def failures(self) -> list[tuple[str, bool, str]]:
        return [r for r in self.results if not r[1]]


def agents_running(bed: Bed, names: tuple[str, ...]) -> list[threading.Thread]:
    threads = []
    for name in names:
        loop = bed.loops[name]
        loop.stop.clear()
        threads.append(threading.Thread(target=loop.run, daemon=True, name=f"agent-{name}"))
        threads[-1].start()
    return threads


def stop_agents(bed: Bed, threads: list[threading.Thread]) -> None:
    for loop in bed.loops.values():
        loop.stop.set()
    for t in threads:
        t.join(30)


def gated(action: Callable[[], object]) -> int:
    """`when_gate_opens` while the agents run their own loops; a retirement refused because a cluster
    still holds an intermediate under the root (its agent has not renewed yet) is waited out too."""
    return when_gate_opens(action, refused_by=Conflict, pause=0.25, timeout=90.0)


def test_zero_failed_handshakes_through_a_gated_root_rotation(bed: Bed) -> None:
    """Item 6: workloads re-requesting short-lived certificates from their istiod and talking across
    the clusters all the time, while the root rotates 2 → 3 → 4 as fast as the gates allow."""
    auth = bed.ca.authority
    traffic = Traffic(bed)
    agents = agents_running(bed, ("a", "b"))
    driver = threading.Thread(target=traffic.run, daemon=True)
    driver.start()
    try:
        time.sleep(WORKLOAD_LIFETIME_S)
        # Earlier tests may have left a trusted root beside the active one: finish that rotation first.
        for root in [r for r in auth.list_roots() if r.status.value == "trusted"]:
            traffic.phase = f"activate {root.id} (left over)"
            gated(lambda r=root: auth.activate_root(r.id, actor="e2e"))  # type: ignore[misc]
            bed.ca.server_cert.refresh()  # as `serve` does when the active root changes
        for root in [r for r in auth.list_roots() if r.status.value == "trusted"]:
            traffic.phase = f"retire {root.id} (left over)"
            gated(lambda r=root: auth.retire_root(r.id, actor="e2e"))  # type: ignore[misc]
        old = next(r for r in auth.list_roots() if r.status.value == "active")
        traffic.phase = "2: bundle A+B"
        new = auth.add_root(key_type=None, actor="e2e")
        refused_3 = gated(lambda: auth.activate_root(new.id, actor="e2e"))
        traffic.phase = "3: intermediates under B"
        bed.ca.server_cert.refresh()
        refused_4 = gated(lambda: auth.retire_root(old.id, actor="e2e"))
        traffic.phase = "4: bundle B"
        time.sleep(2 * WORKLOAD_LIFETIME_S)
    finally:
        traffic.stop.set()
        driver.join(30)
        stop_agents(bed, agents)
    phases = {p for p, _, _ in traffic.results}
    assert {"2: bundle A+B", "3: intermediates under B", "4: bundle B"} <= phases
    assert refused_3 > 0 and refused_4 > 0, "a gate never held the rotation back"
    failed = traffic.failures()
    print(f"\nhandshakes through the rotation: {len(traffic.results)}, failed: {len(failed)}")
    assert len(traffic.results) >= 50, "too few handshakes to say anything"
    assert failed == [], f"{len(failed)} of {len(traffic.results)} handshakes failed, first: {failed[0]}"


def test_forcing_a_phase_past_a_lagging_cluster_breaks_handshakes(bed: Bed) -> None:
    """The control for the test above: with b's agent stopped, b's istiod never serves the new root,
    the activate gate refuses naming b, and forcing it anyway makes handshakes fail."""
    auth = bed.ca.authority
    traffic = Traffic(bed)
    agents = agents_running(bed, ("a",))
    driver = threading.Thread(target=traffic.run, daemon=True)
    driver.start()
    try:
        time.sleep(WORKLOAD_LIFETIME_S)
        new = auth.add_root(key_type=None, actor="e2e")
        traffic.phase = "2 without b"
        time.sleep(2 * WORKLOAD_LIFETIME_S)
        with pytest.raises(FleetNotReady) as refused:
            auth.activate_root(new.id, actor="e2e")
        assert "b" in {c for c, _ in refused.value.lagging}
        auth.activate_root(new.id, actor="e2e", force=True)
        traffic.phase = "3 forced"
        bed.ca.server_cert.refresh()
        time.sleep(3 * WORKLOAD_LIFETIME_S)
    finally:
        traffic.stop.set()
        driver.join(30)
        stop_agents(bed, agents)
    assert [r for r in traffic.results if r[0] == "2 without b" and not r[1]] == []
    forced = [r for r in traffic.results if r[0] == "3 forced"]
    assert any(not ok for _, ok, _ in forced), "forcing past a lagging cluster broke nothing: the test shows nothing"
