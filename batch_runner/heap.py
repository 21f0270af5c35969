"""Keep a long run's memory from creeping up through heap fragmentation (glibc only).

glibc serves a large allocation from ``mmap`` until one such block is freed; from then on
it raises its threshold to that block's size and serves blocks up to it from the heap.
A run frees big blocks early (the ingest's batches), so later big blocks land in the
heap. The biggest one that keeps coming back is CPython's table of interned strings:
pathlib interns every part of every path it parses, each job brings new names (its image,
its output, the server's file name), and every few thousand jobs the table is rebuilt at
a few MB. Each new table is allocated before the old one is freed, so it cannot reuse the
old one's place and the heap grows by about that much: 33 MB over 100,000 jobs.

Fixing the threshold keeps such blocks in ``mmap``, which hands them back to the system
when they are freed. The cost is a system call per block of ``MMAP_THRESHOLD`` or more,
which a job allocates a handful of times.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

#: glibc's ``M_MMAP_THRESHOLD`` option of ``mallopt``.
_M_MMAP_THRESHOLD = -3
#: Blocks of this size or more are always mapped on their own; glibc's starting value is
#: 128 KiB, and network buffers and video chunks stay below 1 MiB.
MMAP_THRESHOLD = 1 << 20
#: Set by the user to tune glibc themselves; then it is left alone.
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")

_done = False


def fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at ``MMAP_THRESHOLD`` once per process; return whether
    it is set (False off Linux, on another C library, or when the user tuned it)."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux") or any(v in os.environ for v in _USER_SETTINGS):
        return False
    try:
        # The process's own symbols include the C library's.
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    _done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1)
    if not _done:
        log.debug("mallopt(M_MMAP_THRESHOLD) was refused; memory may creep up on long runs")
    return _done
