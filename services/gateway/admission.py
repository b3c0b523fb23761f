"""Admission control: at most a set number of requests are in one phase (receiving their body,
or being answered) at once. One more gets a 429 with Retry-After straight away, instead of
waiting in a queue that grows without bound."""

from __future__ import annotations

import threading

from services.frontend.inputs import ApiError

RETRY_AFTER_S = "1"


class Admission:
    def __init__(self, limit: int, doing: str) -> None:
        """``doing``: what the admitted requests are being, for the 429's message."""
        self.limit, self.doing, self.active = limit, doing, 0
        self._lock = threading.Lock()

    def check(self) -> None:
        """A 429 if ``enter`` would refuse now; takes nothing."""
        if self.active >= self.limit:
            raise self._full()

    def enter(self) -> Slot:
        with self._lock:
            if self.active >= self.limit:
                raise self._full()
            self.active += 1
        return Slot(self)

    def _full(self) -> ApiError:
        return ApiError(
            429, f"the server is {self.doing} {self.limit} requests, its limit; retry shortly",
            kind="rate_limit_exceeded", headers={"Retry-After": RETRY_AFTER_S},
        )

    def _leave(self) -> None:
        with self._lock:
            self.active -= 1


class Slot:
    """One admitted request; released once, however many times ``release`` is called (or its
    ``with`` block ends)."""

    def __init__(self, admission: Admission) -> None:
        self._admission, self._held = admission, True
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            held, self._held = self._held, False
        if held:
            self._admission._leave()

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *error) -> None:
        self.release()
