"""Keeping the engine's thread the only one with OpenMP workers of its own.

torch on the CPU runs its kernels on OpenMP, and libgomp gives every thread that starts a
parallel region a team of worker threads of its own, kept until that thread exits. Once the
process holds more such workers than it has cores, libgomp has all of them spin only briefly
before sleeping between parallel regions, and a decode step, a thousand short regions, then pays
a wake-up for each: on the development machine (2 cores), one request's decode step of the
bench model, paired in one process, took 35.7-42.6 ms in a thread of its own while the thread
that had loaded the model held its team, 31.1-31.8 ms in the engine loop's thread once that
team was gone (28.5-30.3 ms run from the loading thread itself). The threads that serve
requests make teams of their own too (a prompt's image tokens are copied into one tensor in the
caller's thread), so each lets its workers go when it hands its request to the engine; they
come back, at the cost of starting a thread, if it runs torch again.
"""

from __future__ import annotations

import ctypes
import functools

import torch  # noqa: F401 - loads libgomp, which is looked for once

OMP_PAUSE_HARD = 2  # omp_pause_resource_t: the workers exit, and come back at the next parallel region


@functools.cache
def _libgomps() -> tuple[ctypes.CDLL, ...]:
    """The libgomp copies this process has loaded (torch's file name varies between builds);
    none with another OpenMP runtime or off Linux."""
    try:
        with open("/proc/self/maps") as maps:
            fields = [line.split(maxsplit=5) for line in maps]
    except OSError:
        return ()
    paths = {f[5].strip().removesuffix(" (deleted)") for f in fields if len(f) == 6 and "/libgomp" in f[5]}
    libraries = []
    for path in sorted(paths):
        try:
            library = ctypes.CDLL(path)
        except OSError:  # replaced on disk since it was loaded
            continue
        if hasattr(library, "omp_pause_resource_all"):
            libraries.append(library)
    return tuple(libraries)


_shared_cores = False


def share_cores() -> None:
    """For a process that runs its model beside other model processes on the same cores (the
    distributed stages): its threads keep their workers, and libgomp's short spinning leaves the
    cores to the other processes while this one waits. With one team spinning in full in each of
    them, the distributed demo workload at 16 clients got 0.20 of the engine alone's throughput
    on 2 cores, against 1.07 before."""
    global _shared_cores
    _shared_cores = True


def release_workers() -> None:
    """Lets the calling thread's OpenMP workers exit; they start again if it runs torch again."""
    if _shared_cores:
        return
    for library in _libgomps():
        library.omp_pause_resource_all(OMP_PAUSE_HARD)
