"""Enrollment and renewal: the intermediate profile, judged by openssl and pkilint, and the
rules around bootstrap tokens, agent tokens and proof of possession."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID
from fastapi.testclient import TestClient

from ca_server.core import issuance as issuance_module
from ca_server.core.authority import Policy
from ca_server.core.errors import Unauthenticated
from ca_server.speedups import Speedups
from ca_server.storage import tables as t
from ca_server.storage.repository import SqlTx
from cluster_agent import pki
from tests.ca.certcheck import openssl_verify, openssl_verify_certs, pkilint_crl_errors, pkilint_errors
from tests.ca.conftest import Agent, Harness, both_speedup_modes, make_harness, pem_certs

pytestmark = both_speedup_modes


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def verify_bundle(tmp: Path, bundle: dict[str, str], *, crl: bool = True) -> str:
    """openssl verify -x509_strict of ca-cert.pem against root-cert.pem, with the CRLs."""
    tmp.mkdir(parents=True, exist_ok=True)
    result = openssl_verify(
        write(tmp / "ca-cert.pem", bundle["ca-cert.pem"]),
        cafile=write(tmp / "root-cert.pem", bundle["root-cert.pem"]),
        untrusted=write(tmp / "chain.pem", bundle["cert-chain.pem"]),
        crlfile=write(tmp / "crl.pem", bundle["crl.pem"]) if crl else None,
    )
    assert result.ok, result.output
    return result.output


def workload_cert(agent: Agent, uri: str) -> x509.Certificate:
    """A workload certificate as istiod would sign it with the cluster's intermediate."""
    key = ec.generate_private_key(ec.SECP256R1())
    issuer = agent.cert
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(agent.key, hashes.SHA256())
    )


# --------------------------------------------------------------------------------- enrollment
def test_enroll_returns_istio_bundle_that_openssl_and_pkilint_accept(harness: Harness, tmp_path: Path) -> None:
    created = harness.add_cluster("a", trust_domain="a.mesh", gateway={"address": "203.0.113.10", "port": 15443})
    assert created["status"] == "pending" and created["generation"] == 0
    assert harness.cluster("a")["intermediate"] is None
    agent = harness.enroll("a", token=created["bootstrap_token"])

    assert set(agent.bundle) == {"ca-cert.pem", "cert-chain.pem", "root-cert.pem", "crl.pem"}
    assert agent.generation == 1
    chain = pem_certs(agent.bundle["cert-chain.pem"])
    root = pem_certs(agent.bundle["root-cert.pem"])
    assert agent.bundle["cert-chain.pem"].startswith(agent.bundle["ca-cert.pem"])
    assert chain[-1] == root[0] and len(chain) == 2
    assert agent.bundle["root-cert.pem"] == harness.client.get("/v1/trust-bundle").text
    verify_bundle(tmp_path, agent.bundle)
    assert pkilint_errors(agent.bundle["ca-cert.pem"], "intermediate") == []
    assert pkilint_errors(agent.bundle["root-cert.pem"], "root") == []
    assert pkilint_crl_errors(agent.bundle["crl.pem"]) == []

    shown = harness.cluster("a")
    assert shown["status"] == "active" and shown["generation"] == 1 and shown["trust_domain"] == "a.mesh"
    assert shown["intermediate"]["serial"] == agent.serial
    assert shown["intermediate"]["root_id"] == harness.roots()[0]["id"]
    assert shown["gateway"] == {"address": "203.0.113.10", "addresses": None, "port": 15443}
    # the certificate is stored
    assert harness.count(t.certificates) == 1


def test_intermediate_profile_comes_from_the_record_never_the_csr(harness: Harness) -> None:
    token = harness.add_cluster("a", trust_domain="a.mesh")["bootstrap_token"]
    key = ec.generate_private_key(ec.SECP256R1())
    greedy = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, "evil root"),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Mallory"),
                ]
            )
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=5), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://b.mesh/x")]), critical=False
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    r = harness.client.post(
        "/v1/enroll",
        json={
            "cluster": "a",
            "bootstrap_token": token,
            "csr": greedy.public_bytes(serialization.Encoding.PEM).decode(),
        },
    )
    assert r.status_code == 201, r.text
    cert = x509.load_pem_x509_certificate(r.json()["bundle"]["ca-cert.pem"].encode())
    root = x509.load_pem_x509_certificate(r.json()["bundle"]["root-cert.pem"].encode())

    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "a"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "a.mesh"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "meshbridge"
    assert cert.public_key() == key.public_key()
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and ku.value.digital_signature
    nc = cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert nc.critical
    assert nc.value.permitted_subtrees == [x509.UniformResourceIdentifier("a.mesh")]
    oids = {e.oid for e in cert.extensions}
    assert ExtensionOID.EXTENDED_KEY_USAGE not in oids
    assert ExtensionOID.SUBJECT_ALTERNATIVE_NAME not in oids
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski_root = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski_root.digest
    assert (
        cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        == x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest
    )
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    # root profile: no pathlen, no EKU
    rbc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert rbc.critical and rbc.value.ca and rbc.value.path_length is None
    assert ExtensionOID.EXTENDED_KEY_USAGE not in {e.oid for e in root.extensions}
    # validity: 90 days, notBefore a few minutes back
    now = datetime.now(UTC)
    assert timedelta(0) < now - cert.not_valid_before_utc < timedelta(minutes=15)
    assert timedelta(days=89) < cert.not_valid_after_utc - now <= timedelta(days=90)
    assert pkilint_errors(r.json()["bundle"]["ca-cert.pem"]) == []


