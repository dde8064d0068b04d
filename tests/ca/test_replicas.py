"""Issue 5: two `meshbridge-ca serve` processes on one PostgreSQL serve the same fleet."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster_agent import pki
from tests.support.pgserver import PgServer
from tests.support.replicas import CLI, Replica, admin_token, init_ca


@dataclass
class Pair:
    data_dir: Path
    url: str
    r1: Replica
    r2: Replica
    admin: str


@pytest.fixture
def pair(pg_server: PgServer, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Pair]:
    url = pg_server.create_database(f"replicas_{request.node.name[:40].lower().replace('[', '_').replace(']', '')}")
    d = tmp_path / "ca"
    init_ca(d, database_url=url)
    r1, r2 = Replica(d, database_url=url).start(), Replica(d, database_url=url).start()
    yield Pair(d, url, r1, r2, admin_token(d))
    r1.stop()
    r2.stop()


def enroll(p: Pair, name: str) -> tuple[pki.PrivateKey, str]:
    with p.r1.client(p.admin) as c:
        boot = c.post("/v1/clusters", json={"name": name, "trust_domain": f"{name}.mesh"}).json()["bootstrap_token"]
    key = pki.new_key()
    with p.r2.client() as c:
        r = c.post("/v1/enroll", json={"cluster": name, "bootstrap_token": boot, "csr": pki.make_csr(key, name)})
    assert r.status_code == 201, r.text
    return key, r.json()["agent_token"]


def audit_ok(p: Pair) -> None:
    r = subprocess.run(
        [*CLI, "audit", "verify", "--data-dir", str(p.data_dir), "--database-url", p.url],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_concurrent_issuance_on_two_replicas_keeps_serials_unique_and_audit_linear(pair: Pair) -> None:
    # one thread per cluster, each renewal proved by the key the one before installed (issue 10:
    # only the newest intermediate and the one before it prove), alternating between the replicas
    clusters = {f"c{n}": enroll(pair, f"c{n}") for n in range(1, 17)}

    def renewals(name: str) -> list[str]:
        key, token = clusters[name]
        certs = []
        for i in range(10):
            new = pki.new_key()
            csr = pki.make_csr(new, name)
            replica = pair.r1 if i % 2 else pair.r2
            with replica.client(token) as c:
                r = c.post(f"/v1/clusters/{name}/intermediate", json={"csr": csr, "proof": pki.prove(key, csr)})
            assert r.status_code == 201, r.status_code
            key = new
            certs.append(str(r.json()["bundle"]["ca-cert.pem"]))
        return certs

    with ThreadPoolExecutor(16) as ex:
        certs = [cert for chain in ex.map(renewals, clusters) for cert in chain]
    from cryptography import x509

    serials = [x509.load_pem_x509_certificate(c.encode()).serial_number for c in certs]
    assert len(set(serials)) == 160
    audit_ok(pair)
    with pair.r1.client(pair.admin) as c:
        items = []
        after = 0
        while True:
            batch = c.get("/v1/audit", params={"after": after, "limit": 1000}).json()["items"]
            if not batch:
                break
            items += batch
            after = batch[-1]["id"]
    assert [e["id"] for e in items] == list(range(1, len(items) + 1))
    assert sum(1 for e in items if e["action"] == "intermediate.renew") == 160


def test_hundred_concurrent_rotates_make_one_generation(pair: Pair) -> None:
    enroll(pair, "rot")

    def rotate(i: int) -> tuple[int, int]:
        replica = pair.r1 if i % 2 else pair.r2
        with replica.client(pair.admin) as c:
            r = c.post("/v1/clusters/rot/rotate", json={})
        return r.status_code, r.json().get("generation", -1)

    with ThreadPoolExecutor(20) as ex:
        results = list(ex.map(rotate, range(100)))
    assert {s for s, _ in results} == {202}
    assert {g for _, g in results} == {2}  # enrolled at 1; exactly one new generation
    with pair.r2.client(pair.admin) as c:
        cluster = c.get("/v1/clusters/rot").json()
    assert cluster["generation"] == 2 and cluster["rotation_pending"] is True
    audit_ok(pair)


def test_renewal_racing_revocation_leaves_a_consistent_state(pair: Pair) -> None:
    key, token = enroll(pair, "race")

    def renew(_: int) -> int:
        csr = pki.make_csr(pki.new_key(), "race")
        with pair.r1.client(token) as c:
            return c.post("/v1/clusters/race/intermediate", json={"csr": csr, "proof": pki.prove(key, csr)}).status_code

    def revoke() -> int:
        with pair.r2.client(pair.admin) as c:
            return c.post("/v1/clusters/race/revoke", json={"reason": "keyCompromise"}).status_code

    with ThreadPoolExecutor(8) as ex:
        renewals = [ex.submit(renew, i) for i in range(20)]
        revocation = ex.submit(revoke)
        codes = [f.result() for f in renewals]
    assert revocation.result() == 200
    assert set(codes) <= {201, 401, 403}
    with pair.r1.client(pair.admin) as c:
        cluster = c.get("/v1/clusters/race").json()
        crl_pem = c.get("/v1/crl", params={"format": "pem"}).text
    assert cluster["status"] == "revoked"
    # every certificate the cluster ever received is in the CRL: none escaped the race
    from cryptography import x509

    crl = x509.load_pem_x509_crl(crl_pem.encode())
    from sqlalchemy import create_engine, text

    engine = create_engine(pair.url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT serial, revoked_at FROM certificates WHERE cluster = 'race'")).all()
    engine.dispose()
    assert rows and all(r.revoked_at is not None for r in rows)
    assert all(crl.get_revoked_certificate_by_serial_number(int(r.serial, 16)) is not None for r in rows)
    with pair.r1.client(token) as c:  # the token is dead on every replica
        assert c.get("/v1/clusters/race/desired").status_code == 401
    with pair.r2.client(token) as c:
        assert c.get("/v1/clusters/race/desired").status_code == 401
    audit_ok(pair)
