"""glibc's mmap threshold held for ``serve``: checked against the C library this runs on, in a fresh
process each time (the threshold is process-wide and only ever rises)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

# Allocates and frees a 256 KiB block (uvloop's TLS receive buffer, one per connection), then
# allocates another, and says whether that one landed in the brk heap.
PROBE = textwrap.dedent(
    """
    import ctypes, json, sys
    from ca_server.allocator import keep_large_buffers_mapped
    held = keep_large_buffers_mapped() if sys.argv[1] == "hold" else None
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    libc.free(libc.malloc(256 * 1024))
    second = libc.malloc(256 * 1024)
    heap = [line.split()[0].split("-") for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]")]
    in_heap = any(int(lo, 16) <= second < int(hi, 16) for lo, hi in heap)
    print(json.dumps({"held": held, "in_heap": in_heap}))
    """
)


def probe(mode: str, **env: str) -> dict[str, bool | None]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env={"PATH": "", **env}
    )
    answer: dict[str, bool | None] = json.loads(out.stdout)
    return answer


@pytest.fixture(autouse=True)
def glibc() -> None:
    import ctypes

    if not hasattr(ctypes.CDLL(None), "gnu_get_libc_version"):
        pytest.fail("these tests read glibc's behaviour; this interpreter is not linked against glibc")


def test_without_the_setting_a_freed_large_block_pulls_the_next_into_the_heap() -> None:
    # the premise, on this machine's glibc: the dynamic threshold rose to 256 KiB at the free
    assert probe("leave") == {"held": None, "in_heap": True}


def test_held_the_next_large_block_is_a_mapping_of_its_own() -> None:
    assert probe("hold") == {"held": True, "in_heap": False}


def test_an_operators_own_threshold_is_left_alone() -> None:
    # MALLOC_MMAP_THRESHOLD_ is read by glibc at start and turns the dynamic threshold off itself
    assert probe("hold", MALLOC_MMAP_THRESHOLD_="131072") == {"held": False, "in_heap": False}
