"""Issue 15 item 1: on PostgreSQL, concurrent writes (renewals) share one transaction and one commit
(``ca_server/storage/joined.py``), each in its own savepoint, and the audit chain stays one chain."""

from __future__ import annotations

import itertools
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography import x509
from sqlalchemy import event, text

from ca_server.core.audit import verify_chain
from ca_server.core.authority import Authority, Issued
from ca_server.core.crls import crl_pem_from
from ca_server.core.errors import Conflict, NotFound, Unavailable
from ca_server.core.fleet import FleetSnapshot
from ca_server.core.models import CertificateRecord, Cluster, ClusterStatus
from ca_server.core.ports import Tx
from ca_server.core.rootkeys import trust_bundle_from
from ca_server.keys.file import FileKeyBackend
from ca_server.storage.joined import MAX_BATCH
from ca_server.storage.migrate import upgrade
from ca_server.storage.repository import SqlStore, SqlTx
from cluster_agent import pki
from tests.ca.conftest import PASSPHRASE, Agent, Harness, both_speedup_modes, make_harness
from tests.support.pgserver import PgServer

_names = itertools.count(1)
QUEUED = 0.4  # seconds for started threads to reach the joiner's queue (they only append to it)


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    return pg_server.create_database(f"group_commit_{next(_names)}")


@pytest.fixture
def store(pg_url: str) -> Iterator[SqlStore]:
    s = SqlStore(pg_url)
    upgrade(s.engine)
    yield s
    s.dispose()


@contextmanager
def head_locked(store: SqlStore) -> Iterator[None]:
    """Another session holds the audit head's row lock (as a replica's transaction does): the
    group commit's next transaction waits for it at its start while more jobs queue."""
    with store.engine.connect() as conn, conn.begin():
        conn.execute(text("SELECT 1 FROM meta WHERE key = 'audit_head' FOR UPDATE"))
        yield


def submit(store: SqlStore, jobs: list[Callable[[Tx], Any]]) -> tuple[list[Any], list[threading.Thread]]:
    """Each job from its own thread; ``results[i]`` becomes its result or error."""
    results: list[Any] = [None] * len(jobs)

    def call(i: int) -> None:
        try:
            results[i] = store.write_joined(jobs[i])
        except Exception as exc:  # the job's answer, asserted by the test
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(jobs))]
    for th in threads:
        th.start()
    time.sleep(QUEUED)
    return results, threads


def joined(threads: list[threading.Thread]) -> None:
    for th in threads:
        th.join(30)
    assert not any(th.is_alive() for th in threads)


def audited(name: str, *, fail: Exception | None = None) -> Callable[[Tx], Any]:
    """A job appending one audit entry, then returning the transaction's id (or raising ``fail``)."""

    def job(tx: Tx) -> Any:
        tx.append_audit(at=datetime.now(UTC), actor="test", action="test.job", subject=name, details={})
        if fail is not None:
            raise fail
        return tx.c.execute(text("SELECT txid_current()")).scalar()  # type: ignore[attr-defined]

    return job


def certificate(fp: str) -> Callable[[Tx], Any]:
    """A job storing a certificate for the key ``fp`` (a serial of its own: a second job for the
    same key is refused for the key, as a renewal reusing its CSR's key is)."""
    now = datetime.now(UTC)
    rec = CertificateRecord(
        serial=f"s-{fp}-{next(_SERIALS)}",
        cluster="nobody",
        root_id="r",
        generation=1,
        cert_pem="-",
        public_key_fp=fp,
        not_before=now,
        not_after=now + timedelta(days=1),
        issued_at=now,
    )

    def job(tx: Tx) -> Any:
        tx.add_certificate(rec)

    return job


_SERIALS = itertools.count()


def subjects(store: SqlStore) -> list[str]:
    with store.read() as tx:
        return [e.subject for e in tx.list_audit(limit=1000)]


def chain_ok(store: SqlStore) -> None:
    report = verify_chain(store.iter_audit(), head=store.audit_head())
    assert report.ok, report.problem


def test_jobs_queued_while_a_transaction_runs_share_the_next_one(store: SqlStore) -> None:
    with head_locked(store):
        first, t1 = submit(store, [audited("first")])
        rest, t2 = submit(store, [audited(f"job{i}") for i in range(10)])
    joined(t1 + t2)
    assert all(isinstance(r, int) for r in first + rest), first + rest
    assert len(set(rest)) == 1 and first[0] not in rest  # the ten in one transaction, after the first's
    assert store.group_commit_stats() == (2, 11)
    # one linear chain, one entry per job, the head written once for the ten
    assert sorted(subjects(store)) == sorted(["first", *[f"job{i}" for i in range(10)]])
    assert store.audit_head() == (11, store.last_audit_entry().hash)  # type: ignore[union-attr]
    chain_ok(store)


def test_a_failing_job_is_rolled_back_alone(store: SqlStore) -> None:
    with head_locked(store):
        _, t1 = submit(store, [audited("first")])
        jobs = [
            audited("good1"),
            audited("bad", fail=Conflict("refused by the job")),
            certificate("fp1"),
            certificate("fp1"),  # the database refuses it: the transaction would be aborted without a savepoint
            audited("good2"),
        ]
        results, t2 = submit(store, jobs)
    joined(t1 + t2)
    assert store.group_commit_stats() == (2, 6)
    errors = [r for r in results if isinstance(r, Exception)]
    assert [type(e) for e in errors] == [Conflict, Conflict], results
    assert str(errors[0]) == "refused by the job"
    assert "exists already" in str(errors[1])
    assert isinstance(results[0], int) and results[0] == results[4]  # both good ones, in one transaction
    assert sorted(subjects(store)) == ["first", "good1", "good2"]  # "bad"'s entry rolled back with it
    with store.read() as tx:
        fp1 = tx.c.execute(text("SELECT count(*) FROM certificates WHERE public_key_fp = 'fp1'")).scalar()
    assert fp1 == 1
    chain_ok(store)  # ids without a gap: the rolled-back entry's id went to good2


