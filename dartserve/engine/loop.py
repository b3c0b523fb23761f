"""The engine core in a thread of its own, serving callers from any thread.

``submit`` checks a request in the caller's thread (so a bad one fails there, at once) and
hands it to the loop, which adds it between two steps; the caller reads the request's outputs
from its ``RequestStream`` as the steps produce them, and ``abort`` takes it out between steps.

The vision tower runs in the same thread, between steps (``encode_images``): the images that
callers sent meanwhile go through it in one forward. One thread runs the model at a time, so
the two never share the cores, which on a CPU costs each of them far more than waiting. For the
same reason the thread that builds the loop (in dartserve's servers, the one that loaded the
model) and every thread that hands it work let their OpenMP workers go (``engine.openmp``).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import torch

from dartserve.engine import openmp
from dartserve.engine.core import EngineCore
from dartserve.engine.requests import Abandoned, CoreRequest, RequestOutput

log = logging.getLogger(__name__)


class RequestStream:
    """One request's outputs in order; the last has ``finished`` set."""

    def __init__(self, loop: EngineLoop, request_id: str) -> None:
        self.loop = loop
        self.request_id = request_id
        self._outputs: queue.SimpleQueue[RequestOutput] = queue.SimpleQueue()
        self.finished = False

    def get(self, timeout: float | None = None) -> RequestOutput:
        """The next output; ``queue.Empty`` after ``timeout`` seconds without one."""
        output = self._outputs.get(timeout=timeout)
        self.finished = output.finished
        return output

    def __iter__(self) -> Iterator[RequestOutput]:
        while not self.finished:
            yield self.get()

    def abort(self) -> None:
        if not self.finished:
            self.loop.abort(self.request_id)


class EngineLoop:
    def __init__(
        self,
        core: EngineCore | None,
        tower: Callable[[list[dict]], list[torch.Tensor]] | None = None,
        max_images: int = 32,
        on_output: Callable[[RequestOutput], None] | None = None,
    ) -> None:
        """``core`` runs requests, ``tower`` images (``ModelAdapter.image_features_many``); a
        process that runs only one of them passes None for the other. ``on_output`` sees every
        output, in the loop's thread, before its caller does (metrics)."""
        self.core = core
        self.on_output = on_output
        self.tower = tower
        self.max_images = max_images
        self._stopped = False
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._lock = threading.Lock()
        openmp.release_workers()
        self._thread = threading.Thread(target=self._run, name="engine-core", daemon=True)
        self._thread.start()

    def submit(self, request: CoreRequest) -> RequestStream:
        if self.core is None:
            raise ValueError("this process runs no language model")
        if self._stopped:
            raise RuntimeError("the engine has stopped")
        self.core.check(request)
        openmp.release_workers()  # the caller's part is done: its workers would slow the engine's
        stream = RequestStream(self, request.request_id)
        with self._lock:
            if request.request_id in self._streams:
                raise ValueError(f"request id {request.request_id!r} is already running")
            self._streams[request.request_id] = stream
        self._inbox.put(("add", request))
        return stream

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def encode_images(self, images: list[dict], wanted: Callable[[], bool] | None = None) -> list[torch.Tensor]:
        """The projected tokens of each image (its ``image_inputs``), from the loop's thread;
        ``Abandoned``, with nothing computed, when ``wanted`` says the caller left meanwhile."""
        if self.tower is None:
            raise ValueError("this process runs no vision tower")
        if self._stopped:
            raise RuntimeError("the engine has stopped")
        done: Future = Future()
        openmp.release_workers()
        self._inbox.put(("vision", (images, done, wanted)))
        return done.result()

    def stop(self) -> None:
        """Ends the loop after the step in progress; requests still running are aborted."""
        self._inbox.put(("stop", None))
        self._thread.join()

    @property
    def _has_work(self) -> bool:
        return self.core is not None and self.core.has_work

    def _run(self) -> None:
        while True:
            vision = []
            try:
                if not self._drain(block=not self._has_work, vision=vision):
                    break
                if vision:
                    self._encode(vision)
                if self._has_work:
                    for output in self.core.step():
                        self._deliver(output)
            except Exception as error:  # noqa: BLE001 - a fault of the loop fails what it holds, never hangs it
                self._fail_all(error)
        self._stopped = True
        self._fail_all(None)
        stopped = RuntimeError("the engine has stopped")
        while True:  # what came with or after the stop is refused, never left waiting
            for _, done, _ in vision:
                done.set_exception(stopped)
            try:
                kind, value = self._inbox.get_nowait()
            except queue.Empty:
                return
            vision = [value] if kind == "vision" else []
            if kind == "add":
                self._deliver(RequestOutput(value.request_id, finished=True, finish_reason="error", error=stopped))

    def _encode(self, jobs: list[tuple[list[dict], Future, Callable[[], bool] | None]]) -> None:
        """Runs the tower on the queued images, ``max_images`` at a time, and answers each caller."""
        for job in [j for j in jobs if j[2] is not None and not j[2]()]:
            job[1].set_exception(Abandoned("the caller gave up while its images waited for the vision tower"))
            jobs.remove(job)
        images = [image for inputs, _, _ in jobs for image in inputs]
        try:
            features = [f for start in range(0, len(images), self.max_images) for f in self.tower(images[start : start + self.max_images])]
        except Exception as error:  # noqa: BLE001 - the callers get the error, the loop goes on
            for _, done, _ in jobs:
                done.set_exception(error)
            return
        taken = 0
        for inputs, done, _ in jobs:
            done.set_result(features[taken : taken + len(inputs)])
            taken += len(inputs)

    def _drain(self, block: bool, vision: list) -> bool:
        """Takes in what callers sent, images into ``vision``; False once asked to stop."""
        try:
            item = self._inbox.get() if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            kind, value = item
            if kind == "stop":
                return False
            if kind == "vision":
                vision.append(value)
            elif kind == "add":
                try:
                    self.core.add_request(value)
                except Exception as error:  # noqa: BLE001 - e.g. a request id taken meanwhile
                    self._deliver(RequestOutput(value.request_id, finished=True, finish_reason="error", error=error))
            else:
                output = self.core.abort(value)
                if output is not None:
                    self._deliver(output)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _deliver(self, output: RequestOutput) -> None:
        if self.on_output is not None:
            try:
                self.on_output(output)
            except Exception:  # noqa: BLE001 - an observer's fault costs no caller its answer
                log.exception("an observer of the engine's outputs failed")
        with self._lock:
            stream = self._streams.pop(output.request_id) if output.finished else self._streams.get(output.request_id)
        if stream is not None:
            stream._outputs.put(output)

    def _fail_all(self, error: Exception | None) -> None:
        if self.core is None:
            return
        with self._lock:
            ids = list(self._streams)
        for request_id in ids:
            output = self.core.abort(request_id) or RequestOutput(request_id, finished=True, finish_reason="abort")
            if error is not None:
                output.finish_reason, output.error = "error", error
            self._deliver(output)
