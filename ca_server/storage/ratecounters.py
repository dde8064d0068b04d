"""The shared table behind the rate limiter: one upsert and one select per sync, per replica."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Engine, Integer, MetaData, String, Table, delete, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

_meta = MetaData()
rate_counters = Table(
    "rate_counters",
    _meta,
    Column("key", String(128), primary_key=True),
    Column("window", BigInteger, primary_key=True),
    Column("count", Integer, nullable=False),
)


class SqlRateCounters:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.postgres = engine.dialect.name == "postgresql"
        self._last_cleanup = 0

    def add_and_read(self, window: int, deltas: dict[str, int]) -> dict[str, int]:
        rows = [{"key": k[:128], "window": window, "count": v} for k, v in deltas.items()]
        ins = (pg_insert if self.postgres else sqlite_insert)(rate_counters).values(rows)
        stmt = ins.on_conflict_do_update(index_elements=["key", "window"],
                                         set_={"count": rate_counters.c.count + ins.excluded.count})
        with self.engine.begin() as conn:
            if not self.postgres:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            conn.execute(stmt)
            if window - self._last_cleanup > 60:
                conn.execute(delete(rate_counters).where(rate_counters.c.window < window - 10))
                self._last_cleanup = window
            got = conn.execute(select(rate_counters.c.key, rate_counters.c.count).where(
                rate_counters.c.window == window, rate_counters.c.key.in_([r["key"] for r in rows]))).all()
            if not self.postgres:
                conn.exec_driver_sql("COMMIT")
        return {k: int(c) for k, c in got}
