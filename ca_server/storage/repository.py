"""SQL implementation of the core's Store/Tx ports (SQLAlchemy Core, SQLite or PostgreSQL).

Database errors are translated here, once: a database that cannot be reached, is read-only or is
full becomes ``Unavailable`` (503); a uniqueness race becomes ``Conflict``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from collections import namedtuple
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

from sqlalchemy import (
    ARRAY,
    JSON,
    Column,
    Connection,
    Dialect,
    Engine,
    String,
    Table,
    Text,
    any_,
    bindparam,
    column,
    create_engine,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy import cast as sql_cast
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Row
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, PendingRollbackError
from sqlalchemy.pool import QueuePool

from ca_server.core.audit import GENESIS, AuditKey, EntryHasher, entry_hash
from ca_server.core.errors import CAError, Conflict, Unavailable
from ca_server.core.models import (
    AdminToken,
    AuditEntry,
    BootstrapToken,
    CertificateRecord,
    Cluster,
    ClusterStatus,
    CRLRecord,
    Root,
    RootStatus,
)
from ca_server.core.ports import Tx
from ca_server.storage import liveness
from ca_server.storage import tables as t
from ca_server.storage.joined import Joiner, Replay
from ca_server.storage.ratecounters import SqlRateCounters
from ca_server.storage.readahead import CANDIDATES_AHEAD, PROOF_CANDIDATES, Pki, ReadAhead

T = TypeVar("T")


def sqlite_url(data_dir: Path) -> str:
    return f"sqlite:///{(data_dir / 'meshbridge.db').resolve()}"


WAL_BACKSTOP_PAGES = 20_000  # ~80 MB of WAL


PG_POOL = 20  # PostgreSQL connections a process keeps open
PG_OVERFLOW = 10  # opened past them under a burst, closed when returned


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            poolclass=QueuePool,
            pool_size=8,
            max_overflow=8,
            connect_args={"check_same_thread": False, "timeout": 30},
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (BEGIN IMMEDIATE for writes)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            # `serve` checkpoints the WAL from a background thread every second (checkpoint()),
            # off the request path; this automatic one, run by whichever commit crosses it, is
            # only the backstop for processes that do not (CLI, tests)
            cur.execute(f"PRAGMA wal_autocheckpoint={WAL_BACKSTOP_PAGES}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    # kept open: the agents' read threads (READ_THREADS), the renewals' threads reading before their
    # group commit (a proof's candidates, on a process that did not issue the newest intermediate),
    # the group commit and the revision watcher. With 10, a fleet's renewal wave opened ~35
    # connections a second past the pool (each a new PostgreSQL backend, its statements prepared
    # again) and PostgreSQL spent 0.46 cores against 0.2 (bench/RESULTS.md)
    engine = create_engine(url, pool_size=PG_POOL, max_overflow=PG_OVERFLOW)
    liveness.watch(engine)  # what pool_pre_ping did, without its round trip per checkout
    event.listen(engine, "after_cursor_execute", _settle_in_pipeline)
    return engine


PIPELINE = "meshbridge.pipeline"  # the connection's info key holding psycopg's Pipeline while SqlTx.pipelined


def _settle_in_pipeline(conn: Connection, cursor: Any, *_: Any) -> None:
    """A statement SQLAlchemy Core ran in pipeline mode: wait for its answer before Core reads the
    result's description (in pipeline mode psycopg has none until the answer arrived)."""
    pipeline = conn.info.get(PIPELINE)
    if pipeline is not None:
        pipeline.sync()


def _root(r: Row[Any]) -> Root:
    return Root(
        id=r.id,
        status=RootStatus(r.status),
        cert_pem=r.cert_pem,
        chain_pem=r.chain_pem,
        key_ref=r.key_ref,
        not_after=r.not_after,
        created_at=r.created_at,
        anchor_pem=r.anchor_pem,
        endorsement_pem=r.endorsement_pem,
    )


def _cluster(r: Row[Any]) -> Cluster:
    return Cluster(
        name=r.name,
        trust_domain=r.trust_domain,
        status=ClusterStatus(r.status),
        generation=r.generation,
        rotation_pending=bool(r.rotation_pending),
        gateway=r.gateway,
        created_at=r.created_at,
        agent_token_id=r.agent_token_id,
        agent_token_hash=r.agent_token_hash,
        exports=r.exports,
        agent_status=r.agent_status,
        revoked_at=r.revoked_at,
        proof_floor=r.proof_floor,
    )


def _crl(r: Row[Any]) -> CRLRecord:
    return CRLRecord(r.root_id, r.number, bytes(r.der), r.pem, r.this_update, r.next_update)


def _cert(r: Row[Any]) -> CertificateRecord:
    return CertificateRecord(
        serial=r.serial,
        cluster=r.cluster,
        root_id=r.root_id,
        generation=r.generation,
        cert_pem=r.cert_pem,
        public_key_fp=r.public_key_fp,
        not_before=r.not_before,
        not_after=r.not_after,
        issued_at=r.issued_at,
        revoked_at=r.revoked_at,
        revocation_reason=r.revocation_reason,
        id=r.id,
    )


def _audit(r: Row[Any]) -> AuditEntry:
    return AuditEntry(
        id=r.id,
        at=r.at,
        actor=r.actor,
        action=r.action,
        subject=r.subject,
        details=json.loads(r.details),
        prev_hash=r.prev_hash,
        hash=r.hash,
    )


def _candidate_terms(floor: Any, now: Any | None) -> list[Any]:
    """What makes a certificate one of its cluster's proof candidates (``SqlTx.proof_candidates``):
    unrevoked, with an id at or above the cluster's proof ``floor`` and, with ``now``, unexpired."""
    cert = t.certificates.c
    terms = [cert.revoked_at.is_(None), cert.id >= floor]
    return terms if now is None else [*terms, cert.not_after > now]


def _cluster_floor() -> Any:
    """The certificate's cluster's proof floor, in a statement joining ``clusters``."""
    return func.coalesce(t.clusters.c.proof_floor, 0)


def _read_ahead_statements() -> tuple[Any, Any]:
    """A group commit's reads for all its jobs (``SqlTx.read_ahead``; PostgreSQL only: ``= ANY(array)``
    gives one statement text whatever the batch's size, so psycopg prepares it once): the clusters,
    locked, and each one's newest ``CANDIDATES_AHEAD`` unrevoked certificates at or above its proof
    floor (expired ones included: each job filters by its own clock)."""
    names = any_(bindparam("names", type_=ARRAY(String)))
    clusters = select(t.clusters).where(t.clusters.c.name == names).order_by(t.clusters.c.name).with_for_update()
    cert = t.certificates.c
    ranked = (
        select(
            t.certificates,
            func.row_number().over(partition_by=cert.cluster, order_by=cert.id.desc()).label("ahead_rank"),
        )
        .join(t.clusters, t.clusters.c.name == cert.cluster)
        .where(cert.cluster == names, *_candidate_terms(_cluster_floor(), None))
        .subquery()
    )
    candidates = select(*(ranked.c[col.name] for col in t.certificates.c)).where(
        ranked.c.ahead_rank <= CANDIDATES_AHEAD
    )
    return clusters, candidates


