"""The Celery app over Redis, shared by the gateway (which queues items) and the workers.

Messages are JSON only. Items are acknowledged after they run; a worker holds as many as it
runs at once (its threads), so an item taken by a worker that dies is delivered again, and
the batch store keeps that from answering it twice. Every key the queue writes (the list of
items, those delivered and not yet acknowledged, the bindings) begins with the namespace.
"""

from __future__ import annotations

from celery import Celery

from services.batches.namespace import QUEUE

TASK = "dartserve.batch_item"


def make_celery(settings, namespace: str) -> Celery:
    app = Celery("dartserve", broker=settings.batch_redis, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # results go to the batch store, keyed by batch and custom_id
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # per thread: a worker holds no item it is not running
        task_default_queue=QUEUE,
        broker_transport_options={
            "global_keyprefix": f"{namespace}:",
            "visibility_timeout": settings.batch_visibility_s,
            # Look for items of dead workers every few seconds, not kombu's default 100.
            "unacked_restore_interval": max(1, min(10, settings.batch_visibility_s // 2)),
            "unacked_restore_throttle": 1,
        },
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


def queue_items(app: Celery, batch_id: str, count: int) -> None:
    """Queues a batch's items in input order, over one connection."""
    with app.producer_or_acquire() as producer:
        for index in range(count):
            app.send_task(TASK, args=[batch_id, index], producer=producer)