def test_name_constraints_stop_a_cluster_minting_another_clusters_identity(harness: Harness, tmp_path: Path) -> None:
    agent = harness.enroll("a", trust_domain="a.mesh")
    roots = pem_certs(agent.bundle["root-cert.pem"])
    own = openssl_verify_certs(
        tmp_path / "own", workload_cert(agent, "spiffe://a.mesh/ns/x/sa/y"), roots=roots, intermediates=[agent.cert]
    )
    assert own.ok, own.output
    other = openssl_verify_certs(
        tmp_path / "other", workload_cert(agent, "spiffe://b.mesh/ns/x/sa/y"), roots=roots, intermediates=[agent.cert]
    )
    assert not other.ok
    assert "permitted subtree violation" in other.output


@pytest.mark.parametrize("key_type", ["ecdsa-p384", "rsa-2048", "rsa-3072"])
def test_every_allowed_csr_key_type_is_issued(harness: Harness, key_type: str, tmp_path: Path) -> None:
    agent = harness.enroll("a", key_type=key_type)
    assert agent.cert.public_key() == agent.key.public_key()
    verify_bundle(tmp_path, agent.bundle)
    assert pkilint_errors(agent.bundle["ca-cert.pem"], f"{key_type} intermediate") == []
    harness.renew(agent, key_type=key_type)  # the proof is RSA PKCS#1 v1.5 / ECDSA as the key is
    assert agent.cert.public_key() == agent.key.public_key()


def test_validity_is_capped_at_the_issuers_not_after(database_url: str, tmp_path: Path, speedups: Speedups) -> None:
    policy = Policy(root_validity=timedelta(days=30))
    for h in make_harness(database_url, tmp_path / "ca", policy=policy, speedups=speedups):
        agent = h.enroll("a")
        root = pem_certs(agent.bundle["root-cert.pem"])[0]
        assert agent.cert.not_valid_after_utc == root.not_valid_after_utc
        verify_bundle(tmp_path, agent.bundle)


def test_serials_are_random_positive_and_long(harness: Harness) -> None:
    agents = [harness.enroll(n) for n in ("a", "b", "c")]
    for a in agents[:2]:
        harness.renew(a)
        harness.renew(a)
    with harness.store.read() as tx:
        serials = [int(r.serial, 16) for n in ("a", "b", "c") for r in tx.cluster_certificates(n)]
    assert len(serials) == 7 and len(set(serials)) == 7
    assert all(s > 0 and s.bit_length() >= 120 for s in serials)
    # serials are lowercase hex without separators, in the API too
    shown = harness.cluster("a")["intermediate"]["serial"]
    assert shown == shown.lower() and all(c in "0123456789abcdef" for c in shown)


# --------------------------------------------------------------------------------- renewal
def test_renewal_with_proof_issues_a_new_intermediate_for_the_new_key(harness: Harness, tmp_path: Path) -> None:
    agent = harness.enroll("a", trust_domain="a.mesh")
    first = agent.serial
    harness.renew(agent)
    assert agent.serial != first and agent.generation == 1
    assert agent.cert.public_key() == agent.key.public_key()
    assert harness.cluster("a")["intermediate"]["serial"] == agent.serial
    verify_bundle(tmp_path, agent.bundle)
    # the agent's own renewal leaves rotate_required off and the generation unchanged
    d = harness.desired(agent)
    assert d["generation"] == 1 and d["rotate_required"] is False


