"""Render mode: the objects as YAML files in a directory (GitOps, review, offline use).

One file per object, ``<kind>-<namespace>-<name>.yaml``, written atomically; the cacerts Secret
is 0600. Files of objects no longer wanted are pruned, but only files this writer made (listed in
``.meshbridge/written.json``); nothing else in the directory is touched. ``dry_run`` prints a
unified diff and writes nothing.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from cluster_agent.apply import ApplyReport
from cluster_agent.render import file_name, to_yaml


def dump(obj: dict[str, Any]) -> str:
    return to_yaml(obj)


def _is_secret(obj: dict[str, Any]) -> bool:
    return obj.get("kind") == "Secret"


class DirectoryWriter:
    def __init__(
        self,
        out: Path,
        *,
        state_dir: Path,
        corefile: Path | None = None,
        dry_run: bool = False,
        stream: TextIO = sys.stdout,
        service_exports: list[dict[str, Any]] | None = None,
    ) -> None:
        self.out = out
        self.state_dir = state_dir
        self.corefile = corefile
        self.dry_run = dry_run
        self.stream = stream
        self._service_exports = service_exports or []

    def current_corefile(self) -> str | None:
        return self.corefile.read_text() if self.corefile else None

    def mesh_facts(self) -> None:
        """Render mode reads no cluster: Istio's preconditions are not checked (`meshcheck`)."""
        return None

    def service_exports(self) -> list[dict[str, Any]]:
        return list(self._service_exports)

    def _written(self) -> set[str]:
        path = self.state_dir / "written.json"
        return set(json.loads(path.read_text())) if path.exists() else set()

    def apply(self, objects: list[dict[str, Any]], *, corefile_block: str | None = None) -> ApplyReport:
        report = ApplyReport()
        wanted: dict[str, str] = {file_name(o): dump(o) for o in objects}
        secrets = {file_name(o) for o in objects if _is_secret(o)}
        if not self.dry_run:
            self.out.mkdir(parents=True, exist_ok=True)
        for name, text in sorted(wanted.items()):
            self._put(name, text, secret=name in secrets, report=report)
        for name in sorted(self._written() - set(wanted)):
            report.pruned.append(name)
            if self.dry_run:
                self.stream.write(f"--- {name}\n+++ /dev/null (pruned)\n")
            else:
                (self.out / name).unlink(missing_ok=True)
        if not self.dry_run:
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._write(self.state_dir / "written.json", json.dumps(sorted(wanted), indent=1), mode=0o600)
        return report

    def apply_cacerts(self, secret: dict[str, Any]) -> ApplyReport:
        """Write Secret `cacerts` alone (its CRLs re-signed in a pass without the CA service); no
        other file is touched or pruned."""
        report = ApplyReport()
        name = file_name(secret)
        if not self.dry_run:
            self.out.mkdir(parents=True, exist_ok=True)
        self._put(name, dump(secret), secret=True, report=report)
        written = self._written()
        if not self.dry_run and name not in written:
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._write(self.state_dir / "written.json", json.dumps(sorted(written | {name}), indent=1), mode=0o600)
        return report

    def _put(self, name: str, text: str, *, secret: bool, report: ApplyReport) -> None:
        path = self.out / name
        old = path.read_text() if path.exists() else None
        if old == text:
            report.unchanged.append(name)
            return
        (report.created if old is None else report.updated).append(name)
        if self.dry_run:
            self._diff(name, old or "", text, secret=secret)
        else:
            self._write(path, text, mode=0o600 if secret else 0o644)

    def _diff(self, name: str, old: str, new: str, *, secret: bool) -> None:
        if secret:  # never print key material, even in a diff
            self.stream.write(f"~ {name} (Secret: content changed, not shown)\n")
            return
        self.stream.writelines(
            difflib.unified_diff(old.splitlines(True), new.splitlines(True), fromfile=f"a/{name}", tofile=f"b/{name}")
        )

    @staticmethod
    def _write(path: Path, text: str, *, mode: int) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
