"""The C allocator's settings for ``serve``: large buffers stay mappings of their own.

Every TLS connection ``serve`` holds has a 256 KiB receive buffer of its own: uvloop's
``SSLProtocol.__cinit__`` takes ``SSL_READ_MAX_SIZE`` (256 * 1024, ``includes/consts.pxi``) with
``PyMem_RawMalloc``, that is ``malloc``. glibc serves a request above its mmap threshold (128 KiB at
start) with a mapping of its own, whose untouched pages cost no memory and which goes back to the
kernel whole when freed; but freeing such a chunk raises the threshold to that chunk's size
(``__libc_free`` in glibc's ``malloc/malloc.c``: "See if the dynamic brk/mmap threshold needs
adjusting", skipped only when ``mp_.no_dyn_threshold``). After the first connection closes, every
later connection's buffer comes from the heap instead, among small allocations whose pages were
touched, and the heap cannot shrink below a live buffer. A fleet of long-polling agents keeps thousands of these buffers
alive through an event, so the server's RSS climbed through it: PostgreSQL 10,000 agents peaked at
985 to 1,013 MiB (``bench/fleet_event.py``), 859 to 987 MiB with the threshold held at 128 KiB (see
``bench/RESULTS.md``).

``keep_large_buffers_mapped()`` sets the threshold explicitly: ``mallopt(M_MMAP_THRESHOLD, …)``
sets ``mp_.no_dyn_threshold`` (``do_set_mmap_threshold``; mallopt(3): setting it turns the dynamic
adjustment off). An operator's own ``MALLOC_MMAP_THRESHOLD_`` (the same setting, read
by glibc at start) is left alone, as is a C library without ``mallopt``. Called once, before the
first connection.
"""

from __future__ import annotations

import ctypes
import os

M_MMAP_THRESHOLD = -3  # <malloc.h>
MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value (DEFAULT_MMAP_THRESHOLD_MIN)
ENVIRONMENT = "MALLOC_MMAP_THRESHOLD_"


def keep_large_buffers_mapped() -> bool:
    """Hold glibc's mmap threshold at 128 KiB; True when set here."""
    if ENVIRONMENT in os.environ:
        return False  # the operator's choice, already applied by glibc at start
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False  # a C library without it: nothing to hold
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
