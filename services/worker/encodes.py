"""One encode per image among the items a worker runs at once.

The backends cache an image's tokens once they have encoded it (the engine backend in memory,
the vision stage in Redis), but items that share an image and start together would all miss
that cache and encode it each. So the first of them encodes it while the others wait until
its answer has begun (its image tokens are cached by then) or has ended.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class FirstEncodes:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._encoding: dict[str, threading.Event] = {}

    def claim(self, keys: list[str]) -> Callable[[], None]:
        """Waits while another item encodes any of ``keys``, then claims them all at once (no item
        holds some while it waits for others, so none waits on another for ever); returns what
        releases them, which may be called more than once."""
        while True:
            with self._lock:
                busy = next((self._encoding[k] for k in keys if k in self._encoding), None)
                if busy is None:
                    mine = threading.Event()
                    for key in keys:
                        self._encoding[key] = mine
                    break
            busy.wait()

        def release() -> None:
            if mine.is_set():
                return
            with self._lock:
                for key in keys:
                    if self._encoding.get(key) is mine:
                        del self._encoding[key]
                mine.set()

        return release
