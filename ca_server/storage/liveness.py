"""Which pooled PostgreSQL connections are still open, without a round trip per checkout.

SQLAlchemy's ``pool_pre_ping`` sends a ping before every checkout that reuses a connection
(``_ConnectionFairy._checkout``, sqlalchemy/pool/base.py): one round trip for every transaction,
and on a busy server one more wait for the interpreter lock. Here a checkout looks instead at what
the connection's socket already says. A connection idle in the pool has nothing to read: the
server sends nothing unasked, except when it ends the session — a restart, a ``stop -m immediate``
(the kernel closes the socket) or ``pg_terminate_backend`` send an ErrorResponse (FATAL, 57P01) and
close it (PostgreSQL docs, "Protocol Flow: Termination"). A socket with something to read, or a
connection psycopg already knows is closed, is replaced: raising ``DisconnectionError`` from the
pool's ``checkout`` event makes the pool open a new one and retry (same function). A connection
idle longer than ``PING_AFTER`` is pinged as before, for a peer that went away without a word
(a NAT or firewall that dropped an idle flow); whatever slips through fails its first statement,
which SQLAlchemy recognises as a disconnect and answers by invalidating the pool.
"""

from __future__ import annotations

import select
import time
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.exc import DisconnectionError

PING_AFTER = 10.0  # seconds idle in the pool after which a checkout pings the server
_IDLE_SINCE = "meshbridge.idle_since"  # the connection record's info key: when it was checked in


def watch(engine: Engine) -> None:
    """Check each PostgreSQL connection the pool hands out (instead of ``pool_pre_ping``)."""
    ping = engine.dialect.do_ping  # pool_pre_ping's own ping (autocommit: no transaction left open)

    def checked_out(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.pop(_IDLE_SINCE, None)
        if idle_since is None:  # just opened
            return
        if dbapi_conn.closed or dbapi_conn.broken or _has_input(dbapi_conn.pgconn.socket):
            raise DisconnectionError("the database ended this connection while it was idle in the pool")
        if time.monotonic() - idle_since > PING_AFTER:
            try:
                ping(dbapi_conn)
            except Exception as exc:
                raise DisconnectionError("the database did not answer a ping") from exc

    event.listen(engine, "checkin", _checked_in)
    event.listen(engine, "checkout", checked_out)


def _checked_in(_dbapi_conn: Any, record: Any) -> None:
    if record is not None:
        record.info[_IDLE_SINCE] = time.monotonic()


def _has_input(fd: int) -> bool:
    """Whether the socket has something to read (or is at its end, or failed) now, without waiting.
    poll, not select: a server with a fleet's connections open has descriptors past select's
    FD_SETSIZE (1024), which select refuses (ValueError)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))
