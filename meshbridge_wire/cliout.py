"""What both command-line tools print: a result in two forms, and errors.

Every command builds an ``Output``: ``data`` is its ``--json`` form (a JSON document with stable,
documented keys; docs/api.md and docs/agent-config.md list them), ``text`` its default form, a
short summary for people (a table for a list, ``key: value`` lines for one object, one line for an
action). ``emit`` prints one of the two, never both, so a secret in a result is printed once.

An error is one line on stderr naming what to fix (``PROG: message``), and with ``--json`` also
``{"error": message, "exit_code": N, ...}`` on stdout, so a script reading stdout always gets JSON.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO


@dataclass(frozen=True)
class Output:
    """A command's result: ``data`` for ``--json``, ``text`` for people, the exit status."""

    data: Any
    text: str
    code: int = 0
    text_to_stderr: bool = False  # the default form of a failure (a broken audit chain) goes to stderr


def emit(out: Output, *, as_json: bool, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Print ``out`` in one form and return its exit status."""
    if as_json:
        print(json.dumps(out.data, indent=2), file=stdout or sys.stdout)
    elif out.text:
        print(out.text, file=(stderr or sys.stderr) if out.text_to_stderr else (stdout or sys.stdout))
    return out.code


def fail(prog: str, message: str, code: int, *, as_json: bool, extra: Mapping[str, Any] | None = None) -> int:
    """Report an error: ``PROG: message`` on stderr and, with ``as_json``, the JSON error object on
    stdout (``extra`` adds keys, e.g. the lagging clusters of a refused root phase). Returns ``code``."""
    print(f"{prog}: {message}", file=sys.stderr)
    if as_json:
        first_line = message.split("\n", 1)[0]
        print(json.dumps({"error": first_line, "exit_code": code, **(extra or {})}, indent=2))
    return code


def table(rows: Iterable[Iterable[Any]], header: list[str]) -> str:
    """Columns padded to their widest cell, two spaces apart; the header first."""
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(x) for x in col) for col in zip(*cells, strict=False)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in cells)


def fields(pairs: Iterable[tuple[str, Any]], *, indent: str = "") -> str:
    """``key: value`` lines, values aligned; None shows as ``-``."""
    items = [(k, "-" if v is None else str(v)) for k, v in pairs]
    width = max((len(k) for k, _ in items), default=0) + 1
    return "\n".join(f"{indent}{(k + ':').ljust(width)} {v}" for k, v in items)
