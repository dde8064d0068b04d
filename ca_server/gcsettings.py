"""The cyclic garbage collector's settings for ``serve``.

A CA serving a fleet holds every agent's connection and waiting long-poll: at 10,000 agents over a
million objects the collector tracks, nearly none of them garbage. CPython (3.11) collects its
oldest generation once ten collections of the middle one have run and the objects promoted since
the last full collection are at least a quarter of those that survived it (``gc_collect_generations``
in ``Modules/gcmodule.c``, thresholds 700, 10, 10): a fleet event promotes that many objects every
few seconds, so full collections followed each other, each scanning every object with the event
loop stopped. Measured in a SQLite 10,000-agent fleet event (``bench/fleet_event.py``, a
``gc.callbacks`` timer in ``serve``): 28 full collections of 0.5 to 1.1 s each, 16 s in all, and
nearly nothing freed; one of them, 0.93 s, inside a ``root activate`` request (1.79 s instead of
about 0.8 s).

``tune()``, called once the app is built: ``gc.freeze()`` moves what start-up made (modules,
classes, the app and its routes; never garbage) out of every later collection, and a full
collection is considered every ``OLD`` collections of the middle generation instead of every 10
(the quarter rule above still applies). The young and middle generations keep CPython's
thresholds: they are small, and most garbage cycles die there. In the same event: no full
collection until the fleet had renewed, and ``root activate`` answered in 1.03 s with a 0.2 s
middle collection inside. Raising the young threshold as well (50,000, 20, 100) was tried: each
young collection then took 20 to 650 ms (30 of them, 3.4 s, in a PostgreSQL 10,000 event).

``paused()``: the collector off through one request that reads the whole fleet (``root activate``,
``root retire``), so the collections its own allocations set off run after its answer.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

YOUNG = 700  # CPython's
MIDDLE = 10  # CPython's
OLD = 1000  # CPython's is 10


def tune() -> None:
    gc.freeze()
    gc.set_threshold(YOUNG, MIDDLE, OLD)


_lock = threading.Lock()
_pausing = 0  # requests inside paused() now
_resume = False  # whether the collector was on when the first of them began


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """The collector off while a request that reads the whole fleet runs (``root activate`` and
    ``root retire`` check every cluster's reported state: at 10,000 clusters hundreds of thousands
    of new objects, and the collections they set off ran inside the request: 0.2 s of a 1.03 s
    activate, 0.93 s of a 1.79 s one). What they leave is collected after. Nested and concurrent
    uses keep it off until the last ends; a collector turned off elsewhere stays off."""
    global _pausing, _resume
    with _lock:
        if _pausing == 0:
            _resume = gc.isenabled()
            gc.disable()
        _pausing += 1
    try:
        yield
    finally:
        with _lock:
            _pausing -= 1
            if _pausing == 0 and _resume:
                gc.enable()
