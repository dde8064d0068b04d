"""The speed-ups that reach into framework internals, each one switchable.

Each is on by default (it is what the benchmarks in bench/RESULTS.md measure). Off, the framework's
own path runs instead: after an upgrade of FastAPI/Starlette, uvicorn/httptools or SQLAlchemy that
breaks one, an operator turns that one off (``meshbridge-ca serve --no-…``) and keeps serving.
The versions they were written against are pinned in constraints.txt.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Final


@dataclass(frozen=True)
class Speedups:
    # api/fastpath.py: the agents' well-formed renewals, status reports and desired-state long-polls
    # answered outside FastAPI's middleware stack, through an override of
    # FastAPI.build_middleware_stack; off: the FastAPI routes, guards added by add_middleware
    agent_shortcut: bool = True
    # http_protocol.py: the listener's protocol with a transport that joins a response's writes;
    # off: the listener's guarded protocol alone (listener.py, always used: connection cap, head and
    # body deadlines, head size cap), writing as uvicorn's httptools protocol does
    joined_writes: bool = True
    # storage/repository.py: hot statements compiled once and run on the DBAPI connection with the
    # column types' own processors (_Prepared); off: the same statements through SQLAlchemy Core
    prepared_statements: bool = True

    def off(self) -> list[str]:
        """The names of the speed-ups turned off."""
        return [f.name for f in fields(self) if not getattr(self, f.name)]


ALL_ON: Final = Speedups()
ALL_OFF: Final = Speedups(agent_shortcut=False, joined_writes=False, prepared_statements=False)  # the plain paths
