"""Allocator tuning for processes that copy whole models every round.

Every site and round allocates model-sized tensors and frees them soon after: the weights it
returns, fresh optimiser moments, gradients, the server's running sums. glibc serves blocks
above its mmap threshold (128 KiB to 32 MiB, adapting) with fresh ``mmap`` pages and gives them
back on free, so each such tensor costs one page fault per 4 KiB when first written — for a
ResNet-18 (45 MB) that was ~30 ms per copy against ~5 ms once the pages stay in the heap
(measured on the 2-core benchmark machine; see docs/performance.md). Raising the mmap and trim
thresholds keeps freed blocks for reuse: faster steady-state rounds, and a resident size that
stays at its high-water mark instead of shrinking between rounds (the peak is unchanged).

PyTorch's CPU performance guides recommend jemalloc or tcmalloc for the same reason; this needs
neither. Off with ``FEDFAIR_MALLOC_TUNING=0``; a no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Blocks up to this size come from the heap and are reused after free.
KEEP_BYTES = 1 << 30

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the tuning once per process; True when it is in effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("FEDFAIR_MALLOC_TUNING", "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt, Windows)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES))
    return _applied