class _Q:
    """Statements of the hot paths (authentication, renewal, audit), built once: building a
    statement costs several times more than executing its cached compiled form."""

    roots = select(t.roots)
    crls = select(t.crls)
    server_names = select(t.server_names.c.name).order_by(t.server_names.c.name)
    cluster = select(t.clusters).where(t.clusters.c.name == bindparam("name"))
    cluster_for_update = cluster.with_for_update()
    cluster_by_token = select(t.clusters).where(t.clusters.c.agent_token_id == bindparam("token_id"))
    save_cluster = (
        update(t.clusters)
        .where(t.clusters.c.name == bindparam("b_name"))
        .values({c.name: bindparam(c.name) for c in t.clusters.c if c.name != "name"})
    )
    set_agent_status = (
        update(t.clusters).where(t.clusters.c.name == bindparam("b_name")).values(agent_status=bindparam("b_status"))
    )
    certificate = select(t.certificates).where(t.certificates.c.serial == bindparam("serial"))
    add_certificate_values = insert(t.certificates).values(
        {c.name: bindparam(c.name) for c in t.certificates.c if c.name != "id"}
    )
    audit_head = select(t.meta).where(t.meta.c.key == "audit_head")
    audit_head_for_update = audit_head.with_for_update()
    add_audit_values = insert(t.audit).values({c.name: bindparam(c.name) for c in t.audit.c})
    set_audit_head = (
        update(t.meta)
        .where(t.meta.c.key == "audit_head")
        .values(int_value=bindparam("new_id"), str_value=bindparam("new_hash"))
    )
    revision = select(t.meta.c.int_value).where(t.meta.c.key == "revision")
    revision_and_audit_head = select(t.meta).where(t.meta.c.key.in_(["revision", "audit_head"]))
    proof_candidates = (
        select(t.certificates)
        .where(
            t.certificates.c.cluster == bindparam("cluster"), *_candidate_terms(bindparam("floor"), bindparam("now"))
        )
        .order_by(t.certificates.c.id.desc())
        .limit(PROOF_CANDIDATES)
    )
    latest_certificate = (
        select(t.certificates)
        .where(t.certificates.c.cluster == bindparam("cluster"))
        .order_by(t.certificates.c.id.desc())
        .limit(1)
    )
    bump_revision = update(t.meta).where(t.meta.c.key == "revision").values(int_value=t.meta.c.int_value + 1)

    # a group commit's reads for all its jobs (SqlTx.read_ahead)
    clusters_ahead, candidates_ahead = _read_ahead_statements()


# where a group commit's job began: the audit head, the revision read, whether the head row holds it,
# whether the revision is to be bumped, how many writes were deferred
_Mark = tuple[tuple[int, str] | None, int | None, bool, bool, int]

_JSON_SCALARS = (str, int, bool, type(None))  # values that come back from JSON as they went in


class _Prepared:
    """A hot-path statement compiled once for a dialect and run on the DBAPI cursor, with the
    column types' own bind and result conversions: SQLAlchemy's per-execution machinery costs
    several times what SQLite spends running the statement, and as much CPU as a PostgreSQL round
    trip. The SQL is still SQLAlchemy's (built from the ``_Q`` statements), so there is one
    definition of each query; driver errors are translated like SQLAlchemy's (``_tx``).

    SQLAlchemy internals it relies on: the compiled statement's ``positiontup``, ``binds`` and
    ``construct_params()``, and ``TypeEngine.dialect_impl()``'s ``bind_processor()`` and
    ``result_processor()``. ``SqlStore(prepared_statements=False)`` does without it."""

    def __init__(self, stmt: Any, dialect: Dialect) -> None:
        self.compiled = stmt.compile(dialect=dialect, compile_kwargs={"render_postcompile": True})
        self.sql = self.compiled.string
        self.order = list(self.compiled.positiontup or []) if dialect.positional else None
        self.bind_procs = [
            (name, proc)
            for name, bp in self.compiled.binds.items()
            if (proc := bp.type.dialect_impl(dialect).bind_processor(dialect)) is not None
        ]
        cols = list(stmt.selected_columns) if hasattr(stmt, "selected_columns") else []
        self.row_type = namedtuple("_Row", [c.key for c in cols]) if cols else None
        self.result_procs = [
            (i, proc)
            for i, c in enumerate(cols)
            if (proc := c.type.dialect_impl(dialect).result_processor(dialect, None)) is not None
        ]

    def execute(self, dbapi_conn: Any, values: dict[str, Any]) -> Any:
        params = self.compiled.construct_params(values)
        for name, proc in self.bind_procs:
            params[name] = proc(params[name])
        cur = dbapi_conn.cursor()
        cur.execute(self.sql, [params[n] for n in self.order] if self.order is not None else params)
        return cur

    def rows(self, dbapi_conn: Any, values: dict[str, Any]) -> list[Any]:
        return self.fetched(self.execute(dbapi_conn, values))

    def first(self, dbapi_conn: Any, values: dict[str, Any]) -> Any:
        rows = self.rows(dbapi_conn, values)
        return rows[0] if rows else None

    def fetched(self, cur: Any) -> list[Any]:
        """The rows of ``execute``'s cursor, converted."""
        assert self.row_type is not None
        out = []
        for raw in cur.fetchall():
            if self.result_procs:
                raw = list(raw)
                for i, proc in self.result_procs:
                    raw[i] = proc(raw[i])
            out.append(self.row_type(*raw))
        return out


_HOT = (
    "cluster",
    "cluster_for_update",
    "cluster_by_token",
    "certificate",
    "revision",
    "revision_and_audit_head",
    "audit_head",
    "audit_head_for_update",
    "proof_candidates",
    "add_certificate_values",
    "add_audit_values",
    "set_audit_head",
    "save_cluster",
    "set_agent_status",
    "bump_revision",
)


_HOT_POSTGRES = ("clusters_ahead", "candidates_ahead", "roots", "crls", "server_names")


def _prepare_hot(dialect: Dialect) -> dict[str, _Prepared]:
    hot = {name: _Prepared(getattr(_Q, name), dialect) for name in _HOT}
    if dialect.name == "postgresql":
        hot |= {name: _Prepared(getattr(_Q, name), dialect) for name in _HOT_POSTGRES}
        hot |= {f"{name}*": _Prepared(_multi_row(name), dialect) for name in _MULTI_ROW}
    return hot


class _Hot(Protocol):
    """Runs the hot-path statements (``_HOT``, by their ``_Q`` name) of one transaction."""

    def first(self, name: str, values: dict[str, Any]) -> Any: ...
    def rows(self, name: str, values: dict[str, Any]) -> list[Any]: ...
    def run(self, name: str, values: dict[str, Any]) -> int:
        """Rows the statement changed (-1 in a pipeline, before its sync)."""
        ...

    def together(self, calls: list[tuple[str, dict[str, Any]]]) -> list[list[Any]]:
        """Each statement's rows, every statement sent before any answer is read: in psycopg's
        pipeline mode, one wait for all of them."""
        ...

    def write_rows(self, name: str, rows: list[dict[str, Any]]) -> None:
        """The ``name`` write (``_MULTI_ROW``) of every row, as one statement."""
        ...


# a group commit's deferred writes, each sent as one statement for the whole batch: the table, the
# columns a row carries, and for an update the column that picks the row (bound as ``b_<column>``)
_MULTI_ROW: dict[str, tuple[Table, list[Column[Any]], str | None]] = {
    "save_cluster": (t.clusters, [c for c in t.clusters.c if c.name != "name"], "name"),
    "add_certificate_values": (t.certificates, [c for c in t.certificates.c if c.name != "id"], None),
    "add_audit_values": (t.audit, list(t.audit.c), None),
}


