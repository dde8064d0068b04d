"""Issue 5 failure drills, as tests: SIGKILL under load, PostgreSQL restarted under load, a
read-only and a full database, clock skew between the CA and the clusters."""

from __future__ import annotations

import datetime as dt
import subprocess
import threading
import time
from pathlib import Path

import httpx
from cryptography import x509
from sqlalchemy import create_engine, event, text

from cluster_agent import pki
from tests.support.pgserver import PgServer
from tests.support.replicas import CLI, Replica, admin_token, init_ca


class Held:
    """The key of the intermediate an agent installed last: it proves the next renewal (issue 10:
    only the newest intermediate and the one before it prove), and a renewal's answer replaces it."""

    def __init__(self, key: pki.PrivateKey) -> None:
        self.key = key


def enroll(replica: Replica, admin: str, name: str) -> tuple[Held, str]:
    with replica.client(admin) as c:
        boot = c.post("/v1/clusters", json={"name": name, "trust_domain": f"{name}.mesh"}).json()["bootstrap_token"]
        key = pki.new_key()
        r = c.post("/v1/enroll", json={"cluster": name, "bootstrap_token": boot, "csr": pki.make_csr(key, name)})
    assert r.status_code == 201, r.text
    return Held(key), r.json()["agent_token"]


def renew_once(replica: Replica, name: str, key: Held, token: str) -> tuple[int, str | None]:
    new = pki.new_key()
    csr = pki.make_csr(new, name)
    try:
        with replica.client(token, timeout=10) as c:
            r = c.post(f"/v1/clusters/{name}/intermediate", json={"csr": csr, "proof": pki.prove(key.key, csr)})
    except httpx.HTTPError:
        return 0, None
    if r.status_code != 201:
        return r.status_code, None
    key.key = new
    cert = x509.load_pem_x509_certificate(r.json()["bundle"]["ca-cert.pem"].encode())
    return 201, format(cert.serial_number, "x")


def db_serials(url: str) -> set[str]:
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT serial FROM certificates")).all()
    engine.dispose()
    return {r.serial for r in rows}


def audit_verify(data_dir: Path, url: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "audit", "verify", "--data-dir", str(data_dir), *(["--database-url", url] if url else [])],
        capture_output=True,
        text=True,
    )


