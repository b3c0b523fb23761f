"""Where the gateway remembers a conversation between turns: its KV handle, the answer's last
token (picked, not yet in the cache) and the turns so far, as JSON with a TTL."""

from __future__ import annotations

import hashlib
import json

from dartserve.kv.store import StoreUnavailable
from services.gateway.backends import store_errors

# What a turn continues from; a record without them (damaged, or from another version) is unknown.
FIELDS = {"kv_handle", "pending_token", "messages", "context_tokens", "vision_tokens", "kept_vision_tokens", "pruning"}


class Conversations:
    def __init__(self, store, ttl_s: int) -> None:
        self.store, self.ttl_s = store, ttl_s

    def get(self, key: str) -> dict | None:
        with store_errors():
            raw = self.store.get_value(key)
        if raw is None:
            return None
        try:
            record = json.loads(raw)
        except ValueError:
            return None  # damaged: the conversation is treated as unknown, never guessed at
        return record if isinstance(record, dict) and FIELDS <= record.keys() else None

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
            self.store.set_value(key, json.dumps(record).encode(), max(1, int(self.ttl_s - age_s)))


def by_id(conversation_id: str) -> str:
    return "dartserve:conversation:" + hashlib.sha256(conversation_id.encode()).hexdigest()


def by_content(model: str, image_hashes: list[str], messages: list[dict]) -> str:
    """For clients that resend the whole conversation (the chat API): the turns are the key."""
    identity = json.dumps({"model": model, "images": image_hashes, "messages": messages}, sort_keys=True)
    return "dartserve:chat:" + hashlib.sha256(identity.encode()).hexdigest()
