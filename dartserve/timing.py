"""Wall-clock timing that waits for queued GPU work, so a stage is charged for its own kernels."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def stopwatch(device: torch.device, into: list[float]) -> Iterator[None]:
    """Appends the seconds the block took to ``into``."""
    synchronize(device)
    started = time.perf_counter()
    yield
    synchronize(device)
    into.append(time.perf_counter() - started)
