"""``/v1/batches``: asynchronous batches of ``/v1/answer`` requests, run by Celery workers
(``dartserve serve``'s own, or ``dartserve worker`` processes).

A batch is checked whole before anything runs: a bad line rejects it with every bad line
named. Its images are stored once each, however many requests share them. Without the batch
Redis, every call answers 503 saying so.
"""

from __future__ import annotations

import hashlib
import json
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from services.frontend.answers import Policy, answer_images, first_turn, parse_answer
from dartserve.kv.store import StoreUnavailable
from services.frontend.inputs import ApiError, json_body, json_object, media_type
from services.gateway.admission import RETRY_AFTER_S
from services.gateway.middleware import tenant
from services.gateway.schemas import Batch, InvalidBatch, answered, errors
from services.batches.queue import queue_items
from services.batches.store import FINISHED, UnknownBatch

log = logging.getLogger(__name__)
JSONL_TYPES = ("application/jsonl", "application/x-ndjson", "application/x-jsonlines", "text/plain")
MAX_REPORTED = 50  # bad lines listed in one error
REDIS_SETTING = "DARTSERVE_BATCH_REDIS_URL (else DARTSERVE_REDIS_URL, default redis://127.0.0.1:6379/0)"
NO_REDIS = f"batches are unavailable: they need a Redis, and none answers at {REDIS_SETTING}; start one there (redis-server)"
REFUSED = f"batches are unavailable: the batch Redis at {REDIS_SETTING} refused the command (out of memory, or a read-only replica); the server's log says which"


class batch_store_errors:
    """The batch Redis unreachable or refusing: a 503 that says so; what Redis said goes to the log."""

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if not isinstance(error, StoreUnavailable):
            return False
        log.warning("answered 503: %s", error)
        refused = str(error).startswith("Redis refused")  # see dartserve.kv.store.redis_call
        raise _unavailable(REFUSED if refused else NO_REDIS) from None


def _unavailable(message: str) -> ApiError:
    return ApiError(503, message, kind="service_unavailable", headers={"Retry-After": RETRY_AFTER_S})


