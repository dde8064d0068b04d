"""The SQL store on both engines: migrations, round trips, and concurrent writers from two
"replicas" keeping serials unique and the audit chain linear."""

from __future__ import annotations

import hashlib
import itertools
import threading
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import inspect, select

from ca_server.core.audit import verify_chain
from ca_server.core.authority import Authority
from ca_server.core.errors import Unavailable
from ca_server.keys.file import FileKeyBackend
from ca_server.speedups import Speedups
from ca_server.storage import tables as t
from ca_server.storage.migrate import is_initialised, upgrade
from ca_server.storage.repository import SqlStore
from cluster_agent import pki
from tests.ca.conftest import PASSPHRASE, Harness, both_speedup_modes

pytestmark = both_speedup_modes


def test_migrations_create_the_schema_and_are_idempotent(database_url: str, speedups: Speedups) -> None:
    store = SqlStore(database_url, prepared_statements=speedups.prepared_statements)
    try:
        assert not is_initialised(store.engine)
        upgrade(store.engine)
        upgrade(store.engine)
        assert is_initialised(store.engine)
        tables = set(inspect(store.engine).get_table_names())
        assert {
            "roots",
            "clusters",
            "certificates",
            "bootstrap_tokens",
            "admin_tokens",
            "crls",
            "audit",
            "meta",
            "alembic_version",
        } <= tables
        assert store.audit_head() == (0, "0" * 64)
        with store.read() as tx:
            assert tx.get_revision() == 0
    finally:
        store.dispose()


def test_times_and_json_round_trip_exactly(harness: Harness) -> None:
    a = harness.enroll("a", trust_domain="a.mesh")
    harness.publish(
        a,
        trust_domain="a.mesh",
        services=[
            {
                "name": "x.y",
                "namespace": "y",
                "service": "x",
                "ports": [{"number": 1, "protocol": "TCP"}],
                "consumers": ["b"],
            }
        ],
    )
    with harness.store.read() as tx:
        [rec] = tx.cluster_certificates("a")
        cluster = tx.get_cluster("a")
        entries = tx.list_audit(after=0, limit=1000)
    assert cluster is not None and cluster.exports is not None
    assert cluster.exports["services"][0]["ports"] == [{"number": 1, "protocol": "TCP"}]
    assert rec.not_after == a.cert.not_valid_after_utc and rec.not_after.tzinfo is not None
    assert rec.issued_at.tzinfo == UTC
    [made] = [e for e in entries if e.action == "bootstrap_token.create"]
    with harness.store.read() as tx:
        token = tx.get_bootstrap_token(made.details["token_id"])
    assert token is not None
    assert token.used_at == rec.issued_at  # one instant, to the microsecond, on both engines
    assert all(e.at.tzinfo == UTC for e in entries)
    assert verify_chain(entries, head=harness.store.audit_head()).ok


def test_concurrent_renewals_on_two_replicas(harness: Harness, tmp_path: Path) -> None:
    # one agent per thread: an agent proves with its newest intermediate (issue 10 ended proofs by
    # any older one), so two threads of one agent would race each other out of the proof window
    names = ("a", "b", "c", "d", "e", "f")
    agents = [harness.enroll(n) for n in names]
    second = harness.replica_store()
    replicas = [harness.authority, Authority(second, FileKeyBackend(harness.data_dir, PASSPHRASE))]
    head_before = harness.store.audit_head()
    assert head_before is not None
    errors: list[BaseException] = []
    serials: list[str] = []
    lock = threading.Lock()
    rounds = 4
    start = threading.Barrier(6)

    def work(replica: Authority, agent_index: int) -> None:
        agent = agents[agent_index]
        try:
            start.wait()
            for _ in range(rounds):
                key = pki.new_key()
                csr = pki.make_csr(key, agent.name)
                issued = replica.renew(
                    cluster_name=agent.name, agent_token=agent.token, csr_pem=csr, proof_b64=pki.prove(agent.key, csr)
                )
                agent.key = key
                with lock:
                    serials.append(issued.serial)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(replicas[i % 2], i)) for i in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    second.dispose()
    assert errors == []
    assert len(serials) == 6 * rounds and len(set(serials)) == len(serials)
    with harness.store.read() as tx:
        stored = [r.serial for n in names for r in tx.cluster_certificates(n)]
        entries = tx.list_audit(after=head_before[0], limit=1000)
    assert len(stored) == len(set(stored)) == len(agents) + 6 * rounds
    renewals = [e for e in entries if e.action == "intermediate.renew"]
    assert sorted(e.details["serial"] for e in renewals) == sorted(serials)
    # linear: every new entry links to the one before it, ids without gaps
    assert [e.id for e in entries] == list(range(head_before[0] + 1, head_before[0] + 1 + len(entries)))
    assert entries[0].prev_hash == head_before[1]
    assert all(e.prev_hash == p.hash for p, e in itertools.pairwise(entries))
    report = verify_chain(harness.store.iter_audit(), head=harness.store.audit_head())
    assert report.ok, report.problem


