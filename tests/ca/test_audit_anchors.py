"""Issue 10 item 6: the audit chain resists whoever can write the database.

Each attack is performed as an attacker with write access to the database (and none to the data
directory or the audit key) would: with direct SQL on the SQLite file or the PostgreSQL database,
recomputing the unkeyed hashes the way the public 0.1.0 scheme computes them. ``audit verify`` and
``restore`` must see every one of them; the legitimate chain, an upgraded 0.1.0 chain and replicas
sharing one key must keep verifying.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from ca_server.core.audit import GENESIS, entry_hash
from cluster_agent import pki
from tests.support.replicas import CLI, Replica, admin_token, init_ca


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=120, check=False, env={**os.environ, **(env or {})}
    )


def verify(d: Path, url: str, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return cli("audit", "verify", "--data-dir", str(d), "--database-url", url, *extra, env=env)


@dataclass
class CA:
    data_dir: Path
    url: str

    def sql(self, *statements: str, params: list[dict[str, Any]] | None = None) -> None:
        engine = create_engine(self.url)
        with engine.begin() as conn:
            for s in statements:
                conn.execute(text(s), params or {})
        engine.dispose()

    def rows(self) -> list[Any]:
        engine = create_engine(self.url)
        with engine.connect() as conn:
            rows = list(conn.execute(text("SELECT * FROM audit ORDER BY id")))
        engine.dispose()
        return rows


def busy(replica: Replica, admin: str, name: str, renewals: int = 3) -> None:
    """A cluster registered, enrolled and renewed through the real service."""
    with replica.client(admin) as c:
        boot = c.post("/v1/clusters", json={"name": name, "trust_domain": f"{name}.mesh"}).json()["bootstrap_token"]
        key = pki.new_key()
        r = c.post("/v1/enroll", json={"cluster": name, "bootstrap_token": boot, "csr": pki.make_csr(key, name)})
        assert r.status_code == 201, r.text
        token = r.json()["agent_token"]
    with replica.client(token) as c:
        for _ in range(renewals):
            new = pki.new_key()
            csr = pki.make_csr(new, name)
            r = c.post(f"/v1/clusters/{name}/intermediate", json={"csr": csr, "proof": pki.prove(key, csr)})
            assert r.status_code == 201, r.text
            key = new


def serve_and_write(ca: CA, *names: str, env: dict[str, str] | None = None) -> None:
    """Run `serve`, write some history through it, stop it (it anchors its head as it stops)."""
    replica = Replica(ca.data_dir, database_url=ca.url, env=env).start()
    try:
        for name in names:
            busy(replica, admin_token(ca.data_dir), name)
    finally:
        replica.stop()


@pytest.fixture
def ca(database_url: str, tmp_path: Path) -> CA:
    d = tmp_path / "ca"
    init_ca(d, database_url=database_url)
    return CA(d, database_url)


def rehash_unkeyed(ca: CA, *, from_id: int, change: dict[str, Any] | None = None, to_id: int | None = None) -> None:
    """The attacker's rewrite: change entry ``from_id``, then recompute the public (unkeyed) hash
    of it and of every entry after it (up to ``to_id``), relink them, and move the head."""
    rows = ca.rows()
    prev = GENESIS if from_id == 1 else rows[from_id - 2].hash
    updates = []
    for r in rows[from_id - 1 : to_id]:
        details = json.loads(r.details)
        if r.id == from_id and change:
            details.update(change)
        at = r.at if isinstance(r.at, datetime) else datetime.fromisoformat(str(r.at))
        h = entry_hash(
            id=r.id,
            at=at.replace(tzinfo=at.tzinfo or UTC),
            actor=r.actor,
            action=r.action,
            subject=r.subject,
            details=details,
            prev_hash=prev,
        )
        updates.append({"id": r.id, "details": json.dumps(details, sort_keys=True), "prev": prev, "h": h})
        prev = h
    engine = create_engine(ca.url)
    with engine.begin() as conn:
        for u in updates:
            conn.execute(text("UPDATE audit SET details = :details, prev_hash = :prev, hash = :h WHERE id = :id"), u)
        if to_id is None:
            conn.execute(text("UPDATE meta SET str_value = :h WHERE key = 'audit_head'"), {"h": prev})
    engine.dispose()


def truncate(ca: CA, keep: int) -> None:
    """The attacker's truncation: delete every entry after ``keep`` and move the head back to it."""
    last = ca.rows()[keep - 1]
    ca.sql(
        f"DELETE FROM audit WHERE id > {keep}",  # noqa: S608 (an int of ours)
        f"UPDATE meta SET int_value = {keep}, str_value = '{last.hash}' WHERE key = 'audit_head'",  # noqa: S608 (an int and a hash of ours)
    )


