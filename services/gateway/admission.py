"""Admission control: at most a set number of requests are answered at once. One more gets a
429 with Retry-After straight away, instead of waiting in a queue that grows without bound."""

from __future__ import annotations

import threading

from services.gateway.inputs import ApiError

RETRY_AFTER_S = "1"


class Admission:
    def __init__(self, limit: int) -> None:
        self.limit, self.active = limit, 0
        self._lock = threading.Lock()

    def enter(self) -> Slot:
        with self._lock:
            if self.active >= self.limit:
                raise ApiError(
                    429, f"the server is answering {self.limit} requests, its limit; retry shortly",
                    kind="rate_limit_exceeded", headers={"Retry-After": RETRY_AFTER_S},
                )
            self.active += 1
        return Slot(self)

    def _leave(self) -> None:
        with self._lock:
            self.active -= 1


class Slot:
    """One admitted request; released once, however many times ``release`` is called."""

    def __init__(self, admission: Admission) -> None:
        self._admission, self._held = admission, True
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            held, self._held = self._held, False
        if held:
            self._admission._leave()
