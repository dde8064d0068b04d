"""Rate limits per credential and per source address, shared by the replicas, 429 + Retry-After."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from starlette.testclient import TestClient

from ca_server.api.ratelimit import Limits, RateLimiter, credential_key
from ca_server.app import create_app
from ca_server.core.authority import Authority
from ca_server.keys.base import KeyType
from ca_server.keys.file import FileKeyBackend
from ca_server.storage.migrate import upgrade
from ca_server.storage.ratecounters import SqlRateCounters
from ca_server.storage.repository import SqlStore


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_limit_per_window_and_retry_after() -> None:
    clock = Clock(1000.25)
    rl = RateLimiter(Limits(per_credential=5, per_address=0, window=1.0), clock=clock)
    assert [rl.hit([("cred:x", 5)]) for _ in range(5)] == [None] * 5
    assert rl.hit([("cred:x", 5)]) == 1  # over: wait for the next window
    assert rl.hit([("cred:y", 5)]) is None  # another credential is unaffected
    clock.t = 1001.01
    assert rl.hit([("cred:x", 5)]) is None  # a new window


def test_counts_are_shared_between_replicas(database_url: str) -> None:
    engine = create_engine(database_url)
    store = SqlStore(database_url)
    upgrade(store.engine)
    clock = Clock(5000.1)
    limits = Limits(per_credential=5, per_address=0, window=1.0)
    one = RateLimiter(limits, SqlRateCounters(store.engine), clock=clock)
    two = RateLimiter(limits, SqlRateCounters(engine), clock=clock)
    for _ in range(3):
        assert one.hit([("cred:mbagent.0123456789abcdef", 5)]) is None
        assert two.hit([("cred:mbagent.0123456789abcdef", 5)]) is None
    one.sync()
    two.sync()
    one.sync()  # one learns what two shared
    # six requests went through across the fleet: both replicas now refuse the seventh
    assert one.hit([("cred:mbagent.0123456789abcdef", 5)]) == 1
    assert two.hit([("cred:mbagent.0123456789abcdef", 5)]) == 1
    engine.dispose()
    store.dispose()


def test_a_sync_is_two_statements_whatever_the_number_of_keys(database_url: str) -> None:
    """The shared counters are written and read set-based: one upsert (of the keys whose count
    moved) and one read, each with a fixed number of parameters. The first version sent an
    executemany of one row per key seen in the window and an IN list of one parameter per key:
    300 ms of Python per sync at 10,000 agents on PostgreSQL, five times a second."""
    store = SqlStore(database_url)
    upgrade(store.engine)
    counters = SqlRateCounters(store.engine)
    sent: list[tuple[str, int, bool]] = []

    def record(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        if "rate_counters" in statement:
            sent.append((statement.split()[0], len(params), many))

    event.listen(store.engine, "before_cursor_execute", record)
    keys = {f"cred:mbagent.{i:016x}": 1 + i % 3 for i in range(2000)}
    keys["addr:2001:db8::1"] = 0  # seen here earlier, nothing new: read, not written
    got = counters.add_and_read(7, keys)
    assert len(sent) == 2 and all(n <= 4 and not many for _, n, many in sent), sent
    assert [verb for verb, _, _ in sent] == ["INSERT", "SELECT"]
    assert got == {k: v for k, v in keys.items() if v}  # a key never written has no row yet
    event.remove(store.engine, "before_cursor_execute", record)
    store.dispose()


def test_counts_add_up_for_any_key_text(database_url: str) -> None:
    """Keys travel as one JSON array: quotes, backslashes, non-ASCII and keys cut to the column's
    128 characters (two that differ only after it are one row, counted once each) come back as
    stored, and a second sync adds to the first."""
    store = SqlStore(database_url)
    upgrade(store.engine)
    counters = SqlRateCounters(store.engine)
    odd = ['cred:"quoted"', "cred:back\\slash", "addr:fe80::1%eth0", "cred:\u00e9t\u00e9", "x" * 130, "x" * 128 + "yz"]
    assert counters.add_and_read(9, dict.fromkeys(odd, 2)) == {**dict.fromkeys(odd[:4], 2), "x" * 128: 4}
    assert counters.add_and_read(9, {odd[0]: 1, odd[3]: 0}) == {odd[0]: 3, odd[3]: 2}
    assert counters.add_and_read(10, {odd[0]: 1}) == {odd[0]: 1}  # a new window starts from zero
    store.dispose()


def test_credential_key_never_holds_the_secret() -> None:
    token = b"Bearer mbagent.0123456789abcdef.s3cr3t-s3cr3t-s3cr3t"
    key = credential_key([(b"authorization", token)])
    assert key == "cred:mbagent.0123456789abcdef" and "s3cr3t" not in key


def test_http_429_with_retry_after_and_exempt_probes(tmp_path: Path) -> None:
    store = SqlStore(f"sqlite:///{tmp_path / 'rl.db'}")
    upgrade(store.engine)
    authority = Authority(store, FileKeyBackend(tmp_path, b"rate limit test"))
    _, admin = authority.init_root(key_type=KeyType.ECDSA_P256)
    app = create_app(authority, rate_limits=Limits(per_credential=3, per_address=100, window=60.0))
    with TestClient(app) as c:
        h = {"Authorization": f"Bearer {admin}"}
        codes = [c.get("/v1/clusters", headers=h).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        r = c.get("/v1/clusters", headers=h)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.headers["content-type"].startswith("application/problem+json") and r.json()["status"] == 429
        assert all(c.get("/healthz").status_code == 200 for _ in range(10))  # probes are never limited
        other = {"Authorization": "Bearer mbadmin.fedcba9876543210.not-a-real-token"}
        assert c.get("/v1/clusters", headers=other).status_code == 401  # another credential: own budget
    store.dispose()


def test_every_429_is_counted_as_rate_limited(tmp_path: Path) -> None:
    """The 429s the middleware answers before any handler (address limit, then the credential's
    spent limit) count in meshbridge_ca_errors_total{type="RateLimited"} like the handler's own, so
    the MeshbridgeCaRateLimited alert (deploy/prometheus) sees them."""
    store = SqlStore(f"sqlite:///{tmp_path / 'rl.db'}")
    upgrade(store.engine)
    authority = Authority(store, FileKeyBackend(tmp_path, b"rate limit test"))
    _, admin = authority.init_root(key_type=KeyType.ECDSA_P256)
    app = create_app(authority, rate_limits=Limits(per_credential=2, per_address=5, window=60.0))
    with TestClient(app) as c:
        h = {"Authorization": f"Bearer {admin}"}
        codes = [c.get("/v1/clusters", headers=h).status_code for _ in range(7)]
        assert codes == [200, 200, 429, 429, 429, 429, 429]
        refused = app.state.metrics.registry.get_sample_value("meshbridge_ca_errors_total", {"type": "RateLimited"})
        assert refused == 5
    store.dispose()