def test_when_the_transaction_fails_every_job_of_it_fails_and_nothing_is_stored(store: SqlStore) -> None:
    def kills_its_session(tx: Tx) -> None:
        tx.c.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))  # type: ignore[attr-defined]

    head = store.audit_head()
    with head_locked(store):
        _, t1 = submit(store, [audited("first")])
        results, t2 = submit(store, [audited("a"), kills_its_session, audited("b")])
    joined(t1 + t2)
    assert [type(r) for r in results] == [Unavailable, Unavailable, Unavailable], results
    assert subjects(store) == ["first"]
    assert store.audit_head() is not None and store.audit_head() != head
    chain_ok(store)
    assert isinstance(store.write_joined(audited("after")), int)  # the next batch has a new connection


@pytest.fixture
def pg_harness(pg_url: str, tmp_path: Path) -> Iterator[Harness]:
    yield from make_harness(pg_url, tmp_path / "ca")


def test_concurrent_renewals_share_commits_and_keep_one_linear_chain(pg_harness: Harness) -> None:
    agents = [pg_harness.enroll(f"c{i}") for i in range(8)]
    store = pg_harness.store
    before = store.group_commit_stats()
    head = store.audit_head()
    assert head is not None

    issued = _concurrently(store, _renewals(pg_harness, agents))
    assert all(not isinstance(r, Exception) for r in issued), issued
    batches, jobs = (a - b for a, b in zip(store.group_commit_stats(), before, strict=True))
    assert jobs == 8 and batches < 8  # commits shared
    with store.read() as tx:
        entries = tx.list_audit(after=head[0], limit=100)
        stored = [tx.get_certificate(r.serial) for r in issued]
    assert sorted(e.details["serial"] for e in entries) == sorted(r.serial for r in issued)
    assert all(s is not None for s in stored)
    assert len({r.serial for r in issued}) == 8
    assert [e.id for e in entries] == list(range(head[0] + 1, head[0] + 9))
    assert pg_harness.chain_ok()


def _concurrently(store: SqlStore, calls: list[Callable[[], Any]]) -> list[Any]:
    """Run ``calls`` from threads while another session holds the audit head, then release it."""
    results: list[Any] = [None] * len(calls)

    def call(i: int) -> None:
        try:
            results[i] = calls[i]()
        except Exception as exc:  # asserted by the test
            results[i] = exc

    with head_locked(store):
        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(calls))]
        for th in threads:
            th.start()
        time.sleep(2 * QUEUED)  # signing before the transaction takes a few ms each
    joined(threads)
    return results


def test_a_rolled_back_job_leaves_no_revision_bump_and_no_audit_head_behind(store: SqlStore) -> None:
    with store.read() as tx:
        revision = tx.get_revision()

    def bumps_then_fails(tx: Tx) -> None:
        tx.get_revision()  # cached for the transaction
        tx.bump_revision()
        tx.append_audit(at=datetime.now(UTC), actor="test", action="test.job", subject="bad", details={})
        raise Conflict("after the bump")

    def reads(tx: Tx) -> Any:
        return tx.get_revision(), tx.append_audit(
            at=datetime.now(UTC), actor="test", action="test.job", subject="good", details={}
        ).id

    with head_locked(store):
        _, t1 = submit(store, [audited("first")])
        results, t2 = submit(store, [bumps_then_fails, reads])
    joined(t1 + t2)
    assert store.group_commit_stats() == (2, 3)
    assert isinstance(results[0], Conflict)
    assert results[1] == (revision, 2)  # the revision and the audit id the failed job had taken, given back
    with store.read() as tx:
        assert tx.get_revision() == revision
    chain_ok(store)


def _renewal(authority: Authority, agent: Agent) -> Callable[[], Issued]:
    """The agent's renewal, its key, CSR and proof made now, sent when called."""
    key = pki.new_key()
    csr = pki.make_csr(key, agent.name)
    proof = pki.prove(agent.key, csr)
    return lambda: authority.renew(cluster_name=agent.name, agent_token=agent.token, csr_pem=csr, proof_b64=proof)


def _renewals(harness: Harness, agents: list[Agent]) -> list[Callable[[], Any]]:
    return [_renewal(harness.authority, a) for a in agents]