def test_sigkill_during_issuance_loses_no_certificate(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    init_ca(d)
    replica = Replica(d).start()
    admin = admin_token(d)
    clusters = {n: enroll(replica, admin, n) for n in ("k1", "k2", "k3", "k4")}
    received: list[str] = []
    stop = threading.Event()

    def load(name: str) -> None:
        key, token = clusters[name]
        while not stop.is_set():
            _, serial = renew_once(replica, name, key, token)
            if serial:
                received.append(serial)

    threads = [threading.Thread(target=load, args=(n,)) for n in clusters]
    for t in threads:
        t.start()
    time.sleep(2.0)
    replica.kill()  # SIGKILL mid-load
    stop.set()
    for t in threads:
        t.join(30)
    assert len(received) > 20, "the load did not get going before the kill"
    restarted = Replica(d).start()
    try:
        stored = db_serials(f"sqlite:///{d / 'meshbridge.db'}")
        missing = set(received) - stored
        assert not missing, f"{len(missing)} certificates a client received are not in the database"
        r = audit_verify(d)
        assert r.returncode == 0, r.stdout + r.stderr
        key, token = clusters["k1"]
        assert renew_once(restarted, "k1", key, token)[0] == 201  # and it carries on
    finally:
        restarted.stop()


def test_postgres_restart_under_load_recovers_and_readyz_tells(pg_server: PgServer, tmp_path: Path) -> None:
    # a server of its own: restarting the shared one would disturb other tests
    pg = PgServer().start()
    try:
        url = pg.create_database("drill")
        d = tmp_path / "ca"
        init_ca(d, database_url=url)
        replica = Replica(d, database_url=url).start()
        admin = admin_token(d)
        key, token = enroll(replica, admin, "p1")
        statuses: list[int] = []
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                statuses.append(renew_once(replica, "p1", key, token)[0])

        t = threading.Thread(target=load)
        t.start()
        time.sleep(1.0)
        pg.stop(mode="immediate")
        with replica.client() as c:
            deadline = time.monotonic() + 15
            while c.get("/readyz").status_code != 503:
                assert time.monotonic() < deadline, "/readyz did not report the outage"
                time.sleep(0.2)
            body = c.get("/readyz")
            assert body.headers["content-type"].startswith("application/problem+json")
        pg.restart()
        with replica.client() as c:
            deadline = time.monotonic() + 30
            while c.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, "the service did not recover by itself"
                time.sleep(0.2)
        time.sleep(1.0)
        stop.set()
        t.join(30)
        assert 201 in statuses and set(statuses) <= {201, 503, 0}, sorted(set(statuses))
        assert renew_once(replica, "p1", key, token)[0] == 201
        assert audit_verify(d, url).returncode == 0
        replica.stop()
    finally:
        pg.cleanup()


def test_read_only_database_gives_503_not_corruption(pg_server: PgServer, tmp_path: Path) -> None:
    url = pg_server.create_database("readonly_drill")
    d = tmp_path / "ca"
    init_ca(d, database_url=url)
    replica = Replica(d, database_url=url).start()
    try:
        admin = admin_token(d)
        key, token = enroll(replica, admin, "ro")
        before = db_serials(url)
        pg_server.psql("ALTER DATABASE readonly_drill SET default_transaction_read_only = on")
        pg_server.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'readonly_drill'")
        codes = {renew_once(replica, "ro", key, token)[0] for _ in range(3)}
        assert codes == {503}, codes
        with replica.client(admin) as c:
            r = c.post("/v1/clusters", json={"name": "x"})
            assert r.status_code == 503 and r.json()["status"] == 503
        pg_server.psql("ALTER DATABASE readonly_drill SET default_transaction_read_only = off")
        pg_server.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'readonly_drill'")
        assert db_serials(url) == before
        deadline = time.monotonic() + 10
        while renew_once(replica, "ro", key, token)[0] != 201:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert audit_verify(d, url).returncode == 0
    finally:
        replica.stop()


def test_full_database_gives_503_and_keeps_the_chain(tmp_path: Path) -> None:
    from tests.support.caservice import CAService

    svc = CAService(tmp_path / "ca")
    engine = svc.authority.store.engine  # type: ignore[attr-defined]
    with engine.connect() as conn:
        pages = conn.exec_driver_sql("PRAGMA page_count").scalar()

    @event.listens_for(engine, "connect")
    def _cap(dbapi_conn: object, _rec: object) -> None:  # the disk is "full" a few pages from now
        cur = dbapi_conn.cursor()  # type: ignore[attr-defined]
        cur.execute(f"PRAGMA max_page_count = {int(pages) + 3}")
        cur.close()

    engine.dispose()
    svc.start()
    try:
        with httpx.Client(
            base_url=svc.url,
            verify=str(svc.write_trust_anchor()),
            headers={"Authorization": f"Bearer {svc.admin_token}"},
        ) as c:
            codes = []
            for i in range(40):
                r = c.post("/v1/clusters", json={"name": f"full{i}", "trust_domain": f"full{i}.mesh"})
                codes.append(r.status_code)
                if r.status_code == 503:
                    assert r.json()["detail"] == "the database is full"
                    break
        assert codes[-1] == 503 and set(codes[:-1]) <= {201}
        from ca_server.core.audit import verify_chain

        store = svc.authority.store
        assert verify_chain(store.iter_audit(), head=store.audit_head()).ok
    finally:
        svc.stop()


def test_clock_skew_never_gives_a_not_yet_valid_intermediate(tmp_path: Path) -> None:
    from tests.support.caservice import CAService

    svc = CAService(tmp_path / "ca")
    made = svc.authority.create_cluster(name="skew", trust_domain="skew.mesh", gateway=None, actor="t")
    key = pki.new_key()
    done = svc.authority.enroll(
        cluster_name="skew", bootstrap_token=made.bootstrap_token, csr_pem=pki.make_csr(key, "skew")
    )
    cert = x509.load_pem_x509_certificate(done.issued.bundle.ca_cert.encode())
    # a cluster whose clock runs 3 minutes behind the CA's still sees a valid intermediate
    cluster_now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=3)
    assert cert.not_valid_before_utc <= cluster_now
    svc.authority.store.dispose()  # type: ignore[attr-defined]
