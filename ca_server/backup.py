"""`meshbridge-ca backup` / `restore`: the database and the key material in one archive.

The archive (tar.gz) holds ``manifest.json`` (format, time, audit head, SHA-256 of every member),
``ca.json``, one JSON-lines file per table read in a single snapshot transaction, and the root
keys as they are at rest — encrypted files, or for PKCS#11 only their references (the keys never
leave the token). The passphrase, PIN and admin token are never written into it: keep them in your
secret store, and the restored CA needs the same passphrase to sign.

Restore refuses a data directory that already holds a CA, loads every row through the migrations'
schema, then checks the audit chain and that each root key opens and matches its certificate;
on any failure the new directory and database are left empty, never half-restored.
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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import Table, delete, insert, select, text

from ca_server import datadir, runtime
from ca_server.core.audit import verify_chain
from ca_server.core.errors import Conflict, InvalidInput
from ca_server.storage import tables as t

FORMAT = "meshbridge-backup/1"
TABLES: list[Table] = [t.roots, t.clusters, t.certificates, t.bootstrap_tokens, t.admin_tokens, t.crls, t.audit,
                       t.meta]


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
                body = "".join(json.dumps({k: _encode(v) for k, v in r.items()}, sort_keys=True) + "\n"
                               for r in rows)
                _add(tar, f"db/{table.name}.jsonl", body.encode(), digests)
        _add(tar, "ca.json", (data_dir / runtime.SETTINGS_FILE).read_bytes(), digests)
        for ref in key_refs:
            if ref.startswith("file:"):
                rel = ref[len("file:"):]
                _add(tar, f"keys/{rel}", (data_dir / rel).read_bytes(), digests)
        head = store.audit_head()
        manifest = {"format": FORMAT, "created_at": datetime.now(UTC).isoformat(), "tables": counts,
                    "audit_head": list(head) if head else None, "key_refs": key_refs, "sha256": digests}
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


def restore(archive: Path, data_dir: Path, *, database_url: str | None = None,
            passphrase_file: Path | None = None) -> dict[str, Any]:
    members = _read_archive(archive)
    manifest = json.loads(members["manifest.json"])
    if manifest.get("format") != FORMAT:
        raise InvalidInput(f"unsupported backup format {manifest.get('format')!r}")
    for name, digest in manifest["sha256"].items():
        if hashlib.sha256(members.get(name, b"")).hexdigest() != digest:
            raise InvalidInput(f"backup member {name} is missing or corrupt (SHA-256 mismatch)")
    if (data_dir / runtime.SETTINGS_FILE).exists():
        raise Conflict(f"{data_dir} already holds a CA; restore into an empty directory")
    created_dir = not data_dir.exists()
    datadir.make_private_dir(data_dir)
    settings = runtime.CASettings(**{k: v for k, v in json.loads(members["ca.json"]).items()
                                     if k in runtime.CASettings.__dataclass_fields__})
    settings.database_url = database_url
    url = runtime.database_url(data_dir, settings, database_url)
    datadir.make_private_sqlite(url)
    store = runtime.open_store(url)
    written: list[Path] = []
    try:
        with store.read() as tx:
            if tx.list_roots():
                raise Conflict("the target database already holds a CA; restore into an empty database")
        with store.engine.begin() as conn:
            conn.execute(delete(t.meta))
            for table in TABLES:
                rows = [{k: _decode(v) for k, v in json.loads(line).items()}
                        for line in members[f"db/{table.name}.jsonl"].decode().splitlines() if line]
                if rows:
                    conn.execute(insert(table), rows)
            if store.postgres:  # explicit ids were inserted: move the serial sequence past them
                conn.execute(text("SELECT setval(pg_get_serial_sequence('certificates', 'id'), "
                                  "COALESCE((SELECT MAX(id) FROM certificates), 0) + 1, false)"))
        for name, data in members.items():
            if name.startswith("keys/"):
                path = data_dir / name[len("keys/"):]
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                runtime.write_private(path, data)
                written.append(path)
        report = verify_chain(store.iter_audit(), head=store.audit_head())
        if not report.ok:
            raise InvalidInput(f"restored audit chain does not verify: {report.problem}")
        keys = runtime.key_backend(data_dir, settings, passphrase_file=passphrase_file)
        with store.read() as tx:
            roots = tx.list_roots()
        for root in roots:
            if root.status.value == "retired":
                continue
            cert = x509.load_pem_x509_certificate(root.cert_pem.encode())
            spki = serialization.PublicFormat.SubjectPublicKeyInfo
            if keys.load(root.key_ref).public_key().public_bytes(serialization.Encoding.DER, spki) != \
                    cert.public_key().public_bytes(serialization.Encoding.DER, spki):
                raise InvalidInput(f"the key of root {root.id} does not match its certificate")
        runtime.write_private(data_dir / runtime.SETTINGS_FILE, settings.to_json())
        runtime.write_public(data_dir / "root-cert.pem", "".join(dict.fromkeys(
            r.anchor_pem for r in sorted(roots, key=lambda r: (r.created_at, r.id)) if r.status.value != "retired")))
    except BaseException:
        with store.engine.begin() as conn:  # leave nothing half-restored
            for table in reversed(TABLES):
                conn.execute(delete(table))
        for path in written:
            path.unlink(missing_ok=True)
        if created_dir:
            shutil.rmtree(data_dir, ignore_errors=True)
        raise
    finally:
        store.dispose()
    return {"restored": manifest["tables"], "audit_entries": report.checked, "data_dir": str(data_dir)}


def cmd_backup(args: argparse.Namespace) -> int:
    manifest = backup(Path(args.data_dir), Path(args.out), database_url=args.database_url)
    if args.json:
        print(json.dumps(manifest["tables"]))
    else:
        total = sum(manifest["tables"].values())
        print(f"backup written to {args.out} (mode 0600): {total} rows, "
              f"{len(manifest['key_refs'])} root key reference(s)")
        print("  not included: the key passphrase / PKCS#11 PIN and the admin token — keep them separately")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    out = restore(Path(args.input), Path(args.data_dir), database_url=args.database_url,
                  passphrase_file=Path(args.passphrase_file) if args.passphrase_file else None)
    if args.json:
        print(json.dumps(out))
    else:
        print(f"restored into {out['data_dir']}: {sum(out['restored'].values())} rows, audit chain intact "
              f"({out['audit_entries']} entries)")
    return 0


def add_commands(sub: Any) -> None:
    b = sub.add_parser("backup", help="archive the database and key material (not the passphrase)")
    b.add_argument("--data-dir", required=True)
    b.add_argument("--database-url")
    b.add_argument("--out", required=True, help="archive path (.tar.gz), written 0600")
    b.add_argument("--json", action="store_true")
    b.set_defaults(fn=cmd_backup)
    r = sub.add_parser("restore", help="restore a backup into an empty data directory and database")
    r.add_argument("--data-dir", required=True)
    r.add_argument("--in", dest="input", required=True)
    r.add_argument("--database-url")
    r.add_argument("--passphrase-file")
    r.add_argument("--json", action="store_true")
    r.set_defaults(fn=cmd_restore)