def test_renewals_ending_rotations_move_the_revision_once_per_commit_and_read_the_roots_once(
    pg_harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every renewal that ends a rotation bumps the fleet revision. Each used to write it (and read
    it back) at once, so the next renewal of the same batch found the roots it caches per revision
    stale and read the roots, CRLs and server names again: now the bump is written once, when the
    transaction commits, and a batch reads them at most once. Counted on the group commit's thread:
    the app's revision watcher reads them too whenever it builds a whole snapshot, at its own
    pace (one CI run counted such a read here)."""
    agents = [pg_harness.enroll(f"r{i}") for i in range(8)]
    for a in agents:
        pg_harness.rotate(a.name)
    store = pg_harness.store
    with store.read() as tx:
        revision = tx.get_revision()
    roots_read: list[int] = []
    list_roots = SqlTx.list_roots

    def counted(tx: SqlTx) -> Any:
        if threading.current_thread().name == "meshbridge-group-commit":
            roots_read.append(1)
        return list_roots(tx)

    monkeypatch.setattr(SqlTx, "list_roots", counted)
    before = store.group_commit_stats()
    issued = _concurrently(store, _renewals(pg_harness, agents))
    assert all(not isinstance(r, Exception) for r in issued), issued
    batches, jobs = (a - b for a, b in zip(store.group_commit_stats(), before, strict=True))
    assert jobs == 8 and batches < 8
    with store.read() as tx:
        assert tx.get_revision() == revision + batches  # was + 8: one per renewal
        assert not any(c.rotation_pending for c in tx.list_clusters())
    assert len(roots_read) <= batches
    assert pg_harness.chain_ok()


CLUSTER_TEXT = text(
    "SELECT name, trust_domain, status, generation, rotation_pending, gateway::text, created_at, agent_token_id,"
    " agent_token_hash, exports::text, agent_status::text, revoked_at, proof_floor FROM clusters ORDER BY name"
)


@contextmanager
def driver_statements(monkeypatch: pytest.MonkeyPatch, thread: str) -> Iterator[list[str]]:
    """The SQL text of every statement psycopg is asked to execute on the thread named ``thread``."""
    sent: list[str] = []
    execute = psycopg.Cursor.execute

    def recorded(cur: psycopg.Cursor[Any], query: Any, *args: Any, **kwargs: Any) -> Any:
        if threading.current_thread().name == thread:
            sent.append(str(query))
        return execute(cur, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.Cursor, "execute", recorded)
    yield sent
    monkeypatch.setattr(psycopg.Cursor, "execute", execute)


def test_renewals_ending_rotations_save_their_clusters_in_one_statement_per_batch(
    pg_harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a root rotation every renewal ends its cluster's rotation and saves the cluster: with the
    batch's writes deferred, those saves go as one ``UPDATE … FROM jsonb_to_recordset`` per batch
    (each one was its own statement, one more wait of the batch thread per renewal: 32 in a full
    batch of a fleet event). The rows are stored exactly as one save each stored them: the JSON
    columns' text too (through ``jsonb`` their keys would be reordered)."""
    agents = [pg_harness.enroll(f"s{i}") for i in range(9)]
    for a in agents:
        assert pg_harness.publish(a, trust_domain=f"{a.name}.test").status_code == 200
        pg_harness.report_served(a)
        pg_harness.rotate(a.name)
    store = pg_harness.store
    # the roots, CRLs and server names are read by one renewal first (not ahead: that batch is run again)
    assert not isinstance(_concurrently(store, _renewals(pg_harness, agents[:1]))[0], Exception)
    agents = agents[1:]
    with store.engine.connect() as conn:
        before = [r._asdict() for r in conn.execute(CLUSTER_TEXT)]
    assert all('"identities"' in r["exports"] and r["agent_status"] and r["rotation_pending"] for r in before[1:])
    stats, replays = store.group_commit_stats(), store.group_commit_replays()
    with driver_statements(monkeypatch, "meshbridge-group-commit") as sent:
        issued = _concurrently(store, _renewals(pg_harness, agents))
    assert all(not isinstance(r, Exception) for r in issued), issued
    batches, jobs = (a - b for a, b in zip(store.group_commit_stats(), stats, strict=True))
    replayed = store.group_commit_replays() - replays
    assert jobs == 8 and batches < 8 and replayed < batches
    # one save per batch that kept its writes deferred; a batch run again (one CI run replayed one)
    # saves its clusters one statement each, as every batch did before
    saves = [q for q in sent if q.lstrip().startswith("UPDATE clusters")]
    merged = [q for q in saves if "jsonb_to_recordset" in q]
    assert len(merged) == batches - replayed >= 1, saves  # before: none
    assert len(saves) - len(merged) <= (jobs if replayed else 0), saves
    with store.engine.connect() as conn:
        after = [r._asdict() for r in conn.execute(CLUSTER_TEXT)]
    assert after[1:] == [{**r, "rotation_pending": False} for r in before[1:]]
    assert pg_harness.chain_ok()


def test_the_batch_after_one_that_ended_rotations_finds_the_roots_cached(pg_harness: Harness) -> None:
    """Renewals that end rotations move the fleet revision; what ``Issuance`` caches for the
    revision before (roots, CRLs, server names) is carried to the new one as the batch commits, on
    the group commit's thread (``RenewalDraft.committed``), so the next batch, which begins at once,
    finds it cached. Carried by ``finish`` on the event loop, it came too late: the next batch's
    renewals read the roots while their writes were deferred and the batch ran again (fails before:
    a replay of each batch after the first). Here the renewals are submitted and nobody finishes
    them until every batch ran."""
    warm, *agents = [pg_harness.enroll(f"b{i}") for i in range(MAX_BATCH + 5)]
    for a in [warm, *agents]:
        pg_harness.rotate(a.name)
    authority, store = pg_harness.authority, pg_harness.store
    assert not isinstance(_concurrently(store, _renewals(pg_harness, [warm]))[0], Exception)  # caches the roots
    drafts = []
    for a in agents:
        key = pki.new_key()
        csr = pki.make_csr(key, a.name)
        drafts.append(
            authority.draft_renewal(
                cluster_name=a.name, agent_token=a.token, csr_pem=csr, proof_b64=pki.prove(a.key, csr)
            )
        )
    replays, before = store.group_commit_replays(), store.group_commit_stats()
    with head_locked(store):
        futures = [authority.submit_renewal(d) for d in drafts]
        time.sleep(QUEUED)
    outcomes = [f.result(30) for f in futures]
    batches, jobs = (a - b for a, b in zip(store.group_commit_stats(), before, strict=True))
    assert jobs == MAX_BATCH + 4 and batches >= 2  # (the first submitted may begin a batch of its own)
    assert store.group_commit_replays() == replays
    issued = [authority.finish_renewal(d, o) for d, o in zip(drafts, outcomes, strict=True)]
    assert len({i.serial for i in issued}) == len(agents)
    with store.read() as tx:
        assert not any(c.rotation_pending for c in tx.list_clusters())
    assert pg_harness.chain_ok()


def test_renewals_through_renew_ending_rotations_carry_the_roots_before_the_next_batch(
    pg_harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Authority.renew`` (the renewal a caller waits for, as the SQLite route and the tests do)
    carries the roots to the revision its batch committed on the group commit's thread, before
    that thread's next batch, as ``submit_renewal`` does. It used to run the draft's ``committed``
    on the caller's thread once ``write_joined`` returned: whenever the next batch began first, it
    found the roots cached for the old revision while its writes were deferred and ran again
    (fails before: carried on the callers' threads; the replay itself is a race, rarely lost here)."""
    warm, *agents = [pg_harness.enroll(f"t{i}") for i in range(MAX_BATCH + 5)]
    for a in [warm, *agents]:
        pg_harness.rotate(a.name)
    store, issuance = pg_harness.store, pg_harness.authority.issuance
    assert not isinstance(_concurrently(store, _renewals(pg_harness, [warm]))[0], Exception)  # caches the roots
    carried_on: list[str] = []
    carry = issuance._carry_pki

    def recorded(revision: int) -> None:
        carried_on.append(threading.current_thread().name)
        carry(revision)

    monkeypatch.setattr(issuance, "_carry_pki", recorded)
    replays, before = store.group_commit_replays(), store.group_commit_stats()
    issued = _concurrently(store, _renewals(pg_harness, agents))
    assert len(carried_on) == len(agents) and set(carried_on) == {"meshbridge-group-commit"}, carried_on
    assert all(not isinstance(r, Exception) for r in issued), issued
    batches, jobs = (a - b for a, b in zip(store.group_commit_stats(), before, strict=True))
    assert jobs == MAX_BATCH + 4 and batches >= 2
    assert store.group_commit_replays() == replays
    with store.read() as tx:
        assert not any(c.rotation_pending for c in tx.list_clusters())
    assert pg_harness.chain_ok()


def test_a_draft_for_a_new_revision_reads_the_roots_before_its_batch_does(pg_harness: Harness) -> None:
    """A renewal drafted with a fleet snapshot of a revision newer than the roots cached (after a
    root's activation, or here any change) reads them again first (``Issuance._pki_for_draft``, one
    draft for all), so its batch finds them cached and the draft signed under the root the batch
    would sign with. Before: the draft signed under whatever was cached, and the batch found the
    cache stale while its writes were deferred and ran again (fails before: one replay)."""
    warm, agent = pg_harness.enroll("d0"), pg_harness.enroll("d1")
    assert not isinstance(_concurrently(pg_harness.store, _renewals(pg_harness, [warm]))[0], Exception)
    pg_harness.rotate(agent.name)  # the revision moves: the roots cached are for the one before
    authority, store = pg_harness.authority, pg_harness.store
    with store.read() as tx:
        seen = FleetSnapshot(revision=tx.get_revision(), trust_bundle="", crl_pem="", clusters={})
    key = pki.new_key()
    csr = pki.make_csr(key, agent.name)
    draft = authority.draft_renewal(
        cluster_name=agent.name, agent_token=agent.token, csr_pem=csr, proof_b64=pki.prove(agent.key, csr), seen=seen
    )
    replays = store.group_commit_replays()
    issued = authority.finish_renewal(draft, authority.submit_renewal(draft).result(30))
    assert store.group_commit_replays() == replays
    assert issued.cluster == agent.name and pg_harness.chain_ok()


@contextmanager
def replica_of(harness: Harness) -> Iterator[Authority]:
    """Another replica: its own store (and group commit) and authority on the same database."""
    second = harness.replica_store()
    try:
        yield Authority(second, FileKeyBackend(harness.data_dir, PASSPHRASE))
    finally:
        second.dispose()


def _renew(authority: Authority, agent: Agent) -> Issued:
    return _renewal(authority, agent)()


def test_another_replicas_renewals_moving_the_revision_run_no_batch_here_again(pg_harness: Harness) -> None:
    """Each renewal that ends a rotation on another replica moves the fleet revision, and this
    replica's roots, CRLs and server names, cached per revision, look stale to its next batch. Read
    by a renewal whose writes were deferred, they made the batch run again, every job's statements
    settled in turn while it held the audit head's lock the other replica waits for: with two
    replicas in a 1,000-cluster fleet event, a third of the batches (bench/RESULTS.md). The batch
    now reads them itself, in a second wait before its jobs run, whenever the revision moved since
    the process last had them (fails before: a replay after each of the other replica's renewals)."""
    agents = [pg_harness.enroll(f"p{i}") for i in range(6)]
    for a in agents:
        pg_harness.rotate(a.name)
    store = pg_harness.store
    with replica_of(pg_harness) as replica:
        _renew(pg_harness.authority, agents[0])  # (this replica's first batch)
        replays = store.group_commit_replays()
        for theirs, mine in [(agents[1], agents[2]), (agents[3], agents[4])]:
            with store.read() as tx:
                revision = tx.get_revision()
            _renew(replica, theirs)
            issued = _renew(pg_harness.authority, mine)
            with store.read() as tx:
                assert tx.get_revision() == revision + 2  # each renewal ended its cluster's rotation
                assert issued.bundle.root_cert == trust_bundle_from(tx.list_roots())
                assert issued.bundle.crl == crl_pem_from(tx, tx.list_roots())
        assert store.group_commit_replays() == replays
    assert pg_harness.chain_ok()


def test_a_batch_signs_under_what_another_replica_changed_that_it_read_ahead(pg_harness: Harness) -> None:
    """What the batch reads ahead is what it signs under: another replica records a new name of the
    CA service (every intermediate from then on must exclude it, ``protect_server_names``), and the
    renewal drafted here under the names cached before is signed again in its batch, excluding it,
    from the names the batch read ahead, with no replay."""
    warm, agent = pg_harness.enroll("n0"), pg_harness.enroll("n1")
    store = pg_harness.store
    _renew(pg_harness.authority, warm)  # caches the roots, CRLs and server names here
    replays = store.group_commit_replays()
    with replica_of(pg_harness) as replica:
        assert replica.issuance.protect_server_names(["ca.replica.example"], actor="serve") == ["ca.replica.example"]
    issued = _renew(pg_harness.authority, agent)
    cert = x509.load_pem_x509_certificate(issued.bundle.ca_cert.encode())
    excluded = cert.extensions.get_extension_for_class(x509.NameConstraints).value.excluded_subtrees or []
    assert x509.DNSName("ca.replica.example") in excluded
    assert store.group_commit_replays() == replays
    assert pg_harness.chain_ok()


def test_a_batch_of_changes_moves_the_revision_by_one(store: SqlStore) -> None:
    with store.read() as tx:
        revision = tx.get_revision()

    def changes(tx: Tx) -> int:
        tx.bump_revision()
        tx.bump_revision()
        return tx.get_revision()  # what is committed: this transaction's bump counts once it commits

    with head_locked(store):
        _, t1 = submit(store, [audited("first")])
        results, t2 = submit(store, [changes] * 5)
    joined(t1 + t2)
    assert results == [revision] * 5
    with store.read() as tx:
        assert tx.get_revision() == revision + 1


def test_a_renewal_in_a_batch_waits_for_the_database_never(pg_harness: Harness) -> None:
    """The cluster rows and proof candidates of the whole batch are read before its renewals run
    (``SqlTx.read_ahead``), and the renewals' writes (certificate and audit inserts, the cluster's
    update) are deferred to the end of the batch, sent as one insert per table and settled once
    (``SqlTx.join(deferred=True)``): a renewal's own statements never make the batch thread wait,
    so the waits of a batch do not grow with its renewals. A renewal waited for each of its six
    statements at first, then three times, then once (its savepoint and inserts pipelined, settled
    at its end: jobs + 5 per batch + 3 here): each wait gives up the interpreter lock, and getting it
    back from a busy event loop took most of a renewal's 1.7 ms on the batch thread. Counted in
    libpq's own trace of the batches' connections: every wait for the server's answer follows a
    Sync (or, in pipeline mode, a Flush) the client sent. The roots, CRLs and server names are read
    by one renewal first (their first read is not ahead: that batch would be run again)."""
    agents = [pg_harness.enroll(f"w{i}") for i in range(9)]
    store = pg_harness.store
    assert not isinstance(_concurrently(store, _renewals(pg_harness, agents[:1]))[0], Exception)
    before, replays = store.group_commit_stats(), store.group_commit_replays()
    with client_messages(store, lambda: threading.current_thread().name == "meshbridge-group-commit") as traced:
        issued = _concurrently(store, _renewals(pg_harness, agents[1:]))
    assert all(not isinstance(r, Exception) for r in issued), issued
    batches, jobs = (a - b for a, b in zip(store.group_commit_stats(), before, strict=True))
    assert jobs == 8 and store.group_commit_replays() == replays
    waits = sum(1 for sent in traced for m in sent if len(m) > 2 and m[0] == "F" and m[2] in ("Sync", "Flush", "Query"))
    assert traced and batches == len(traced)
    # per batch two round trips: the BEGIN with the audit head's lock, the revision and the clusters
    # and candidates read ahead (a Flush), then the inserts, the audit head's update and the COMMIT
    # (a Sync, which the pipeline's end follows with a Flush to fetch its answers). Before: 5 or 6
    # (BEGIN, read ahead, the inserts' settling, the COMMIT, the pipeline's end), before that 8 + 5
    assert batches <= 3 and waits <= 3 * batches, (waits, jobs, batches)
    for sent in traced:  # nothing synced before the COMMIT: neither the BEGIN (as psycopg does) nor the inserts
        syncs = [i for i, m in enumerate(sent) if m[0] == "F" and m[2] == "Sync"]
        assert syncs and min(syncs) > next(i for i, m in enumerate(sent) if _parses(m, '"COMMIT"'))
    # each table's rows go in one statement with one parameter (a JSON array), whatever the batch's
    # size: a VALUES list of 8 rows took 96 parameters, which psycopg converts again at every execution
    inserts = [_bound_after(sent, i) for sent in traced for i, m in enumerate(sent) if _parses(m, "INSERT INTO")]
    assert len(inserts) == 2 * batches and all(params == "1" for params in inserts), inserts
    assert pg_harness.chain_ok()


def _parses(message: list[str], sql: str) -> bool:
    """A Parse message of ``sql`` (an unnamed or a named statement being prepared)."""
    return len(message) > 3 and message[0] == "F" and message[2] == "Parse" and sql in message[3]


def _bound_after(sent: list[list[str]], i: int) -> str:
    """How many parameters the Bind following the Parse at ``i`` carries (libpq's trace: the portal,
    the statement, the format codes' count and codes, then the parameters' count)."""
    bind = next(m for m in sent[i + 1 :] if m[0] == "F" and m[2] == "Bind")
    fields = bind[3].split()
    formats = int(fields[2])
    return fields[3 + formats]


def test_a_read_not_made_ahead_runs_the_batch_again_with_the_same_outcome(store: SqlStore) -> None:
    """A job that needs the database while the batch's writes are deferred (here a query of its
    own) makes the batch run again, each job's writes settled in turn: every job still gets its own
    result, in one transaction, and the chain holds each entry once."""
    with head_locked(store):
        _, t1 = submit(store, [audited("first")])
        results, t2 = submit(store, [audited(f"job{i}") for i in range(4)])
    joined(t1 + t2)
    assert store.group_commit_replays() == 2  # each batch once: its jobs read txid_current()
    assert all(isinstance(r, int) for r in results) and len(set(results)) == 1, results
    assert sorted(subjects(store)) == sorted(["first", *[f"job{i}" for i in range(4)]])
    chain_ok(store)


def deferrable(name: str, *, fail: Exception | None = None) -> Callable[[Tx], Any]:
    """A job appending one audit entry and nothing else (a write the batch defers), then returning
    the entry's id or raising ``fail``."""

    def job(tx: Tx) -> Any:
        entry = tx.append_audit(at=datetime.now(UTC), actor="test", action="test.job", subject=name, details={})
        if fail is not None:
            raise fail
        return entry.id

    return job


def test_a_job_failing_while_writes_are_deferred_loses_only_its_own(store: SqlStore) -> None:
    """A job's error while the batch's writes are deferred drops what it deferred (its savepoint is
    a mark in that list) and the batch goes on without running again: the others' entries take the
    ids after it, the chain stays linear."""
    with head_locked(store):
        _, t1 = submit(store, [deferrable("first")])
        jobs = [deferrable("good1"), deferrable("bad", fail=Conflict("refused by the job")), deferrable("good2")]
        results, t2 = submit(store, jobs)
    joined(t1 + t2)
    assert store.group_commit_stats() == (2, 4) and store.group_commit_replays() == 0
    assert results[0] == 2 and isinstance(results[1], Conflict) and results[2] == 3, results
    assert sorted(subjects(store)) == ["first", "good1", "good2"]
    assert store.audit_head() == (3, store.last_audit_entry().hash)  # type: ignore[union-attr]
    chain_ok(store)


def test_a_write_refused_at_the_end_of_a_deferred_batch_is_one_jobs_error(store: SqlStore) -> None:
    """The database refuses a deferred insert only when the batch's writes are sent, all together
    with the COMMIT behind them: PostgreSQL aborts the rest of the pipeline, the COMMIT too, so
    nothing of the batch is committed (the chain and subjects below), and it is run again, each
    job's writes settled in turn, so the refusal is the job's own (a key certified twice) and the
    rest commit."""
    with head_locked(store):
        _, t1 = submit(store, [deferrable("first")])
        results, t2 = submit(store, [deferrable("a"), certificate("fp9"), certificate("fp9"), deferrable("b")])
    joined(t1 + t2)
    assert store.group_commit_replays() == 1
    assert results[0] == 2 and results[1] is None and isinstance(results[2], Conflict) and results[3] == 3, results
    assert "exists already" in str(results[2])
    assert sorted(subjects(store)) == ["a", "b", "first"]
    chain_ok(store)


def _cluster(name: str, *, floor: int | None = None) -> Cluster:
    return Cluster(
        name=name,
        trust_domain=f"{name}.local",
        status=ClusterStatus.ACTIVE,
        generation=1,
        rotation_pending=False,
        gateway=None,
        created_at=datetime.now(UTC),
        proof_floor=floor,
    )


def _issued(tx: Tx, cluster: str, *, expires: datetime, revoked: bool = False) -> int:
    """Store a certificate of ``cluster``; its id."""
    now = datetime.now(UTC)
    serial = f"{cluster}-{next(_SERIALS)}"
    tx.add_certificate(
        CertificateRecord(
            serial=serial,
            cluster=cluster,
            root_id="r",
            generation=1,
            cert_pem="-",
            public_key_fp=serial,
            not_before=now - timedelta(days=2),
            not_after=expires,
            issued_at=now,
            revoked_at=now if revoked else None,
            revocation_reason="superseded" if revoked else None,
        )
    )
    rec = tx.get_certificate(serial)
    assert rec is not None and rec.id is not None
    return rec.id


def test_candidates_read_ahead_are_the_ones_each_job_would_read(store: SqlStore) -> None:
    """What a batch reads ahead answers a renewal's reads exactly as the database would, whatever
    its clock: certificates expired, revoked, below the proof floor, or more than the three read
    ahead (then the read goes to the database)."""
    now = datetime.now(UTC)
    hour = timedelta(hours=1)
    with store.write() as tx:
        for name in ("plain", "expiring", "floored", "single", "none"):
            tx.add_cluster(_cluster(name))
        _issued(tx, "plain", expires=now + 5 * hour)
        _issued(tx, "plain", expires=now + 6 * hour)
        _issued(tx, "plain", expires=now + 7 * hour, revoked=True)
        _issued(tx, "plain", expires=now + 8 * hour)
        # the newest three expire in turn, the older ones last: past them the read-ahead runs out
        for hours in (30, 20, 10, 3, 2, 1):
            _issued(tx, "expiring", expires=now + hours * hour)
        low = _issued(tx, "floored", expires=now + 9 * hour)
        floor = _issued(tx, "floored", expires=now + 9 * hour)
        _issued(tx, "floored", expires=now + 9 * hour)
        tx.save_cluster(_cluster("floored", floor=floor))
        _issued(tx, "single", expires=now + hour)
    assert low < floor
    names = ["plain", "expiring", "floored", "single", "none"]
    with store.read() as tx:
        floors = {c.name: c.proof_floor or 0 for c in tx.list_clusters()}
    clocks = [now + k * hour / 2 for k in range(0, 64)]
    with store.write() as tx:
        expected = {
            (n, at): [r.serial for r in tx.proof_candidates(n, now=at, floor=floors[n])] for n in names for at in clocks
        }
        tx.read_ahead(names)
        for (n, at), serials in expected.items():
            assert [r.serial for r in tx.proof_candidates(n, now=at, floor=floors[n])] == serials, (n, at - now)
    assert expected["expiring", now] and expected["expiring", now + 25 * hour] and expected["floored", now]
    assert not expected["single", now + 2 * hour] and not expected["none", now]


def test_a_job_reads_what_an_earlier_job_of_its_batch_wrote_not_what_was_read_ahead(store: SqlStore) -> None:
    """The read-ahead goes stale with the batch's own writes: a job sees an earlier job's new
    certificate among its cluster's candidates and its saved cluster row, and after a job fails,
    what it wrote is gone for the next one too."""
    now = datetime.now(UTC)
    with store.write() as tx:
        tx.add_cluster(_cluster("x"))
        first = _issued(tx, "x", expires=now + timedelta(days=1))

    def renews(tx: Tx) -> int:
        cluster = tx.get_cluster("x", for_update=True)
        assert cluster is not None
        cluster.generation += 1
        tx.save_cluster(cluster)
        return _issued(tx, "x", expires=now + timedelta(days=1))

    def renews_then_fails(tx: Tx) -> None:
        renews(tx)
        raise Conflict("refused after writing")

    def reads(tx: Tx) -> tuple[int, list[int | None]]:
        cluster = tx.get_cluster("x", for_update=True)
        assert cluster is not None
        return cluster.generation, [r.id for r in tx.proof_candidates("x", now=now, floor=0)]

    with head_locked(store):
        _, t1 = submit(store, [audited("first")])
        results: list[Any] = [None] * 4
        jobs = [renews, reads, renews_then_fails, reads]

        def call(i: int) -> None:
            try:
                results[i] = store.write_joined(jobs[i], cluster="x")
            except Exception as exc:  # asserted below
                results[i] = exc

        threads = []
        for i in range(len(jobs)):  # one after another into the queue, so they run in this order
            threads.append(threading.Thread(target=call, args=(i,)))
            threads[-1].start()
            time.sleep(QUEUED / 4)
        time.sleep(QUEUED)
    joined(t1 + threads)
    assert store.group_commit_stats() == (2, 5)
    second = results[0]
    assert isinstance(second, int) and second > first
    assert results[1] == (2, [second, first])
    assert isinstance(results[2], Conflict)
    assert results[3] == (2, [second, first])  # not generation 3 nor the failed job's certificate


def test_a_cluster_saved_twice_in_a_deferred_batch_is_stored_as_its_last_save(
    store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch's cluster saves go as one ``UPDATE … FROM`` the rows, where two rows for one
    cluster would leave either (PostgreSQL's UPDATE: "only one of the join rows will be used to
    update the target row, but which one will be used is not readily predictable"): each cluster
    goes once, as its last save left it, and a JSON column keeps its text (keys unsorted)."""
    with store.write() as tx:
        tx.add_cluster(_cluster("twice"))

    def saves(generation: int, exports: dict[str, Any]) -> Callable[[Tx], None]:
        def job(tx: Tx) -> None:
            cluster = tx.get_cluster("twice", for_update=True)
            assert cluster is not None
            cluster.generation, cluster.exports = generation, exports
            tx.save_cluster(cluster)

        return job

    jobs = [saves(2, {"services": [], "a": 1}), saves(3, {"zeta": {"y": 1, "x": 2}, "b": None})]
    with driver_statements(monkeypatch, "meshbridge-group-commit") as sent:
        with head_locked(store):
            _, t1 = submit(store, [deferrable("first")])  # the first batch, waiting for the head
            threads = [
                threading.Thread(target=store.write_joined, args=(job,), kwargs={"cluster": "twice"}) for job in jobs
            ]
            for th in threads:  # one after another into the queue, so they run in this order
                th.start()
                time.sleep(QUEUED / 4)
            time.sleep(QUEUED)
        joined(t1 + threads)
    assert store.group_commit_stats() == (2, 3) and store.group_commit_replays() == 0
    assert len([q for q in sent if q.lstrip().startswith("UPDATE clusters")]) == 1, sent
    with store.engine.connect() as conn:
        row = conn.execute(text("SELECT generation, exports::text FROM clusters WHERE name = 'twice'")).one()
    assert tuple(row) == (3, '{"zeta": {"y": 1, "x": 2}, "b": null}')


def test_a_status_report_does_not_queue_behind_the_audited_writers(pg_harness: Harness) -> None:
    """An agent's status report is not audited: it used to take the audit head's row lock like every
    write, and so waited for each group commit of renewals (and made them wait) during a rotation."""
    agent = pg_harness.enroll("s1")
    store = pg_harness.store
    with store.read() as tx:
        cluster = tx.get_cluster(agent.name)
    assert cluster is not None
    done = threading.Event()

    def report() -> None:
        pg_harness.authority.put_status(cluster, {"state": "ok", "generation": 1})
        done.set()

    with head_locked(store):
        th = threading.Thread(target=report)
        th.start()
        stored_while_held = done.wait(10)
    th.join(30)
    assert stored_while_held
    with store.read() as tx:
        stored = tx.get_cluster(agent.name)
    assert stored is not None and stored.agent_status is not None and stored.agent_status["state"] == "ok"


@contextmanager
def pool_listeners(
    store: SqlStore, on_checkout: Callable[..., None], on_checkin: Callable[..., None]
) -> Iterator[None]:
    """``on_checkout`` and ``on_checkin`` hear the store's pool inside the block, and only there."""
    event.listen(store.engine, "checkout", on_checkout)
    event.listen(store.engine, "checkin", on_checkin)
    try:
        yield
    finally:
        event.remove(store.engine, "checkout", on_checkout)
        event.remove(store.engine, "checkin", on_checkin)


@contextmanager
def client_messages(store: SqlStore, traced: Callable[[], bool]) -> Iterator[list[list[list[str]]]]:
    """PostgreSQL: what the client sent on each connection checked out inside the block by a thread
    for which ``traced()`` holds, in libpq's own trace: a list per connection of its lines, each
    split into its tab-separated fields ("F", length, message, …). Filled when the block ends."""
    files: list[tuple[Any, Any]] = []

    def on_checkout(dbapi_conn: Any, *_: Any) -> None:
        if traced():
            out = tempfile.TemporaryFile()  # noqa: SIM115  # read and closed when the block ends
            dbapi_conn.pgconn.trace(out.fileno())
            dbapi_conn.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
            files.append((dbapi_conn, out))

    def on_checkin(dbapi_conn: Any, *_: Any) -> None:
        if any(conn is dbapi_conn for conn, _ in files):
            dbapi_conn.pgconn.untrace()

    connections: list[list[list[str]]] = []
    try:
        with pool_listeners(store, on_checkout, on_checkin):
            yield connections
    finally:
        for _, out in files:
            out.seek(0)
            connections.append([line.split("\t") for line in out.read().decode().splitlines()])
            out.close()


@contextmanager
def statements_from_this_thread(store: SqlStore) -> Iterator[list[str]]:
    """What the store's connections send from this thread inside the block, a line per statement
    executed: SQLite's own trace callback (the statement's text), or on PostgreSQL libpq's trace
    (each Execute of the extended protocol, whose text a prepared statement does not resend, and
    each simple Query: BEGIN, COMMIT)."""
    sent: list[str] = []
    me = threading.current_thread()
    if store.postgres:
        with client_messages(store, lambda: threading.current_thread() is me) as traced:
            yield sent
        sent += [
            " ".join(m[2:]) for c in traced for m in c if len(m) > 2 and m[0] == "F" and m[2] in ("Execute", "Query")
        ]
        return
    traced_conns: list[Any] = []

    def on_checkout(dbapi_conn: Any, *_: Any) -> None:
        if threading.current_thread() is me:
            dbapi_conn.set_trace_callback(sent.append)
            traced_conns.append(dbapi_conn)

    def on_checkin(dbapi_conn: Any, *_: Any) -> None:
        if any(conn is dbapi_conn for conn in traced_conns):
            dbapi_conn.set_trace_callback(None)

    with pool_listeners(store, on_checkout, on_checkin):
        yield sent


@both_speedup_modes
def test_a_status_report_is_one_statement(harness: Harness) -> None:
    """A report replaces the cluster's ``agent_status`` column and nothing else: one UPDATE, where
    it read the cluster's row locked and wrote every column back (two statements, two waits on
    PostgreSQL, for each of a fleet's thousands of reports). A report for a cluster that is not
    there is refused and stores nothing."""
    agent = harness.enroll("s2")
    store = harness.store
    with store.read() as tx:
        cluster = tx.get_cluster(agent.name)
    assert cluster is not None
    with statements_from_this_thread(store) as sent:
        harness.authority.put_status(cluster, {"state": "ok", "generation": 1})
    work = [s for s in sent if not any(word in s for word in ("BEGIN", "COMMIT", "PRAGMA"))]
    assert len(work) == 1, sent
    assert store.postgres or work[0].startswith("UPDATE clusters SET agent_status"), work
    with store.read() as tx:
        stored = tx.get_cluster(agent.name)
    assert stored is not None and stored.agent_status is not None
    assert stored.agent_status["state"] == "ok" and "received_at" in stored.agent_status
    assert stored.generation == cluster.generation and stored.agent_token_hash == cluster.agent_token_hash
    ghost = replace(cluster, name="ghost")
    with pytest.raises(NotFound, match="no cluster named ghost"):
        harness.authority.put_status(ghost, {"state": "ok"})
    with store.read() as tx:
        assert tx.get_cluster("ghost") is None


def test_an_unaudited_write_can_neither_audit_nor_move_the_revision(store: SqlStore) -> None:
    """Taking the audit head's lock after row locks would reverse every other writer's order."""
    head, revision = store.audit_head(), None
    with store.read() as tx:
        revision = tx.get_revision()

    def audits(tx: Tx) -> None:
        tx.append_audit(at=datetime.now(UTC), actor="t", action="t.x", subject="s", details={})

    def bumps(tx: Tx) -> None:
        tx.bump_revision()

    for attempt in (audits, bumps):
        with pytest.raises(RuntimeError, match="unaudited"), store.write_unaudited() as tx:
            tx.add_cluster(_cluster("never"))
            attempt(tx)
    assert store.audit_head() == head
    with store.read() as tx:
        assert tx.get_revision() == revision and tx.get_cluster("never") is None


def test_a_submitted_job_is_waited_for_without_a_thread(store: SqlStore) -> None:
    """``submit_joined`` returns at once with a future; the caller's thread is free while the batch
    waits (here for another session's audit head lock), and the futures give each job's result."""
    with head_locked(store):
        futures = [store.submit_joined(audited(f"job{i}")) for i in range(5)]  # one thread submits all
        time.sleep(QUEUED)
        assert not any(f.done() for f in futures)  # waiting for the lock, and nothing waits with them
    txids = [f.result(timeout=30) for f in futures]
    assert all(isinstance(t, int) for t in txids)
    assert store.group_commit_stats()[1] == 5 and store.group_commit_stats()[0] <= 2
    assert subjects(store) == [f"job{i}" for i in range(5)]
    chain_ok(store)


def test_a_job_whose_waiter_gave_up_still_runs_and_the_others_get_their_results(store: SqlStore) -> None:
    with head_locked(store):
        first = store.submit_joined(audited("first"))
        time.sleep(QUEUED)
        abandoned, kept = store.submit_joined(audited("abandoned")), store.submit_joined(audited("kept"))
        assert abandoned.cancel()  # as asyncio.wrap_future does when the awaiting task is cancelled
    assert isinstance(first.result(timeout=30), int) and isinstance(kept.result(timeout=30), int)
    assert abandoned.cancelled()
    assert subjects(store) == ["first", "abandoned", "kept"]  # ran and committed, as a thread's job would have
    chain_ok(store)


def test_renewals_through_the_api_wait_for_their_commit_without_holding_a_renewal_thread(pg_harness: Harness) -> None:
    """With one renewal thread, six renewals sent at once are all drafted and queued for the group
    commit while the audit head is locked: they share one or two commits. Before, each held the
    thread until its commit, so they ran one per transaction."""
    agents = [pg_harness.enroll(f"t{i}") for i in range(6)]
    store = pg_harness.store
    writes = pg_harness.client.app.state.agent_threads.writes  # type: ignore[attr-defined]
    writes.total_tokens, before = 1, store.group_commit_stats()
    answers: list[Any] = [None] * len(agents)

    def renew(i: int) -> None:
        answers[i] = pg_harness.renew_response(agents[i])[0].status_code

    try:
        with head_locked(store):
            threads = [threading.Thread(target=renew, args=(i,)) for i in range(len(agents))]
            for th in threads:
                th.start()
            time.sleep(4 * QUEUED)  # six drafts (signing) on the one thread
        joined(threads)
    finally:
        writes.total_tokens = 32
    batches, jobs = (a - b for a, b in zip(store.group_commit_stats(), before, strict=True))
    assert answers == [201] * 6
    assert jobs == 6 and batches <= 2, (batches, jobs)
    assert pg_harness.chain_ok()
