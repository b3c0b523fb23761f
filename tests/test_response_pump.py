"""The gateway's response pump: a synchronous generator of bodies, run in one worker thread and
sent from the event loop. The answers through it are tested end to end in test_services."""

import asyncio
import threading

import pytest

from services.gateway.pump import Pump


def _collect(pump: Pump) -> list[str]:
    async def run():
        return [text async for text in pump]

    return asyncio.run(run())


def test_the_head_goes_first_and_the_items_in_order():
    release = threading.Event()
    closed = []

    def items():
        try:
            yield "head"
            yield "a"
            release.wait(5)
            yield "b"
            yield "c"
        finally:
            closed.append(True)

    generator = items()
    pump = Pump(generator, head=next(generator))
    threading.Timer(0.2, release.set).start()
    writes = _collect(pump)
    assert "".join(writes) == "headabc"
    assert writes[0] == "head"
    assert closed == [True]


def test_an_error_in_the_generator_reaches_the_sender():
    def items():
        yield "a"
        raise KeyError("broken")

    with pytest.raises(KeyError):
        _collect(Pump(items()))


def test_a_pump_closed_before_it_began_closes_its_generator_at_once():
    closed = []

    def items():
        try:
            yield "head"
            yield "never sent"
        finally:
            closed.append(threading.current_thread().name)

    generator = items()
    pump = Pump(generator, head=next(generator))
    pump.close()
    assert closed == [threading.current_thread().name]
    assert _collect(pump) == []


def test_a_client_that_leaves_closes_the_generator_after_the_item_it_waits_for():
    waiting, release, closed = threading.Event(), threading.Event(), threading.Event()
    produced = []

    def items():
        try:
            yield "a"
            waiting.set()
            release.wait(5)
            produced.append("b")
            yield "b"
            produced.append("c")
            yield "c"
        finally:
            closed.set()

    async def leave_after_first():
        stream = Pump(items()).__aiter__()
        assert await stream.__anext__() == "a"
        await asyncio.get_running_loop().run_in_executor(None, waiting.wait, 5)
        await stream.aclose()  # as when the response's task is cancelled: the generator still waits
        assert not closed.is_set()
        release.set()
        assert await asyncio.get_running_loop().run_in_executor(None, closed.wait, 5)

    asyncio.run(leave_after_first())
    assert produced == ["b"]  # the item it waited for, then closed: "c" was never made
