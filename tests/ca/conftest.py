"""The in-process CA harness: the real core over the real store (SQLite file or PostgreSQL
database), an encrypted-file key backend, a clock the test can move, and the FastAPI app under
starlette's TestClient (used as a context manager, so the lifespan and the revision watcher run).
The app and store are built with every speed-up on (``ca_server.speedups``) unless a test or module
is marked ``both_speedup_modes``: then it runs once with them on and once with all of them off.

Agents are played with ``cluster_agent.pki`` (new_key, make_csr, prove), as the real agent does.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from ca_server.app import create_app
from ca_server.core.audit import verify_chain
from ca_server.core.authority import Authority, Policy
from ca_server.keys.base import KeyType
from ca_server.keys.file import FileKeyBackend
from ca_server.speedups import ALL_OFF, ALL_ON, Speedups
from ca_server.storage import tables as t
from ca_server.storage.migrate import upgrade
from ca_server.storage.repository import SqlStore
from cluster_agent import pki
from tests.support.pgserver import PgServer
from tests.support.served import served

PASSPHRASE = b"correct horse battery staple 0451"

# run a test (or, as ``pytestmark``, a module) with the speed-ups on, then with all of them off
both_speedup_modes = pytest.mark.parametrize(
    "speedups", [pytest.param(ALL_ON, id="speedups-on"), pytest.param(ALL_OFF, id="speedups-off")], indirect=True
)


@pytest.fixture
def speedups(request: pytest.FixtureRequest) -> Speedups:
    """The speed-ups the app and the store are built with: all on unless ``both_speedup_modes``."""
    return getattr(request, "param", ALL_ON)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """The session server of tests/conftest.py, stopped in ``immediate`` mode: its data is thrown
    away next, and a fast shutdown's checkpoint of a hundred test databases takes seconds."""
    server = PgServer().start()
    yield server
    server.stop(mode="immediate")
    server.cleanup()


class Clock:
    """Wall time plus an offset the test moves forward (certificates stay checkable by openssl
    at the real time unless a test moves far)."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, **kw: float) -> None:
        self.offset += timedelta(**kw)


@dataclass
class Agent:
    """One cluster's agent as the tests play it: its current intermediate key and agent token."""

    name: str
    key: pki.PrivateKey
    token: str
    generation: int
    bundle: dict[str, str]
    keys: list[pki.PrivateKey] = field(default_factory=list)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.bundle["ca-cert.pem"].encode())

    @property
    def serial(self) -> str:
        return format(self.cert.serial_number, "x")