@lru_cache(maxsize=len(_MULTI_ROW))
def _multi_row(name: str) -> Any:
    """``name``'s write of any number of rows from one JSON array parameter, ``rows`` (PostgreSQL's
    ``jsonb_to_recordset``, each field cast to its column's type): one short statement whatever the
    batch's size, which psycopg converts once and may prepare (it converts a statement longer than
    4,096 bytes or with over 50 parameters, a VALUES list of a batch, again at every execution:
    ``MAX_CACHED_STATEMENT_LENGTH`` / ``_PARAMS`` in psycopg/_queries.py). An insert, or an
    ``UPDATE … FROM`` the rows joined on the key column (each row must name a different one). A JSON
    column's field is the JSON's text, cast to the column: ``jsonb`` would reorder its keys, and the
    text is kept exactly as a single row's write stores it."""
    table, columns, key = _MULTI_ROW[name]
    fields = [column(c.name, Text() if isinstance(c.type, JSON) else c.type) for c in columns]
    if key is not None:
        fields.insert(0, column(f"b_{key}", table.c[key].type))
    rows = (
        func.jsonb_to_recordset(bindparam("rows", type_=JSONB))
        .table_valued(*fields)
        .render_derived(name="r", with_types=True)
    )
    values = {c.name: sql_cast(rows.c[c.name], c.type) if isinstance(c.type, JSON) else rows.c[c.name] for c in columns}
    if key is None:
        return insert(table).from_select(list(values), select(*values.values()))
    return update(table).where(table.c[key] == rows.c[f"b_{key}"]).values(values)


def _json_rows(name: str, rows: list[dict[str, Any]], dialect: Dialect) -> dict[str, Any]:
    """``_multi_row``'s parameter: each value as its column's bind conversion gives it to the
    driver (a timestamp as naive UTC), a timestamp then in ISO 8601, which PostgreSQL's cast reads
    back to the microsecond; a JSON column's value as the text a single row's write sends."""
    procs = _json_binds(name, dialect)
    return {"rows": [{key: _jsonable(procs[key](v) if key in procs else v) for key, v in row.items()} for row in rows]}


@lru_cache(maxsize=2 * len(_MULTI_ROW))
def _json_binds(name: str, dialect: Dialect) -> dict[str, Callable[[Any], Any]]:
    _, columns, _ = _MULTI_ROW[name]
    return {c.name: proc for c in columns if (proc := _json_bind(c, dialect)) is not None}


def _json_bind(c: Column[Any], dialect: Dialect) -> Callable[[Any], Any] | None:
    if isinstance(c.type, JSON):
        return json.dumps  # what psycopg's Json dumper sends for the column's own bind (None: JSON null)
    return c.type.dialect_impl(dialect).bind_processor(dialect)


