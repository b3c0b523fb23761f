"""Where the gateway remembers a conversation between turns: its KV handle, the answer's last
token (picked, not yet in the cache) and the turns so far, as JSON with a TTL."""

from __future__ import annotations

import hashlib
import json
import logging
import threading

from dartserve.kv.store import StoreUnavailable
from dartserve.pruning.config import PruningConfig
from services.gateway.backends import store_errors
from services.gateway.inputs import ApiError

log = logging.getLogger(__name__)
# What a turn continues from; a record without them (damaged, or from another version) is unknown.
FIELDS = {"kv_handle", "pending_token", "messages", "context_tokens", "vision_tokens", "kept_vision_tokens", "pruning"}


class Conversations:
    def __init__(self, store, ttl_s: int, turn_s: int = 180) -> None:
        """``turn_s``: how long a turn may hold its conversation, should its gateway die mid-turn."""
        self.store, self.ttl_s, self.turn_s = store, ttl_s, turn_s

    def begin_turn(self, conversation_id: str):
        """Holds the conversation for one turn; returns what ends the turn (idempotent). Two turns
        at once would both continue from the same record, and the later one to finish would
        drop the other from the conversation: the second is refused with a 409 instead."""
        key = by_id(conversation_id) + ":turn"
        with store_errors():
            token = self.store.claim(key, self.turn_s)
        if token is None:
            raise ApiError(409, "another turn of this conversation is being answered; send this one when it ends", "conversation_id", kind="conflict")
        ended = threading.Event()

        def end_turn() -> None:
            if not ended.is_set():
                ended.set()
                try:
                    self.store.release(key, token)
                except StoreUnavailable as error:  # the answer stands; the hold lapses after turn_s
                    log.warning("could not release conversation turn: %s", error)

        return end_turn

    def get(self, key: str) -> dict | None:
        with store_errors():
            raw = self.store.get_value(key)
        if raw is None:
            return None
        try:
            record = json.loads(raw)
            if not isinstance(record, dict) or not FIELDS <= record.keys():
                return None
            # In the form this version writes, whichever version wrote the record.
            record["pruning"] = PruningConfig.from_dict(record["pruning"]).to_dict()
        except (ValueError, TypeError, AttributeError):
            return None  # damaged: the conversation is treated as unknown, never guessed at
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
            self.store.set_value(key, json.dumps(record).encode(), max(1, int(self.ttl_s - age_s)))


def by_id(conversation_id: str) -> str:
    return "dartserve:conversation:" + hashlib.sha256(conversation_id.encode()).hexdigest()


def by_content(model: str, image_hashes: list[str], messages: list[dict]) -> str:
    """For clients that resend the whole conversation (the chat API): the turns are the key."""
    identity = json.dumps({"model": model, "images": image_hashes, "messages": messages}, sort_keys=True)
    return "dartserve:chat:" + hashlib.sha256(identity.encode()).hexdigest()
