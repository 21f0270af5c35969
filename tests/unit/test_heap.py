"""The mmap threshold stays fixed, so a big block freed late in a run goes back to the
system instead of leaving a hole in the heap (see ``batch_runner.heap``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# In a fresh process: free an 8 MB block (glibc would raise its threshold to 8 MB), then
# ask for a 2 MB one and print whether it was mapped on its own (mallinfo2's hblks).
_PROBE = textwrap.dedent(
    """
    import ctypes, sys
    from batch_runner import heap
    if sys.argv[1] == "fixed":
        assert heap.fix_mmap_threshold()
    libc = ctypes.CDLL(None)
    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc.mallinfo2.restype = Info
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = (ctypes.c_void_p,)
    libc.free(libc.malloc(8 << 20))
    before = libc.mallinfo2().hblks
    block = libc.malloc(2 << 20)
    print(libc.mallinfo2().hblks - before)
    libc.free(block)
    """
)


def _mapped_after_a_big_free(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout)


def _has_glibc_mallinfo2() -> bool:
    import ctypes

    try:
        ctypes.CDLL(None).mallinfo2  # noqa: B018
    except AttributeError:
        return False
    return sys.platform.startswith("linux")


pytestmark = pytest.mark.skipif(not _has_glibc_mallinfo2(), reason="needs glibc 2.33+")


def test_without_the_fix_glibc_serves_a_big_block_from_the_heap() -> None:
    # The behaviour the fix is for: this shows the probe can tell the two apart.
    assert _mapped_after_a_big_free("default") == 0


def test_with_the_fix_a_big_block_is_mapped_on_its_own() -> None:
    assert _mapped_after_a_big_free("fixed") == 1


def test_a_user_tuned_allocator_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    from batch_runner import heap

    monkeypatch.setattr(heap, "_done", False)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert heap.fix_mmap_threshold() is False
