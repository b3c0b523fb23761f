"""A streamed response's bodies from a synchronous generator, without a thread hop per body.

Starlette iterates a synchronous body in its thread pool: a hop to a worker thread and back for
every item, and one more to learn that it ended. On a machine whose cores the engine keeps busy,
each hop waits for a core, and a short answer pays several of them after its last token. Here
one worker thread (of the same pool) runs the generator from start to end and posts each item
to the event loop, which sends whatever has arrived in one write: the last text, the final
event and the end of the stream, made without a wait between them, mostly go together.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Generator

import anyio.to_thread

_END = object()


class Pump:
    def __init__(self, items: Generator[str, None, None], head: str = "") -> None:
        """``head``: what to send first, taken from ``items`` already."""
        self._items = items
        self._head = head
        self._lock = threading.Lock()
        self._stopped = False
        self._drained: asyncio.Task | None = None  # held: the loop keeps only weak references to tasks

    async def __aiter__(self) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if self._stopped or self._drained is not None:
                return
            self._drained = loop.create_task(anyio.to_thread.run_sync(self._drain, loop, queue))
        try:
            if self._head:
                yield self._head
            while True:
                arrived = [await queue.get()]
                while not queue.empty():
                    arrived.append(queue.get_nowait())
                texts = [item for item in arrived if isinstance(item, str)]
                if texts:
                    yield "".join(texts)
                for item in arrived:
                    if isinstance(item, BaseException):
                        raise item
                    if item is _END:
                        return
        finally:
            self.close()  # a client that left: the generator is closed after the item it is on

    def close(self) -> None:
        """Stops the stream: at once when it never began, after the item it is waiting for
        otherwise (the thread that runs the generator closes it)."""
        with self._lock:
            self._stopped = True
            started = self._drained is not None
        if not started:
            self._items.close()

    def _drain(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        def post(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone: nobody is left to send it to
                pass

        try:
            for item in self._items:
                if self._stopped:
                    break
                post(item)
        except BaseException as error:  # noqa: BLE001 - raised where the response is sent
            post(error)
        finally:
            self._items.close()
            post(_END)
