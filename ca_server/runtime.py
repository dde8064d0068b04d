"""Builds a running CA from a data directory: settings file, store, key backend, authority.

``D/ca.json`` records what ``init`` chose (key backend, organisation, database URL when not the
embedded SQLite) so ``serve`` and ``audit verify`` need only ``--data-dir``. The audit key is
``D/audit-key`` unless ``MESHBRIDGE_AUDIT_KEY_FILE`` or ca.json's ``audit_key_file`` names another
file (replicas share one, e.g. from a Kubernetes Secret); the anchors are ``D/audit-anchors``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from ca_server import sealing
from ca_server.core.authority import Authority, Policy
from ca_server.core.errors import InvalidInput
from ca_server.core.ports import Store
from ca_server.keys.base import KeyBackend, KeyType
from ca_server.storage.migrate import upgrade
from ca_server.storage.repository import SqlStore, sqlite_url

SETTINGS_FILE = "ca.json"
AUDIT_KEY_FILE = "audit-key"
AUDIT_KEY_ENV = "MESHBRIDGE_AUDIT_KEY_FILE"
ANCHORS_FILE = "audit-anchors"


@dataclass
class CASettings:
    org: str = "meshbridge"
    key_backend: str = "file"
    root_key_type: str = "ecdsa-p256"
    database_url: str | None = None
    pkcs11: dict[str, Any] = field(default_factory=dict)  # module, token_label, pin_file (never the PIN)
    audit_key_file: str | None = None  # the audit key when not D/audit-key (never the key itself)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True) + "\n"


def write_private(path: Path, data: bytes | str, *, mode: int = 0o600) -> None:
    """Atomically create ``path`` with ``mode`` (never world-readable, even for a moment)."""
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, raw)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_public(path: Path, text: str) -> None:
    write_private(path, text, mode=0o644)


def load_settings(data_dir: Path) -> CASettings:
    path = data_dir / SETTINGS_FILE
    if not path.exists():
        raise InvalidInput(f"{data_dir} holds no CA: run `meshbridge-ca init --data-dir {data_dir}` first")
    raw = json.loads(path.read_text())
    return CASettings(**{k: v for k, v in raw.items() if k in CASettings.__dataclass_fields__})


def database_url(data_dir: Path, settings: CASettings, override: str | None) -> str:
    return override or os.environ.get("MESHBRIDGE_DATABASE_URL") or settings.database_url or sqlite_url(data_dir)


def audit_key_path(data_dir: Path, settings: CASettings, override: Path | None = None) -> Path:
    """Where the audit key is: ``override`` (a flag), MESHBRIDGE_AUDIT_KEY_FILE, ca.json, D/audit-key."""
    given = override or os.environ.get(AUDIT_KEY_ENV) or settings.audit_key_file
    return Path(given) if given else data_dir / AUDIT_KEY_FILE


def anchor_log(data_dir: Path) -> sealing.AnchorLog:
    return sealing.AnchorLog(data_dir / ANCHORS_FILE)


def audit_anchoring(data_dir: Path, store: Store) -> Callable[[], Coroutine[Any, Any, None]]:
    """``serve``'s background task anchoring the head of ``store``'s chain in D/audit-anchors."""
    if not isinstance(store, SqlStore) or store.audit_key is None:
        raise ValueError("anchoring needs a store opened with its audit key (build_authority)")
    return functools.partial(sealing.keep_anchored, sealing.Anchorer(store, store.audit_key, anchor_log(data_dir)))


def open_store(url: str, *, migrate: bool = True, prepared_statements: bool = True) -> SqlStore:
    store = SqlStore(url, prepared_statements=prepared_statements)
    if migrate:
        upgrade(store.engine)
    return store


def key_backend(
    data_dir: Path, settings: CASettings, *, passphrase_file: Path | None = None, create: bool = False
) -> KeyBackend:
    if settings.key_backend == "pkcs11":
        from ca_server.keys.pkcs11 import Pkcs11KeyBackend, resolve_pkcs11_pin  # optional dependency at runtime

        p = settings.pkcs11
        pin = resolve_pkcs11_pin(pin_file=Path(p["pin_file"]) if p.get("pin_file") else None)
        return Pkcs11KeyBackend(p.get("module") or "/usr/lib/softhsm/libsofthsm2.so", p["token_label"], pin)
    from ca_server.keys.file import FileKeyBackend, resolve_passphrase

    passphrase = resolve_passphrase(data_dir, passphrase_file=passphrase_file, create=create)
    return FileKeyBackend(data_dir, passphrase)


def build_authority(
    data_dir: Path,
    *,
    database_url_override: str | None = None,
    passphrase_file: Path | None = None,
    migrate: bool = True,
    prepared_statements: bool = True,
    workload_cert_lifetime: timedelta | None = None,
) -> Authority:
    """``workload_cert_lifetime``: ``serve --workload-cert-lifetime`` (None: Istio's default, 24 h)."""
    settings = load_settings(data_dir)
    store = open_store(
        database_url(data_dir, settings, database_url_override),
        migrate=migrate,
        prepared_statements=prepared_statements,
    )
    sealing.open_for_writing(store, audit_key_path(data_dir, settings), anchor_log(data_dir))
    keys = key_backend(data_dir, settings, passphrase_file=passphrase_file)
    policy = Policy(org=settings.org, root_key_type=KeyType(settings.root_key_type))
    if workload_cert_lifetime is not None:
        policy = dataclasses.replace(policy, workload_cert_lifetime=workload_cert_lifetime)
    return Authority(store, keys, policy=policy)
