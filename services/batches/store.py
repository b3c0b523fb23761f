"""A batch's records in Redis: its status, its requests, their images and their results.

Every key of a batch shares one hash tag, so a batch lives on one Redis Cluster slot and the
scripts below can update it atomically. Every key begins with the deployment's namespace
(``services.batches.namespace``): to any other, a batch does not exist. A result is written
once per ``custom_id``: a redelivered item finds its result there and changes nothing, so no
item is counted or listed twice. Everything is JSON or raw image bytes; nothing read back is unpickled.

A batch belongs to the tenant that created it (a digest of its API key; "" on a gateway
without keys): to any other it does not exist. Its id carries when it was created and a tag
bound to its namespace and tenant, so a batch whose records Redis lost can still be told from one that
never was.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time

from dartserve.kv.store import StoreUnavailable, redis_call

FINISHED = ("completed", "failed", "cancelled")

# Every script that changes a batch restarts the TTL of all its keys and moves ``expires_at``:
# a batch expires DARTSERVE_BATCH_TTL_S after it last changed, never while it runs.
# KEYS: meta, items, images, results. ARGV[1]: now, ARGV[2]: TTL in seconds.
_KEEP = """
local function keep()
  redis.call('HSET', KEYS[1], 'expires_at', tonumber(ARGV[1]) + tonumber(ARGV[2]))
  for _, key in ipairs(KEYS) do redis.call('EXPIRE', key, ARGV[2]) end
end
"""
# ARGV[3]: custom_id, ARGV[4]: result JSON, ARGV[5]: "1" if it failed.
_RECORD = _KEEP + """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HSETNX', KEYS[4], ARGV[3], ARGV[4]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[5] == '1' and 'failed' or 'done', 1)
local m = redis.call('HMGET', KEYS[1], 'total', 'done', 'failed', 'status')
if tonumber(m[2]) + tonumber(m[3]) >= tonumber(m[1]) and m[4] ~= 'cancelled' then
  redis.call('HSET', KEYS[1], 'status', 'completed', 'finished_at', ARGV[1])
end
keep()
return 1
"""
_START = _KEEP + """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1])
  keep()
  return 'running'
end
return status
"""
# ARGV[3]: the error. A batch that expired meanwhile stays gone.
_FAIL = _KEEP + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'status', 'failed', 'error', ARGV[3], 'finished_at', ARGV[1])
keep()
return 1
"""
# Returns the status before; nothing for another tenant's batch. ARGV[3]: the tenant.
_CANCEL = _KEEP + """
if (redis.call('HGET', KEYS[1], 'owner') or '') ~= ARGV[3] then return nil end
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'queued' or status == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'cancelled_at', ARGV[1], 'finished_at', ARGV[1])
  keep()
end
return status
"""


_ID = re.compile(r"^batch_(?P<created>[0-9a-f]{8})(?P<nonce>[0-9a-f]{24})(?P<tag>[0-9a-f]{8})$")
CANCELLED = {"status_code": 499, "type": "cancelled", "message": "the batch was cancelled before this request ran", "param": None}


class UnknownBatch(LookupError):
    """No batch of the caller's has this id, or it has expired."""


