"""Turn holds: one turn of a conversation is answered at a time. Two turns at once would both
continue from the same record, and the later one to finish would drop the other from the
conversation: the second is refused with a 409 instead.

A hold is a lease of ``LEASE_S`` that its gateway renews while the turn runs, so one left by a
gateway that died lapses within seconds, not after the longest a turn could take. Leases live
in the Redis that keeps batches (``DARTSERVE_BATCH_REDIS_URL``), which never evicts: in the
evictable cache, keys this close to expiry would be the first to go under memory pressure. In
embedded mode they live in the process, which is the only one answering.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time

from dartserve.kv.store import StoreUnavailable, redis_call
from services.frontend.errors import store_errors
from services.frontend.inputs import ApiError

log = logging.getLogger(__name__)
LEASE_S = 6.0
RENEW_EVERY_S = LEASE_S / 3  # two renewals may fail before a live turn loses its hold

# Each acts only while the key still holds the caller's token.
_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


class RedisLeases:
    def __init__(self, client) -> None:
        self.client = client

    def take(self, key: str, token: str, lease_ms: int) -> bool:
        return bool(redis_call(self.client.set, key, token, nx=True, px=lease_ms))

    def renew(self, key: str, token: str, lease_ms: int) -> bool:
        return bool(redis_call(self.client.eval, _RENEW, 1, key, token, lease_ms))

    def release(self, key: str, token: str) -> None:
        redis_call(self.client.eval, _RELEASE, 1, key, token)


class LocalLeases:
    def __init__(self) -> None:
        self._held: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()

    def take(self, key: str, token: str, lease_ms: int) -> bool:
        with self._lock:
            held = self._held.get(key)
            if held is not None and held[0] > time.monotonic():
                return False
            self._held[key] = (time.monotonic() + lease_ms / 1e3, token)
            return True

    def renew(self, key: str, token: str, lease_ms: int) -> bool:
        with self._lock:
            if self._held.get(key, (0, None))[1] != token:
                return False
            self._held[key] = (time.monotonic() + lease_ms / 1e3, token)
            return True

    def release(self, key: str, token: str) -> None:
        with self._lock:
            if self._held.get(key, (0, None))[1] == token:
                del self._held[key]


class TurnHolds:
    def __init__(self, leases) -> None:
        self.leases = leases
        self._held: dict[str, str] = {}  # key: token, of the turns this process is answering
        self._lock = threading.Lock()
        self._renewer: threading.Thread | None = None

    def hold(self, key: str):
        """Holds ``key`` for one turn, or a 409; returns what ends the turn (idempotent)."""
        token = secrets.token_hex(16)
        with store_errors():
            taken = self.leases.take(key, token, int(LEASE_S * 1e3))
        if not taken:
            raise ApiError(409, "another turn of this conversation is being answered; send this one when it ends", "conversation_id", kind="conflict")
        with self._lock:
            self._held[key] = token
            if self._renewer is None:
                self._renewer = threading.Thread(target=self._renew_forever, name="turn-holds", daemon=True)
                self._renewer.start()
        ended = threading.Event()

        def end_turn() -> None:
            if ended.is_set():
                return
            ended.set()
            with self._lock:
                self._held.pop(key, None)
            try:
                self.leases.release(key, token)
            except StoreUnavailable as error:  # the answer stands; the hold lapses with its lease
                log.warning("could not release a conversation's turn: %s", error)

        return end_turn

    def _renew_forever(self) -> None:
        while True:
            time.sleep(RENEW_EVERY_S)
            with self._lock:
                held = list(self._held.items())
            for key, token in held:
                try:
                    kept = self.leases.renew(key, token, int(LEASE_S * 1e3))
                except StoreUnavailable as error:  # tried again next round, while the lease lasts
                    log.warning("could not renew a conversation's turn: %s", error)
                    continue
                if not kept:
                    log.warning("a conversation's turn hold lapsed while its turn ran")
                    with self._lock:
                        if self._held.get(key) == token:
                            del self._held[key]
