"""Keeping the engine's thread the only one with OpenMP workers of its own.

torch on the CPU runs its kernels on OpenMP, and libgomp gives every thread that starts a
parallel region a team of worker threads of its own, kept until that thread exits. Once the
process holds more such workers than it has cores, libgomp has all of them spin only briefly
before sleeping between parallel regions, and a decode step, a thousand short regions, then pays
a wake-up for each: on the development machine (2 cores), one request's decode step of the
bench model took 35-36 ms in the engine's thread while the thread that had loaded the model
still held its team, 26 ms once it did not (27.9 ms run from the loading thread itself). The
threads that serve requests make teams of their own too (a prompt's image tokens are copied
into one tensor in the caller's thread), so each lets its workers go when it hands its request
to the engine; they come back, at the cost of starting a thread, if it runs torch again.
"""

from __future__ import annotations

import ctypes
import functools

OMP_PAUSE_HARD = 2  # omp_pause_resource_t: the workers exit, and come back at the next parallel region


@functools.cache
def _libgomp() -> ctypes.CDLL | None:
    """The libgomp torch loaded (its file name varies between builds), or None for another runtime."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libgomp" in line}
    except OSError:  # not Linux
        return None
    for path in sorted(paths):
        library = ctypes.CDLL(path)
        if hasattr(library, "omp_pause_resource_all"):
            return library
    return None


def release_workers() -> None:
    """Lets the calling thread's OpenMP workers exit; they start again if it runs torch again."""
    library = _libgomp()
    if library is not None:
        library.omp_pause_resource_all(OMP_PAUSE_HARD)