class Batches:
    """The gateway's side of batches: checking, storing and queueing them, and reading them back,
    each for the tenant that created it."""

    def __init__(self, store, celery, model_name: str, policy: Policy, max_requests: int) -> None:
        self.store, self.celery, self.model_name, self.max_requests = store, celery, model_name, max_requests
        self.policy = policy
        self.worker = None  # the EmbeddedWorker of this process, where it runs one (services.launch)

    def readiness(self) -> dict:
        """Whether batches run now, and why not; a gateway answers without them."""
        if not self.store.reachable():
            reason = NO_REDIS
        else:
            reason = self.worker.unavailable if self.worker is not None else None
        return {"available": reason is None, "reason": reason}

    def submit(self, tenant: str, requests: list[tuple[int, object]]) -> dict:
        """``requests`` are (line number, parsed JSON) pairs."""
        if not requests:
            raise ApiError(400, "the batch has no requests", "requests")
        if len(requests) > self.max_requests:
            raise ApiError(400, f"the batch has {len(requests)} requests; at most {self.max_requests} are allowed", "requests")
        items, images, errors, seen = [], {}, [], set()
        for line, request in requests:
            try:
                items.append(_item(request, seen, images, self.policy, tenant))
            except ApiError as error:
                errors.append({"line": line, "message": error.message, "param": error.param})
            except ValueError as error:  # found from what the request asks of the model
                errors.append({"line": line, "message": str(error), "param": getattr(error, "param", None)})
        if errors:
            raise InvalidLines(errors, len(requests))
        with batch_store_errors():
            batch_id = self.store.create(items, images, self.model_name, tenant)
            try:
                queue_items(self.celery, batch_id, len(items))
            except Exception as error:  # the broker refused: the batch must not sit queued forever
                log.warning("answered 503: the batch queue refused batch %s: %s", batch_id, error)
                self.store.fail(batch_id, "the batch could not be queued: the queue was unreachable")
                raise _unavailable(NO_REDIS) from None
            return self.store.status(batch_id, tenant)

    def status(self, tenant: str, batch_id: str) -> dict:
        with batch_store_errors():
            try:
                return self.store.status(batch_id, tenant)
            except UnknownBatch:
                return self._lost(tenant, batch_id)

    def results(self, tenant: str, batch_id: str) -> list[dict]:
        with batch_store_errors():
            try:
                return self.store.results(batch_id, tenant)
            except UnknownBatch:
                self._lost(tenant, batch_id)
                return []  # nothing of it is left to list

    def cancel(self, tenant: str, batch_id: str) -> dict:
        with batch_store_errors():
            try:
                before = self.store.cancel(batch_id, tenant)
            except UnknownBatch:
                before = self._lost(tenant, batch_id)["status"]
            if before in FINISHED:
                raise ApiError(409, f"batch {batch_id!r} is already {before}", "batch_id", kind="conflict")
            return self.store.status(batch_id, tenant)

    def _lost(self, tenant: str, batch_id: str) -> dict:
        """The status of a batch this gateway made for ``tenant`` whose records are gone (a
        Redis that restarted without them, or evicted them): failed, saying so. Any other id
        is a 404."""
        created = self.store.issued(batch_id, tenant)
        if created is None:
            raise ApiError(404, f"batch {batch_id!r} is unknown or expired", "batch_id", kind="not_found")
        return {
            "id": batch_id, "object": "batch", "endpoint": "/v1/answer", "model": self.model_name, "status": "failed",
            "request_counts": {"total": 0, "done": 0, "failed": 0},
            "created_at": created, "started_at": None, "finished_at": None, "cancelled_at": None, "expires_at": created + self.store.ttl_s,
            "error": "the batch's records are gone from Redis (it restarted without them, or evicted them): its requests and answers cannot be recovered",
        }