def test_an_older_unexpired_intermediate_may_prove_a_retried_renewal(harness: Harness) -> None:
    agent = harness.enroll("a")
    old_key = agent.key
    harness.renew(agent)  # suppose this answer was lost: the agent still holds only old_key
    harness.renew(agent, prover=old_key)
    assert harness.count(t.certificates) == 3
    for _ in range(4):
        harness.renew(agent)
    # the process keeps parsed root certificates only, not one more intermediate per renewal
    assert len(harness.authority.rootkeys.certs) <= len(harness.authority.list_roots())


def test_a_stolen_agent_token_alone_cannot_mint_an_intermediate(harness: Harness) -> None:
    agent = harness.enroll("a")
    before = harness.state()
    thief_key = pki.new_key()
    r, _ = harness.renew_response(agent, prover=thief_key)
    assert r.status_code == 403
    assert r.headers["content-type"] == "application/problem+json"
    assert "proof" in r.json()["title"].lower()
    csr = pki.make_csr(pki.new_key(), "a")
    r = harness.client.post("/v1/clusters/a/intermediate", json={"csr": csr}, headers=agent.headers)
    assert r.status_code == 403
    # a proof made by the right key but over another CSR
    other = pki.make_csr(pki.new_key(), "a")
    r = harness.client.post(
        "/v1/clusters/a/intermediate", json={"csr": csr, "proof": pki.prove(agent.key, other)}, headers=agent.headers
    )
    assert r.status_code == 403
    assert harness.state() == before


def test_proof_by_a_revoked_intermediate_is_refused(harness: Harness) -> None:
    agent = harness.enroll("a")
    old_key, old_serial = agent.key, agent.serial
    harness.renew(agent)
    r = harness.client.post(
        f"/v1/certificates/{old_serial}/revoke", json={"reason": "keyCompromise"}, headers=harness.admin
    )
    assert r.status_code == 200
    r, _ = harness.renew_response(agent, prover=old_key)
    assert r.status_code == 403
    harness.renew(agent)  # the current one still proves


def test_proof_by_an_expired_intermediate_is_refused(harness: Harness) -> None:
    agent = harness.enroll("a")
    harness.clock.advance(days=91)
    r, _ = harness.renew_response(agent)
    assert r.status_code == 403
    # the way back is a new bootstrap token
    again = harness.enroll("a", register=False)
    assert again.generation == 2


def test_reenrollment_replaces_the_agent_token_and_raises_the_generation(harness: Harness) -> None:
    first = harness.enroll("a")
    second = harness.enroll("a", register=False)
    assert second.generation == 2
    assert harness.client.get("/v1/clusters/a/desired", headers=first.headers).status_code == 401
    assert harness.client.get("/v1/clusters/a/desired", headers=second.headers).status_code == 200
    # issue 10: re-enrollment is a compromise response, the older intermediate proves nothing now
    r, _ = harness.renew_response(second, prover=first.key)
    assert r.status_code == 403
    harness.renew(second)


