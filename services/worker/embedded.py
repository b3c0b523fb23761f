"""The batch worker that ``dartserve serve`` runs in its own process: Celery's worker controller
on a thread, its items on a pool of threads, answered through the gateway's own backend, so
that batch items and interactive requests share one engine core (one copy of the model, one
KV pool, the same steps).

It is supervised: it starts once the batch Redis answers, is started again if it stops by
itself, and stops with the server, finishing the items it holds. While it cannot run, it says
why (``unavailable``), for ``/readyz``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

from services.worker.tasks import Worker, worker_app

log = logging.getLogger(__name__)
REDIS_POLL_S = 2.0
MAX_RESTART_S = 30.0


class EmbeddedWorker:
    def __init__(self, settings, worker: Worker, concurrency: int, redis_ping) -> None:
        """``redis_ping``: whether the batch Redis answers now (a cheap, bounded call)."""
        self.worker, self.concurrency, self.redis_ping = worker, concurrency, redis_ping
        self.app = worker_app(settings, worker)
        # Nothing in this process needs Celery's remote control, and each worker it starts is
        # one more connection to Redis.
        self.app.conf.worker_enable_remote_control = False
        self.hostname = f"serve-{os.getpid()}@{socket.gethostname()}"
        self.unavailable: str | None = "the batch worker is starting"
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        # Celery's worker stops from its own event loop's thread, as on a signal: stopping it
        # from another thread races that loop for the broker connection and can hang.
        self._hub = None
        self._thread = threading.Thread(target=self._supervise, name="batch-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 60.0) -> None:
        """Takes no more items and waits up to ``timeout_s`` for those in progress; an item left
        unfinished is delivered again after DARTSERVE_BATCH_VISIBILITY_S."""
        with self._lock:
            self._stopping.set()
            if self._hub is not None:
                self._hub.call_soon(_shut_down)
        self._thread.join(timeout_s)
        log.info("the batch worker stopped" if not self._thread.is_alive() else "the batch worker left items unfinished: they are delivered again")

    def _supervise(self) -> None:
        delay = 1.0
        while not self._stopping.is_set():
            if not self.redis_ping():
                self._wait_for_redis()
                continue
            from celery.worker import WorkController
            from kombu.asynchronous import set_event_loop

            # Celery keeps its event loop in a global and reuses it: a worker started again gets
            # a new one, not the loop its predecessor left. The threads of its pool run each item
            # through the process's default app, so that is this worker's. One such worker per
            # process, then.
            set_event_loop(None)
            self.app.set_default()
            controller = WorkController(
                app=self.app, hostname=self.hostname, pool_cls="threads", concurrency=self.concurrency,
                without_gossip=True, without_mingle=True, without_heartbeat=True, ready_callback=self._ready,
            )
            if self._stopping.is_set():
                return
            controller.start()  # returns when it stops
            with self._lock:
                self._hub = None
            if self._stopping.is_set():
                return
            self.unavailable = "the batch worker stopped and is being started again"
            log.error("the batch worker stopped (exit code %s); starting it again in %.0f s", controller.exitcode, delay)
            self._stopping.wait(delay)
            delay = min(delay * 2, MAX_RESTART_S)

    def _wait_for_redis(self) -> None:
        if self.unavailable != NO_REDIS:  # said once, not at every look
            log.warning("batches wait for a Redis at DARTSERVE_BATCH_REDIS_URL (else DARTSERVE_REDIS_URL): none answers; this server runs them once one does")
        self.unavailable = NO_REDIS
        self._stopping.wait(REDIS_POLL_S)

    def _ready(self, consumer) -> None:
        with self._lock:
            self._hub = consumer.hub
            if self._stopping.is_set():
                self._hub.call_soon(_shut_down)
        self.unavailable = None
        log.info("the batch worker takes items of namespace %s, %d at once", self.worker.namespace, self.concurrency)


NO_REDIS = "the batch worker waits for the batch Redis"


def _shut_down() -> None:
    """Run in the worker's event loop: a warm shutdown, which finishes the items it holds."""
    from celery.exceptions import WorkerShutdown

    raise WorkerShutdown(0)