class BatchStore:
    def __init__(self, client, ttl_s: int, namespace: str, health=None) -> None:
        """``health``: a client with short timeouts for ``reachable`` (default: ``client``)."""
        self.client, self.ttl_s, self.namespace = client, ttl_s, namespace
        self.health = health or client
        self._record = client.register_script(_RECORD)
        self._start = client.register_script(_START)
        self._cancel = client.register_script(_CANCEL)
        self._fail = client.register_script(_FAIL)

    @classmethod
    def from_url(cls, url: str, ttl_s: int, namespace: str) -> BatchStore:
        import redis

        # Long enough to store a large batch in one transaction; a Redis that is down still
        # shows at once, when connecting. A health check waits a second at most.
        client = redis.Redis.from_url(url, socket_timeout=30.0, socket_connect_timeout=5.0)
        return cls(client, ttl_s, namespace, redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0))

    def reachable(self) -> bool:
        try:
            redis_call(self.health.ping)
            return True
        except StoreUnavailable:
            return False

    def create(self, items: list[dict], images: dict[str, bytes], model: str, tenant: str = "") -> str:
        """Stores a validated batch as queued; ``items`` are ``{"custom_id", "fields", "images",
        "tenant"}`` with images named by their SHA-256 in ``images``. Returns the batch id."""
        now = int(time.time())
        stamp = f"{now:08x}{secrets.token_hex(12)}"
        batch_id = f"batch_{stamp}{_tag(self.namespace, tenant, stamp)}"
        meta = {
            "status": "queued", "model": model, "total": len(items), "done": 0, "failed": 0,
            "created_at": now, "expires_at": now + self.ttl_s, "owner": tenant,
        }
        keys = self._keys(batch_id)
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(keys["items"], mapping={str(i): json.dumps(item) for i, item in enumerate(items)})
        if images:
            pipe.hset(keys["images"], mapping=images)
        pipe.hset(keys["meta"], mapping=meta)  # last: an item is never read before its batch is whole
        for key in keys.values():
            pipe.expire(key, self.ttl_s)
        redis_call(pipe.execute)
        return batch_id

    def status(self, batch_id: str, tenant: str | None = None) -> dict:
        """The batch's status; ``tenant``: the caller's, to whom another's batch is unknown
        (None: a worker's call, which has no tenant)."""
        meta = redis_call(self.client.hgetall, self._keys(batch_id)["meta"])
        meta = {k.decode(): v.decode() for k, v in meta.items()}
        if not meta or (tenant is not None and meta.get("owner", "") != tenant):
            raise UnknownBatch(f"batch {batch_id!r} is unknown or expired")

        def when(name):
            return int(meta[name]) if name in meta else None

        return {
            "id": batch_id,
            "object": "batch",
            "endpoint": "/v1/answer",
            "model": meta["model"],
            "status": meta["status"],
            "request_counts": {"total": int(meta["total"]), "done": int(meta["done"]), "failed": int(meta["failed"])},
            "created_at": when("created_at"),
            "started_at": when("started_at"),
            "finished_at": when("finished_at"),
            "cancelled_at": when("cancelled_at"),
            "expires_at": when("expires_at"),
            "error": meta.get("error"),
        }

    def item(self, batch_id: str, index: int) -> tuple[dict, list[bytes]] | None:
        """An item and its images, or None where the batch has expired."""
        keys = self._keys(batch_id)
        raw = redis_call(self.client.hget, keys["items"], str(index))
        if raw is None:
            return None
        item = json.loads(raw)
        images = redis_call(self.client.hmget, keys["images"], item["images"]) if item["images"] else []
        if any(i is None for i in images):
            return None
        return item, images

    def start(self, batch_id: str) -> str | None:
        """Marks the batch running (if it was queued); returns its status, None if it has expired."""
        status = self._script(self._start, batch_id)
        return status.decode() if status is not None else None

    def has_result(self, batch_id: str, custom_id: str) -> bool:
        return bool(redis_call(self.client.hexists, self._keys(batch_id)["results"], custom_id))

    def record(self, batch_id: str, custom_id: str, result: dict) -> bool:
        """Stores an item's result unless it has one; returns whether this call stored it."""
        failed = "1" if result.get("error") else "0"
        return self._script(self._record, batch_id, custom_id, json.dumps(result), failed) == 1

    def issued(self, batch_id: str, tenant: str) -> int | None:
        """When ``create`` made this id for ``tenant``, if it did and the batch could not have
        expired since (its TTL restarts with each change, so it lives at least that long):
        a batch with that id but no records was lost, not never made."""
        match = _ID.match(batch_id)
        if match is None or not secrets.compare_digest(match["tag"], _tag(self.namespace, tenant, match["created"] + match["nonce"])):
            return None
        created = int(match["created"], 16)
        return created if time.time() < created + self.ttl_s else None

    def cancel(self, batch_id: str, tenant: str) -> str:
        """Cancels a queued or running batch; returns its status before the call."""
        status = self._script(self._cancel, batch_id, tenant)
        if status is None:
            raise UnknownBatch(f"batch {batch_id!r} is unknown or expired")
        return status.decode()

    def _script(self, script, batch_id: str, *args):
        keys = self._keys(batch_id)
        return redis_call(script, keys=[keys["meta"], keys["items"], keys["images"], keys["results"]], args=[int(time.time()), self.ttl_s, *args])

    def _keys(self, batch_id: str) -> dict[str, str]:
        base = f"{self.namespace}:batch:{{{batch_id}}}"
        return {"meta": base, "items": base + ":items", "images": base + ":images", "results": base + ":results"}

    def fail(self, batch_id: str, error: str) -> None:
        self._script(self._fail, batch_id, error)

    def results(self, batch_id: str, tenant: str | None = None) -> list[dict]:
        """The results in input order. Items not yet answered are left out while the batch runs;
        once it is cancelled, they are listed with a ``cancelled`` error."""
        status = self.status(batch_id, tenant)["status"]
        keys = self._keys(batch_id)
        pipe = self.client.pipeline(transaction=True)
        pipe.hgetall(keys["items"])
        pipe.hgetall(keys["results"])
        items, results = redis_call(pipe.execute)
        ordered = [json.loads(items[k])["custom_id"] for k in sorted(items, key=int)]
        found = {k.decode(): json.loads(v) for k, v in results.items()}
        out = []
        for custom_id in ordered:
            if custom_id in found:
                out.append(found[custom_id])
            elif status == "cancelled":
                out.append({"custom_id": custom_id, "response": None, "error": dict(CANCELLED)})
        return out


def _tag(namespace: str, tenant: str, stamp: str) -> str:
    """Binds an id to its namespace and tenant: in any other, it was never made."""
    return hashlib.sha256(f"{namespace}\0{tenant}\0{stamp}".encode()).hexdigest()[:8]