def test_bootstrap_token_expires_after_an_hour(harness: Harness) -> None:
    made = harness.add_cluster("a")
    expires = datetime.strptime(made["bootstrap_expires_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert timedelta(minutes=59) < expires - datetime.now(UTC) <= timedelta(hours=1)
    late = harness.add_cluster("b")
    harness.clock.advance(minutes=59)
    harness.enroll("a", token=made["bootstrap_token"])
    harness.clock.advance(minutes=2)
    before = harness.state()
    key = pki.new_key()
    r = harness.client.post(
        "/v1/enroll", json={"cluster": "b", "bootstrap_token": late["bootstrap_token"], "csr": pki.make_csr(key, "b")}
    )
    assert r.status_code == 401
    assert "expired" in r.json()["detail"]
    assert harness.state() == before
    harness.enroll("b", register=False)  # a fresh token from the operator works


def test_agent_token_reaches_only_its_own_cluster(harness: Harness) -> None:
    a = harness.enroll("a", trust_domain="a.mesh")
    b = harness.enroll("b", trust_domain="b.mesh")
    before = harness.state()
    for method, path, body in [
        ("GET", "/v1/clusters/b/desired", None),
        ("GET", "/v1/clusters/b/imports", None),
        ("PUT", "/v1/clusters/b/status", {"installed_generation": 1}),
        (
            "PUT",
            "/v1/clusters/b/exports",
            {
                "gateway": {"address": "198.51.100.1", "port": 15443},
                "identities": {"ingress": "spiffe://b.mesh/ns/i/sa/i", "egress": "spiffe://b.mesh/ns/i/sa/e"},
            },
        ),
        ("POST", "/v1/clusters/b/intermediate", {"csr": pki.make_csr(pki.new_key(), "b"), "proof": ""}),
    ]:
        r = harness.client.request(method, path, json=body, headers=a.headers)
        assert r.status_code == 403, (path, r.text)
        assert r.headers["content-type"] == "application/problem+json"
    # an agent token is no admin token, nor the reverse
    assert harness.client.get("/v1/clusters", headers=a.headers).status_code == 401
    assert harness.client.get("/v1/clusters/a/desired", headers=harness.admin).status_code == 401
    assert harness.state() == before
    assert harness.desired(b)["generation"] == 1


def test_what_was_signed_is_verified_before_it_is_returned(harness: Harness) -> None:
    """A signing key that does not match the root's certificate (a swapped HSM object, a damaged
    file) must not hand out an intermediate: nothing stored, the bootstrap token still unused."""
    from ca_server.core.keytypes import LocalKeySigner

    token = harness.add_cluster("a")["bootstrap_token"]
    [root] = harness.authority.list_roots()
    good = harness.authority.rootkeys.signers[root.id]
    harness.authority.rootkeys.signers[root.id] = LocalKeySigner(ec.generate_private_key(ec.SECP256R1()))
    before = harness.state()
    client = TestClient(harness.client.app, raise_server_exceptions=False)
    r = client.post(
        "/v1/enroll", json={"cluster": "a", "bootstrap_token": token, "csr": pki.make_csr(pki.new_key(), "a")}
    )
    assert r.status_code == 500 and r.headers["content-type"] == "application/problem+json"
    assert "BEGIN CERTIFICATE" not in r.text
    assert harness.state() == before
    harness.authority.rootkeys.signers[root.id] = good
    harness.enroll("a", token=token)


def test_renewals_ending_a_fleet_rotation_read_the_roots_once(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every renewal that ends a rotation moves the fleet revision, and the roots, CRLs and server
    names a renewal needs are cached per revision: each renewal of a fleet-wide rotation found the
    cache stale and read them all again. It changed none of them, so the cache moves with it."""
    agents = [harness.enroll(f"c{i}") for i in range(5)]
    for a in agents:
        harness.rotate(a.name)
    harness.renew(agents[0])  # reads them for the revision after the rotations
    reads: list[str] = []
    list_server_names = SqlTx.list_server_names  # read by renewals only, not by fleet snapshots

    def counted(tx: SqlTx) -> list[str]:
        reads.append("server names")
        return list_server_names(tx)

    monkeypatch.setattr(SqlTx, "list_server_names", counted)
    for a in agents[1:]:
        harness.renew(a)
    assert reads == []
    assert not any(c.rotation_pending for c, _ in harness.authority.list_clusters())


def test_a_renewal_takes_the_token_from_the_fleet_snapshot_not_a_store_read(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that has not seen the token yet (restarted, or another replica enrolled it) checks
    it against the watcher's snapshot before drafting, instead of reading the store; without a
    snapshot (the CLI, direct calls) it reads the store."""
    a = harness.enroll("a")
    issuance = harness.authority.issuance
    reads: list[str] = []
    read = issuance._authenticate_agent

    def counted(tok: Any, name: str) -> Any:
        reads.append(name)
        return read(tok, name)

    monkeypatch.setattr(issuance, "_authenticate_agent", counted)
    harness.desired(a)  # the watcher's snapshot holds the cluster's row, as during a long-poll
    issuance._known_agents.clear()
    a = harness.renew(a)
    assert reads == []
    issuance._known_agents.clear()
    csr = pki.make_csr(pki.new_key(), "a")
    harness.authority.renew(cluster_name="a", agent_token=a.token, csr_pem=csr, proof_b64=pki.prove(a.key, csr))
    assert reads == ["a"]


def test_a_process_new_to_a_cluster_takes_its_proof_floor_from_the_fleet_snapshot(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that has not seen the cluster's newest intermediate (restarted, another replica
    renewed it: in a fleet event, every renewal of a fresh replica) reads its proof candidates;
    the cluster's proof floor comes from the snapshot row that admitted the token, not from a
    second read (fails before: the cluster read again). The write transaction still confirms the
    prover on the row it locks."""
    a = harness.enroll("a")
    issuance = harness.authority.issuance
    seen = harness.authority.snapshot()
    clusters_read: list[str] = []
    get_cluster = SqlTx.get_cluster

    def counted(tx: Any, name: str, *args: Any, **kwargs: Any) -> Any:
        clusters_read.append(name)
        return get_cluster(tx, name, *args, **kwargs)

    monkeypatch.setattr(SqlTx, "get_cluster", counted)
    issuance._newest.clear()  # the newest intermediate of the cluster: unknown here
    csr = pki.make_csr(pki.new_key(), "a")
    draft = harness.authority.draft_renewal(
        cluster_name="a", agent_token=a.token, csr_pem=csr, proof_b64=pki.prove(a.key, csr), seen=seen
    )
    assert clusters_read == []
    issued = harness.authority.finish_renewal(draft, harness.authority.submit_renewal(draft).result(30))
    assert issued.cluster == "a"


def candidate_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The clusters whose proof candidates the store is asked for from now on, in order."""
    read: list[str] = []
    proof_candidates = SqlTx.proof_candidates

    def counted(tx: Any, name: str, **kwargs: Any) -> Any:
        read.append(name)
        return proof_candidates(tx, name, **kwargs)

    monkeypatch.setattr(SqlTx, "proof_candidates", counted)
    return read


def test_a_process_that_learnt_the_newest_keys_at_start_reads_no_proof_candidates(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``serve`` learns every cluster's newest intermediate key once at start
    (``warm_proof_keys``): a renewal proved with it then reads no candidates and parses no
    certificate (a fresh replica's root rotation read and parsed one per cluster). A revoked
    cluster's key is not learnt, nor is what the process knows already overwritten."""
    a, b = harness.enroll("a"), harness.enroll("b")
    b = harness.renew(b)
    harness.enroll("c")
    harness.enroll("d")
    harness.authority.revoke_cluster("c", reason="keyCompromise", actor="test")
    issuance = harness.authority.issuance
    issuance._newest.clear()  # a fresh process: nothing learnt yet
    issuance._keys.clear()
    issuance._newest["d"] = "learnt-meanwhile"
    assert harness.authority.warm_proof_keys() == 2
    assert sorted(issuance._newest) == ["a", "b", "d"] and issuance._newest["d"] == "learnt-meanwhile"
    assert issuance._newest["b"] == b.serial
    candidates_read = candidate_reads(monkeypatch)
    seen = harness.authority.snapshot()
    for agent in (a, b):
        csr = pki.make_csr(pki.new_key(), agent.name)
        draft = harness.authority.draft_renewal(
            cluster_name=agent.name,
            agent_token=agent.token,
            csr_pem=csr,
            proof_b64=pki.prove(agent.key, csr),
            seen=seen,
        )
        assert candidates_read == []  # before: the draft read them
        issued = harness.authority.finish_renewal(draft, harness.authority.submit_renewal(draft).result(30))
        assert issued.cluster == agent.name
        candidates_read.clear()  # the write transaction confirms the prover on what it reads


def test_renewing_more_clusters_than_the_caches_hold_keeps_the_newest_keys(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process keeps each cluster's newest key, dropping the one a renewal supersedes, and a
    full cache loses its oldest entries, not all (``issuance._put``). Each cache used to be cleared
    whole once any held ``_KEY_CACHE`` entries, so the renewals after that read and parsed their
    candidates again: at 10,000 clusters near the end of a root rotation (fails before: the last
    round reads candidates)."""
    monkeypatch.setattr(issuance_module, "_KEY_CACHE", 8)
    agents = [harness.enroll(f"k{i}") for i in range(6)]
    for _ in range(2):
        agents = [harness.renew(a) for a in agents]  # 18 issued in all, two and a half times the bound
    issuance = harness.authority.issuance
    assert len(issuance._keys) == 6 and len(issuance._certified) <= 8
    candidates_read = candidate_reads(monkeypatch)
    for agent in agents:
        csr = pki.make_csr(pki.new_key(), agent.name)
        harness.authority.draft_renewal(
            cluster_name=agent.name, agent_token=agent.token, csr_pem=csr, proof_b64=pki.prove(agent.key, csr)
        )
    assert candidates_read == []
    for i in range(20):
        issuance_module._put(issuance._certified, f"fingerprint-{i}", None)
    assert 6 <= len(issuance._certified) <= 8 and "fingerprint-19" in issuance._certified


def test_a_token_revoked_since_the_snapshot_is_refused_by_the_renewals_transaction(harness: Harness) -> None:
    a = harness.enroll("a")
    stale = harness.authority.snapshot()  # admits a's token
    harness.authority.revoke_cluster("a", reason="keyCompromise", actor="test")
    harness.authority.issuance._known_agents.clear()
    csr = pki.make_csr(pki.new_key(), "a")
    with harness.store.read() as tx:
        before = len(tx.cluster_certificates("a"))
    with pytest.raises(Unauthenticated):
        harness.authority.renew(
            cluster_name="a", agent_token=a.token, csr_pem=csr, proof_b64=pki.prove(a.key, csr), seen=stale
        )
    with harness.store.read() as tx:
        assert len(tx.cluster_certificates("a")) == before
