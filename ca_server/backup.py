"""`meshbridge-ca backup` / `restore`: the database and the key material in one archive.

The archive (tar.gz) holds ``manifest.json`` (format, time, audit head, SHA-256 of every member),
``ca.json``, one JSON-lines file per table read in a single snapshot transaction, and the root
keys as they are at rest — encrypted files, or for PKCS#11 only their references (the keys never
leave the token). The passphrase, PIN and admin token are never written into it: keep them in your
secret store, and the restored CA needs the same passphrase to sign.

Restore refuses a data directory that already holds a CA, loads every row through the migrations'
schema, then checks that each root key opens and matches its certificate and the audit chain;
on any failure the new directory and database are left empty, never half-restored.

The audit key is not in the archive either (it is a secret like the passphrase): restore reads it
from ``--audit-key-file``, ``MESHBRIDGE_AUDIT_KEY_FILE`` or the target's ``audit-key``. Nor are the
anchors: a backup carrying its own anchors would prove nothing about rollback. Restore checks the
restored chain against the anchors it finds in the target data directory (keep ``audit-anchors``
when you move a broken CA's ``ca.json`` and database away) and in every ``--anchors FILE``: a
backup older than they record, or departing from them, is refused unless ``--accept-rollback``
is given, which is then recorded in the audit log and starts the anchors afresh (the old file is
kept as ``audit-anchors.superseded-<time>``).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import Table, delete, insert, select, text

from ca_server import datadir, runtime, sealing
from ca_server.core.audit import Anchor, AuditKey, ChainReport, is_unkeyed, verify_chain
from ca_server.core.errors import Conflict, InvalidInput
from ca_server.storage import tables as t
from ca_server.storage.repository import SqlStore
from meshbridge_wire.cliout import Output

FORMAT = "meshbridge-backup/1"
TABLES: list[Table] = [
    t.roots,
    t.clusters,
    t.certificates,
    t.bootstrap_tokens,
    t.admin_tokens,
    t.crls,
    t.audit,
    t.meta,
    t.server_names,
]
# Tables added after the archive format: an older archive lacks them and restores them empty.
LATER_TABLES = frozenset({t.server_names.name})


def _later_columns(table: Table, row: dict[str, Any]) -> dict[str, Any]:
    """A row of an archive made before a column existed, completed as the migration that added it
    completes the rows it finds: an operator token from before migration 0005 is the admin token
    ``initial-<id>`` (the columns' server defaults fill in the rest)."""
    if table is t.admin_tokens and not row.get("name"):
        return {**row, "name": f"initial-{row['token_id']}"}
    return row


def _encode(value: Any) -> Any:
    if isinstance(value, datetime):
        return {"$dt": value.astimezone(UTC).isoformat()}
    if isinstance(value, bytes | memoryview):
        return {"$b64": base64.b64encode(bytes(value)).decode()}
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and "$dt" in value:
        return datetime.fromisoformat(value["$dt"])
    if isinstance(value, dict) and "$b64" in value:
        return base64.b64decode(value["$b64"])
    return value


def _add(tar: tarfile.TarFile, name: str, data: bytes, digests: dict[str, str]) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o600
    tar.addfile(info, io.BytesIO(data))
    digests[name] = hashlib.sha256(data).hexdigest()


def backup(data_dir: Path, out: Path, *, database_url: str | None = None) -> dict[str, Any]:
    settings = runtime.load_settings(data_dir)
    store = runtime.open_store(runtime.database_url(data_dir, settings, database_url), migrate=False)
    digests: dict[str, str] = {}
    counts: dict[str, int] = {}
    tmp = out.with_name(f".{out.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
        with store.read() as tx:  # one snapshot: rows of every table agree with each other
            key_refs = [r.key_ref for r in tx.list_roots()]
            for table in TABLES:
                rows = tx.c.execute(select(table)).mappings().all()
                counts[table.name] = len(rows)
                body = "".join(json.dumps({k: _encode(v) for k, v in r.items()}, sort_keys=True) + "\n" for r in rows)
                _add(tar, f"db/{table.name}.jsonl", body.encode(), digests)
        _add(tar, "ca.json", (data_dir / runtime.SETTINGS_FILE).read_bytes(), digests)
        for ref in key_refs:
            if ref.startswith("file:"):
                rel = ref[len("file:") :]
                _add(tar, f"keys/{rel}", (data_dir / rel).read_bytes(), digests)
        head = store.audit_head()
        manifest = {
            "format": FORMAT,
            "created_at": datetime.now(UTC).isoformat(),
            "tables": counts,
            "audit_head": list(head) if head else None,
            "key_refs": key_refs,
            "sha256": digests,
        }
        _add(tar, "manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode(), {})
    os.replace(tmp, out)
    store.dispose()
    return manifest


def _read_archive(path: Path) -> dict[str, bytes]:
    members: dict[str, bytes] = {}
    with tarfile.open(path, "r:gz") as tar:
        for m in tar.getmembers():
            if not m.isfile() or m.name.startswith("/") or ".." in Path(m.name).parts:
                raise InvalidInput(f"backup member {m.name!r} is not allowed")
            f = tar.extractfile(m)
            assert f is not None
            members[m.name] = f.read()
    if "manifest.json" not in members:
        raise InvalidInput("not a meshbridge backup: manifest.json is missing")
    return members


def _verify_restored(
    store: SqlStore, key: AuditKey | None, anchors: list[Anchor], *, accept_rollback: bool
) -> ChainReport:
    """The restored chain verifies (with the key, when it is sealed), and is not behind or apart
    from the anchors, unless that is accepted."""
    if key is None:
        last = store.last_audit_entry()
        if anchors or (last is not None and not is_unkeyed(last)):
            raise InvalidInput(
                "the backup's audit chain is sealed with an audit key, which backups do not hold: "
                "give --audit-key-file or MESHBRIDGE_AUDIT_KEY_FILE"
            )
    report = verify_chain(store.iter_audit(), head=store.audit_head(), key=key, anchors=anchors)
    if report.ok:
        return report
    if not report.rollback:
        raise InvalidInput(f"restored audit chain does not verify: {report.problem}")
    if not accept_rollback:
        raise Conflict(
            f"restore refused: {report.problem}. This backup is older than, or departs from, the CA "
            "its anchors record: restoring it rolls the CA back. Pass --accept-rollback to restore it "
            "anyway (recorded in the audit log)"
        )
    return report


def _accept_rollback(
    store: SqlStore, key: AuditKey, report: ChainReport, anchors: list[Anchor], data_dir: Path
) -> None:
    """Record the accepted rollback in the chain and set the superseded anchors aside."""
    store.audit_key = key
    with store.write() as tx:
        tx.append_audit(
            at=datetime.now(UTC),
            actor="restore",
            action="audit.rollback_accepted",
            subject="audit",
            details={"problem": report.problem, "anchored_entry": max(a.id for a in anchors)},
        )
    own = runtime.anchor_log(data_dir).path
    if own.exists():
        os.replace(own, own.with_name(f"{own.name}.superseded-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"))


def _remove_added(data_dir: Path, already_there: set[str], *, created_dir: bool) -> None:
    """Leave the target as a refused restore found it: the directory gone if the restore made it,
    otherwise only what the restore added (SQLite file, key files, their directories) removed."""
    if created_dir:
        shutil.rmtree(data_dir, ignore_errors=True)
        return
    for path in data_dir.iterdir():
        if path.name in already_there:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def restore(
    archive: Path,
    data_dir: Path,
    *,
    database_url: str | None = None,
    passphrase_file: Path | None = None,
    audit_key_file: Path | None = None,
    anchors_files: Sequence[Path] = (),
    accept_rollback: bool = False,
) -> dict[str, Any]:
    members = _read_archive(archive)
    manifest = json.loads(members["manifest.json"])
    if manifest.get("format") != FORMAT:
        raise InvalidInput(f"unsupported backup format {manifest.get('format')!r}")
    for name, digest in manifest["sha256"].items():
        if hashlib.sha256(members.get(name, b"")).hexdigest() != digest:
            raise InvalidInput(f"backup member {name} is missing or corrupt (SHA-256 mismatch)")
    if (data_dir / runtime.SETTINGS_FILE).exists():
        raise Conflict(f"{data_dir} already holds a CA; restore into an empty directory")
    own_anchors = runtime.anchor_log(data_dir)
    anchors = sealing.read_anchors([*([own_anchors.path] if own_anchors.exists() else []), *anchors_files])
    created_dir = not data_dir.exists()
    already_there = set() if created_dir else {p.name for p in data_dir.iterdir()}
    datadir.make_private_dir(data_dir)
    settings = runtime.CASettings(
        **{k: v for k, v in json.loads(members["ca.json"]).items() if k in runtime.CASettings.__dataclass_fields__}
    )
    settings.database_url = database_url
    if audit_key_file is not None:
        settings.audit_key_file = str(audit_key_file.resolve())
    url = runtime.database_url(data_dir, settings, database_url)
    datadir.make_private_sqlite(url)
    store = runtime.open_store(url)
    written: list[Path] = []
    try:
        with store.read() as tx:
            if tx.list_roots():
                raise Conflict("the target database already holds a CA; restore into an empty database")
        with store.engine.begin() as conn:
            # Rows a CA-less database may still hold (a wiped or half-restored one): the archive's replace them.
            conn.execute(delete(t.meta))
            conn.execute(delete(t.server_names))
            for table in TABLES:
                member = f"db/{table.name}.jsonl"
                body = members.get(member, b"") if table.name in LATER_TABLES else members[member]
                rows = [
                    _later_columns(table, {k: _decode(v) for k, v in json.loads(line).items()})
                    for line in body.decode().splitlines()
                    if line
                ]
                if rows:
                    conn.execute(insert(table), rows)
            if store.postgres:  # explicit ids were inserted: move the serial sequence past them
                conn.execute(
                    text(
                        "SELECT setval(pg_get_serial_sequence('certificates', 'id'), "
                        "COALESCE((SELECT MAX(id) FROM certificates), 0) + 1, false)"
                    )
                )
        for name, data in members.items():
            if name.startswith("keys/"):
                path = data_dir / name[len("keys/") :]
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                runtime.write_private(path, data)
                written.append(path)
        keys = runtime.key_backend(data_dir, settings, passphrase_file=passphrase_file)
        with store.read() as tx:
            roots = tx.list_roots()
        for root in roots:
            if root.status.value == "retired":
                continue
            cert = x509.load_pem_x509_certificate(root.cert_pem.encode())
            spki = serialization.PublicFormat.SubjectPublicKeyInfo
            if keys.load(root.key_ref).public_key().public_bytes(
                serialization.Encoding.DER, spki
            ) != cert.public_key().public_bytes(serialization.Encoding.DER, spki):
                raise InvalidInput(f"the key of root {root.id} does not match its certificate")
        audit_key = sealing.read_key(runtime.audit_key_path(data_dir, settings))
        report = _verify_restored(store, audit_key, anchors, accept_rollback=accept_rollback)
        if report.rollback:
            assert audit_key is not None  # anchors are checked with the key
            _accept_rollback(store, audit_key, report, anchors, data_dir)
        runtime.write_private(data_dir / runtime.SETTINGS_FILE, settings.to_json())
        runtime.write_public(
            data_dir / "root-cert.pem",
            "".join(
                dict.fromkeys(
                    r.anchor_pem
                    for r in sorted(roots, key=lambda r: (r.created_at, r.id))
                    if r.status.value != "retired"
                )
            ),
        )
        if audit_key is not None:
            sealing.anchor_head(store, audit_key, own_anchors)
    except BaseException:
        with store.engine.begin() as conn:  # leave nothing half-restored
            for table in reversed(TABLES):
                conn.execute(delete(table))
        store.dispose()
        for path in written:  # key files, even inside a directory that was there before
            path.unlink(missing_ok=True)
        _remove_added(data_dir, already_there, created_dir=created_dir)
        raise
    finally:
        store.dispose()
    return {
        "restored": manifest["tables"],
        "audit_entries": report.checked,
        "data_dir": str(data_dir),
        "rollback_accepted": report.problem if report.rollback else None,
    }


def cmd_backup(args: argparse.Namespace) -> Output:
    """``--json``: the rows per table, ``{"<table>": N, …}``."""
    manifest = backup(Path(args.data_dir), Path(args.out), database_url=args.database_url)
    total = sum(manifest["tables"].values())
    summary = (
        f"backup written to {args.out} (mode 0600): {total} rows, {len(manifest['key_refs'])} root key reference(s)\n"
        "  not included: the key passphrase / PKCS#11 PIN and the admin token — keep them separately"
    )
    return Output(manifest["tables"], summary)


def cmd_restore(args: argparse.Namespace) -> Output:
    """``--json``: ``{"restored": {"<table>": N, …}, "audit_entries", "data_dir", "rollback_accepted"}``."""
    out = restore(
        Path(args.input),
        Path(args.data_dir),
        database_url=args.database_url,
        passphrase_file=Path(args.passphrase_file) if args.passphrase_file else None,
        audit_key_file=Path(args.audit_key_file) if args.audit_key_file else None,
        anchors_files=[Path(p) for p in args.anchors],
        accept_rollback=args.accept_rollback,
    )
    summary = (
        f"restored into {out['data_dir']}: {sum(out['restored'].values())} rows, audit chain intact "
        f"({out['audit_entries']} entries)"
    )
    if out["rollback_accepted"]:
        summary += f"\n  rollback accepted and audited: {out['rollback_accepted']}"
    return Output(out, summary)


def add_commands(sub: Any) -> None:
    b = sub.add_parser(
        "backup",
        help="archive the database and key material (not the passphrase)",
        epilog="Prints where the archive went and how many rows it holds; --json: the rows per table. "
        "Errors: one line on stderr; with --json also {error, exit_code} on stdout.",
    )
    b.add_argument("--data-dir", required=True)
    b.add_argument("--database-url")
    b.add_argument("--out", required=True, help="archive path (.tar.gz), written 0600")
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    b.set_defaults(fn=cmd_backup)
    r = sub.add_parser(
        "restore",
        help="restore a backup into an empty data directory and database",
        epilog="Prints where it restored and the audit entries checked; --json: {restored, audit_entries, "
        "data_dir, rollback_accepted}. Errors: one line on stderr; with --json also {error, exit_code} on stdout.",
    )
    r.add_argument("--data-dir", required=True)
    r.add_argument("--in", dest="input", required=True)
    r.add_argument("--database-url")
    r.add_argument("--passphrase-file")
    r.add_argument(
        "--audit-key-file",
        help="the audit key the backup's chain is sealed with (backups do not "
        "hold it; default: MESHBRIDGE_AUDIT_KEY_FILE or D/audit-key); recorded in ca.json",
    )
    r.add_argument(
        "--anchors",
        action="append",
        default=[],
        metavar="FILE",
        help="an anchors file of the CA being replaced, to refuse an older backup (D/audit-anchors "
        "is always read); repeatable",
    )
    r.add_argument(
        "--accept-rollback",
        action="store_true",
        help="restore a backup older than the anchors record (recorded in the audit log)",
    )
    r.add_argument("--json", action="store_true", help="print the result as JSON")
    r.set_defaults(fn=cmd_restore)
