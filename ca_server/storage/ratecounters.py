"""The shared table behind the rate limiter: per sync, per replica, one set-based upsert of the
counts that moved and one read of the totals of every key this replica saw in the window.

Each is one statement whatever the number of keys, with the keys (and counts) passed as one
parameter: a JSON array, read by the database's own JSON functions. The first
version ran an ``executemany`` of one upsert per key (every key seen in the window, moved or not)
and an ``IN`` list of one bound parameter per key: at 10,000 active agents a sync cost about
300 ms of Python CPU on PostgreSQL and 100 ms on SQLite, holding the SQLite writer all along, five
times a second (``bench/rate_counters.py``; ``bench/RESULTS.md``, "Rate-limit sync, answers sent
when whole").
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy import JSON, Engine, Integer, String, bindparam, cast, delete, func, literal_column, select, true
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from ca_server.storage.tables import rate_counters

_KEY_CHARS = 128  # the column's length


def _statements(
    insert: Callable[[Any], Any], elements: Callable[[Any], Any], item: Callable[[Any, int | None], Any]
) -> tuple[Any, Any]:
    """The upsert and the read, given the dialect's ``insert``, its table of a JSON array's
    elements (``elements(param)``, one column ``value``) and its accessor of an element's item
    (``item(value, None)``: a string element as text)."""
    pairs = elements(bindparam("pairs", type_=String))
    window = bindparam("window", type_=rate_counters.c.window.type)
    moved = select(item(pairs.c.value, 0), window, cast(item(pairs.c.value, 1), Integer)).where(true())
    upsert = insert(rate_counters).from_select(["key", "window", "count"], moved)
    upsert = upsert.on_conflict_do_update(
        index_elements=["key", "window"], set_={"count": rate_counters.c.count + upsert.excluded.count}
    )
    seen = elements(bindparam("seen", type_=String))
    read = select(rate_counters.c.key, rate_counters.c.count).where(
        rate_counters.c.window == window, rate_counters.c.key.in_(select(item(seen.c.value, None)))
    )
    return upsert, read


def _pg_elements(param: Any) -> Any:
    # json_array_elements: "Expands the top-level JSON array into a set of JSON values"
    return func.json_array_elements(cast(param, JSON)).table_valued("value").render_derived()


def _pg_item(value: Any, index: int | None) -> Any:
    # ->> int: "Extracts n'th element of JSON array ... as text"; #>> '{}' the scalar itself as text
    return value.op("->>")(index) if index is not None else value.op("#>>")(literal_column("'{}'"))


def _sqlite_elements(param: Any) -> Any:
    # json_each of a JSON array: one row per element, its value in the column ``value``
    return func.json_each(param).table_valued("value")


def _sqlite_item(value: Any, index: int | None) -> Any:
    return func.json_extract(value, f"$[{index}]") if index is not None else value


# built once: one cached statement whatever the number of keys. A JSON array is the parameter on
# both engines: psycopg dumps a Python list of str as a text array, quoting each element in Python
# (a regular expression per element: 23 ms for 10,000 keys), where json.dumps and the database's
# JSON parser are C. (SQLite: the WHERE of the INSERT .. SELECT is the one
# sqlite.org/lang_upsert.html asks for, "to avoid a parsing ambiguity".)
_STATEMENTS = {
    "postgresql": _statements(pg_insert, _pg_elements, _pg_item),
    "sqlite": _statements(sqlite_insert, _sqlite_elements, _sqlite_item),
}


class SqlRateCounters:
    def __init__(
        self, engine: Engine, *, writer_gate: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext
    ) -> None:
        """``writer_gate``: the store's SQLite writer serialisation, so this write queues with the
        others instead of meeting them in SQLite's sleeping busy handler."""
        self.engine = engine
        self.postgres = engine.dialect.name == "postgresql"
        self._upsert, self._read = _STATEMENTS["postgresql" if self.postgres else "sqlite"]
        self._gate = writer_gate
        self._last_cleanup = 0

    def add_and_read(self, window: int, deltas: dict[str, int]) -> dict[str, int]:
        moved = _merged(deltas)
        seen = sorted({key[:_KEY_CHARS] for key in deltas})
        if not seen:
            return {}
        with self._gate(), self.engine.begin() as conn:
            if not self.postgres:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            if moved:
                conn.execute(self._upsert, {"window": window, "pairs": json.dumps(moved)})
            if window - self._last_cleanup > 60:
                conn.execute(delete(rate_counters).where(rate_counters.c.window < window - 10))
                self._last_cleanup = window
            got = conn.execute(self._read, {"window": window, "seen": json.dumps(seen)}).all()
            if not self.postgres:
                conn.exec_driver_sql("COMMIT")
        return {k: int(c) for k, c in got}


def _merged(deltas: dict[str, int]) -> list[tuple[str, int]]:
    """The non-zero counts by key as stored (cut to the column's length), sorted: one row per key
    in a statement (an upsert may not touch a row twice), and every replica locks rows in the
    same order (no deadlock between two replicas' syncs)."""
    merged: dict[str, int] = {}
    for key, count in deltas.items():
        if count:
            stored = key[:_KEY_CHARS]
            merged[stored] = merged.get(stored, 0) + count
    return sorted(merged.items())