def _jsonable(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


class _HotOnDBAPI:
    """The speed-up: the statements compiled once (``_Prepared``), run on the DBAPI connection."""

    def __init__(self, prepared: dict[str, _Prepared], conn: Connection) -> None:
        self._prepared = prepared
        self._raw = conn.connection.driver_connection
        self._dialect = conn.dialect

    def first(self, name: str, values: dict[str, Any]) -> Any:
        return self._prepared[name].first(self._raw, values)

    def rows(self, name: str, values: dict[str, Any]) -> list[Any]:
        return self._prepared[name].rows(self._raw, values)

    def run(self, name: str, values: dict[str, Any]) -> int:
        return int(self._prepared[name].execute(self._raw, values).rowcount)

    def together(self, calls: list[tuple[str, dict[str, Any]]]) -> list[list[Any]]:
        sent = [(self._prepared[name], self._prepared[name].execute(self._raw, values)) for name, values in calls]
        return [stmt.fetched(cur) for stmt, cur in sent]

    def write_rows(self, name: str, rows: list[dict[str, Any]]) -> None:
        self._prepared[f"{name}*"].execute(self._raw, _json_rows(name, rows, self._dialect))


class _HotThroughCore:
    """The plain path: the same ``_Q`` statements executed by SQLAlchemy Core."""

    def __init__(self, conn: Connection) -> None:
        self._c = conn

    def first(self, name: str, values: dict[str, Any]) -> Any:
        return self._c.execute(getattr(_Q, name), values).first()

    def rows(self, name: str, values: dict[str, Any]) -> list[Any]:
        return list(self._c.execute(getattr(_Q, name), values))

    def run(self, name: str, values: dict[str, Any]) -> int:
        return self._c.execute(getattr(_Q, name), values).rowcount

    def together(self, calls: list[tuple[str, dict[str, Any]]]) -> list[list[Any]]:
        return [self.rows(name, values) for name, values in calls]  # Core waits for each

    def write_rows(self, name: str, rows: list[dict[str, Any]]) -> None:
        self._c.execute(_multi_row(name), _json_rows(name, rows, self._c.dialect))


class _Deferring:
    """A group commit's statements while its jobs run with their writes deferred (``SqlTx.join``):
    the writes below are kept, in order, to be sent by ``before_commit``; anything else would need
    the database now, so the batch is run again with each job's writes settled in turn."""

    WRITES = ("save_cluster", "add_certificate_values", "add_audit_values")  # the order they are sent in

    def __init__(self) -> None:
        self.writes: list[tuple[str, dict[str, Any]]] = []

    def first(self, name: str, values: dict[str, Any]) -> Any:
        raise Replay(f"{name}: not read ahead")

    def rows(self, name: str, values: dict[str, Any]) -> list[Any]:
        raise Replay(f"{name}: not read ahead")

    def together(self, calls: list[tuple[str, dict[str, Any]]]) -> list[list[Any]]:
        raise Replay("a read not made ahead")

    def run(self, name: str, values: dict[str, Any]) -> int:
        if name not in self.WRITES:
            raise Replay(f"{name}: not deferred")
        self.writes.append((name, values))
        return -1

    def write_rows(self, name: str, rows: list[dict[str, Any]]) -> None:
        raise Replay(f"{name}: not deferred")


class _NoStatements:
    """The transaction's connection while its jobs' writes are deferred: any statement outside the
    hot ones (say, a read of a cluster the batch did not read ahead) needs the database now."""

    def __getattr__(self, name: str) -> Any:
        raise Replay(f"connection.{name} while writes are deferred")


class SqlTx:
    def __init__(
        self,
        conn: Connection,
        *,
        postgres: bool,
        prepared: dict[str, _Prepared] | None,
        hasher: EntryHasher = entry_hash,
        write: bool = False,
        audited: bool = True,
    ) -> None:
        """``prepared``: the store's compiled hot statements, or None to run them through Core;
        ``hasher``: how appended audit entries are hashed (keyed, or 0.1.0's unkeyed scheme);
        ``write``: an audited write transaction (it reads the revision once: no other writer can
        change it); ``audited=False``: a write that may neither append to the audit chain nor move
        the revision (on PostgreSQL it does not hold the audit head's lock they need)."""
        self.c = conn
        self._writing = write
        self._audited = audited
        self.postgres = postgres
        self._hasher = hasher
        self._dbapi: Any = conn.dialect.loaded_dbapi
        self.audit_head: tuple[int, str] | None = None  # (id, hash) when this transaction holds it locked
        self._hot: _Hot = _HotOnDBAPI(prepared, conn) if prepared is not None else _HotThroughCore(conn)
        self._revision: int | None = None  # read once per write transaction (see get_revision)
        self._bump = False  # the fleet revision moves by one when this transaction commits
        self._pipeline: Any = None  # psycopg's Pipeline while ``pipelined``
        self._joined = False  # a group commit's transaction: the audit head row is written once, at the end
        self._head_written = True  # the audit head row holds self.audit_head
        self._head_locked = False  # this transaction holds the audit head's row lock
        self._ahead = ReadAhead()  # a group commit's reads for all its jobs (read_ahead)
        self._defer_jobs = False  # a group commit's first try: its jobs' writes deferred (join)
        self._deferring: _Deferring | None = None  # while they are
        self._live: tuple[Connection, _Hot] | None = None  # the connection and statements meanwhile set aside
        self.sent_deferred = False  # the deferred writes were sent (unanswered until the commit's Sync)
        self._pki_known: int | None = None  # the revision whose roots, CRLs, server names the process has
        self.pki_revision: int | None = None  # the same once this commits, when known (before_commit)

    def lock_audit_head(self) -> None:
        """PostgreSQL: serialise writers on the audit head's row lock (a linear chain across
        replicas); the locked row is kept for the first audit entry, saving a second read."""
        self._hold_head(self._hot.first("audit_head_for_update", {}))

    def _hold_head(self, head: Any) -> None:
        self._head_locked = True
        if head is not None:
            self.audit_head = (head.int_value, head.str_value)

    # group commit (storage/joined.py)
    def join(self, *, deferred: bool = False, pki_known: int | None = None) -> SqlTx:
        """Make this the transaction of a group commit (``Joiner``): jobs run in savepoints and the
        audit head row is written once, by ``before_commit``. ``deferred`` (PostgreSQL): from the
        end of ``read_ahead`` the jobs may only read what it read and their writes (``_Deferring``)
        are kept for ``before_commit`` to send, a statement per kind for the whole batch, and
        settle before the COMMIT; their savepoints are marks in that list. Whatever else a job
        needs, or a refusal of the writes, raises ``Replay`` before anything is committed.
        ``pki_known``: the revision whose roots, CRLs and server names the process holds (the
        previous batch's ``pki_revision``): ``read_ahead`` reads them when the revision moved."""
        self._joined = True
        self._defer_jobs = deferred and self.postgres
        self._pki_known = pki_known
        return self

    def read_ahead(self, clusters: Collection[str]) -> None:
        """PostgreSQL: read the ``clusters`` (locked, in name order: the same order every batch takes
        them) and their proof candidates, two statements sent together, for the jobs of a group
        commit about to run: ``get_cluster`` and ``proof_candidates`` answer from them until this
        transaction changes them (``readahead.ReadAhead``). A transaction that does not hold the
        audit head's lock yet (``SqlStore._joined_write``) takes it in the same go, first (every
        writer takes it before any row lock), with the revision. SQLite has no group commit: each
        renewal reads its own."""
        if not self.postgres:
            return
        names = sorted(set(clusters))
        locking = self._audited and not self._head_locked
        calls: list[tuple[str, dict[str, Any]]] = [("audit_head_for_update", {}), ("revision", {})] if locking else []
        if names:
            calls += [("clusters_ahead", {"names": names}), ("candidates_ahead", {"names": names})]
        answers = self._hot.together(calls)
        if locking:
            head, revision = answers.pop(0), answers.pop(0)
            self._hold_head(head[0] if head else None)
            self._revision = int(revision[0].int_value)
        if names:
            found, held = answers
            self._ahead.hold([_cluster(r) for r in found], [_cert(r) for r in held])
        if locking and self._defer_jobs and self._revision != self._pki_known:
            self._read_pki_ahead()
        if self._defer_jobs:
            self._live, self._deferring = (self.c, self._hot), _Deferring()
            self.c, self._hot = cast(Connection, _NoStatements()), self._deferring

    def _read_pki_ahead(self) -> None:
        """The roots, CRLs and server names, for the jobs of a group commit whose writes are deferred
        (none of those can change them), when the fleet revision moved since the process last had
        them (``join``'s ``pki_known``): a second wait, in a batch after another replica's (one
        replica's own batches carry them to the revision they commit: ``pki_revision``)."""
        roots, crls, names = self._hot.together([("roots", {}), ("crls", {}), ("server_names", {})])
        self._ahead.hold_pki(Pki(tuple(map(_root, roots)), tuple(map(_crl, crls)), tuple(r.name for r in names)))

    def _deferred_writes(self) -> list[tuple[str, dict[str, Any]]]:
        """End deferring: the connection and statements back, the writes kept meanwhile."""
        deferring, live = self._deferring, self._live
        if deferring is None or live is None:
            return []
        self.c, self._hot = live
        self._deferring = self._live = None
        return deferring.writes

    def savepoint(self) -> _Mark:
        deferring = self._deferring
        if deferring is None:
            self._driver_execute("SAVEPOINT joined")
        kept = len(deferring.writes) if deferring is not None else 0
        return self.audit_head, self._revision, self._head_written, self._bump, kept

    def rollback_to(self, mark: _Mark) -> None:
        self.audit_head, self._revision, self._head_written, self._bump, kept = mark
        if self._deferring is None:
            # to the newest savepoint of that name: the one the failed job began with. PostgreSQL keeps
            # older savepoints of a reused name and rolls back to the most recent one (SQL reference,
            # SAVEPOINT: "If savepoints with the same name already exist, they will be inaccessible
            # until newer identically-named savepoints are released"), so a job's savepoint is never
            # released (that would cost a round trip); they all end with the transaction
            self._driver_execute("ROLLBACK TO SAVEPOINT joined")
        elif len(self._deferring.writes) > kept:
            del self._deferring.writes[kept:]
        else:
            return  # the failed job deferred no write: what was read ahead still holds
        self._ahead.forget()  # what the failed job wrote is gone: read again

    @contextmanager
    def pipelined(self) -> Iterator[None]:
        """PostgreSQL: psycopg's pipeline mode for the stretch (statements are sent at once, a read
        waits for its own answer only, ``settle`` for all; psycopg docs, "Pipeline mode support").
        Elsewhere nothing changes."""
        if not self.postgres:
            yield
            return
        conn = self.c  # (set aside while a group commit's writes are deferred)
        raw: Any = conn.connection.driver_connection
        with raw.pipeline() as self._pipeline:
            conn.info[PIPELINE] = self._pipeline
            try:
                yield
            finally:
                self._pipeline = None
                del conn.info[PIPELINE]

    def settle(self) -> None:
        if self._pipeline is not None and self._deferring is None:
            self._pipeline.sync()  # a refused insert is translated as add_certificate's own (_translate_driver)

    def _driver_execute(self, sql: str, *, prepare: bool | None = None) -> None:
        raw: Any = self.c.connection.driver_connection  # a statement SQLAlchemy need not track
        if prepare is None:  # (psycopg prepares a statement once run often enough; sqlite3 takes no such flag)
            raw.execute(sql)
        else:
            raw.execute(sql, prepare=prepare)

    def before_commit(self) -> None:
        """The writes deferred to the end of a write transaction: a group commit's deferred jobs'
        writes, a joined transaction's audit head row, and the one revision bump however many
        changes the transaction holds."""
        self.pki_revision = self._pki_revision_at_commit()
        self._send_deferred()
        if not self._head_written and self.audit_head is not None:
            new_id, new_hash = self.audit_head
            self._hot.run("set_audit_head", {"new_id": new_id, "new_hash": new_hash})
            self._head_written = True
        if self._bump:
            self._hot.run("bump_revision", {})  # (through Core, in a pipeline it would wait: _settle_in_pipeline)
            self._bump = False

    def _pki_revision_at_commit(self) -> int | None:
        """The revision this transaction commits, when none of its writes can have changed the roots,
        CRLs or server names (a group commit's, deferred: those are not among the writes it can
        defer) and it read the revision under the audit head's lock; else None."""
        if not self._defer_jobs or self._revision is None or not self._head_locked:
            return None
        return self._revision + 1 if self._bump else self._revision

    def begin_in_pipeline(self) -> None:
        """PostgreSQL, in ``pipelined`` on a connection in autocommit: the transaction's BEGIN sent
        unanswered ahead of its first statements. psycopg begins a transaction itself with a Sync
        in a pipeline (``_start_query``: the BEGIN, then ``_sync_gen``), a wait of its own before
        the first statement is sent; in autocommit it sends no BEGIN (``_start_query`` returns),
        and this one opens the transaction block the statements after it run in. READ COMMITTED
        whatever the server's default: what the writers' design relies on (the audit head's row
        lock orders them, and each statement sees what committed before it)."""
        self._driver_execute("BEGIN ISOLATION LEVEL READ COMMITTED", prepare=False)

    def commit_in_pipeline(self) -> None:
        """PostgreSQL, in ``pipelined``: the COMMIT sent behind the transaction's last statements,
        unanswered; the pipeline's closing Sync then waits once for all of them. psycopg's own
        ``commit`` in a pipeline syncs (``_commit_gen``), and the pipeline's exit syncs again
        (``Pipeline.__exit__``, ``_exit_gen``): two waits where one does. When any statement before
        it fails, every later command up to the Sync is aborted unexecuted, this COMMIT with them
        (libpq's "Pipeline Mode" docs, and ``pqPipelineSyncInternal``'s comment in fe-exec.c:
        "every subsequent command up to and including the result to the Sync ... gets set to
        PGRES_PIPELINE_ABORTED"): the transaction is left failed, nothing is committed, and the
        error is raised as the pipeline ends (``tests/ca/test_group_commit.py``). Afterwards
        the driver's ``commit`` finds no transaction open and sends nothing (``_commit_gen``:
        ``transaction_status == IDLE``)."""
        self._driver_execute("COMMIT", prepare=False)

    def _send_deferred(self) -> None:
        """The deferred jobs' writes: the clusters saved in one update (each as its last save left it),
        every certificate in one insert and every audit entry in another (none of these statements
        reads what another writes), sent unanswered: they are settled with the COMMIT behind them
        (``commit_in_pipeline``), and a refusal then fails the COMMIT too and replays the batch
        (``SqlStore._joined_write``)."""
        writes = self._deferred_writes()
        if not writes:
            return
        self.sent_deferred = True
        try:
            for kind in _Deferring.WRITES:
                rows = [values for name, values in writes if name == kind]
                if kind == "save_cluster":
                    rows = list({values["b_name"]: values for values in rows}.values())
                if rows:
                    self._hot.write_rows(kind, rows)
        except (DBAPIError, self._dbapi.Error) as exc:
            raise Replay("the batch's writes were refused") from exc

    # roots
    def list_roots(self) -> list[Root]:
        ahead = self._ahead.roots()
        return ahead if ahead is not None else [_root(r) for r in self.c.execute(_Q.roots)]

    def get_root(self, root_id: str) -> Root | None:
        r = self.c.execute(select(t.roots).where(t.roots.c.id == root_id)).first()
        return _root(r) if r else None

    def add_root(self, root: Root) -> None:
        self.c.execute(
            insert(t.roots).values(
                id=root.id,
                status=root.status.value,
                cert_pem=root.cert_pem,
                chain_pem=root.chain_pem,
                anchor_pem=root.anchor_pem,
                key_ref=root.key_ref,
                not_after=root.not_after,
                created_at=root.created_at,
                endorsement_pem=root.endorsement_pem,
            )
        )

    def set_root_status(self, root_id: str, status: str) -> None:
        self.c.execute(update(t.roots).where(t.roots.c.id == root_id).values(status=status))

    # the CA service's own names
    def list_server_names(self) -> list[str]:
        ahead = self._ahead.server_names()
        return ahead if ahead is not None else [r.name for r in self.c.execute(_Q.server_names)]

    def add_server_name(self, name: str, at: datetime) -> None:
        self.c.execute(insert(t.server_names).values(name=name, added_at=at))

    # clusters
    def get_cluster(self, name: str, *, for_update: bool = False) -> Cluster | None:
        ahead = self._ahead.cluster(name)  # read ahead, locked, by this group commit
        if ahead is not None:
            return ahead
        r = self._hot.first("cluster_for_update" if for_update and self.postgres else "cluster", {"name": name})
        return _cluster(r) if r else None

    def list_clusters(self) -> list[Cluster]:
        return [_cluster(r) for r in self.c.execute(select(t.clusters))]

    def add_cluster(self, cluster: Cluster) -> None:
        self._ahead.forget_clusters()
        self.c.execute(insert(t.clusters).values(**self._cluster_values(cluster)))

    def save_cluster(self, cluster: Cluster) -> None:
        values = self._cluster_values(cluster)
        del values["name"]
        self._hot.run("save_cluster", {"b_name": cluster.name, **values})
        self._ahead.cluster_saved(cluster)

    def set_agent_status(self, name: str, status: dict[str, Any]) -> bool:
        self._ahead.forget_clusters()
        return self._hot.run("set_agent_status", {"b_name": name, "b_status": status}) > 0

    @staticmethod
    def _cluster_values(c: Cluster) -> dict[str, Any]:
        return {
            "name": c.name,
            "trust_domain": c.trust_domain,
            "status": c.status.value,
            "generation": c.generation,
            "rotation_pending": c.rotation_pending,
            "gateway": c.gateway,
            "created_at": c.created_at,
            "agent_token_id": c.agent_token_id,
            "agent_token_hash": c.agent_token_hash,
            "exports": c.exports,
            "agent_status": c.agent_status,
            "revoked_at": c.revoked_at,
            "proof_floor": c.proof_floor,
        }

    def find_cluster_by_agent_token(self, token_id: str) -> Cluster | None:
        r = self._hot.first("cluster_by_token", {"token_id": token_id})
        return _cluster(r) if r else None

    # tokens
    def add_bootstrap_token(self, token: BootstrapToken) -> None:
        self.c.execute(
            insert(t.bootstrap_tokens).values(
                token_id=token.token_id,
                cluster=token.cluster,
                token_hash=token.token_hash,
                expires_at=token.expires_at,
                created_at=token.created_at,
                used_at=token.used_at,
            )
        )

    def get_bootstrap_token(self, token_id: str, *, for_update: bool = False) -> BootstrapToken | None:
        q = select(t.bootstrap_tokens).where(t.bootstrap_tokens.c.token_id == token_id)
        if for_update and self.postgres:
            q = q.with_for_update()
        r = self.c.execute(q).first()
        if r is None:
            return None
        return BootstrapToken(r.token_id, r.cluster, r.token_hash, r.expires_at, r.created_at, r.used_at)

    def mark_bootstrap_used(self, token_id: str, at: datetime) -> None:
        res = self.c.execute(
            update(t.bootstrap_tokens)
            .where(t.bootstrap_tokens.c.token_id == token_id, t.bootstrap_tokens.c.used_at.is_(None))
            .values(used_at=at)
        )
        if res.rowcount != 1:
            raise Conflict("bootstrap token was used concurrently")

    def expire_bootstrap_tokens(self, cluster: str, at: datetime) -> list[str]:
        """End every unused, unexpired bootstrap token of ``cluster`` at ``at``; their ids."""
        bt = t.bootstrap_tokens.c
        live = (bt.cluster == cluster, bt.used_at.is_(None), bt.expires_at > at)
        ids = [r.token_id for r in self.c.execute(select(bt.token_id).where(*live).order_by(bt.token_id))]
        if ids:
            self.c.execute(update(t.bootstrap_tokens).where(*live).values(expires_at=at))
        return ids

    def add_admin_token(self, token: AdminToken) -> None:
        self.c.execute(
            insert(t.admin_tokens).values(
                token_id=token.token_id,
                token_hash=token.token_hash,
                created_at=token.created_at,
                description=token.description,
                name=token.name,
                role=token.role,
                expires_at=token.expires_at,
                revoked_at=token.revoked_at,
            )
        )

    def get_admin_token(self, token_id: str) -> AdminToken | None:
        r = self.c.execute(select(t.admin_tokens).where(t.admin_tokens.c.token_id == token_id)).first()
        return _admin_token(r) if r else None

    def list_admin_tokens(self, *, for_update: bool = False) -> list[AdminToken]:
        """Oldest first; ``for_update`` locks them (PostgreSQL), so two revocations see each other."""
        at = t.admin_tokens.c
        q = select(t.admin_tokens).order_by(at.created_at, at.token_id)
        if for_update and self.postgres:
            q = q.with_for_update()
        return [_admin_token(r) for r in self.c.execute(q)]

    def revoke_admin_token(self, token_id: str, at: datetime) -> None:
        self.c.execute(update(t.admin_tokens).where(t.admin_tokens.c.token_id == token_id).values(revoked_at=at))

    # certificates
    def add_certificate(self, rec: CertificateRecord) -> None:
        """Conflict when a certificate for the same public key exists (``unique_key_fp``)."""
        self._ahead.forget_candidates(rec.cluster)
        try:
            self._hot.run(
                "add_certificate_values",
                dict(
                    serial=rec.serial,
                    cluster=rec.cluster,
                    root_id=rec.root_id,
                    generation=rec.generation,
                    cert_pem=rec.cert_pem,
                    public_key_fp=rec.public_key_fp,
                    unique_key_fp=rec.public_key_fp,
                    not_before=rec.not_before,
                    not_after=rec.not_after,
                    issued_at=rec.issued_at,
                    revoked_at=rec.revoked_at,
                    revocation_reason=rec.revocation_reason,
                ),
            )
        except (IntegrityError, self._dbapi.IntegrityError):
            raise _key_certified() from None

    def get_certificate(self, serial: str) -> CertificateRecord | None:
        r = self._hot.first("certificate", {"serial": serial})
        return _cert(r) if r else None

    def cluster_certificates(self, cluster: str) -> list[CertificateRecord]:
        q = select(t.certificates).where(t.certificates.c.cluster == cluster).order_by(t.certificates.c.id)
        return [_cert(r) for r in self.c.execute(q)]

    def proof_candidates(self, cluster: str, *, now: datetime, floor: int) -> list[CertificateRecord]:
        """The cluster's two newest unrevoked, unexpired certificates with an id of at least ``floor``."""
        ahead = self._ahead.proof_candidates(cluster, now=now, floor=floor)
        if ahead is not None:
            return ahead
        return [_cert(r) for r in self._hot.rows("proof_candidates", {"cluster": cluster, "now": now, "floor": floor})]

    def latest_certificate(self, cluster: str) -> CertificateRecord | None:
        r = self.c.execute(_Q.latest_certificate, {"cluster": cluster}).first()
        return _cert(r) if r else None

    def newest_proof_candidates(self, *, now: datetime) -> dict[str, CertificateRecord]:
        """Each cluster's newest proof candidate at ``now`` (``proof_candidates``' first, by the same
        terms), for the clusters that have one: one statement for the fleet."""
        cert = t.certificates.c
        newest = (
            select(func.max(cert.id))
            .join(t.clusters, t.clusters.c.name == cert.cluster)
            .where(*_candidate_terms(_cluster_floor(), now))
            .group_by(cert.cluster)
            .scalar_subquery()
        )
        return {r.cluster: _cert(r) for r in self.c.execute(select(t.certificates).where(cert.id.in_(newest)))}

    def current_certificates(self) -> dict[str, CertificateRecord]:
        latest = select(func.max(t.certificates.c.id)).group_by(t.certificates.c.cluster).scalar_subquery()
        q = select(t.certificates).where(t.certificates.c.id.in_(latest))
        return {r.cluster: _cert(r) for r in self.c.execute(q)}

    def mark_rotation(self, *, off_root: str | None = None) -> list[str]:
        """Set-based, whatever the fleet size: every active cluster holding a current intermediate
        (under another root than ``off_root`` when given) goes one generation up with its rotation
        pending, unless it already is pending. Two statements (the names, one UPDATE); returns
        the names of all such clusters, sorted (those already pending included)."""
        latest = select(func.max(t.certificates.c.id)).group_by(t.certificates.c.cluster).scalar_subquery()
        current = select(t.certificates.c.cluster).where(t.certificates.c.id.in_(latest))
        if off_root is not None:
            current = current.where(t.certificates.c.root_id != off_root)
        due = (t.clusters.c.status == ClusterStatus.ACTIVE.value, t.clusters.c.name.in_(current))
        names = [r.name for r in self.c.execute(select(t.clusters.c.name).where(*due).order_by(t.clusters.c.name))]
        if names:
            self._ahead.forget_clusters()
            self.c.execute(
                update(t.clusters)
                .where(*due, t.clusters.c.rotation_pending.is_(False))
                .values(generation=t.clusters.c.generation + 1, rotation_pending=True)
            )
        return names

    def trust_domain_holders(self, trust_domain: str) -> list[str]:
        c = t.clusters.c
        q = (
            select(c.name)
            .where(c.trust_domain == trust_domain, c.status != ClusterStatus.REVOKED.value)
            .order_by(c.name)
        )
        return list(self.c.execute(q).scalars())

    def get_clusters(self, names: Collection[str]) -> list[Cluster]:
        """The clusters among ``names`` that exist, in one query."""
        if not names:
            return []
        return [_cluster(r) for r in self.c.execute(select(t.clusters).where(t.clusters.c.name.in_(sorted(names))))]

    def revoke_certificate(self, serial: str, *, at: datetime, reason: str) -> None:
        self._ahead.forget_candidates()
        self.c.execute(
            update(t.certificates)
            .where(t.certificates.c.serial == serial, t.certificates.c.revoked_at.is_(None))
            .values(revoked_at=at, revocation_reason=reason)
        )

    def revoked_certificates(self, root_id: str, *, not_expired_at: datetime) -> list[CertificateRecord]:
        q = (
            select(t.certificates)
            .where(
                t.certificates.c.root_id == root_id,
                t.certificates.c.revoked_at.is_not(None),
                t.certificates.c.not_after > not_expired_at,
            )
            .order_by(t.certificates.c.id)
        )
        return [_cert(r) for r in self.c.execute(q)]

    def latest_not_after(self, root_id: str) -> datetime | None:
        q = select(func.max(t.certificates.c.not_after)).where(t.certificates.c.root_id == root_id)
        latest: datetime | None = self.c.execute(q).scalar()
        return latest

    # CRLs
    def put_crl(self, crl: CRLRecord) -> None:
        values = {
            "number": crl.number,
            "der": crl.der,
            "pem": crl.pem,
            "this_update": crl.this_update,
            "next_update": crl.next_update,
        }
        res = self.c.execute(update(t.crls).where(t.crls.c.root_id == crl.root_id).values(**values))
        if res.rowcount == 0:
            self.c.execute(insert(t.crls).values(root_id=crl.root_id, **values))

    def list_crls(self) -> list[CRLRecord]:
        ahead = self._ahead.crls()
        return ahead if ahead is not None else [_crl(r) for r in self.c.execute(_Q.crls)]

    # audit and revision
    def append_audit(
        self, *, at: datetime, actor: str, action: str, subject: str, details: dict[str, Any]
    ) -> AuditEntry:
        self._require_audited()
        if self.audit_head is None:
            row = self._hot.first("audit_head_for_update" if self.postgres else "audit_head", {})
            self.audit_head = (row.int_value, row.str_value)
        head_id, prev_hash = self.audit_head
        new_id = head_id + 1
        if not all(type(v) in _JSON_SCALARS for v in details.values()):
            details = json.loads(json.dumps(details, default=str))  # the stored form is what gets hashed
        h = self._hasher(
            id=new_id, at=at, actor=actor, action=action, subject=subject, details=details, prev_hash=prev_hash
        )
        self._hot.run(
            "add_audit_values",
            dict(
                id=new_id,
                at=at,
                actor=actor,
                action=action,
                subject=subject,
                details=json.dumps(details, sort_keys=True),
                prev_hash=prev_hash,
                hash=h,
            ),
        )
        if self._joined:
            self._head_written = False
        else:
            self._hot.run("set_audit_head", {"new_id": new_id, "new_hash": h})
        self.audit_head = (new_id, h)
        return AuditEntry(new_id, at, actor, action, subject, details, prev_hash, h)

    def list_audit(self, *, after: int = 0, limit: int = 100) -> list[AuditEntry]:
        q = select(t.audit).where(t.audit.c.id > after).order_by(t.audit.c.id).limit(limit)
        return [_audit(r) for r in self.c.execute(q)]

    def last_audit_entry(self) -> AuditEntry | None:
        r = self.c.execute(select(t.audit).order_by(t.audit.c.id.desc()).limit(1)).first()
        return _audit(r) if r else None

    def bump_revision(self) -> None:
        """The fleet revision moves by one when this transaction commits (``before_commit``), once
        however many changes call this: a group commit of renewals that each end a rotation bumps
        it once, not once per renewal (a write and a read each, and every later renewal of the batch
        would find the roots it caches per revision stale and read them again)."""
        self._require_audited()
        self._bump = True

    def _require_audited(self) -> None:
        """A programming error otherwise: without the audit head's lock, taken first, an audit entry
        or revision bump would take it after row locks, the other writers' order reversed."""
        if not self._audited:
            raise RuntimeError("an unaudited write transaction cannot append to the audit chain or move the revision")

    def get_revision(self) -> int:
        """The revision committed when this transaction began (a write transaction's own bump is
        not counted until it commits)."""
        if self._revision is not None:
            # a write transaction sees no other writer's revision bump: on PostgreSQL every writer
            # takes the audit head's row lock first, on SQLite BEGIN IMMEDIATE holds the write lock
            return self._revision
        if self.audit_head is not None:
            revision = int(self._hot.first("revision", {}).int_value)
            if self._writing:
                self._revision = revision
            return revision
        # one statement for both rows: a write transaction that reads the revision appends to the
        # audit chain next (SQLite's BEGIN IMMEDIATE already holds the writer lock, so both are stable)
        revision = 0
        for row in self._hot.rows("revision_and_audit_head", {}):
            if row.key == "revision":
                revision = int(row.int_value)
            else:
                self.audit_head = (row.int_value, row.str_value)
        if self._writing:
            self._revision = revision
        return revision


def _translate(exc: DBAPIError) -> CAError:
    return _translate_driver(
        exc.orig,
        integrity=isinstance(exc, IntegrityError),
        unreachable=isinstance(exc, OperationalError) or exc.connection_invalidated,
    )


def _translate_driver(orig: BaseException | None, *, integrity: bool, unreachable: bool) -> CAError:
    text = str(orig).lower() if orig is not None else ""
    if integrity and _KEY_UNIQUE in text:  # the constraint's name is in the message (psycopg, sqlite3)
        return _key_certified()
    if integrity:
        return Conflict("the change conflicts with a concurrent one; retry")
    if "readonly" in text or "read-only" in text or "read only" in text:
        return Unavailable("the database is read-only")
    if "full" in text or "no space" in text:
        return Unavailable("the database is full")
    if unreachable:
        return Unavailable("the database is not reachable")
    return Unavailable("the database failed")


_KEY_UNIQUE = "unique_key_fp"  # in the name of the certificates' unique constraint on it (migration 0004)


def _key_certified() -> Conflict:
    return Conflict(
        "a certificate for this CSR's public key exists already: every enrollment and renewal needs a new key"
    )


def _translate_dbapi(exc: Exception, dbapi: Any) -> CAError:
    """The same translation for errors of statements run on the DBAPI connection directly
    (``dbapi``: the driver module, whose PEP 249 exception classes tell the kinds apart)."""
    return _translate_driver(
        exc, integrity=isinstance(exc, dbapi.IntegrityError), unreachable=isinstance(exc, dbapi.OperationalError)
    )


class _WriterGate:
    """Serialises SQLite writers before BEGIN IMMEDIATE: the threads of this process on a lock, and
    processes sharing the database file (``serve --workers``, replicas on one data dir) on an flock
    of a file beside it. Without it, waiting writers sit in SQLite's busy handler, which sleeps and
    polls (1, 2, 5, 10 … 100 ms) and turns contention into long tail latencies."""

    def __init__(self, database: str | None) -> None:
        self._lock = threading.RLock()
        self._depth = 0
        self._path = (
            f"{database}-writer.lock"
            if database and database != ":memory:" and not database.startswith("file:")
            else None
        )
        self._fd: int | None = None
        self._pid = 0

    def _file(self) -> int | None:
        if self._path is None:
            return None
        if self._fd is None or self._pid != os.getpid():
            try:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                self._pid = os.getpid()
            except OSError:  # a read-only data dir: SQLite's busy handler still serialises
                self._path = None
                return None
        return self._fd

    @contextmanager
    def hold(self) -> Iterator[None]:
        with self._lock:
            fd = self._file() if self._depth == 0 else None
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_UN)