def test_concurrent_cluster_registrations_with_one_name(harness: Harness) -> None:
    """Two replicas racing to register the same name: one wins, the other gets 409, never a 500."""
    second = harness.replica_store()
    other = Authority(second, FileKeyBackend(harness.data_dir, PASSPHRASE))
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def add(authority: Authority, name: str) -> None:
        barrier.wait()
        try:
            authority.create_cluster(name=name, trust_domain=f"{name}.mesh", gateway=None, actor="test")
            outcomes.append("ok")
        except Exception as exc:
            outcomes.append(type(exc).__name__)

    threads = [
        threading.Thread(target=add, args=(harness.authority if i % 2 else other, f"n{i // 4}")) for i in range(8)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    second.dispose()
    assert sorted(outcomes) == ["Conflict"] * 6 + ["ok"] * 2
    assert verify_chain(harness.store.iter_audit(), head=harness.store.audit_head()).ok


def test_an_unreachable_database_is_unavailable(tmp_path: Path, speedups: Speedups) -> None:
    (tmp_path / "dir.db").mkdir()
    store = SqlStore(f"sqlite:///{tmp_path / 'dir.db'}", prepared_statements=speedups.prepared_statements)
    try:
        try:
            store.ping()
        except Unavailable as exc:
            assert "database" in exc.detail
        else:
            raise AssertionError("ping succeeded on a directory")
    finally:
        store.dispose()


def test_sqlite_runs_in_wal_mode(tmp_path: Path, speedups: Speedups) -> None:
    store = SqlStore(f"sqlite:///{tmp_path / 'm.db'}", prepared_statements=speedups.prepared_statements)
    try:
        upgrade(store.engine)
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        store.dispose()


def test_tokens_are_high_entropy_and_only_their_hashes_are_stored(harness: Harness) -> None:
    made = harness.add_cluster("a")
    agent = harness.enroll("a", token=made["bootstrap_token"])
    tokens = [harness.admin_token, made["bootstrap_token"], agent.token]
    for token in tokens:
        kind, token_id, secret = token.split(".")
        assert kind in ("mbadmin", "mbboot", "mbagent") and len(token_id) == 16
        assert len(secret) >= 43  # 32 random bytes, base64url
    with harness.store.engine.connect() as conn:
        dump = "\n".join(
            str(tuple(row)) for table in reversed(t.metadata.sorted_tables) for row in conn.execute(select(table))
        )
    assert dump.count("a") > 0  # the dump holds the data
    for token in tokens:
        secret = token.rsplit(".", 1)[1]
        assert secret not in dump
        assert hashlib.sha256(secret.encode()).hexdigest() in dump  # what is kept instead


def test_a_bootstrap_token_spent_twice_at_once_enrolls_once(harness: Harness) -> None:
    token = harness.add_cluster("a")["bootstrap_token"]
    second = harness.replica_store()
    replicas = [harness.authority, Authority(second, FileKeyBackend(harness.data_dir, PASSPHRASE))]
    outcomes: list[str] = []
    barrier = threading.Barrier(6)

    def spend(authority: Authority) -> None:
        barrier.wait()
        try:
            authority.enroll(cluster_name="a", bootstrap_token=token, csr_pem=pki.make_csr(pki.new_key(), "a"))
            outcomes.append("enrolled")
        except Exception as exc:
            outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=spend, args=(replicas[i % 2],)) for i in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    second.dispose()
    assert sorted(outcomes) == ["Unauthenticated"] * 5 + ["enrolled"]
    assert harness.count(t.certificates) == 1
    assert harness.cluster("a")["generation"] == 1


def test_checkpoint_moves_committed_pages_into_the_database_file(tmp_path: Path, speedups: Speedups) -> None:
    """`serve` checkpoints the SQLite WAL off the request path; the automatic checkpoint is only a
    far-away backstop, so before checkpoint() a fresh commit lives in the WAL alone."""
    import sqlite3

    db = tmp_path / "meshbridge.db"
    store = SqlStore(f"sqlite:///{db}", prepared_statements=speedups.prepared_statements)
    upgrade(store.engine)
    store.checkpoint()
    with store.write() as tx:
        tx.append_audit(at=datetime.now(UTC), actor="test", action="probe", subject="wal", details={"n": 1})

    def audit_rows_in_main_file() -> int:
        # immutable=1: SQLite reads the main file only, ignoring the WAL
        with sqlite3.connect(f"file:{db}?mode=ro&immutable=1", uri=True) as ro:
            return int(ro.execute("SELECT count(*) FROM audit WHERE action = 'probe'").fetchone()[0])

    assert audit_rows_in_main_file() == 0
    store.checkpoint()
    assert audit_rows_in_main_file() == 1
    store.dispose()