# ------------------------------------------------------------------------------------ the attacks
def test_a_rewritten_entry_with_recomputed_hashes_is_found(ca: CA) -> None:
    serve_and_write(ca, "a")
    assert verify(ca.data_dir, ca.url).returncode == 0
    revoke = next(r for r in ca.rows() if r.action == "intermediate.enroll")
    rehash_unkeyed(ca, from_id=revoke.id, change={"serial": "00"})
    r = verify(ca.data_dir, ca.url)
    assert r.returncode == 1, r.stdout
    assert f"entry {revoke.id} was altered" in r.stderr


def test_the_whole_chain_rewritten_without_the_key_is_found(ca: CA) -> None:
    serve_and_write(ca, "a")
    rehash_unkeyed(ca, from_id=1, change={"forged": True})
    r = verify(ca.data_dir, ca.url)
    assert r.returncode == 1, r.stdout
    assert "no entry is sealed with the audit key" in r.stderr


def test_a_deleted_tail_with_a_moved_head_is_found(ca: CA) -> None:
    serve_and_write(ca, "a", "b")
    total = len(ca.rows())
    truncate(ca, total - 4)
    r = verify(ca.data_dir, ca.url)
    assert r.returncode == 1, r.stdout
    assert f"ends at entry {total - 4}" in r.stderr and f"records entry {total}" in r.stderr
    assert "rolled back or truncated" in r.stderr


def test_a_truncated_chain_that_grew_again_is_found(ca: CA) -> None:
    serve_and_write(ca, "a", "b")
    total = len(ca.rows())
    truncate(ca, total - 4)
    serve_and_write(ca, "c")  # the service writes on, past the old head: new entries at the old ids
    r = verify(ca.data_dir, ca.url)
    assert r.returncode == 1, r.stdout
    assert f"entry {total} is not the entry anchored" in r.stderr