@dataclass
class Harness:
    authority: Authority
    store: SqlStore
    client: TestClient
    admin_token: str
    clock: Clock
    data_dir: Path
    database_url: str
    speedups: Speedups = ALL_ON

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    @property
    def postgres(self) -> bool:
        return self.store.postgres

    def replica_store(self) -> SqlStore:
        """Another replica's store on the same database, with the same speed-ups (dispose it)."""
        return SqlStore(self.database_url, prepared_statements=self.speedups.prepared_statements)

    # ---------------------------------------------------------------- operator
    def add_cluster(
        self, name: str, *, trust_domain: str | None = None, gateway: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        # each cluster its own trust domain unless a test names one (a shared one is refused)
        body: dict[str, Any] = {"name": name, "trust_domain": trust_domain or f"{name}.test"}
        if gateway is not None:
            body["gateway"] = gateway
        r = self.client.post("/v1/clusters", json=body, headers=self.admin)
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]

    def bootstrap_token(self, name: str) -> str:
        r = self.client.post(f"/v1/clusters/{name}/bootstrap-token", headers=self.admin)
        assert r.status_code == 201, r.text
        return r.json()["bootstrap_token"]  # type: ignore[no-any-return]

    def cluster(self, name: str) -> dict[str, Any]:
        r = self.client.get(f"/v1/clusters/{name}", headers=self.admin)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def rotate(self, name: str) -> int:
        r = self.client.post(f"/v1/clusters/{name}/rotate", json={}, headers=self.admin)
        assert r.status_code == 202, r.text
        return r.json()["generation"]  # type: ignore[no-any-return]

    def roots(self) -> list[dict[str, Any]]:
        r = self.client.get("/v1/roots", headers=self.admin)
        assert r.status_code == 200, r.text
        return r.json()["items"]  # type: ignore[no-any-return]

    # ---------------------------------------------------------------- agent
    def enroll(
        self,
        name: str,
        *,
        trust_domain: str | None = None,
        key_type: str = "ecdsa-p256",
        token: str | None = None,
        register: bool = True,
    ) -> Agent:
        """Register (unless ``register`` is False or a token is given) and enroll ``name``."""
        if token is None:
            token = (
                self.add_cluster(name, trust_domain=trust_domain)["bootstrap_token"]
                if register
                else self.bootstrap_token(name)
            )
        key = pki.new_key(key_type)
        r = self.client.post(
            "/v1/enroll", json={"cluster": name, "bootstrap_token": token, "csr": pki.make_csr(key, name)}
        )
        assert r.status_code == 201, r.text
        body = r.json()
        return Agent(name, key, body["agent_token"], body["generation"], body["bundle"], [key])

    def renew_response(
        self, agent: Agent, *, key_type: str = "ecdsa-p256", prover: pki.PrivateKey | None = None
    ) -> tuple[Any, pki.PrivateKey]:
        new = pki.new_key(key_type)
        csr = pki.make_csr(new, agent.name)
        proof = pki.prove(prover or agent.key, csr)
        r = self.client.post(
            f"/v1/clusters/{agent.name}/intermediate", json={"csr": csr, "proof": proof}, headers=agent.headers
        )
        return r, new

    def renew(self, agent: Agent, *, key_type: str = "ecdsa-p256", prover: pki.PrivateKey | None = None) -> Agent:
        r, new = self.renew_response(agent, key_type=key_type, prover=prover)
        assert r.status_code == 201, r.text
        body = r.json()
        agent.key, agent.generation, agent.bundle = new, body["generation"], body["bundle"]
        agent.keys.append(new)
        return agent

    def report_served(
        self,
        agent: Agent,
        *,
        bundle: str | None = None,
        since: datetime | None = None,
        observed_at: datetime | None = None,
        signing_serial: str | None = None,
        signing: bool = True,
    ) -> Any:
        """``agent`` reports that its istiod serves ``bundle`` (default: the trust bundle its desired
        state carries, which the agent installs) and signs with its current intermediate (or
        ``signing_serial``; none when not ``signing``) since ``since`` (default: now on the CA's
        clock), observed at ``observed_at`` (default: now). Returns the response."""
        now = self.clock()
        body = {
            "installed_generation": agent.generation,
            "installed_serial": agent.serial,
            "served": served(
                bundle=bundle if bundle is not None else self.desired(agent)["trust_bundle"],
                ca_cert=agent.bundle["ca-cert.pem"] if signing else None,
                since=since or now,
                observed_at=observed_at or now,
                signing_serial=signing_serial,
            ),
        }
        r = self.client.put(f"/v1/clusters/{agent.name}/status", json=body, headers=agent.headers)
        assert r.status_code == 200, r.text
        return r

    def desired(self, agent: Agent, **params: Any) -> dict[str, Any]:
        r = self.client.get(f"/v1/clusters/{agent.name}/desired", params=params, headers=agent.headers)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def publish(
        self,
        agent: Agent,
        *,
        trust_domain: str,
        services: list[dict[str, Any]] | None = None,
        address: str = "198.51.100.1",
        tcp_port: int | None = None,
        addresses: list[str] | None = None,
    ) -> Any:
        gateway: dict[str, Any] = {"address": address, "port": 15443}
        if addresses is not None:
            gateway["addresses"] = addresses
        if tcp_port is not None:
            gateway["tcp_port"] = tcp_port
        body = {
            "gateway": gateway,
            "identities": {
                "ingress": f"spiffe://{trust_domain}/ns/istio-system/sa/ingress",
                "egress": f"spiffe://{trust_domain}/ns/istio-system/sa/egress",
            },
            "services": services or [],
        }
        return self.client.put(f"/v1/clusters/{agent.name}/exports", json=body, headers=agent.headers)

    # ---------------------------------------------------------------- state, for "nothing changed"
    def audit_head(self) -> tuple[int, str] | None:
        return self.store.audit_head()

    def count(self, table: Any) -> int:
        with self.store.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(table)).scalar_one())

    def state(self) -> tuple[Any, ...]:
        """A fingerprint of everything a refused request must leave alone."""
        with self.store.engine.connect() as conn:
            clusters = sorted(
                tuple(sorted((k, str(v)) for k, v in r._mapping.items())) for r in conn.execute(select(t.clusters))
            )
            tokens = sorted((r.token_id, str(r.used_at)) for r in conn.execute(select(t.bootstrap_tokens)))
            revision = conn.execute(select(t.meta.c.int_value).where(t.meta.c.key == "revision")).scalar_one()
        return (
            self.audit_head(),
            self.count(t.certificates),
            self.count(t.roots),
            self.count(t.crls),
            clusters,
            tokens,
            revision,
        )

    def chain_ok(self) -> bool:
        return verify_chain(self.store.iter_audit(), head=self.store.audit_head()).ok


def make_harness(
    database_url: str,
    data_dir: Path,
    *,
    policy: Policy | None = None,
    key_type: KeyType = KeyType.ECDSA_P256,
    watch_interval: float = 0.05,
    speedups: Speedups = ALL_ON,
) -> Iterator[Harness]:
    store = SqlStore(database_url, prepared_statements=speedups.prepared_statements)
    upgrade(store.engine)
    clock = Clock()
    authority = Authority(store, FileKeyBackend(data_dir, PASSPHRASE), policy=policy, clock=clock)
    _, admin = authority.init_root(key_type=key_type)
    app = create_app(authority, watch_interval=watch_interval, agent_shortcut=speedups.agent_shortcut)
    try:
        with TestClient(app) as client:
            yield Harness(authority, store, client, admin, clock, data_dir, database_url, speedups)
    finally:
        store.dispose()


@pytest.fixture
def harness(database_url: str, tmp_path: Path, speedups: Speedups) -> Iterator[Harness]:
    yield from make_harness(database_url, tmp_path / "ca", speedups=speedups)


WORKLOAD_CERT_LIFETIME = timedelta(seconds=100)  # of the `short_lived` harness: retire waits 110 s


@pytest.fixture
def short_lived(database_url: str, tmp_path: Path, speedups: Speedups) -> Iterator[Harness]:
    """A harness whose CA takes workload certificates to live 100 s, so a test can move its clock
    past the retirement wait (110 s) while certificates stay valid at the real time."""
    policy = Policy(workload_cert_lifetime=WORKLOAD_CERT_LIFETIME)
    yield from make_harness(database_url, tmp_path / "ca", policy=policy, speedups=speedups)


def pem_certs(text: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(text.encode())


def pem_crls(text: str) -> list[x509.CertificateRevocationList]:
    end = "-----END X509 CRL-----"
    return [
        x509.load_pem_x509_crl((block + end + "\n").encode())
        for block in text.split(end)
        if "-----BEGIN X509 CRL-----" in block
    ]