class SqlStore:
    def __init__(
        self,
        url: str,
        *,
        prepared_statements: bool = True,
        audit_key: AuditKey | None = None,
        group_commit: bool = True,
    ) -> None:
        """``prepared_statements``: run the hot-path statements on the DBAPI connection, compiled
        once (``_Prepared``, the default); False: through SQLAlchemy Core like the others
        (``serve --no-prepared-statements``, for when a SQLAlchemy upgrade breaks ``_Prepared``).

        ``group_commit``: on PostgreSQL, ``write_joined`` jobs of concurrent callers share a
        transaction (``joined.Joiner``); False: each its own (for comparison in tests and benches).

        ``audit_key``: the key audit entries are sealed with (HMAC-SHA256). None writes 0.1.0's
        unkeyed chain, for tools and tests that hold no key: ``runtime`` always gives one (and
        sets ``audit_key`` before the first write when it has to look at the chain first)."""
        self.url = url
        self.audit_key = audit_key
        self.engine = make_engine(url)
        self.postgres = self.engine.dialect.name == "postgresql"
        self.embedded = not self.postgres
        self._prepared = _prepare_hot(self.engine.dialect) if prepared_statements else None
        self._dbapi: Any = self.engine.dialect.loaded_dbapi  # sqlite3 or psycopg
        self._gate = _WriterGate(None if self.postgres else self.engine.url.database)
        # SQLite commits without waiting for the disk's flush (WAL, synchronous=NORMAL) and its
        # renewals run inline on the event loop: there a group would only add a thread hand-off
        self._joiner = Joiner(self._joined_write, self._translate_job_error) if self.postgres and group_commit else None
        self._pki_known: int | None = None  # the revision the last group commit read or carried the PKI at

    def _new_tx(self, conn: Connection, *, write: bool, audited: bool = True) -> SqlTx:
        hasher = self.audit_key.entry_hash if self.audit_key is not None else entry_hash
        return SqlTx(
            conn,
            postgres=self.postgres,
            prepared=self._prepared,
            hasher=hasher,
            write=write and audited,
            audited=audited,
        )

    @contextmanager
    def _tx(self, *, write: bool, audited: bool = True) -> Iterator[SqlTx]:
        try:
            with self.engine.connect() as conn:
                if self.postgres and not write:
                    # READ COMMITTED gives each statement its own snapshot with or without
                    # BEGIN/COMMIT: autocommit saves those two round trips per read
                    yield self._new_tx(conn.execution_options(isolation_level="AUTOCOMMIT"), write=False)
                elif self.postgres:
                    with conn.begin():
                        tx = self._new_tx(conn, write=True, audited=audited)
                        if audited:
                            tx.lock_audit_head()
                        yield tx
                        tx.before_commit()
                else:
                    raw: Any = conn.connection.driver_connection
                    raw.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                    try:
                        sqlite_tx = self._new_tx(conn, write=write, audited=audited)
                        yield sqlite_tx
                        if write:
                            sqlite_tx.before_commit()
                    except BaseException:
                        # SQLite may already have rolled back (SQLITE_FULL, SQLITE_IOERR): keep the
                        # original error rather than "cannot rollback - no transaction is active"
                        if raw.in_transaction:
                            raw.execute("ROLLBACK")
                        raise
                    raw.execute("COMMIT")
        except DBAPIError as exc:
            raise _translate(exc) from exc
        except self._dbapi.Error as exc:
            raise _translate_dbapi(exc, self._dbapi) from exc

    @contextmanager
    def _write(self, *, audited: bool = True) -> Iterator[SqlTx]:
        if self.postgres:
            with self._tx(write=True, audited=audited) as tx:
                yield tx
        else:
            with self._gate.hold(), self._tx(write=True, audited=audited) as tx:
                yield tx

    def write(self) -> Any:
        return self._write()

    def write_unaudited(self) -> Any:
        """A write that appends no audit entry and moves no revision (``SqlTx(audited=False)``). On
        PostgreSQL it takes no audit head lock, so it neither waits for the audited writers (a
        group commit of renewals holds that lock until it commits) nor makes them wait; SQLite has
        one writer at a time either way."""
        return self._write(audited=False)

    def write_joined(self, job: Callable[[Tx], T], *, cluster: str | None = None) -> T:
        """``job(tx)`` in a write transaction, returning once that has committed. On PostgreSQL with
        group commit on, the transaction may hold other callers' jobs too (``joined.Joiner``: each
        in its own savepoint, one commit for all), and reads the ``cluster`` each job works on
        (locked, with its proof candidates) for all of them at once; else it is the caller's own."""
        if self._joiner is not None:
            return self._joiner.run(job, ahead=cluster)
        with self._write() as tx:
            return job(tx)

    def submit_joined(self, job: Callable[[Tx], T], *, cluster: str | None = None) -> Future[T]:
        """``write_joined`` as a future: with group commit, done on the batch thread once the batch
        committed; else run here and now (SQLite's writes are its caller's own)."""
        if self._joiner is not None:
            return self._joiner.submit(job, ahead=cluster)
        done: Future[T] = Future()
        try:
            done.set_result(self.write_joined(job, cluster=cluster))
        except Exception as exc:
            done.set_exception(exc)
        return done

    def group_commit_stats(self) -> tuple[int, int]:
        """(transactions, jobs) run by group commit in this process: (0, 0) when it is off."""
        return (self._joiner.batches, self._joiner.jobs) if self._joiner is not None else (0, 0)

    def group_commit_replays(self) -> int:
        """Group-commit batches run again with each job's writes settled in turn (``joined.Replay``)."""
        return self._joiner.replays if self._joiner is not None else 0

    @contextmanager
    def _joined_write(self, deferred: bool) -> Iterator[SqlTx]:
        """A group commit's transaction (PostgreSQL), in psycopg's pipeline mode from its first
        statement to its commit: the audit head is locked with the batch's reads ahead (``read_ahead``,
        one wait), and the head's update, the revision bump and the COMMIT are sent together and
        settled by the pipeline's closing Sync, one wait (``SqlTx.commit_in_pipeline``): two waits
        besides the jobs' own, where there were seven, then four. ``deferred``: the jobs' own writes
        go with them too (``SqlTx.join``): no wait while the jobs run, two per batch in all; when
        one of those writes (or the COMMIT) is refused, nothing was committed and the batch is run
        again (``Replay``). Database errors reach the ``Joiner``, which translates them
        (``_translate_job_error``)."""
        # in autocommit the driver begins nothing itself (begin_in_pipeline does); on an error the
        # transaction's rollback still reaches it, and it sends ROLLBACK unless the session is idle
        autocommit = {"isolation_level": "AUTOCOMMIT"}
        with self.engine.connect().execution_options(**autocommit) as conn, conn.begin() as transaction:
            tx = self._new_tx(conn, write=True).join(deferred=deferred, pki_known=self._pki_known)
            try:
                with tx.pipelined():
                    tx.begin_in_pipeline()
                    yield tx
                    tx.before_commit()
                    tx.commit_in_pipeline()
            except (DBAPIError, self._dbapi.Error) as exc:
                if tx.sent_deferred:
                    raise Replay("the batch's writes were refused") from exc
                raise
            transaction.commit()  # (the driver finds nothing left to commit)
            self._pki_known = tx.pki_revision

    def _translate_job_error(self, exc: Exception) -> Exception:
        """A job's (or the batch's) error as ``_tx`` would have raised it: database errors translated, once."""
        if isinstance(exc, DBAPIError):
            return _translate(exc)
        if isinstance(exc, PendingRollbackError):  # a statement lost the connection: the savepoint went with it
            return Unavailable("the database is not reachable")
        if isinstance(exc, self._dbapi.Error):
            return _translate_dbapi(exc, self._dbapi)
        return exc

    def rate_counters(self) -> SqlRateCounters:
        """The shared rate-limit counters, writing through the same writer serialisation."""
        gate = contextlib.nullcontext if self.postgres else self._gate.hold
        return SqlRateCounters(self.engine, writer_gate=gate)

    def read(self) -> Any:
        return self._tx(write=False)

    def iter_audit(self, *, after: int = 0, page: int = 1000) -> Iterator[AuditEntry]:
        """Every entry after ``after``, in order, read ``page`` at a time."""
        while True:
            with self.read() as tx:
                batch = tx.list_audit(after=after, limit=page)
            if not batch:
                return
            yield from batch
            after = batch[-1].id

    def audit_head(self) -> tuple[int, str] | None:
        with self.read() as tx:
            r = tx.c.execute(select(t.meta).where(t.meta.c.key == "audit_head")).first()
        if r is None:
            return None
        return (int(r.int_value), r.str_value if r.int_value else GENESIS)

    def last_audit_entry(self) -> AuditEntry | None:
        with self.read() as tx:
            entry: AuditEntry | None = tx.last_audit_entry()
        return entry

    def checkpoint(self) -> None:
        """Copy committed WAL pages back into the SQLite database file (PASSIVE: never waits for
        or blocks readers and writers). Nothing to do on PostgreSQL."""
        if self.postgres:
            return
        try:
            with self.engine.connect() as conn:
                raw: Any = conn.connection.driver_connection
                raw.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except DBAPIError as exc:
            raise _translate(exc) from exc
        except self._dbapi.Error as exc:
            raise _translate_dbapi(exc, self._dbapi) from exc

    def ping(self) -> None:
        with self.read() as tx:
            tx.get_revision()

    def dispose(self) -> None:
        self.engine.dispose()


def _admin_token(r: Any) -> AdminToken:
    return AdminToken(r.token_id, r.token_hash, r.created_at, r.description, r.name, r.role, r.expires_at, r.revoked_at)
