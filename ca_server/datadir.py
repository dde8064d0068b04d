"""Modes of the data directory and of the SQLite database in it: 0700 and 0600.

meshbridge writes keys, tokens and ca.json 0600 file by file. Two things escape that: a data
directory that existed before ``init``/``restore`` (created 0755 by an operator or a provisioner),
and the database file, which SQLite creates with the process umask (usually 0644) and whose
``-wal`` and ``-shm`` files then take its mode.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from sqlalchemy.engine import make_url

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def make_private_dir(path: Path) -> str | None:
    """Create ``path`` 0700, or bring an existing directory to 0700.

    Only a directory's owner may change its mode: for one owned by another user (a Kubernetes
    volume's root is often root's, group-shared through fsGroup) this returns a warning to show
    instead of failing; the secrets in it are 0600 files all the same."""
    path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    info = path.stat()
    if stat.S_IMODE(info.st_mode) == PRIVATE_DIR:
        return None
    try:
        path.chmod(PRIVATE_DIR)
    except PermissionError:
        return (
            f"{path} is mode {stat.S_IMODE(info.st_mode):04o} and owned by uid {info.st_uid}, so its mode "
            f"cannot be set to {PRIVATE_DIR:04o}; the key and token files in it are {PRIVATE_FILE:04o}"
        )
    return None


def make_private_sqlite(url: str) -> None:
    """For a SQLite database file: create it empty with mode 0600 before SQLite opens it (so its
    -wal and -shm files are 0600 too), or set an existing one and its -wal/-shm to 0600.
    Other URLs (PostgreSQL, in-memory SQLite) are left alone."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return
    database = Path(str(parsed.database))
    fd = os.open(database, os.O_WRONLY | os.O_CREAT, PRIVATE_FILE)  # an empty file is an empty database
    try:
        os.fchmod(fd, PRIVATE_FILE)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm"):
        companion = database.with_name(database.name + suffix)
        if companion.exists():
            companion.chmod(PRIVATE_FILE)