def _item(request, seen: set, images: dict, policy: Policy, tenant: str) -> dict:
    if not isinstance(request, dict):
        raise ApiError(400, "a request must be a JSON object")
    try:
        json.dumps(request, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise ApiError(400, "the request holds a lone surrogate, which is not text") from None
    fields = dict(request)
    custom_id = fields.pop("custom_id", None)
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > 256:
        raise ApiError(400, "custom_id must be a non-empty string of at most 256 characters", "custom_id")
    if custom_id in seen:
        raise ApiError(400, f"custom_id {custom_id!r} is used twice", "custom_id")
    seen.add(custom_id)
    if "body" in fields:  # OpenAI's line: {"custom_id", "method": "POST", "url": "/v1/answer", "body": {...}}
        if fields.get("method", "POST") != "POST" or fields.get("url", "/v1/answer") != "/v1/answer" or set(fields) - {"method", "url", "body"}:
            raise ApiError(400, 'an OpenAI-style line is {"custom_id", "method": "POST", "url": "/v1/answer", "body": {...}}', "url")
        if not isinstance(fields["body"], dict):
            raise ApiError(400, "body must be a JSON object", "body")
        fields = dict(fields["body"])
    body = parse_answer(fields)
    if body.stream:
        raise ApiError(400, "stream is not supported in a batch", "stream")
    if body.conversation_id is not None:
        raise ApiError(400, "conversation_id is not supported in a batch", "conversation_id")
    images_of_item = answer_images(body, [], policy)
    first_turn(body, images_of_item, policy, tenant)  # checks the settings and the limits
    hashes = []
    for data in images_of_item:
        digest = hashlib.sha256(data).hexdigest()
        images[digest] = data
        hashes.append(digest)
    fields.pop("image", None)
    fields.pop("images", None)
    return {"custom_id": custom_id, "fields": fields, "images": hashes, "tenant": tenant}


def parse_jsonl(data: bytes) -> list[tuple[int, object]]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ApiError(400, "the JSONL upload is not UTF-8") from None
    requests, errors = [], []
    # Lines end at "\n" only: JSON strings may hold other line separators (U+2028 and the like).
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            requests.append((number, json.loads(line)))
        except (ValueError, RecursionError) as error:
            errors.append({"line": number, "message": f"not valid JSON: {error}", "param": None})
    if errors:
        raise InvalidLines(errors, len(requests) + len(errors))
    return requests


class InvalidLines(Exception):
    """Requests of a batch that are not valid, by line number (input order for a JSON batch)."""

    def __init__(self, errors: list[dict], total: int) -> None:
        self.errors, self.total = errors, total

    def response(self) -> JSONResponse:
        listed = "; ".join(f"line {e['line']}: {e['message']}" for e in self.errors[:3])
        error = ApiError(400, f"{len(self.errors)} of {self.total} requests are invalid, so nothing was run ({listed})", "requests")
        return JSONResponse({**error.body(), "errors": self.errors[:MAX_REPORTED]}, status_code=400)


async def _requests(request: Request) -> list[tuple[int, object]]:
    kind = media_type(request)
    if kind == "application/json":
        body = await json_object(request)
        if not isinstance(body.get("requests"), list) or set(body) - {"requests"}:
            raise ApiError(400, 'a JSON batch is {"requests": [...]}; upload JSONL for one request per line', "requests")
        return [(i + 1, r) for i, r in enumerate(body["requests"])]
    # A batch may be hundreds of megabytes: it is parsed on a thread, not on the event loop.
    if kind in JSONL_TYPES:
        return await run_in_threadpool(parse_jsonl, await request.body())
    if kind == "multipart/form-data":
        form = await request.form()
        files = [v for k, v in form.multi_items() if hasattr(v, "read")]
        if len(files) != 1 or set(form.keys()) - {"file", "purpose"}:
            raise ApiError(400, "upload the JSONL as one file field named 'file'", "file")
        return await run_in_threadpool(parse_jsonl, await files[0].read())
    raise ApiError(415, "send JSONL (application/jsonl), a JSON object with requests, or a multipart file", kind="unsupported_media_type")


def register_batches(app: FastAPI, batches: Batches, uploads) -> None:
    """``uploads``: the gateway's admission of bodies being received (a batch's may be large)."""
    batch_schema = {"type": "object", "required": ["requests"], "additionalProperties": False, "properties": {"requests": {"type": "array", "items": {"type": "object"}}}}

    created = answered(Batch, 413, 415, 503, status=202) | {400: {"model": InvalidBatch, "description": "invalid lines; `errors` lists each"}}

    @app.post("/v1/batches", status_code=202, openapi_extra=json_body(batch_schema), responses=created)
    async def create(request: Request):
        try:
            with uploads.enter():
                requests = await _requests(request)
            created = await run_in_threadpool(batches.submit, tenant(request), requests)
        except InvalidLines as errors:
            return errors.response()
        return JSONResponse(created, status_code=202)

    @app.get("/v1/batches/{batch_id}", responses=answered(Batch, 404, 503))
    def status(request: Request, batch_id: str):
        return batches.status(tenant(request), batch_id)

    @app.get("/v1/batches/{batch_id}/results", response_class=Response, responses={200: {"content": {"application/jsonl": {"schema": {"type": "string"}}}, "description": "one line per request, in input order"}} | errors(404, 503))
    def results(request: Request, batch_id: str):
        lines = "".join(json.dumps(r) + "\n" for r in batches.results(tenant(request), batch_id))
        return Response(lines, media_type="application/jsonl")

    @app.post("/v1/batches/{batch_id}/cancel", responses=answered(Batch, 404, 409, 503))
    def cancel(request: Request, batch_id: str):
        return batches.cancel(tenant(request), batch_id)
