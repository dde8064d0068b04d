"""The shared table behind the rate limiter: one upsert and one select per sync, per replica."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy import Engine, bindparam, delete, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from ca_server.storage.tables import rate_counters


def _upsert(insert: Any) -> Any:
    ins = insert(rate_counters).values(key=bindparam("key"), window=bindparam("window"), count=bindparam("count"))
    return ins.on_conflict_do_update(
        index_elements=["key", "window"], set_={"count": rate_counters.c.count + ins.excluded.count}
    )


# built once: one cached statement whatever the number of keys (executemany, expanding IN)
_UPSERT = {"postgresql": _upsert(pg_insert), "sqlite": _upsert(sqlite_insert)}
_READ = select(rate_counters.c.key, rate_counters.c.count).where(
    rate_counters.c.window == bindparam("window"), rate_counters.c.key.in_(bindparam("keys", expanding=True))
)


class SqlRateCounters:
    def __init__(
        self, engine: Engine, *, writer_gate: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext
    ) -> None:
        """``writer_gate``: the store's SQLite writer serialisation, so this write queues with the
        others instead of meeting them in SQLite's sleeping busy handler."""
        self.engine = engine
        self.postgres = engine.dialect.name == "postgresql"
        self._upsert = _UPSERT["postgresql" if self.postgres else "sqlite"]
        self._gate = writer_gate
        self._last_cleanup = 0

    def add_and_read(self, window: int, deltas: dict[str, int]) -> dict[str, int]:
        rows = [{"key": k[:128], "window": window, "count": v} for k, v in deltas.items()]
        if not rows:
            return {}
        with self._gate(), self.engine.begin() as conn:
            if not self.postgres:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            conn.execute(self._upsert, rows)
            if window - self._last_cleanup > 60:
                conn.execute(delete(rate_counters).where(rate_counters.c.window < window - 10))
                self._last_cleanup = window
            got = conn.execute(_READ, {"window": window, "keys": [r["key"] for r in rows]}).all()
            if not self.postgres:
                conn.exec_driver_sql("COMMIT")
        return {k: int(c) for k, c in got}
