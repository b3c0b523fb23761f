"""The worker: runs each batch item through the vision, pruner and generator stages exactly as
``/v1/answer`` would, and records its answer or its error in the batch store.

A worker runs many items at once, each on a thread of its own, so that their requests reach
the engine core together and share its steps; items that share an image encode it once
(``encodes``). An item is never dropped: while a stage or Redis is unavailable it is retried
with backoff, and then recorded as a 503; anything else that goes wrong is recorded as a 500.
"""

from __future__ import annotations

import logging

from celery.exceptions import Reject

from dartserve.kv.store import StoreUnavailable
from dartserve.stages import StageMiss
from services import request_ids
from services.frontend.answers import AnswerShape, Policy, first_turn, parse_answer
from services.frontend.errors import Overloaded, Unavailable
from services.frontend.inputs import ApiError
from services.frontend.pipeline import Final
from services.batches.queue import TASK, make_celery
from services.batches.store import FINISHED, BatchStore, UnknownBatch
from services.worker.encodes import FirstEncodes

log = logging.getLogger(__name__)
MAX_BACKOFF_S = 30
TRANSIENT = (Unavailable, StageMiss, StoreUnavailable)


class Worker:
    """What a worker process needs to answer items: the stages, the batch store and the defaults."""

    def __init__(self, settings, backend, model_name: str, namespace: str, limits=None) -> None:
        """``namespace``: the deployment's batches (``services.batches.namespace``); ``limits``:
        the model's ``PromptLimits``, which refuse what cannot fit as the gateway does."""
        self.settings, self.backend, self.model_name, self.namespace = settings, backend, model_name, namespace
        self.policy = Policy.from_settings(settings, limits)
        self.batches = BatchStore.from_url(settings.batch_redis, settings.batch_ttl_s, namespace)
        self.encodes = FirstEncodes()

    def run(self, task, batch_id: str, index: int, unavailable: int = 0) -> None:
        """``unavailable``: the retries so far for a stage or Redis that did not answer. A stage
        at its call limit (``Overloaded``) is busy, not down: the item waits, and that does
        not count against DARTSERVE_BATCH_RETRIES."""
        try:
            self._run(task, batch_id, index)
        except TRANSIENT as error:
            busy = isinstance(error, Overloaded)
            if busy or unavailable < self.settings.batch_retries:
                self._retry(task, error, unavailable if busy else unavailable + 1)
            log.error("batch %s item %d: still unavailable after %d retries: %s", batch_id, index, unavailable, error)
            self._record_failure(batch_id, index, 503, "service_unavailable", f"{error.public if isinstance(error, Unavailable) else Unavailable.public} (after {unavailable} retries)")
        except Exception:
            log.exception("batch %s item %d failed", batch_id, index)
            self._record_failure(batch_id, index, 500, "internal_error", "the server failed to answer this request; the worker's log has the trace under the request id BATCH_ID/CUSTOM_ID")

    def _lost(self, batch_id: str, index: int) -> None:
        """An item that cannot be read: its batch expired, or Redis evicted the item's data
        under memory pressure while the batch lives on. Then the batch could never finish, and
        it fails, saying why."""
        try:
            status = self.batches.status(batch_id)["status"]
        except UnknownBatch:
            log.warning("batch %s has expired; item %d dropped", batch_id, index)
            return
        if status not in FINISHED:
            log.error("batch %s: item %d's request is gone from Redis", batch_id, index)
            self.batches.fail(batch_id, f"the request of item {index} was evicted from Redis before it ran")

    def _retry(self, task, error: Exception, unavailable: int) -> None:
        try:
            raise task.retry(exc=error, countdown=self.backoff_s(task.request.retries), kwargs={"unavailable": unavailable}) from None
        except Reject:  # Celery could not queue the retry (Redis down) and would drop the item
            raise Reject(error, requeue=True) from None

    def backoff_s(self, retries: int) -> int:
        # Below the visibility timeout: a message held longer than that is delivered again.
        return max(1, min(MAX_BACKOFF_S, 2**retries, self.settings.batch_visibility_s // 2))

    def _run(self, task, batch_id: str, index: int) -> None:
        loaded = self.batches.item(batch_id, index)
        if loaded is None:
            self._lost(batch_id, index)
            return
        item, images = loaded
        custom_id = item["custom_id"]
        request_ids.current.set(f"{batch_id}/{custom_id}")
        status = self.batches.start(batch_id)
        if status is None or status in FINISHED or self.batches.has_result(batch_id, custom_id):
            return
        tenant = item.get("tenant", "")
        self.batches.record(batch_id, custom_id, self.answer(custom_id, item["fields"], images, tenant, [f"{tenant}\0{h}" for h in item["images"]]))

    def answer(self, custom_id: str, fields: dict, images: list[bytes], tenant: str = "", image_keys: list[str] = ()) -> dict:
        """``image_keys``: the images by tenant and content, which one item at a time encodes."""
        try:
            question = first_turn(parse_answer(fields), images, self.policy, tenant)
            release, final = self.encodes.claim(list(image_keys)), None
            try:
                # Streamed: the first event comes once the images are encoded, when the items
                # waiting on them can go on.
                for event in self.backend.answer(question, stream=True):
                    release()
                    final = event
            finally:
                release()
            if not isinstance(final, Final):
                raise RuntimeError("the answer ended without its Final")
        except ApiError as error:
            return _failure(custom_id, error.status, error.kind, error.message, error.param)
        except ValueError as error:  # what a stage found wrong with the input, e.g. not an image
            return _failure(custom_id, 400, "invalid_request_error", str(error), getattr(error, "param", None))
        return {"custom_id": custom_id, "response": {"status_code": 200, "body": AnswerShape(self.model_name, None).body(final)}, "error": None}

    def _record_failure(self, batch_id: str, index: int, status: int, kind: str, message: str) -> None:
        """Records the item's error; where even that cannot reach Redis, the item goes back on
        the queue rather than being lost."""
        try:
            loaded = self.batches.item(batch_id, index)
            if loaded is not None:
                custom_id = loaded[0]["custom_id"]
                self.batches.record(batch_id, custom_id, _failure(custom_id, status, kind, message))
        except StoreUnavailable as error:
            raise Reject(error, requeue=True) from None


def _failure(custom_id: str, status: int, kind: str, message: str, param: str | None = None) -> dict:
    return {"custom_id": custom_id, "response": None, "error": {"status_code": status, "type": kind, "message": message, "param": param}}


def worker_app(settings, worker: Worker):
    app = make_celery(settings, worker.namespace)

    # Retries are counted by the worker against DARTSERVE_BATCH_RETRIES, not Celery's default 3.
    # Not shared: a shared task joins every Celery app made later in the process, where it would
    # answer that app's items with this worker's store.
    @app.task(name=TASK, bind=True, acks_late=True, max_retries=None, shared=False)
    def batch_item(task, batch_id: str, index: int, unavailable: int = 0) -> None:
        worker.run(task, batch_id, index, unavailable)

    return app