def test_a_database_file_rolled_back_to_an_older_copy_is_found(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    init_ca(d)
    ca = CA(d, f"sqlite:///{d / 'meshbridge.db'}")
    serve_and_write(ca, "a")
    old = tmp_path / "old-copy"
    old.mkdir()
    for f in d.glob("meshbridge.db*"):
        shutil.copy2(f, old / f.name)
    serve_and_write(ca, "b")
    for f in d.glob("meshbridge.db*"):
        f.unlink()
    for f in old.iterdir():
        shutil.copy2(f, d / f.name)
    r = verify(d, ca.url)
    assert r.returncode == 1, r.stdout
    assert "rolled back or truncated" in r.stderr


def test_restore_refuses_a_backup_older_than_the_anchors(ca: CA, tmp_path: Path) -> None:
    serve_and_write(ca, "a")
    old_backup = tmp_path / "old.tar.gz"
    assert (
        cli("backup", "--data-dir", str(ca.data_dir), "--database-url", ca.url, "--out", str(old_backup)).returncode
        == 0
    )
    with tarfile.open(old_backup) as tar:  # neither the key nor the anchors travel with a backup
        assert not [n for n in tar.getnames() if "audit-key" in n or "audit-anchors" in n]
        blob = b"".join(tar.extractfile(m).read() for m in tar.getmembers() if m.isfile())  # type: ignore[union-attr]
    assert (ca.data_dir / "audit-key").read_bytes().strip() not in blob
    serve_and_write(ca, "b")
    passphrase = {"MESHBRIDGE_CA_KEY_PASSPHRASE": (ca.data_dir / "key-passphrase").read_text().strip()}
    # the operator (or an attacker) puts the older copy back over the live CA: the database and
    # ca.json go, the data directory with its audit key and anchors stays
    wipe(ca)
    (ca.data_dir / "ca.json").unlink()
    r = cli(
        "restore", "--data-dir", str(ca.data_dir), "--database-url", ca.url, "--in", str(old_backup), env=passphrase
    )
    assert r.returncode != 0 and "rolled back" in r.stderr and "--accept-rollback" in r.stderr, r.stderr
    assert not (ca.data_dir / "ca.json").exists()
    # a fresh directory checked against a copy of the live anchors: refused the same way
    fresh = tmp_path / "fresh"
    r = cli(
        "restore",
        "--data-dir",
        str(fresh),
        "--in",
        str(old_backup),
        "--anchors",
        str(ca.data_dir / "audit-anchors"),
        "--audit-key-file",
        str(ca.data_dir / "audit-key"),
        env=passphrase,
    )
    assert r.returncode != 0 and "rolled back" in r.stderr, r.stderr
    assert not fresh.exists()
    # accepted on purpose: restored, the acceptance audited, and the chain verifies from then on
    r = cli(
        "restore",
        "--data-dir",
        str(ca.data_dir),
        "--database-url",
        ca.url,
        "--in",
        str(old_backup),
        "--accept-rollback",
        env=passphrase,
    )
    assert r.returncode == 0, r.stderr
    assert ca.rows()[-1].action == "audit.rollback_accepted"
    assert list(ca.data_dir.glob("audit-anchors.superseded-*"))
    ok = verify(ca.data_dir, ca.url)
    assert ok.returncode == 0, ok.stderr


def wipe(ca: CA) -> None:
    """Empty the CA's database (SQLite: remove the file)."""
    if ca.url.startswith("sqlite"):
        db = Path(ca.url.removeprefix("sqlite:///"))
        for f in db.parent.glob(db.name + "*"):
            f.unlink()
        return
    ca.sql(
        "DELETE FROM audit",
        "DELETE FROM crls",
        "DELETE FROM certificates",
        "DELETE FROM bootstrap_tokens",
        "DELETE FROM admin_tokens",
        "DELETE FROM clusters",
        "DELETE FROM roots",
        "DELETE FROM meta",
    )


# ------------------------------------------------------------------------------------ what must keep working
def test_the_legitimate_chain_verifies_with_its_anchors(ca: CA) -> None:
    serve_and_write(ca, "a", "b")
    r = verify(ca.data_dir, ca.url)
    assert r.returncode == 0, r.stderr
    assert "sealed with the audit key from entry 1" in r.stdout and "anchor" in r.stdout
    assert oct((ca.data_dir / "audit-key").stat().st_mode & 0o777) == "0o600"
    assert oct((ca.data_dir / "audit-anchors").stat().st_mode & 0o777) == "0o600"
    key = (ca.data_dir / "audit-key").read_text().strip()
    for f in ca.data_dir.glob("serve-*.log"):  # the key is never logged
        assert key not in f.read_text()


def test_verify_without_the_key_or_with_another_key_says_so(ca: CA, tmp_path: Path) -> None:
    other = tmp_path / "other-key"
    other.write_text("0" * 64 + "\n")
    r = verify(ca.data_dir, ca.url, "--audit-key-file", str(other))
    assert r.returncode == 1 and "not signed with this audit key" in r.stderr, r.stderr
    (ca.data_dir / "audit-anchors").rename(tmp_path / "anchors")
    r = verify(ca.data_dir, ca.url, "--audit-key-file", str(other))
    assert r.returncode == 1 and "not the audit key" in r.stderr, r.stderr
    (ca.data_dir / "audit-key").rename(tmp_path / "key")
    r = verify(ca.data_dir, ca.url)
    assert r.returncode == 2 and "no audit key" in r.stderr, r.stderr


def legacy_data_dir(d: Path, url: str) -> None:
    """A data directory as 0.1.0's `init` left it: the chain unkeyed, no audit key, no anchors."""
    from ca_server import runtime
    from ca_server.core.authority import Authority, Policy
    from ca_server.keys.base import KeyType
    from ca_server.keys.file import FileKeyBackend
    from ca_server.storage.migrate import upgrade
    from ca_server.storage.repository import SqlStore

    d.mkdir(mode=0o700)
    passphrase = "legacy passphrase 0.1.0 style"
    runtime.write_private(d / "key-passphrase", passphrase + "\n")
    store = SqlStore(url)  # no audit key: 0.1.0's unkeyed SHA-256 chain
    upgrade(store.engine)
    authority = Authority(store, FileKeyBackend(d, passphrase.encode()), policy=Policy())
    _, admin = authority.init_root(key_type=KeyType.ECDSA_P256)
    authority.create_cluster(name="old", trust_domain="old.mesh", gateway=None, actor="admin:legacy")
    store.dispose()
    settings = runtime.CASettings(database_url=None if url.startswith("sqlite") else url)
    runtime.write_private(d / runtime.SETTINGS_FILE, settings.to_json())
    runtime.write_private(d / "admin-token", admin + "\n")
    runtime.write_public(d / "root-cert.pem", authority.trust_bundle_from(authority.list_roots()))


def test_a_0_1_0_chain_is_sealed_by_serve_and_its_prefix_verifies(database_url: str, tmp_path: Path) -> None:
    d = tmp_path / "ca"
    legacy_data_dir(d, database_url)
    ca = CA(d, database_url)
    legacy = len(ca.rows())
    r = verify(d, database_url)
    assert r.returncode == 0 and "unkeyed" in r.stdout, r.stdout + r.stderr
    serve_and_write(ca, "a")  # serve creates the key, seals the chain, writes keyed entries
    seal = ca.rows()[legacy]
    assert (seal.id, seal.action) == (legacy + 1, "audit.seal")
    assert json.loads(seal.details) == {"scheme": "hmac-sha256-v1", "unkeyed_entries": legacy}
    r = verify(d, database_url)
    assert r.returncode == 0, r.stderr
    assert f"sealed with the audit key from entry {legacy + 1}" in r.stdout
    # the unkeyed prefix is held by the first keyed entry: rewriting it is found
    rehash_unkeyed(ca, from_id=2, change={"forged": True}, to_id=legacy)
    r = verify(d, database_url)
    assert r.returncode == 1 and f"entry {legacy + 1} does not link" in r.stderr, r.stderr


def test_a_sealed_chain_downgraded_to_unkeyed_is_found(database_url: str, tmp_path: Path) -> None:
    d = tmp_path / "ca"
    legacy_data_dir(d, database_url)
    ca = CA(d, database_url)
    legacy = len(ca.rows())
    serve_and_write(ca, "a")
    truncate(ca, legacy)  # the seal and everything keyed gone: it looks like 0.1.0 again
    r = verify(d, database_url)
    assert r.returncode == 1, r.stdout
    # and serve refuses to write onto it rather than sealing it a second time
    with pytest.raises(RuntimeError, match="not sealed with the audit key"):
        Replica(d, database_url=database_url).start()
    (d / "audit-anchors").unlink()  # without its anchors the key alone still sees it
    r = verify(d, database_url)
    assert r.returncode == 1 and "no entry is sealed with the audit key" in r.stderr, r.stderr


def test_replicas_on_postgres_share_one_key_from_outside_their_data_dirs(pg_server: Any, tmp_path: Path) -> None:
    url = pg_server.create_database("anchors_replicas")
    secret = tmp_path / "secret"
    secret.mkdir()
    key = secret / "audit-key"
    key.write_text(os.urandom(32).hex() + "\n")
    env = {"MESHBRIDGE_AUDIT_KEY_FILE": str(key)}
    d1, d2 = tmp_path / "r1", tmp_path / "r2"
    r = cli("init", "--data-dir", str(d1), "--database-url", url, env=env)
    assert r.returncode == 0, r.stderr
    assert not (d1 / "audit-key").exists()
    shutil.copytree(d1, d2)
    (d2 / "audit-anchors").unlink()
    r1 = Replica(d1, database_url=url, env=env).start()
    r2 = Replica(d2, database_url=url, env=env).start()
    try:
        admin = admin_token(d1)
        with ThreadPoolExecutor(4) as ex:
            list(ex.map(lambda i: busy(r1 if i % 2 else r2, admin, f"c{i}", renewals=2), range(4)))
    finally:
        r1.stop()
        r2.stop()
    ids = [row.id for row in CA(d1, url).rows()]
    assert ids == list(range(1, len(ids) + 1))
    for d in (d1, d2):
        r = verify(d, url, env=env)
        assert r.returncode == 0, r.stderr
    # a replica given another key refuses to start instead of forking the chain
    wrong = secret / "wrong-key"
    wrong.write_text(os.urandom(32).hex() + "\n")
    with pytest.raises(RuntimeError, match="not sealed with the audit key"):
        Replica(d2, database_url=url, env={"MESHBRIDGE_AUDIT_KEY_FILE": str(wrong)}).start()


# ------------------------------------------------------------------------------------ in process
@pytest.fixture
def sealed_store(database_url: str, tmp_path: Path) -> Iterator[Any]:
    from ca_server.core.audit import AuditKey
    from ca_server.storage.migrate import upgrade
    from ca_server.storage.repository import SqlStore

    store = SqlStore(database_url, audit_key=AuditKey(b"k" * 32))
    upgrade(store.engine)
    yield store
    store.dispose()


def append(store: Any, n: int) -> None:
    for i in range(n):
        with store.write() as tx:
            tx.append_audit(at=datetime.now(UTC), actor="t", action="x.y", subject=str(i), details={"i": i})


def test_serve_anchors_only_a_chain_that_verifies_since_its_last_anchor(sealed_store: Any, tmp_path: Path) -> None:
    from ca_server.sealing import Anchorer, AnchorLog, ChainBroken

    log = AnchorLog(tmp_path / "audit-anchors")
    anchorer = Anchorer(sealed_store, sealed_store.audit_key, log)
    assert anchorer.tick() is None  # empty chain: nothing to anchor
    append(sealed_store, 5)
    first = anchorer.tick()
    assert first is not None and first.id == 5
    assert anchorer.tick() is None  # the head did not move
    append(sealed_store, 3)
    assert anchorer.tick().id == 8  # type: ignore[union-attr]
    # the attacker deletes the tail and moves the head back: no anchor of the shorter chain
    with sealed_store.engine.begin() as conn:
        prev = conn.execute(text("SELECT hash FROM audit WHERE id = 6")).scalar_one()
        conn.execute(text("DELETE FROM audit WHERE id > 6"))
        conn.execute(text("UPDATE meta SET int_value = 6, str_value = :h WHERE key = 'audit_head'"), {"h": prev})
    append(sealed_store, 4)  # and the service writes on, past the anchored id
    with pytest.raises(ChainBroken, match="entry 9 does not link"):
        anchorer.tick()
    assert [a.id for a in log.read()] == [5, 8]
    # a new process starts from the newest anchor in the file and refuses the same way
    with pytest.raises(ChainBroken):
        Anchorer(sealed_store, sealed_store.audit_key, log).tick()


def test_the_anchors_file_stays_bounded(tmp_path: Path) -> None:
    from ca_server.core.audit import AuditKey
    from ca_server.sealing import AnchorLog

    key = AuditKey(b"k" * 32)
    log = AnchorLog(tmp_path / "audit-anchors", max_bytes=20_000, keep=50)
    for i in range(1, 400):
        log.append(key.anchor(i, "ab" * 32, datetime.now(UTC)))
    kept = log.read()
    assert (tmp_path / "audit-anchors").stat().st_size <= 20_000
    assert kept[-1].id == 399 and len(kept) >= 50
    assert all(key.signed(a) for a in kept)


def test_concurrent_anchor_writers_lose_no_line(tmp_path: Path) -> None:
    from ca_server.core.audit import AuditKey
    from ca_server.sealing import AnchorLog

    key = AuditKey(b"k" * 32)
    whole = AnchorLog(tmp_path / "whole")  # never cut: every line must be there
    cut = AnchorLog(tmp_path / "cut", max_bytes=4_000, keep=5)  # cut all the time: still whole lines

    def write(base: int) -> None:
        for i in range(50):
            anchor = key.anchor(base + i, "cd" * 32, datetime.now(UTC))
            whole.append(anchor)
            cut.append(anchor)

    threads = [threading.Thread(target=write, args=(b,)) for b in (1000, 2000, 3000)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(a.id for a in whole.read()) == [b + i for b in (1000, 2000, 3000) for i in range(50)]
    kept = cut.read()  # parses: no torn or interleaved line
    assert kept and all(key.signed(a) for a in kept)
    assert (tmp_path / "cut").stat().st_size <= 4_000


@pytest.mark.parametrize("prepared", [True, False], ids=["prepared", "core"])
def test_the_store_seals_entries_on_both_statement_paths(database_url: str, prepared: bool) -> None:
    from ca_server.core.audit import AuditKey, verify_chain
    from ca_server.storage.migrate import upgrade
    from ca_server.storage.repository import SqlStore

    key = AuditKey(b"s" * 32)
    store = SqlStore(database_url, prepared_statements=prepared, audit_key=key)
    try:
        upgrade(store.engine)
        append(store, 3)
        assert verify_chain(store.iter_audit(), head=store.audit_head(), key=key).sealed_from == 1
        assert not verify_chain(store.iter_audit(), head=store.audit_head(), key=AuditKey(b"t" * 32)).ok
        assert not verify_chain(store.iter_audit(), head=store.audit_head()).ok  # no key: not the old scheme
    finally:
        store.dispose()


def test_the_key_is_never_shown() -> None:
    from ca_server.core.audit import AuditKey

    secret = b"a-secret-that-must-not-leak-0123456789"
    key = AuditKey(secret)
    assert secret.decode() not in repr(key) and secret.decode() not in str(key)
    with pytest.raises(ValueError, match="32"):
        AuditKey(b"short")
