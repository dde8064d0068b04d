"""Where `make testbin` (scripts/testbin.sh) put the real binaries, computed the same way.

The directory is ``$MESHBRIDGE_TESTBIN`` if set, else ``~/.cache/meshbridge/testbin/<hash>`` where
<hash> covers testbin/versions.env, the build modules under testbin/ and ``go env GOVERSION``.
Keep HASH_FILES and the hashing below in step with scripts/testbin.sh.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GO_CHECKER_DIR = REPO / "tests" / "e2e" / "go"
HASH_FILES = (
    "testbin/versions.env",
    "testbin/etcd/go.mod",
    "testbin/etcd/go.sum",
    "testbin/etcd/main.go",
    "testbin/kube/go.mod",
    "testbin/kube/go.sum",
)
TOOLS = ("etcd", "kube-apiserver", "kubectl", "istioctl", "coredns", "helm", "zlint", "promtool")
HINT = "run `make testbin` (bash scripts/testbin.sh) to build the real binaries the e2e tests need"


class TestbinMissing(RuntimeError):
    """The testbin cache lacks something; the message says how to build it."""


def go_binary() -> str | None:
    return (
        os.environ.get("GO")
        or shutil.which("go")
        or ("/usr/local/go/bin/go" if os.access("/usr/local/go/bin/go", os.X_OK) else None)
    )


@functools.cache
def go_version() -> str | None:
    go = go_binary()
    if go is None:
        return None
    out = subprocess.run(
        [go, "env", "GOVERSION"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "GOTOOLCHAIN": "local"},
    )
    return out.stdout.strip()


def _hash(entries: list[tuple[str, bytes]], gover: str) -> str:
    h = hashlib.sha256()
    for name, content in entries:
        h.update(name.encode() + b"\0" + content + b"\0")
    h.update(f"go={gover}".encode())
    return h.hexdigest()[:16]


@functools.cache
def testbin_dir() -> Path:
    """The testbin directory (it may not exist yet)."""
    env = os.environ.get("MESHBRIDGE_TESTBIN")
    if env:
        return Path(env)
    root = Path.home() / ".cache" / "meshbridge" / "testbin"
    gover = go_version()
    if gover is None:
        # No Go toolchain here: trust the directory the last `make testbin` recorded.
        current = root / "current"
        if current.exists():
            return current.resolve()
        raise TestbinMissing(f"no Go toolchain to locate the testbin cache; {HINT}")
    entries = [(f, (REPO / f).read_bytes()) for f in HASH_FILES]
    return root / _hash(entries, gover)


def bin_dir() -> Path:
    return testbin_dir() / "bin"


def _fail(msg: str) -> None:
    pytest.fail(msg, pytrace=False)


def require(tool: str) -> Path:
    """Path of a built tool; fails the calling test (never skips) if it is not there."""
    try:
        d = bin_dir()
    except TestbinMissing as e:
        _fail(str(e))
        raise
    p = d / tool
    if not (d / ".complete").exists() or not os.access(p, os.X_OK):
        _fail(f"{tool} not found in {d} (or the build there is incomplete): {HINT}")
    return p


def go_checker_hash() -> str:
    """Hash of the Go checker sources (tests/e2e/go, testdata excluded), as scripts/testbin.sh."""
    gover = go_version()
    if gover is None:
        raise TestbinMissing(f"no Go toolchain to hash tests/e2e/go; {HINT}")
    names = sorted(
        p.relative_to(GO_CHECKER_DIR).as_posix()
        for p in GO_CHECKER_DIR.rglob("*")
        if p.is_file()
        and (p.suffix == ".go" or p.name in ("go.mod", "go.sum"))
        and not p.relative_to(GO_CHECKER_DIR).as_posix().startswith("testdata/")
    )
    return _hash([(n, (GO_CHECKER_DIR / n).read_bytes()) for n in names], gover)


def go_checker() -> Path:
    """The prebuilt `go test -c` binary of tests/e2e/go for the current sources."""
    try:
        name = f"istiocheck-{go_checker_hash()}.test"
    except TestbinMissing as e:
        _fail(str(e))
        raise
    return require(name)
