"""LoopThread: an object's coroutines run in its own loop, awaited or waited for."""

from __future__ import annotations

import asyncio
import threading

import pytest

from services.common.loops import LoopThread


@pytest.fixture
def loop_thread():
    lt = LoopThread("test-loop")
    yield lt
    lt.stop()


async def where() -> str:
    await asyncio.sleep(0)
    return threading.current_thread().name


async def test_run_and_call_use_the_own_loop_also_from_inside_another(loop_thread):
    assert await loop_thread.run(where()) == "test-loop"
    # A blocking call from inside a running loop (the spec's sync calls in async code).
    assert loop_thread.call(where()) == "test-loop"

    async def nested() -> str:  # inside the own loop, run() awaits directly
        return await loop_thread.run(where())

    assert await loop_thread.run(nested()) == "test-loop"


async def test_a_blocking_call_from_its_own_loop_raises_instead_of_hanging(loop_thread):
    async def blocking() -> None:
        loop_thread.call(where())

    with pytest.raises(RuntimeError):
        await loop_thread.run(blocking())


async def test_iterate_streams_errors_and_stops_early(loop_thread):
    finished = []

    async def numbers(fail_at: int | None = None):
        try:
            for i in range(5):
                if i == fail_at:
                    raise ValueError(i)
                yield i, threading.current_thread().name
                await asyncio.sleep(0)
        finally:
            finished.append(fail_at)

    assert [x async for x in loop_thread.iterate(numbers())] == [(i, "test-loop") for i in range(5)]
    with pytest.raises(ValueError):
        async for _ in loop_thread.iterate(numbers(fail_at=2)):
            pass
    async for i, _ in loop_thread.iterate(numbers(fail_at=-1)):
        if i == 1:
            break
    for _ in range(100):  # the iterator in the other loop is cancelled and cleans up
        if -1 in finished:
            break
        await asyncio.sleep(0.01)
    assert finished == [None, 2, -1]


def test_stop_is_final_and_idempotent():
    lt = LoopThread("short")
    assert lt.call(where()) == "short"
    lt.stop()
    lt.stop()
    assert lt.stopped
