"""Issue 15 item 1: a pooled PostgreSQL connection is handed out without a round trip
(``ca_server/storage/liveness.py``, in place of ``pool_pre_ping``), and one the server ended while
it sat in the pool is still never handed out."""

from __future__ import annotations

import itertools
import os
import resource
import tempfile
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import text

from ca_server.storage import liveness
from ca_server.storage.migrate import upgrade
from ca_server.storage.repository import SqlStore
from tests.support.pgserver import PgServer

_names = itertools.count(1)


@pytest.fixture
def store(pg_server: PgServer) -> Iterator[SqlStore]:
    s = SqlStore(pg_server.create_database(f"liveness_{next(_names)}"))
    upgrade(s.engine)
    yield s
    s.dispose()


def _pooled(store: SqlStore) -> tuple[Any, int]:
    """The one connection the pool holds after a read, and its backend's pid."""
    store.engine.dispose()
    with store.read() as tx:
        pid = int(tx.c.execute(text("SELECT pg_backend_pid()")).scalar_one())
        raw = tx.c.connection.driver_connection
    return raw, pid


def _messages_sent(raw: Any, action: Any) -> list[str]:
    """The protocol messages libpq sends on ``raw`` while ``action()`` runs."""
    with tempfile.TemporaryFile() as out:
        raw.pgconn.trace(out.fileno())
        raw.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
        try:
            action()
        finally:
            raw.pgconn.untrace()
        out.seek(0)
        lines = [line.split("\t") for line in out.read().decode().splitlines()]
    return [m[2] for m in lines if len(m) > 2 and m[0] == "F"]


def _checkout(store: SqlStore) -> Any:
    def action() -> None:
        with store.engine.connect() as conn:
            action.raw = conn.connection.driver_connection  # type: ignore[attr-defined]

    return action


def test_a_pooled_connection_is_handed_out_without_a_round_trip(store: SqlStore) -> None:
    """pool_pre_ping sent a ping (a Query message, and a wait for its answer) before every checkout."""
    raw, _ = _pooled(store)
    checkout = _checkout(store)
    assert _messages_sent(raw, checkout) == []
    assert checkout.raw is raw  # the same connection, reused


def test_a_connection_idle_past_the_ping_interval_is_pinged(store: SqlStore, monkeypatch: pytest.MonkeyPatch) -> None:
    raw, _ = _pooled(store)
    monkeypatch.setattr(liveness, "PING_AFTER", 0.0)
    assert "Query" in _messages_sent(raw, _checkout(store))


@pytest.mark.parametrize("ended_by", ["pg_terminate_backend", "ping"])
def test_a_connection_the_server_ended_in_the_pool_is_replaced(
    store: SqlStore, pg_server: PgServer, monkeypatch: pytest.MonkeyPatch, ended_by: str
) -> None:
    """The server ended the pooled connection's session (as a restart or a failover does): the next
    transaction gets a new connection and succeeds, it is not the one that fails."""
    raw, pid = _pooled(store)
    if ended_by == "ping":  # nothing to read on the socket yet: only the ping finds out
        monkeypatch.setattr(liveness, "_has_input", lambda fd: False)
        monkeypatch.setattr(liveness, "PING_AFTER", 0.0)
    pg_server.psql(f"SELECT pg_terminate_backend({pid}, 5000)")  # returns once it ended
    with store.read() as tx:
        assert int(tx.c.execute(text("SELECT pg_backend_pid()")).scalar_one()) != pid
    with store.write() as tx:
        tx.bump_revision()
    assert raw.closed


def test_connections_numbered_past_select_s_limit_are_checked_too(store: SqlStore, pg_server: PgServer) -> None:
    """A server with a fleet's sockets open numbers its database connections past 1024, where
    ``select`` refuses a descriptor (ValueError: every status report of a 1,000-agent fleet event
    answered 500 with the first version of this check)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    store.engine.dispose()  # its descriptors freed first, else the next connection takes theirs
    fillers = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        raw, pid = _pooled(store)
        assert raw.pgconn.socket > 1024
        checkout = _checkout(store)
        checkout()
        assert checkout.raw is raw
        pg_server.psql(f"SELECT pg_terminate_backend({pid}, 5000)")
        with store.read() as tx:
            assert int(tx.c.execute(text("SELECT pg_backend_pid()")).scalar_one()) != pid
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
