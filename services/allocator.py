"""How a long-running dartserve process asks glibc's malloc to keep the memory it frees.

By default glibc serves every allocation over 128 KiB (at first) with a fresh ``mmap`` and
hands freed memory at the top of a heap back to the kernel. A model step allocates megabytes
of activations and frees them at the end, so the next request touches fresh pages again,
and pays a page fault for each (docs/benchmarks.md has what that costs). Kept, the same pages
serve the next request. jemalloc and tcmalloc, the allocators PyTorch recommends for CPU
serving, keep freed pages for reuse too.
"""

from __future__ import annotations

import ctypes
import logging

# mallopt's parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest: bigger blocks (weights) still come and go by mmap
TRIM_THRESHOLD_BYTES = 1 << 30

log = logging.getLogger(__name__)


def keep_freed_memory() -> bool:
    """True when set; False where the C library has no such settings (musl, macOS): nothing changes."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library; find_library would run ldconfig
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    if not done:
        log.warning("mallopt refused the allocator settings; freed memory goes back to the kernel")
    return done
