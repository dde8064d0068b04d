"""The cyclic garbage collector's settings for ``serve``.

A CA serving a fleet holds every agent's connection and waiting long-poll: at 10,000 agents over a
million objects the collector tracks, nearly none of them garbage. CPython (3.11) collects its
oldest generation once ten collections of the middle one have run and the objects promoted since
the last full collection are at least a quarter of those that survived it (``gc_collect_generations``
in ``Modules/gcmodule.c``, thresholds 700, 10, 10): a fleet event promotes that many objects every
few seconds, so full collections followed each other, each scanning every object with the event
loop stopped. Measured in a SQLite 10,000-agent fleet event (``bench/fleet_event.py``, a
``gc.callbacks`` timer in ``serve``): 28 full collections of 0.5 to 1.1 s each, 16 s in all, and
nearly nothing freed.

``tune()``, called once the app is built: ``gc.freeze()`` moves what start-up made (modules,
classes, the app and its routes; never garbage) out of every later collection, and higher
thresholds make collections rarer. The young generation is collected every ``YOUNG`` net new
tracked objects instead of 700, the middle one every ``MIDDLE`` young collections, and a full
collection is considered every ``OLD`` middle ones (the quarter rule above still applies): in the
same event, 1 full collection and 4.8 s of collections in all. Cycles still die at the next young
collection: garbage waits for at most ``YOUNG`` allocations more than before.
"""

from __future__ import annotations

import gc

YOUNG = 50_000
MIDDLE = 20
OLD = 100


def tune() -> None:
    gc.freeze()
    gc.set_threshold(YOUNG, MIDDLE, OLD)
