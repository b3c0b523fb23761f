"""Where the gateway remembers a conversation between turns: its KV handle, the answer's last
token (picked, not yet in the cache) and the turns so far, with a TTL.

A record is JSON under a checksum that covers the key it is stored under, as KV values carry
theirs: a record that was damaged, or copied from another conversation, is a miss, never a
turn continued from the wrong place. Keys hold the tenant (a digest of the caller's API key),
so a conversation exists for the key that started it only; one tenant's ids never meet
another's.
"""

from __future__ import annotations

import hashlib
import json
import logging

from dartserve.kv.store import StoreUnavailable
from services.frontend.errors import store_errors
from services.gateway.turns import TurnHolds

log = logging.getLogger(__name__)
# What a turn continues from; a record without them (damaged, or from another version) is unknown.
FIELDS = {"kv_handle", "pending_token", "messages", "context_tokens", "vision_tokens", "kept_vision_tokens", "pruning"}
FORMAT = b"dartserve-conversation/1"


class Conversations:
    def __init__(self, store, ttl_s: int, holds: TurnHolds) -> None:
        self.store, self.ttl_s, self.holds = store, ttl_s, holds

    def begin_turn(self, key: str):
        """Holds the conversation for one turn (see ``TurnHolds``); returns what ends it. Held
        before the record is read, so the turn continues from the record no other turn is
        about to replace."""
        return self.holds.hold(key + ":turn")

    def get(self, key: str) -> dict | None:
        with store_errors():
            raw = self.store.get_value(key)
        if raw is None:
            return None
        record = _unpack(key, raw)
        if record is None:
            log.warning("a conversation record failed its check; treated as unknown")
        return record

    def reachable(self) -> bool:
        try:
            self.store.ping()
            return True
        except StoreUnavailable:
            return False

    def put(self, key: str, record: dict, age_s: float = 0.0) -> None:
        """``age_s``: how long ago the KV cache the record names was last written or read. The
        record expires no later than that cache, so it never names a cache that is gone."""
        with store_errors():
            self.store.set_value(key, _pack(key, record), max(1, int(self.ttl_s - age_s)))


def _pack(key: str, record: dict) -> bytes:
    body = json.dumps(record, sort_keys=True).encode()
    return b"\n".join((FORMAT, _checksum(key, body), body))


def _unpack(key: str, raw: bytes) -> dict | None:
    """The record, if it is one this version wrote under ``key``: one of another version (its
    FORMAT differs) is a miss too, and its conversation starts afresh."""
    parts = raw.split(b"\n", 2)
    if len(parts) != 3 or parts[0] != FORMAT or parts[1] != _checksum(key, parts[2]):
        return None
    try:
        record = json.loads(parts[2])
    except ValueError:
        return None
    return record if isinstance(record, dict) and FIELDS <= record.keys() else None


def _checksum(key: str, body: bytes) -> bytes:
    return hashlib.sha256(key.encode() + b"\0" + body).hexdigest().encode()


def by_id(tenant: str, conversation_id: str) -> str:
    identity = json.dumps([tenant, conversation_id])
    return "dartserve:conversation:" + hashlib.sha256(identity.encode()).hexdigest()


def by_content(tenant: str, model: str, image_hashes: list[str], messages: list[dict]) -> str:
    """For clients that resend the whole conversation (the chat API): the turns are the key."""
    identity = json.dumps({"tenant": tenant, "model": model, "images": image_hashes, "messages": messages}, sort_keys=True)
    return "dartserve:chat:" + hashlib.sha256(identity.encode()).hexdigest()
