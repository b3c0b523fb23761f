"""The engine core in a thread of its own, serving callers from any thread.

``submit`` checks a request in the caller's thread (so a bad one fails there, at once) and
hands it to the loop, which adds it between two steps; the caller reads the request's outputs
from its ``RequestStream`` as the steps produce them, and ``abort`` takes it out between steps.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

from dartserve.engine.core import EngineCore
from dartserve.engine.requests import CoreRequest, RequestOutput


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
    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="engine-core", daemon=True)
        self._thread.start()

    def submit(self, request: CoreRequest) -> RequestStream:
        self.core.check(request)
        stream = RequestStream(self, request.request_id)
        with self._lock:
            if request.request_id in self._streams:
                raise ValueError(f"request id {request.request_id!r} is already running")
            self._streams[request.request_id] = stream
        self._inbox.put(("add", request))
        return stream

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def stop(self) -> None:
        """Ends the loop after the step in progress; requests still running are aborted."""
        self._inbox.put(("stop", None))
        self._thread.join()

    def _run(self) -> None:
        while True:
            try:
                if not self._drain(block=not self.core.has_work):
                    break
                if self.core.has_work:
                    for output in self.core.step():
                        self._deliver(output)
            except Exception as error:  # noqa: BLE001 - a fault of the loop fails what it holds, never hangs it
                self._fail_all(error)
        self._fail_all(None)

    def _drain(self, block: bool) -> bool:
        """Takes in what callers sent; False once asked to stop."""
        try:
            item = self._inbox.get() if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            kind, value = item
            if kind == "stop":
                return False
            if kind == "add":
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
        with self._lock:
            stream = self._streams.pop(output.request_id) if output.finished else self._streams.get(output.request_id)
        if stream is not None:
            stream._outputs.put(output)

    def _fail_all(self, error: Exception | None) -> None:
        with self._lock:
            ids = list(self._streams)
        for request_id in ids:
            output = self.core.abort(request_id) or RequestOutput(request_id, finished=True, finish_reason="abort")
            if error is not None:
                output.finish_reason, output.error = "error", error
            self._deliver(output)
